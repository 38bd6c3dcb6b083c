//! The frequencies scored: tagged `f_r`, harmonics `h*f_r` (h = 2..H) and intermodulation terms
//! `sum_r m_r f_r` (at least two non-zero `m_r`, `sum |m_r| <= order`), folded back below Nyquist
//! when they alias, and the lattice of bins a deterministic network can respond at.

use serde::Serialize;

/// What a term is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TermKind {
    /// A tagged frequency `f_r`.
    Tagged,
    /// A harmonic `h * f_r`, h >= 2.
    Harmonic,
    /// An intermodulation term.
    Intermod,
}

impl TermKind {
    /// Lower-case name as written in the outputs.
    pub fn as_str(self) -> &'static str {
        match self {
            TermKind::Tagged => "tagged",
            TermKind::Harmonic => "harmonic",
            TermKind::Intermod => "intermod",
        }
    }
}

/// One scored frequency.
#[derive(Debug, Clone, Serialize)]
pub struct Term {
    /// Name like `f1`, `2f2`, `f1+f2`, `2f1-f2`.
    pub name: String,
    /// Kind.
    pub kind: TermKind,
    /// The frequency before aliasing, Hz.
    pub freq_hz: f64,
    /// Where it lands in `[0, fps/2]`, Hz.
    pub alias_hz: f64,
    /// Whether it was at or above Nyquist and folded back.
    pub aliased: bool,
    /// The nearest bin of `alias_hz`.
    pub bin: usize,
    /// Whether `alias_hz` falls exactly on that bin.
    pub on_bin: bool,
}

/// All scored terms of a stimulus, and its response lattice.
#[derive(Debug, Clone, Serialize)]
pub struct TermSet {
    /// The terms, tagged first, then harmonics, then intermodulation by order.
    pub terms: Vec<Term>,
    /// Per bin `0..=N/2`: whether a deterministic network can respond there.
    #[serde(skip)]
    pub lattice: Vec<bool>,
    /// Spacing of the lattice in bins when every tagged frequency is on a bin (the lattice is
    /// then every multiple of it); `None` when the lattice is approximated by the term bins.
    pub lattice_step: Option<usize>,
}

impl TermSet {
    /// The bins `spectra = "terms"` keeps: DC, every term bin and its SNR neighbourhood
    /// (`reach` = skip + neighbours bins each side), sorted, within `0..=N/2`.
    pub fn kept_bins(&self, reach: usize) -> Vec<usize> {
        let last = self.lattice.len() - 1;
        let mut bins = vec![0];
        for t in &self.terms {
            bins.extend(t.bin.saturating_sub(reach)..=(t.bin + reach).min(last));
        }
        bins.sort_unstable();
        bins.dedup();
        bins
    }
}

/// Folds `f` into `[0, fps/2]`: `|((f + fps/2) mod fps) - fps/2|`.
pub fn alias(f: f64, fps: f64) -> f64 {
    ((f + fps / 2.0).rem_euclid(fps) - fps / 2.0).abs()
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl TermSet {
    /// The terms for `freqs` at `fps` over `frames` frames. Notes about aliased or DC terms go
    /// to `warnings`.
    pub fn new(
        freqs: &[f64],
        fps: f64,
        frames: usize,
        harmonics: u32,
        intermod_order: u32,
        warnings: &mut Vec<String>,
    ) -> Self {
        let mut raw: Vec<(String, TermKind, f64)> = Vec::new();
        for (r, f) in freqs.iter().enumerate() {
            raw.push((format!("f{}", r + 1), TermKind::Tagged, *f));
        }
        for h in 2..=harmonics {
            for (r, f) in freqs.iter().enumerate() {
                raw.push((format!("{h}f{}", r + 1), TermKind::Harmonic, h as f64 * f));
            }
        }
        for (m, f) in intermod_vectors(freqs, intermod_order) {
            raw.push((intermod_name(&m), TermKind::Intermod, f));
        }
        let bin_hz = fps / frames as f64;
        let mut terms = Vec::new();
        for (name, kind, f) in raw {
            let alias_hz = alias(f, fps);
            let aliased = f >= fps / 2.0;
            let pos = alias_hz / bin_hz;
            let bin = pos.round() as usize;
            if bin == 0 {
                warnings.push(format!(
                    "term {name} ({f} Hz) lands on DC at {fps} fps and is not scored"
                ));
                continue;
            }
            if aliased {
                warnings.push(format!(
                    "term {name} ({f} Hz) is above Nyquist and aliases to {alias_hz} Hz (marked aliased in the outputs)"
                ));
            }
            terms.push(Term {
                name,
                kind,
                freq_hz: f,
                alias_hz,
                aliased,
                bin,
                on_bin: (pos - pos.round()).abs() < 1e-9,
            });
        }
        let nbins = frames / 2 + 1;
        let tagged_bins: Vec<f64> = freqs.iter().map(|f| f / bin_hz).collect();
        let exact = tagged_bins.iter().all(|b| (b - b.round()).abs() < 1e-9);
        let (lattice, lattice_step) = if exact {
            let step = tagged_bins
                .iter()
                .fold(frames, |g, b| gcd(g, b.round() as usize));
            ((0..nbins).map(|k| k % step == 0).collect(), Some(step))
        } else {
            let mut l = vec![false; nbins];
            l[0] = true;
            for t in &terms {
                l[t.bin] = true;
            }
            (l, None)
        };
        TermSet {
            terms,
            lattice,
            lattice_step,
        }
    }
}

/// Integer vectors `m` with at least two non-zero entries and `sum |m| <= order`, one of each
/// `m`/`-m` pair (the one with a positive frequency), with that frequency.
fn intermod_vectors(freqs: &[f64], order: u32) -> Vec<(Vec<i32>, f64)> {
    fn rec(i: usize, budget: i32, cur: &mut Vec<i32>, out: &mut Vec<Vec<i32>>, n: usize) {
        if i == n {
            if cur.iter().filter(|m| **m != 0).count() >= 2 {
                out.push(cur.clone());
            }
            return;
        }
        for m in -budget..=budget {
            cur.push(m);
            rec(i + 1, budget - m.abs(), cur, out, n);
            cur.pop();
        }
    }
    let mut all = Vec::new();
    rec(0, order as i32, &mut Vec::new(), &mut all, freqs.len());
    let mut out: Vec<(Vec<i32>, f64)> = Vec::new();
    for m in all {
        let f: f64 = m.iter().zip(freqs).map(|(m, f)| *m as f64 * f).sum();
        if f <= 1e-12 {
            continue; // its negation (if f < 0) is kept; f == 0 is DC
        }
        out.push((m, f));
    }
    // by order, then by frequency, then by name for a stable order
    out.sort_by(|a, b| {
        let oa: i32 = a.0.iter().map(|m| m.abs()).sum();
        let ob: i32 = b.0.iter().map(|m| m.abs()).sum();
        oa.cmp(&ob)
            .then(a.1.total_cmp(&b.1))
            .then(intermod_name(&a.0).cmp(&intermod_name(&b.0)))
    });
    out
}

/// `f1+f2`, `2f1-f2`, `f2-f1`: positive coefficients first, a coefficient of 1 left out.
fn intermod_name(m: &[i32]) -> String {
    let mut s = String::new();
    let part = |c: i32, r: usize| {
        if c.abs() == 1 {
            format!("f{}", r + 1)
        } else {
            format!("{}f{}", c.abs(), r + 1)
        }
    };
    for (r, c) in m.iter().enumerate().filter(|(_, c)| **c > 0) {
        if !s.is_empty() {
            s.push('+');
        }
        s.push_str(&part(*c, r));
    }
    for (r, c) in m.iter().enumerate().filter(|(_, c)| **c < 0) {
        s.push('-');
        s.push_str(&part(*c, r));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_terms() {
        let t = TermSet::new(&[6.0, 7.5], 120.0, 240, 2, 2, &mut Vec::new());
        let names: Vec<(&str, f64, usize)> = t
            .terms
            .iter()
            .map(|t| (t.name.as_str(), t.freq_hz, t.bin))
            .collect();
        assert_eq!(
            names,
            vec![
                ("f1", 6.0, 12),
                ("f2", 7.5, 15),
                ("2f1", 12.0, 24),
                ("2f2", 15.0, 30),
                ("f2-f1", 1.5, 3),
                ("f1+f2", 13.5, 27),
            ]
        );
        assert_eq!(t.lattice_step, Some(3));
        let kept = t.kept_bins(4);
        assert_eq!(kept[..2], [0, 1]); // DC, then f2-f1's window from bin 0
        assert!(
            kept.contains(&8) && kept.contains(&34) && !kept.contains(&35) && !kept.contains(&60)
        );
        assert!(t.lattice[9] && t.lattice[12] && !t.lattice[13] && !t.lattice[14]);
    }

    #[test]
    fn third_order_intermodulation() {
        let t = TermSet::new(&[6.0, 7.5], 120.0, 240, 1, 3, &mut Vec::new());
        let names: Vec<&str> = t.terms.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            vec!["f1", "f2", "f2-f1", "f1+f2", "2f1-f2", "2f2-f1", "2f1+f2", "f1+2f2"]
        );
        let t9 = &t.terms[5];
        assert_eq!((t9.freq_hz, t9.bin), (9.0, 18));
    }

    #[test]
    fn aliasing_folds_above_nyquist() {
        assert_eq!(alias(70.0, 120.0), 50.0);
        assert_eq!(alias(130.0, 120.0), 10.0);
        assert_eq!(alias(59.0, 120.0), 59.0);
        let mut w = Vec::new();
        let t = TermSet::new(&[35.0], 120.0, 240, 2, 2, &mut w);
        let h = &t.terms[1];
        assert_eq!(
            (h.name.as_str(), h.alias_hz, h.aliased, h.bin),
            ("2f1", 50.0, true, 100)
        );
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn off_bin_frequencies_use_term_bins_as_lattice() {
        let t = TermSet::new(&[6.0, 7.5], 120.0, 120, 2, 2, &mut Vec::new());
        assert_eq!(t.lattice_step, None);
        let f2 = &t.terms[1];
        assert!(!f2.on_bin);
        assert_eq!(f2.bin, 8); // 7.5 rounds to 8 (half away from zero)
    }
}
