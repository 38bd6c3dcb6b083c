//! Inference-only layers: convolution (bias optional), batch norm folded to scale and shift,
//! linear.

use candle_core::{Result, Tensor};

use super::weights::Params;

/// A 2-D convolution.
pub struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
    groups: usize,
}

impl Conv {
    /// Loads `{name}.weight` `[out, in/groups, k, k]` (and `{name}.bias` if `bias`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        p: &mut Params,
        name: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        groups: usize,
        bias: bool,
    ) -> Self {
        let weight = p.get(&format!("{name}.weight"), &[cout, cin / groups, k, k]);
        let bias = bias.then(|| p.get(&format!("{name}.bias"), &[cout]));
        Conv {
            weight,
            bias,
            stride,
            padding: k / 2,
            groups,
        }
    }

    /// Applies the convolution.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.conv2d(&self.weight, self.padding, self.stride, 1, self.groups)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
            None => Ok(y),
        }
    }
}

/// Batch norm in inference mode as `x * scale + shift`.
pub struct BatchNorm {
    scale: Tensor,
    shift: Tensor,
}

impl BatchNorm {
    /// Loads `{name}.{weight,bias,running_mean,running_var}` and folds them with `eps`.
    pub fn new(p: &mut Params, name: &str, c: usize, eps: f64) -> Result<Self> {
        let w = p.get(&format!("{name}.weight"), &[c]);
        let b = p.get(&format!("{name}.bias"), &[c]);
        let m = p.get(&format!("{name}.running_mean"), &[c]);
        let v = p.get(&format!("{name}.running_var"), &[c]);
        let scale = w.broadcast_div(&(v + eps)?.sqrt()?)?;
        let shift = (b - m.mul(&scale)?)?;
        Ok(BatchNorm {
            scale: scale.reshape((1, c, 1, 1))?,
            shift: shift.reshape((1, c, 1, 1))?,
        })
    }

    /// Applies it.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.broadcast_mul(&self.scale)?.broadcast_add(&self.shift)
    }
}

/// A fully connected layer `x W^T + b`.
pub struct Linear {
    weight_t: Tensor,
    bias: Tensor,
}

impl Linear {
    /// Loads `{name}.weight` `[out, in]` and `{name}.bias`.
    pub fn new(p: &mut Params, name: &str, cin: usize, cout: usize) -> Result<Self> {
        let w = p.get(&format!("{name}.weight"), &[cout, cin]);
        let bias = p.get(&format!("{name}.bias"), &[cout]);
        Ok(Linear {
            weight_t: w.t()?.contiguous()?,
            bias,
        })
    }

    /// Applies it to `[B, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&self.weight_t)?.broadcast_add(&self.bias)
    }
}
