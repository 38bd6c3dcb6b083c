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
    let mut out: [Vec<TermScores>; 1] = Default::default();
    score_terms_lanes(amp.as_chunks::<1>().0, terms, nb, &mut out);
    let [out] = out;
    out
}

/// The authors' overall score, as their code computes it: drop DC; for each remaining bin, SNR
/// against `nb.n` neighbours each side skipping `nb.skip`, where a window running off either end
/// uses the neighbours that exist; `(A + 1e-8) / (mean + 1e-8)`; `10 log10`, floored at 0;
/// averaged over all remaining bins. Rounding-sensitive without stimulus noise (METHOD.md).
pub fn authors_mean_snr_db(amp: &[f64], nb: Neighbourhood) -> f64 {
    thread_local! {
        // one buffer per thread, zeroed as far as a spectrum needs
        static SUMS: std::cell::RefCell<Vec<[f64; 1]>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SUMS.with_borrow_mut(|sums| authors_lanes(amp.as_chunks::<1>().0, nb, sums)[0])
}

/// [`score_terms`] of `L` spectra laid out bin-major (`amp[b][l]`, see [`super::block`]): the RMS, each term's neighbour mean, variance and
/// off-lattice mean summed lane-wise in the same bin order.
#[inline(always)]
pub(super) fn score_terms_lanes<const L: usize>(
    amp: &[[f64; L]],
    terms: &TermSet,
    nb: Neighbourhood,
    out: &mut [Vec<TermScores>; L],
) {
    let last = amp.len() - 1;
    // `Iterator::sum` of f64 starts from -0.0
    let mut sq = [-0.0f64; L];
    for row in &amp[1..] {
        for l in 0..L {
            sq[l] += row[l] * row[l];
        }
    }
    let mut rms = [0.0; L];
    for l in 0..L {
        rms[l] = (sq[l] / last as f64).sqrt();
    }
    for o in out.iter_mut() {
        o.clear();
    }
    for t in &terms.terms {
        let a = amp[t.bin];
        let mut s: [TermScores; L] = std::array::from_fn(|l| TermScores {
            amplitude: a[l],
            snr: None,
            snr_db: None,
            snr_lattice: None,
            snr_lattice_db: None,
            zscore: None,
            baseline_corrected: None,
            response_share: ratio(a[l], rms[l]),
        });
        // the neighbours are walked in place, several times, rather than gathered: one
        // neuron's terms cost several allocations each, for thousands of neurons per image
        if let Some(bins) = neighbours(t.bin, last, nb) {
            let count = bins.clone().count();
            let mut mean = [-0.0f64; L];
            for b in bins.clone() {
                for l in 0..L {
                    mean[l] += amp[b][l];
                }
            }
            for m in mean.iter_mut() {
                *m /= count as f64;
            }
            let mut var = [-0.0f64; L];
            if count > 1 {
                for b in bins.clone() {
                    for l in 0..L {
                        var[l] += (amp[b][l] - mean[l]).powi(2);
                    }
                }
                for v in var.iter_mut() {
                    *v /= (count - 1) as f64;
                }
            }
            let off = bins.filter(|b| !terms.lattice[*b]);
            let n_off = off.clone().count();
            let mut base = [-0.0f64; L];
            if n_off > 0 {
                for b in off {
                    for l in 0..L {
                        base[l] += amp[b][l];
                    }
                }
                for v in base.iter_mut() {
                    *v /= n_off as f64;
                }
            }
            for (l, s) in s.iter_mut().enumerate() {
                s.snr = ratio(a[l], mean[l]);
                s.snr_db = db(s.snr);
                s.baseline_corrected = Some(a[l] - mean[l]);
                if count > 1 {
                    s.zscore = ratio(a[l] - mean[l], var[l].sqrt());
                }
                if n_off > 0 {
                    s.snr_lattice = ratio(a[l], base[l]);
                    s.snr_lattice_db = db(s.snr_lattice);
                }
            }
        }
        for (o, s) in out.iter_mut().zip(s) {
            o.push(s);
        }
    }
}

/// [`authors_mean_snr_db`] of `L` spectra laid out bin-major, with `sums` to work in.
#[inline(always)]
pub(super) fn authors_lanes<const L: usize>(
    amp: &[[f64; L]],
    nb: Neighbourhood,
    sums: &mut Vec<[f64; L]>,
) -> [f64; L] {
    const GUARD: f64 = 1e-8;
    let s = &amp[1..];
    let len = s.len();
    if len == 0 {
        return [f64::NAN; L];
    }
    sums.clear();
    sums.resize(len, [0.0; L]);
    let sum = &mut sums[..];
    let (n, skip) = (nb.n, nb.skip);
    // Every bin's neighbour sum, built one offset at a time across all bins (loops the
    // compiler vectorises) rather than bin by bin over ranges of varying length. The offsets
    // go left then right, each side outwards-in on the left and inwards-out on the right, so
    // each bin adds its neighbours in the order the definition sums them: the same bits.
    let offsets = (skip + 1..=skip + n)
        .rev()
        .map(|d| -(d as isize))
        .chain((skip + 1..=skip + n).map(|d| d as isize));
    // the loops below run over the rows as one flat slice (lane-major within a row): plain
    // element-wise loops that vectorise without gathers
    let (s_flat, sum) = (s.as_flattened(), sum.as_flattened_mut());
    for o in offsets {
        // the bins j with 0 <= j + o < len
        let (lo, hi) = if o < 0 {
            ((-o) as usize, len)
        } else {
            (0, len.saturating_sub(o as usize))
        };
        if lo >= hi {
            continue;
        }
        let from = (lo as isize + o) as usize;
        let src = &s_flat[from * L..(from + hi - lo) * L];
        for (t, v) in sum[lo * L..hi * L].iter_mut().zip(src) {
            *t += v;
        }
    }
    // sum_j max(0, 10 log10 snr_j) = 10 log10 prod_j max(1, snr_j): one logarithm per neuron
    // instead of one per bin (the logarithms were most of the spectrum stage). The product is
    // kept as a mantissa in [1, 2) and a binary exponent, so it cannot overflow; four products
    // run side by side (bins j mod 4), as one waits on the last multiply at every bin.
    // Each bin's factor max(1, snr) in place of its sum: bins whose windows fit whole share
    // one count, in a loop that vectorises; the few near the ends count what exists.
    #[inline(always)]
    fn factor(v: f64, sum: f64, count: usize) -> f64 {
        let base = if count > 0 { sum / count as f64 } else { 0.0 };
        let snr = (v + GUARD) / (base + GUARD);
        // without a branch, which half the bins took at random: a factor of 1 changes nothing
        if snr > 1.0 && snr.is_finite() {
            snr
        } else {
            1.0
        }
    }
    let reach = skip + n;
    let (inner_lo, inner_hi) = (
        reach.min(len),
        len.saturating_sub(reach).max(reach.min(len)),
    );
    let inner = 2 * n;
    for (t, v) in sum[inner_lo * L..inner_hi * L]
        .iter_mut()
        .zip(&s_flat[inner_lo * L..inner_hi * L])
    {
        *t = factor(*v, *t, inner);
    }
    for j in (0..inner_lo).chain(inner_hi..len) {
        let left = j.saturating_sub(skip) - j.saturating_sub(reach);
        let right = (j + reach + 1).min(len) - (j + skip + 1).min(len);
        for l in j * L..(j + 1) * L {
            sum[l] = factor(s_flat[l], sum[l], left + right);
        }
    }
    // the running product of each lane's factors, bins j mod 4 in four products, each kept as
    // a mantissa in [1, 2) and a binary exponent: four rows at a time, as one flat run
    let mut mant = [[1.0f64; L]; 4];
    let mut exp2 = [[0i64; L]; 4];
    #[inline(always)]
    fn step(m: &mut f64, e: &mut i64, f: f64) {
        let bits = (*m * f).to_bits();
        *e += ((bits >> 52) & 0x7ff) as i64 - 1023;
        *m = f64::from_bits((bits & !(0x7ff << 52)) | (1023 << 52));
    }
    let (m4, e4) = (mant.as_flattened_mut(), exp2.as_flattened_mut());
    let mut quads = sum.chunks_exact(4 * L);
    for q in quads.by_ref() {
        for ((m, e), f) in m4.iter_mut().zip(e4.iter_mut()).zip(q) {
            step(m, e, *f);
        }
    }
    // the rows left over are bins 0, 1, 2 mod 4, in that order
    for ((m, e), f) in m4.iter_mut().zip(e4.iter_mut()).zip(quads.remainder()) {
        step(m, e, *f);
    }
    let mut out = [0.0; L];
    for l in 0..L {
        let m = mant[0][l] * mant[1][l] * mant[2][l] * mant[3][l];
        let e = exp2[0][l] + exp2[1][l] + exp2[2][l] + exp2[3][l];
        let total = 10.0 * (m.log10() + e as f64 * std::f64::consts::LOG10_2);
        out[l] = total / len as f64;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NB: Neighbourhood = Neighbourhood { n: 3, skip: 1 };

    fn paper_terms() -> TermSet {
        TermSet::new(&[6.0, 7.5], 120.0, 240, 2, 2, &mut Vec::new())
    }

    /// The one-logarithm form against the definition, bin by bin, on spectra with huge,
    /// tiny, zero and flat values, for several neighbourhoods and lengths: windows that run off
    /// both ends at once, spectra shorter than a window, and longer than the stack buffer.
    #[test]
    fn authors_mean_snr_db_matches_the_per_bin_definition() {
        let direct = |amp: &[f64], nb: Neighbourhood| {
            let s = &amp[1..];
            let len = s.len() as isize;
            let (n, skip) = (nb.n as isize, nb.skip as isize);
            let mut total = 0.0;
            for j in 0..len {
                let (l, r) = (
                    (j - skip - n).max(0)..(j - skip).max(0),
                    (j + skip + 1).min(len)..(j + skip + 1 + n).min(len),
                );
                let nbr: Vec<f64> = l.chain(r).map(|i| s[i as usize]).collect();
                let base = if nbr.is_empty() {
                    0.0
                } else {
                    nbr.iter().sum::<f64>() / nbr.len() as f64
                };
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
        let shapes = [
            (121, NB),
            (121, Neighbourhood { n: 5, skip: 0 }),
            (8, Neighbourhood { n: 3, skip: 2 }),
            (3, Neighbourhood { n: 3, skip: 1 }),
            (2, Neighbourhood { n: 1, skip: 0 }),
            (1200, Neighbourhood { n: 4, skip: 3 }),
        ];
        for (bins, nb) in shapes {
            for case in 0..50 {
                let amp: Vec<f64> = (0..bins)
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
                let (a, b) = (authors_mean_snr_db(&amp, nb), direct(&amp, nb));
                assert!(
                    (a - b).abs() <= 1e-9 * b.abs().max(1.0),
                    "{bins} bins, {nb:?}, case {case}: {a} vs {b}"
                );
            }
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
