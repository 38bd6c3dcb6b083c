//! Inference-only layers, channels-last (`[B, H, W, C]`): convolution as im2col plus GEMM in
//! cache-sized blocks (1x1 convolutions are a plain matmul), a direct depthwise kernel, batch
//! norm folded to scale and shift, linear. candle's own `conv2d` is several times slower on this kind of CPU
//! and runs a grouped convolution as one convolution per group (hundreds in MobileNetV2).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::weights::Params;

enum ConvKind {
    /// 1x1, stride 1: `[B*H*W, Cin] x [Cin, Cout]`, by the direct kernel where it applies.
    Pointwise(Tensor),
    /// On a GPU, 1x1 stride 1: the same product as one matmul.
    Matmul(Tensor),
    /// im2col then `[B*Ho*Wo, k*k*Cin] x [k*k*Cin, Cout]`, in cache-sized blocks of output rows
    /// ([`ConvGemm`]); weight rows ordered (ky, kx, cin), `[k*k*Cin, Cout]` row-major.
    Im2col(Vec<f32>),
    /// Depthwise k x k: weights `[k*k, C]`, ordered (ky, kx), channel fastest.
    Depthwise(Vec<f32>),
    /// On a GPU: candle's convolution (its im2col kernel reads our channels-last activation
    /// through an NCHW view, then one matmul); PyTorch-layout weight `[Cout, Cin, k, k]`.
    Direct(Tensor),
    /// On a GPU, depthwise: the sum over the window of shifted views times per-channel weights,
    /// one `[1, 1, 1, C]` weight per (ky, kx). (candle runs a grouped convolution as one
    /// convolution per channel.)
    Windows(Vec<Tensor>),
    /// On a GPU with cuDNN, full or depthwise (the `usize` is the group count): NHWC in and
    /// out, weight `[Cout, k, k, Cin/groups]` (see [`super::cuda_ops::CudnnConv`]).
    #[cfg(feature = "cudnn")]
    Cudnn(Tensor, usize),
    /// On a CUDA GPU, depthwise: freqtag's kernel ([`super::cuda_ops::DepthwiseConv`]), f32
    /// weight `[C, k*k]`.
    #[cfg(feature = "cuda")]
    GpuDepthwise(Tensor),
    /// On a CUDA GPU in f32, a full 3x3 convolution with padding 1: freqtag's kernel
    /// ([`super::cuda_ops::Conv3x3`]), weight `[9 Cin, Cout]` (rows ky, kx, cin); the boxed kind
    /// (cuDNN's or candle's) runs the shapes the kernel does not cover or is not set to take
    /// ([`super::cuda_ops::own_conv`]).
    #[cfg(feature = "cuda")]
    GpuConv3x3(Tensor, Box<ConvKind>),
}

/// A 2-D convolution on channels-last input, zero padding `k/2` on every side (or none, see
/// [`Conv::valid`]).
pub struct Conv {
    kind: ConvKind,
    bias: Option<Tensor>,
    k: usize,
    stride: usize,
    pad: usize,
    cout: usize,
    /// On the CPU, a 3x3 stride-1 convolution's weights transformed for the Winograd tile of
    /// `model.winograd` ([`super::winograd`]), which runs it while the padding is 1 and
    /// `FREQTAG_NO_WINOGRAD` is unset.
    winograd: Option<Vec<f32>>,
}

impl Conv {
    /// Loads `{name}.weight` `[out, in/groups, k, k]` (PyTorch layout) and `{name}.bias` if
    /// `bias`. Groups must be 1 or depthwise (`groups == in == out`).
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
    ) -> Result<Self> {
        let weight = p.get(&format!("{name}.weight"), &[cout, cin / groups, k, k]);
        let bias = bias.then(|| p.get(&format!("{name}.bias"), &[cout]));
        let kind = if groups == 1 && k == 1 && stride == 1 {
            ConvKind::Pointwise(weight.reshape((cout, cin))?.t()?.contiguous()?)
        } else if groups == 1 {
            let w = weight.permute((2, 3, 1, 0))?.contiguous()?;
            ConvKind::Im2col(w.flatten_all()?.to_vec1::<f32>()?)
        } else if groups == cin && groups == cout {
            let w = weight.reshape((cout, k * k))?.t()?.contiguous()?;
            ConvKind::Depthwise(w.flatten_all()?.to_vec1::<f32>()?)
        } else {
            candle_core::bail!(
                "{name}: grouped convolutions other than depthwise are not supported"
            )
        };
        let (kind, bias) = if !p.device_layers() {
            if p.dtype() != candle_core::DType::F32 {
                candle_core::bail!("{name}: the CPU layers compute in f32 only")
            }
            (kind, bias)
        } else {
            let (dev, dt) = (p.device().clone(), p.dtype());
            let to = |t: Tensor| t.to_device(&dev)?.to_dtype(dt);
            // freqtag's own 3x3 kernel in f32, with the kind below as its fallback
            #[cfg(feature = "cuda")]
            let own = match &kind {
                ConvKind::Im2col(w)
                    if k == 3
                        && dev.is_cuda()
                        && dt == candle_core::DType::F32
                        && cin.is_multiple_of(8)
                        && cout.is_multiple_of(16)
                        && cout <= super::cuda_ops::own_conv().max_cout =>
                {
                    Some(Tensor::from_slice(w, (k * k * cin, cout), &dev)?)
                }
                _ => None,
            };
            // freqtag's own depthwise kernel (f32 weights whatever the dtype), cuDNN for the rest
            #[cfg(feature = "cuda")]
            let kind = match kind {
                ConvKind::Depthwise(_) if dev.is_cuda() && super::cuda_ops::enabled() => {
                    ConvKind::GpuDepthwise(weight.reshape((cout, k * k))?.to_device(&dev)?)
                }
                other => other,
            };
            #[cfg(feature = "cudnn")]
            let kind = match kind {
                ConvKind::Im2col(_) if dev.is_cuda() && super::cuda_ops::enabled() => {
                    let w = weight.permute((0, 2, 3, 1))?.contiguous()?;
                    ConvKind::Cudnn(to(w)?, groups)
                }
                other => other,
            };
            let kind = match kind {
                ConvKind::Pointwise(w) => ConvKind::Matmul(to(w)?),
                ConvKind::Im2col(_) => ConvKind::Direct(to(weight)?),
                ConvKind::Depthwise(_) => {
                    let w = weight.reshape((cout, k * k))?.t()?.contiguous()?;
                    let windows = (0..k * k)
                        .map(|i| to(w.narrow(0, i, 1)?.reshape((1, 1, 1, cout))?))
                        .collect::<Result<Vec<_>>>()?;
                    ConvKind::Windows(windows)
                }
                other => other,
            };
            #[cfg(feature = "cuda")]
            let kind = match own {
                Some(w) => ConvKind::GpuConv3x3(w, Box::new(kind)),
                None => kind,
            };
            (kind, bias.map(to).transpose()?)
        };
        let winograd = match &kind {
            ConvKind::Im2col(w) if k == 3 && stride == 1 && super::winograd::handles(cin, cout) => {
                let tile = p.winograd_tile();
                tile.map(|tile| super::winograd::transform_weights(w, cin, cout, tile))
            }
            _ => None,
        };
        Ok(Conv {
            kind,
            bias,
            k,
            stride,
            pad: k / 2,
            cout,
            winograd,
        })
    }

    /// The same convolution without padding (the caller pads, e.g. TensorFlow's asymmetric
    /// "SAME" at stride 2).
    pub fn valid(mut self) -> Self {
        self.pad = 0;
        self
    }

    /// Applies the convolution to `[B, H, W, Cin]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // a full convolution on the CPU: as `forward_bn` runs it (Winograd's or the direct
        // kernel), so that both give the same bits
        if let ConvKind::Im2col(_) = &self.kind {
            if let Some((y, _)) = self.direct(x, false, None)? {
                return Ok(y);
            }
        }
        let y = self.apply(&self.kind, x)?;
        match &self.bias {
            Some(bias) => y.broadcast_add(&bias.reshape((1, 1, 1, self.cout))?),
            None => Ok(y),
        }
    }

    /// The convolution without its bias, by `kind` (this convolution's, or the fallback of
    /// freqtag's GPU kernel).
    fn apply(&self, kind: &ConvKind, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        Ok(match kind {
            ConvKind::Pointwise(wt) if super::direct::handles(self.cout) => x
                .contiguous()?
                .apply_op1_no_bwd(&Pointwise { weight: wt })?,
            ConvKind::Pointwise(wt) | ConvKind::Matmul(wt) => {
                super::profile::op("pointwise", x, || {
                    x.reshape((b * h * w, c))?
                        .matmul(wt)?
                        .reshape((b, h, w, self.cout))
                })?
            }
            ConvKind::Im2col(wt) => x.contiguous()?.apply_op1_no_bwd(&ConvGemm {
                weight: wt,
                cout: self.cout,
                geom: Im2col {
                    k: self.k,
                    stride: self.stride,
                    pad: self.pad,
                },
            })?,
            ConvKind::Depthwise(wt) => x.contiguous()?.apply_op1_no_bwd(&Depthwise {
                weight: wt,
                k: self.k,
                stride: self.stride,
                pad: self.pad,
            })?,
            ConvKind::Direct(wt) => super::profile::op("conv", x, || {
                x.permute((0, 3, 1, 2))?
                    .conv2d(wt, self.pad, self.stride, 1, 1)?
                    .permute((0, 2, 3, 1))?
                    .contiguous()
            })?,
            ConvKind::Windows(ws) => super::profile::op("depthwise", x, || {
                depthwise_windows(x, ws, self.k, self.stride, self.pad)
            })?,
            #[cfg(feature = "cuda")]
            ConvKind::GpuDepthwise(wt) => super::profile::op("depthwise", x, || {
                let op = super::cuda_ops::DepthwiseConv {
                    k: self.k,
                    stride: self.stride,
                    pad: self.pad,
                };
                if !op.fits(x.dims()) {
                    candle_core::bail!(
                        "depthwise convolution of {:?}: too large for one pass, lower \
                         model.device_batch",
                        x.dims()
                    )
                }
                x.contiguous()?.apply_op2_no_bwd(wt, &op)
            })?,
            #[cfg(feature = "cudnn")]
            ConvKind::Cudnn(wt, groups) => {
                let name = if *groups == 1 { "conv" } else { "depthwise" };
                super::profile::op(name, x, || {
                    let op = super::cuda_ops::CudnnConv {
                        stride: self.stride,
                        pad: self.pad,
                        groups: *groups,
                    };
                    x.contiguous()?.apply_op2_no_bwd(wt, &op)
                })?
            }
            #[cfg(feature = "cuda")]
            ConvKind::GpuConv3x3(wt, fallback) => {
                let op = super::cuda_ops::Conv3x3 {
                    stride: self.stride,
                };
                let takes = self.pad == 1 && super::cuda_ops::own_conv().takes(h, w);
                match op.tile(x.dims(), self.cout) {
                    Some(_) if takes => super::profile::op("conv", x, || {
                        super::profile::op_named(
                            || format!("own {b}x{h}x{w} {c}->{} s{}", self.cout, self.stride),
                            x,
                            || x.contiguous()?.apply_op2_no_bwd(wt, &op),
                        )
                    })?,
                    _ => self.apply(fallback, x)?,
                }
            }
        })
    }

    /// [`Conv::forward`] and, where the direct kernel or the depthwise one runs it (CPU, no
    /// bias), the spatial mean `[B, Cout]` of its output taken as each output row is written
    /// ([`super::direct::conv_then`], [`DepthwiseRow::conv`]), which saves a pass over the whole
    /// output; `None` elsewhere, for the caller to take.
    pub fn forward_mean(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        match self.direct(x, true, None)? {
            Some(done) => Ok(done),
            None => Ok((self.forward(x)?, None)),
        }
    }

    /// The convolution followed by `bn`, the `residual` (same shape as the output) if any, and
    /// `act`: `act(bn(conv(x)) + residual)`; with `mean`, also the spatial mean `[B, Cout]` of
    /// the convolution's own output (before batch norm). Where the direct or depthwise kernel runs the
    /// convolution, batch norm, residual and activation are its row epilogue, applied while each
    /// row is in cache, with the same float operations as [`BatchNorm::forward_act`] and
    /// [`BatchNorm::forward_add_act`].
    pub fn forward_bn(
        &self,
        x: &Tensor,
        bn: &BatchNorm,
        act: Act,
        residual: Option<&Tensor>,
        mean: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        if bn.on_device.is_none() && bn.scale.len() == self.cout {
            let residual = residual.map(|r| r.contiguous()).transpose()?;
            let guard = residual.as_ref().map(|r| r.storage_and_layout());
            let r: Option<&[f32]> = match &guard {
                Some((rs, rl)) => match &**rs {
                    candle_core::Storage::Cpu(rs) => Some(contiguous_f32(rs, rl, "residual")?),
                    _ => None,
                },
                None => None,
            };
            if let Some(rt) = &residual {
                let (b, h, w, _) = x.dims4()?;
                let ho = (h + 2 * self.pad - self.k) / self.stride + 1;
                let wo = (w + 2 * self.pad - self.k) / self.stride + 1;
                if rt.dims() != [b, ho, wo, self.cout] {
                    candle_core::bail!(
                        "residual {:?} for a convolution output {:?}",
                        rt.dims(),
                        [b, ho, wo, self.cout]
                    )
                }
            }
            if residual.is_none() || r.is_some() {
                let epilogue = |row: usize, o: &mut [f32]| {
                    let r = r.map(|r| &r[row * o.len()..][..o.len()]);
                    scale_shift_act_in_place(o, r, &bn.scale, &bn.shift, act);
                };
                if let Some(done) = self.direct(x, mean, Some(&epilogue))? {
                    return Ok(done);
                }
            }
        }
        #[cfg(feature = "cuda")]
        if mean && super::cuda_ops::fused_mean() && bn.fused.is_some() && x.device().is_cuda() {
            let (y, m) = bn.forward_act_mean(&self.forward(x)?, residual, act)?;
            return Ok((y, Some(m)));
        }
        let (y, m) = if mean {
            let (y, m) = self.forward_mean(x)?;
            let m = match m {
                Some(m) => m,
                None => spatial_mean(&y)?,
            };
            (y, Some(m))
        } else {
            (self.forward(x)?, None)
        };
        let y = match residual {
            Some(r) => bn.forward_add_act(&y, r, act)?,
            None => bn.forward_act(&y, act)?,
        };
        Ok((y, m))
    }

    /// The convolution by the direct kernel (or, depthwise, the CPU depthwise kernel), with its
    /// mean if `mean` and `epilogue` on each output row; `None` where neither runs this
    /// convolution (a bias, a GPU, another dtype, channels not a multiple of 8 for the direct
    /// kernel, or a device kind).
    fn direct(
        &self,
        x: &Tensor,
        mean: bool,
        epilogue: Option<super::direct::RowEpilogue>,
    ) -> Result<Option<(Tensor, Option<Tensor>)>> {
        let cpu =
            self.bias.is_none() && x.device().is_cpu() && x.dtype() == candle_core::DType::F32;
        if !cpu {
            return Ok(None);
        }
        if let ConvKind::Depthwise(wt) = &self.kind {
            return self.depthwise_with(x, wt, mean, epilogue).map(Some);
        }
        if !super::direct::handles(self.cout) {
            return Ok(None);
        }
        match &self.kind {
            ConvKind::Pointwise(wt) => {
                let (ws, wl) = wt.storage_and_layout();
                let candle_core::Storage::Cpu(ws) = &*ws else {
                    candle_core::bail!("pointwise convolution: weight not on the CPU")
                };
                let weight = contiguous_f32(ws, wl, "pointwise convolution")?;
                self.direct_with(x, weight, mean, epilogue).map(Some)
            }
            ConvKind::Im2col(wt) => self.direct_with(x, wt, mean, epilogue).map(Some),
            _ => Ok(None),
        }
    }

    /// The depthwise convolution on the CPU with its mean if `mean` and `epilogue` on each
    /// output row, taken while each row is in cache (see [`DepthwiseRow::conv`]): two passes
    /// fewer over MobileNetV2's widest activations than the convolution, [`spatial_mean`] and
    /// batch norm one after the other, with the same bits.
    fn depthwise_with(
        &self,
        x: &Tensor,
        weight: &[f32],
        mean: bool,
        epilogue: Option<super::direct::RowEpilogue>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.on_cpu(x, "depthwise convolution", |x, (b, h, w, c), (ho, wo)| {
            let k = self.k;
            if c != self.cout || weight.len() != k * k * c {
                candle_core::bail!(
                    "depthwise convolution: {c} input channels for {} outputs and {} weights, k = {k}",
                    self.cout,
                    weight.len()
                )
            }
            let geom = DepthwiseRow::new((h, w, c), k, self.stride, self.pad);
            debug_assert_eq!((geom.ho, geom.wo), (ho, wo));
            Ok(geom.conv(x, weight, b, mean, epilogue))
        })
    }

    /// [`Conv::direct`] with the weight `[k*k*Cin, Cout]` at hand.
    fn direct_with(
        &self,
        x: &Tensor,
        weight: &[f32],
        mean: bool,
        epilogue: Option<super::direct::RowEpilogue>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.on_cpu(x, "convolution", |x, (b, h, w, c), _| {
            if weight.len() != self.k * self.k * c * self.cout {
                candle_core::bail!(
                    "convolution: weight of {} values for {c} inputs, {} outputs, k = {}",
                    weight.len(),
                    self.cout,
                    self.k
                )
            }
            let shape = super::direct::Shape {
                b,
                h,
                w,
                c,
                cout: self.cout,
                k: self.k,
                stride: self.stride,
                pad: self.pad,
            };
            if let (Some(u), Some(isa)) = (&self.winograd, super::direct::isa()) {
                if super::winograd::enabled() && super::winograd::fits(&shape) {
                    return Ok(super::winograd::conv_mean_then_with(
                        isa, x, u, shape, mean, epilogue,
                    ));
                }
            }
            Ok(super::direct::conv_then(x, weight, shape, mean, epilogue))
        })
    }

    /// Runs `kernel` on channels-last f32 `x` on the CPU, given its values (contiguous), its
    /// dims `(b, h, w, c)` and this convolution's output size `(ho, wo)`; wraps what it gives,
    /// the output `[b, ho, wo, cout]` and perhaps its spatial mean `[b, cout]`, as tensors.
    fn on_cpu(
        &self,
        x: &Tensor,
        op: &str,
        kernel: impl FnOnce(
            &[f32],
            (usize, usize, usize, usize),
            (usize, usize),
        ) -> Result<(Vec<f32>, Option<Vec<f32>>)>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let x = x.contiguous()?;
        let (b, h, w, c) = x.dims4()?;
        let (ho, wo) = (
            (h + 2 * self.pad - self.k) / self.stride + 1,
            (w + 2 * self.pad - self.k) / self.stride + 1,
        );
        let (xs, xl) = x.storage_and_layout();
        let candle_core::Storage::Cpu(xs) = &*xs else {
            candle_core::bail!("{op}: input not on the CPU")
        };
        let (out, m) = kernel(contiguous_f32(xs, xl, op)?, (b, h, w, c), (ho, wo))?;
        let dev = candle_core::Device::Cpu;
        Ok((
            Tensor::from_vec(out, (b, ho, wo, self.cout), &dev)?,
            m.map(|m| Tensor::from_vec(m, (b, self.cout), &dev))
                .transpose()?,
        ))
    }
}

/// A depthwise k x k convolution of `x` `[B, H, W, C]` from tensor ops, for devices without
/// this module's CPU kernels: the sum over (ky, kx) of the shifted (and, at stride 2, gathered)
/// views of the zero-padded input times that window position's `[1, 1, 1, C]` weights.
pub fn depthwise_windows(
    x: &Tensor,
    windows: &[Tensor],
    k: usize,
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    let (_, h, w, _) = x.dims4()?;
    let (ho, wo) = (
        (h + 2 * pad - k) / stride + 1,
        (w + 2 * pad - k) / stride + 1,
    );
    let xp = if pad > 0 {
        x.pad_with_zeros(1, pad, pad)?.pad_with_zeros(2, pad, pad)?
    } else {
        x.contiguous()?
    };
    // at stride s, rows (ky, oy) = ky + s*oy and columns likewise, gathered once: the view of
    // window (ky, kx) is then a plain block [ky*Ho.., kx*Wo..]
    let (src, (rh, rw)) = if stride == 1 {
        (xp, (1, 1))
    } else {
        let index = |n: usize| -> Result<Tensor> {
            let idx: Vec<u32> = (0..k)
                .flat_map(|o| (0..n).map(move |i| (o + i * stride) as u32))
                .collect();
            Tensor::from_vec(idx, k * n, x.device())
        };
        let g = xp
            .index_select(&index(ho)?, 1)?
            .index_select(&index(wo)?, 2)?;
        (g, (ho, wo))
    };
    let mut acc: Option<Tensor> = None;
    for ky in 0..k {
        for kx in 0..k {
            let v = src.narrow(1, ky * rh, ho)?.narrow(2, kx * rw, wo)?;
            let t = v.broadcast_mul(&windows[ky * k + kx])?;
            acc = Some(match acc {
                None => t,
                Some(a) => (a + t)?,
            });
        }
    }
    acc.ok_or_else(|| candle_core::Error::Msg("depthwise: empty window".into()))
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: f32 input expected")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: contiguous input expected")
    };
    Ok(&data[start..end])
}

/// The geometry of an im2col convolution on channels-last input: kernel, stride, zero padding.
pub struct Im2col {
    /// Kernel side.
    pub k: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on every side.
    pub pad: usize,
}

impl Im2col {
    fn out_size(&self, h: usize, w: usize) -> (usize, usize) {
        let p = self.pad;
        (
            (h + 2 * p - self.k) / self.stride + 1,
            (w + 2 * p - self.k) / self.stride + 1,
        )
    }
}

/// A convolution as im2col plus GEMM, one block of output rows at a time: each block's im2col
/// rows (about 1024 of them) are built in a small reused buffer that stays in cache and go
/// straight into a GEMM writing the block's outputs, instead of one `[B*Ho*Wo, k*k*C]` matrix
/// (28 MB for a ResNet-32 layer at 49 frames) built, faulted in and read back whole.
pub struct ConvGemm<'a> {
    /// `[k*k*Cin, Cout]` row-major, rows ordered (ky, kx, cin).
    pub weight: &'a [f32],
    /// Output channels.
    pub cout: usize,
    /// Kernel, stride, padding.
    pub geom: Im2col,
}

impl CustomOp1 for ConvGemm<'_> {
    fn name(&self) -> &'static str {
        "conv-im2col-gemm-nhwc"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, h, w, c) = layout.shape().dims4()?;
        let x = contiguous_f32(storage, layout, self.name())?;
        let g = &self.geom;
        let (k, s, p) = (g.k, g.stride, g.pad as isize);
        let (ho, wo) = g.out_size(h, w);
        let kk = k * k * c;
        let n = self.cout;
        if self.weight.len() != kk * n {
            candle_core::bail!(
                "{}: weight of {} values for {kk} x {n}",
                self.name(),
                self.weight.len()
            );
        }
        if super::direct::handles(n) {
            return Ok(direct_conv(x, self.weight, (b, h, w, c), n, g));
        }
        // output rows (one image row of Wo pixels each) per block
        let rows = (1024 / wo.max(1)).max(1);
        let mut out = vec![0f32; b * ho * wo * n];
        out.par_chunks_mut(rows * wo * n).enumerate().for_each_init(
            Vec::new,
            |buf: &mut Vec<f32>, (blk, o)| {
                let first = blk * rows;
                let nrows = o.len() / (wo * n);
                // every element is written once: copied, or zero where the window leaves the
                // image (no clearing pass over the whole buffer)
                buf.resize(nrows * wo * kk, 0.0);
                let kc = k * c;
                for r in 0..nrows {
                    let (bi, oy) = ((first + r) / ho, (first + r) % ho);
                    let dst_row = &mut buf[r * wo * kk..(r + 1) * wo * kk];
                    for ky in 0..k {
                        let iy = (oy * s + ky) as isize - p;
                        let inside = iy >= 0 && iy < h as isize;
                        let src_row: &[f32] = if inside {
                            &x[(bi * h + iy as usize) * w * c..][..w * c]
                        } else {
                            &[]
                        };
                        for ox in 0..wo {
                            let d = (ox * k + ky) * kc;
                            let dst = &mut dst_row[d..d + kc];
                            if !inside {
                                dst.fill(0.0);
                                continue;
                            }
                            // the kx window is contiguous in the source row: one copy
                            let ix0 = (ox * s) as isize - p;
                            let lo = (-ix0).clamp(0, k as isize) as usize;
                            let hi = (w as isize - ix0).clamp(0, k as isize) as usize;
                            dst[..lo * c].fill(0.0);
                            if hi > lo {
                                let from = (ix0 + lo as isize) as usize * c;
                                dst[lo * c..hi * c]
                                    .copy_from_slice(&src_row[from..from + (hi - lo) * c]);
                            }
                            dst[hi.max(lo) * c..].fill(0.0);
                        }
                    }
                }
                let m = nrows * wo;
                // SAFETY: dst is m x n row-major (o), lhs m x kk row-major (buf), rhs kk x n
                // row-major (weight); all slices hold exactly those sizes (checked above).
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        kk,
                        o.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        buf.as_ptr(),
                        1,
                        kk as isize,
                        self.weight.as_ptr(),
                        1,
                        n as isize,
                        0.0f32,
                        1.0f32,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((b, ho, wo, n))))
    }
}

/// [`super::direct::conv`] of contiguous `x` `[b, h, w, c]` with `weight` `[k*k*c, cout]`, as a
/// custom op's output.
fn direct_conv(
    x: &[f32],
    weight: &[f32],
    (b, h, w, c): (usize, usize, usize, usize),
    cout: usize,
    g: &Im2col,
) -> (CpuStorage, Shape) {
    let shape = super::direct::Shape {
        b,
        h,
        w,
        c,
        cout,
        k: g.k,
        stride: g.stride,
        pad: g.pad,
    };
    let (ho, wo) = shape.out();
    let out = super::direct::conv(x, weight, shape);
    (CpuStorage::F32(out), Shape::from((b, ho, wo, cout)))
}

/// A 1x1 convolution by [`super::direct::conv`]: `weight` `[Cin, Cout]` f32 on the CPU.
struct Pointwise<'a> {
    weight: &'a Tensor,
}

impl CustomOp1 for Pointwise<'_> {
    fn name(&self) -> &'static str {
        "pointwise-direct-nhwc"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, h, w, c) = layout.shape().dims4()?;
        let x = contiguous_f32(storage, layout, self.name())?;
        let (cin, cout) = self.weight.dims2()?;
        if cin != c {
            candle_core::bail!(
                "{}: {c} input channels for a {cin} x {cout} weight",
                self.name()
            )
        }
        let (ws, wl) = self.weight.storage_and_layout();
        let candle_core::Storage::Cpu(ws) = &*ws else {
            candle_core::bail!("{}: weight not on the CPU", self.name())
        };
        let weight = contiguous_f32(ws, wl, self.name())?;
        let geom = Im2col {
            k: 1,
            stride: 1,
            pad: 0,
        };
        Ok(direct_conv(x, weight, (b, h, w, c), cout, &geom))
    }
}

/// Mean over H and W of contiguous channels-last f32 `[B, H, W, C]` -> `[B, C]` (candle's
/// reduction over middle dimensions is slow).
pub struct SpatialMean;

impl CustomOp1 for SpatialMean {
    fn name(&self) -> &'static str {
        "spatial-mean-nhwc"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, h, w, c) = layout.shape().dims4()?;
        let x = contiguous_f32(storage, layout, self.name())?;
        let mut out = vec![0f32; b * c];
        let n = h * w;
        out.par_chunks_mut(c).enumerate().for_each(|(bi, o)| {
            // sum in f64 so the mean of large maps keeps f32 precision; channels in blocks of
            // 8 (a fixed-size array the compiler turns into vector adds), the rest one by one
            let mut acc = vec![0f64; c];
            let blocks = c / 8 * 8;
            for px in x[bi * n * c..(bi + 1) * n * c].chunks_exact(c) {
                for (a, v) in acc[..blocks]
                    .chunks_exact_mut(8)
                    .zip(px[..blocks].chunks_exact(8))
                {
                    let a: &mut [f64; 8] = a.try_into().expect("blocks of 8");
                    let v: &[f32; 8] = v.try_into().expect("blocks of 8");
                    for (a, v) in a.iter_mut().zip(v) {
                        *a += *v as f64;
                    }
                }
                for (a, v) in acc[blocks..].iter_mut().zip(&px[blocks..]) {
                    *a += *v as f64;
                }
            }
            for (o, a) in o.iter_mut().zip(acc) {
                *o = (a / n as f64) as f32;
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, c))))
    }
}

/// The spatial mean `[B, C]` of channels-last `x` `[B, H, W, C]`.
pub fn spatial_mean(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        x.contiguous()?.apply_op1_no_bwd(&SpatialMean)
    } else {
        // in f32 whatever the compute dtype: a mean over thousands of f16 values loses digits
        let (b, h, w, c) = x.dims4()?;
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() && super::cuda_ops::enabled() {
            return super::profile::op("spatial-mean", x, || {
                x.contiguous()?
                    .apply_op1_no_bwd(&super::cuda_ops::SpatialMean)
            });
        }
        super::profile::op("spatial-mean", x, || {
            x.to_dtype(candle_core::DType::F32)?
                .reshape((b, h * w, c))?
                .mean(1)
        })
    }
}

/// Depthwise k x k convolution, zero padding `pad`, on contiguous channels-last f32
/// `[B, H, W, C]`; the inner loop runs over channels, which are contiguous.
pub struct Depthwise<'a> {
    /// `[k*k, C]` weights, (ky, kx) major.
    pub weight: &'a [f32],
    /// Kernel side.
    pub k: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on every side.
    pub pad: usize,
}

impl CustomOp1 for Depthwise<'_> {
    fn name(&self) -> &'static str {
        "depthwise-nhwc"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, h, w, c) = layout.shape().dims4()?;
        let x = contiguous_f32(storage, layout, self.name())?;
        let (k, s) = (self.k, self.stride);
        if self.weight.len() != k * k * c {
            candle_core::bail!(
                "{}: {} weights for {c} channels and k = {k}",
                self.name(),
                self.weight.len()
            )
        }
        if h + 2 * self.pad < k || w + 2 * self.pad < k || s == 0 {
            candle_core::bail!(
                "{}: a {k}x{k} window, stride {s}, on {h}x{w} padded by {}",
                self.name(),
                self.pad
            )
        }
        let geom = DepthwiseRow::new((h, w, c), k, s, self.pad);
        let (out, _) = geom.conv(x, self.weight, b, false, None);
        Ok((CpuStorage::F32(out), Shape::from((b, geom.ho, geom.wo, c))))
    }
}

/// One output row of a depthwise convolution ([`Depthwise`]): each output pixel's channels in
/// blocks of 16 (then 8, then one by one) summed in registers over the window, and stored
/// once, rather than the whole row read and written again for each window position (the
/// expanded rows of MobileNetV2, 112 pixels x 96 channels, do not stay in L1). Each output
/// sums its terms in the same order as before, window row then column, each a product then an
/// add from zero, skipping positions in the padding: the same bits.
#[derive(Clone, Copy)]
struct DepthwiseRow {
    h: usize,
    w: usize,
    c: usize,
    ho: usize,
    wo: usize,
    k: usize,
    stride: usize,
    pad: usize,
    /// The vector instructions it is compiled for: the direct kernel's ([`super::direct::isa`]:
    /// AVX-512 unless `FREQTAG_NO_AVX512` is set), else AVX2 where the CPU has it, else none.
    /// The bits are the same with each: a product then an add, never fused.
    isa: Option<super::direct::Isa>,
}

impl DepthwiseRow {
    /// The geometry of a k x k window, `stride` and zero padding `pad` on every side over
    /// `(h, w, c)` (the window must fit the padded input), run with the instructions this CPU
    /// has.
    fn new((h, w, c): (usize, usize, usize), k: usize, stride: usize, pad: usize) -> Self {
        use super::direct::Isa;
        let isa = match super::direct::isa() {
            Some(isa) => Some(isa),
            None if crate::spectrum::avx2() => Some(Isa::Avx2),
            None => None,
        };
        DepthwiseRow {
            h,
            w,
            c,
            ho: (h + 2 * pad - k) / stride + 1,
            wo: (w + 2 * pad - k) / stride + 1,
            k,
            stride,
            pad,
            isa,
        }
    }

    /// The convolution of `b` frames `x`; with `mean`, also the spatial mean `[b, c]` of its
    /// output, summed as [`SpatialMean`] sums it (each channel's pixels in order, in f64) while
    /// each row is in cache, frame by frame; then `epilogue` on each output row (after the
    /// sums: the mean is of the convolution's own output). The same bits as the convolution,
    /// [`spatial_mean`] and a separate pass of the epilogue.
    fn conv(
        &self,
        x: &[f32],
        weight: &[f32],
        b: usize,
        mean: bool,
        epilogue: Option<super::direct::RowEpilogue>,
    ) -> (Vec<f32>, Option<Vec<f32>>) {
        let (ho, wo, c) = (self.ho, self.wo, self.c);
        let len = b * ho * wo * c;
        // not zeroed first: each row is written whole
        let mut out: Vec<f32> = Vec::with_capacity(len);
        let finish = |row: usize, o: &mut [MaybeUninitF32]| -> &mut [f32] {
            self.run(x, weight, row, o);
            // SAFETY: `run` wrote all wo * c values of the row
            unsafe { &mut *(o as *mut [MaybeUninitF32] as *mut [f32]) }
        };
        let means = if mean {
            let mut means = vec![0f32; b * c];
            let n = (ho * wo) as f64;
            out.spare_capacity_mut()[..len]
                .par_chunks_mut(ho * wo * c)
                .zip(means.par_chunks_mut(c))
                .enumerate()
                .for_each(|(bi, (frame, m))| {
                    let mut acc = vec![0f64; c];
                    for (oy, o) in frame.chunks_mut(wo * c).enumerate() {
                        let row = bi * ho + oy;
                        let o = finish(row, o);
                        // in vector registers as wide as the kernel's (`self.isa`; the same bits)
                        super::direct::add_row_sums(self.isa, &mut acc, o);
                        if let Some(epilogue) = epilogue {
                            epilogue(row, o);
                        }
                    }
                    for (m, a) in m.iter_mut().zip(acc) {
                        *m = (a / n) as f32;
                    }
                });
            Some(means)
        } else {
            out.spare_capacity_mut()[..len]
                .par_chunks_mut(wo * c)
                .enumerate()
                .for_each(|(row, o)| {
                    let o = finish(row, o);
                    if let Some(epilogue) = epilogue {
                        epilogue(row, o);
                    }
                });
            None
        };
        // SAFETY: every row of wo * c outputs was written by `run`
        unsafe { out.set_len(len) };
        (out, means)
    }

    /// Writes output row `row` (of `[b * ho]`) into `o` (`wo * c`), compiled for `self.isa`.
    fn run(&self, x: &[f32], weight: &[f32], row: usize, o: &mut [MaybeUninitF32]) {
        #[cfg(target_arch = "x86_64")]
        {
            use super::direct::Isa;
            match self.isa {
                // SAFETY: `isa` is AVX-512 or AVX2 only where the CPU has it (`new`, or a test
                // that checked)
                Some(Isa::Avx512) => return unsafe { self.run_avx512(x, weight, row, o) },
                Some(Isa::Avx2) => return unsafe { self.run_avx2(x, weight, row, o) },
                None => {}
            }
        }
        self.run_plain(x, weight, row, o)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run_avx512(&self, x: &[f32], w: &[f32], row: usize, o: &mut [MaybeUninitF32]) {
        self.run_plain(x, w, row, o)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn run_avx2(&self, x: &[f32], w: &[f32], row: usize, o: &mut [MaybeUninitF32]) {
        self.run_plain(x, w, row, o)
    }

    #[inline(always)]
    fn run_plain(&self, x: &[f32], weight: &[f32], row: usize, o: &mut [MaybeUninitF32]) {
        let DepthwiseRow {
            h,
            w,
            c,
            ho,
            wo,
            k,
            stride,
            pad,
            isa: _,
        } = *self;
        let (bi, oy) = (row / ho, row % ho);
        // the window rows inside the input: (ky, that input row)
        let rows: Vec<(usize, &[f32])> = (0..k)
            .filter_map(|ky| {
                let iy = (oy * stride + ky).checked_sub(pad).filter(|&iy| iy < h)?;
                Some((ky, &x[(bi * h + iy) * w * c..][..w * c]))
            })
            .collect();
        // the pixels whose window lies whole inside the input, on a row with all k window rows:
        // their first `covered` channels by the register kernel, where there is one
        let inner = match (w + pad).checked_sub(k) {
            Some(last) if rows.len() == k => pad.div_ceil(stride)..(last / stride + 1).min(wo),
            _ => 0..0,
        };
        let covered = if inner.is_empty() {
            0
        } else {
            self.interior(&rows, weight, inner.clone(), o)
        };
        for ox in 0..wo {
            let first = if inner.contains(&ox) { covered } else { 0 };
            if first == c {
                continue;
            }
            // the window columns inside the input: kx from kx0 to kx1
            let left = ox * stride;
            let kx0 = pad.saturating_sub(left);
            let kx1 = k.min((w + pad).saturating_sub(left));
            let px = &mut o[ox * c..][..c];
            let mut cb = first;
            while cb + 16 <= c {
                self.block::<16>(&rows, weight, left, kx0, kx1, cb, &mut px[cb..cb + 16]);
                cb += 16;
            }
            while cb + 8 <= c {
                self.block::<8>(&rows, weight, left, kx0, kx1, cb, &mut px[cb..cb + 8]);
                cb += 8;
            }
            while cb < c {
                self.block::<1>(&rows, weight, left, kx0, kx1, cb, &mut px[cb..cb + 1]);
                cb += 1;
            }
        }
    }

    /// Output pixels `ox` of a row whose k window rows (`rows`) are all inside the input and
    /// whose windows lie whole inside them, their channels in blocks as wide as a vector
    /// register, each block's k x k weight vectors held in registers while the row's pixels go
    /// by (rather than loaded again for every pixel); returns how many channels it covered (0
    /// where no such kernel runs here: the caller does the rest). The same terms in the same
    /// order as [`Self::block`]: the same bits.
    fn interior(
        &self,
        rows: &[(usize, &[f32])],
        weight: &[f32],
        ox: std::ops::Range<usize>,
        o: &mut [MaybeUninitF32],
    ) -> usize {
        #[cfg(target_arch = "x86_64")]
        {
            use super::direct::Isa;
            let (c, k, stride, pad, isa) = (self.c, self.k, self.stride, self.pad, self.isa);
            // what the kernels read and write without checks
            assert!(rows.len() == k && rows.iter().all(|(_, r)| r.len() == self.w * c));
            assert!(weight.len() == k * k * c && o.len() == self.wo * c);
            assert!(ox.start * stride >= pad && ox.end <= self.wo);
            assert!(ox.is_empty() || (ox.end - 1) * stride + k <= self.w + pad);
            let out = o.as_mut_ptr() as *mut f32;
            let (wp, r) = (weight.as_ptr(), |i: usize| rows[i].1.as_ptr());
            // SAFETY: the CPU has the instructions (`self.isa`); by the checks above every
            // read (input pixels `ox * stride - pad + kx` < w of the k rows, channels < c, and
            // the weights) and every write (pixels < wo, channels < c) is in bounds
            unsafe {
                match (isa, k, stride) {
                    (Some(Isa::Avx512), 3, 1) => {
                        dw_interior_avx512::<3, 4, 1>([r(0), r(1), r(2)], wp, (c, pad), ox, out)
                    }
                    (Some(Isa::Avx512), 3, 2) => {
                        dw_interior_avx512::<3, 4, 2>([r(0), r(1), r(2)], wp, (c, pad), ox, out)
                    }
                    (Some(Isa::Avx512), 5, 1) => dw_interior_avx512::<5, 1, 1>(
                        [r(0), r(1), r(2), r(3), r(4)],
                        wp,
                        (c, pad),
                        ox,
                        out,
                    ),
                    (Some(Isa::Avx512), 5, 2) => dw_interior_avx512::<5, 1, 2>(
                        [r(0), r(1), r(2), r(3), r(4)],
                        wp,
                        (c, pad),
                        ox,
                        out,
                    ),
                    (Some(Isa::Avx2), 3, 1) => {
                        dw_interior_avx2::<3, 2, 1>([r(0), r(1), r(2)], wp, (c, pad), ox, out)
                    }
                    (Some(Isa::Avx2), 3, 2) => {
                        dw_interior_avx2::<3, 2, 2>([r(0), r(1), r(2)], wp, (c, pad), ox, out)
                    }
                    _ => 0,
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (rows, weight, ox, o);
            0
        }
    }

    /// Channels `cb..cb + L` of one output pixel whose window starts at padded column `left`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn block<const L: usize>(
        &self,
        rows: &[(usize, &[f32])],
        weight: &[f32],
        left: usize,
        kx0: usize,
        kx1: usize,
        cb: usize,
        out: &mut [MaybeUninitF32],
    ) {
        let (c, k) = (self.c, self.k);
        let mut acc = [0f32; L];
        for &(ky, src) in rows {
            for kx in kx0..kx1 {
                let ix = left + kx - self.pad;
                let v: &[f32; L] = src[ix * c + cb..][..L].try_into().expect("L values");
                let wk: &[f32; L] = weight[(ky * k + kx) * c + cb..][..L]
                    .try_into()
                    .expect("L weights");
                for j in 0..L {
                    acc[j] += v[j] * wk[j];
                }
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            o.write(a);
        }
    }
}

type MaybeUninitF32 = std::mem::MaybeUninit<f32>;

/// The register kernel of [`DepthwiseRow::interior`] for one vector width: for each block of
/// channels, the K x K weight vectors loaded once; then R neighbouring pixels at a time (stride
/// S), each input vector of their windows loaded once and added, times its weight, into every
/// pixel whose window holds it; each pixel summed from zero over its window in order (ky, then
/// kx), a product then an add (never fused: the bits of the plain loop); the pixels left over
/// one at a time. Returns the channels covered, a multiple of the width.
macro_rules! depthwise_interior {
    ($name:ident, $pixels:ident, $feature:literal, $vec:ty, $lanes:literal, $zero:ident,
     $load:ident, $mul:ident, $add:ident, $store:ident) => {
        /// # Safety
        /// The CPU has the instructions; `rows` are the K window rows, each `w * c` values,
        /// `weight` `K * K * c` values and `out` a row of `wo * c`, with every pixel of `ox`
        /// inside `wo` and its window inside the rows (`ox * S - pad + K <= w`).
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        unsafe fn $name<const K: usize, const R: usize, const S: usize>(
            rows: [*const f32; K],
            weight: *const f32,
            (c, pad): (usize, usize),
            ox: std::ops::Range<usize>,
            out: *mut f32,
        ) -> usize {
            let mut cb = 0;
            while cb + $lanes <= c {
                let mut wr = [[$zero(); K]; K];
                for (ky, wrow) in wr.iter_mut().enumerate() {
                    for (kx, wv) in wrow.iter_mut().enumerate() {
                        // SAFETY: in bounds by the function's contract
                        *wv = unsafe { $load(weight.add((ky * K + kx) * c + cb)) };
                    }
                }
                let mut x = ox.start;
                while x + R <= ox.end {
                    // SAFETY: pixels x..x + R are in `ox`
                    unsafe {
                        $pixels::<K, R, S>(
                            &rows,
                            &wr,
                            (x * S - pad) * c + cb,
                            c,
                            out.add(x * c + cb),
                        )
                    };
                    x += R;
                }
                for x in x..ox.end {
                    // SAFETY: pixel x is in `ox`
                    unsafe {
                        $pixels::<K, 1, S>(
                            &rows,
                            &wr,
                            (x * S - pad) * c + cb,
                            c,
                            out.add(x * c + cb),
                        )
                    };
                }
                cb += $lanes;
            }
            cb
        }

        /// R pixels of one channel block, the first one's window at `at` in each row, stored
        /// from `out` (`c` apart).
        ///
        /// # Safety
        /// As [`$name`]'s, for these pixels.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        #[inline]
        unsafe fn $pixels<const K: usize, const R: usize, const S: usize>(
            rows: &[*const f32; K],
            wr: &[[$vec; K]; K],
            at: usize,
            c: usize,
            out: *mut f32,
        ) {
            let mut acc = [$zero(); R];
            for (src, wrow) in rows.iter().zip(wr) {
                // the inputs of the R windows on this row, each loaded once
                for j in 0..(R - 1) * S + K {
                    // SAFETY: in the last pixel's window at most
                    let v = unsafe { $load(src.add(at + j * c)) };
                    for (r, a) in acc.iter_mut().enumerate() {
                        if j >= r * S && j - r * S < K {
                            *a = $add(*a, $mul(v, wrow[j - r * S]));
                        }
                    }
                }
            }
            for (r, a) in acc.into_iter().enumerate() {
                // SAFETY: pixel r of the R
                unsafe { $store(out.add(r * c), a) };
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{
    __m256, __m512, _mm256_add_ps, _mm256_loadu_ps, _mm256_mul_ps, _mm256_setzero_ps,
    _mm256_storeu_ps, _mm512_add_ps, _mm512_loadu_ps, _mm512_mul_ps, _mm512_setzero_ps,
    _mm512_storeu_ps,
};
depthwise_interior!(
    dw_interior_avx512,
    dw_pixels_avx512,
    "avx512f",
    __m512,
    16,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_mul_ps,
    _mm512_add_ps,
    _mm512_storeu_ps
);
depthwise_interior!(
    dw_interior_avx2,
    dw_pixels_avx2,
    "avx2",
    __m256,
    8,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_mul_ps,
    _mm256_add_ps,
    _mm256_storeu_ps
);

/// The depthwise convolution of contiguous channels-last `x` `[b, h, w, c]` with weights
/// `[k*k, c]` as the plain loop [`Depthwise`]'s kernel replaced: each window position's
/// products added to the whole output row in turn. Kept as the reference the kernel is tested
/// against (the same bits) and timed against (`cargo bench --bench depthwise`).
pub fn depthwise_reference(
    x: &[f32],
    weight: &[f32],
    (b, h, w, c): (usize, usize, usize, usize),
    k: usize,
    stride: usize,
    pad: usize,
) -> Vec<f32> {
    let p = pad as isize;
    let (ho, wo) = (
        (h + 2 * pad - k) / stride + 1,
        (w + 2 * pad - k) / stride + 1,
    );
    let mut out = vec![0f32; b * ho * wo * c];
    out.par_chunks_mut(wo * c).enumerate().for_each(|(row, o)| {
        let (bi, oy) = (row / ho, row % ho);
        for ky in 0..k {
            let iy = (oy * stride + ky) as isize - p;
            if iy < 0 || iy >= h as isize {
                continue;
            }
            let src_row = &x[(bi * h + iy as usize) * w * c..][..w * c];
            for kx in 0..k {
                let wk = &weight[(ky * k + kx) * c..][..c];
                for ox in 0..wo {
                    let ix = (ox * stride + kx) as isize - p;
                    if ix < 0 || ix >= w as isize {
                        continue;
                    }
                    let src = &src_row[ix as usize * c..][..c];
                    for ((acc, v), k) in o[ox * c..][..c].iter_mut().zip(src).zip(wk) {
                        *acc += v * k;
                    }
                }
            }
        }
    });
    out
}

/// An activation fused into batch norm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// None.
    Identity,
    /// max(0, x).
    Relu,
    /// min(max(0, x), 6).
    Relu6,
}

impl Act {
    /// Applies the activation to a tensor (on a GPU, where no fused pass exists).
    fn on_tensor(self, y: Tensor) -> Result<Tensor> {
        match self {
            Act::Identity => Ok(y),
            Act::Relu => y.relu(),
            Act::Relu6 => y.clamp(0f32, 6f32),
        }
    }
}

/// Batch norm in inference mode as `x * scale + shift`, channels last, with an optional
/// activation, in one pass over the activation (instead of a multiply, an add and the
/// activation, each a pass and an allocation).
pub struct BatchNorm {
    scale: Vec<f32>,
    shift: Vec<f32>,
    /// `[1, 1, 1, C]` scale and shift on a GPU, in its dtype.
    on_device: Option<(Tensor, Tensor)>,
    /// `[2, C]` f32 scale then shift on a CUDA device, for the fused kernel
    /// ([`super::cuda_ops::ScaleShiftAct`]).
    #[cfg(feature = "cuda")]
    fused: Option<Tensor>,
}

/// The fused scale, shift and activation over contiguous channels-last f32.
struct ScaleShiftAct<'a> {
    scale: &'a [f32],
    shift: &'a [f32],
    act: Act,
}

impl CustomOp1 for ScaleShiftAct<'_> {
    fn name(&self) -> &'static str {
        "scale-shift-act-nhwc"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, self.name())?;
        let c = self.scale.len();
        if layout.shape().dims().last() != Some(&c) {
            candle_core::bail!(
                "{}: {c} channels expected last in {:?}",
                self.name(),
                layout.shape()
            );
        }
        let out = scale_shift_act(x, None, self.scale, self.shift, self.act);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// `act(x * scale + shift)`, or `act((x * scale + shift) + r)` with a residual `r`, per channel
/// of channels-last `x` (`scale.len()` channels), into a new vector, in parallel blocks of 256
/// pixels: each block is copied (not zeroed first), then [`scale_shift_act_in_place`] runs on it
/// while it is in cache.
fn scale_shift_act(
    x: &[f32],
    r: Option<&[f32]>,
    scale: &[f32],
    shift: &[f32],
    act: Act,
) -> Vec<f32> {
    use std::mem::MaybeUninit;
    let c = scale.len();
    let block = c * 256;
    let mut out: Vec<f32> = Vec::with_capacity(x.len());
    out.spare_capacity_mut()[..x.len()]
        .par_chunks_mut(block)
        .enumerate()
        .for_each(|(i, o)| {
            // the block copied (while it is in cache), then the one in-place pass
            let xs = &x[i * block..][..o.len()];
            for (o, v) in o.iter_mut().zip(xs) {
                o.write(*v);
            }
            // SAFETY: every element of the block was written just above
            let o = unsafe { &mut *(o as *mut [MaybeUninit<f32>] as *mut [f32]) };
            let r = r.map(|r| &r[i * block..][..o.len()]);
            scale_shift_act_in_place(o, r, scale, shift, act);
        });
    // SAFETY: the chunks cover x.len() elements and every one was written above
    unsafe { out.set_len(x.len()) };
    out
}

/// `act(o * scale + shift)`, or `act((o * scale + shift) + r)` with the residual `r` of the
/// same length, in place on channels-last values `o`: the one loop of batch norm on the CPU,
/// for [`scale_shift_act`] and for a convolution's row epilogue, compiled once per activation
/// and for the vector instructions the direct kernel runs with ([`super::direct::isa`]), else
/// AVX2 where the CPU has it: on SSE2's four floats a step it took 7 % of the quickstart's
/// time on one thread. Per value a product then an add, never fused: the same bits with each.
fn scale_shift_act_in_place(
    o: &mut [f32],
    r: Option<&[f32]>,
    scale: &[f32],
    shift: &[f32],
    act: Act,
) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(o: &mut [f32], r: Option<&[f32]>, s: &[f32], t: &[f32], act: Act) {
            scale_shift_act_plain(o, r, s, t, act)
        }
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(o: &mut [f32], r: Option<&[f32]>, s: &[f32], t: &[f32], act: Act) {
            scale_shift_act_plain(o, r, s, t, act)
        }
        if super::direct::isa() == Some(super::direct::Isa::Avx512) {
            // SAFETY: `isa` gives AVX-512 only where the CPU has AVX-512F
            return unsafe { avx512(o, r, scale, shift, act) };
        }
        if crate::spectrum::avx2() {
            // SAFETY: the CPU has AVX2
            return unsafe { avx2(o, r, scale, shift, act) };
        }
    }
    scale_shift_act_plain(o, r, scale, shift, act)
}

#[inline(always)]
fn scale_shift_act_plain(o: &mut [f32], r: Option<&[f32]>, scale: &[f32], shift: &[f32], act: Act) {
    #[inline(always)]
    fn run(o: &mut [f32], r: Option<&[f32]>, scale: &[f32], shift: &[f32], f: impl Fn(f32) -> f32) {
        let c = scale.len();
        match r {
            None => {
                for op in o.chunks_exact_mut(c) {
                    for ((o, s), t) in op.iter_mut().zip(scale).zip(shift) {
                        *o = f(*o * s + t);
                    }
                }
            }
            Some(r) => {
                for (op, rp) in o.chunks_exact_mut(c).zip(r.chunks_exact(c)) {
                    for (((o, r), s), t) in op.iter_mut().zip(rp).zip(scale).zip(shift) {
                        *o = f((*o * s + t) + r);
                    }
                }
            }
        }
    }
    match act {
        Act::Identity => run(o, r, scale, shift, |v| v),
        Act::Relu => run(o, r, scale, shift, |v| v.max(0.0)),
        Act::Relu6 => run(o, r, scale, shift, |v| v.clamp(0.0, 6.0)),
    }
}

/// [`ScaleShiftAct`] with a residual added before the activation: `act(x * scale + shift + r)`,
/// rounded as `bn(x) + r` then `act` would be, in one pass instead of three.
struct ScaleShiftAddAct<'a>(ScaleShiftAct<'a>);

impl CustomOp2 for ScaleShiftAddAct<'_> {
    fn name(&self) -> &'static str {
        "scale-shift-add-act-nhwc"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let r = contiguous_f32(s2, l2, self.name())?;
        let f = &self.0;
        let c = f.scale.len();
        if l1.shape() != l2.shape() || l1.shape().dims().last() != Some(&c) {
            candle_core::bail!(
                "{}: {:?} plus {:?} with {c} channels last",
                self.name(),
                l1.shape(),
                l2.shape()
            );
        }
        let out = scale_shift_act(x, Some(r), f.scale, f.shift, f.act);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
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
        let on_device = if !p.device_layers() {
            None
        } else {
            let to = |t: &Tensor| {
                t.reshape((1, 1, 1, c))?
                    .to_device(p.device())?
                    .to_dtype(p.dtype())
            };
            Some((to(&scale)?, to(&shift)?))
        };
        #[cfg(feature = "cuda")]
        let fused = if p.device_layers() && p.device().is_cuda() && super::cuda_ops::enabled() {
            Some(Tensor::stack(&[&scale, &shift], 0)?.to_device(p.device())?)
        } else {
            None
        };
        Ok(BatchNorm {
            scale: scale.to_vec1::<f32>()?,
            shift: shift.to_vec1::<f32>()?,
            on_device,
            #[cfg(feature = "cuda")]
            fused,
        })
    }

    /// Applies it.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, Act::Identity)
    }

    /// The CPU's fused pass for `act`.
    fn cpu_op(&self, act: Act) -> ScaleShiftAct<'_> {
        ScaleShiftAct {
            scale: &self.scale,
            shift: &self.shift,
            act,
        }
    }

    /// Applies it, adds `residual` (same shape), then `act`: a residual block's join.
    pub fn forward_add_act(&self, x: &Tensor, residual: &Tensor, act: Act) -> Result<Tensor> {
        if self.on_device.is_none() {
            let op = ScaleShiftAddAct(self.cpu_op(act));
            return x
                .contiguous()?
                .apply_op2_no_bwd(&residual.contiguous()?, &op);
        }
        #[cfg(feature = "cuda")]
        if let Some(ss) = &self.fused {
            return super::profile::op("batch-norm", x, || {
                let op = super::cuda_ops::ScaleShiftAct(act);
                x.contiguous()?
                    .apply_op3_no_bwd(ss, &residual.contiguous()?, &op)
            });
        }
        act.on_tensor((self.forward(x)? + residual)?)
    }

    /// On a CUDA device with the fused kernels: `act(bn(x) [+ residual])` and the spatial mean
    /// `[B, C]` (f32) of `x` itself, in one pass over `x`
    /// ([`super::cuda_ops::ScaleShiftActMean`]).
    #[cfg(feature = "cuda")]
    pub fn forward_act_mean(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        act: Act,
    ) -> Result<(Tensor, Tensor)> {
        let Some(ss) = &self.fused else {
            candle_core::bail!("batch norm with the spatial mean: not on a CUDA device")
        };
        super::profile::op("batch-norm+mean", x, || {
            let op = super::cuda_ops::ScaleShiftActMean::new(act, residual.is_some());
            let r = residual.map(|r| r.contiguous()).transpose()?;
            let y = x
                .contiguous()?
                .apply_op3_no_bwd(ss, r.as_ref().unwrap_or(ss), &op)?;
            Ok((y, op.take_mean()?))
        })
    }

    /// Applies it, then `act`.
    pub fn forward_act(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        let Some((scale, shift)) = &self.on_device else {
            return x.contiguous()?.apply_op1_no_bwd(&self.cpu_op(act));
        };
        #[cfg(feature = "cuda")]
        if let Some(ss) = &self.fused {
            return super::profile::op("batch-norm", x, || {
                x.contiguous()?
                    .apply_op2_no_bwd(ss, &super::cuda_ops::ScaleShiftAct(act))
            });
        }
        act.on_tensor(super::profile::op("batch-norm", x, || {
            x.broadcast_mul(scale)?.broadcast_add(shift)
        })?)
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
        let (dev, dt) = (p.device().clone(), p.dtype());
        Ok(Linear {
            weight_t: w.t()?.contiguous()?.to_device(&dev)?.to_dtype(dt)?,
            bias: bias.to_device(&dev)?.to_dtype(dt)?,
        })
    }

    /// Applies it to `[B, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.to_dtype(self.weight_t.dtype())?
            .matmul(&self.weight_t)?
            .broadcast_add(&self.bias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use std::collections::HashMap;

    fn max_err(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn spatial_mean_matches_candle_mean() {
        let x = Tensor::randn(0f32, 1.0, (3, 7, 5, 4), &Device::Cpu).unwrap();
        let err = max_err(&spatial_mean(&x).unwrap(), &x.mean((1, 2)).unwrap());
        assert!(err < 1e-6, "{err}");
    }

    /// The channels-last convolutions, the CPU kernels and the GPU's tensor-op layers (built
    /// here on the CPU), against candle's own NCHW `conv2d` on random tensors.
    #[test]
    fn convolutions_match_candle_conv2d() {
        let dev = Device::Cpu;
        // (cin, cout, k, stride, groups, h, w, bias)
        let cases = [
            (3, 8, 3, 1, 1, 9, 10, true),
            (4, 6, 3, 2, 1, 10, 7, false),
            (5, 7, 1, 1, 1, 6, 5, true),
            (6, 6, 3, 1, 6, 9, 8, false),
            (6, 6, 3, 2, 6, 10, 9, false),
            (6, 6, 3, 2, 6, 1, 1, false),
            (3, 4, 3, 2, 1, 224, 224, false),
            (6, 6, 5, 1, 6, 9, 8, false),
            (6, 6, 5, 2, 6, 11, 10, true),
            (4, 5, 7, 2, 1, 13, 12, false),
            // output channels in multiples of 16: the direct AVX-512 kernel where the CPU has it
            (8, 16, 1, 1, 1, 6, 5, true),
            (16, 32, 3, 1, 1, 9, 10, false),
            (16, 48, 3, 2, 1, 10, 9, true),
            (24, 64, 1, 2, 1, 7, 7, false),
            (3, 16, 3, 2, 1, 33, 31, false),
        ];
        let both = cases.iter().flat_map(|c| [(*c, false), (*c, true)]);
        for ((cin, cout, k, stride, groups, h, w, bias), gpu_layers) in both {
            let weight = Tensor::randn(0f32, 1.0, (cout, cin / groups, k, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, cout, &dev).unwrap();
            let mut t = HashMap::new();
            t.insert("c.weight".to_string(), weight.clone());
            t.insert("c.bias".to_string(), b.clone());
            let mut p = Params::new(std::path::Path::new("test"), t);
            if gpu_layers {
                p = p.device_layers_on_cpu();
            }
            let conv = Conv::new(&mut p, "c", cin, cout, k, stride, groups, bias).unwrap();
            let x = Tensor::randn(0f32, 1.0, (2, cin, h, w), &dev).unwrap();
            let mut want = x.conv2d(&weight, k / 2, stride, 1, groups).unwrap();
            if bias {
                want = want
                    .broadcast_add(&b.reshape((1, cout, 1, 1)).unwrap())
                    .unwrap();
            }
            let got = conv
                .forward(&x.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap())
                .unwrap()
                .permute((0, 3, 1, 2))
                .unwrap();
            assert_eq!(
                got.dims(),
                want.dims(),
                "{cin} {cout} {k} {stride} {groups}"
            );
            let err = max_err(&got, &want);
            assert!(
                err < 1e-4,
                "case {cin} {cout} {k} {stride} {groups} {h}x{w} (GPU layers {gpu_layers}): {err}"
            );
        }
    }

    /// The depthwise kernel that sums each output pixel in registers gives the bits of the
    /// straightforward loop it replaced (each window position's product added to the whole
    /// output row in turn), for channel counts that use the blocks of 16, 8 and single channels,
    /// strides 1 and 2, kernels 3 and 5, with and without padding, rows with and without
    /// groups of inner pixels.
    #[test]
    fn depthwise_gives_the_bits_of_the_plain_loop() {
        let dev = Device::Cpu;
        // (c, k, stride, pad, h, w)
        for (c, k, s, pad, h, w) in [
            (40, 3, 1, 1, 9, 8),
            (27, 3, 2, 1, 10, 9),
            (5, 5, 1, 2, 7, 11),
            (48, 5, 2, 2, 12, 13),
            (16, 3, 2, 0, 7, 7),
            (8, 3, 1, 1, 1, 1),
            (24, 3, 2, 1, 6, 30),
            // whole windows inside (the register kernels), channels of every block size
            (57, 3, 1, 1, 6, 21),
            (40, 5, 1, 2, 9, 10),
            (32, 3, 2, 1, 9, 17),
            (16, 3, 1, 0, 3, 3),
        ] {
            let x = Tensor::randn(0f32, 1.0, (2, h, w, c), &dev).unwrap();
            let wt: Vec<f32> = Tensor::randn(0f32, 1.0, k * k * c, &dev)
                .unwrap()
                .to_vec1()
                .unwrap();
            let got: Vec<f32> = x
                .apply_op1_no_bwd(&Depthwise {
                    weight: &wt,
                    k,
                    stride: s,
                    pad,
                })
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let want = depthwise_reference(&xs, &wt, (2, h, w, c), k, s, pad);
            assert_eq!(got.len(), want.len());
            let same = |got: &[f32]| {
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            };
            assert!(same(&got), "c {c}, k {k}, stride {s}, pad {pad}, {h}x{w}");
            // and compiled for each instruction set this CPU has, and for none
            use crate::model::direct::Isa;
            for isa in [Some(Isa::Avx512), Some(Isa::Avx2), None] {
                if isa.is_some_and(|isa| !isa.supported()) {
                    eprintln!("{isa:?} not tried: this CPU lacks it");
                    continue;
                }
                let geom = DepthwiseRow {
                    isa,
                    ..DepthwiseRow::new((h, w, c), k, s, pad)
                };
                let (got, _) = geom.conv(&xs, &wt, 2, false, None);
                assert!(
                    same(&got),
                    "{isa:?}: c {c}, k {k}, stride {s}, pad {pad}, {h}x{w}"
                );
            }
        }
    }

    /// Convolution, batch norm, residual and activation as one call (the direct or depthwise
    /// kernel's row epilogue where they run; else separate passes): the same bits as the
    /// separate passes, and the mean of the convolution's own output (depthwise: the bits of
    /// [`spatial_mean`]).
    #[test]
    fn conv_with_batch_norm_equals_the_separate_passes() {
        let dev = Device::Cpu;
        // (cin, cout, k, stride, groups, h, w): direct kernel (multiples of 8), not (cout 6),
        // depthwise (groups = channels)
        let cases = [
            (16, 32, 3, 1, 1, 9, 10),
            (8, 24, 1, 1, 1, 6, 5),
            (16, 16, 3, 2, 1, 11, 9),
            (4, 6, 3, 1, 1, 7, 8),
            (24, 24, 3, 1, 24, 9, 10),
            (40, 40, 5, 2, 40, 11, 12),
            (6, 6, 3, 2, 6, 1, 1),
        ];
        for (cin, cout, k, stride, groups, h, w) in cases {
            let mut t = HashMap::new();
            let rand = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
            t.insert("c.weight".to_string(), rand(&[cout, cin / groups, k, k]));
            t.insert("bn.weight".to_string(), rand(&[cout]));
            t.insert("bn.bias".to_string(), rand(&[cout]));
            t.insert("bn.running_mean".to_string(), rand(&[cout]));
            t.insert("bn.running_var".to_string(), rand(&[cout]).abs().unwrap());
            let mut p = Params::new(std::path::Path::new("test"), t);
            let conv = Conv::new(&mut p, "c", cin, cout, k, stride, groups, false).unwrap();
            let bn = BatchNorm::new(&mut p, "bn", cout, 1e-5).unwrap();
            let mut x = rand(&[3, h, w, cin]);
            if groups > 1 {
                // magnitudes from 1e-7 to 1e7, so that f64 sums round and the order in which
                // the mean adds them shows
                let e = Tensor::rand(-16f32, 16.0, x.dims(), &dev)
                    .unwrap()
                    .exp()
                    .unwrap();
                x = (x * e).unwrap();
            }
            let y = conv.forward(&x).unwrap();
            let residual = rand(y.dims());
            let bits = |t: &Tensor| {
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .into_iter()
                    .map(f32::to_bits)
                    .collect::<Vec<_>>()
            };
            for act in [Act::Relu, Act::Relu6, Act::Identity] {
                let (got, mean) = conv.forward_bn(&x, &bn, act, None, true).unwrap();
                let want = bn.forward_act(&y, act).unwrap();
                assert_eq!(bits(&got), bits(&want), "{cin} {cout} {k} {act:?}");
                let mean = mean.unwrap();
                if groups == 1 {
                    let err = max_err(&mean, &y.mean((1, 2)).unwrap());
                    assert!(err < 1e-5, "{cin} {cout} {k}: mean off by {err}");
                } else {
                    let want = spatial_mean(&y).unwrap();
                    assert_eq!(bits(&mean), bits(&want), "{cin} {k} depthwise mean");
                }
                let (got, mean) = conv
                    .forward_bn(&x, &bn, act, Some(&residual), false)
                    .unwrap();
                let want = bn.forward_add_act(&y, &residual, act).unwrap();
                assert_eq!(bits(&got), bits(&want), "{cin} {cout} {k} {act:?} residual");
                assert!(mean.is_none());
            }
            // a residual of another shape is refused
            let wrong = rand(&[3, y.dims()[1] + 1, 1, cout]);
            assert!(conv
                .forward_bn(&x, &bn, Act::Relu, Some(&wrong), false)
                .is_err());
        }
    }
}
