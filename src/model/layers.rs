//! Inference-only layers: convolution (bias optional), batch norm folded to scale and shift,
//! linear, and a direct depthwise 3x3 convolution for the CPU (candle runs a grouped convolution
//! as one convolution per group, hundreds of them in MobileNetV2).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::weights::Params;

/// A 2-D convolution.
pub struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
    groups: usize,
    /// Flattened weights when this is a depthwise 3x3 convolution (run by [`Depthwise3x3`]).
    depthwise: Option<Vec<f32>>,
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
        let depthwise = (groups > 1 && groups == cin && groups == cout && k == 3)
            .then(|| weight.flatten_all().and_then(|w| w.to_vec1::<f32>()).ok())
            .flatten();
        Conv {
            weight,
            bias,
            stride,
            padding: k / 2,
            groups,
            depthwise,
        }
    }

    /// Applies the convolution.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.depthwise {
            Some(w) if x.device().is_cpu() => x.contiguous()?.apply_op1_no_bwd(&Depthwise3x3 {
                weight: w,
                stride: self.stride,
            })?,
            _ => x.conv2d(&self.weight, self.padding, self.stride, 1, self.groups)?,
        };
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

/// Depthwise 3x3 convolution, padding 1, on contiguous f32 `[B, C, H, W]`: each channel's plane is
/// copied into a zero-bordered scratch plane, then the 9 taps are accumulated row by row.
pub struct Depthwise3x3<'a> {
    /// `[C, 1, 3, 3]` weights, flattened.
    pub weight: &'a [f32],
    /// Stride (1 or 2).
    pub stride: usize,
}

impl CustomOp1 for Depthwise3x3<'_> {
    fn name(&self) -> &'static str {
        "depthwise3x3"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = layout.shape().dims4()?;
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("depthwise3x3: f32 input expected")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("depthwise3x3: contiguous input expected")
        };
        let x = &data[start..end];
        let s = self.stride;
        let (ho, wo) = ((h - 1) / s + 1, (w - 1) / s + 1);
        let (ph, pw) = (h + 2, w + 2);
        let mut out = vec![0f32; b * c * ho * wo];
        out.par_chunks_mut(ho * wo).enumerate().for_each_init(
            || vec![0f32; ph * pw],
            |pad, (plane, o)| {
                let src = &x[plane * h * w..(plane + 1) * h * w];
                for y in 0..h {
                    pad[(y + 1) * pw + 1..(y + 1) * pw + 1 + w]
                        .copy_from_slice(&src[y * w..(y + 1) * w]);
                }
                let k = &self.weight[(plane % c) * 9..(plane % c) * 9 + 9];
                for oy in 0..ho {
                    let row = &mut o[oy * wo..(oy + 1) * wo];
                    for ky in 0..3 {
                        let prow = &pad[(oy * s + ky) * pw..(oy * s + ky + 1) * pw];
                        for kx in 0..3 {
                            let kv = k[ky * 3 + kx];
                            if s == 1 {
                                for (r, p) in row.iter_mut().zip(&prow[kx..kx + wo]) {
                                    *r += kv * p;
                                }
                            } else {
                                for (ox, r) in row.iter_mut().enumerate() {
                                    *r += kv * prow[ox * s + kx];
                                }
                            }
                        }
                    }
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((b, c, ho, wo))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn depthwise_matches_candle_grouped_conv() {
        let dev = Device::Cpu;
        for (h, stride) in [(9usize, 1usize), (10, 2), (7, 2), (1, 1)] {
            let x = Tensor::randn(0f32, 1.0, (2, 5, h, h + 1), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (5, 1, 3, 3), &dev).unwrap();
            let want = x.conv2d(&k, 1, stride, 1, 5).unwrap();
            let got = x
                .apply_op1_no_bwd(&Depthwise3x3 {
                    weight: &k.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    stride,
                })
                .unwrap();
            assert_eq!(got.dims(), want.dims());
            let err = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(err < 1e-5, "h {h} stride {stride}: {err}");
        }
    }
}
