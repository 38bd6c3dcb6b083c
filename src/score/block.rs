//! [`score_terms`](super::score_terms) and [`authors_mean_snr_db`](super::authors_mean_snr_db) of
//! [`LANES`] neurons side by side, for the thousands of neurons of an image.
//!
//! One neuron's scores are chains of dependent additions and multiplications (the RMS over all
//! bins, the neighbour sums, the authors' running product), each waiting on the one before. Laid
//! out bin-major (`amp[b][l]`: bin `b` of lane `l`), [`LANES`] neurons run the same chain in the
//! lanes of one vector register. The code is the one-neuron functions' own
//! ([`score_terms`](super::score_terms) and [`authors_mean_snr_db`](super::authors_mean_snr_db)
//! are it with one lane): every lane does the same operations in the same order, so the
//! results are the same bits (tested); only the layout differs. The loops are compiled for AVX2 as well, chosen at run time; Rust never fuses a
//! multiply and an add on its own, so the instruction set changes nothing in the results.

use super::snr::{authors_lanes, score_terms_lanes, Neighbourhood, TermScores};
use super::terms::TermSet;

/// Neurons scored side by side.
pub const LANES: usize = 8;

type Lanes = [f64; LANES];

/// Scores of [`LANES`] spectra, with the buffers they need kept between blocks.
#[derive(Default)]
pub struct BlockScorer {
    /// Neighbour sums, then factors, of the authors' score, per bin (`amp[1..]`).
    sums: Vec<Lanes>,
}

impl BlockScorer {
    /// A scorer with empty buffers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Each lane's [`score_terms`](super::score_terms) into `terms_out[l]` (cleared first) and
    /// its [`authors_mean_snr_db`](super::authors_mean_snr_db) into the result, for the spectra
    /// `amp` (bin-major, `N/2 + 1` rows). Unused lanes may hold anything finite.
    pub fn score(
        &mut self,
        amp: &[Lanes],
        terms: &TermSet,
        nb: Neighbourhood,
        terms_out: &mut [Vec<TermScores>; LANES],
    ) -> Lanes {
        // AVX-512 was slower here (8.2-8.7 against 7.4 ms per MobileNetV2 image of 17 056
        // neurons, `cargo bench --bench analysis`): the loops are bound by divisions, which
        // AVX-512 does no faster per value
        #[cfg(target_arch = "x86_64")]
        if crate::spectrum::avx2() {
            // SAFETY: the CPU has AVX2 (checked above)
            return unsafe { self.score_avx2(amp, terms, nb, terms_out) };
        }
        self.score_plain(amp, terms, nb, terms_out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn score_avx2(
        &mut self,
        amp: &[Lanes],
        terms: &TermSet,
        nb: Neighbourhood,
        terms_out: &mut [Vec<TermScores>; LANES],
    ) -> Lanes {
        self.score_plain(amp, terms, nb, terms_out)
    }

    #[inline(always)]
    fn score_plain(
        &mut self,
        amp: &[Lanes],
        terms: &TermSet,
        nb: Neighbourhood,
        terms_out: &mut [Vec<TermScores>; LANES],
    ) -> Lanes {
        score_terms_lanes(amp, terms, nb, terms_out);
        authors_lanes(amp, nb, &mut self.sums)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::score::{authors_mean_snr_db, score_terms};

    /// Bit for bit the one-neuron functions, lane by lane, on spectra of every kind (noise,
    /// huge, tiny, zero, flat, peaked), for several neighbourhoods, lengths and term sets, and
    /// with whichever instruction set this CPU runs.
    #[test]
    fn lanes_give_the_same_bits_as_one_neuron_at_a_time() {
        let mut rng = 99u64;
        let mut next = || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng >> 11) as f64 / (1u64 << 53) as f64
        };
        let shapes = [
            (240, 120.0, vec![6.0, 7.5], Neighbourhood { n: 3, skip: 1 }),
            (240, 120.0, vec![6.0, 7.5], Neighbourhood { n: 5, skip: 0 }),
            (
                100,
                50.0,
                vec![3.3, 7.1, 11.0],
                Neighbourhood { n: 2, skip: 2 },
            ),
            (16, 16.0, vec![2.0], Neighbourhood { n: 3, skip: 1 }),
            (2400, 120.0, vec![6.0, 7.5], Neighbourhood { n: 4, skip: 3 }),
        ];
        let mut scorer = BlockScorer::new();
        let mut out: [Vec<TermScores>; LANES] = Default::default();
        for (frames, fps, freqs, nb) in shapes {
            let terms = TermSet::new(&freqs, fps, frames, 2, 2, &mut Vec::new());
            let bins = frames / 2 + 1;
            for case in 0..12 {
                let spectra: Vec<Vec<f64>> = (0..LANES)
                    .map(|l| {
                        (0..bins)
                            .map(|i| match (case + l) % 6 {
                                0 => next(),
                                1 => next() * 1e30,
                                2 if i % 7 == 0 => 1e12,
                                2 => 1e-12 * next(),
                                3 => 0.0,
                                4 => 1.0 + 1e-9 * next(),
                                _ if i % 3 == 0 => next(),
                                _ => 1e-17 * next(),
                            })
                            .collect()
                    })
                    .collect();
                let amp: Vec<Lanes> = (0..bins)
                    .map(|b| std::array::from_fn(|l| spectra[l][b]))
                    .collect();
                let authors = scorer.score(&amp, &terms, nb, &mut out);
                for l in 0..LANES {
                    let want = authors_mean_snr_db(&spectra[l], nb);
                    assert_eq!(authors[l].to_bits(), want.to_bits(), "{frames} {case} {l}");
                    let want = score_terms(&spectra[l], &terms, nb);
                    assert_eq!(out[l].len(), want.len());
                    for (a, b) in out[l].iter().zip(&want) {
                        let bits = |s: &TermScores| s.as_array(0.0).map(|v| v.map(f64::to_bits));
                        assert_eq!(bits(a), bits(b), "{frames} {case} {l}");
                    }
                }
            }
        }
    }
}
