//! freqtag's own GPU operations on channels-last activations, where candle's ops cost several
//! passes over memory (built with the `cuda` feature; cuDNN with `cudnn`). Kernels are CUDA C in
//! [`super::gpu_kernels::SOURCE`], compiled once per process with NVRTC, for f32, f16 and bf16
//! (computing in f32):
//!
//! - [`ScaleShiftAct`]: batch norm as `x * scale + shift`, an optional residual added, then the
//!   activation, in one pass (candle: a broadcast multiply, a broadcast add, the add and the
//!   activation, each a pass and an allocation);
//! - [`DepthwiseConv`]: a depthwise convolution, one thread per output element (candle runs a
//!   grouped convolution as one convolution per group; cuDNN's NHWC depthwise was slow too);
//! - [`SpatialMean`]: the mean per frame and channel, summed in f64;
//! - [`ScaleShiftActMean`]: the two above in one pass, for a tapped convolution's output that
//!   batch norm reads next (`FREQTAG_GPU_FUSED_MEAN=0` runs them apart, for comparison);
//! - [`CudnnConv`] (`cudnn` feature): a full convolution through cuDNN, read and written in NHWC
//!   form, with cuDNN's algorithm for the shape (candle's CUDA convolution builds an im2col
//!   matrix and copies its output twice to get back to channels-last). In f32 it computes in
//!   plain f32 FMA (`CUDNN_FMA_MATH`): TF32 tensor cores, cuDNN's default on Ampere and later,
//!   round inputs to 10 bits of mantissa, far beyond the 1e-4 the spectra are held to. f16 and
//!   bf16 use tensor cores, accumulating in f32.
//!
//! The kernels themselves run on the CPU in the test `gpu_kernels_on_the_cpu` (see
//! [`super::gpu_kernels`]); the ops around them, cuDNN and the launches do not:
//! `scripts/gpu-check.sh` compares a GPU run's outputs with the CPU's. `FREQTAG_NO_FUSED_GPU=1`
//! turns it all off (candle's ops run instead), for comparison.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaStream, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CpuStorage, CudaDevice, CudaStorage, CustomOp2, CustomOp3, DType, Layout};
use candle_core::{Result, Shape};

use super::gpu_kernels::{Launch, SOURCE};
use super::layers::Act;

/// Whether the fused GPU operations are on (`FREQTAG_NO_FUSED_GPU` unset or `0`).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("FREQTAG_NO_FUSED_GPU").is_none_or(|v| v == "0"))
}

/// The PTX of [`SOURCE`], compiled once per process.
fn ptx() -> Result<&'static str> {
    static PTX: std::sync::OnceLock<std::result::Result<String, String>> =
        std::sync::OnceLock::new();
    PTX.get_or_init(|| {
        cudarc::nvrtc::compile_ptx(SOURCE)
            .map(|p| p.to_src())
            .map_err(|e| format!("compiling freqtag's GPU kernels with NVRTC: {e:?}"))
    })
    .as_ref()
    .map(|s| s.as_str())
    .map_err(|e| candle_core::Error::Msg(e.clone()))
}

/// Kernel `{name}_{dtype}` of [`SOURCE`] on `dev`, and the stream to launch it on.
fn kernel(dev: &CudaDevice, name: &str, dt: DType) -> Result<(CudaFunction, Arc<CudaStream>)> {
    let suffix = match dt {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => candle_core::bail!("{name}: {other:?} is not supported on the GPU"),
    };
    let f = dev.get_or_load_custom_func(&format!("{name}_{suffix}"), "freqtag_kernels", ptx()?)?;
    Ok((f.into_cuda_function(), dev.cuda_stream()))
}

/// A launch of [`super::gpu_kernels`]' shapes, without dynamic shared memory.
fn config(l: Launch) -> LaunchConfig {
    LaunchConfig {
        grid_dim: l.grid,
        block_dim: l.block,
        shared_mem_bytes: 0,
    }
}

/// One thread per element ([`super::gpu_kernels::flat`]).
fn flat(n: usize) -> LaunchConfig {
    config(super::gpu_kernels::flat(n))
}

fn launched(r: std::result::Result<(), cudarc::driver::DriverError>) -> Result<()> {
    r.map_err(|e| candle_core::Error::Msg(format!("launching a freqtag GPU kernel: {e:?}")))
}

/// An activation as the kernels' `act` argument: 0 none, 1 ReLU, 2 ReLU6.
fn act_code(act: Act) -> i32 {
    match act {
        Act::Identity => 0,
        Act::Relu => 1,
        Act::Relu6 => 2,
    }
}

/// The start offset of a contiguous layout.
fn start(l: &Layout, what: &str) -> Result<usize> {
    match l.contiguous_offsets() {
        Some((a, _)) => Ok(a),
        None => candle_core::bail!("{what}: contiguous input expected"),
    }
}

/// Calls `$body` with `$t` the Rust type of `$dt` (f32, f16 or bf16).
macro_rules! by_dtype {
    ($dt:expr, $t:ident => $body:expr) => {
        match $dt {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F16 => {
                type $t = half::f16;
                $body
            }
            DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            other => candle_core::bail!("{other:?} is not supported by freqtag's GPU kernels"),
        }
    };
}

/// Batch norm as `x * scale + shift` (rounded as the CPU pass: a multiply, then an add), then an
/// optional residual `r` added, then `act`; channels last, computed in f32 whatever the dtype.
/// Applied as `x.apply_op2(&scale_shift, op)` (no residual) or
/// `x.apply_op3(&scale_shift, &r, op)`, with `scale_shift` the `[2, C]` f32 scale and shift on
/// the device.
pub struct ScaleShiftAct(pub Act);

impl ScaleShiftAct {
    fn run(
        &self,
        x: (&CudaStorage, &Layout),
        ss: (&CudaStorage, &Layout),
        r: Option<(&CudaStorage, &Layout)>,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = x.0.device().clone();
        let shape = x.1.shape().clone();
        let c = *shape.dims().last().unwrap_or(&1);
        let n = shape.elem_count();
        if ss.1.shape().elem_count() != 2 * c {
            candle_core::bail!(
                "scale-shift-act: {c} channels but {:?} scale and shift",
                ss.1.shape()
            )
        }
        if let Some((_, rl)) = r {
            if rl.shape() != &shape {
                candle_core::bail!("scale-shift-act: residual {:?} for {:?}", rl.shape(), shape)
            }
        }
        let sss =
            ss.0.as_cuda_slice::<f32>()?
                .slice(start(ss.1, "scale-shift-act")?..);
        let (func, stream) = kernel(&dev, "scale_shift_act", x.0.dtype())?;
        let act = act_code(self.0);
        let (n64, c32) = (n as u64, c as u32);
        let null: u64 = 0;
        by_dtype!(x.0.dtype(), T => {
            let xs = x.0.as_cuda_slice::<T>()?.slice(start(x.1, "scale-shift-act")?..);
            let rs = match r {
                Some((rs, rl)) => Some(rs.as_cuda_slice::<T>()?.slice(start(rl, "residual")?..)),
                None => None,
            };
            // SAFETY: every element of `y` is written by the kernel before it is read.
            let mut y = unsafe { dev.alloc::<T>(n)? };
            let mut b = stream.launch_builder(&func);
            b.arg(&xs).arg(&sss);
            match &rs {
                Some(rs) => b.arg(rs),
                None => b.arg(&null),
            };
            b.arg(&mut y).arg(&n64).arg(&c32).arg(&act);
            // SAFETY: the arguments match the kernel; x, r and y hold n elements, ss 2c.
            launched(unsafe { b.launch(flat(n)) }.map(|_| ()))?;
            Ok((T::wrap_cuda_slice(y, dev), shape))
        })
    }
}

impl CustomOp2 for ScaleShiftAct {
    fn name(&self) -> &'static str {
        "scale-shift-act"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("scale-shift-act: the GPU kernel was called on the CPU")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        ss: &CudaStorage,
        sl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.run((x, xl), (ss, sl), None)
    }
}

impl CustomOp3 for ScaleShiftAct {
    fn name(&self) -> &'static str {
        "scale-shift-add-act"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("scale-shift-add-act: the GPU kernel was called on the CPU")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        ss: &CudaStorage,
        sl: &Layout,
        r: &CudaStorage,
        rl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.run((x, xl), (ss, sl), Some((r, rl)))
    }
}

/// Depthwise `k x k` convolution on channels-last `[B, H, W, C]` with f32 weight `[C, k, k]`
/// (any shape of that many elements), zero padding `pad`: one thread per output element, reading
/// its window along the contiguous channels. cuDNN's NHWC depthwise kernels ran at a tenth of the
/// memory bandwidth on an H100.
pub struct DepthwiseConv {
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl DepthwiseConv {
    /// Whether the kernel's 32-bit indices cover `x` `[B, H, W, C]`.
    pub fn fits(&self, dims: &[usize]) -> bool {
        let n: usize = dims.iter().product();
        let [b, h, w, c] = [dims[0], dims[1], dims[2], dims[3]];
        let (ho, wo) = self.out(h, w);
        n < (1 << 31) && b * ho * wo * c < (1 << 31)
    }

    fn out(&self, h: usize, w: usize) -> (usize, usize) {
        let (k, s, p) = (self.k, self.stride, self.pad);
        ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1)
    }
}

impl CustomOp2 for DepthwiseConv {
    fn name(&self) -> &'static str {
        "depthwise-conv"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("depthwise-conv: the GPU kernel was called on the CPU")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let (b, h, wd, c) = xl.shape().dims4()?;
        if wl.shape().elem_count() != c * self.k * self.k
            || h + 2 * self.pad < self.k
            || wd + 2 * self.pad < self.k
            || !self.fits(xl.shape().dims())
        {
            candle_core::bail!(
                "depthwise-conv: weight {:?} for input {:?}, kernel {}",
                wl.shape(),
                xl.shape(),
                self.k
            )
        }
        let (ho, wo) = self.out(h, wd);
        let n = b * ho * wo * c;
        let ws = w
            .as_cuda_slice::<f32>()?
            .slice(start(wl, "depthwise-conv")?..);
        let (func, stream) = kernel(&dev, "depthwise", x.dtype())?;
        let u = |v: usize| v as u32;
        let dims = [b, h, wd, c, ho, wo, self.k, self.stride, self.pad].map(u);
        by_dtype!(x.dtype(), T => {
            let xs = x.as_cuda_slice::<T>()?.slice(start(xl, "depthwise-conv")?..);
            // SAFETY: every element of `y` is written by the kernel before it is read.
            let mut y = unsafe { dev.alloc::<T>(n)? };
            let mut bld = stream.launch_builder(&func);
            bld.arg(&xs).arg(&ws).arg(&mut y);
            for d in &dims {
                bld.arg(d);
            }
            // SAFETY: the arguments match the kernel; x, w and y hold what the dims say.
            launched(unsafe { bld.launch(flat(n)) }.map(|_| ()))?;
            Ok((T::wrap_cuda_slice(y, dev), Shape::from((b, ho, wo, c))))
        })
    }
}

/// Which f32 3x3 convolutions freqtag's own kernel ([`Conv3x3`]) runs rather than cuDNN: those of
/// at most `max_cout` output channels, on inputs of at most 32x32 pixels unless `any_size`.
/// By default 64 channels on inputs up to 32x32, the shapes measured; `FREQTAG_GPU_OWN_CONV=N`
/// takes N channels on inputs of any size (0: cuDNN alone). On an H100 (session 17, 4 050 frames
/// a pass), a call took 0.70 ms against cuDNN's 2.32 ms for ResNet-32's 16 -> 16 channels, 0.70
/// against 1.07 for 32 -> 32, 0.67 against 1.02 for 64 -> 64. The paper pipeline in f32 (16
/// workers, 20 000 images, interleaved): 2 030 and 2 126 images/s, against 1 749 and 1 742 with
/// cuDNN alone (and 1 880 and 2 018 with the kernel up to 16 channels).
#[derive(Debug, Clone, Copy)]
pub struct OwnConv {
    pub max_cout: usize,
    pub any_size: bool,
}

impl OwnConv {
    /// Whether the kernel takes an input of `h x w` pixels.
    pub fn takes(&self, h: usize, w: usize) -> bool {
        self.any_size || h * w <= 32 * 32
    }
}

/// The process's [`OwnConv`] (`FREQTAG_GPU_OWN_CONV`; none with `FREQTAG_NO_FUSED_GPU`).
pub fn own_conv() -> OwnConv {
    static ON: std::sync::OnceLock<OwnConv> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        let default = OwnConv {
            max_cout: 64,
            any_size: false,
        };
        let v = std::env::var("FREQTAG_GPU_OWN_CONV").ok();
        match v.as_deref().map(str::trim) {
            _ if !enabled() => OwnConv {
                max_cout: 0,
                any_size: false,
            },
            None | Some("") => default,
            Some(v) => match v.parse() {
                Ok(max_cout) => OwnConv {
                    max_cout,
                    any_size: true,
                },
                Err(_) => {
                    tracing::warn!(
                        "FREQTAG_GPU_OWN_CONV={v}: not a channel count; using the default (0 \
                         turns the kernel off)"
                    );
                    default
                }
            },
        }
    })
}

/// A full 3x3 convolution in f32, zero padding 1, stride 1 or 2, on channels-last `[B, H, W,
/// Cin]` with weight `[9 Cin, Cout]` (rows ordered ky, kx, cin; Cin a multiple of 8, Cout of
/// 16), by freqtag's kernel: each thread 4 pixels by 16 output channels, input channels 8 at a
/// time through shared memory ([`super::gpu_kernels::conv3x3`] gives the tiles). For the narrow
/// layers of CIFAR networks, where cuDNN's f32 NHWC kernels ran at about 7.7 TFLOP/s on an H100
/// (ResNet-32's 16-channel layers, 2.5 ms a call at 4 050 frames). [`Conv3x3::tile`] says
/// whether a shape fits.
pub struct Conv3x3 {
    pub stride: usize,
}

impl Conv3x3 {
    /// The output's height and width for input `h x w`.
    pub fn out(&self, h: usize, w: usize) -> (usize, usize) {
        ((h - 1) / self.stride + 1, (w - 1) / self.stride + 1)
    }

    /// The launch for input `[b, h, w, cin]` to `cout` channels, if the kernel covers it.
    pub fn tile(&self, dims: &[usize], cout: usize) -> Option<super::gpu_kernels::ConvTile> {
        let &[b, h, w, cin] = dims else { return None };
        let (ho, wo) = self.out(h, w);
        super::gpu_kernels::conv3x3(b, ho, wo, cin, cout, self.stride)
    }
}

impl CustomOp2 for Conv3x3 {
    fn name(&self) -> &'static str {
        "conv3x3"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("conv3x3: the GPU kernel was called on the CPU")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let (b, h, wd, cin) = xl.shape().dims4()?;
        let (rows, cout) = wl.shape().dims2()?;
        let tile = match self.tile(xl.shape().dims(), cout) {
            Some(t) if rows == 9 * cin && x.dtype() == DType::F32 => t,
            _ => candle_core::bail!(
                "conv3x3: weight {:?} ({:?}) for input {:?}, stride {}: not a shape the kernel \
                 covers",
                wl.shape(),
                x.dtype(),
                xl.shape(),
                self.stride
            ),
        };
        let (ho, wo) = self.out(h, wd);
        // the kernel reads 16 bytes at a time
        let (xo, wo4) = (start(xl, "conv3x3")?, start(wl, "conv3x3")?);
        if xo % 4 != 0 || wo4 % 4 != 0 {
            candle_core::bail!("conv3x3: input or weight not aligned to 16 bytes")
        }
        let xs = x.as_cuda_slice::<f32>()?.slice(xo..);
        let ws = w.as_cuda_slice::<f32>()?.slice(wo4..);
        let (func, stream) = kernel(&dev, "conv3x3", DType::F32)?;
        // SAFETY: every element of `y` is written by the kernel before it is read.
        let mut y = unsafe { dev.alloc::<f32>(b * ho * wo * cout)? };
        let dims = [
            b,
            h,
            wd,
            cin,
            ho,
            wo,
            cout,
            self.stride,
            tile.frames,
            tile.rows,
        ]
        .map(|v| v as u32);
        let mut bld = stream.launch_builder(&func);
        bld.arg(&xs).arg(&ws).arg(&mut y);
        for d in &dims {
            bld.arg(d);
        }
        let cfg = LaunchConfig {
            grid_dim: tile.launch.grid,
            block_dim: tile.launch.block,
            shared_mem_bytes: tile.shared as u32,
        };
        // SAFETY: the arguments match the kernel; x, w and y hold what the dims say, and the
        // launch is the tile the kernel is written for, with its shared memory.
        launched(unsafe { bld.launch(cfg) }.map(|_| ()))?;
        Ok((f32::wrap_cuda_slice(y, dev), Shape::from((b, ho, wo, cout))))
    }
}

/// The spatial mean `[B, C]` in f32 of channels-last `[B, H, W, C]`, summed in f64 in a fixed
/// order (as the CPU's direct kernel sums its rows), in one pass.
pub struct SpatialMean;

impl candle_core::CustomOp1 for SpatialMean {
    fn name(&self) -> &'static str {
        "spatial-mean"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("spatial-mean: the GPU kernel was called on the CPU")
    }

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let (b, h, w, c) = xl.shape().dims4()?;
        if b > 65_535 {
            candle_core::bail!("spatial-mean: {b} frames in one pass, at most 65 535")
        }
        let (func, stream) = kernel(&dev, "spatial_mean", x.dtype())?;
        let (hw, c32) = ((h * w) as u32, c as u32);
        let cfg = config(super::gpu_kernels::spatial_mean(b, c));
        // SAFETY: every element of `y` is written by the kernel before it is read.
        let mut y = unsafe { dev.alloc::<f32>(b * c)? };
        by_dtype!(x.dtype(), T => {
            let xs = x.as_cuda_slice::<T>()?.slice(start(xl, "spatial-mean")?..);
            let mut bld = stream.launch_builder(&func);
            bld.arg(&xs).arg(&mut y).arg(&hw).arg(&c32);
            // SAFETY: the arguments match the kernel; x holds b*hw*c elements, y b*c.
            launched(unsafe { bld.launch(cfg) }.map(|_| ()))?;
        });
        Ok((f32::wrap_cuda_slice(y, dev), Shape::from((b, c))))
    }
}

/// Whether batch norm also takes the spatial mean of its input where a tap records it
/// ([`ScaleShiftActMean`]; on unless `FREQTAG_GPU_FUSED_MEAN=0`). Measured on an H100 (session
/// 15, f32): the paper pipeline 1 513 against 1 461 images/s (20 000 CIFAR images, 12 workers),
/// MobileNetV2 111 against 105 (2 400 photos, 8 workers), with the outputs of the separate ops.
pub fn fused_mean() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        enabled() && std::env::var_os("FREQTAG_GPU_FUSED_MEAN").is_none_or(|v| v != "0")
    })
}

/// [`ScaleShiftAct`] and [`SpatialMean`] of its input in one pass: for a convolution whose output
/// a tap records and batch norm reads next, that output is read once instead of twice.
/// `x.apply_op3_no_bwd(&scale_shift, &r, op)` gives batch norm's output, as [`ScaleShiftAct`]
/// does (pass `scale_shift` again as `r` when there is no residual, with `residual` false); the
/// mean `[B, C]` (f32) is then [`ScaleShiftActMean::take_mean`].
pub struct ScaleShiftActMean {
    pub act: Act,
    pub residual: bool,
    mean: RefCell<Option<(CudaStorage, Shape)>>,
}

impl ScaleShiftActMean {
    /// The op for `act`, with a residual or not.
    pub fn new(act: Act, residual: bool) -> Self {
        ScaleShiftActMean {
            act,
            residual,
            mean: RefCell::new(None),
        }
    }

    /// The spatial mean the op's last run took.
    pub fn take_mean(&self) -> Result<candle_core::Tensor> {
        let Some((storage, shape)) = self.mean.borrow_mut().take() else {
            candle_core::bail!("scale-shift-act-mean: no mean taken (the op has not run)")
        };
        Ok(candle_core::Tensor::from_storage(
            candle_core::Storage::Cuda(storage),
            shape,
            candle_core::op::BackpropOp::none(),
            false,
        ))
    }
}

impl CustomOp3 for ScaleShiftActMean {
    fn name(&self) -> &'static str {
        "scale-shift-act-mean"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("scale-shift-act-mean: the GPU kernel was called on the CPU")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        ss: &CudaStorage,
        sl: &Layout,
        r: &CudaStorage,
        rl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let shape = xl.shape().clone();
        let (b, h, w, c) = shape.dims4()?;
        if b > 65_535 {
            candle_core::bail!("scale-shift-act-mean: {b} frames in one pass, at most 65 535")
        }
        if sl.shape().elem_count() != 2 * c {
            candle_core::bail!(
                "scale-shift-act-mean: {c} channels but {:?} scale and shift",
                sl.shape()
            )
        }
        if self.residual && rl.shape() != &shape {
            candle_core::bail!(
                "scale-shift-act-mean: residual {:?} for {:?}",
                rl.shape(),
                shape
            )
        }
        let sss = ss
            .as_cuda_slice::<f32>()?
            .slice(start(sl, "scale-shift-act-mean")?..);
        let (func, stream) = kernel(&dev, "scale_shift_act_mean", x.dtype())?;
        let act = act_code(self.act);
        let (hw, c32) = ((h * w) as u32, c as u32);
        let null: u64 = 0;
        let cfg = config(super::gpu_kernels::scale_shift_act_mean(b, c));
        // SAFETY: every element of `mean` is written by the kernel before it is read.
        let mut mean = unsafe { dev.alloc::<f32>(b * c)? };
        let y = by_dtype!(x.dtype(), T => {
            let xs = x.as_cuda_slice::<T>()?.slice(start(xl, "scale-shift-act-mean")?..);
            let rs = if self.residual {
                Some(r.as_cuda_slice::<T>()?.slice(start(rl, "residual")?..))
            } else {
                None
            };
            // SAFETY: every element of `y` is written by the kernel before it is read.
            let mut y = unsafe { dev.alloc::<T>(shape.elem_count())? };
            let mut bld = stream.launch_builder(&func);
            bld.arg(&xs).arg(&sss);
            match &rs {
                Some(rs) => bld.arg(rs),
                None => bld.arg(&null),
            };
            bld.arg(&mut y).arg(&mut mean).arg(&hw).arg(&c32).arg(&act);
            // SAFETY: the arguments match the kernel; x, r and y hold b*hw*c elements, ss 2c,
            // mean b*c; the launch shape is the one the kernel is written for.
            launched(unsafe { bld.launch(cfg) }.map(|_| ()))?;
            T::wrap_cuda_slice(y, dev.clone())
        });
        *self.mean.borrow_mut() = Some((f32::wrap_cuda_slice(mean, dev), Shape::from((b, c))));
        Ok((y, shape))
    }
}

/// A convolution through cuDNN on channels-last input `[B, H, W, Cin]` with weight
/// `[Cout, k, k, Cin/groups]` (cuDNN's NHWC filter layout), zero padding `pad`, giving
/// `[B, Ho, Wo, Cout]`; `groups` is 1 or `Cin` (depthwise; freqtag uses [`DepthwiseConv`]).
///
/// Channels first instead, on transposed copies of input and output, was tried in session 15 on
/// an H100: cuDNN's own NCHW f32 time for ResNet-32 fell from 0.31 to 0.23 s in a one-worker
/// profile of 500 images, but the transposes took 0.14 s, and at 12 workers the paper pipeline
/// ran at 1 346 against 1 461 images/s. It was removed; a network that stays channels first in
/// f32 (batch norm and the spatial mean too) would keep the gain without the transposes.
#[cfg(feature = "cudnn")]
pub struct CudnnConv {
    pub stride: usize,
    pub pad: usize,
    pub groups: usize,
}

#[cfg(feature = "cudnn")]
mod cudnn_conv {
    use super::*;
    use candle_core::cuda_backend::DeviceId;
    use cudarc::cudnn::safe::{
        ConvDescriptor, ConvForward, Cudnn, FilterDescriptor, TensorDescriptor,
    };
    use cudarc::cudnn::{sys, CudnnDataType};
    use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

    type Algo = sys::cudnnConvolutionFwdAlgo_t;
    type Key = (DType, [usize; 10]);

    /// What one convolution shape needs, made once per worker thread: the descriptors, the
    /// algorithm that ran and the workspace it takes. Made per call, the descriptors and the
    /// workspace queries cost host time on every one of a pass's convolutions.
    struct Plan<T: CudnnDataType> {
        conv: ConvDescriptor<f32>,
        x: TensorDescriptor<T>,
        w: FilterDescriptor<T>,
        y: TensorDescriptor<T>,
        algo: Option<(Algo, usize)>,
    }

    thread_local! {
        // handles are not Send; one per worker thread and device, like candle's
        static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
        // one plan per shape and dtype (a `Plan<T>` behind `Any`)
        static PLANS: RefCell<HashMap<Key, Box<dyn std::any::Any>>> = RefCell::new(HashMap::new());
        // one workspace per thread and device, grown to the largest a shape asked for and never
        // cleared: cuDNN overwrites what it uses, and the thread's work runs in order on its own
        // stream, so one convolution's scratch is done with before the next one's starts
        static WORKSPACES: RefCell<HashMap<DeviceId, CudaSlice<u8>>> = RefCell::new(HashMap::new());
    }

    /// Workspace above this is refused: the heuristic's FFT choices can ask for gigabytes at
    /// thousands of frames; implicit GEMM needs next to none. The precomputed-index GEMM,
    /// cuDNN's choice for ResNet-32's 16-channel layers, takes 530 MB at 4 050 frames of 32x32;
    /// with plain implicit GEMM there instead (a 256 MB cap), a pass's convolutions took 70 ms on
    /// an H100, against 36 ms for PyTorch's.
    const MAX_WORKSPACE: usize = 1 << 30;

    fn err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
        candle_core::Error::Msg(format!("cuDNN {what}: {e:?}"))
    }

    /// The profile entry of a convolution shape, e.g. `cuDNN 4050x32x32 16->16 k3 s1`: made
    /// once per shape and kept for the run (the profile's names are static).
    fn profile_name(key: &Key) -> &'static str {
        let [b, h, w, c, co, k, _, s, _, _] = key.1;
        crate::model::profile::intern(format!("cuDNN {b}x{h}x{w} {c}->{co} k{k} s{s} {:?}", key.0))
    }

    /// The thread's workspace on `dev`, at least `size` bytes.
    fn with_workspace<R>(
        dev: &CudaDevice,
        size: usize,
        f: impl FnOnce(&mut CudaSlice<u8>) -> Result<R>,
    ) -> Result<R> {
        WORKSPACES.with(|ws| {
            let mut ws = ws.borrow_mut();
            let grow = ws.get(&dev.id()).is_none_or(|w| w.len() < size);
            if grow {
                ws.remove(&dev.id());
                // SAFETY: a workspace is scratch that cuDNN writes before it reads.
                let w = unsafe { dev.cuda_stream().alloc::<u8>(size.max(1)) }
                    .map_err(|e| err("workspace", e))?;
                ws.insert(dev.id(), w);
            }
            let w = ws.get_mut(&dev.id()).expect("inserted above");
            f(w)
        })
    }

    /// The algorithm `FREQTAG_CUDNN_ALGO` names (`implicit_gemm`, `implicit_precomp_gemm`,
    /// `gemm`, `direct`, `fft`, `fft_tiling`, `winograd`, `winograd_nonfused`), tried before
    /// cuDNN's heuristic choice for every convolution shape; where cuDNN refuses it for a shape
    /// (or it needs more than [`MAX_WORKSPACE`]), the heuristic's runs. For measuring on a GPU:
    /// cuDNN's heuristic picks the precomputed-index implicit GEMM for every ResNet-32 shape.
    fn forced_algo() -> Result<Option<Algo>> {
        static ALGO: std::sync::OnceLock<std::result::Result<Option<Algo>, String>> =
            std::sync::OnceLock::new();
        ALGO.get_or_init(|| {
            let Some(v) = std::env::var_os("FREQTAG_CUDNN_ALGO") else {
                return Ok(None);
            };
            let v = v.to_string_lossy().to_lowercase();
            let names = [
                (
                    "implicit_gemm",
                    Algo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
                ),
                (
                    "implicit_precomp_gemm",
                    Algo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
                ),
                ("gemm", Algo::CUDNN_CONVOLUTION_FWD_ALGO_GEMM),
                ("direct", Algo::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT),
                ("fft", Algo::CUDNN_CONVOLUTION_FWD_ALGO_FFT),
                ("fft_tiling", Algo::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING),
                ("winograd", Algo::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD),
                (
                    "winograd_nonfused",
                    Algo::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
                ),
            ];
            match names.iter().find(|(n, _)| *n == v) {
                Some((_, a)) => Ok(Some(*a)),
                None => Err(format!(
                    "FREQTAG_CUDNN_ALGO={v}: not a cuDNN forward algorithm; use one of {}",
                    names.map(|(n, _)| n).join(", ")
                )),
            }
        })
        .clone()
        .map_err(candle_core::Error::Msg)
    }

    impl CudnnConv {
        fn plan<T: CudnnDataType>(
            &self,
            handle: &Arc<Cudnn>,
            [b, h, wd, c, co, kh, kw, s, p, _]: [usize; 10],
            math: sys::cudnnMathType_t,
        ) -> Result<Plan<T>> {
            let i = |v: usize| v as std::ffi::c_int;
            let (ho, wo) = ((h + 2 * p - kh) / s + 1, (wd + 2 * p - kw) / s + 1);
            let mut conv = handle
                .create_conv2d::<f32>(
                    [i(p), i(p)],
                    [i(s), i(s)],
                    [1, 1],
                    sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                )
                .map_err(|e| err("convolution", e))?;
            conv.set_math_type(math).map_err(|e| err("math type", e))?;
            conv.set_group_count(i(self.groups))
                .map_err(|e| err("groups", e))?;
            // dims in (n, c, h, w) order whatever the format
            let format = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC;
            let x = handle
                .create_4d_tensor::<T>(format, [i(b), i(c), i(h), i(wd)])
                .map_err(|e| err("input", e))?;
            let w = handle
                .create_4d_filter::<T>(format, [i(co), i(c / self.groups), i(kh), i(kw)])
                .map_err(|e| err("filter", e))?;
            let y = handle
                .create_4d_tensor::<T>(format, [i(b), i(co), i(ho), i(wo)])
                .map_err(|e| err("output", e))?;
            Ok(Plan {
                conv,
                x,
                w,
                y,
                algo: None,
            })
        }

        fn launch<T>(
            &self,
            x: (&CudaStorage, &Layout),
            w: (&CudaStorage, &Layout),
            math: sys::cudnnMathType_t,
        ) -> Result<(CudaStorage, Shape)>
        where
            T: CudaDType
                + DeviceRepr
                + ValidAsZeroBits
                + CudnnDataType
                + candle_core::WithDType
                + 'static,
        {
            let dev = x.0.device().clone();
            // with FREQTAG_GPU_PROFILE, the host's part apart: descriptors, algorithm, output
            let setup = crate::model::profile::enabled()
                .then(|| dev.synchronize().map(|_| std::time::Instant::now()))
                .transpose()?;
            let (b, h, wd, c) = x.1.shape().dims4()?;
            let (co, kh, kw, cg) = w.1.shape().dims4()?;
            if cg * self.groups != c || (self.groups != 1 && self.groups != co) {
                candle_core::bail!(
                    "cudnn-conv: weight {:?} for input {:?} in {} groups",
                    w.1.shape(),
                    x.1.shape(),
                    self.groups
                )
            }
            let (p, s) = (self.pad, self.stride);
            if h + 2 * p < kh || wd + 2 * p < kw {
                candle_core::bail!(
                    "cudnn-conv: input {:?} smaller than the kernel",
                    x.1.shape()
                )
            }
            let (ho, wo) = ((h + 2 * p - kh) / s + 1, (wd + 2 * p - kw) / s + 1);
            let (Some((xo, _)), Some((wo_, _))) =
                (x.1.contiguous_offsets(), w.1.contiguous_offsets())
            else {
                candle_core::bail!("cudnn-conv: contiguous input and weight expected")
            };
            let xs = T::as_cuda_slice(x.0)?.slice(xo..);
            let ws = T::as_cuda_slice(w.0)?.slice(wo_..);
            let handle = HANDLES.with(|hs| -> Result<Arc<Cudnn>> {
                if let Some(h) = hs.borrow().get(&dev.id()) {
                    return Ok(h.clone());
                }
                let h = Cudnn::new(dev.cuda_stream()).map_err(|e| err("handle", e))?;
                hs.borrow_mut().insert(dev.id(), h.clone());
                Ok(h)
            })?;
            let key: Key = (T::DTYPE, [b, h, wd, c, co, kh, kw, s, p, self.groups]);
            // the plan is taken out of the map while it is used and put back after, so the
            // map is not borrowed across the launch
            let plan = PLANS.with(|m| m.borrow_mut().remove(&key));
            let mut plan: Box<Plan<T>> = match plan.map(|p| p.downcast::<Plan<T>>()) {
                Some(Ok(p)) => p,
                _ => Box::new(self.plan::<T>(&handle, key.1, math)?),
            };
            // SAFETY: every element of `y` is written by the convolution (beta = 0).
            let mut y = unsafe { dev.alloc::<T>(b * ho * wo * co)? };
            if let Some(t) = setup {
                dev.synchronize()?;
                crate::model::profile::add("cuDNN set-up", t.elapsed().as_secs_f64());
            }
            let ran = {
                let fwd = ConvForward {
                    conv: &plan.conv,
                    x: &plan.x,
                    w: &plan.w,
                    y: &plan.y,
                };
                // the algorithm FREQTAG_CUDNN_ALGO asks for, cuDNN's heuristic, then the
                // implicit GEMMs, which take any shape; the one that ran is kept for the shape
                let candidates = match plan.algo {
                    Some((a, _)) => vec![a],
                    None => {
                        let mut v: Vec<Algo> = forced_algo()?.into_iter().collect();
                        v.extend(fwd.pick_algorithm());
                        v.push(Algo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM);
                        v.push(Algo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM);
                        v
                    }
                };
                let mut failed = Vec::new();
                let mut ran = None;
                for algo in candidates {
                    let size = match plan.algo {
                        Some((_, size)) => size,
                        None => match fwd.get_workspace_size(algo) {
                            Ok(size) if size <= MAX_WORKSPACE => size,
                            Ok(size) => {
                                failed.push(format!("{algo:?}: {size} bytes of workspace"));
                                continue;
                            }
                            Err(e) => {
                                failed.push(format!("{algo:?}: {e:?}"));
                                continue;
                            }
                        },
                    };
                    // with FREQTAG_GPU_PROFILE, cuDNN's own time per shape, apart from the
                    // set-up around it that the "conv" entry includes
                    let timer = crate::model::profile::enabled()
                        .then(|| dev.synchronize().map(|_| std::time::Instant::now()))
                        .transpose()?;
                    let result = with_workspace(&dev, size, |workspace| {
                        // SAFETY: the descriptors describe xs, ws and y: NHWC, their dtype and
                        // dims (the plan's key holds every dim).
                        Ok(unsafe {
                            fwd.launch(
                                algo,
                                Some(workspace),
                                (T::from_f64(1.0), T::from_f64(0.0)),
                                &xs,
                                &ws,
                                &mut y,
                            )
                        })
                    })?;
                    if let Some(t) = timer {
                        dev.synchronize()?;
                        crate::model::profile::add(profile_name(&key), t.elapsed().as_secs_f64());
                    }
                    match result {
                        Ok(()) => {
                            if plan.algo.is_none() {
                                tracing::debug!(?key, ?algo, size, ?failed, "cuDNN convolution");
                            }
                            ran = Some((algo, size));
                            break;
                        }
                        Err(e) => failed.push(format!("{algo:?}: {e:?}")),
                    }
                }
                ran.ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "cuDNN has no convolution for input {:?}, weight {:?}: {}",
                        x.1.shape(),
                        w.1.shape(),
                        failed.join("; ")
                    ))
                })
            };
            let ran = ran?;
            plan.algo = Some(ran);
            PLANS.with(|m| m.borrow_mut().insert(key, plan));
            Ok((T::wrap_cuda_slice(y, dev), Shape::from((b, ho, wo, co))))
        }
    }

    impl CustomOp2 for CudnnConv {
        fn name(&self) -> &'static str {
            "cudnn-conv"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("cudnn-conv: the GPU convolution was called on the CPU")
        }

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            w: &CudaStorage,
            wl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            use sys::cudnnMathType_t as M;
            match x.dtype() {
                DType::F32 => self.launch::<f32>((x, xl), (w, wl), M::CUDNN_FMA_MATH),
                DType::F16 => self.launch::<half::f16>((x, xl), (w, wl), M::CUDNN_TENSOR_OP_MATH),
                DType::BF16 => self.launch::<half::bf16>((x, xl), (w, wl), M::CUDNN_TENSOR_OP_MATH),
                other => candle_core::bail!("cudnn-conv: {other:?} is not supported"),
            }
        }
    }
}

/// Whether passes' outputs are copied back into page-locked memory ([`PinnedTable`]; on unless
/// `FREQTAG_GPU_PAGEABLE=1`, kept for comparison).
pub fn pinned_copy_back() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("FREQTAG_GPU_PAGEABLE").is_none_or(|v| v == "0"))
}

thread_local! {
    /// The page-locked buffer of this thread's last [`PinnedTable`], kept for the next one.
    static KEPT: RefCell<Option<cudarc::driver::PinnedHostSlice<f32>>> = const { RefCell::new(None) };
}

/// Host memory, page-locked, that a group of images' passes are copied back into, one pass after
/// the other; its buffer is kept per thread (each worker's GPU thread) for the next group.
///
/// Why: a copy into ordinary (pageable) memory goes through the driver's staging buffers, and
/// into a fresh vector it also faults every page in on the way: on an H100's host (session 15's
/// one-worker profile) 1.0-1.3 GB/s, 83 ms of MobileNetV2's 243 ms a pass of 1 300 frames. Into
/// page-locked memory the GPU writes directly, and a kept buffer faults nothing in.
pub struct PinnedTable {
    buf: Option<cudarc::driver::PinnedHostSlice<f32>>,
    len: usize,
}

impl PinnedTable {
    /// An empty table, taking this thread's kept buffer if there is one.
    pub fn new() -> Self {
        PinnedTable {
            buf: KEPT.with(|k| k.borrow_mut().take()),
            len: 0,
        }
    }

    /// Makes room for `x`'s values after those already in the table, growing the buffer to
    /// `total` values at least where it is too small. An error here (the driver refusing more
    /// page-locked memory) leaves the table as it was.
    pub fn reserve_for(&mut self, x: &candle_core::Tensor, total: usize) -> Result<()> {
        let candle_core::Device::Cuda(dev) = x.device() else {
            candle_core::bail!("copy back: the tensor is not on a GPU")
        };
        let need = self.len + x.elem_count();
        if self.buf.as_ref().is_none_or(|b| b.len() < need) {
            let size = need.max(total);
            let ctx = dev.cuda_stream().context().clone();
            // SAFETY: only the first `len` values are read before they are written (below).
            // Flags 0: cached host memory, which the CPU reads back at full speed (cudarc's
            // `alloc_pinned` asks for write-combined memory, slow to read).
            let mut fresh = unsafe { ctx.alloc_pinned_with_flags::<f32>(size, 0) }
                .map_err(|e| candle_core::Error::Msg(format!("page-locked memory: {e:?}")))?;
            if self.len > 0 {
                let old = self.as_slice()?;
                let dst = fresh
                    .as_mut_slice()
                    .map_err(|e| candle_core::Error::Msg(format!("page-locked memory: {e:?}")))?;
                dst[..old.len()].copy_from_slice(old);
            }
            self.buf = Some(fresh);
        }
        Ok(())
    }

    /// Appends `x`'s values (f32, on a CUDA device, laid out contiguously) to the table, which
    /// grows (to `total` values at least) where its buffer is too small. Waits for the copy.
    pub fn append(&mut self, x: &candle_core::Tensor, total: usize) -> Result<()> {
        self.reserve_for(x, total)?;
        let candle_core::Device::Cuda(dev) = x.device() else {
            candle_core::bail!("copy back: the tensor is not on a GPU")
        };
        let n = x.elem_count();
        let need = self.len + n;
        let stream = dev.cuda_stream();
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cuda(s) = &*storage else {
            candle_core::bail!("copy back: the tensor is not on a GPU")
        };
        if !layout.is_contiguous() {
            candle_core::bail!("copy back: the tensor is not contiguous")
        }
        let src = s
            .as_cuda_slice::<f32>()?
            .slice(layout.start_offset()..layout.start_offset() + n);
        let buf = self.buf.as_mut().expect("allocated above");
        let dst = buf
            .as_mut_slice()
            .map_err(|e| candle_core::Error::Msg(format!("page-locked memory: {e:?}")))?;
        stream
            .memcpy_dtoh(&src, &mut dst[self.len..need])
            .map_err(|e| candle_core::Error::Msg(format!("copy back: {e:?}")))?;
        // the copy is asynchronous into a plain slice: the values are there once the stream is
        stream
            .synchronize()
            .map_err(|e| candle_core::Error::Msg(format!("copy back: {e:?}")))?;
        self.len = need;
        Ok(())
    }

    /// The values appended so far.
    pub fn as_slice(&self) -> Result<&[f32]> {
        match &self.buf {
            None => Ok(&[]),
            Some(b) => b
                .as_slice()
                .map(|s| &s[..self.len])
                .map_err(|e| candle_core::Error::Msg(format!("page-locked memory: {e:?}"))),
        }
    }
}

impl Default for PinnedTable {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinnedTable {
    fn drop(&mut self) {
        // the larger of this table's buffer and one kept meanwhile stays for the next table
        if let Some(b) = self.buf.take() {
            KEPT.with(|k| {
                let mut k = k.borrow_mut();
                if k.as_ref().is_none_or(|old| old.len() < b.len()) {
                    *k = Some(b);
                }
            });
        }
    }
}
