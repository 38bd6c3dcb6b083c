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
pub use moments::{Acc, Fixed, SumTable, Sums, Update, LIMBS, N_SCORES, SCORE_NAMES};
pub use snr::{authors_mean_snr_db, score_terms, Neighbourhood, TermScores};
pub use terms::{Term, TermKind, TermSet};

use crate::model::record::Recording;
use crate::spectrum::Spectrum;

/// One image's analysis, flat: every recorded neuron's scores per term and, where kept, its
/// amplitude spectrum, neuron by neuron in the recording's order (its taps in turn, each tap's
/// channels in order). Flat rather than a value per neuron with its own vectors: 72 bytes per
/// (neuron, term) against 136 with `Option`s (MobileNetV2: 7.4 against 14 MB an image, which
/// a worker on a GPU holds for a pass of several images, two passes at times), and no
/// allocations per neuron.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageScores {
    /// Each recorded tap's index in the plan and its channels, in order.
    pub taps: Vec<(u32, u32)>,
    /// Terms per neuron.
    pub terms: usize,
    /// [`N_SCORES`] per (neuron, term), in [`TermScores::as_array`] order (the neuron's
    /// authors' mean dB-SNR last, in each of its terms); NaN where a score is absent.
    pub scores: Vec<f64>,
    /// Amplitude bins per neuron in `amplitude` (0 where spectra are not kept).
    pub bins: usize,
    /// `bins` amplitudes (N/2+1) per neuron, where kept.
    pub amplitude: Vec<f32>,
}

/// One neuron of an [`ImageScores`].
#[derive(Debug, Clone, Copy)]
pub struct Neuron<'a> {
    /// Tap index in the plan.
    pub tap: u32,
    /// Channel.
    pub channel: u32,
    /// [`N_SCORES`] per term, NaN where absent.
    pub scores: &'a [f64],
    /// Its amplitude spectrum (empty where not kept).
    pub amplitude: &'a [f32],
}

impl Neuron<'_> {
    /// Term `t`'s scores, `None` where absent (NaN), as [`TermScores::as_array`] gives them.
    pub fn term(&self, t: usize) -> [Option<f64>; N_SCORES] {
        std::array::from_fn(|k| Some(self.scores[t * N_SCORES + k]).filter(|v| !v.is_nan()))
    }
}

impl ImageScores {
    /// Neurons recorded.
    pub fn len(&self) -> usize {
        self.taps.iter().map(|t| t.1 as usize).sum()
    }

    /// Whether no neuron was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The neurons, in order.
    pub fn neurons(&self) -> impl Iterator<Item = Neuron<'_>> + Clone + '_ {
        let per = self.terms * N_SCORES;
        self.taps
            .iter()
            .flat_map(|&(tap, channels)| (0..channels).map(move |channel| (tap, channel)))
            .enumerate()
            .map(move |(k, (tap, channel))| Neuron {
                tap,
                channel,
                scores: &self.scores[k * per..][..per],
                amplitude: &self.amplitude[k * self.bins..][..self.bins],
            })
    }
}

/// Scores of every neuron of a recording, and its amplitude spectrum if `keep_amplitude` (the
/// spectra table; none otherwise). Each tap's channels are scored [`block::LANES`] at a time
/// ([`block::BlockScorer`]): the same bits as [`score_terms`] and [`authors_mean_snr_db`] one
/// neuron at a time.
pub fn analyse(
    rec: &Recording,
    spectrum: &mut Spectrum,
    terms: &TermSet,
    nb: Neighbourhood,
    keep_amplitude: bool,
) -> ImageScores {
    analyse_taps(rec, 0..rec.taps.len(), spectrum, terms, nb, keep_amplitude)
}

/// Consecutive ranges of a recording's taps of at most `neurons` channels together (a wider
/// tap alone), covering them all in order: the slices an image is analysed and written in when
/// its scores need not be kept whole.
pub fn tap_slices(rec: &Recording, neurons: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut width) = (0, 0);
    for (i, t) in rec.taps.iter().enumerate() {
        if i > start && width + t.channels > neurons {
            out.push(start..i);
            (start, width) = (i, 0);
        }
        width += t.channels;
    }
    if start < rec.taps.len() {
        out.push(start..rec.taps.len());
    }
    out
}

/// [`analyse`] of the recording's taps `taps` only (indices into `rec.taps`): the same bits for
/// each of their neurons as the whole image's analysis gives (each tap's channels are scored in
/// blocks from its first channel either way).
pub fn analyse_taps(
    rec: &Recording,
    taps: std::ops::Range<usize>,
    spectrum: &mut Spectrum,
    terms: &TermSet,
    nb: Neighbourhood,
    keep_amplitude: bool,
) -> ImageScores {
    use block::LANES;
    let taps = &rec.taps[taps];
    let bins = spectrum.bins();
    let neurons: usize = taps.iter().map(|t| t.channels).sum();
    let nt = terms.terms.len();
    let kept_bins = if keep_amplitude { bins } else { 0 };
    let mut out = ImageScores {
        taps: taps
            .iter()
            .map(|t| (t.tap as u32, t.channels as u32))
            .collect(),
        terms: nt,
        scores: Vec::with_capacity(neurons * nt * N_SCORES),
        bins: kept_bins,
        amplitude: Vec::with_capacity(neurons * kept_bins),
    };
    let mut amp = vec![0.0f64; bins];
    let mut lanes = vec![[0.0f64; LANES]; bins];
    let mut scorer = block::BlockScorer::new();
    let mut scores: [Vec<TermScores>; LANES] = Default::default();
    for t in taps {
        for first in (0..t.channels).step_by(LANES) {
            let n = (t.channels - first).min(LANES);
            for l in 0..LANES {
                // lanes past the last channel repeat it: finite values, results dropped
                if l < n {
                    let (values, map) = t.channel(first + l);
                    spectrum.amplitude_gather(values, map, &mut amp);
                    if keep_amplitude {
                        out.amplitude.extend(amp.iter().map(|a| *a as f32));
                    }
                }
                for (row, a) in lanes.iter_mut().zip(&amp) {
                    row[l] = *a;
                }
            }
            let authors = scorer.score(&lanes, terms, nb, &mut scores);
            for l in 0..n {
                for ts in &scores[l] {
                    out.scores
                        .extend(ts.as_array(authors[l]).map(|v| v.unwrap_or(f64::NAN)));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::record::TapSeries;
    use std::sync::Arc;

    /// `analyse` gives every neuron, in order (taps in turn, channels in order, past the
    /// scorer's blocks of 8), the scores of its own spectrum one neuron at a time, bit for bit,
    /// with the amplitude spectrum where kept and NaN where a score is absent.
    #[test]
    #[allow(clippy::single_range_in_vec_init)] // slices of taps, one of both taps among them
    fn analyse_scores_each_neuron_in_order() {
        let frames = 240;
        let terms = TermSet::new(&[6.0, 7.5], 120.0, frames, 2, 2, &mut Vec::new());
        let nb = Neighbourhood { n: 3, skip: 1 };
        let map: Arc<[usize]> = (0..frames).map(|i| (i * 7) % 49).collect();
        let mut rng = 3u64;
        let mut next = || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng >> 40) as f32 / (1u64 << 24) as f32
        };
        // taps 0 and 2 of the plan: 3 channels, and 10 (a block of 8 and one of 2)
        let taps: Vec<TapSeries> = [(0, 3), (2, 10)]
            .into_iter()
            .map(|(tap, channels)| {
                let values: Vec<f32> = (0..49 * channels).map(|_| next()).collect();
                TapSeries::new(tap, channels, &values, map.clone())
            })
            .collect();
        let rec = Recording {
            pred: 0,
            prob: 1.0,
            distinct_frames: 49,
            stimulus_seconds: 0.0,
            taps,
        };
        let mut sp = Spectrum::new(frames, Window::Rect);
        let got = analyse(&rec, &mut sp, &terms, nb, true);
        assert_eq!(got.taps, vec![(0, 3), (2, 10)]);
        assert_eq!((got.len(), got.terms, got.bins), (13, 6, sp.bins()));
        let neurons: Vec<Neuron> = got.neurons().collect();
        assert_eq!(neurons.len(), 13);
        let mut absent = 0;
        for (k, nr) in neurons.iter().enumerate() {
            let (t, ch) = if k < 3 { (0, k) } else { (1, k - 3) };
            assert_eq!((nr.tap, nr.channel), (rec.taps[t].tap as u32, ch as u32));
            let (values, map) = rec.taps[t].channel(ch);
            let series: Vec<f32> = map.iter().map(|&j| values[j]).collect();
            let amp = sp.amplitude(&series);
            let amp32: Vec<f32> = amp.iter().map(|a| *a as f32).collect();
            assert_eq!(nr.amplitude, &amp32[..], "neuron {k}");
            let mean = authors_mean_snr_db(&amp, nb);
            for (i, s) in score_terms(&amp, &terms, nb).iter().enumerate() {
                let want = s.as_array(mean).map(|v| v.map(f64::to_bits));
                assert_eq!(nr.term(i).map(|v| v.map(f64::to_bits)), want, "{k} {i}");
                absent += want.iter().filter(|v| v.is_none()).count();
            }
        }
        // the NaN-for-None path was taken (no noise: lattice scores of silent bins are absent)
        assert!(absent > 0);
        // without spectra: the same scores, no amplitudes
        let lean = analyse(&rec, &mut sp, &terms, nb, false);
        let bits = |s: &ImageScores| s.scores.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&lean), bits(&got));
        assert!(lean.amplitude.is_empty() && lean.bins == 0);
        assert!(lean.neurons().all(|n| n.amplitude.is_empty()));
        // tap by tap: the same neurons, the same bits, in the same order
        for max in [1, 3, 12, 13, 100] {
            let slices = tap_slices(&rec, max);
            let want: &[std::ops::Range<usize>] = if max < 13 { &[0..1, 1..2] } else { &[0..2] };
            assert_eq!(slices, want, "{max}");
            let (mut scores, mut amplitude) = (Vec::new(), Vec::new());
            for r in slices {
                let part = analyse_taps(&rec, r.clone(), &mut sp, &terms, nb, true);
                assert_eq!(part.taps, got.taps[r]);
                scores.extend(part.scores);
                amplitude.extend(part.amplitude);
            }
            let parts = ImageScores {
                scores,
                amplitude,
                ..got.clone()
            };
            assert_eq!(bits(&parts), bits(&got));
            assert_eq!(parts.amplitude, got.amplitude);
        }
    }
}
