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

/// Input channels per step of [`conv3x3`]'s loop through shared memory (`CONV_CK` in the source).
pub const CONV_CK: usize = 8;

/// Shared memory a block may take without asking the driver for more.
const SHARED_MAX: usize = 48 * 1024;

/// How `conv3x3` covers an output `[b, ho, wo, cout]`: each block computes `rows` output rows of
/// `frames` frames (whole frames where a frame is small) for up to 64 output channels, with
/// `shared` bytes of dynamic shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvTile {
    pub launch: Launch,
    pub frames: usize,
    pub rows: usize,
    pub shared: usize,
}

/// The launch of `conv3x3` (3x3, padding 1, stride `s`) from `cin` channels to `b` frames of
/// output `ho x wo x cout`, or `None` where the kernel does not apply: `cin` not a multiple of
/// [`CONV_CK`] or `cout` of 16, or an output row too wide for a block's pixels and shared
/// memory. Threads are (32 pixel lanes, `py`, `cw / 16` channel groups), each computing 4 pixels
/// by 16 channels: a block holds `128 py` pixels, with `py` 4 (2 for 64 channels) or less where
/// the input rows would not fit.
pub fn conv3x3(
    b: usize,
    ho: usize,
    wo: usize,
    cin: usize,
    cout: usize,
    s: usize,
) -> Option<ConvTile> {
    let channels = cin > 0 && cin.is_multiple_of(CONV_CK) && cout > 0 && cout.is_multiple_of(16);
    if b == 0 || ho == 0 || wo == 0 || !channels || !(1..=2).contains(&s) {
        return None;
    }
    let cw = cout.min(64);
    let groups = cw / 16;
    let mut py = if groups > 2 { 2 } else { 4 };
    while py >= 1 {
        let m = 128 * py;
        let (frames, rows) = if ho * wo <= m {
            ((m / (ho * wo)).min(b), ho)
        } else {
            (1, (m / wo).min(ho))
        };
        if rows > 0 {
            let (ri, wi) = ((rows - 1) * s + 3, (wo - 1) * s + 3);
            let shared = (frames * ri * wi * CONV_CK + 9 * CONV_CK * cw) * 4;
            if shared <= SHARED_MAX {
                let tiles = b.div_ceil(frames) * ho.div_ceil(rows);
                return (tiles < 1 << 31).then_some(ConvTile {
                    launch: Launch {
                        grid: (tiles as u32, cout.div_ceil(cw) as u32, 1),
                        block: (32, py as u32, groups as u32),
                    },
                    frames,
                    rows,
                    shared,
                });
            }
        }
        py /= 2;
    }
    None
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

// dynamic shared memory, as floats (the CPU test defines its own)
#ifndef DYN_SHARED
#define DYN_SHARED(name) extern __shared__ float name[]
#endif
#define CONV_CK 8
struct alignas(16) f4 { float x, y, z, w; };

// 3x3 convolution, zero padding 1, stride s, channels last, in f32: x [b, h, w, cin], weights
// wt [9 cin, cout] (rows ordered ky, kx, cin), y [b, ho, wo, cout]; cin a multiple of 8, cout of
// 16, and x, wt and y aligned to 16 bytes. Launched as the host's conv3x3 tile says:
// blockIdx.x a group of `frames` frames and a tile of `rows` output rows,
// blockIdx.y 64 output channels (cw = 16 blockDim.z of them); thread (lane, py, qg) computes the
// block's pixels lane + 32 (py + blockDim.y j), j < 4, in order (frame, row, column), for the 16
// channels of group qg. Input channels CONV_CK at a time pass through shared memory: the block's
// input rows, zero padded, laid [c][frame][row][column] so that lanes read consecutive words,
// then the weights [tap][c][cw], read by every lane of a warp at once.
__device__ void conv3x3(float* smem, const float* x, const float* wt, float* y, unsigned int b,
        unsigned int h, unsigned int w, unsigned int cin, unsigned int ho, unsigned int wo,
        unsigned int cout, unsigned int s, unsigned int frames, unsigned int rows) {
    const unsigned int ri = (rows - 1) * s + 3, wi = (wo - 1) * s + 3, plane = frames * ri * wi;
    const unsigned int cw = 16 * blockDim.z;
    float* sx = smem;
    const f4* sw = (const f4*)(smem + plane * CONV_CK);
    const unsigned int lane = threadIdx.x, qg = threadIdx.z;
    const unsigned int nthreads = 32 * blockDim.y * blockDim.z;
    const unsigned int tid = lane + 32 * (threadIdx.y + blockDim.y * qg);
    const unsigned int tiles = (ho + rows - 1) / rows;
    const unsigned int f0 = (blockIdx.x / tiles) * frames, oy0 = (blockIdx.x % tiles) * rows;
    const unsigned int cb = blockIdx.y * cw;
    int off[4];   // each pixel's input position in shared memory (0 for no pixel)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        unsigned int m = lane + 32 * (threadIdx.y + blockDim.y * j);
        unsigned int f = m / (rows * wo), t = (m / wo) % rows, xx = m % wo;
        bool ok = f < frames && f0 + f < b && oy0 + t < ho;
        off[j] = ok ? (int)((f * ri + t * s) * wi + xx * s) : 0;
    }
    float acc[4][16];
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int q = 0; q < 16; ++q) acc[j][q] = 0.0f;
    for (unsigned int c0 = 0; c0 < cin; c0 += CONV_CK) {
        __syncthreads();
        // the input rows from oy0 s - 1 of each frame, zero outside the image, 4 channels a
        // load: positions q = tid / 2, then every nthreads / 2, of [frame][row][column]
        {
            const unsigned int half = nthreads / 2, c4 = tid & 1u;
            const unsigned int dc = half % wi, dr = half / wi;
            unsigned int q = tid >> 1;
            unsigned int col = q % wi, r = (q / wi) % ri, f = q / (wi * ri);
            for (; q < plane; q += half) {
                int iy = (int)(oy0 * s + r) - 1, ix = (int)col - 1;
                f4 v = {0.0f, 0.0f, 0.0f, 0.0f};
                if (f0 + f < b && iy >= 0 && iy < (int)h && ix >= 0 && ix < (int)w)
                    v = *(const f4*)(x + (((unsigned long long)(f0 + f) * h + (unsigned int)iy) * w
                                          + (unsigned int)ix) * cin + c0 + 4 * c4);
                float* d = sx + 4 * c4 * plane + q;
                d[0] = v.x;
                d[plane] = v.y;
                d[2 * plane] = v.z;
                d[3 * plane] = v.w;
                col += dc;
                r += dr;
                if (col >= wi) { col -= wi; ++r; }
                while (r >= ri) { r -= ri; ++f; }
            }
        }
        // the weights of these channels, [tap][c][cw], 4 output channels a load
        {
            const unsigned int cw4 = cw / 4;
            f4* swv = (f4*)(smem + plane * CONV_CK);
            for (unsigned int i = tid; i < 9 * CONV_CK * cw4; i += nthreads) {
                unsigned int co4 = i % cw4, rc = i / cw4;   // rc = tap CONV_CK + c
                unsigned int c = rc % CONV_CK, tap = rc / CONV_CK;
                swv[i] = *(const f4*)(wt + ((unsigned long long)tap * cin + c0 + c) * cout + cb
                                      + 4 * co4);
            }
        }
        __syncthreads();
#pragma unroll 2
        for (unsigned int c = 0; c < CONV_CK; ++c) {
            const float* xs = sx + c * plane;
#pragma unroll
            for (int tap = 0; tap < 9; ++tap) {
                const int d = (tap / 3) * (int)wi + tap % 3;
                float v[4];
#pragma unroll
                for (int j = 0; j < 4; ++j) v[j] = xs[off[j] + d];
                const f4* wv = sw + ((tap * CONV_CK + c) * cw + 16 * qg) / 4;
#pragma unroll
                for (int q4 = 0; q4 < 4; ++q4) {
                    const f4 u = wv[q4];
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        acc[j][4 * q4] = fmaf(v[j], u.x, acc[j][4 * q4]);
                        acc[j][4 * q4 + 1] = fmaf(v[j], u.y, acc[j][4 * q4 + 1]);
                        acc[j][4 * q4 + 2] = fmaf(v[j], u.z, acc[j][4 * q4 + 2]);
                        acc[j][4 * q4 + 3] = fmaf(v[j], u.w, acc[j][4 * q4 + 3]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        unsigned int m = lane + 32 * (threadIdx.y + blockDim.y * j);
        unsigned int f = m / (rows * wo), t = (m / wo) % rows, xx = m % wo;
        if (f >= frames || f0 + f >= b || oy0 + t >= ho) continue;
        f4* o = (f4*)(y + (((unsigned long long)(f0 + f) * ho + oy0 + t) * wo + xx) * cout + cb
                      + 16 * qg);
#pragma unroll
        for (int q4 = 0; q4 < 4; ++q4)
            o[q4] = f4{acc[j][4 * q4], acc[j][4 * q4 + 1], acc[j][4 * q4 + 2], acc[j][4 * q4 + 3]};
    }
}
// at most 128 registers a thread, so that two blocks of 256 threads share a multiprocessor (a
// few spilled). Without the bound (165 registers for sm_90, none spilled) it ran slower on an
// H100: 0.048 against 0.042 s for ResNet-32's 16-channel layers in a one-worker profile.
extern "C" __global__ void __launch_bounds__(256, 2) conv3x3_f32(const float* x, const float* wt,
        float* y, unsigned int b, unsigned int h, unsigned int w, unsigned int cin,
        unsigned int ho, unsigned int wo, unsigned int cout, unsigned int s, unsigned int frames,
        unsigned int rows) {
    DYN_SHARED(smem);
    conv3x3(smem, x, wt, y, b, h, w, cin, ho, wo, cout, s, frames, rows);
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
