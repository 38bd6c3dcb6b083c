//! Amplitude spectra (METHOD.md section 3): `A[k] = |rfft(w * x)[k]| / sum(w)`, `k = 0..N/2`.
//! With the default rectangular window `sum(w) = N`, the method's `|rfft(x)[k]| / N`.
//!
//! In: one neuron's activation over N frames. Out: N/2+1 amplitudes (f64).

use std::sync::Arc;

use rustfft::num_complex::Complex;
use rustfft::{Fft, FftPlanner};
use serde::{Deserialize, Serialize};

/// Analysis window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Window {
    /// Rectangular (none): right for bin-locked runs.
    Rect,
    /// Hann.
    Hann,
    /// Hamming.
    Hamming,
    /// Blackman.
    Blackman,
}

impl Window {
    /// The window's N coefficients (periodic form, as for spectral analysis).
    pub fn coefficients(self, n: usize) -> Vec<f64> {
        let tau = 2.0 * std::f64::consts::PI;
        (0..n)
            .map(|i| {
                let t = tau * i as f64 / n as f64;
                match self {
                    Window::Rect => 1.0,
                    Window::Hann => 0.5 - 0.5 * t.cos(),
                    Window::Hamming => 0.54 - 0.46 * t.cos(),
                    Window::Blackman => 0.42 - 0.5 * t.cos() + 0.08 * (2.0 * t).cos(),
                }
            })
            .collect()
    }
}

/// A series of N values, read by index.
trait Series: Copy {
    /// Value `i` as f64.
    fn at(self, i: usize) -> f64;
}

impl<T: Copy + Into<f64>> Series for &[T] {
    #[inline(always)]
    fn at(self, i: usize) -> f64 {
        self[i].into()
    }
}

/// The series `values[map[t]]`.
#[derive(Clone, Copy)]
struct Gather<'a> {
    values: &'a [f32],
    map: &'a [usize],
}

impl Series for Gather<'_> {
    #[inline(always)]
    fn at(self, i: usize) -> f64 {
        self.values[self.map[i]] as f64
    }
}

/// Whether the CPU has AVX2: for the loops around the FFT, those of the scores
/// ([`crate::score::block`]) and, without AVX-512, the depthwise convolution's
/// (`model::layers`), compiled for it as well and chosen at run time.
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx2() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx2"))
}

/// A reusable amplitude-spectrum computer for series of one length.
///
/// For even N the real series goes through a complex FFT of half the length (even samples as
/// real parts, odd as imaginary), untangled into the N/2+1 bins with precomputed twiddles: half
/// the work of a complex FFT of N real values. Odd N takes the complex FFT of N.
pub struct Spectrum {
    n: usize,
    window: Vec<f64>,
    gain: f64,
    fft: Arc<dyn Fft<f64>>,
    buf: Vec<Complex<f64>>,
    scratch: Vec<Complex<f64>>,
    /// `exp(-2 pi i k / N)`, k = 0..=N/2, for even N (empty for odd N).
    twiddles: Vec<Complex<f64>>,
}

impl Spectrum {
    /// A spectrum of `n`-point series with `window`.
    pub fn new(n: usize, window: Window) -> Self {
        let half = n.is_multiple_of(2) && n >= 2;
        let len = if half { n / 2 } else { n };
        let fft = FftPlanner::new().plan_fft_forward(len);
        let window = window.coefficients(n);
        let gain = window.iter().sum();
        let scratch = vec![Complex::default(); fft.get_inplace_scratch_len()];
        let twiddles = if half {
            (0..=n / 2)
                .map(|k| {
                    Complex::from_polar(1.0, -2.0 * std::f64::consts::PI * k as f64 / n as f64)
                })
                .collect()
        } else {
            Vec::new()
        };
        Spectrum {
            n,
            window,
            gain,
            fft,
            buf: vec![Complex::default(); len],
            scratch,
            twiddles,
        }
    }

    /// Number of bins, `N/2 + 1`.
    pub fn bins(&self) -> usize {
        self.n / 2 + 1
    }

    /// The amplitude spectrum of `x` (length N) into `out` (length N/2+1), computed in f64.
    ///
    /// The loops around the FFT (packing, untangling, square roots and the division by the
    /// window's gain: three quarters of the time of a 240-frame spectrum, the FFT itself a
    /// quarter) are compiled for AVX2 as well and chosen at run time; the same operations in the
    /// same order, so the same bits.
    pub fn amplitude_into<T: Copy + Into<f64>>(&mut self, x: &[T], out: &mut [f64]) {
        assert_eq!(x.len(), self.n, "series length");
        assert_eq!(out.len(), self.bins(), "bins");
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: the CPU has AVX2 (checked by `avx2`)
            return unsafe { self.amplitude_avx2(x, out) };
        }
        self.amplitude_plain(x, out)
    }

    /// [`Spectrum::amplitude_into`] of the series `values[map[t]]`, t = 0..N (a series kept as
    /// its values per distinct frame), gathered as it is packed for the FFT rather than written
    /// out first: the same bits.
    pub fn amplitude_gather(&mut self, values: &[f32], map: &[usize], out: &mut [f64]) {
        assert_eq!(map.len(), self.n, "series length");
        assert_eq!(out.len(), self.bins(), "bins");
        let x = Gather { values, map };
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: the CPU has AVX2 (checked by `avx2`)
            return unsafe { self.amplitude_avx2(x, out) };
        }
        self.amplitude_plain(x, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn amplitude_avx2(&mut self, x: impl Series, out: &mut [f64]) {
        self.amplitude_plain(x, out)
    }

    #[inline(always)]
    fn amplitude_plain(&mut self, x: impl Series, out: &mut [f64]) {
        // |c| without hypot's overflow guards: amplitudes here are far from f64's limits
        let norm = |c: Complex<f64>| (c.re * c.re + c.im * c.im).sqrt();
        if self.twiddles.is_empty() {
            for (i, (b, w)) in self.buf.iter_mut().zip(&self.window).enumerate() {
                *b = Complex::new(x.at(i) * w, 0.0);
            }
            self.fft
                .process_with_scratch(&mut self.buf, &mut self.scratch);
            for (o, c) in out.iter_mut().zip(&self.buf) {
                *o = norm(*c) / self.gain;
            }
            return;
        }
        let m = self.n / 2;
        for (i, (b, w)) in self
            .buf
            .iter_mut()
            .zip(self.window.chunks_exact(2))
            .enumerate()
        {
            *b = Complex::new(x.at(2 * i) * w[0], x.at(2 * i + 1) * w[1]);
        }
        self.fft
            .process_with_scratch(&mut self.buf, &mut self.scratch);
        // Z = FFT(even + i odd): E[k] = (Z[k] + conj Z[m-k]) / 2, O[k] = (Z[k] - conj Z[m-k]) / 2i,
        // X[k] = E[k] + exp(-2 pi i k / N) O[k], with Z[m] = Z[0]. The squared magnitudes go
        // into `out` first and their roots after, in a loop of its own that vectorises.
        let z = &self.buf;
        let bin = |a: Complex<f64>, b: Complex<f64>, t: &Complex<f64>| {
            let e = (a + b) * 0.5;
            let d = (a - b) * 0.5;
            let c = e + t * Complex::new(d.im, -d.re);
            c.re * c.re + c.im * c.im
        };
        let (first, last) = (z[0], z[0].conj());
        out[0] = bin(first, last, &self.twiddles[0]);
        out[m] = bin(first, last, &self.twiddles[m]);
        for (((o, a), b), t) in out[1..m]
            .iter_mut()
            .zip(&z[1..m])
            .zip(z[1..m].iter().rev())
            .zip(&self.twiddles[1..m])
        {
            *o = bin(*a, b.conj(), t);
        }
        for o in out.iter_mut() {
            *o = o.sqrt() / self.gain;
        }
    }

    /// The amplitude spectrum of `x` as a new vector.
    pub fn amplitude<T: Copy + Into<f64>>(&mut self, x: &[T]) -> Vec<f64> {
        let mut out = vec![0.0; self.bins()];
        self.amplitude_into(x, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f64::consts::PI;

    /// A series gathered from its distinct values while packed is the series written out:
    /// the same bits, for even and odd lengths and every window.
    #[test]
    fn gathered_series_give_the_same_bits() {
        for (n, window) in [
            (240, Window::Rect),
            (240, Window::Hann),
            (97, Window::Blackman),
        ] {
            let values: Vec<f32> = (0..49).map(|i| ((i * 37 % 101) as f32).sin()).collect();
            let map: Vec<usize> = (0..n).map(|i| (i * 7 + i / 5) % 49).collect();
            let series: Vec<f32> = map.iter().map(|&d| values[d]).collect();
            let mut sp = Spectrum::new(n, window);
            let want = sp.amplitude(&series);
            let mut got = vec![0.0; sp.bins()];
            sp.amplitude_gather(&values, &map, &mut got);
            assert!(want
                .iter()
                .zip(&got)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }

    #[test]
    fn a_sinusoid_on_a_bin_has_half_its_amplitude_there() {
        // 0.8 * sin at 6 Hz, 120 fps, 240 frames: bin 12; plus DC 2.
        let x: Vec<f64> = (0..240)
            .map(|i| 2.0 + 0.8 * (2.0 * PI * 6.0 * i as f64 / 120.0 + 0.3).sin())
            .collect();
        let a = Spectrum::new(240, Window::Rect).amplitude(&x);
        assert_eq!(a.len(), 121);
        assert!((a[0] - 2.0).abs() < 1e-12);
        assert!((a[12] - 0.4).abs() < 1e-12);
        for (k, v) in a.iter().enumerate() {
            if k != 0 && k != 12 {
                assert!(*v < 1e-12, "bin {k} = {v}");
            }
        }
    }

    #[test]
    fn off_bin_leakage_matches_the_dirichlet_kernel() {
        // A complex-free check: a cosine at bin 12.5 of N = 240. Its amplitude at bin k is
        // (1/2N) |D(k - 12.5)| + (1/2N) |D(k + 12.5)| up to the phase of the two images, where
        // D(d) = sin(pi d) / sin(pi d / N) e^{...}. Use the exact sum as the independent value.
        let n = 240usize;
        let f = 12.5;
        let x: Vec<f64> = (0..n)
            .map(|i| (2.0 * PI * f * i as f64 / n as f64).cos())
            .collect();
        let a = Spectrum::new(n, Window::Rect).amplitude(&x);
        for k in [10usize, 12, 13, 20, 60] {
            // direct DFT in closed form: sum of two geometric series
            let dft = |d: f64| -> (f64, f64) {
                // sum_i e^{2 pi i d i / N} = (1 - e^{2 pi i d}) / (1 - e^{2 pi i d / N})
                let num = (1.0 - (2.0 * PI * d).cos(), -(2.0 * PI * d).sin());
                let den = (
                    1.0 - (2.0 * PI * d / n as f64).cos(),
                    -(2.0 * PI * d / n as f64).sin(),
                );
                let m = den.0 * den.0 + den.1 * den.1;
                (
                    (num.0 * den.0 + num.1 * den.1) / m,
                    (num.1 * den.0 - num.0 * den.1) / m,
                )
            };
            let (r1, i1) = dft(f - k as f64);
            let (r2, i2) = dft(-f - k as f64);
            let want = (((r1 + r2) / 2.0).powi(2) + ((i1 + i2) / 2.0).powi(2)).sqrt() / n as f64;
            assert!((a[k] - want).abs() < 1e-12, "bin {k}: {} vs {want}", a[k]);
        }
        // the leak is real: 2 bins away still holds a visible share of the peak
        assert!(a[10] > 0.02 * a[12]);
    }

    /// Every bin against a direct DFT summed in f64, for even lengths (the half-length FFT)
    /// and odd ones (the full complex FFT), with and without a window.
    #[test]
    fn every_bin_matches_a_direct_dft() {
        let mut seed = 17u64;
        let mut rand = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        for n in [2usize, 6, 15, 16, 49, 240, 250] {
            for window in [Window::Rect, Window::Hann] {
                let x: Vec<f64> = (0..n).map(|_| 3.0 + rand()).collect();
                let a = Spectrum::new(n, window).amplitude(&x);
                let w = window.coefficients(n);
                let gain: f64 = w.iter().sum();
                assert_eq!(a.len(), n / 2 + 1);
                for (k, got) in a.iter().enumerate() {
                    let (mut re, mut im) = (0f64, 0f64);
                    for (i, (v, w)) in x.iter().zip(&w).enumerate() {
                        let t = -2.0 * PI * (k * i) as f64 / n as f64;
                        re += v * w * t.cos();
                        im += v * w * t.sin();
                    }
                    let want = (re * re + im * im).sqrt() / gain;
                    assert!(
                        (got - want).abs() < 1e-12,
                        "n = {n}, {window:?}, bin {k}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn hann_keeps_a_bin_locked_sinusoid_amplitude() {
        let x: Vec<f64> = (0..240)
            .map(|i| (2.0 * PI * 15.0 * i as f64 / 240.0).sin())
            .collect();
        let a = Spectrum::new(240, Window::Hann).amplitude(&x);
        assert!((a[15] - 0.5).abs() < 1e-12);
        assert!((a[14] - 0.25).abs() < 1e-12);
    }
}
