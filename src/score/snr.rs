//! Per-term scores of one amplitude spectrum, and the authors' overall mean dB-SNR.
//!
//! The spectrum for neighbourhoods is bins `1..=N/2` (DC is kept in the output, never scored and
//! never part of a baseline). A term whose neighbourhood leaves that range gets null SNRs.

use super::terms::TermSet;

/// The SNR neighbourhood: `n` bins each side, after skipping `skip` adjacent bins.
#[derive(Debug, Clone, Copy)]
pub struct Neighbourhood {
    /// Neighbours per side.
    pub n: usize,
    /// Adjacent bins left out per side.
    pub skip: usize,
}

/// The scores of one term of one neuron. `None` where the value does not exist.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TermScores {
    /// `A[k]`.
    pub amplitude: f64,
    /// `A[k] / mean(neighbours)`.
    pub snr: Option<f64>,
    /// `10 log10(snr)`.
    pub snr_db: Option<f64>,
    /// As `snr`, with neighbours that are lattice bins left out of the baseline.
    pub snr_lattice: Option<f64>,
    /// `10 log10(snr_lattice)`.
    pub snr_lattice_db: Option<f64>,
    /// `(A[k] - mean) / sd` over the (standard) neighbours, sample sd.
    pub zscore: Option<f64>,
    /// `A[k] - mean(neighbours)`.
    pub baseline_corrected: Option<f64>,
    /// `A[k] / rms(A[1..=N/2])`.
    pub response_share: Option<f64>,
}

impl TermScores {
    /// The scores as an array in [`super::SCORE_NAMES`] order, with the neuron's authors'
    /// score `mean_snr_db` last.
    pub fn as_array(&self, mean_snr_db: f64) -> [Option<f64>; 9] {
        [
            Some(self.amplitude),
            self.snr,
            self.snr_db,
            self.snr_lattice,
            self.snr_lattice_db,
            self.zscore,
            self.baseline_corrected,
            self.response_share,
            Some(mean_snr_db),
        ]
    }
}

/// The neighbour bins of `k` within `1..=last`, or `None` if the window leaves that range.
fn neighbours(
    k: usize,
    last: usize,
    nb: Neighbourhood,
) -> Option<impl Iterator<Item = usize> + Clone> {
    let reach = nb.skip + nb.n;
    if k < 1 + reach || k + reach > last {
        return None;
    }
    let left = (k - reach)..=(k - nb.skip - 1);
    let right = (k + nb.skip + 1)..=(k + reach);
    Some(left.chain(right))
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

fn db(x: Option<f64>) -> Option<f64> {
    x.filter(|v| *v > 0.0).map(|v| 10.0 * v.log10())
}

/// Scores every term of `terms` in the amplitude spectrum `amp` (N/2+1 bins).
pub fn score_terms(amp: &[f64], terms: &TermSet, nb: Neighbourhood) -> Vec<TermScores> {
    let last = amp.len() - 1;
    let rms = (amp[1..].iter().map(|a| a * a).sum::<f64>() / last as f64).sqrt();
    terms
        .terms
        .iter()
        .map(|t| {
            let a = amp[t.bin];
            let mut s = TermScores {
                amplitude: a,
                snr: None,
                snr_db: None,
                snr_lattice: None,
                snr_lattice_db: None,
                zscore: None,
                baseline_corrected: None,
                response_share: ratio(a, rms),
            };
            // the neighbours are walked in place, several times, rather than gathered: one
            // neuron's terms cost several allocations each, for thousands of neurons per image
            if let Some(bins) = neighbours(t.bin, last, nb) {
                let count = bins.clone().count();
                let mean = bins.clone().map(|b| amp[b]).sum::<f64>() / count as f64;
                s.snr = ratio(a, mean);
                s.snr_db = db(s.snr);
                s.baseline_corrected = Some(a - mean);
                if count > 1 {
                    let var = bins.clone().map(|b| (amp[b] - mean).powi(2)).sum::<f64>()
                        / (count - 1) as f64;
                    s.zscore = ratio(a - mean, var.sqrt());
                }
                let off = bins.filter(|b| !terms.lattice[*b]);
                let n_off = off.clone().count();
                if n_off > 0 {
                    let base = off.map(|b| amp[b]).sum::<f64>() / n_off as f64;
                    s.snr_lattice = ratio(a, base);
                    s.snr_lattice_db = db(s.snr_lattice);
                }
            }
            s
        })
        .collect()
}

/// The authors' overall score, as their code computes it: drop DC; for each remaining bin, SNR
/// against `nb.n` neighbours each side skipping `nb.skip`, where a window running off either end
/// uses the neighbours that exist; `(A + 1e-8) / (mean + 1e-8)`; `10 log10`, floored at 0;
/// averaged over all remaining bins. Rounding-sensitive without stimulus noise (METHOD.md).
pub fn authors_mean_snr_db(amp: &[f64], nb: Neighbourhood) -> f64 {
    const GUARD: f64 = 1e-8;
    let s = &amp[1..];
    let len = s.len() as isize;
    let (n, skip) = (nb.n as isize, nb.skip as isize);
    // sum_j max(0, 10 log10 snr_j) = 10 log10 prod_j max(1, snr_j): one logarithm per neuron
    // instead of one per bin (the logarithms were most of the spectrum stage). The product is
    // kept as a mantissa in [1, 2) and a binary exponent, so it cannot overflow.
    let (mut mant, mut exp2) = (1.0f64, 0i64);
    for j in 0..len {
        let mut sum = 0.0;
        let left = (j - skip - n).max(0) as usize..(j - skip).max(0) as usize;
        let right = (j + skip + 1).min(len) as usize..(j + skip + 1 + n).min(len) as usize;
        let count = left.len() + right.len();
        // left, then right: the order of the sum as it was defined
        for v in &s[left] {
            sum += v;
        }
        for v in &s[right] {
            sum += v;
        }
        let base = if count > 0 { sum / count as f64 } else { 0.0 };
        let snr = (s[j as usize] + GUARD) / (base + GUARD);
        // without a branch, which half the bins took at random: a factor of 1 changes nothing
        let factor = if snr > 1.0 && snr.is_finite() {
            snr
        } else {
            1.0
        };
        mant *= factor;
        let bits = mant.to_bits();
        exp2 += ((bits >> 52) & 0x7ff) as i64 - 1023;
        mant = f64::from_bits((bits & !(0x7ff << 52)) | (1023 << 52));
    }
    let total = 10.0 * (mant.log10() + exp2 as f64 * std::f64::consts::LOG10_2);
    total / len as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const NB: Neighbourhood = Neighbourhood { n: 3, skip: 1 };

    fn paper_terms() -> TermSet {
        TermSet::new(&[6.0, 7.5], 120.0, 240, 2, 2, &mut Vec::new())
    }

    /// The one-logarithm form against the definition, bin by bin, on spectra with huge,
    /// tiny, zero and flat values.
    #[test]
    fn authors_mean_snr_db_matches_the_per_bin_definition() {
        let direct = |amp: &[f64]| {
            let s = &amp[1..];
            let len = s.len() as isize;
            let mut total = 0.0;
            for j in 0..len {
                let (l, r) = (
                    (j - 4).max(0)..(j - 1).max(0),
                    (j + 2).min(len)..(j + 5).min(len),
                );
                let nbr: Vec<f64> = l.chain(r).map(|i| s[i as usize]).collect();
                let base = nbr.iter().sum::<f64>() / nbr.len() as f64;
                total += (10.0 * ((s[j as usize] + 1e-8) / (base + 1e-8)).log10()).max(0.0);
            }
            total / len as f64
        };
        let mut rng = 12345u64;
        let mut next = || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng >> 11) as f64 / (1u64 << 53) as f64
        };
        for case in 0..50 {
            let amp: Vec<f64> = (0..121)
                .map(|i| match case % 5 {
                    0 => next(),
                    1 => next() * 1e30,
                    2 => {
                        if i % 7 == 0 {
                            1e12
                        } else {
                            1e-12
                        }
                    }
                    3 => 0.0,
                    _ => 1.0 + 1e-9 * next(),
                })
                .collect();
            let (a, b) = (authors_mean_snr_db(&amp, NB), direct(&amp));
            assert!(
                (a - b).abs() <= 1e-9 * b.abs().max(1.0),
                "case {case}: {a} vs {b}"
            );
        }
    }

    #[test]
    fn snr_on_a_hand_made_spectrum() {
        let terms = paper_terms();
        let mut amp = vec![1.0; 121];
        amp[12] = 10.0; // f1
        amp[15] = 4.0; // f2, inside f1's window (bin 15 = 12+3)
        amp[9] = 2.0; // f2-... lattice bin inside f1's window (12-3)
        let s = score_terms(&amp, &terms, NB);
        // f1 neighbours: 8,9,10 | 14,15,16 -> 1,2,1,1,4,1 -> mean 10/6
        assert!((s[0].snr.unwrap() - 10.0 / (10.0 / 6.0)).abs() < 1e-12);
        assert!((s[0].snr_db.unwrap() - 10.0 * 6.0f64.log10()).abs() < 1e-12);
        // lattice-aware: 9 and 15 are lattice bins (multiples of 3) -> 8,10,14,16 -> mean 1
        assert!((s[0].snr_lattice.unwrap() - 10.0).abs() < 1e-12);
        assert!((s[0].baseline_corrected.unwrap() - (10.0 - 10.0 / 6.0)).abs() < 1e-12);
        // z-score with the sample sd of [1,2,1,1,4,1]
        let m = 10.0 / 6.0;
        let var = ([1.0, 2.0, 1.0, 1.0, 4.0, 1.0f64]
            .iter()
            .map(|v| (v - m) * (v - m))
            .sum::<f64>())
            / 5.0;
        assert!((s[0].zscore.unwrap() - (10.0 - m) / var.sqrt()).abs() < 1e-12);
        // response share: rms over bins 1..=120
        let rms = ((117.0 + 100.0 + 16.0 + 4.0) / 120.0f64).sqrt();
        assert!((s[0].response_share.unwrap() - 10.0 / rms).abs() < 1e-12);
        // f2-f1 at bin 3: the window leaves the spectrum -> null, not made up
        let low = terms.terms.iter().position(|t| t.name == "f2-f1").unwrap();
        assert_eq!(s[low].snr, None);
        assert_eq!(s[low].snr_lattice, None);
        assert_eq!(s[low].amplitude, 1.0);
    }

    #[test]
    fn zero_baseline_gives_null_not_infinity() {
        let terms = paper_terms();
        let mut amp = vec![0.0; 121];
        amp[12] = 1.0;
        let s = score_terms(&amp, &terms, NB);
        assert_eq!(s[0].snr, None);
        assert_eq!(s[0].snr_db, None);
    }

    #[test]
    fn authors_score_on_flat_and_peaked_spectra() {
        // a flat spectrum: every SNR is 1 -> 0 dB
        assert_eq!(authors_mean_snr_db(&[5.0; 121], NB), 0.0);
        // one peak of 1 over zeros: only bin 12 scores, (1+g)/g -> 80 dB, averaged over 120
        let mut amp = vec![0.0; 121];
        amp[12] = 1.0;
        let want = 10.0 * ((1.0 + 1e-8) / 1e-8f64).log10() / 120.0;
        assert!((authors_mean_snr_db(&amp, NB) - want).abs() < 1e-9);
        // at the edge: the first bin uses only right neighbours (bins 3,4,5 of the spectrum)
        let mut amp = vec![1.0; 121];
        amp[1] = 3.0;
        let want = 10.0 * ((3.0 + 1e-8) / (1.0 + 1e-8f64)).log10() / 120.0;
        assert!((authors_mean_snr_db(&amp, NB) - want).abs() < 1e-12);
    }
}
