//! The write stage of one image, per image: the quickstart's neuron rows (MobileNetV2, its 52
//! taps, 17 056 neurons, 6 terms: 102 336 rows) encoded to Parquet as a worker writes them
//! (`ImageTables::write`, `output.spectra = "none"`), on the scores `analyse` gives for a
//! recording of random values. Then the same with full spectra and with `spectra = "terms"`,
//! and all three for the paper pipeline (ResNet-32, 1 136 neurons; skipped where its weights in
//! `../shared/data` are absent). Best of 7 rounds of 5 images (the paper's: 40), each round a
//! new part file.
//!
//!     cargo bench --bench write [-- none|terms|full|quickstart|paper]
//!
//! Not a test: timings on a shared machine vary; compare the figures of one run.

use freqtag::model::record::{Recording, TapSeries};
use freqtag::score::{analyse, Neighbourhood};
use freqtag::sink::ImageTables;
use freqtag::source::{ImageRef, Locator};
use freqtag::spectrum::Spectrum;
use std::sync::Arc;
use std::time::Instant;

fn main() {
    // the binary's malloc settings (src/malloc.rs)
    freqtag::malloc::tune();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(format!("freqtag-bench-write-{}", std::process::id()));
    let images = |n: u64| -> Vec<ImageRef> {
        (0..n)
            .map(|i| ImageRef {
                seq: i,
                id: format!("n01440764/ILSVRC2012_val_{:08}.JPEG", 1000 + i),
                loc: Locator::File(root.join("data/photos/none.jpg")),
                label: Some(i as i64),
            })
            .collect()
    };
    // `cargo bench --bench write -- full`: that setting alone
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    // the paper pipeline's images are small: 40 a round
    let runs = [
        ("quickstart", "data/photos", 5),
        ("paper-resnet32-cifar10", "data/cifar10-foolbox-20", 40),
    ];
    for ((name, source, n), spectra) in runs
        .iter()
        .flat_map(|r| ["none", "terms", "full"].map(|s| (*r, s)))
    {
        if !only.is_empty()
            && !only
                .iter()
                .any(|o| o == spectra || name.starts_with(o.as_str()))
        {
            continue;
        }
        let images = images(n);
        // a clean folder, so that the sizes below are this run's parts
        let _ = std::fs::remove_dir_all(&dir);
        let sets = [
            format!("source.path={}", root.join(source).display()),
            format!("output.spectra=\"{spectra}\""),
        ];
        let file = root.join("pipelines").join(format!("{name}.toml"));
        let plan = match freqtag::config::load(&file, &sets) {
            Ok(p) => Arc::new(p),
            Err(e) => {
                // the paper pipeline's weights are in ../shared/data
                eprintln!("!!! {name}: skipped, the pipeline does not load here: {e}");
                continue;
            }
        };
        let st = &plan.stimulus;
        let (distinct, map) = st.distinct_frames();
        let map: Arc<[usize]> = map.into();
        let mut rng = 1u64;
        let mut next = || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng >> 40) as f32 / (1u64 << 24) as f32
        };
        let taps: Vec<TapSeries> = plan
            .taps
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let channels = plan.arch.tap_channels(t).expect("a tap's channels");
                let values: Vec<f32> = (0..channels * distinct.len()).map(|_| next()).collect();
                TapSeries::new(i, channels, &values, map.clone())
            })
            .collect();
        let rec = Recording {
            pred: 0,
            prob: 1.0,
            distinct_frames: distinct.len(),
            stimulus_seconds: 0.0,
            taps,
        };
        let sp_cfg = &plan.pipeline.spectrum;
        let nb = Neighbourhood {
            n: sp_cfg.neighbours,
            skip: sp_cfg.skip,
        };
        let mut sp = Spectrum::new(st.frames, sp_cfg.window);
        let neurons = analyse(&rec, &mut sp, &plan.terms, nb, spectra != "none");
        let mut round = 0;
        let best = (0..7)
            .map(|_| {
                round += 1;
                let t = Instant::now();
                let mut tables =
                    ImageTables::create(&dir, &format!("r{round}.parquet"), plan.clone())
                        .expect("a part file in the temporary folder");
                for img in &images {
                    tables
                        .write(img, 0, 1.0, distinct.len(), &neurons)
                        .expect("written");
                }
                tables.finish().expect("finished");
                t.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min);
        let bytes: u64 = ["neurons", "spectra", "images"]
            .iter()
            .filter_map(|t| std::fs::metadata(dir.join(t).join(format!("r{round}.parquet"))).ok())
            .map(|m| m.len())
            .sum();
        println!(
            "write, {name}, output.spectra = {spectra:>5} ({} neurons, {} rows of neurons/ an \
             image): {:.3} ms an image, {:.3} MB an image on disk",
            neurons.len(),
            neurons.len() * plan.terms.terms.len(),
            best / images.len() as f64 * 1e3,
            bytes as f64 / images.len() as f64 / 1e6
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
