//! The CPU depthwise kernel ([`Depthwise`]) against the plain loop it replaced (each window
//! position's products added to the whole output row in turn), on the shapes of MobileNetV2's
//! depthwise layers at the quickstart's 2 frames a pass, one thread, the two timed in turn and
//! checked to give the same bits. Best of 40 rounds.
//!
//!     cargo bench --bench depthwise
//!     FRAMES=1 cargo bench --bench depthwise    # frames a pass (default 2, the quickstart's)
//!
//! Not a test: timings on a shared machine vary; compare the figures of one run.
use candle_core::{Device, Tensor};
use freqtag::model::layers::{depthwise_reference, Depthwise};
use std::time::Instant;
fn main() {
    // the binary's malloc settings (src/malloc.rs)
    freqtag::malloc::tune();
    // one thread, unless RAYON_NUM_THREADS says otherwise
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build_global()
            .expect("the global thread pool");
    }
    let frames: usize = std::env::var("FRAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    println!("{frames} frames a pass; times per frame");
    let dev = Device::Cpu;
    let (mut tn, mut to) = (0.0, 0.0);
    for (h, c, s) in [
        (112usize, 32usize, 1usize),
        (112, 96, 2),
        (56, 144, 1),
        (56, 144, 2),
        (28, 192, 1),
        (14, 384, 1),
        (14, 576, 1),
        (7, 960, 1),
    ] {
        let x = Tensor::randn(0f32, 1.0, (frames, h, h, c), &dev).unwrap();
        let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let wt: Vec<f32> = Tensor::randn(0f32, 1.0, 9 * c, &dev)
            .unwrap()
            .to_vec1()
            .unwrap();
        let op = Depthwise {
            weight: &wt,
            k: 3,
            stride: s,
            pad: 1,
        };
        let got: Vec<f32> = x
            .apply_op1_no_bwd(&op)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want = depthwise_reference(&xs, &wt, (frames, h, h, c), 3, s, 1);
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "h{h} c{c} s{s}: bits differ"
        );
        let (mut bn, mut bo) = (f64::MAX, f64::MAX);
        for _ in 0..40 {
            let t = Instant::now();
            std::hint::black_box(x.apply_op1_no_bwd(&op).unwrap());
            bn = bn.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            std::hint::black_box(depthwise_reference(&xs, &wt, (frames, h, h, c), 3, s, 1));
            bo = bo.min(t.elapsed().as_secs_f64());
        }
        let (bn, bo) = (bn / frames as f64, bo / frames as f64);
        tn += bn;
        to += bo;
        println!(
            "{h}x{h}x{c}, stride {s}: kernel {:.3} ms, plain loop {:.3} ms",
            bn * 1e3,
            bo * 1e3
        );
    }
    println!(
        "all 8 layer shapes: kernel {:.2} ms, plain loop {:.2} ms ({:.2}x)",
        tn * 1e3,
        to * 1e3,
        to / tn
    );
}
