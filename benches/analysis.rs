//! The CPU side of each image after its forward passes, per image, on series shaped like the
//! quickstart's (MobileNetV2: 17 056 neurons) and the paper's (ResNet-32: 1 136 neurons), 240
//! frames of 49 distinct values: amplitude spectra (of the whole series, and gathered from the
//! distinct values as the pipeline does), the scores one neuron at a time
//! (`score_terms` + `authors_mean_snr_db`) against [`BlockScorer`] (checked to give the same
//! bits), and the exact sums of a chunk (`Acc::add_values`, and in the compact `SumTable`, checked
//! to give the same bits); and, before all of them, the
//! decoding of the 20 ImageNet photos shipped in `data/imagenet-foolbox-20` (JPEG, 512x512)
//! to the quickstart's input (short side 256, centre crop 224). Best of 15 rounds.
//!
//!     cargo bench --bench analysis
//!
//! Not a test: timings on a shared machine vary; compare the figures of one run.

use differential_dataflow::difference::Monoid;
use freqtag::model::record::{Recording, TapSeries};
use freqtag::score::block::{BlockScorer, LANES};
use freqtag::score::*;
use freqtag::spectrum::{Spectrum, Window};
use std::time::Instant;

fn best_of(rounds: usize, mut f: impl FnMut()) -> f64 {
    (0..rounds)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

/// Decoding and preparing the shipped ImageNet photos, per image: the whole of
/// `prepare_bytes`, and the JPEG decoding alone (the rest is the resize and crop).
fn decode() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/imagenet-foolbox-20");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    files.sort();
    let bytes: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let pre = freqtag::model::Preprocess {
        resize: 256,
        pillow: freqtag::model::Pillow::V13,
        crop: 224,
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
    };
    let n = bytes.len() as f64;
    let prepare = best_of(15, || {
        for b in &bytes {
            std::hint::black_box(freqtag::source::prepare_bytes(b, pre).unwrap());
        }
    });
    let jpeg = best_of(15, || {
        for b in &bytes {
            std::hint::black_box(image::load_from_memory(b).unwrap().into_rgb8());
        }
    });
    println!(
        "decode ({} photos of data/imagenet-foolbox-20 to 224x224), ms per image: {:.2}, of \
         which JPEG decoding {:.2} and resize and crop {:.2}",
        bytes.len(),
        prepare / n * 1e3,
        jpeg / n * 1e3,
        (prepare - jpeg) / n * 1e3
    );
}

fn main() {
    // the binary's malloc settings (src/malloc.rs): the spectrum stage allocates each image's
    // results, so the allocator is part of what is timed
    freqtag::malloc::tune();
    // and transparent huge pages off
    // SAFETY: prctl with PR_SET_THP_DISABLE only sets a flag on this process
    #[cfg(target_os = "linux")]
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0)
    };
    decode();
    let frames = 240;
    let terms = TermSet::new(&[6.0, 7.5], 120.0, frames, 2, 2, &mut Vec::new());
    let nb = Neighbourhood { n: 3, skip: 1 };
    let mut rng = 1u64;
    let mut next = || {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (rng >> 40) as f32 / (1u64 << 24) as f32
    };
    // a frame map of 49 distinct values, as the paper's stimulus has
    let map: Vec<usize> = (0..frames).map(|i| (i * 7) % 49).collect();
    for (name, neurons) in [("quickstart", 17_056usize), ("paper", 1_136)] {
        let distinct: Vec<Vec<f32>> = (0..neurons)
            .map(|_| (0..49).map(|_| next()).collect())
            .collect();
        let series: Vec<Vec<f32>> = distinct
            .iter()
            .map(|d| map.iter().map(|&j| d[j]).collect())
            .collect();
        let mut sp = Spectrum::new(frames, Window::Rect);
        let bins = sp.bins();
        let mut amp = vec![0.0; bins];
        let fft = best_of(15, || {
            for s in &series {
                sp.amplitude_into(s, &mut amp);
            }
            std::hint::black_box(&amp);
        });
        let gather = best_of(15, || {
            for d in &distinct {
                sp.amplitude_gather(d, &map, &mut amp);
            }
            std::hint::black_box(&amp);
        });
        let amps: Vec<Vec<f64>> = series.iter().map(|s| sp.amplitude(s)).collect();
        for (d, a) in distinct.iter().zip(&amps) {
            sp.amplitude_gather(d, &map, &mut amp);
            assert_eq!(&amp, a);
        }
        let one = best_of(15, || {
            for a in &amps {
                std::hint::black_box(score_terms(a, &terms, nb));
                std::hint::black_box(authors_mean_snr_db(a, nb));
            }
        });
        let blocks: Vec<Vec<[f64; LANES]>> = amps
            .chunks(LANES)
            .map(|c| {
                (0..bins)
                    .map(|b| std::array::from_fn(|l| c[l.min(c.len() - 1)][b]))
                    .collect()
            })
            .collect();
        // the whole spectrum stage as the pipeline runs it (`analyse`: gathered spectra, scores in
        // blocks and one result per neuron), on a recording of the same values
        let per_distinct: Vec<f32> = (0..49)
            .flat_map(|j| distinct.iter().map(move |d| d[j]))
            .collect();
        let rec = Recording {
            pred: 0,
            prob: 1.0,
            distinct_frames: 49,
            stimulus_seconds: 0.0,
            taps: vec![TapSeries::new(
                0,
                neurons,
                &per_distinct,
                map.clone().into(),
            )],
        };
        let stage = best_of(15, || {
            std::hint::black_box(analyse(&rec, &mut sp, &terms, nb, false));
        });
        let mut scorer = BlockScorer::new();
        let mut out: [Vec<TermScores>; LANES] = Default::default();
        for (b, c) in blocks.iter().zip(amps.chunks(LANES)) {
            let authors = scorer.score(b, &terms, nb, &mut out);
            for (l, a) in c.iter().enumerate() {
                assert_eq!(authors[l].to_bits(), authors_mean_snr_db(a, nb).to_bits());
                assert_eq!(out[l], score_terms(a, &terms, nb));
            }
        }
        let block = best_of(15, || {
            for b in &blocks {
                std::hint::black_box(scorer.score(b, &terms, nb, &mut out));
            }
        });
        let scores: Vec<(Vec<TermScores>, f64)> = amps
            .iter()
            .map(|a| (score_terms(a, &terms, nb), authors_mean_snr_db(a, nb)))
            .collect();
        let nt = terms.terms.len();
        let mut accs = vec![Acc::zero(); neurons * nt];
        let sums = best_of(15, || {
            for (i, (s, m)) in scores.iter().enumerate() {
                for (t, ts) in s.iter().enumerate() {
                    accs[i * nt + t].add_values(&ts.as_array(*m));
                }
            }
        });
        std::hint::black_box(&accs);
        // the same sums in the chunk's compact table, which must end with the same bits
        let mut table = SumTable::new(neurons * nt);
        let compact = best_of(15, || {
            for (i, (s, m)) in scores.iter().enumerate() {
                for (t, ts) in s.iter().enumerate() {
                    table.add(i * nt + t, &ts.as_array(*m));
                }
            }
        });
        for (slot, acc) in accs.iter().enumerate() {
            assert_eq!(&table.take(slot), acc, "slot {slot}");
        }
        println!(
            "{name} ({neurons} neurons, {frames} frames), ms per image: spectra {:.2} (from the \
             distinct values {:.2}), scores one at a time {:.2}, in blocks of {LANES} {:.2} \
             ({:.2}x); the spectrum stage (`analyse`) {:.2}; exact sums {:.2} (in the compact \
             table {:.2})",
            fft * 1e3,
            gather * 1e3,
            one * 1e3,
            block * 1e3,
            one / block,
            stage * 1e3,
            sums * 1e3,
            compact * 1e3
        );
    }
}
