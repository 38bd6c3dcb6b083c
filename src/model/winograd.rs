//! Winograd's minimal filtering F(2x2, 3x3) for the 3x3, stride-1 convolutions with one pixel
//! of zero padding on channels-last f32 (all but two of ResNet-32's): each 2x2 block of outputs
//! from a 4x4 block of inputs with 16 products per input and output channel instead of 36.
//!
//! For a group of tiles (2x2 output blocks) it
//! 1. transforms each tile's 4x4 input patch, per channel, to `V = Bᵀ d B` (additions only);
//! 2. multiplies, for each of the 16 elements `e` of the transform, the tiles' `V[e]`
//!    `[tiles, cin]` by the transformed weight `U[e] = (G g Gᵀ)[e]` `[cin, cout]`, with the
//!    direct convolution's microkernel ([`super::direct::RowProduct`]);
//! 3. transforms each tile's 16 products back to its 2x2 outputs, `Y = Aᵀ M A` (additions).
//!
//! A group is a frame's tile rows, as many as make about [`ROWS`] tiles, so the products keep
//! the microkernel busy on ResNet-32's narrow 8x8 and 16x16 layers; its transformed inputs and
//! products stay in cache. Then, as the direct kernel does, each finished output row's sums
//! (for the spatial mean) and the epilogue (batch norm, residual, activation) run while the row
//! is in cache.
//!
//! Every output is the same sequence of float operations whatever the batch, the thread or the
//! instruction set (the transforms are additions in a fixed order, the products one fused
//! multiply-add per term in order), so results do not depend on how frames are grouped into
//! passes, and AVX2 gives AVX-512's bits. The rounding differs from the direct kernel's: within
//! a few units in the last place of the outputs' scale (tested against a float64 reference).
//! `FREQTAG_NO_WINOGRAD=1` turns it off (the direct kernel runs these convolutions then).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::cell::RefCell;
use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::direct::{self, Isa, RowEpilogue, RowProduct, Shape};

/// Tiles a product should have at least: tile rows are grouped to reach it (1 row of 16 tiles
/// at 32x32, 2 of 8 at 16x16, 4 of 4 at 8x8).
const ROWS: usize = 16;

/// Whether Winograd may run here: the direct kernel can ([`direct::isa`]) and
/// `FREQTAG_NO_WINOGRAD` is unset (or `0`).
pub fn enabled() -> bool {
    use std::sync::OnceLock;
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let off = std::env::var_os("FREQTAG_NO_WINOGRAD").is_some_and(|v| v != "0");
        !off && direct::available()
    })
}

/// Whether [`conv_mean_then_with`] computes convolutions of `cin` inputs and `cout` outputs:
/// both multiples of 8 (its transforms run 8 or 16 channels at a time, its products are the
/// direct kernel's), and at least 8 inputs, below which the transforms cost more than they save.
pub fn handles(cin: usize, cout: usize) -> bool {
    cin >= 8 && cin.is_multiple_of(8) && cout > 0 && cout.is_multiple_of(8)
}

/// Whether the shape is Winograd's: 3x3, stride 1, padding 1, channels as [`handles`].
pub fn fits(s: &Shape) -> bool {
    s.k == 3 && s.stride == 1 && s.pad == 1 && handles(s.c, s.cout)
}

/// `U` `[16, cin, cout]` from the convolution's weight `[9 * cin, cout]` (rows ordered ky, kx,
/// cin): for every input and output channel `G g Gᵀ` of its 3x3 kernel `g`, computed in f64
/// and rounded once.
pub fn transform_weights(weight: &[f32], cin: usize, cout: usize) -> Vec<f32> {
    assert_eq!(weight.len(), 9 * cin * cout, "winograd: weight size");
    const G: [[f64; 3]; 4] = [
        [1.0, 0.0, 0.0],
        [0.5, 0.5, 0.5],
        [0.5, -0.5, 0.5],
        [0.0, 0.0, 1.0],
    ];
    let mut u = vec![0f32; 16 * cin * cout];
    for ci in 0..cin {
        for co in 0..cout {
            let g = |ky: usize, kx: usize| weight[((ky * 3 + kx) * cin + ci) * cout + co] as f64;
            let mut t = [[0f64; 3]; 4];
            for (gi, ti) in G.iter().zip(&mut t) {
                for (kx, v) in ti.iter_mut().enumerate() {
                    *v = (0..3).map(|ky| gi[ky] * g(ky, kx)).sum();
                }
            }
            for (i, ti) in t.iter().enumerate() {
                for (j, gj) in G.iter().enumerate() {
                    let v: f64 = (0..3).map(|kx| ti[kx] * gj[kx]).sum();
                    u[((i * 4 + j) * cin + ci) * cout + co] = v as f32;
                }
            }
        }
    }
    u
}

thread_local! {
    /// Each thread's zero-padded input rows of a frame or a group of tiles.
    static PADDED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Each thread's transformed inputs and products of one group of tiles.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// The convolution of `x` `[b, h, w, c]` by the transformed weights `u` ([`transform_weights`])
/// with the instruction set `isa`, as [`direct::conv_mean_then_with`] gives it: the output
/// `[b, h, w, cout]`, with `mean` its spatial mean `[b, cout]` (each output row summed in f64 as
/// it is finished), and `epilogue` run on each output row after its sums. Panics unless
/// [`fits`]`(&s)`, the CPU supports `isa` and the slices fit the shape.
pub fn conv_mean_then_with(
    isa: Isa,
    x: &[f32],
    u: &[f32],
    s: Shape,
    mean: bool,
    epilogue: Option<RowEpilogue>,
) -> (Vec<f32>, Option<Vec<f32>>) {
    assert!(
        fits(&s),
        "winograd: not a 3x3 stride-1 convolution it handles: {s:?}"
    );
    assert!(isa.supported(), "winograd: this CPU lacks {isa:?}");
    assert_eq!(x.len(), s.b * s.h * s.w * s.c, "winograd: input size");
    assert_eq!(u.len(), 16 * s.c * s.cout, "winograd: weight size");
    let (b, c, n) = (s.b, s.c, s.cout);
    let (ho, wo) = (s.h, s.w);
    let (th, tw) = (ho.div_ceil(2), wo.div_ceil(2));
    let (hp, wp) = (2 * th + 2, 2 * tw + 2);
    // tile rows per group, and the products of a full group and of a frame's last, shorter one
    let g = ROWS.div_ceil(tw).min(th);
    let full = RowProduct::new(isa, g * tw, c, n);
    let last = (!th.is_multiple_of(g)).then(|| RowProduct::new(isa, (th % g) * tw, c, n));
    // a group's tile rows t0.. from `xp`, zero-padded rows of frame bi from padded row `top`
    let group = |(bi, xp, top): (usize, &[f32], usize),
                 t0: usize,
                 o: &mut [MaybeUninit<f32>],
                 sums: Option<&mut [f64]>| {
        let rows = (th - t0).min(g);
        let product = if rows == g {
            &full
        } else {
            last.as_ref().expect("a last group")
        };
        let tiles = rows * tw;
        let out_rows = o.len() / (wo * n);
        // transformed inputs `[16, tiles, c]` and products `[16, tiles, n]`: each product
        // reads and writes rows next to each other
        SCRATCH.with_borrow_mut(|(v, m)| {
            v.resize(16 * tiles * c, 0.0);
            m.resize(16 * tiles * n, 0.0);
            for tr in 0..rows {
                let at = (2 * (t0 + tr) - top) * wp * c;
                let patches = &xp[at..at + 3 * wp * c + (2 * tw + 2) * c];
                let v = (&mut v[tr * tw * 16 * c..], 16 * c, c);
                input_row(isa, patches, wp * c, c, tw, v);
            }
            for e in 0..16 {
                let (v, m) = (&v[e * c..], &mut m[e * n..]);
                product.run(v, 16 * c, &u[e * c * n..][..c * n], m, 16 * n);
            }
            for tr in 0..rows {
                let down = 2 * tr + 1 < out_rows;
                let at = 2 * tr * wo * n;
                let end = at + if down { 2 } else { 1 } * wo * n;
                let m = (&m[tr * tw * 16 * n..], 16 * n, n);
                output_row(isa, m, n, wo, &mut o[at..end], down);
            }
        });
        // SAFETY: the tiles above wrote every output of these rows: 2 rows per tile row (one
        // where the frame's height is odd), 2 columns per tile (one where its width is odd)
        let o: &mut [f32] = unsafe { &mut *(o as *mut [MaybeUninit<f32>] as *mut [f32]) };
        let mut sums = sums;
        for (r, row) in o.chunks_exact_mut(wo * n).enumerate() {
            if let Some(sums) = sums.as_deref_mut() {
                direct::add_row_sums(Some(isa), &mut sums[r * n..][..n], row);
            }
            if let Some(epilogue) = epilogue {
                epilogue(bi * ho + 2 * t0 + r, row);
            }
        }
    };
    let len = b * ho * wo * n;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let dst = &mut out.spare_capacity_mut()[..len];
    let (frame, chunk) = (ho * wo * n, 2 * g * wo * n);
    let mut rows = mean.then(|| vec![0f64; b * ho * n]);
    // a frame's groups one after the other where there are frames enough to keep every thread
    // busy (a task per group costs rayon's overhead hundreds of times a pass: 16 groups a frame
    // at 32x32), the frame padded first into the thread's buffer
    let per_frame = b >= 2 * rayon::current_num_threads();
    let frame_groups = |bi: usize, f: &mut [MaybeUninit<f32>], r: Option<&mut [f64]>| {
        PADDED.with_borrow_mut(|xp| {
            pad_rows(x, s, bi, 0, hp, wp, xp);
            let groups = f.chunks_mut(chunk).enumerate();
            match r {
                None => groups.for_each(|(gi, o)| group((bi, xp, 0), gi * g, o, None)),
                Some(r) => groups
                    .zip(r.chunks_mut(2 * g * n))
                    .for_each(|((gi, o), r)| group((bi, xp, 0), gi * g, o, Some(r))),
            }
        })
    };
    // else a task per group, which pads the rows it reads
    let one_group = |bi: usize, gi: usize, o: &mut [MaybeUninit<f32>], r: Option<&mut [f64]>| {
        PADDED.with_borrow_mut(|xp| {
            let (t0, top) = (gi * g, 2 * gi * g);
            let rows = (th - t0).min(g);
            pad_rows(x, s, bi, top, 2 * rows + 2, wp, xp);
            group((bi, xp, top), t0, o, r)
        })
    };
    match rows.as_deref_mut() {
        None if per_frame => dst
            .par_chunks_mut(frame)
            .enumerate()
            .for_each(|(bi, f)| frame_groups(bi, f, None)),
        Some(rows) if per_frame => dst
            .par_chunks_mut(frame)
            .zip(rows.par_chunks_mut(ho * n))
            .enumerate()
            .for_each(|(bi, (f, r))| frame_groups(bi, f, Some(r))),
        None => dst.par_chunks_mut(frame).enumerate().for_each(|(bi, f)| {
            f.par_chunks_mut(chunk)
                .enumerate()
                .for_each(|(gi, o)| one_group(bi, gi, o, None))
        }),
        Some(rows) => dst
            .par_chunks_mut(frame)
            .zip(rows.par_chunks_mut(ho * n))
            .enumerate()
            .for_each(|(bi, (f, r))| {
                f.par_chunks_mut(chunk)
                    .zip(r.par_chunks_mut(2 * g * n))
                    .enumerate()
                    .for_each(|(gi, (o, r))| one_group(bi, gi, o, Some(r)))
            }),
    }
    // SAFETY: each frame's groups cover its rows, and each group wrote all of its rows (above)
    unsafe { out.set_len(len) };
    let mean = rows.map(|rows| direct::frame_means(&rows, n, ho, wo));
    (out, mean)
}

/// Rows `top .. top + count` of frame `bi` of `x` `[b, h, w, c]` placed at offset (1, 1) in
/// zeros `[hp, wp, c]`, into `out` (resized to them). Padding in the task that reads it, rather
/// than the whole pass first, keeps the padded rows in cache for the transforms (a pass of 32
/// frames of 34x34x16 floats is 2.4 MB).
fn pad_rows(
    x: &[f32],
    s: Shape,
    bi: usize,
    top: usize,
    count: usize,
    wp: usize,
    out: &mut Vec<f32>,
) {
    let (h, w, c) = (s.h, s.w, s.c);
    out.resize(count * wp * c, 0.0);
    for (y, o) in (top..top + count).zip(out.chunks_exact_mut(wp * c)) {
        if (1..=h).contains(&y) {
            let src = &x[(bi * h + y - 1) * w * c..][..w * c];
            let (left, rest) = o.split_at_mut(c);
            let (mid, right) = rest.split_at_mut(w * c);
            left.fill(0.0);
            mid.copy_from_slice(src);
            right.fill(0.0);
        } else {
            o.fill(0.0);
        }
    }
}

/// `V = Bᵀ d B` of a row of `tiles` 4x4 patches, the first at the start of `patches` and each
/// 2 pixels right of the last (pixels `c` floats apart, rows `row` apart), per channel, into
/// `v` `[tiles, 16, c]`: with `Bᵀ = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]`, first down the
/// columns, then along the rows.
fn input_row(
    isa: Isa,
    patches: &[f32],
    row: usize,
    c: usize,
    tiles: usize,
    (v, ts, es): (&mut [f32], usize, usize),
) {
    assert!(c.is_multiple_of(8) && tiles > 0);
    assert!(patches.len() >= 3 * row + (2 * tiles + 2) * c);
    assert!(v.len() >= (tiles - 1) * ts + 15 * es + c);
    let (x, v) = (patches.as_ptr(), v.as_mut_ptr());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU supports `isa` (the caller asserted it, and AVX-512 CPUs have AVX2); the
    // loops read channels below c of 4 rows of 2 * tiles + 2 pixels and write tiles * 16 rows
    // of c, inside the slices (asserted above)
    unsafe {
        // channels 16 at a time, then (AVX2) 8
        let wide = match isa {
            Isa::Avx512 => {
                input16(x, row, c, tiles, (v, ts, es), 0);
                c / 16 * 16
            }
            Isa::Avx2 => 0,
        };
        if wide < c {
            input8(x, row, c, tiles, (v, ts, es), wide);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, x, v, row, tiles, ts, es);
        unreachable!("winograd without x86-64")
    }
}

/// `Y = Aᵀ M A` of a row of tiles' products `m` `[tiles, 16, n]`, per channel, with
/// `Aᵀ = [1 1 1 0; 0 1 -1 -1]`, first down the columns, then along the rows: the outputs of
/// `wo` pixels (`n` floats each) into `o`, one output row or two (`down`).
fn output_row(
    isa: Isa,
    (m, ts, es): (&[f32], usize, usize),
    n: usize,
    wo: usize,
    o: &mut [MaybeUninit<f32>],
    down: bool,
) {
    let tiles = wo.div_ceil(2);
    let rows = if down { 2 } else { 1 };
    assert!(n.is_multiple_of(8) && m.len() >= (tiles - 1) * ts + 15 * es + n);
    assert!(o.len() >= rows * wo * n);
    let (mp, op) = (m.as_ptr(), o.as_mut_ptr().cast::<f32>());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as in `input_row`; the stores stay inside `o` (asserted above): 2 pixels a tile,
    // 1 for a last tile of an odd width, in 1 or 2 rows
    unsafe {
        let wide = match isa {
            Isa::Avx512 => {
                output16((mp, ts, es), n, wo, op, down, 0);
                n / 16 * 16
            }
            Isa::Avx2 => 0,
        };
        if wide < n {
            output8((mp, ts, es), n, wo, op, down, wide);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, mp, op, wo, down, ts, es);
        unreachable!("winograd without x86-64")
    }
}

/// The transforms of a row of tiles for one vector type, `$input(x, row, c, tiles, v, from)`
/// and `$output(m, n, wo, o, down, from)`, over the channels from `from` in steps of `$lanes`
/// while a whole step fits.
macro_rules! transforms {
    ($input:ident, $output:ident, $feature:literal, $vec:ty, $lanes:literal,
     $zero:ident, $load:ident, $store:ident, $add:ident, $sub:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        unsafe fn $input(
            x: *const f32,
            row: usize,
            c: usize,
            tiles: usize,
            (v, ts, es): (*mut f32, usize, usize),
            from: usize,
        ) {
            for tile in 0..tiles {
                let (x, v) = (x.add(2 * tile * c), v.add(tile * ts));
                let mut ch = from;
                while ch + $lanes <= c {
                    let mut d: [[$vec; 4]; 4] = [[$zero(); 4]; 4];
                    for (i, di) in d.iter_mut().enumerate() {
                        for (j, dij) in di.iter_mut().enumerate() {
                            *dij = $load(x.add(i * row + j * c + ch));
                        }
                    }
                    let mut t = d;
                    for j in 0..4 {
                        t[0][j] = $sub(d[0][j], d[2][j]);
                        t[1][j] = $add(d[1][j], d[2][j]);
                        t[2][j] = $sub(d[2][j], d[1][j]);
                        t[3][j] = $sub(d[1][j], d[3][j]);
                    }
                    for (i, ti) in t.iter().enumerate() {
                        let at = v.add(4 * i * es + ch);
                        $store(at, $sub(ti[0], ti[2]));
                        $store(at.add(es), $add(ti[1], ti[2]));
                        $store(at.add(2 * es), $sub(ti[2], ti[1]));
                        $store(at.add(3 * es), $sub(ti[1], ti[3]));
                    }
                    ch += $lanes;
                }
            }
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        unsafe fn $output(
            (m, ts, es): (*const f32, usize, usize),
            n: usize,
            wo: usize,
            o: *mut f32,
            down: bool,
            from: usize,
        ) {
            let row = wo * n;
            for tile in 0..wo.div_ceil(2) {
                let right = 2 * tile + 1 < wo;
                let (m, o) = (m.add(tile * ts), o.add(2 * tile * n));
                let mut ch = from;
                while ch + $lanes <= n {
                    let mut e: [[$vec; 4]; 4] = [[$zero(); 4]; 4];
                    for (i, ei) in e.iter_mut().enumerate() {
                        for (j, eij) in ei.iter_mut().enumerate() {
                            *eij = $load(m.add((4 * i + j) * es + ch));
                        }
                    }
                    let mut s0 = [$zero(); 4];
                    let mut s1 = s0;
                    for j in 0..4 {
                        s0[j] = $add($add(e[0][j], e[1][j]), e[2][j]);
                        s1[j] = $sub($sub(e[1][j], e[2][j]), e[3][j]);
                    }
                    $store(o.add(ch), $add($add(s0[0], s0[1]), s0[2]));
                    if right {
                        $store(o.add(n + ch), $sub($sub(s0[1], s0[2]), s0[3]));
                    }
                    if down {
                        $store(o.add(row + ch), $add($add(s1[0], s1[1]), s1[2]));
                        if right {
                            $store(o.add(row + n + ch), $sub($sub(s1[1], s1[2]), s1[3]));
                        }
                    }
                    ch += $lanes;
                }
            }
        }
    };
}

transforms!(
    input16,
    output16,
    "avx512f",
    __m512,
    16,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_add_ps,
    _mm512_sub_ps
);
transforms!(
    input8,
    output8,
    "avx2,fma",
    __m256,
    8,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_add_ps,
    _mm256_sub_ps
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::direct::tests::{isas, random_case, reference, uniform};

    #[test]
    fn matches_a_float64_reference() {
        // even and odd sizes, one tile row and several a group, a frame's last group shorter
        // (th not a multiple of g), 8-channel blocks beside 16-channel ones, several frames;
        // a task per group (few frames) and per frame (at least 2 a thread: the 5 and 9)
        let cases = [
            // (b, h, w, c, cout, k, stride, pad)
            (2, 8, 8, 16, 16, 3, 1, 1),
            (5, 12, 6, 16, 48, 3, 1, 1),
            (9, 9, 7, 8, 24, 3, 1, 1),
            (3, 9, 7, 8, 24, 3, 1, 1),
            (1, 32, 32, 16, 16, 3, 1, 1),
            (2, 16, 16, 32, 32, 3, 1, 1),
            (2, 8, 8, 64, 64, 3, 1, 1),
            (1, 11, 13, 24, 40, 3, 1, 1),
            (2, 1, 1, 8, 8, 3, 1, 1),
            (1, 2, 35, 16, 64, 3, 1, 1),
            (1, 12, 6, 16, 48, 3, 1, 1),
        ];
        let mut rand = uniform(31337);
        for isa in isas() {
            for &case in &cases {
                let (s, x, weight) = random_case(case, &mut rand);
                let u = transform_weights(&weight, s.c, s.cout);
                let (got, _) = conv_mean_then_with(isa, &x, &u, s, false, None);
                let want = reference(&x, &weight, s);
                assert_eq!(got.len(), want.len(), "{isa:?} {s:?}");
                // the outputs' scale: inputs and weights in [-1, 1), 9 * c terms. Measured on
                // these cases: at most 2.5e-8 of it (the direct kernel's: 6e-8)
                let scale = (9 * s.c) as f64;
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        ((*g as f64) - w).abs() <= 1e-7 * scale,
                        "{isa:?} {s:?} output {i}: {g} vs {w}"
                    );
                }
            }
        }
    }

    /// The mean, the epilogue and the outputs of one frame alone against the same frame in a
    /// batch; AVX2 against AVX-512, bit for bit.
    #[test]
    fn means_epilogue_batches_and_instruction_sets() {
        let mut rand = uniform(2718);
        let isas = isas();
        // 9 frames: a task per frame on up to 4 threads, against each frame alone (a task
        // per group)
        for case in [
            (3, 10, 9, 16, 24, 3, 1, 1),
            (2, 8, 8, 64, 64, 3, 1, 1),
            (9, 11, 13, 16, 16, 3, 1, 1),
        ] {
            let (s, x, weight) = random_case(case, &mut rand);
            let u = transform_weights(&weight, s.c, s.cout);
            let (ho, wo) = s.out();
            let mut first: Option<(Vec<f32>, Vec<f32>)> = None;
            for &isa in &isas {
                let (plain, _) = conv_mean_then_with(isa, &x, &u, s, false, None);
                // the epilogue sees each row once, with its index: doubles it, plus the row
                let epilogue =
                    |r: usize, o: &mut [f32]| o.iter_mut().for_each(|v| *v = 2.0 * *v + r as f32);
                let (out, mean) = conv_mean_then_with(isa, &x, &u, s, true, Some(&epilogue));
                let mean = mean.unwrap();
                for (i, (o, p)) in out.iter().zip(&plain).enumerate() {
                    let r = i / (wo * s.cout);
                    assert_eq!(
                        o.to_bits(),
                        (2.0 * p + r as f32).to_bits(),
                        "{isa:?} {s:?} {i}"
                    );
                }
                for f in 0..s.b {
                    for ch in 0..s.cout {
                        let want = (0..ho * wo)
                            .map(|p| plain[(f * ho * wo + p) * s.cout + ch] as f64)
                            .sum::<f64>()
                            / (ho * wo) as f64;
                        let got = mean[f * s.cout + ch] as f64;
                        assert!(
                            (got - want).abs() <= 1e-6 * want.abs().max(1e-3),
                            "{isa:?} {s:?}"
                        );
                    }
                }
                let per = ho * wo * s.cout;
                for f in 0..s.b {
                    let one = Shape { b: 1, ..s };
                    let x1 = &x[f * s.h * s.w * s.c..][..s.h * s.w * s.c];
                    let (alone, _) = conv_mean_then_with(isa, x1, &u, one, false, None);
                    assert_eq!(alone, plain[f * per..][..per], "{isa:?} {s:?} frame {f}");
                }
                match &first {
                    None => first = Some((plain, mean)),
                    Some((p, m)) => {
                        assert!(
                            p.iter()
                                .zip(&plain)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{s:?}"
                        );
                        assert!(
                            m.iter().zip(&mean).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{s:?}"
                        );
                    }
                }
            }
        }
    }
}
