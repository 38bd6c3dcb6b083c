//! Scores of a neuron's spectrum (METHOD.md sections 3-4) and their exact aggregation.
//!
//! - [`terms`]: the scored frequencies (tagged, harmonics, intermodulation), aliasing and the
//!   response lattice.
//! - [`snr`]: per-term amplitude, standard and lattice-aware SNR, z-score, baseline-corrected
//!   amplitude, response share, and the authors' mean dB-SNR.
//! - [`moments`]: an exact, order-independent accumulator (count, sum, sum of squares in 256-bit
//!   fixed point) used as a differential-dataflow difference type.

pub mod moments;
pub mod snr;
pub mod terms;

pub use crate::spectrum::Window;
pub use moments::{Acc, Fixed, LIMBS, N_SCORES, SCORE_NAMES};
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
/// spectra table; empty otherwise).
pub fn analyse(
    rec: &Recording,
    spectrum: &mut Spectrum,
    terms: &TermSet,
    nb: Neighbourhood,
    frames: usize,
    keep_amplitude: bool,
) -> Vec<NeuronResult> {
    let mut out = Vec::new();
    let mut amp = vec![0.0f64; spectrum.bins()];
    let mut series = vec![0f32; frames];
    for t in &rec.taps {
        for ch in 0..t.channels {
            t.series_into(ch, &mut series);
            spectrum.amplitude_into(&series, &mut amp);
            out.push(NeuronResult {
                tap: t.tap as u32,
                channel: ch as u32,
                amplitude: if keep_amplitude {
                    amp.iter().map(|a| *a as f32).collect()
                } else {
                    Vec::new()
                },
                terms: score_terms(&amp, terms, nb),
                mean_snr_db: authors_mean_snr_db(&amp, nb),
            });
        }
    }
    out
}
