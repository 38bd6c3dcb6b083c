//! Direct convolution on channels-last f32 with AVX-512, for output channels in multiples of 16.
//!
//! Each call of the microkernel computes a tile of `R` neighbouring output pixels of one row by
//! `16 * V` output channels in `R * V` vector registers: for every input position of the window
//! (`ky`, then `kx` and input channel, which are contiguous in a channels-last row) it loads `V`
//! weight vectors and adds each pixel's input value, broadcast, times them. The inputs are read
//! in place from a zero-padded copy of the activation, so there is no im2col buffer to build and
//! pack, and no branch for the borders. Every output sums its terms in the same order, (ky, kx,
//! cin), whatever the tile, the thread or the batch: results do not depend on how frames are
//! grouped into passes.
//!
//! Used where the CPU has AVX-512F (checked at run time) unless `FREQTAG_NO_AVX512=1`;
//! otherwise [`super::layers`] falls back to im2col and the `gemm` crate.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use rayon::prelude::*;

/// Whether [`conv`] can run here: an x86-64 CPU with AVX-512F, and `FREQTAG_NO_AVX512` unset.
pub fn available() -> bool {
    use std::sync::OnceLock;
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let off = std::env::var_os("FREQTAG_NO_AVX512").is_some_and(|v| v != "0");
        #[cfg(target_arch = "x86_64")]
        {
            !off && std::arch::is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = off;
            false
        }
    })
}

/// Whether [`conv`] handles `cout` output channels.
pub fn handles(cout: usize) -> bool {
    cout > 0 && cout.is_multiple_of(16) && available()
}

/// The shape of one convolution: input `[b, h, w, c]`, `cout` outputs, kernel `k`, `stride`,
/// zero padding `pad` on every side.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub b: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Shape {
    /// Output height and width.
    pub fn out(&self) -> (usize, usize) {
        (
            (self.h + 2 * self.pad - self.k) / self.stride + 1,
            (self.w + 2 * self.pad - self.k) / self.stride + 1,
        )
    }
}

/// `[b, ho, wo, cout]` from contiguous `x` `[b, h, w, c]` and `weight` `[k*k*c, cout]` row-major
/// (rows ordered ky, kx, cin). Panics unless [`handles`]`(cout)` and the slices fit the shape.
pub fn conv(x: &[f32], weight: &[f32], s: Shape) -> Vec<f32> {
    assert!(
        handles(s.cout),
        "direct::conv needs AVX-512F and cout % 16 == 0"
    );
    assert_eq!(x.len(), s.b * s.h * s.w * s.c, "direct::conv input size");
    assert_eq!(
        weight.len(),
        s.k * s.k * s.c * s.cout,
        "direct::conv weight size"
    );
    assert!(s.k > 0 && s.stride > 0 && s.h + 2 * s.pad >= s.k && s.w + 2 * s.pad >= s.k);
    let (ho, wo) = s.out();
    let (hp, wp) = (s.h + 2 * s.pad, s.w + 2 * s.pad);
    let padded;
    let xp: &[f32] = if s.pad == 0 {
        x
    } else {
        padded = pad(x, s);
        &padded
    };
    let n = s.cout;
    let len = s.b * ho * wo * n;
    // not zeroed first: the tiles write every output (below)
    let mut out: Vec<f32> = Vec::with_capacity(len);
    // the tiles of one output row, per block of 64, 32 or 16 channels
    let mut blocks = Vec::new();
    let mut co = 0;
    while co < n {
        let v = ((n - co) / 16).min(4);
        let v = if v == 3 { 2 } else { v };
        blocks.push((co, v, tile_width(v, wo)));
        co += 16 * v;
    }
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(wo * n)
        .enumerate()
        .for_each(|(row, o)| {
            let (bi, oy) = (row / ho, row % ho);
            let top = (bi * hp + oy * s.stride) * wp * s.c;
            for &(co, v, r) in &blocks {
                let mut ox = 0;
                while ox < wo {
                    // the last tile ends at the row's end, overlapping the one before it
                    let x0 = ox.min(wo - r.min(wo));
                    let r = r.min(wo);
                    let args = Tile {
                        x: xp[top + x0 * s.stride * s.c..].as_ptr(),
                        pixel: s.stride * s.c,
                        row: wp * s.c,
                        k: s.k,
                        kc: s.k * s.c,
                        w: weight[co..].as_ptr(),
                        n,
                        out: o[x0 * n + co..].as_mut_ptr().cast::<f32>(),
                    };
                    // SAFETY: `available()` holds (asserted by `handles`); the tile reads rows
                    // oy*stride .. +k and columns x0*stride .. +(r-1)*stride+k of the padded input,
                    // all inside it since x0 + r <= wo; it writes r pixels x 16v channels of this
                    // output row from channel co, inside `o` since co + 16v <= n.
                    unsafe { run_tile(v, r, &args) };
                    ox = x0 + r;
                }
            }
        });
    // SAFETY: every row's tiles cover its wo pixels (the last one ends at wo) and the blocks
    // cover all n channels, so all len outputs were written
    unsafe { out.set_len(len) };
    out
}

/// A zero-padded copy of `x`, each element written once (no zeroing pass first).
fn pad(x: &[f32], s: Shape) -> Vec<f32> {
    use std::mem::MaybeUninit;
    let (hp, wp, c, p) = (s.h + 2 * s.pad, s.w + 2 * s.pad, s.c, s.pad);
    let len = s.b * hp * wp * c;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let zero = |o: &mut [MaybeUninit<f32>]| {
        o.iter_mut().for_each(|v| {
            v.write(0.0);
        })
    };
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(wp * c)
        .enumerate()
        .for_each(|(row, o)| {
            let (bi, y) = (row / hp, row % hp);
            if y >= p && y < p + s.h {
                let src = &x[(bi * s.h + y - p) * s.w * c..][..s.w * c];
                let (left, rest) = o.split_at_mut(p * c);
                let (mid, right) = rest.split_at_mut(s.w * c);
                zero(left);
                for (d, v) in mid.iter_mut().zip(src) {
                    d.write(*v);
                }
                zero(right);
            } else {
                zero(o);
            }
        });
    // SAFETY: the rows cover all len elements, and each row was written whole above
    unsafe { out.set_len(len) };
    out
}

/// Pixels per tile for `v` vectors of 16 channels on rows of `wo` pixels: the candidate with
/// the fewest estimated cycles per row (the FMAs of the tiles, overlap included, plus the
/// weight loads and loop overhead per step).
fn tile_width(v: usize, wo: usize) -> usize {
    let candidates: &[usize] = match v {
        1 => &[16, 12, 8, 4, 2, 1],
        2 => &[12, 8, 4, 2, 1],
        _ => &[6, 4, 2, 1],
    };
    candidates
        .iter()
        .copied()
        .filter(|&r| r <= wo)
        .min_by_key(|&r| wo.div_ceil(r) * (r * v + v + 2))
        .unwrap_or(1)
}

/// Where one tile reads and writes.
struct Tile {
    /// The tile's first input: padded row oy*stride, column x0*stride, channel 0.
    x: *const f32,
    /// Floats between neighbouring output pixels' inputs (stride * c).
    pixel: usize,
    /// Floats per padded input row.
    row: usize,
    k: usize,
    /// k * c: the (kx, cin) run of one kernel row, contiguous in the input.
    kc: usize,
    /// Weights of the block's first output channel, rows of `n`.
    w: *const f32,
    n: usize,
    /// The tile's first output, pixels `n` apart.
    out: *mut f32,
}

/// Runs the microkernel for `v` vectors and `r` pixels.
///
/// # Safety
/// AVX-512F must be available, and `t` must describe memory as [`conv`] sets it up.
unsafe fn run_tile(v: usize, r: usize, t: &Tile) {
    macro_rules! pick {
        ($v:literal; $($r:literal),*) => {
            match r {
                $($r => tile::<$r, $v>(t),)*
                _ => unreachable!("tile width {r} for {} vectors", $v),
            }
        };
    }
    #[cfg(target_arch = "x86_64")]
    match v {
        1 => pick!(1; 16, 12, 8, 4, 2, 1),
        2 => pick!(2; 12, 8, 4, 2, 1),
        4 => pick!(4; 6, 4, 2, 1),
        _ => unreachable!("{v} vectors per tile"),
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (v, r, t);
        unreachable!("direct convolution without x86-64")
    }
}

/// Steps (input positions of the window) summed in registers before the partial sums are added
/// to the output: a blocked sum, whose rounding error grows with the block and the number of
/// blocks rather than with the whole window (960 inputs in MobileNetV2's widest 1x1 layers).
const BLOCK: usize = 128;

/// `R` pixels x `V` vectors of 16 output channels.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile<const R: usize, const V: usize>(t: &Tile) {
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    let mut first = true;
    let mut steps = 0;
    for ky in 0..t.k {
        let x = t.x.add(ky * t.row);
        let w = t.w.add(ky * t.kc * t.n);
        for j in 0..t.kc {
            let wr = w.add(j * t.n);
            let mut wv = [_mm512_setzero_ps(); V];
            for (i, wv) in wv.iter_mut().enumerate() {
                *wv = _mm512_loadu_ps(wr.add(16 * i));
            }
            for (p, acc) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*x.add(p * t.pixel + j));
                for (a, wv) in acc.iter_mut().zip(&wv) {
                    *a = _mm512_fmadd_ps(xv, *wv, *a);
                }
            }
            steps += 1;
            if steps == BLOCK {
                flush(t, &mut acc, first);
                first = false;
                steps = 0;
            }
        }
    }
    if steps > 0 || first {
        flush(t, &mut acc, first);
    }
}

/// Stores the tile's partial sums (`first`) or adds them to the outputs, and zeroes them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn flush<const R: usize, const V: usize>(t: &Tile, acc: &mut [[__m512; V]; R], first: bool) {
    for (p, acc) in acc.iter_mut().enumerate() {
        for (i, a) in acc.iter_mut().enumerate() {
            let o = t.out.add(p * t.n + 16 * i);
            let v = if first {
                *a
            } else {
                _mm512_add_ps(_mm512_loadu_ps(o), *a)
            };
            _mm512_storeu_ps(o, v);
            *a = _mm512_setzero_ps();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether to skip: without AVX-512F the kernel cannot run (said loudly).
    fn skip() -> bool {
        if available() {
            return false;
        }
        eprintln!("SKIPPED: no AVX-512F on this CPU (or FREQTAG_NO_AVX512 set)");
        true
    }

    /// Uniform values in [-1, 1) from a fixed seed (a linear congruential generator).
    fn uniform(mut seed: u64) -> impl FnMut() -> f32 {
        move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// A float64 reference convolution, summed in the same (ky, kx, cin) order.
    fn reference(x: &[f32], weight: &[f32], s: Shape) -> Vec<f64> {
        let (ho, wo) = s.out();
        let mut out = vec![0f64; s.b * ho * wo * s.cout];
        for bi in 0..s.b {
            for oy in 0..ho {
                for ox in 0..wo {
                    for co in 0..s.cout {
                        let mut acc = 0f64;
                        for ky in 0..s.k {
                            for kx in 0..s.k {
                                let iy = (oy * s.stride + ky) as isize - s.pad as isize;
                                let ix = (ox * s.stride + kx) as isize - s.pad as isize;
                                if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize {
                                    continue;
                                }
                                for ci in 0..s.c {
                                    let xv = x
                                        [((bi * s.h + iy as usize) * s.w + ix as usize) * s.c + ci]
                                        as f64;
                                    let wv =
                                        weight[((ky * s.k + kx) * s.c + ci) * s.cout + co] as f64;
                                    acc += xv * wv;
                                }
                            }
                        }
                        out[((bi * ho + oy) * wo + ox) * s.cout + co] = acc;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_a_float64_reference_on_every_tile_shape() {
        if skip() {
            return;
        }
        // cout covers 1, 2 and 4 vectors and their mixes (48 = 32 + 16, 112 = 64 + 32 + 16);
        // widths cover every tile width, overlapping last tiles and rows narrower than a tile
        let cases = [
            // (b, h, w, c, cout, k, stride, pad)
            (2, 9, 35, 3, 16, 3, 1, 1),
            (1, 8, 17, 5, 32, 3, 2, 1),
            (2, 6, 13, 7, 64, 3, 1, 1),
            (1, 7, 7, 16, 48, 3, 2, 1),
            (1, 5, 3, 9, 112, 1, 1, 0),
            (3, 4, 1, 4, 16, 1, 1, 0),
            (1, 11, 10, 6, 64, 5, 2, 2),
            (1, 3, 3, 2, 32, 3, 1, 0),
        ];
        let mut rand = uniform(12345);
        for (b, h, w, c, cout, k, stride, pad) in cases {
            let s = Shape {
                b,
                h,
                w,
                c,
                cout,
                k,
                stride,
                pad,
            };
            let x: Vec<f32> = (0..b * h * w * c).map(|_| rand()).collect();
            let weight: Vec<f32> = (0..k * k * c * cout).map(|_| rand()).collect();
            let got = conv(&x, &weight, s);
            let want = reference(&x, &weight, s);
            assert_eq!(got.len(), want.len(), "{s:?}");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let tol = 1e-5 * (1.0 + w.abs()) * (k * k * c) as f64;
                assert!(
                    ((*g as f64) - w).abs() <= tol,
                    "{s:?} output {i}: {g} vs {w}"
                );
            }
        }
    }

    /// MobileNetV2's widest 1x1 layer (960 inputs): summed in blocks, the outputs stay within
    /// 3e-7 of the largest output of a float64 sum. One running sum over all 960 inputs was
    /// 1.0e-6 off on these numbers (and candle's matmul 5.7e-7).
    #[test]
    fn long_windows_are_summed_in_blocks() {
        if skip() {
            return;
        }
        let s = Shape {
            b: 49,
            h: 7,
            w: 7,
            c: 960,
            cout: 160,
            k: 1,
            stride: 1,
            pad: 0,
        };
        let (m, k, n) = (s.b * s.h * s.w, s.c, s.cout);
        let mut rand = uniform(7);
        // post-ReLU inputs, small weights: sums with cancellation, as in a network
        let x: Vec<f32> = (0..m * k).map(|_| rand().max(0.0)).collect();
        let w: Vec<f32> = (0..k * n).map(|_| rand() * 0.05).collect();
        let got = conv(&x, &w, s);
        let (mut err, mut peak) = (0f64, 0f64);
        for i in 0..m {
            for j in 0..n {
                let r: f64 = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[t * n + j] as f64)
                    .sum();
                err = err.max((got[i * n + j] as f64 - r).abs());
                peak = peak.max(r.abs());
            }
        }
        assert!(err <= 3e-7 * peak, "error {err:e} against a peak of {peak}");
    }

    #[test]
    fn outputs_do_not_depend_on_the_batch() {
        if skip() {
            return;
        }
        let s = Shape {
            b: 3,
            h: 8,
            w: 8,
            c: 16,
            cout: 32,
            k: 3,
            stride: 1,
            pad: 1,
        };
        let x: Vec<f32> = (0..s.b * 64 * 16)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let weight: Vec<f32> = (0..9 * 16 * 32)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 11.0)
            .collect();
        let all = conv(&x, &weight, s);
        let one = Shape { b: 1, ..s };
        let per_frame = 8 * 8 * 32;
        for f in 0..s.b {
            let got = conv(&x[f * 64 * 16..(f + 1) * 64 * 16], &weight, one);
            assert_eq!(got, all[f * per_frame..(f + 1) * per_frame], "frame {f}");
        }
    }
}
