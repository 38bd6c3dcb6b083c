//! Scores of a neuron's spectrum (METHOD.md sections 3-4) and their exact aggregation.
//!
//! - [`terms`]: the scored frequencies (tagged, harmonics, intermodulation), aliasing and the
//!   response lattice.
//! - [`snr`]: per-term amplitude, standard and lattice-aware SNR, z-score, baseline-corrected
//!   amplitude, response share, and the authors' mean dB-SNR.
//! - [`block`]: the per-term scores and the authors' score of 8 neurons side by side (the same
//!   bits as one at a time).
//! - [`moments`]: an exact, order-independent accumulator (count, sum, sum of squares in 384-bit
//!   fixed point) used as a differential-dataflow difference type.

pub mod block;
pub mod moments;
pub mod snr;
pub mod terms;

pub use crate::spectrum::Window;
pub use moments::{Acc, Fixed, SumTable, Update, LIMBS, N_SCORES, SCORE_NAMES};
pub use snr::{authors_mean_snr_db, score_terms, Neighbourhood, TermScores};
pub use terms::{Term, TermKind, TermSet};

use crate::model::record::Recording;
use crate::spectrum::Spectrum;

/// One neuron of one image: its spectrum and scores.
#[derive(Debug, Clone)]
pub struct NeuronResult {
    /// Tap index in the plan.
    pub tap: u32,
    /// Channel.
    pub channel: u32,
    /// Amplitude spectrum, N/2+1 bins.
    pub amplitude: Vec<f32>,
    /// Scores per term, in the term set's order.
    pub terms: Vec<TermScores>,
    /// The authors' mean dB-SNR.
    pub mean_snr_db: f64,
}

/// Scores of every neuron of a recording, and its amplitude spectrum if `keep_amplitude` (the
/// spectra table; empty otherwise). Each tap's channels are scored [`block::LANES`] at a time
/// ([`block::BlockScorer`]): the same bits as [`score_terms`] and [`authors_mean_snr_db`] one
/// neuron at a time.
pub fn analyse(
    rec: &Recording,
    spectrum: &mut Spectrum,
    terms: &TermSet,
    nb: Neighbourhood,
    keep_amplitude: bool,
) -> Vec<NeuronResult> {
    use block::LANES;
    let bins = spectrum.bins();
    let mut out = Vec::with_capacity(rec.taps.iter().map(|t| t.channels).sum());
    let mut amp = vec![0.0f64; bins];
    let mut lanes = vec![[0.0f64; LANES]; bins];
    let mut scorer = block::BlockScorer::new();
    let mut scores: [Vec<TermScores>; LANES] = Default::default();
    for t in &rec.taps {
        for first in (0..t.channels).step_by(LANES) {
            let n = (t.channels - first).min(LANES);
            let mut kept: [Vec<f32>; LANES] = Default::default();
            for l in 0..LANES {
                // lanes past the last channel repeat it: finite values, results dropped
                if l < n {
                    let (values, map) = t.channel(first + l);
                    spectrum.amplitude_gather(values, map, &mut amp);
                    if keep_amplitude {
                        kept[l] = amp.iter().map(|a| *a as f32).collect();
                    }
                }
                for (row, a) in lanes.iter_mut().zip(&amp) {
                    row[l] = *a;
                }
            }
            let authors = scorer.score(&lanes, terms, nb, &mut scores);
            for l in 0..n {
                out.push(NeuronResult {
                    tap: t.tap as u32,
                    channel: (first + l) as u32,
                    amplitude: std::mem::take(&mut kept[l]),
                    terms: scores[l].clone(),
                    mean_snr_db: authors[l],
                });
            }
        }
    }
    out
}
