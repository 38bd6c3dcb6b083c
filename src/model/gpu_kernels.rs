//! freqtag's own GPU kernels: their CUDA C source, which NVRTC compiles at run time on a GPU
//! ([`super::cuda_ops`], `cuda` feature), and the launch shapes the host gives them. Both are
//! compiled without the feature too, so that the tests run the kernels on the CPU: the test
//! `gpu_kernels_on_the_cpu` builds [`SOURCE`] as C++ with a thread per CUDA thread and a barrier
//! per `__syncthreads`, launches it in the shapes below and checks every output against the CPU
//! layers. (What only a GPU shows, NVRTC's compilation included, `scripts/build-cuda.sh` and
//! `scripts/gpu-check.sh` check.)

/// A kernel launch: blocks in the grid and threads in a block, x fastest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    /// Blocks per dimension.
    pub grid: (u32, u32, u32),
    /// Threads per block per dimension.
    pub block: (u32, u32, u32),
}

/// Elementwise kernels (`scale_shift_act`, `depthwise`): one thread per element, at most 32
/// blocks of 256 per multiprocessor of an H100 (grid-stride loops).
pub fn flat(n: usize) -> Launch {
    Launch {
        grid: (n.div_ceil(256).clamp(1, 132 * 32) as u32, 1, 1),
        block: (256, 1, 1),
    }
}

/// `spatial_mean` of `b` frames of `c` channels: blocks of 32 channels and 8 pixel lanes, one
/// row of blocks per frame (at most 65 535 frames).
pub fn spatial_mean(b: usize, c: usize) -> Launch {
    Launch {
        grid: (c.div_ceil(32) as u32, b as u32, 1),
        block: (32, 8, 1),
    }
}

/// `scale_shift_act_mean` of `b` frames of `c` channels: blocks of 256 threads, `cw` channels
/// (8, 16 or 32: the fewest of those that holds `c`, so that narrow layers leave fewer threads
/// idle) by `256 / cw` pixel lanes, one row of blocks per frame (at most 65 535 frames).
pub fn scale_shift_act_mean(b: usize, c: usize) -> Launch {
    let cw: u32 = match c {
        0..=8 => 8,
        9..=16 => 16,
        _ => 32,
    };
    Launch {
        grid: (c.div_ceil(cw as usize) as u32, b as u32, 1),
        block: (cw, 256 / cw, 1),
    }
}

/// The kernels, in CUDA C for NVRTC (no headers), each instantiated for f32, f16 and bf16 as
/// `{name}_f32`, `{name}_f16` and `{name}_bf16`, computing in f32.
pub const SOURCE: &str = r#"
// f16 and bf16 as 16-bit words, converted with PTX and bit operations: NVRTC gets no headers
struct h16 { unsigned short v; };
struct b16 { unsigned short v; };
__device__ __forceinline__ float ld(const float* p, unsigned long long i) { return p[i]; }
__device__ __forceinline__ float ld(const h16* p, unsigned long long i) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(p[i].v)); return f;
}
__device__ __forceinline__ float ld(const b16* p, unsigned long long i) {
    return __uint_as_float(((unsigned int)p[i].v) << 16);
}
__device__ __forceinline__ void st(float* p, unsigned long long i, float f) { p[i] = f; }
__device__ __forceinline__ void st(h16* p, unsigned long long i, float f) {
    unsigned short u; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(u) : "f"(f)); p[i].v = u;
}
__device__ __forceinline__ void st(b16* p, unsigned long long i, float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) { p[i].v = 0x7fc0; return; }
    u += 0x7fffu + ((u >> 16) & 1u);   // round to nearest, ties to even
    p[i].v = (unsigned short)(u >> 16);
}

// y = act(x * scale + shift [+ r]), channels last: ss holds c scales then c shifts
template <typename T>
__device__ void scale_shift_act(const T* x, const float* ss, const T* r, T* y,
                                unsigned long long n, unsigned int c, int act) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned long long step = (unsigned long long)gridDim.x * blockDim.x;
    for (; i < n; i += step) {
        // 32-bit remainder where the index fits: 64-bit division is emulated
        unsigned int ch = n <= 0xffffffffULL ? (unsigned int)i % c : (unsigned int)(i % c);
        float v = __fadd_rn(__fmul_rn(ld(x, i), ss[ch]), ss[c + ch]);
        if (r != 0) v = __fadd_rn(v, ld(r, i));
        if (act == 1) v = fmaxf(v, 0.0f);
        else if (act == 2) v = fminf(fmaxf(v, 0.0f), 6.0f);
        st(y, i, v);
    }
}

// depthwise k x k, channels last: x [b, h, w, c], weight [c, k, k] (f32), y [b, ho, wo, c];
// every index fits 32 bits (the host checks)
template <typename T>
__device__ void depthwise(const T* x, const float* wt, T* y, unsigned int b, unsigned int h,
                          unsigned int w, unsigned int c, unsigned int ho, unsigned int wo,
                          unsigned int k, unsigned int s, unsigned int p) {
    unsigned int n = b * ho * wo * c;
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        unsigned int ch = i % c, pix = i / c;
        unsigned int ox = pix % wo, t = pix / wo;
        unsigned int oy = t % ho, bi = t / ho;
        float acc = 0.0f;
        for (unsigned int ky = 0; ky < k; ++ky) {
            int iy = (int)(oy * s + ky) - (int)p;
            if (iy < 0 || iy >= (int)h) continue;
            for (unsigned int kx = 0; kx < k; ++kx) {
                int ix = (int)(ox * s + kx) - (int)p;
                if (ix < 0 || ix >= (int)w) continue;
                acc = fmaf(ld(x, ((bi * h + (unsigned int)iy) * w + (unsigned int)ix) * c + ch),
                           wt[(ch * k + ky) * k + kx], acc);
            }
        }
        st(y, i, acc);
    }
}

// mean over the hw pixels of x [b, hw, c] -> y [b, c] in f32, summed in f64 in a fixed order;
// block (32 channels, 8 pixel lanes), grid (c / 32 rounded up, b)
template <typename T>
__device__ void spatial_mean(const T* x, float* y, unsigned int hw, unsigned int c) {
    __shared__ double part[8][33];
    unsigned int cl = threadIdx.x, g = threadIdx.y, ch = blockIdx.x * 32 + cl;
    unsigned long long base = (unsigned long long)blockIdx.y * hw * c;
    double sum = 0.0;
    if (ch < c) {
        for (unsigned int q = g; q < hw; q += 8) sum += (double)ld(x, base + (unsigned long long)q * c + ch);
    }
    part[g][cl] = sum;
    __syncthreads();
    if (g == 0 && ch < c) {
        double t = 0.0;
        for (int j = 0; j < 8; ++j) t += part[j][cl];
        y[(unsigned long long)blockIdx.y * c + ch] = (float)(t / (double)hw);
    }
}

// batch norm, residual and activation as scale_shift_act, and the spatial mean of x (what the
// tap records: the convolution's output, before batch norm) as spatial_mean, in one pass over x:
// x [b, hw, c] -> y [b, hw, c] and mean [b, c] (f32, summed in f64 in a fixed order; r may be
// null). Block (cw channels, 256 / cw pixel lanes) with cw 8, 16 or 32 (the host's
// mean_launch), grid (c / cw rounded up, b)
template <typename T>
__device__ void scale_shift_act_mean(const T* x, const float* ss, const T* r, T* y, float* mean,
                                     unsigned int hw, unsigned int c, int act) {
    __shared__ double part[288];   // lanes x (cw + 1) for cw >= 8: at most 32 x 9
    unsigned int cw = blockDim.x, lanes = blockDim.y;
    unsigned int cl = threadIdx.x, g = threadIdx.y, ch = blockIdx.x * cw + cl;
    unsigned long long base = (unsigned long long)blockIdx.y * hw * c;
    double sum = 0.0;
    if (ch < c) {
        float s = ss[ch], t = ss[c + ch];
        for (unsigned int q = g; q < hw; q += lanes) {
            unsigned long long i = base + (unsigned long long)q * c + ch;
            float v = ld(x, i);
            sum += (double)v;
            float o = __fadd_rn(__fmul_rn(v, s), t);
            if (r != 0) o = __fadd_rn(o, ld(r, i));
            if (act == 1) o = fmaxf(o, 0.0f);
            else if (act == 2) o = fminf(fmaxf(o, 0.0f), 6.0f);
            st(y, i, o);
        }
    }
    part[g * (cw + 1) + cl] = sum;
    __syncthreads();
    if (g == 0 && ch < c) {
        double t = 0.0;
        for (unsigned int j = 0; j < lanes; ++j) t += part[j * (cw + 1) + cl];
        mean[(unsigned long long)blockIdx.y * c + ch] = (float)(t / (double)hw);
    }
}

#define INSTANCES(T, NAME) \
extern "C" __global__ void scale_shift_act_##NAME(const T* x, const float* ss, const T* r, T* y, \
        unsigned long long n, unsigned int c, int act) { scale_shift_act(x, ss, r, y, n, c, act); } \
extern "C" __global__ void depthwise_##NAME(const T* x, const float* wt, T* y, unsigned int b, \
        unsigned int h, unsigned int w, unsigned int c, unsigned int ho, unsigned int wo, \
        unsigned int k, unsigned int s, unsigned int p) { depthwise(x, wt, y, b, h, w, c, ho, wo, k, s, p); } \
extern "C" __global__ void spatial_mean_##NAME(const T* x, float* y, unsigned int hw, unsigned int c) { \
        spatial_mean(x, y, hw, c); } \
extern "C" __global__ void scale_shift_act_mean_##NAME(const T* x, const float* ss, const T* r, \
        T* y, float* mean, unsigned int hw, unsigned int c, int act) { \
        scale_shift_act_mean(x, ss, r, y, mean, hw, c, act); }
INSTANCES(float, f32)
INSTANCES(h16, f16)
INSTANCES(b16, bf16)
"#;
