//! The CPU's 3x3 stride-1 convolution: Winograd's F(2x2, 3x3) and F(4x4, 3x3) ([`winograd`])
//! against the direct kernel ([`direct`]), on the shapes of ResNet-32's convolutions at the
//! paper pipeline's 32 frames a pass, all with the spatial mean taken as rows finish (as the
//! pipeline runs them), one thread, timed in turn. F(2x2)'s outputs are checked against the
//! direct kernel's first (within 1e-6 of the largest output); F(4x4)'s distance is printed.
//! Best of 20 rounds (`ROUNDS=N`), and the time per frame of one ResNet-32 forward pass's
//! stride-1 convolutions (10 at 32x32, 9 at 16x16 and 9 at 8x8). `ONLY=32` (16, 8) times one
//! shape.
//!
//!     cargo bench --bench conv
//!     FRAMES=8 cargo bench --bench conv    # frames a pass (default 32, the paper's)
//!
//! Not a test: timings on a shared machine vary; compare the figures of one run.
use freqtag::model::direct::{self, Shape};
use freqtag::model::winograd;
use std::time::Instant;
fn main() {
    // the binary's malloc settings (src/malloc.rs)
    freqtag::malloc::tune();
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build_global()
            .expect("the global thread pool");
    }
    let Some(isa) = direct::isa() else {
        println!(
            "SKIPPED: the direct kernel does not run here (no AVX2 with FMA, or FREQTAG_NO_DIRECT)"
        );
        return;
    };
    let frames: usize = std::env::var("FRAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    println!("{isa:?}, {frames} frames a pass; milliseconds per frame");
    // a fixed-seed linear congruential generator: post-ReLU inputs, small weights
    let mut seed = 12345u64;
    let mut rand = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let (mut td, mut tw, mut t4) = (0.0, 0.0, 0.0);
    // ResNet-32's stride-1 3x3 convolutions: 10 at 32x32x16 (the stem and stage 1), 9 at
    // 16x16x32 and 9 at 8x8x64 (each later stage's first is stride 2)
    let only: Option<usize> = std::env::var("ONLY").ok().and_then(|v| v.parse().ok());
    for (hw, c, count) in [(32usize, 16usize, 10usize), (16, 32, 9), (8, 64, 9)] {
        if only.is_some_and(|o| o != hw) {
            continue;
        }
        let s = Shape {
            b: frames,
            h: hw,
            w: hw,
            c,
            cout: c,
            k: 3,
            stride: 1,
            pad: 1,
        };
        let x: Vec<f32> = (0..frames * hw * hw * c).map(|_| rand().max(0.0)).collect();
        let w: Vec<f32> = (0..9 * c * c).map(|_| rand() * 0.1).collect();
        let u = winograd::transform_weights(&w, c, c, winograd::Tile::F2);
        let u4 = winograd::transform_weights(&w, c, c, winograd::Tile::F4);
        let (a, ma) = direct::conv_mean_then_with(isa, &x, &w, s, true, None);
        let (b, mb) = winograd::conv_mean_then_with(isa, &x, &u, s, true, None);
        let peak = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        let worst_mean = ma
            .unwrap()
            .iter()
            .zip(&mb.unwrap())
            .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(
            worst <= 1e-6 * peak && worst_mean <= 1e-6 * peak,
            "{hw}x{hw}x{c}: outputs differ by {worst:e}, means by {worst_mean:e}, peak {peak}"
        );
        let (b4, _) = winograd::conv_mean_then_with(isa, &x, &u4, s, true, None);
        let worst4 = a
            .iter()
            .zip(&b4)
            .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        let (mut bd, mut bw, mut b4t) = (f64::MAX, f64::MAX, f64::MAX);
        for _ in 0..std::env::var("ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20)
        {
            let t = Instant::now();
            std::hint::black_box(direct::conv_mean_then_with(isa, &x, &w, s, true, None));
            bd = bd.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            std::hint::black_box(winograd::conv_mean_then_with(isa, &x, &u, s, true, None));
            bw = bw.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            std::hint::black_box(winograd::conv_mean_then_with(isa, &x, &u4, s, true, None));
            b4t = b4t.min(t.elapsed().as_secs_f64());
        }
        let b4t = b4t * 1e3 / frames as f64;
        t4 += b4t * count as f64;
        let (bd, bw) = (bd * 1e3 / frames as f64, bw * 1e3 / frames as f64);
        td += bd * count as f64;
        tw += bw * count as f64;
        println!(
            "{hw:>2}x{hw:<2} {c:>2} -> {c:<2} direct {bd:.4}  F(2x2) {bw:.4} ({:.2}x, within {:.1e} of the peak)  F(4x4) {b4t:.4} ({:.2}x, within {:.1e})",
            bd / bw,
            worst / peak,
            bd / b4t,
            worst4 / peak
        );
    }
    println!(
        "ResNet-32's 28 stride-1 convolutions, per frame: direct {td:.3} ms, F(2x2) {tw:.3} ms ({:.2}x), F(4x4) {t4:.3} ms ({:.2}x)",
        td / tw,
        td / t4
    );
}
