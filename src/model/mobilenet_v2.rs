//! torchvision's MobileNetV2 (width 1.0): stem ConvBNReLU6 (3->32, stride 2), 17 inverted
//! residual blocks, a 1x1 ConvBNReLU6 to 1280, global average pool, linear to 1000 classes.
//! Tensor names mirror torchvision's (`features.3.conv.1.0`, `classifier.1`).

use candle_core::{Result, Tensor};

use super::layers::{Act, BatchNorm, Conv, Linear};
use super::weights::Params;
use super::{ConvRole, Recorder, TapGroup, TapInfo};

const EPS: f64 = 1e-5;
/// (expansion t, output channels c, repeats n, first stride s), torchvision's table.
const SETTINGS: [(usize, usize, usize, usize); 7] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
];

/// One layer of a block: conv, its batch norm, whether ReLU6 follows; `tap` is the conv's name.
struct Unit {
    tap: String,
    conv: Conv,
    bn: BatchNorm,
    relu6: bool,
}

struct Block {
    name: String,
    units: Vec<Unit>,
    residual: bool,
}

/// Shapes of every block: (name, in, out, stride, expansion); expansion 0 = plain ConvBNReLU.
fn plan() -> Vec<(String, usize, usize, usize, usize, usize)> {
    // (name, cin, cout, stride, t, kernel)
    let mut v = vec![("features.0".to_string(), 3, 32, 2, 0, 3)];
    let mut cin = 32;
    let mut idx = 1;
    for (t, c, n, s) in SETTINGS {
        for i in 0..n {
            v.push((
                format!("features.{idx}"),
                cin,
                c,
                if i == 0 { s } else { 1 },
                t,
                3,
            ));
            cin = c;
            idx += 1;
        }
    }
    v.push((format!("features.{idx}"), cin, 1280, 1, 0, 1));
    v
}

/// The convs of one block: (tap name, bn name, cin, cout, kernel, stride, groups, relu6).
#[allow(clippy::type_complexity)]
fn units(
    name: &str,
    cin: usize,
    cout: usize,
    stride: usize,
    t: usize,
    k: usize,
) -> Vec<(String, String, usize, usize, usize, usize, usize, bool)> {
    if t == 0 {
        return vec![(
            format!("{name}.0"),
            format!("{name}.1"),
            cin,
            cout,
            k,
            stride,
            1,
            true,
        )];
    }
    let hidden = cin * t;
    let mut u = Vec::new();
    let mut i = 0;
    if t != 1 {
        u.push((
            format!("{name}.conv.0.0"),
            format!("{name}.conv.0.1"),
            cin,
            hidden,
            1,
            1,
            1,
            true,
        ));
        i = 1;
    }
    u.push((
        format!("{name}.conv.{i}.0"),
        format!("{name}.conv.{i}.1"),
        hidden,
        hidden,
        3,
        stride,
        hidden,
        true,
    ));
    u.push((
        format!("{name}.conv.{}", i + 1),
        format!("{name}.conv.{}", i + 2),
        hidden,
        cout,
        1,
        1,
        1,
        false,
    ));
    u
}

/// Every tap, in forward order.
pub fn taps() -> Vec<TapInfo> {
    let mut out = Vec::new();
    for (name, cin, cout, stride, t, k) in plan() {
        let residual = t != 0 && stride == 1 && cin == cout;
        let us = units(&name, cin, cout, stride, t, k);
        let last = us.len() - 1;
        for (i, (tap, bn, _, co, ..)) in us.into_iter().enumerate() {
            let role = if name == "features.0" {
                ConvRole::Stem
            } else if residual && i == last {
                ConvRole::ResidualLast
            } else {
                ConvRole::Other
            };
            out.push(TapInfo {
                name: tap,
                channels: co,
                group: TapGroup::Conv,
                bn: Some(bn),
                role,
            });
        }
        out.push(TapInfo::block(name, cout));
    }
    out.push(TapInfo::logits(1000));
    out
}

/// The network.
pub struct MobileNetV2 {
    blocks: Vec<Block>,
    classifier: Linear,
}

impl MobileNetV2 {
    /// Builds it from checkpoint tensors.
    pub fn new(p: &mut Params) -> Result<Self> {
        let mut blocks = Vec::new();
        for (name, cin, cout, stride, t, k) in plan() {
            let mut us = Vec::new();
            for (tap, bn, ci, co, k, s, g, relu6) in units(&name, cin, cout, stride, t, k) {
                us.push(Unit {
                    conv: Conv::new(p, &tap, ci, co, k, s, g, false)?,
                    bn: BatchNorm::new(p, &bn, co, EPS)?,
                    tap,
                    relu6,
                });
            }
            blocks.push(Block {
                residual: t != 0 && stride == 1 && cin == cout,
                name,
                units: us,
            });
        }
        let classifier = Linear::new(p, "classifier.1", 1280, 1000)?;
        Ok(MobileNetV2 { blocks, classifier })
    }

    /// Forward pass of channels-last frames `[B, H, W, 3]`, recording taps.
    pub fn forward(&self, x: &Tensor, rec: &mut Recorder) -> Result<Tensor> {
        let mut x = x.clone();
        for b in &self.blocks {
            let mut y = x.clone();
            for u in &b.units {
                let act = if u.relu6 { Act::Relu6 } else { Act::Identity };
                y = rec.conv_bn(&u.tap, &u.conv, &u.bn, act, None, &y)?;
            }
            x = if b.residual { (y + &x)? } else { y };
            rec.tap(&b.name, &x)?;
        }
        let pooled = super::layers::spatial_mean(&x)?;
        let logits = self.classifier.forward(&pooled)?;
        rec.tap("logits", &logits)?;
        Ok(logits)
    }
}
