//! [`score_terms`](super::score_terms) and [`authors_mean_snr_db`](super::authors_mean_snr_db) of
//! [`LANES`] neurons side by side, for the thousands of neurons of an image.
//!
//! One neuron's scores are chains of dependent additions and multiplications (the RMS over all
//! bins, the neighbour sums, the authors' running product), each waiting on the one before. Laid
//! out bin-major (`amp[b][l]`: bin `b` of lane `l`), [`LANES`] neurons run the same chain in the
//! lanes of one vector register. Every lane does exactly the operations of the one-neuron
//! functions, in the same order, so the results are the same bits (tested); only the layout
//! differs. The loops are compiled for AVX2 as well, chosen at run time; Rust never fuses a
//! multiply and an add on its own, so the instruction set changes nothing in the results.

use super::snr::{neighbours, Neighbourhood, TermScores};
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

/// Lane by lane `a / b` where `b > 0`, as [`super::snr`]'s `ratio`.
#[inline(always)]
fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

/// `10 log10(x)` for positive `x`, as [`super::snr`]'s `db`.
#[inline(always)]
fn db(x: Option<f64>) -> Option<f64> {
    x.filter(|v| *v > 0.0).map(|v| 10.0 * v.log10())
}

/// [`super::score_terms`] for every lane: the RMS, each term's neighbour mean, variance and
/// off-lattice mean summed lane-wise in the same bin order.
#[inline(always)]
fn score_terms_lanes(
    amp: &[Lanes],
    terms: &TermSet,
    nb: Neighbourhood,
    out: &mut [Vec<TermScores>; LANES],
) {
    let last = amp.len() - 1;
    // `Iterator::sum` of f64 starts from -0.0
    let mut sq = [-0.0f64; LANES];
    for row in &amp[1..] {
        for l in 0..LANES {
            sq[l] += row[l] * row[l];
        }
    }
    let mut rms = [0.0; LANES];
    for l in 0..LANES {
        rms[l] = (sq[l] / last as f64).sqrt();
    }
    for o in out.iter_mut() {
        o.clear();
    }
    for t in &terms.terms {
        let a = amp[t.bin];
        let mut s: [TermScores; LANES] = std::array::from_fn(|l| TermScores {
            amplitude: a[l],
            snr: None,
            snr_db: None,
            snr_lattice: None,
            snr_lattice_db: None,
            zscore: None,
            baseline_corrected: None,
            response_share: ratio(a[l], rms[l]),
        });
        if let Some(bins) = neighbours(t.bin, last, nb) {
            let count = bins.clone().count();
            let mut mean = [-0.0f64; LANES];
            for b in bins.clone() {
                for l in 0..LANES {
                    mean[l] += amp[b][l];
                }
            }
            for m in mean.iter_mut() {
                *m /= count as f64;
            }
            let mut var = [-0.0f64; LANES];
            if count > 1 {
                for b in bins.clone() {
                    for l in 0..LANES {
                        var[l] += (amp[b][l] - mean[l]).powi(2);
                    }
                }
                for v in var.iter_mut() {
                    *v /= (count - 1) as f64;
                }
            }
            let off = bins.filter(|b| !terms.lattice[*b]);
            let n_off = off.clone().count();
            let mut base = [-0.0f64; LANES];
            if n_off > 0 {
                for b in off {
                    for l in 0..LANES {
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

/// [`super::authors_mean_snr_db`] for every lane (its `authors_from_sums`, step for step), with
/// `sums` to work in.
#[inline(always)]
fn authors_lanes(amp: &[Lanes], nb: Neighbourhood, sums: &mut Vec<Lanes>) -> Lanes {
    const GUARD: f64 = 1e-8;
    let s = &amp[1..];
    let len = s.len();
    if len == 0 {
        return [f64::NAN; LANES];
    }
    sums.clear();
    sums.resize(len, [0.0; LANES]);
    let sum = &mut sums[..];
    let (n, skip) = (nb.n, nb.skip);
    let offsets = (skip + 1..=skip + n)
        .rev()
        .map(|d| -(d as isize))
        .chain((skip + 1..=skip + n).map(|d| d as isize));
    // the loops below run over the rows as one flat slice (lane-major within a row): plain
    // element-wise loops that vectorise without gathers
    let (s_flat, sum) = (s.as_flattened(), sum.as_flattened_mut());
    for o in offsets {
        let (lo, hi) = if o < 0 {
            ((-o) as usize, len)
        } else {
            (0, len.saturating_sub(o as usize))
        };
        if lo >= hi {
            continue;
        }
        let from = (lo as isize + o) as usize;
        let src = &s_flat[from * LANES..(from + hi - lo) * LANES];
        for (t, v) in sum[lo * LANES..hi * LANES].iter_mut().zip(src) {
            *t += v;
        }
    }
    #[inline(always)]
    fn factor(v: f64, sum: f64, count: usize) -> f64 {
        let base = if count > 0 { sum / count as f64 } else { 0.0 };
        let snr = (v + GUARD) / (base + GUARD);
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
    for (t, v) in sum[inner_lo * LANES..inner_hi * LANES]
        .iter_mut()
        .zip(&s_flat[inner_lo * LANES..inner_hi * LANES])
    {
        *t = factor(*v, *t, inner);
    }
    for j in (0..inner_lo).chain(inner_hi..len) {
        let left = j.saturating_sub(skip) - j.saturating_sub(reach);
        let right = (j + reach + 1).min(len) - (j + skip + 1).min(len);
        for l in j * LANES..(j + 1) * LANES {
            sum[l] = factor(s_flat[l], sum[l], left + right);
        }
    }
    // the running product of each lane's factors, bins j mod 4 in four products, each kept as
    // a mantissa in [1, 2) and a binary exponent: four rows at a time, as one flat run
    let mut mant = [1.0f64; 4 * LANES];
    let mut exp2 = [0i64; 4 * LANES];
    #[inline(always)]
    fn step(m: &mut f64, e: &mut i64, f: f64) {
        let bits = (*m * f).to_bits();
        *e += ((bits >> 52) & 0x7ff) as i64 - 1023;
        *m = f64::from_bits((bits & !(0x7ff << 52)) | (1023 << 52));
    }
    let mut quads = sum.chunks_exact(4 * LANES);
    for q in quads.by_ref() {
        for ((m, e), f) in mant.iter_mut().zip(exp2.iter_mut()).zip(q) {
            step(m, e, *f);
        }
    }
    // the rows left over are bins 0, 1, 2 mod 4, in that order
    for ((m, e), f) in mant.iter_mut().zip(exp2.iter_mut()).zip(quads.remainder()) {
        step(m, e, *f);
    }
    let (mant, exp2): (&[Lanes], &[[i64; LANES]]) = (mant.as_chunks().0, exp2.as_chunks().0);
    let mut out = [0.0; LANES];
    for l in 0..LANES {
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
