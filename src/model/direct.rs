//! Direct convolution on channels-last f32 with AVX-512 or AVX2, for output channels in
//! multiples of 8.
//!
//! Each call of the microkernel computes a tile of `R` neighbouring output pixels of one row by
//! `V` vectors of output channels in `R * V` vector registers: for every input position of the
//! window (`ky`, then `kx` and input channel, which are contiguous in a channels-last row) it
//! loads `V` weight vectors and adds each pixel's input value, broadcast, times them. The inputs
//! are read in place from a zero-padded copy of the activation, so there is no im2col buffer to
//! build and pack, and no branch for the borders. Every output sums its terms in the same order,
//! (ky, kx, cin), whatever the tile, the thread, the batch or the instruction set: results do
//! not depend on how frames are grouped into passes, and AVX2 gives the same bits as AVX-512
//! (one fused multiply-add per term in both).
//!
//! The instruction set is chosen at run time ([`isa`]): AVX-512F where the CPU has it and
//! `FREQTAG_NO_AVX512` is unset (with AVX2 tiles for a last block of 8 channels), else AVX2
//! with FMA (most x86-64 CPUs of the last decade); `FREQTAG_NO_DIRECT=1` turns the kernel off.
//! Without it [`super::layers`] falls back to im2col and the `gemm` crate.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use rayon::prelude::*;

/// The vector instructions the kernel runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// 16 floats per register, 32 registers.
    Avx512,
    /// AVX2 with FMA: 8 floats per register, 16 registers.
    Avx2,
}

impl Isa {
    /// Floats per vector register.
    pub fn lanes(self) -> usize {
        match self {
            Isa::Avx512 => 16,
            Isa::Avx2 => 8,
        }
    }

    /// Whether this CPU can run it (whatever the environment says).
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
                Isa::Avx2 => {
                    std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Vectors per tile for the `left` output channels still to cover (a multiple of
    /// [`Isa::lanes`]): as wide as the registers allow.
    fn vectors(self, left: usize) -> usize {
        let v = left / self.lanes();
        match self {
            Isa::Avx512 if v >= 4 => 4,
            Isa::Avx512 => v.min(2),
            Isa::Avx2 => v.min(2),
        }
    }

    /// Pixels per tile that may be tried for `v` vectors: the accumulators, the weights and a
    /// broadcast input fit the register file.
    fn widths(self, v: usize) -> &'static [usize] {
        match (self, v) {
            (Isa::Avx512, 1) => &[16, 12, 8, 4, 2, 1],
            (Isa::Avx512, 2) => &[12, 8, 4, 2, 1],
            (Isa::Avx512, _) => &[6, 4, 2, 1],
            (Isa::Avx2, 1) => &[12, 8, 4, 2, 1],
            (Isa::Avx2, _) => &[6, 4, 2, 1],
        }
    }
}

/// The instruction set [`conv`] runs with here: AVX-512 unless the CPU lacks AVX-512F or
/// `FREQTAG_NO_AVX512` is set, else AVX2 with FMA; `None` without either, or with
/// `FREQTAG_NO_DIRECT` set.
pub fn isa() -> Option<Isa> {
    use std::sync::OnceLock;
    static ISA: OnceLock<Option<Isa>> = OnceLock::new();
    *ISA.get_or_init(|| {
        let set = |k: &str| std::env::var_os(k).is_some_and(|v| v != "0");
        if set("FREQTAG_NO_DIRECT") {
            None
        } else if !set("FREQTAG_NO_AVX512") && Isa::Avx512.supported() {
            Some(Isa::Avx512)
        } else if Isa::Avx2.supported() {
            Some(Isa::Avx2)
        } else {
            None
        }
    })
}

/// Whether [`conv`] can run here (see [`isa`]).
pub fn available() -> bool {
    isa().is_some()
}

/// Whether [`conv`] handles `cout` output channels (a multiple of 8).
pub fn handles(cout: usize) -> bool {
    available() && cout > 0 && cout.is_multiple_of(8)
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
/// (rows ordered ky, kx, cin), with [`isa`]. Panics unless [`handles`]`(cout)` and the slices
/// fit the shape.
pub fn conv(x: &[f32], weight: &[f32], s: Shape) -> Vec<f32> {
    let isa = isa().expect("direct::conv needs AVX-512F or AVX2 with FMA");
    conv_with(isa, x, weight, s)
}

/// [`conv`] with the instruction set `isa`, which the CPU must support (AVX-512 runs a last
/// block of 8 channels with AVX2, which every AVX-512 CPU has).
pub fn conv_with(isa: Isa, x: &[f32], weight: &[f32], s: Shape) -> Vec<f32> {
    run(isa, x, weight, s, None, None)
}

/// An epilogue run on each output row once it is written (and summed): the row's index in
/// `[b * ho]` and its `wo * cout` values, changed in place while they are in cache.
pub type RowEpilogue<'a> = &'a (dyn Fn(usize, &mut [f32]) + Sync);

/// [`conv_mean_then_with`] with [`isa`].
pub fn conv_then(
    x: &[f32],
    weight: &[f32],
    s: Shape,
    mean: bool,
    epilogue: Option<RowEpilogue>,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let isa = isa().expect("direct::conv needs AVX-512F or AVX2 with FMA");
    conv_mean_then_with(isa, x, weight, s, mean, epilogue)
}

/// The convolution with the instruction set `isa`; with `mean`, also the spatial mean
/// `[b, cout]` of its output, taken row by row as each output row is finished (while it is in
/// cache) instead of in a second pass over the whole output: per row a sum in f64 over its
/// pixels in order, then per frame the rows' sums in order; then `epilogue` on each row (after
/// the row's sums, so the mean is of the convolution's own output).
pub fn conv_mean_then_with(
    isa: Isa,
    x: &[f32],
    weight: &[f32],
    s: Shape,
    mean: bool,
    epilogue: Option<RowEpilogue>,
) -> (Vec<f32>, Option<Vec<f32>>) {
    if !mean {
        return (run(isa, x, weight, s, None, epilogue), None);
    }
    let (ho, wo) = s.out();
    let mut rows = vec![0f64; s.b * ho * s.cout];
    let out = run(isa, x, weight, s, Some(&mut rows), epilogue);
    (out, Some(frame_means(&rows, s.cout, ho, wo)))
}

/// The spatial means `[b, cout]` from each output row's sums `rows` (`[b * ho, cout]`, of `wo`
/// pixels each): per frame the rows' sums added in order, then divided by `ho * wo`.
pub(crate) fn frame_means(rows: &[f64], cout: usize, ho: usize, wo: usize) -> Vec<f32> {
    let n = (ho * wo) as f64;
    let mut mean = vec![0f32; rows.len() / ho];
    for (m, frame) in mean
        .chunks_exact_mut(cout)
        .zip(rows.chunks_exact(ho * cout))
    {
        let mut acc = vec![0f64; cout];
        for row in frame.chunks_exact(cout) {
            for (a, r) in acc.iter_mut().zip(row) {
                *a += r;
            }
        }
        for (m, a) in m.iter_mut().zip(acc) {
            *m = (a / n) as f32;
        }
    }
    mean
}

/// The convolution; with `rows` (`[b * ho, cout]`, zero) also each output row's sums; then
/// `epilogue` on each row.
fn run(
    isa: Isa,
    x: &[f32],
    weight: &[f32],
    s: Shape,
    rows: Option<&mut [f64]>,
    epilogue: Option<RowEpilogue>,
) -> Vec<f32> {
    assert!(isa.supported(), "direct::conv: this CPU lacks {isa:?}");
    assert!(
        s.cout > 0 && s.cout.is_multiple_of(8),
        "direct::conv needs cout % 8 == 0"
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
    let blocks = blocks(isa, n, wo);
    let tiles = |row: usize, o: &mut [std::mem::MaybeUninit<f32>]| {
        let (bi, oy) = (row / ho, row % ho);
        let top = (bi * hp + oy * s.stride) * wp * s.c;
        for &(co, isa, v, r) in &blocks {
            each_tile(wo, r, |x0, r| {
                let args = Tile {
                    x: xp[top + x0 * s.stride * s.c..].as_ptr(),
                    pixel: s.stride * s.c,
                    row: wp * s.c,
                    k: s.k,
                    kc: s.k * s.c,
                    w: weight[co..].as_ptr(),
                    n,
                    out: o[x0 * n + co..].as_mut_ptr().cast::<f32>(),
                    ostride: n,
                };
                // SAFETY: the CPU supports the block's `isa` (asserted in `blocks`); the tile
                // reads rows oy*stride .. +k and columns x0*stride .. +(r-1)*stride+k of the
                // padded input, all inside it since x0 + r <= wo; it writes r pixels x v
                // vectors of this output row from channel co, inside `o` since
                // co + lanes * v <= n.
                unsafe { run_tile(isa, v, r, &args) };
            });
        }
    };
    let finish = |row: usize, o: &mut [std::mem::MaybeUninit<f32>], sums: Option<&mut [f64]>| {
        tiles(row, o);
        // SAFETY: the tiles above wrote all wo * n outputs of this row
        let o: &mut [f32] = unsafe { &mut *(o as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
        if let Some(sums) = sums {
            add_row_sums(Some(isa), sums, o);
        }
        if let Some(epilogue) = epilogue {
            epilogue(row, o);
        }
    };
    let dst = &mut out.spare_capacity_mut()[..len];
    match rows {
        None => dst
            .par_chunks_mut(wo * n)
            .enumerate()
            .for_each(|(row, o)| finish(row, o, None)),
        Some(rows) => dst
            .par_chunks_mut(wo * n)
            .zip(rows.par_chunks_mut(n))
            .enumerate()
            .for_each(|(row, (o, sums))| finish(row, o, Some(sums))),
    }
    // SAFETY: every row's tiles cover its wo pixels (the last one ends at wo) and the blocks
    // cover all n channels, so all len outputs were written
    unsafe { out.set_len(len) };
    out
}

/// How a row of `width` outputs of `n` channels (a multiple of 8) is tiled: per block of
/// channels, its first channel, its instruction set (AVX2 for a last block of 8 under
/// AVX-512), its vectors and its tile width.
fn blocks(isa: Isa, n: usize, width: usize) -> Vec<(usize, Isa, usize, usize)> {
    let mut blocks = Vec::new();
    let mut co = 0;
    while co < n {
        let left = n - co;
        let isa = if left < isa.lanes() { Isa::Avx2 } else { isa };
        assert!(isa.supported(), "direct::conv: this CPU lacks {isa:?}");
        let v = isa.vectors(left);
        blocks.push((co, isa, v, tile_width(isa, v, width)));
        co += isa.lanes() * v;
    }
    blocks
}

/// A matrix product by the convolution's microkernel, for products of one shape done many
/// times (Winograd's, [`super::winograd`]): `m` rows of `k` inputs, `a_stride` floats apart,
/// times `w` `[k, n]` row-major, into `m` rows of `n` outputs `out_stride` floats apart. Every
/// output sums its `k` terms in order with one fused multiply-add each, in blocks of
/// [`BLOCK`], whatever the instruction set.
pub(crate) struct RowProduct {
    blocks: Vec<(usize, Isa, usize, usize)>,
    m: usize,
    k: usize,
    n: usize,
}

impl RowProduct {
    /// Panics unless `n` is a positive multiple of 8 and the CPU supports `isa`.
    pub(crate) fn new(isa: Isa, m: usize, k: usize, n: usize) -> Self {
        assert!(n > 0 && n.is_multiple_of(8) && m > 0 && k > 0);
        RowProduct {
            blocks: blocks(isa, n, m),
            m,
            k,
            n,
        }
    }

    /// `out[i * out_stride + j] = sum over t of a[i * a_stride + t] * w[t * n + j]`.
    pub(crate) fn run(
        &self,
        a: &[f32],
        a_stride: usize,
        w: &[f32],
        out: &mut [f32],
        out_stride: usize,
    ) {
        let (m, k, n) = (self.m, self.k, self.n);
        assert!(a_stride >= k && out_stride >= n);
        assert!(
            a.len() >= (m - 1) * a_stride + k,
            "row product: input too short"
        );
        assert!(w.len() >= k * n, "row product: weight too short");
        assert!(
            out.len() >= (m - 1) * out_stride + n,
            "row product: output too short"
        );
        for &(co, isa, v, r) in &self.blocks {
            each_tile(m, r, |i0, r| {
                let args = Tile {
                    x: a[i0 * a_stride..].as_ptr(),
                    pixel: a_stride,
                    row: 0,
                    k: 1,
                    kc: k,
                    w: w[co..].as_ptr(),
                    n,
                    out: out[i0 * out_stride + co..].as_mut_ptr(),
                    ostride: out_stride,
                };
                // SAFETY: the CPU supports the block's `isa` (asserted in `blocks`); the tile
                // reads rows i0 .. i0 + r of `a` (k floats each) and k rows of `w` from column
                // co, and writes those rows of `out` from column co, lanes * v <= n - co wide:
                // all inside the slices by the asserts above, as i0 + r <= m.
                unsafe { run_tile(isa, v, r, &args) };
            });
        }
    }
}

/// Calls `tile(start, width)` for tiles of `r` pixels (fewer only where the row is narrower)
/// covering a row of `width` pixels: the last tile ends at the row's end, overlapping the one
/// before it.
fn each_tile(width: usize, r: usize, mut tile: impl FnMut(usize, usize)) {
    let r = r.min(width);
    let mut x = 0;
    while x < width {
        let x0 = x.min(width - r);
        tile(x0, r);
        x = x0 + r;
    }
}

/// Adds each pixel of the output row `o` (`sums.len()` channels a pixel), in f64, to `sums`, in
/// pixel order, compiled for `isa` (plain without one): the closure around the tiles is not, and this loop on
/// SSE2's two doubles a step took 8 % of the quickstart's time on one thread. Each channel's
/// sum is the same chain of additions in any width, so the same bits.
pub(crate) fn add_row_sums(isa: Option<Isa>, sums: &mut [f64], o: &[f32]) {
    // a block of W channels at a time, its sums kept in registers over the row's pixels
    // rather than loaded and stored for every pixel; per channel the same additions in the
    // same order
    #[inline(always)]
    fn block<const W: usize>(sums: &mut [f64], o: &[f32], ch: usize) {
        let n = sums.len();
        let mut acc: [f64; W] = std::array::from_fn(|j| sums[ch + j]);
        for px in o.chunks_exact(n) {
            let px: &[f32; W] = px[ch..ch + W].try_into().expect("W channels");
            for (a, v) in acc.iter_mut().zip(px) {
                *a += *v as f64;
            }
        }
        sums[ch..ch + W].copy_from_slice(&acc);
    }
    #[inline(always)]
    fn plain(sums: &mut [f64], o: &[f32]) {
        let n = sums.len();
        let mut ch = 0;
        while ch + 16 <= n {
            block::<16>(sums, o, ch);
            ch += 16;
        }
        if ch + 8 <= n {
            block::<8>(sums, o, ch);
            ch += 8;
        }
        while ch < n {
            block::<1>(sums, o, ch);
            ch += 1;
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512(sums: &mut [f64], o: &[f32]) {
        plain(sums, o)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn avx2(sums: &mut [f64], o: &[f32]) {
        plain(sums, o)
    }
    #[cfg(target_arch = "x86_64")]
    match isa.filter(|isa| isa.supported()) {
        // SAFETY: the CPU supports AVX-512F (checked just above)
        Some(Isa::Avx512) => unsafe { avx512(sums, o) },
        // SAFETY: as above; AVX2 is part of `Isa::Avx2`
        Some(Isa::Avx2) => unsafe { avx2(sums, o) },
        None => plain(sums, o),
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        plain(sums, o)
    }
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

/// Pixels per tile for `v` vectors on rows of `wo` pixels: the candidate with the fewest
/// estimated cycles per row (the FMAs of the tiles, overlap included, plus the weight loads and
/// loop overhead per step).
fn tile_width(isa: Isa, v: usize, wo: usize) -> usize {
    isa.widths(v)
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
    /// The tile's first output.
    out: *mut f32,
    /// Floats between neighbouring pixels' outputs (`n` in a convolution's output row).
    ostride: usize,
}

/// Runs the microkernel of `isa` for `v` vectors and `r` pixels.
///
/// # Safety
/// The CPU must support `isa`, and `t` must describe memory as [`conv_with`] sets it up.
unsafe fn run_tile(isa: Isa, v: usize, r: usize, t: &Tile) {
    macro_rules! pick {
        ($f:ident, $v:literal; $($r:literal),*) => {
            match r {
                $($r => $f::<$r, $v>(t),)*
                _ => unreachable!("tile width {r} for {} vectors", $v),
            }
        };
    }
    #[cfg(target_arch = "x86_64")]
    match (isa, v) {
        (Isa::Avx512, 1) => pick!(tile16, 1; 16, 12, 8, 4, 2, 1),
        (Isa::Avx512, 2) => pick!(tile16, 2; 12, 8, 4, 2, 1),
        (Isa::Avx512, 4) => pick!(tile16, 4; 6, 4, 2, 1),
        (Isa::Avx2, 1) => pick!(tile8, 1; 12, 8, 4, 2, 1),
        (Isa::Avx2, 2) => pick!(tile8, 2; 6, 4, 2, 1),
        _ => unreachable!("{v} vectors per tile with {isa:?}"),
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, v, r, t);
        unreachable!("direct convolution without x86-64")
    }
}

/// Steps (input positions of the window) summed in registers before the partial sums are added
/// to the output: a blocked sum, whose rounding error grows with the block and the number of
/// blocks rather than with the whole window (960 inputs in MobileNetV2's widest 1x1 layers).
const BLOCK: usize = 128;

/// The microkernel and its flush for one vector type: `$tile::<R, V>` computes `R` pixels x
/// `V` vectors of `$lanes` output channels; `$flush` stores the partial sums (the first block)
/// or adds them to the outputs, and zeroes them.
macro_rules! microkernel {
    ($tile:ident, $flush:ident, $feature:literal, $vec:ty, $lanes:literal,
     $zero:ident, $load:ident, $set1:ident, $fmadd:ident, $add:ident, $store:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        unsafe fn $tile<const R: usize, const V: usize>(t: &Tile) {
            let mut acc = [[$zero(); V]; R];
            let mut first = true;
            let mut steps = 0;
            for ky in 0..t.k {
                let x = t.x.add(ky * t.row);
                let w = t.w.add(ky * t.kc * t.n);
                for j in 0..t.kc {
                    let wr = w.add(j * t.n);
                    let mut wv = [$zero(); V];
                    for (i, wv) in wv.iter_mut().enumerate() {
                        *wv = $load(wr.add($lanes * i));
                    }
                    for (p, acc) in acc.iter_mut().enumerate() {
                        let xv = $set1(*x.add(p * t.pixel + j));
                        for (a, wv) in acc.iter_mut().zip(&wv) {
                            *a = $fmadd(xv, *wv, *a);
                        }
                    }
                    steps += 1;
                    if steps == BLOCK {
                        $flush(t, &mut acc, first);
                        first = false;
                        steps = 0;
                    }
                }
            }
            if steps > 0 || first {
                $flush(t, &mut acc, first);
            }
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        #[inline]
        unsafe fn $flush<const R: usize, const V: usize>(
            t: &Tile,
            acc: &mut [[$vec; V]; R],
            first: bool,
        ) {
            for (p, acc) in acc.iter_mut().enumerate() {
                for (i, a) in acc.iter_mut().enumerate() {
                    let o = t.out.add(p * t.ostride + $lanes * i);
                    let v = if first { *a } else { $add($load(o), *a) };
                    $store(o, v);
                    *a = $zero();
                }
            }
        }
    };
}

microkernel!(
    tile16,
    flush16,
    "avx512f",
    __m512,
    16,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_set1_ps,
    _mm512_fmadd_ps,
    _mm512_add_ps,
    _mm512_storeu_ps
);
microkernel!(
    tile8,
    flush8,
    "avx2,fma",
    __m256,
    8,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_set1_ps,
    _mm256_fmadd_ps,
    _mm256_add_ps,
    _mm256_storeu_ps
);

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The instruction sets this CPU can run (none is said loudly: the tests then check nothing).
    pub(crate) fn isas() -> Vec<Isa> {
        let all: Vec<Isa> = [Isa::Avx512, Isa::Avx2]
            .into_iter()
            .filter(|i| i.supported())
            .collect();
        if all.is_empty() {
            eprintln!("SKIPPED: neither AVX-512F nor AVX2 with FMA on this CPU");
        }
        all
    }

    /// Uniform values in [-1, 1) from a fixed seed (a linear congruential generator).
    pub(crate) fn uniform(mut seed: u64) -> impl FnMut() -> f32 {
        move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// The shape of a case `(b, h, w, c, cout, k, stride, pad)`, with a random input and
    /// weight for it.
    pub(crate) fn random_case(
        (b, h, w, c, cout, k, stride, pad): (
            usize,
            usize,
            usize,
            usize,
            usize,
            usize,
            usize,
            usize,
        ),
        rand: &mut impl FnMut() -> f32,
    ) -> (Shape, Vec<f32>, Vec<f32>) {
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
        (s, x, weight)
    }

    /// A float64 reference convolution, summed in the same (ky, kx, cin) order.
    pub(crate) fn reference(x: &[f32], weight: &[f32], s: Shape) -> Vec<f64> {
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
        // cout covers 1, 2 and 4 vectors and their mixes (48 = 32 + 16, 112 = 64 + 32 + 16),
        // with a last block of 8 channels (8, 24, 40); widths cover every tile width,
        // overlapping last tiles and rows narrower than a tile
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
            (2, 5, 29, 3, 8, 3, 1, 1),
            (1, 6, 11, 5, 24, 3, 2, 1),
            (1, 4, 7, 9, 40, 1, 1, 0),
        ];
        let mut rand = uniform(12345);
        for isa in isas() {
            for &case in &cases {
                let (s, x, weight) = random_case(case, &mut rand);
                let Shape { k, c, .. } = s;
                let got = conv_with(isa, &x, &weight, s);
                let want = reference(&x, &weight, s);
                assert_eq!(got.len(), want.len(), "{isa:?} {s:?}");
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    let tol = 1e-5 * (1.0 + w.abs()) * (k * k * c) as f64;
                    assert!(
                        ((*g as f64) - w).abs() <= tol,
                        "{isa:?} {s:?} output {i}: {g} vs {w}"
                    );
                }
            }
        }
    }

    /// The mean taken row by row as the output is written: the same output, and per frame and
    /// channel the mean of that output (against a float64 sum of it).
    #[test]
    fn conv_mean_gives_the_output_and_its_spatial_mean() {
        let mut rand = uniform(4242);
        for isa in isas() {
            for case in [
                (3, 10, 9, 5, 24, 3, 1, 1),
                (2, 7, 12, 16, 64, 3, 2, 1),
                (2, 4, 4, 8, 16, 1, 1, 0),
            ] {
                let (s, x, weight) = random_case(case, &mut rand);
                let Shape { b, cout, .. } = s;
                let (out, mean) = conv_mean_then_with(isa, &x, &weight, s, true, None);
                let mean = mean.unwrap();
                assert_eq!(out, conv_with(isa, &x, &weight, s), "{isa:?} {s:?}");
                let (ho, wo) = s.out();
                assert_eq!(mean.len(), b * cout);
                for f in 0..b {
                    for ch in 0..cout {
                        let want: f64 = (0..ho * wo)
                            .map(|p| out[(f * ho * wo + p) * cout + ch] as f64)
                            .sum::<f64>()
                            / (ho * wo) as f64;
                        let got = mean[f * cout + ch] as f64;
                        assert!(
                            (got - want).abs() <= 1e-7 * want.abs().max(1e-3),
                            "{isa:?} {s:?} frame {f} channel {ch}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// Both instruction sets take one fused multiply-add per term in the same order, so they
    /// give the same bits (AVX-512 tiles of 64 channels against AVX2 tiles of 16).
    #[test]
    fn avx2_gives_the_same_bits_as_avx512() {
        if !(Isa::Avx512.supported() && Isa::Avx2.supported()) {
            eprintln!("SKIPPED: this CPU lacks AVX-512F or AVX2 with FMA");
            return;
        }
        let mut rand = uniform(99);
        for case in [(3, 9, 13, 16, 64, 3, 1, 1), (2, 8, 8, 160, 56, 1, 1, 0)] {
            let (s, x, weight) = random_case(case, &mut rand);
            let wide = conv_with(Isa::Avx512, &x, &weight, s);
            let narrow = conv_with(Isa::Avx2, &x, &weight, s);
            assert!(
                wide.iter()
                    .zip(&narrow)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{s:?}"
            );
            // the spatial means too: each row's sums are added 8 or 2 doubles at a time
            let mean = |isa| {
                conv_mean_then_with(isa, &x, &weight, s, true, None)
                    .1
                    .unwrap()
            };
            let (wide, narrow) = (mean(Isa::Avx512), mean(Isa::Avx2));
            assert!(
                wide.iter()
                    .zip(&narrow)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "means, {s:?}"
            );
        }
    }

    /// MobileNetV2's widest 1x1 layer (960 inputs): summed in blocks, the outputs stay within
    /// 3e-7 of the largest output of a float64 sum. One running sum over all 960 inputs was
    /// 1.0e-6 off on these numbers (and candle's matmul 5.7e-7).
    #[test]
    fn long_windows_are_summed_in_blocks() {
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
        for isa in isas() {
            let got = conv_with(isa, &x, &w, s);
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
            assert!(
                err <= 3e-7 * peak,
                "{isa:?}: error {err:e} against a peak of {peak}"
            );
        }
    }

    #[test]
    fn outputs_do_not_depend_on_the_batch() {
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
        let one = Shape { b: 1, ..s };
        let per_frame = 8 * 8 * 32;
        for isa in isas() {
            let all = conv_with(isa, &x, &weight, s);
            for f in 0..s.b {
                let got = conv_with(isa, &x[f * 64 * 16..(f + 1) * 64 * 16], &weight, one);
                assert_eq!(
                    got,
                    all[f * per_frame..(f + 1) * per_frame],
                    "{isa:?} frame {f}"
                );
            }
        }
    }
}
