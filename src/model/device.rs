//! Where the forward passes run and in what precision: `model.device` (`cpu`, `cuda`,
//! `cuda:N`) and `model.dtype` (`f32`; `f16` or `bf16` on a GPU).
//!
//! A binary built without the `cuda` feature names the build command instead of failing
//! somewhere inside candle; a GPU that cannot be opened is named with what to check.

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// A parsed `model.device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU kernels.
    Cpu,
    /// CUDA GPU `N`.
    Cuda(usize),
}

/// Whether this binary was built with CUDA.
pub const HAS_CUDA: bool = cfg!(feature = "cuda");

/// How to get a binary that has CUDA.
pub const CUDA_BUILD_HINT: &str = "build one with `scripts/build-cuda.sh` (or `cargo build --release --features cuda` where nvcc and the CUDA libraries are installed)";

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> std::result::Result<DeviceSpec, String> {
    match s.trim() {
        "cpu" => Ok(DeviceSpec::Cpu),
        "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(DeviceSpec::Cuda)
            .ok_or_else(|| {
                format!("model.device = \"{other}\" is not a device: use \"cpu\", \"cuda\" or \"cuda:N\"")
            }),
    }
}

/// Parses `f32`, `f16` or `bf16`.
pub fn parse_dtype(s: &str) -> std::result::Result<DType, String> {
    match s.trim() {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" | "half" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(format!(
            "model.dtype = \"{other}\" is not a precision: use \"f32\", \"f16\" or \"bf16\""
        )),
    }
}

/// Every problem with a device and dtype pair, for `validate`.
pub fn check(device: &str, dtype: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let dev = parse_device(device).map_err(|e| problems.push(e)).ok();
    let dt = parse_dtype(dtype).map_err(|e| problems.push(e)).ok();
    if let (Some(DeviceSpec::Cpu), Some(dt)) = (dev, dt) {
        if dt != DType::F32 {
            problems.push(format!(
                "model.dtype = \"{dtype}\" runs on a GPU only (the CPU kernels compute in f32): set model.device = \"cuda\" or model.dtype = \"f32\""
            ));
        }
    }
    if let Some(DeviceSpec::Cuda(_)) = dev {
        if !HAS_CUDA {
            problems.push(format!(
                "model.device = \"{device}\": this freqtag was built without CUDA; {CUDA_BUILD_HINT}"
            ));
        }
    }
    problems
}

/// Opens `spec`.
pub fn open(spec: DeviceSpec) -> Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(n) => open_cuda(n),
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(n: usize) -> Result<Device> {
    let dev = Device::new_cuda(n).map_err(|e| {
        // candle appends a backtrace: the first line says what failed
        let e = e.to_string();
        let what = e.lines().next().unwrap_or_default().trim_end_matches('(').trim();
        Error::Device {
            msg: format!(
                "cuda:{n} could not be opened ({what}): check that `nvidia-smi` lists it, that the driver is 580 or newer (CUDA 13), and that libcublas, libcurand and libnvrtc of CUDA 13 are on LD_LIBRARY_PATH"
            ),
        }
    })?;
    if let Device::Cuda(d) = &dev {
        tune_cuda(d);
    }
    Ok(dev)
}

/// Three settings of the CUDA context that suit many worker threads sharing one GPU, each
/// skipped with a warning if the driver refuses it (none changes a result):
///
/// - No event tracking. cudarc records an event on every buffer a kernel reads or writes and
///   makes the stream wait on the buffer's last writer's event, and creates two events per
///   allocation, so that work on several streams is ordered. candle's device works on CUDA's
///   per-thread default stream, so each thread has its own. Each worker's GPU thread runs
///   everything of its passes (candle's kernels, cuBLAS, cuDNN, freqtag's NVRTC kernels, the
///   stimulus it uploads, copies and frees) on its stream, which orders them already. The one
///   buffers shared across threads are the weights, read-only once the network is built on
///   the main thread, which then waits for its stream (`Network::from_tensors_on`). So the
///   tracking is two to four driver calls per kernel argument, every one taking the context's
///   lock, for nothing. `FREQTAG_GPU_EVENTS=1` keeps it: on an H100 (session 13) 153 against
///   163 images/s for MobileNetV2 and 1 516 against 1 570 for the paper pipeline, in f32.
/// - Threads waiting for the GPU sleep instead of spinning. With fewer contexts than CPU
///   cores the driver spins by default, and a worker waiting for its pass then holds a core
///   that the other workers' spectra and writes need (`FREQTAG_GPU_SPIN=1` keeps spinning).
/// - The default memory pool keeps freed memory instead of handing it back to the driver at
///   every synchronisation: candle allocates each op's output afresh, and a pass of thousands
///   of frames frees and re-allocates hundreds of megabytes.
#[cfg(feature = "cuda")]
fn tune_cuda(d: &candle_core::CudaDevice) {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let stream = d.cuda_stream();
    let ctx = stream.context();
    if std::env::var_os("FREQTAG_GPU_EVENTS").is_none_or(|v| v == "0") {
        // SAFETY: every buffer is used on the stream of the thread that made it, except the
        // weights, which are complete before any other thread reads them (see above); buffers
        // allocated before this call keep their events, which only costs time.
        unsafe { d.disable_event_tracking() };
    }
    if std::env::var_os("FREQTAG_GPU_SPIN").is_none_or(|v| v == "0") {
        if let Err(e) = ctx.set_blocking_synchronize() {
            tracing::warn!(error = ?e, "the GPU context kept spinning while waiting");
        }
    }
    let mut pool = std::ptr::null_mut();
    // SAFETY: plain driver calls on the context's device with valid out-pointers.
    let status = unsafe {
        let s = sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device());
        if s == sys::CUresult::CUDA_SUCCESS {
            let mut keep = u64::MAX;
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut keep as *mut u64).cast(),
            )
        } else {
            s
        }
    };
    if status != sys::CUresult::CUDA_SUCCESS {
        tracing::warn!(
            ?status,
            "the GPU memory pool hands freed memory back to the driver"
        );
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(n: usize) -> Result<Device> {
    Err(Error::Device {
        msg: format!("cuda:{n}: this freqtag was built without CUDA; {CUDA_BUILD_HINT}"),
    })
}

/// Free memory of `dev`'s GPU in bytes (after the network's weights were loaded); `None` on
/// the CPU or where the driver does not say.
pub fn free_memory(dev: &Device) -> Option<u64> {
    match dev {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            use candle_core::cuda_backend::cudarc::driver::result;
            let stream = d.cuda_stream();
            stream.context().bind_to_thread().ok()?;
            result::mem_get_info().ok().map(|(free, _)| free as u64)
        }
        _ => None,
    }
}

/// A name for the device in summaries: `cpu` or the GPU's `cuda:N`.
pub fn describe(spec: DeviceSpec) -> String {
    match spec {
        DeviceSpec::Cpu => "cpu".into(),
        DeviceSpec::Cuda(n) => format!("cuda:{n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_dtypes_parse_and_bad_ones_are_named() {
        assert_eq!(parse_device("cpu"), Ok(DeviceSpec::Cpu));
        assert_eq!(parse_device("cuda"), Ok(DeviceSpec::Cuda(0)));
        assert_eq!(parse_device("cuda:3"), Ok(DeviceSpec::Cuda(3)));
        assert!(parse_device("cuda:x").unwrap_err().contains("\"cuda:x\""));
        assert!(parse_device("tpu").is_err());
        assert_eq!(parse_dtype("bf16"), Ok(DType::BF16));
        assert!(parse_dtype("f64").unwrap_err().contains("f64"));
        // half precision on the CPU is refused with the setting named
        let p = check("cpu", "f16");
        assert!(p.iter().any(|m| m.contains("model.dtype")), "{p:?}");
        assert!(check("cpu", "f32").is_empty());
        let p = check("cuda:0", "f32");
        assert_eq!(p.is_empty(), HAS_CUDA, "{p:?}");
        if !HAS_CUDA {
            assert!(p[0].contains("--features cuda"), "{p:?}");
            assert!(open(DeviceSpec::Cuda(0))
                .unwrap_err()
                .to_string()
                .contains("built without CUDA"));
        }
    }
}
