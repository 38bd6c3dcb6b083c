//! torchvision's ImageNet ResNet-18/34/50 (v1.5: the stride of a bottleneck sits on its 3x3
//! conv) and VGG-11/16 (no batch norm), with torchvision's tensor names, so a user's
//! `resnet18-*.pth` or safetensors file loads as it is. Channels-last inside.

use candle_core::{Result, Tensor};

use super::layers::{Act, BatchNorm, Conv, Linear};
use super::weights::Params;
use super::{ConvRole, Recorder, TapInfo};

const EPS: f64 = 1e-5;

/// Blocks per stage and whether they are bottlenecks.
fn resnet_layout(depth: usize) -> ([usize; 4], bool) {
    match depth {
        18 => ([2, 2, 2, 2], false),
        34 => ([3, 4, 6, 3], false),
        _ => ([3, 4, 6, 3], true),
    }
}

/// One residual block's convolutions: (name, cin, cout, k, stride).
fn block_convs(
    name: &str,
    cin: usize,
    planes: usize,
    stride: usize,
    bottleneck: bool,
) -> Vec<(String, usize, usize, usize, usize)> {
    if bottleneck {
        vec![
            (format!("{name}.conv1"), cin, planes, 1, 1),
            (format!("{name}.conv2"), planes, planes, 3, stride),
            (format!("{name}.conv3"), planes, planes * 4, 1, 1),
        ]
    } else {
        vec![
            (format!("{name}.conv1"), cin, planes, 3, stride),
            (format!("{name}.conv2"), planes, planes, 3, 1),
        ]
    }
}

/// Every block: (name, cin, planes, stride, has downsample).
fn resnet_blocks(depth: usize) -> Vec<(String, usize, usize, usize, bool)> {
    let (counts, bottleneck) = resnet_layout(depth);
    let exp = if bottleneck { 4 } else { 1 };
    let mut cin = 64;
    let mut v = Vec::new();
    for (l, (n, planes)) in counts.iter().zip([64usize, 128, 256, 512]).enumerate() {
        for i in 0..*n {
            let stride = if l > 0 && i == 0 { 2 } else { 1 };
            let down = i == 0 && (stride != 1 || cin != planes * exp);
            v.push((format!("layer{}.{i}", l + 1), cin, planes, stride, down));
            cin = planes * exp;
        }
    }
    v
}

fn conv_tap(name: String, channels: usize, bn: Option<String>, role: ConvRole) -> TapInfo {
    TapInfo::conv(name, channels, bn, role)
}

fn bn_name(conv: &str) -> String {
    // layer1.0.conv2 -> layer1.0.bn2; conv1 -> bn1; layer2.0.downsample.0 -> .downsample.1
    if let Some(p) = conv.strip_suffix(".downsample.0") {
        return format!("{p}.downsample.1");
    }
    match conv.rsplit_once(".conv") {
        Some((p, k)) => format!("{p}.bn{k}"),
        None => conv.replacen("conv", "bn", 1),
    }
}

/// Every tap of ResNet-`depth`, in forward order.
pub fn resnet_taps(depth: usize) -> Vec<TapInfo> {
    let (_, bottleneck) = resnet_layout(depth);
    let mut t = vec![conv_tap(
        "conv1".into(),
        64,
        Some("bn1".into()),
        ConvRole::Stem,
    )];
    for (name, cin, planes, stride, down) in resnet_blocks(depth) {
        let convs = block_convs(&name, cin, planes, stride, bottleneck);
        let last = convs.len() - 1;
        let cout = convs[last].2;
        for (i, (c, _, co, ..)) in convs.into_iter().enumerate() {
            let role = if i == last {
                ConvRole::ResidualLast
            } else {
                ConvRole::Other
            };
            let bn = bn_name(&c);
            t.push(conv_tap(c, co, Some(bn), role));
        }
        if down {
            let c = format!("{name}.downsample.0");
            t.push(conv_tap(
                c.clone(),
                cout,
                Some(bn_name(&c)),
                ConvRole::Other,
            ));
        }
        t.push(TapInfo::block(name, cout));
    }
    t.push(TapInfo::logits(1000));
    t
}

struct Unit {
    name: String,
    conv: Conv,
    bn: BatchNorm,
}

impl Unit {
    fn new(
        p: &mut Params,
        name: &str,
        cin: usize,
        cout: usize,
        k: usize,
        s: usize,
    ) -> Result<Unit> {
        Ok(Unit {
            conv: Conv::new(p, name, cin, cout, k, s, 1, false)?,
            bn: BatchNorm::new(p, &bn_name(name), cout, EPS)?,
            name: name.to_string(),
        })
    }

    /// Conv (recorded), then batch norm and `act`.
    fn forward(&self, x: &Tensor, rec: &mut Recorder, act: Act) -> Result<Tensor> {
        rec.conv_bn(&self.name, &self.conv, &self.bn, act, None, x)
    }
}

struct Block {
    name: String,
    units: Vec<Unit>,
    down: Option<Unit>,
}

/// torchvision ResNet.
pub struct ResNet {
    stem: Unit,
    blocks: Vec<Block>,
    fc: Linear,
}

impl ResNet {
    /// Builds ResNet-`depth` (18, 34, 50) from torchvision-named tensors.
    pub fn new(depth: usize, p: &mut Params) -> Result<Self> {
        let (_, bottleneck) = resnet_layout(depth);
        let stem = Unit::new(p, "conv1", 3, 64, 7, 2)?;
        let mut blocks = Vec::new();
        let mut cout = 64;
        for (name, cin, planes, stride, down) in resnet_blocks(depth) {
            let mut units = Vec::new();
            for (c, ci, co, k, s) in block_convs(&name, cin, planes, stride, bottleneck) {
                units.push(Unit::new(p, &c, ci, co, k, s)?);
                cout = co;
            }
            let down = if down {
                Some(Unit::new(
                    p,
                    &format!("{name}.downsample.0"),
                    cin,
                    cout,
                    1,
                    stride,
                )?)
            } else {
                None
            };
            blocks.push(Block { name, units, down });
        }
        let fc = Linear::new(p, "fc", cout, 1000)?;
        Ok(ResNet { stem, blocks, fc })
    }

    /// Forward pass of channels-last `[B, H, W, 3]`.
    pub fn forward(&self, x: &Tensor, rec: &mut Recorder) -> Result<Tensor> {
        let x = self.stem.forward(x, rec, Act::Relu)?;
        // the input is >= 0 after ReLU, so zero padding acts as -inf padding
        let mut x = max_pool(&x.pad_with_zeros(1, 1, 1)?.pad_with_zeros(2, 1, 1)?, 3, 2)?;
        for b in &self.blocks {
            let mut y = x.clone();
            let last = b.units.len() - 1;
            for (i, u) in b.units.iter().enumerate() {
                let act = if i < last { Act::Relu } else { Act::Identity };
                y = u.forward(&y, rec, act)?;
            }
            let short = match &b.down {
                Some(d) => d.forward(&x, rec, Act::Identity)?,
                None => x,
            };
            x = (y + short)?.relu()?;
            rec.tap(&b.name, &x)?;
        }
        let pooled = super::layers::spatial_mean(&x)?;
        let logits = self.fc.forward(&pooled)?;
        rec.tap("logits", &logits)?;
        Ok(logits)
    }
}

/// Max pooling of channels-last `x` with a `k`x`k` window and `stride`, no padding.
fn max_pool(x: &Tensor, k: usize, stride: usize) -> Result<Tensor> {
    x.permute((0, 3, 1, 2))?
        .max_pool2d_with_stride(k, stride)?
        .permute((0, 2, 3, 1))?
        .contiguous()
}

/// Adaptive average pooling of channels-last `x` to `out`x`out` (PyTorch's cell bounds).
fn adaptive_avg_pool(x: &Tensor, out: usize) -> Result<Tensor> {
    let (_, h, w, _) = x.dims4()?;
    if h == out && w == out {
        return Ok(x.clone());
    }
    let mut rows = Vec::with_capacity(out);
    for i in 0..out {
        let (y0, y1) = (i * h / out, ((i + 1) * h).div_ceil(out));
        let mut cells = Vec::with_capacity(out);
        for j in 0..out {
            let (x0, x1) = (j * w / out, ((j + 1) * w).div_ceil(out));
            cells.push(
                x.narrow(1, y0, y1 - y0)?
                    .narrow(2, x0, x1 - x0)?
                    .mean_keepdim(1)?
                    .mean_keepdim(2)?,
            );
        }
        rows.push(Tensor::cat(&cells, 2)?);
    }
    Tensor::cat(&rows, 1)
}

/// The layer list of VGG-`depth`: `Some(channels)` for a 3x3 conv, `None` for a max pool.
fn vgg_cfg(depth: usize) -> Vec<Option<usize>> {
    let m = None;
    let c = Some;
    match depth {
        11 => vec![
            c(64),
            m,
            c(128),
            m,
            c(256),
            c(256),
            m,
            c(512),
            c(512),
            m,
            c(512),
            c(512),
            m,
        ],
        _ => vec![
            c(64),
            c(64),
            m,
            c(128),
            c(128),
            m,
            c(256),
            c(256),
            c(256),
            m,
            c(512),
            c(512),
            c(512),
            m,
            c(512),
            c(512),
            c(512),
            m,
        ],
    }
}

/// Convolutions of VGG-`depth`: (torchvision `features` index, cin, cout).
fn vgg_convs(depth: usize) -> Vec<(usize, usize, usize)> {
    let mut idx = 0;
    let mut cin = 3;
    let mut v = Vec::new();
    for layer in vgg_cfg(depth) {
        match layer {
            Some(c) => {
                v.push((idx, cin, c));
                cin = c;
                idx += 2; // conv, ReLU
            }
            None => idx += 1,
        }
    }
    v
}

/// Every tap of VGG-`depth`, in forward order: the convolutions (`features.N`, before ReLU),
/// the hidden fully connected layers (`classifier.0`, `classifier.3`, before ReLU), logits.
pub fn vgg_taps(depth: usize) -> Vec<TapInfo> {
    let mut t: Vec<TapInfo> = vgg_convs(depth)
        .into_iter()
        .enumerate()
        .map(|(i, (idx, _, c))| {
            let role = if i == 0 {
                ConvRole::Stem
            } else {
                ConvRole::Other
            };
            conv_tap(format!("features.{idx}"), c, None, role)
        })
        .collect();
    for name in ["classifier.0", "classifier.3"] {
        t.push(TapInfo::block(name, 4096));
    }
    t.push(TapInfo::logits(1000));
    t
}

/// torchvision VGG without batch norm.
pub struct Vgg {
    layers: Vec<Option<(String, Conv)>>,
    fc: [Linear; 3],
}

impl Vgg {
    /// Builds VGG-`depth` (11, 16) from torchvision-named tensors.
    pub fn new(depth: usize, p: &mut Params) -> Result<Self> {
        let convs = vgg_convs(depth);
        let mut it = convs.iter();
        let mut layers = Vec::new();
        for l in vgg_cfg(depth) {
            match l {
                Some(_) => {
                    let (idx, cin, cout) = it.next().copied().unwrap_or((0, 0, 0));
                    let name = format!("features.{idx}");
                    layers.push(Some((
                        name.clone(),
                        Conv::new(p, &name, cin, cout, 3, 1, 1, true)?,
                    )));
                }
                None => layers.push(None),
            }
        }
        let fc = [
            Linear::new(p, "classifier.0", 512 * 7 * 7, 4096)?,
            Linear::new(p, "classifier.3", 4096, 4096)?,
            Linear::new(p, "classifier.6", 4096, 1000)?,
        ];
        Ok(Vgg { layers, fc })
    }

    /// Forward pass of channels-last `[B, H, W, 3]`.
    pub fn forward(&self, x: &Tensor, rec: &mut Recorder) -> Result<Tensor> {
        let mut x = x.clone();
        for l in &self.layers {
            x = match l {
                Some((name, conv)) => {
                    let y = rec.conv(name, conv, &x)?;
                    y.relu()?
                }
                None => max_pool(&x, 2, 2)?,
            };
        }
        let x = adaptive_avg_pool(&x, 7)?;
        // torchvision flattens NCHW: channel-major
        let b = x.dim(0)?;
        let x = x
            .permute((0, 3, 1, 2))?
            .contiguous()?
            .reshape((b, 512 * 7 * 7))?;
        let h = self.fc[0].forward(&x)?;
        rec.tap("classifier.0", &h)?;
        let h = self.fc[1].forward(&h.relu()?)?;
        rec.tap("classifier.3", &h)?;
        let logits = self.fc[2].forward(&h.relu()?)?;
        rec.tap("logits", &logits)?;
        Ok(logits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TapGroup;

    #[test]
    fn tap_lists_follow_torchvision_names() {
        let r18 = resnet_taps(18);
        assert_eq!(r18.iter().filter(|t| t.group == TapGroup::Conv).count(), 20);
        let r50 = resnet_taps(50);
        assert_eq!(r50.iter().filter(|t| t.group == TapGroup::Conv).count(), 53);
        let d = r50
            .iter()
            .find(|t| t.name == "layer1.0.downsample.0")
            .unwrap();
        assert_eq!(
            (d.channels, d.bn.as_deref()),
            (256, Some("layer1.0.downsample.1"))
        );
        let c3 = r50.iter().find(|t| t.name == "layer4.2.conv3").unwrap();
        assert_eq!(
            (c3.role, c3.bn.as_deref()),
            (ConvRole::ResidualLast, Some("layer4.2.bn3"))
        );
        let v16: Vec<String> = vgg_taps(16).into_iter().map(|t| t.name).collect();
        assert_eq!(v16[..3], ["features.0", "features.2", "features.5"]);
        assert_eq!(vgg_convs(16).len(), 13);
        assert_eq!(vgg_convs(11).last().unwrap().0, 18);
    }

    #[test]
    fn adaptive_pool_matches_pytorch_bounds() {
        // 9 -> 7: cells [0,2) [1,3) [2,4) [3,5) [5,7)... by floor/ceil bounds
        let x = Tensor::arange(0f32, 81.0, &candle_core::Device::Cpu)
            .unwrap()
            .reshape((1, 9, 9, 1))
            .unwrap();
        let y = adaptive_avg_pool(&x, 7).unwrap();
        assert_eq!(y.dims(), &[1, 7, 7, 1]);
        let v = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // cell (0,0) averages rows 0-1, cols 0-1: (0+1+9+10)/4
        assert_eq!(v[0], 5.0);
        // cell (6,6) averages rows 7-8, cols 7-8: (70+71+79+80)/4
        assert_eq!(v[48], 75.0);
    }
}
