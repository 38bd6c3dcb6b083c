#!/usr/bin/env bash
# Builds freqtag with the `cuda` feature on a machine without a GPU, for a GPU machine to run.
#
#   scripts/build-cuda.sh            -> target/cuda/release/freqtag, with cuDNN's convolutions
#   FREQTAG_FEATURES=cuda scripts/build-cuda.sh      the same without cuDNN
#
# CUDA's compiler and libraries come from PyPI into .cuda-toolchain/ (about 1.2 GB, once).
# The version is pinned to CUDA 13.0 (CUDA_PIP_VERSION) so that the PTX it writes loads on
# drivers from 580 on; set CUDA_COMPUTE_CAP for the card (90 = H100/H200, the default).
# libcuda.so comes with the driver on the GPU machine; here the linker gets a stub with the
# same soname, built from the driver functions cudarc declares. At run time the binary needs
# libcublas.so.13, libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13, libcudart.so.13 and
# (with cuDNN) libcudnn.so.9 on LD_LIBRARY_PATH (PyTorch's cu13 wheels carry them; scripts/gpu-check.sh finds them).
set -euo pipefail
cd "$(dirname "$0")/.."
TC=${CUDA_TOOLCHAIN:-$PWD/.cuda-toolchain}
V=${CUDA_PIP_VERSION:-13.0.88}
if [ ! -x "$TC/bin/pip" ]; then python3 -m venv "$TC"; fi
SITE=$("$TC/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
CU=$SITE/nvidia/cu13
if [ "$("$TC/bin/pip" show nvidia-nvvm 2>/dev/null | sed -n "s/^Version: //p")" != "$V" ]; then
    echo "build-cuda: installing CUDA $V from PyPI into $TC" >&2
    "$TC/bin/pip" install -q "nvidia-cuda-nvcc==$V" "nvidia-cuda-crt==$V" \
        "nvidia-cuda-nvrtc==$V" "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85" \
        "nvidia-nvvm==$V" "nvidia-curand==10.4.0.35" "nvidia-cublas==13.0.2.14"
fi

LINK=$PWD/target/cuda-link
mkdir -p "$LINK"
for l in cudart:13 nvrtc:13 curand:10 cublas:13 cublasLt:13; do
    ln -sf "$CU/lib/lib${l%%:*}.so.${l##*:}" "$LINK/lib${l%%:*}.so"
done
# the driver stub: every cu* function cudarc's driver bindings name, returning an error
# (cudarc's sources come with `cargo fetch`: a fresh machine that only built without CUDA
# does not have them yet)
cargo fetch --quiet
CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | tail -1)
grep -ohE 'pub unsafe fn cu[A-Za-z0-9_]+\(' "$CUDARC/src/driver/sys/mod.rs" |
    sed -E 's/pub unsafe fn (cu[A-Za-z0-9_]+)\(/int \1(void) { return 999; }/' | sort -u >"$LINK/cuda_stub.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so" "$LINK/cuda_stub.c"
# cuDNN (the `cudnn` feature, on by default here): a stub of the same kind, soname libcudnn.so.9;
# the GPU machine's own cuDNN 9 (PyTorch's wheels carry one) is loaded at run time
grep -ohE 'pub unsafe fn cudnn[A-Za-z0-9_]+\(' "$CUDARC/src/cudnn/sys/mod.rs" |
    sed -E 's/pub unsafe fn (cudnn[A-Za-z0-9_]+)\(/int \1(void) { return 999; }/' | sort -u >"$LINK/cudnn_stub.c"
cc -shared -fPIC -Wl,-soname,libcudnn.so.9 -o "$LINK/libcudnn.so" "$LINK/cudnn_stub.c"

export PATH=$CU/bin:$PATH CUDA_HOME=$CU CUDA_ROOT=$CU CUDA_PATH=$CU
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CUDARC_CUDA_VERSION=13000
export LIBRARY_PATH=$LINK${LIBRARY_PATH:+:$LIBRARY_PATH}
export RUSTFLAGS="-L native=$LINK ${RUSTFLAGS:-}"
# freqtag's own kernels are CUDA C that NVRTC compiles on the GPU machine at run time: compile
# them here first with nvcc, so that an error in them shows now, not in the GPU's few minutes
python3 - src/model/gpu_kernels.rs "$LINK/kernels.cu" <<'PY'
import sys
s = open(sys.argv[1]).read()
start = s.index('r#"', s.index("const SOURCE")) + 3
open(sys.argv[2], "w").write(s[start:s.index('"#', start)])
PY
nvcc -ptx -arch="sm_$CUDA_COMPUTE_CAP" -o "$LINK/kernels.ptx" "$LINK/kernels.cu" ||
    { echo "build-cuda: freqtag's GPU kernels (src/model/gpu_kernels.rs, SOURCE) do not compile" >&2; exit 1; }
# and with NVRTC itself, as the binary does at run time (cudarc's compile_ptx: no headers, no
# options); NVRTC is a host library, so this runs here too
LD_LIBRARY_PATH=$CU/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} python3 - "$CU/lib/libnvrtc.so.13" "$LINK/kernels.cu" <<'PY' ||
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
prog = ctypes.c_void_p()
if lib.nvrtcCreateProgram(ctypes.byref(prog), open(sys.argv[2], "rb").read(), b"kernels.cu", 0, None, None):
    sys.exit("nvrtcCreateProgram failed")
status = lib.nvrtcCompileProgram(prog, 0, None)
size = ctypes.c_size_t()
lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
log = ctypes.create_string_buffer(size.value)
lib.nvrtcGetProgramLog(prog, log)
if status:
    sys.exit(f"NVRTC error {status}:\n{log.value.decode()}")
PY
    { echo "build-cuda: NVRTC does not compile freqtag's GPU kernels (src/model/gpu_kernels.rs, SOURCE)" >&2; exit 1; }
cargo build --release --features "${FREQTAG_FEATURES:-cudnn}" --target-dir target/cuda "$@"
echo "build-cuda: target/cuda/release/freqtag (compute capability $CUDA_COMPUTE_CAP)" >&2
