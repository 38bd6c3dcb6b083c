//! freqtag's CUDA kernels (`src/model/gpu_kernels.rs`) run on the CPU: their source is built as
//! C++ with a small stand-in for CUDA's execution model (every thread of a block is an OS
//! thread, `__syncthreads` a barrier, `__shared__` memory a static shared by the block's
//! threads, blocks one after another), launched in the very shapes the GPU code gives them
//! (`gpu_kernels::flat`, `spatial_mean`, `scale_shift_act_mean`), and every output is checked
//! against a computation of its own in Rust. This checks the kernels' index arithmetic,
//! reductions and epilogues without a GPU; what only a GPU can show (NVRTC, the launch through
//! cudarc, speed) `scripts/build-cuda.sh` and `scripts/gpu-check.sh` check.
//!
//! Needs a C++20 compiler with `std::barrier` (`$CXX`, else `c++` or `g++`; GCC 11 or newer);
//! without one the test is skipped, loudly.

use freqtag::model::gpu_kernels::{self, Launch};
use std::path::{Path, PathBuf};
use std::process::Command;

/// CUDA's names, as the kernels use them, on the CPU.
const PRELUDE: &str = r#"
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>
#include <math.h>
struct dim3_ { unsigned int x, y, z; };
static dim3_ gridDim, blockDim;
static thread_local dim3_ blockIdx, threadIdx;
static std::barrier<>* block_barrier;
static void __syncthreads() { block_barrier->arrive_and_wait(); }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
// one block runs at a time: a static is the block's shared memory
#define __shared__ static
// the f16 and bf16 conversions are PTX; only the f32 instances run here
#define asm(...) ((void)0)
// dynamic shared memory: 48 KiB, past the launch's own size filled with NaN by the driver
alignas(16) static float dyn_shared[12288];
#define DYN_SHARED(name) float* name = dyn_shared
"#;

/// Runs kernels of one launch at a time, read from and written to files.
const DRIVER: &str = r#"
template <typename F> static void launch(dim3_ g, dim3_ b, F f) {
    gridDim = g; blockDim = b;
    unsigned int n = b.x * b.y * b.z;
    for (unsigned int z = 0; z < g.z; ++z) for (unsigned int y = 0; y < g.y; ++y)
    for (unsigned int x = 0; x < g.x; ++x) {
        std::barrier<> bar(n);
        block_barrier = &bar;
        std::vector<std::thread> ts;
        for (unsigned int tz = 0; tz < b.z; ++tz) for (unsigned int ty = 0; ty < b.y; ++ty)
        for (unsigned int tx = 0; tx < b.x; ++tx)
            ts.emplace_back([=] { blockIdx = {x, y, z}; threadIdx = {tx, ty, tz}; f(); });
        for (auto& t : ts) t.join();
    }
}
static std::vector<float> load(const std::string& dir, const char* name) {
    std::string p = dir + "/" + name;
    FILE* f = std::fopen(p.c_str(), "rb");
    if (!f) { std::fprintf(stderr, "missing %s\n", p.c_str()); std::exit(2); }
    std::vector<float> v;
    float x;
    while (std::fread(&x, 4, 1, f) == 1) v.push_back(x);
    std::fclose(f);
    return v;
}
static void save(const std::string& dir, const char* name, const std::vector<float>& v) {
    std::string p = dir + "/" + name;
    FILE* f = std::fopen(p.c_str(), "wb");
    std::fwrite(v.data(), 4, v.size(), f);
    std::fclose(f);
}
// argv: kernel, folder, grid x y z, block x y z, then the kernel's integer arguments
int main(int argc, char** argv) {
    std::string k = argv[1], dir = argv[2];
    dim3_ g = {(unsigned)atoi(argv[3]), (unsigned)atoi(argv[4]), (unsigned)atoi(argv[5])};
    dim3_ b = {(unsigned)atoi(argv[6]), (unsigned)atoi(argv[7]), (unsigned)atoi(argv[8])};
    std::vector<long long> a;
    for (int i = 9; i < argc; ++i) a.push_back(atoll(argv[i]));
    if (k == "scale_shift_act") {
        // a: n, c, act, residual (0/1)
        auto x = load(dir, "x"), ss = load(dir, "ss");
        std::vector<float> r = a[3] ? load(dir, "r") : std::vector<float>();
        std::vector<float> y(a[0], NAN);
        const float* rp = a[3] ? r.data() : nullptr;
        launch(g, b, [&] { scale_shift_act_f32(x.data(), ss.data(), rp, y.data(),
            (unsigned long long)a[0], (unsigned)a[1], (int)a[2]); });
        save(dir, "y", y);
    } else if (k == "depthwise") {
        // a: b, h, w, c, ho, wo, k, s, p
        auto x = load(dir, "x"), wt = load(dir, "w");
        std::vector<float> y(a[0] * a[4] * a[5] * a[3], NAN);
        launch(g, b, [&] { depthwise_f32(x.data(), wt.data(), y.data(), a[0], a[1], a[2], a[3],
            a[4], a[5], a[6], a[7], a[8]); });
        save(dir, "y", y);
    } else if (k == "spatial_mean") {
        // a: b, hw, c
        auto x = load(dir, "x");
        std::vector<float> y(a[0] * a[2], NAN);
        launch(g, b, [&] { spatial_mean_f32(x.data(), y.data(), a[1], a[2]); });
        save(dir, "mean", y);
    } else if (k == "scale_shift_act_mean") {
        // a: b, hw, c, act, residual (0/1)
        auto x = load(dir, "x"), ss = load(dir, "ss");
        std::vector<float> r = a[4] ? load(dir, "r") : std::vector<float>();
        std::vector<float> y(a[0] * a[1] * a[2], NAN), m(a[0] * a[2], NAN);
        const float* rp = a[4] ? r.data() : nullptr;
        launch(g, b, [&] { scale_shift_act_mean_f32(x.data(), ss.data(), rp, y.data(), m.data(),
            a[1], a[2], (int)a[3]); });
        save(dir, "y", y);
        save(dir, "mean", m);
    } else if (k == "conv3x3") {
        // a: b, h, w, cin, ho, wo, cout, s, frames, rows, then the shared memory's bytes
        auto x = load(dir, "x"), wt = load(dir, "w");
        std::vector<float> y(a[0] * a[4] * a[5] * a[6], NAN);
        if (a[10] > (long long)sizeof(dyn_shared)) { std::fprintf(stderr, "shared memory\n"); return 2; }
        for (size_t i = 0; i < sizeof(dyn_shared) / 4; ++i) dyn_shared[i] = NAN;
        launch(g, b, [&] { conv3x3_f32(x.data(), wt.data(), y.data(), a[0], a[1], a[2], a[3],
            a[4], a[5], a[6], a[7], a[8], a[9]); });
        for (size_t i = a[10] / 4; i < sizeof(dyn_shared) / 4; ++i)
            if (!std::isnan(dyn_shared[i])) { std::fprintf(stderr, "wrote past the shared memory\n"); return 2; }
        save(dir, "y", y);
    } else {
        std::fprintf(stderr, "unknown kernel %s\n", k.c_str());
        return 2;
    }
    return 0;
}
"#;

/// The kernels built as a CPU program, or `None` (said loudly) without a C++20 compiler: one
/// that cannot build a program using `std::barrier` is passed over, so that only the kernels'
/// own errors fail the test.
fn emulator(dir: &Path) -> Option<PathBuf> {
    let build = |cxx: &str, src: &Path, exe: &Path| {
        Command::new(cxx)
            .args(["-std=c++20", "-O1", "-pthread", "-w", "-o"])
            .arg(exe)
            .arg(src)
            .output()
    };
    let probe = dir.join("probe.cpp");
    std::fs::write(
        &probe,
        "#include <barrier>\nint main() { std::barrier<> b(1); b.arrive_and_wait(); }\n",
    )
    .unwrap();
    let src = dir.join("kernels_on_cpu.cpp");
    let text = format!("{PRELUDE}\n{}\n{DRIVER}", gpu_kernels::SOURCE);
    std::fs::write(&src, text).unwrap();
    let exe = dir.join("kernels_on_cpu");
    let compilers: Vec<String> = match std::env::var("CXX") {
        Ok(c) => vec![c],
        Err(_) => vec!["c++".into(), "g++".into()],
    };
    for cxx in compilers {
        if !build(&cxx, &probe, &dir.join("probe")).is_ok_and(|o| o.status.success()) {
            continue;
        }
        let out = build(&cxx, &src, &exe).unwrap();
        assert!(
            out.status.success(),
            "the GPU kernels do not build as C++ with {cxx}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return Some(exe);
    }
    eprintln!(
        "\n!!! SKIPPED gpu_kernels_on_the_cpu: no C++20 compiler with std::barrier (set CXX) !!!\n"
    );
    None
}

fn write(dir: &Path, name: &str, v: &[f32]) {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn read(dir: &Path, name: &str) -> Vec<f32> {
    std::fs::read(dir.join(name))
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// Runs `kernel` in `launch` with integer arguments `args` on the files in `dir`.
fn run(exe: &Path, dir: &Path, kernel: &str, launch: Launch, args: &[usize]) {
    let Launch { grid, block } = launch;
    let mut cmd = Command::new(exe);
    cmd.arg(kernel).arg(dir);
    for v in [grid.0, grid.1, grid.2, block.0, block.1, block.2] {
        cmd.arg(v.to_string());
    }
    for a in args {
        cmd.arg(a.to_string());
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{kernel}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Reproducible values in [-2, 2), some exactly zero.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            if i % 11 == 0 {
                0.0
            } else {
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            }
        })
        .collect()
}

/// `act(x * s + t [+ r])` rounded as the kernels (and the CPU layers) do: a product, then an
/// add, then the residual's add.
fn bn(v: f32, s: f32, t: f32, r: Option<f32>, act: usize) -> f32 {
    let mut o = v * s + t;
    if let Some(r) = r {
        o += r;
    }
    match act {
        1 => o.max(0.0),
        2 => o.clamp(0.0, 6.0),
        _ => o,
    }
}

/// Per-frame channel means of `[b, hw, c]`, summed in f64 pixel by pixel.
fn means(x: &[f32], b: usize, hw: usize, c: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(b * c);
    for f in 0..b {
        for ch in 0..c {
            let s: f64 = (0..hw).map(|q| x[(f * hw + q) * c + ch] as f64).sum();
            out.push((s / hw as f64) as f32);
        }
    }
    out
}

/// The kernels sum in another order than [`means`]: the same f32 but for a rounding tie.
fn assert_means(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-7 * w.abs().max(1e-3),
            "{what}: mean {i} is {g}, want {w}"
        );
    }
}

fn assert_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(
            g.to_bits(),
            w.to_bits(),
            "{what}: element {i} is {g}, want {w}"
        );
    }
}

#[test]
fn gpu_kernels_on_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let Some(exe) = emulator(dir) else { return };
    // shapes with channels below, at and past a block's width, and pixel counts that are not
    // multiples of the pixel lanes
    let shapes = [
        (3, 5, 7, 3),
        (2, 4, 4, 16),
        (2, 3, 5, 24),
        (3, 6, 5, 40),
        (1, 2, 2, 70),
        (2, 9, 8, 33),
    ];
    for (si, &(b, h, w, c)) in shapes.iter().enumerate() {
        let hw = h * w;
        let n = b * hw * c;
        let x = values(n, si as u64 + 1);
        let r = values(n, si as u64 + 101);
        let ss = values(2 * c, si as u64 + 201);
        write(dir, "x", &x);
        write(dir, "r", &r);
        write(dir, "ss", &ss);
        let want_mean = means(&x, b, hw, c);

        run(
            &exe,
            dir,
            "spatial_mean",
            gpu_kernels::spatial_mean(b, c),
            &[b, hw, c],
        );
        assert_means(
            &read(dir, "mean"),
            &want_mean,
            &format!("spatial_mean {b}x{h}x{w}x{c}"),
        );

        for act in 0..3 {
            for residual in [false, true] {
                let want: Vec<f32> = (0..n)
                    .map(|i| {
                        let ch = i % c;
                        bn(x[i], ss[ch], ss[c + ch], residual.then(|| r[i]), act)
                    })
                    .collect();
                let what = format!("{b}x{h}x{w}x{c}, act {act}, residual {residual}");
                let res = residual as usize;
                run(
                    &exe,
                    dir,
                    "scale_shift_act",
                    gpu_kernels::flat(n),
                    &[n, c, act, res],
                );
                assert_bits(&read(dir, "y"), &want, &format!("scale_shift_act {what}"));

                let launch = gpu_kernels::scale_shift_act_mean(b, c);
                run(
                    &exe,
                    dir,
                    "scale_shift_act_mean",
                    launch,
                    &[b, hw, c, act, res],
                );
                assert_bits(
                    &read(dir, "y"),
                    &want,
                    &format!("scale_shift_act_mean {what}"),
                );
                assert_means(&read(dir, "mean"), &want_mean, &format!("its mean, {what}"));
            }
        }

        // depthwise k x k, stride s, padding p; weights [c, k, k]
        for (k, s, p) in [(3, 1, 1), (3, 2, 1), (5, 2, 2)] {
            let (ho, wo) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
            let wt = values(c * k * k, si as u64 + 301 + k as u64);
            write(dir, "w", &wt);
            let mut want = vec![0f32; b * ho * wo * c];
            for f in 0..b {
                for oy in 0..ho {
                    for ox in 0..wo {
                        for ch in 0..c {
                            let mut acc = 0f32;
                            for ky in 0..k {
                                for kx in 0..k {
                                    let (iy, ix) = (
                                        (oy * s + ky) as isize - p as isize,
                                        (ox * s + kx) as isize - p as isize,
                                    );
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    let v = x[((f * h + iy as usize) * w + ix as usize) * c + ch];
                                    acc = v.mul_add(wt[(ch * k + ky) * k + kx], acc);
                                }
                            }
                            want[((f * ho + oy) * wo + ox) * c + ch] = acc;
                        }
                    }
                }
            }
            let args = [b, h, w, c, ho, wo, k, s, p];
            run(&exe, dir, "depthwise", gpu_kernels::flat(want.len()), &args);
            assert_bits(
                &read(dir, "y"),
                &want,
                &format!("depthwise {b}x{h}x{w}x{c} k{k} s{s} p{p}"),
            );
        }
    }
}

/// The 3x3 convolution (padding 1, stride `s`) of `x` `[b, h, w, cin]` by `wt` `[9 cin, cout]`,
/// summed as the kernel sums: input channel by channel, tap by tap within a channel, each term a
/// fused multiply-add (the kernel adds the padding's zeros, which changes no bit: a sum that
/// starts at +0 never becomes -0).
#[allow(clippy::too_many_arguments)]
fn conv3x3(
    x: &[f32],
    wt: &[f32],
    b: usize,
    h: usize,
    w: usize,
    cin: usize,
    cout: usize,
    s: usize,
) -> Vec<f32> {
    let (ho, wo) = ((h - 1) / s + 1, (w - 1) / s + 1);
    let mut y = vec![0f32; b * ho * wo * cout];
    for f in 0..b {
        for oy in 0..ho {
            for ox in 0..wo {
                for co in 0..cout {
                    let mut acc = 0f32;
                    for c in 0..cin {
                        for tap in 0..9 {
                            let (iy, ix) = (
                                (oy * s + tap / 3) as isize - 1,
                                (ox * s + tap % 3) as isize - 1,
                            );
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                continue;
                            }
                            let v = x[((f * h + iy as usize) * w + ix as usize) * cin + c];
                            acc = v.mul_add(wt[(tap * cin + c) * cout + co], acc);
                        }
                    }
                    y[((f * ho + oy) * wo + ox) * cout + co] = acc;
                }
            }
        }
    }
    y
}

#[test]
fn gpu_conv3x3_on_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let Some(exe) = emulator(dir) else { return };
    // (b, h, w, cin, cout, stride): several frames a block with the last group short, row tiles
    // with the last one short, rows that do not fill a block's pixels, one step of 8 input
    // channels or several, output channels in two blocks, stride 2, and a shape whose input rows
    // take fewer pixels a block to fit shared memory
    let shapes = [
        (3, 8, 8, 16, 16, 1),
        (5, 8, 8, 8, 64, 1),
        (2, 32, 32, 8, 16, 1),
        (2, 20, 24, 24, 32, 1),
        (2, 45, 40, 16, 16, 1),
        (3, 16, 16, 16, 32, 2),
        (2, 9, 9, 32, 128, 2),
        (1, 64, 64, 8, 32, 2),
    ];
    let mut fewer_pixels = false;
    for (si, &(b, h, w, cin, cout, s)) in shapes.iter().enumerate() {
        let (ho, wo) = ((h - 1) / s + 1, (w - 1) / s + 1);
        let tile =
            gpu_kernels::conv3x3(b, ho, wo, cin, cout, s).expect("a shape the kernel covers");
        fewer_pixels |= tile.launch.block.1 < if cout >= 64 { 2 } else { 4 };
        let x = values(b * h * w * cin, si as u64 + 401);
        let wt = values(9 * cin * cout, si as u64 + 501);
        write(dir, "x", &x);
        write(dir, "w", &wt);
        let args = [
            b,
            h,
            w,
            cin,
            ho,
            wo,
            cout,
            s,
            tile.frames,
            tile.rows,
            tile.shared,
        ];
        run(&exe, dir, "conv3x3", tile.launch, &args);
        let want = conv3x3(&x, &wt, b, h, w, cin, cout, s);
        let what = format!("conv3x3 {b}x{h}x{w}x{cin} -> {cout} s{s} ({tile:?})");
        assert_bits(&read(dir, "y"), &want, &what);
    }
    assert!(fewer_pixels, "no shape took the smaller blocks");
    // the host's step of input channels is the kernel's
    let step = format!("#define CONV_CK {}\n", gpu_kernels::CONV_CK);
    assert!(gpu_kernels::SOURCE.contains(&step), "{step}");
    // shapes it leaves to cuDNN
    assert_eq!(gpu_kernels::conv3x3(4, 8, 8, 16, 24, 1), None);
    assert_eq!(gpu_kernels::conv3x3(4, 8, 8, 3, 16, 1), None);
    assert_eq!(gpu_kernels::conv3x3(4, 8, 2000, 16, 16, 1), None);
}
