//! The networks freqtag runs, written with candle: the CIFAR-10 ResNets of He et al. 2016
//! (option-A shortcut) and torchvision's MobileNetV2. Each records its taps as the spatial mean
//! per channel, reduced where the activation is, so only `frames x channels` leave the forward.
//!
//! In: frames `[B, 3, H, W]`. Out: logits `[B, classes]` and, per recorded tap, `[B, channels]`.
//! Inside, activations are channels-last (`[B, H, W, C]`): convolutions become matmuls.

#[cfg(feature = "cuda")]
pub mod cuda_ops;
pub mod device;
pub mod direct;
pub mod efficientnet_lite;
pub mod fetch;
pub mod gpu_kernels;
pub mod layers;
pub mod mobilenet_v2;
pub mod profile;
pub mod record;
pub mod resnet_cifar;
pub mod torchvision;
pub mod weights;
pub mod winograd;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::error::Result;

/// An architecture freqtag knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Arch {
    /// CIFAR-10 ResNet with `depth` layers (20, 32, 44, 56).
    ResNetCifar(usize),
    /// torchvision MobileNetV2 (ImageNet).
    MobileNetV2,
    /// torchvision ResNet-18/34/50 (ImageNet).
    ResNet(usize),
    /// torchvision VGG-11/16 without batch norm (ImageNet).
    Vgg(usize),
    /// EfficientNet-Lite0 (ImageNet), EfficientNet-PyTorch names.
    EfficientNetLite0,
}

/// What kind of layer a tap is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TapGroup {
    /// A convolution's output, before batch norm.
    Conv,
    /// A block's output, after its activation.
    Block,
    /// The logits.
    Logits,
}

/// One recordable layer.
#[derive(Debug, Clone, Serialize)]
pub struct TapInfo {
    /// The checkpoint's module path (`layer1.0.conv1`, `features.3.conv.1.0`) or `logits`.
    pub name: String,
    /// Output channels (neurons).
    pub channels: usize,
    /// Kind.
    pub group: TapGroup,
    /// For a convolution: the batch norm that follows it (`layer1.0.bn1`).
    pub bn: Option<String>,
    /// For a convolution: its role for pruning.
    pub role: ConvRole,
}

impl TapInfo {
    /// A convolution, followed by batch norm `bn` if any.
    pub fn conv(
        name: impl Into<String>,
        channels: usize,
        bn: Option<String>,
        role: ConvRole,
    ) -> Self {
        TapInfo {
            name: name.into(),
            channels,
            group: TapGroup::Conv,
            bn,
            role,
        }
    }

    /// A block's output (or another activation that is not a convolution).
    pub fn block(name: impl Into<String>, channels: usize) -> Self {
        TapInfo {
            name: name.into(),
            channels,
            group: TapGroup::Block,
            bn: None,
            role: ConvRole::Other,
        }
    }

    /// The logits.
    pub fn logits(classes: usize) -> Self {
        TapInfo {
            name: "logits".into(),
            channels: classes,
            group: TapGroup::Logits,
            bn: None,
            role: ConvRole::Other,
        }
    }
}

/// Where a convolution sits, for pruning's exclusions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConvRole {
    /// The first convolution (on the image).
    Stem,
    /// The last convolution of a residual branch: its output is added to the shortcut.
    ResidualLast,
    /// Any other convolution, or not a convolution.
    Other,
}

/// Which Pillow's bilinear resize images are prepared with, to the bit (`source.pillow`; README,
/// "Inputs"). Both resize in two passes, each into bytes; they differ in which pass runs first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pillow {
    /// Pillow 12: the horizontal pass first, but for images more than 100 times taller than
    /// wide whose height shrinks, which `Image.resize` resizes vertically first (two calls).
    V12,
    /// Pillow 13: the vertical pass first where the height shrinks by more than twice as many
    /// pixels as the width does, else the horizontal one (`ImagingResampleInner`).
    #[default]
    V13,
}

impl Pillow {
    /// The setting's values, for messages.
    pub const VALUES: &'static str = "12 (Pillow 12 and earlier) or 13 (Pillow 13)";

    /// The major version followed: 12 or 13.
    pub fn major(self) -> u32 {
        match self {
            Pillow::V12 => 12,
            Pillow::V13 => 13,
        }
    }

    /// Whether a resize of `w x h` to `nw x nh` runs its vertical pass first.
    pub fn vertical_first(self, w: u32, h: u32, nw: u32, nh: u32) -> bool {
        let (dw, dh) = (w as i64 - nw as i64, h as i64 - nh as i64);
        match self {
            Pillow::V12 => h as u64 > 100 * w as u64 && nh < h,
            Pillow::V13 => dh > 0 && dh > 2 * dw,
        }
    }
}

impl Serialize for Pillow {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.major().to_string())
    }
}

impl<'de> serde::Deserialize<'de> for Pillow {
    /// `12` or `13`, as a number or a string (`"13"`, or a version such as `"12.3.0"`).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Pillow;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(
                    f,
                    "the major version of Pillow to follow: {}",
                    Pillow::VALUES
                )
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Pillow, E> {
                match v {
                    ..=12 => Ok(Pillow::V12),
                    13 => Ok(Pillow::V13),
                    _ => Err(E::custom(format!(
                        "Pillow {v} is not known to freqtag; use {}",
                        Pillow::VALUES
                    ))),
                }
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Pillow, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!("{v}: use {}", Pillow::VALUES))),
                }
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<Pillow, E> {
                // `--set source.pillow=12.3` reads as a number
                if v.is_finite() && v >= 0.0 {
                    self.visit_u64(v as u64)
                } else {
                    Err(E::custom(format!("{v}: use {}", Pillow::VALUES)))
                }
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Pillow, E> {
                let major = v.trim().split('.').next().unwrap_or("");
                match major.parse::<u64>() {
                    Ok(m) => self.visit_u64(m),
                    Err(_) => Err(E::custom(format!("\"{v}\": use {}", Pillow::VALUES))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// How images are brought to the model's input.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Preprocess {
    /// Short side resized to this before the centre crop (not resampled when it already is).
    pub resize: u32,
    /// Which Pillow's resize order is followed (`source.pillow`).
    pub pillow: Pillow,
    /// Square centre crop = model input side.
    pub crop: u32,
    /// Per-channel mean of RGB in [0,1].
    pub mean: [f32; 3],
    /// Per-channel standard deviation.
    pub std: [f32; 3],
}

const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

impl Arch {
    /// All names `parse` accepts.
    pub const NAMES: [&'static str; 11] = [
        "resnet20",
        "resnet32",
        "resnet44",
        "resnet56",
        "mobilenet_v2",
        "resnet18",
        "resnet34",
        "resnet50",
        "vgg11",
        "vgg16",
        "efficientnet_lite0",
    ];

    /// Parses an architecture name.
    pub fn parse(s: &str) -> std::result::Result<Arch, String> {
        match s {
            "resnet20" => Ok(Arch::ResNetCifar(20)),
            "resnet32" => Ok(Arch::ResNetCifar(32)),
            "resnet44" => Ok(Arch::ResNetCifar(44)),
            "resnet56" => Ok(Arch::ResNetCifar(56)),
            "mobilenet_v2" => Ok(Arch::MobileNetV2),
            "resnet18" => Ok(Arch::ResNet(18)),
            "resnet34" => Ok(Arch::ResNet(34)),
            "resnet50" => Ok(Arch::ResNet(50)),
            "vgg11" => Ok(Arch::Vgg(11)),
            "vgg16" => Ok(Arch::Vgg(16)),
            "efficientnet_lite0" => Ok(Arch::EfficientNetLite0),
            other => Err(format!(
                "unknown architecture `{other}`; known: {}",
                Arch::NAMES.join(", ")
            )),
        }
    }

    /// The name as written in pipelines.
    pub fn name(self) -> String {
        match self {
            Arch::ResNetCifar(d) | Arch::ResNet(d) => format!("resnet{d}"),
            Arch::MobileNetV2 => "mobilenet_v2".into(),
            Arch::Vgg(d) => format!("vgg{d}"),
            Arch::EfficientNetLite0 => "efficientnet_lite0".into(),
        }
    }

    /// Side of the square input.
    pub fn input_size(self) -> usize {
        self.preprocess().crop as usize
    }

    /// Input preprocessing.
    pub fn preprocess(self) -> Preprocess {
        match self {
            Arch::ResNetCifar(_) => Preprocess {
                resize: 32,
                pillow: Pillow::V13,
                crop: 32,
                mean: IMAGENET_MEAN,
                std: IMAGENET_STD,
            },
            Arch::MobileNetV2 | Arch::ResNet(_) | Arch::Vgg(_) => Preprocess {
                resize: 256,
                pillow: Pillow::V13,
                crop: 224,
                mean: IMAGENET_MEAN,
                std: IMAGENET_STD,
            },
            // (x - 127) / 128 on 0..255 is (x/255 - 127/255) / (128/255)
            Arch::EfficientNetLite0 => Preprocess {
                resize: 256,
                pillow: Pillow::V13,
                crop: 224,
                mean: [127.0 / 255.0; 3],
                std: [128.0 / 255.0; 3],
            },
        }
    }

    /// Every tap, in forward order.
    pub fn taps(self) -> Vec<TapInfo> {
        match self {
            Arch::ResNetCifar(d) => resnet_cifar::taps(d),
            Arch::MobileNetV2 => mobilenet_v2::taps(),
            Arch::ResNet(d) => torchvision::resnet_taps(d),
            Arch::Vgg(d) => torchvision::vgg_taps(d),
            Arch::EfficientNetLite0 => efficientnet_lite::taps(),
        }
    }

    /// Channels of the tap `name`, if the model has it.
    pub fn tap_channels(self, name: &str) -> Option<usize> {
        self.taps()
            .into_iter()
            .find(|t| t.name == name)
            .map(|t| t.channels)
    }

    /// Resolves tap selectors (`convs`, `blocks`, `logits`, `all`, or names) to tap names in
    /// forward order; every unknown name is reported.
    pub fn resolve_taps(
        self,
        selectors: &[String],
    ) -> std::result::Result<Vec<String>, Vec<String>> {
        let all = self.taps();
        let mut keep = vec![false; all.len()];
        let mut problems = Vec::new();
        if selectors.is_empty() {
            problems.push(
                "model.taps is empty: record at least one layer (for example taps = [\"convs\"])"
                    .into(),
            );
        }
        for s in selectors {
            let group = match s.as_str() {
                "convs" => Some(Some(TapGroup::Conv)),
                "blocks" => Some(Some(TapGroup::Block)),
                "logits" => Some(Some(TapGroup::Logits)),
                "all" => Some(None),
                _ => None,
            };
            match group {
                Some(g) => {
                    for (i, t) in all.iter().enumerate() {
                        if g.is_none_or(|g| g == t.group) {
                            keep[i] = true;
                        }
                    }
                }
                None => match all.iter().position(|t| &t.name == s) {
                    Some(i) => keep[i] = true,
                    None => {
                        let close: Vec<&str> = all
                            .iter()
                            .filter(|t| t.name.starts_with(s.split('.').next().unwrap_or("")))
                            .take(4)
                            .map(|t| t.name.as_str())
                            .collect();
                        problems.push(format!(
                            "model.taps: {} has no layer `{s}`{}; see `freqtag models` for its taps",
                            self.name(),
                            if close.is_empty() { String::new() } else { format!(" (did you mean {}?)", close.join(", ")) }
                        ));
                    }
                },
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(all
            .into_iter()
            .zip(keep)
            .filter(|(_, k)| *k)
            .map(|(t, _)| t.name)
            .collect())
    }
}

/// Collects the recorded taps during a forward pass.
pub struct Recorder {
    slots: HashMap<String, usize>,
    out: Vec<Option<Tensor>>,
}

impl Recorder {
    /// Records the taps named in `taps`, in that order.
    pub fn new(taps: &[String]) -> Self {
        Recorder {
            slots: taps
                .iter()
                .enumerate()
                .map(|(i, t)| (t.clone(), i))
                .collect(),
            out: vec![None; taps.len()],
        }
    }

    /// Offers the activation of tap `name` (channels last, `[B, H, W, C]`, or `[B, C]`): kept
    /// as its spatial mean `[B, C]` if recorded.
    pub fn tap(&mut self, name: &str, x: &Tensor) -> candle_core::Result<()> {
        if let Some(i) = self.slots.get(name) {
            let v = if x.rank() == 4 {
                layers::spatial_mean(x)?
            } else {
                x.to_dtype(DType::F32)?
            };
            self.out[*i] = Some(v);
        }
        Ok(())
    }

    /// Runs `conv` on `x` as tap `name`: its output, and its spatial mean kept if recorded
    /// (taken by the convolution as it writes its output, where it can).
    pub fn conv(
        &mut self,
        name: &str,
        conv: &layers::Conv,
        x: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let Some(&i) = self.slots.get(name) else {
            return conv.forward(x);
        };
        let (y, mean) = conv.forward_mean(x)?;
        self.out[i] = Some(match mean {
            Some(m) => m,
            None => layers::spatial_mean(&y)?,
        });
        Ok(y)
    }

    /// Runs `conv` on `x` as tap `name`, then `bn`, the `residual` if any and `act` (see
    /// [`layers::Conv::forward_bn`]): the block's output, with the convolution's spatial mean
    /// kept if recorded.
    pub fn conv_bn(
        &mut self,
        name: &str,
        conv: &layers::Conv,
        bn: &layers::BatchNorm,
        act: layers::Act,
        residual: Option<&Tensor>,
        x: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let slot = self.slots.get(name).copied();
        let (y, mean) = conv.forward_bn(x, bn, act, residual, slot.is_some())?;
        if let (Some(i), Some(m)) = (slot, mean) {
            self.out[i] = Some(m);
        }
        Ok(y)
    }

    /// The recorded taps in the order asked for.
    pub fn finish(self) -> candle_core::Result<Vec<Tensor>> {
        self.out
            .into_iter()
            .map(|t| {
                t.ok_or_else(|| candle_core::Error::Msg("a requested tap was not reached".into()))
            })
            .collect()
    }
}

/// The architectures' layer stacks (one per process: their sizes do not matter).
#[allow(clippy::large_enum_variant)]
enum Body {
    ResNet(resnet_cifar::ResNet),
    MobileNetV2(mobilenet_v2::MobileNetV2),
    TvResNet(torchvision::ResNet),
    Vgg(torchvision::Vgg),
    EfficientNetLite0(efficientnet_lite::EfficientNetLite0),
}

/// A network with weights on its device, ready for forward passes.
pub struct Network {
    body: Body,
    device: Device,
    dtype: DType,
}

impl Network {
    /// Builds `arch` from the checkpoint `path` on the CPU; every tensor problem is reported
    /// at once.
    pub fn load(arch: Arch, path: &Path) -> Result<Network> {
        Network::from_tensors(arch, path, weights::load(path)?)
    }

    /// Builds `arch` from the checkpoint `path` on `device`, computing in `dtype` (f16 and bf16
    /// on a GPU only).
    pub fn load_on(arch: Arch, path: &Path, device: &Device, dtype: DType) -> Result<Network> {
        Network::load_with(arch, path, device, dtype, winograd::Setting::default())
    }

    /// [`Network::load_on`] with `model.winograd`'s setting for the CPU's 3x3 stride-1
    /// convolutions.
    pub fn load_with(
        arch: Arch,
        path: &Path,
        device: &Device,
        dtype: DType,
        winograd: winograd::Setting,
    ) -> Result<Network> {
        let tensors = weights::load(path)?;
        Network::from_tensors_with(arch, path, tensors, device, dtype, winograd)
    }

    /// Builds `arch` on the CPU from checkpoint tensors already read from `path` (perhaps
    /// edited, as pruning does); `path` names the file in messages.
    pub fn from_tensors(
        arch: Arch,
        path: &Path,
        tensors: HashMap<String, Tensor>,
    ) -> Result<Network> {
        Network::from_tensors_on(arch, path, tensors, &Device::Cpu, DType::F32)
    }

    /// [`Network::from_tensors`] on `device`, computing in `dtype`.
    pub fn from_tensors_on(
        arch: Arch,
        path: &Path,
        tensors: HashMap<String, Tensor>,
        device: &Device,
        dtype: DType,
    ) -> Result<Network> {
        let winograd = winograd::Setting::default();
        Network::from_tensors_with(arch, path, tensors, device, dtype, winograd)
    }

    /// [`Network::from_tensors_on`] with `model.winograd`'s setting.
    pub fn from_tensors_with(
        arch: Arch,
        path: &Path,
        tensors: HashMap<String, Tensor>,
        device: &Device,
        dtype: DType,
        winograd: winograd::Setting,
    ) -> Result<Network> {
        let p = weights::Params::new(path, tensors)
            .on(device, dtype)
            .winograd(winograd.tile());
        let net = Network::build(p, arch)?;
        // On a GPU the weights were written on this thread's stream (CUDA's per-thread default
        // stream), and each worker's GPU thread reads them on its own: with cudarc's event
        // tracking off (`model::device`), this wait is what orders the two.
        net.device().synchronize()?;
        Ok(net)
    }

    /// The network a GPU runs (its layers as tensor ops), built on the CPU: for tests of that
    /// code path on machines without a GPU.
    pub fn load_gpu_layers_on_cpu(arch: Arch, path: &Path) -> Result<Network> {
        let p = weights::Params::new(path, weights::load(path)?).device_layers_on_cpu();
        Network::build(p, arch)
    }

    fn build(mut p: weights::Params, arch: Arch) -> Result<Network> {
        let (device, dtype) = (p.device().clone(), p.dtype());
        let body = match arch {
            Arch::ResNetCifar(d) => Body::ResNet(resnet_cifar::ResNet::new(d, &mut p)?),
            Arch::MobileNetV2 => Body::MobileNetV2(mobilenet_v2::MobileNetV2::new(&mut p)?),
            Arch::ResNet(d) => Body::TvResNet(torchvision::ResNet::new(d, &mut p)?),
            Arch::Vgg(d) => Body::Vgg(torchvision::Vgg::new(d, &mut p)?),
            Arch::EfficientNetLite0 => {
                Body::EfficientNetLite0(efficientnet_lite::EfficientNetLite0::new(&mut p)?)
            }
        };
        p.finish(&arch.name())?;
        Ok(Network {
            body,
            device,
            dtype,
        })
    }

    /// The device it runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype it computes in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Logits of frames `x` `[B, 3, H, W]` (as PyTorch lays them out, f32 on any device),
    /// recording taps into `rec`. The layers run channels-last, in the network's dtype; the
    /// logits come back in f32.
    pub fn forward(&self, x: &Tensor, rec: &mut Recorder) -> candle_core::Result<Tensor> {
        self.forward_nhwc(&x.permute((0, 2, 3, 1))?, rec)
    }

    /// [`Network::forward`] on channels-last input `[B, H, W, 3]`, the layout the layers work
    /// in (frames built on a GPU come that way).
    pub fn forward_nhwc(&self, x: &Tensor, rec: &mut Recorder) -> candle_core::Result<Tensor> {
        let x = profile::op("input", x, || {
            x.to_device(&self.device)?
                .to_dtype(self.dtype)?
                .contiguous()
        })?;
        let logits = match &self.body {
            Body::ResNet(n) => n.forward(&x, rec),
            Body::MobileNetV2(n) => n.forward(&x, rec),
            Body::TvResNet(n) => n.forward(&x, rec),
            Body::Vgg(n) => n.forward(&x, rec),
            Body::EfficientNetLite0(n) => n.forward(&x, rec),
        }?;
        logits.to_dtype(DType::F32)
    }
}
