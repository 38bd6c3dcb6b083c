//! CIFAR-10 ResNet-20/32/44/56 of He et al. 2016 as in akamaster's pytorch_resnet_cifar10:
//! 3x3 stem of 16 channels, three stages of n basic blocks (16, 32, 64 planes; n = (depth-2)/6),
//! option-A shortcut (`x[:, :, ::2, ::2]` zero-padded with planes/4 channels each side), global
//! average pool, linear to 10 classes. Tensor names mirror the checkpoint (`layer2.0.conv1`).

use candle_core::{Result, Tensor};

use super::layers::{Act, BatchNorm, Conv, Linear};
use super::weights::Params;
use super::{ConvRole, Recorder, TapGroup, TapInfo};

const EPS: f64 = 1e-5;

fn blocks(depth: usize) -> usize {
    (depth - 2) / 6
}

/// Every tap of ResNet-`depth`, in forward order.
pub fn taps(depth: usize) -> Vec<TapInfo> {
    let tap = |name: String, channels, group, bn: Option<String>, role| TapInfo {
        name,
        channels,
        group,
        bn,
        role,
    };
    let mut t = vec![tap(
        "conv1".into(),
        16,
        TapGroup::Conv,
        Some("bn1".into()),
        ConvRole::Stem,
    )];
    for (l, planes) in [16usize, 32, 64].iter().enumerate() {
        for i in 0..blocks(depth) {
            let b = format!("layer{}.{i}", l + 1);
            for (k, role) in [(1, ConvRole::Other), (2, ConvRole::ResidualLast)] {
                t.push(tap(
                    format!("{b}.conv{k}"),
                    *planes,
                    TapGroup::Conv,
                    Some(format!("{b}.bn{k}")),
                    role,
                ));
            }
            t.push(tap(b, *planes, TapGroup::Block, None, ConvRole::Other));
        }
    }
    t.push(tap(
        "logits".into(),
        10,
        TapGroup::Logits,
        None,
        ConvRole::Other,
    ));
    t
}

struct Block {
    name: String,
    conv1: Conv,
    bn1: BatchNorm,
    conv2: Conv,
    bn2: BatchNorm,
    /// Channels zero-padded on each side of the subsampled input, when the shape changes.
    pad: Option<usize>,
}

/// The network.
pub struct ResNet {
    conv1: Conv,
    bn1: BatchNorm,
    blocks: Vec<Block>,
    linear: Linear,
}

impl ResNet {
    /// Builds ResNet-`depth` from checkpoint tensors.
    pub fn new(depth: usize, p: &mut Params) -> Result<Self> {
        let conv1 = Conv::new(p, "conv1", 3, 16, 3, 1, 1, false)?;
        let bn1 = BatchNorm::new(p, "bn1", 16, EPS)?;
        let mut all = Vec::new();
        let mut cin = 16;
        for (l, planes) in [16usize, 32, 64].into_iter().enumerate() {
            for i in 0..blocks(depth) {
                let stride = if l > 0 && i == 0 { 2 } else { 1 };
                let name = format!("layer{}.{i}", l + 1);
                all.push(Block {
                    conv1: Conv::new(
                        p,
                        &format!("{name}.conv1"),
                        cin,
                        planes,
                        3,
                        stride,
                        1,
                        false,
                    )?,
                    bn1: BatchNorm::new(p, &format!("{name}.bn1"), planes, EPS)?,
                    conv2: Conv::new(p, &format!("{name}.conv2"), planes, planes, 3, 1, 1, false)?,
                    bn2: BatchNorm::new(p, &format!("{name}.bn2"), planes, EPS)?,
                    pad: (stride != 1 || cin != planes).then_some(planes / 4),
                    name,
                });
                cin = planes;
            }
        }
        let linear = Linear::new(p, "linear", 64, 10)?;
        Ok(ResNet {
            conv1,
            bn1,
            blocks: all,
            linear,
        })
    }

    /// Forward pass of channels-last frames `[B, H, W, 3]`, recording taps.
    pub fn forward(&self, x: &Tensor, rec: &mut Recorder) -> Result<Tensor> {
        let mut x = rec.conv_bn("conv1", &self.conv1, &self.bn1, Act::Relu, None, x)?;
        for b in &self.blocks {
            let y = rec.conv_bn(
                &format!("{}.conv1", b.name),
                &b.conv1,
                &b.bn1,
                Act::Relu,
                None,
                &x,
            )?;
            let short = match b.pad {
                Some(pad) => {
                    let (n, h, w, c) = x.dims4()?;
                    // x[:, :, ::2, ::2] in NCHW terms: keep even rows and columns
                    let s = x
                        .reshape((n, h / 2, 2, w / 2, 2, c))?
                        .narrow(2, 0, 1)?
                        .narrow(4, 0, 1)?
                        .reshape((n, h / 2, w / 2, c))?;
                    s.pad_with_zeros(3, pad, pad)?
                }
                None => x.clone(),
            };
            x = rec.conv_bn(
                &format!("{}.conv2", b.name),
                &b.conv2,
                &b.bn2,
                Act::Relu,
                Some(&short),
                &y,
            )?;
            rec.tap(&b.name, &x)?;
        }
        let pooled = super::layers::spatial_mean(&x)?;
        let logits = self.linear.forward(&pooled)?;
        rec.tap("logits", &logits)?;
        Ok(logits)
    }
}
