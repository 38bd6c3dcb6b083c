//! EfficientNet-Lite0 (Tan and Le 2019; the "Lite" variant: no squeeze-excitation, ReLU6, fixed
//! stem and head), as converted from TensorFlow with the names of the EfficientNet-PyTorch port
//! (`_conv_stem`, `_blocks.N._expand_conv` / `_depthwise_conv` / `_project_conv`, `_conv_head`,
//! `_fc`). Batch norm eps 1e-3; TensorFlow "SAME" padding, which at stride 2 pads one more
//! row and column after than before. Input: `(x - 127) / 128` on 0..255.

use candle_core::{Result, Tensor};

use super::layers::{Act, BatchNorm, Conv, Linear};
use super::weights::Params;
use super::{ConvRole, Recorder, TapInfo};

const EPS: f64 = 1e-3;

/// Stages: (repeats, kernel, stride, expansion, output channels).
const STAGES: [(usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
];

/// Every block: (index, cin, cout, kernel, stride, expansion).
fn blocks() -> Vec<(usize, usize, usize, usize, usize, usize)> {
    let mut v = Vec::new();
    let mut cin = 32;
    for (r, k, s, e, c) in STAGES {
        for i in 0..r {
            v.push((v.len(), cin, c, k, if i == 0 { s } else { 1 }, e));
            cin = c;
        }
    }
    v
}

/// A block's convolutions: (tap name, batch norm name, cin, cout, k, stride, groups).
#[allow(clippy::type_complexity)]
fn block_units(
    i: usize,
    cin: usize,
    cout: usize,
    k: usize,
    s: usize,
    e: usize,
) -> Vec<(String, String, usize, usize, usize, usize, usize)> {
    let b = format!("_blocks.{i}");
    let hidden = cin * e;
    let mut u = Vec::new();
    if e != 1 {
        u.push((
            format!("{b}._expand_conv"),
            format!("{b}._bn0"),
            cin,
            hidden,
            1,
            1,
            1,
        ));
    }
    u.push((
        format!("{b}._depthwise_conv"),
        format!("{b}._bn1"),
        hidden,
        hidden,
        k,
        s,
        hidden,
    ));
    u.push((
        format!("{b}._project_conv"),
        format!("{b}._bn2"),
        hidden,
        cout,
        1,
        1,
        1,
    ));
    u
}

/// Every tap, in forward order.
pub fn taps() -> Vec<TapInfo> {
    let conv =
        |name: String, channels, bn: String, role| TapInfo::conv(name, channels, Some(bn), role);
    let mut t = vec![conv("_conv_stem".into(), 32, "_bn0".into(), ConvRole::Stem)];
    for (i, cin, cout, k, s, e) in blocks() {
        let residual = s == 1 && cin == cout;
        let units = block_units(i, cin, cout, k, s, e);
        let last = units.len() - 1;
        for (j, (name, bn, _, co, ..)) in units.into_iter().enumerate() {
            let role = if residual && j == last {
                ConvRole::ResidualLast
            } else {
                ConvRole::Other
            };
            t.push(conv(name, co, bn, role));
        }
        t.push(TapInfo::block(format!("_blocks.{i}"), cout));
    }
    t.push(conv(
        "_conv_head".into(),
        1280,
        "_bn1".into(),
        ConvRole::Other,
    ));
    t.push(TapInfo::logits(1000));
    t
}

/// A convolution with TensorFlow "SAME" padding, its batch norm and optional ReLU6.
struct Unit {
    tap: String,
    conv: Conv,
    bn: BatchNorm,
    k: usize,
    stride: usize,
    relu6: bool,
}

impl Unit {
    #[allow(clippy::too_many_arguments)]
    fn new(
        p: &mut Params,
        tap: &str,
        bn: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        groups: usize,
        relu6: bool,
    ) -> Result<Unit> {
        let conv = Conv::new(p, tap, cin, cout, k, stride, groups, false)?;
        Ok(Unit {
            tap: tap.to_string(),
            // stride 1 with an odd kernel: SAME is the symmetric k/2 the conv already pads
            conv: if stride == 1 { conv } else { conv.valid() },
            bn: BatchNorm::new(p, bn, cout, EPS)?,
            k,
            stride,
            relu6,
        })
    }

    fn forward(&self, x: &Tensor, rec: &mut Recorder) -> Result<Tensor> {
        let x = if self.stride == 1 {
            x.clone()
        } else {
            let (_, h, w, _) = x.dims4()?;
            let pad = |n: usize| {
                let out = n.div_ceil(self.stride);
                ((out - 1) * self.stride + self.k).saturating_sub(n)
            };
            let (ph, pw) = (pad(h), pad(w));
            x.pad_with_zeros(1, ph / 2, ph - ph / 2)?
                .pad_with_zeros(2, pw / 2, pw - pw / 2)?
        };
        let act = if self.relu6 {
            Act::Relu6
        } else {
            Act::Identity
        };
        rec.conv_bn(&self.tap, &self.conv, &self.bn, act, None, &x)
    }
}

struct Block {
    name: String,
    units: Vec<Unit>,
    residual: bool,
}

/// The network.
pub struct EfficientNetLite0 {
    stem: Unit,
    blocks: Vec<Block>,
    head: Unit,
    fc: Linear,
}

impl EfficientNetLite0 {
    /// Builds it from checkpoint tensors.
    pub fn new(p: &mut Params) -> Result<Self> {
        let stem = Unit::new(p, "_conv_stem", "_bn0", 3, 32, 3, 2, 1, true)?;
        let mut bs = Vec::new();
        for (i, cin, cout, k, s, e) in blocks() {
            let units = block_units(i, cin, cout, k, s, e);
            let last = units.len() - 1;
            let mut us = Vec::new();
            for (j, (tap, bn, ci, co, k, s, g)) in units.into_iter().enumerate() {
                us.push(Unit::new(p, &tap, &bn, ci, co, k, s, g, j != last)?);
            }
            bs.push(Block {
                name: format!("_blocks.{i}"),
                units: us,
                residual: s == 1 && cin == cout,
            });
        }
        let head = Unit::new(p, "_conv_head", "_bn1", 320, 1280, 1, 1, 1, true)?;
        let fc = Linear::new(p, "_fc", 1280, 1000)?;
        Ok(EfficientNetLite0 {
            stem,
            blocks: bs,
            head,
            fc,
        })
    }

    /// Forward pass of channels-last `[B, H, W, 3]`.
    pub fn forward(&self, x: &Tensor, rec: &mut Recorder) -> Result<Tensor> {
        let mut x = self.stem.forward(x, rec)?;
        for b in &self.blocks {
            let mut y = x.clone();
            for u in &b.units {
                y = u.forward(&y, rec)?;
            }
            x = if b.residual { (y + &x)? } else { y };
            rec.tap(&b.name, &x)?;
        }
        let x = self.head.forward(&x, rec)?;
        let pooled = super::layers::spatial_mean(&x)?;
        let logits = self.fc.forward(&pooled)?;
        rec.tap("logits", &logits)?;
        Ok(logits)
    }
}
