//! Winograd's minimal filtering for the 3x3, stride-1 convolutions with one pixel of zero
//! padding on channels-last f32 (all but two of ResNet-32's): F(2x2, 3x3), each 2x2 block of
//! outputs from a 4x4 block of inputs with 16 products per input and output channel instead of
//! 36, or F(4x4, 3x3), each 4x4 block from 6x6 inputs with 36 products instead of 144
//! (`model.winograd`: [`Setting`]).
//!
//! For a group of tiles (output blocks) it
//! 1. transforms each tile's input patch, per channel, to `V = Bᵀ d B`;
//! 2. multiplies, for each element `e` of the transform, the tiles' `V[e]` `[tiles, cin]` by
//!    the transformed weight `U[e] = (G g Gᵀ)[e]` `[cin, cout]`, with the direct
//!    convolution's microkernel ([`super::direct::RowProduct`]);
//! 3. transforms each tile's products back to its outputs, `Y = Aᵀ M A`.
//!
//! A group is a frame's tile rows, as many as make about [`ROWS`] tiles, so the products keep
//! the microkernel busy on ResNet-32's narrow 8x8 and 16x16 layers; its transformed inputs and
//! products stay in cache. Then, as the direct kernel does, each finished output row's sums
//! (for the spatial mean) and the epilogue (batch norm, residual, activation) run while the row
//! is in cache.
//!
//! Every output is the same sequence of float operations whatever the batch, the thread or the
//! instruction set (the transforms in a fixed order, with fused multiply-adds for F(4x4)'s
//! coefficients, the products one fused multiply-add per term in order), so results do not
//! depend on how frames are grouped into passes, and AVX2 gives AVX-512's bits. The rounding
//! differs from the direct kernel's (tested against a float64 reference): F(2x2) within 2.5e-8
//! of the outputs' scale on the tests' cases (the direct kernel 6e-8), F(4x4) within 4.1e-7.
//! `FREQTAG_NO_WINOGRAD=1` turns it off whatever the setting (the direct kernel runs these
//! convolutions then).

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

/// `model.winograd`: which Winograd tile the CPU's 3x3 stride-1 convolutions run with, or
/// none (the direct kernel then). F(2x2, 3x3) by default; F(4x4, 3x3) takes 36 products for 16
/// outputs instead of 16 for 4, faster still but rounding more (README, "Speed").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Setting {
    #[default]
    F2,
    F4,
    Off,
}

impl Setting {
    /// The tile, or `None` for `off`.
    pub fn tile(self) -> Option<Tile> {
        match self {
            Setting::F2 => Some(Tile::F2),
            Setting::F4 => Some(Tile::F4),
            Setting::Off => None,
        }
    }

    /// What runs with this setting here: the tile's name, or why none does.
    pub fn describe(self) -> String {
        match (self.tile(), enabled()) {
            (None, _) => "off (model.winograd)".into(),
            (Some(_), false) if !direct::available() => {
                "off (the CPU lacks AVX2 with FMA, or FREQTAG_NO_DIRECT)".into()
            }
            (Some(_), false) => "off (FREQTAG_NO_WINOGRAD)".into(),
            (Some(Tile::F2), true) => "F(2x2, 3x3)".into(),
            (Some(Tile::F4), true) => "F(4x4, 3x3)".into(),
        }
    }
}

/// Whether the shape is Winograd's: 3x3, stride 1, padding 1, channels as [`handles`].
pub fn fits(s: &Shape) -> bool {
    s.k == 3 && s.stride == 1 && s.pad == 1 && handles(s.c, s.cout)
}

/// The output tile: F(2x2, 3x3), 2x2 outputs from 4x4 inputs with 16 products, or F(4x4, 3x3),
/// 4x4 outputs from 6x6 inputs with 36.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tile {
    F2,
    F4,
}

impl Tile {
    /// Outputs per tile side.
    pub fn outputs(self) -> usize {
        match self {
            Tile::F2 => 2,
            Tile::F4 => 4,
        }
    }

    /// Inputs per tile side (outputs + 2).
    pub fn inputs(self) -> usize {
        self.outputs() + 2
    }

    /// Elements of the transform: products per input and output channel.
    pub fn elements(self) -> usize {
        self.inputs() * self.inputs()
    }

    /// The tile for the transformed weights `u` of `cin` inputs and `cout` outputs.
    fn of(u: &[f32], cin: usize, cout: usize) -> Tile {
        match u.len() / (cin * cout) {
            16 => Tile::F2,
            36 => Tile::F4,
            _ => panic!("winograd: {} weights for {cin} x {cout} channels", u.len()),
        }
    }
}

/// `U` `[elements, cin, cout]` from the convolution's weight `[9 * cin, cout]` (rows ordered ky,
/// kx, cin): for every input and output channel `G g Gᵀ` of its 3x3 kernel `g`, computed in f64
/// and rounded once.
pub fn transform_weights(weight: &[f32], cin: usize, cout: usize, tile: Tile) -> Vec<f32> {
    assert_eq!(weight.len(), 9 * cin * cout, "winograd: weight size");
    const G2: [[f64; 3]; 4] = [
        [1.0, 0.0, 0.0],
        [0.5, 0.5, 0.5],
        [0.5, -0.5, 0.5],
        [0.0, 0.0, 1.0],
    ];
    const G4: [[f64; 3]; 6] = [
        [1.0 / 4.0, 0.0, 0.0],
        [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
        [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
        [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
        [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
        [0.0, 0.0, 1.0],
    ];
    let g_rows: &[[f64; 3]] = match tile {
        Tile::F2 => &G2,
        Tile::F4 => &G4,
    };
    let a = tile.inputs();
    let mut u = vec![0f32; a * a * cin * cout];
    for ci in 0..cin {
        for co in 0..cout {
            let g = |ky: usize, kx: usize| weight[((ky * 3 + kx) * cin + ci) * cout + co] as f64;
            let mut t = [[0f64; 3]; 6];
            for (gi, ti) in g_rows.iter().zip(&mut t) {
                for (kx, v) in ti.iter_mut().enumerate() {
                    *v = (0..3).map(|ky| gi[ky] * g(ky, kx)).sum();
                }
            }
            for (i, ti) in t[..a].iter().enumerate() {
                for (j, gj) in g_rows.iter().enumerate() {
                    let v: f64 = (0..3).map(|kx| ti[kx] * gj[kx]).sum();
                    u[((i * a + j) * cin + ci) * cout + co] = v as f32;
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
/// it is finished), and `epilogue` run on each output row after its sums. `epilogue` runs
/// while the thread's buffers are borrowed, so it must not wait on rayon tasks (a stolen task
/// of this convolution would find them taken). Panics unless [`fits`]`(&s)`, the CPU supports
/// `isa` and the slices fit the shape.
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
    let (b, c, n) = (s.b, s.c, s.cout);
    let tile = Tile::of(u, c, n);
    // outputs and inputs a tile side, transform elements
    let (mt, a, el) = (tile.outputs(), tile.inputs(), tile.elements());
    let (ho, wo) = (s.h, s.w);
    let (th, tw) = (ho.div_ceil(mt), wo.div_ceil(mt));
    let (hp, wp) = (mt * th + 2, mt * tw + 2);
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
        // transformed inputs `[tiles, el, c]` and products `[tiles, el, n]`
        SCRATCH.with_borrow_mut(|(v, m)| {
            v.resize(el * tiles * c, 0.0);
            m.resize(el * tiles * n, 0.0);
            for tr in 0..rows {
                let at = (mt * (t0 + tr) - top) * wp * c;
                let patches = &xp[at..at + (a - 1) * wp * c + (mt * tw + 2) * c];
                let v = (&mut v[tr * tw * el * c..], el * c, c);
                input_row(isa, tile, patches, wp * c, c, tw, v);
            }
            for e in 0..el {
                let (v, m) = (&v[e * c..], &mut m[e * n..]);
                product.run(v, el * c, &u[e * c * n..][..c * n], m, el * n);
            }
            for tr in 0..rows {
                let below = (out_rows - mt * tr).min(mt);
                let at = mt * tr * wo * n;
                let m = (&m[tr * tw * el * n..], el * n, n);
                output_row(isa, tile, m, n, wo, &mut o[at..at + below * wo * n], below);
            }
        });
        // SAFETY: the tiles above wrote every output of these rows: mt rows per tile row (fewer
        // at the frame's bottom), mt columns per tile (fewer at its right edge)
        let o: &mut [f32] = unsafe { &mut *(o as *mut [MaybeUninit<f32>] as *mut [f32]) };
        let mut sums = sums;
        for (r, row) in o.chunks_exact_mut(wo * n).enumerate() {
            if let Some(sums) = sums.as_deref_mut() {
                direct::add_row_sums(Some(isa), &mut sums[r * n..][..n], row);
            }
            if let Some(epilogue) = epilogue {
                epilogue(bi * ho + mt * t0 + r, row);
            }
        }
    };
    let len = b * ho * wo * n;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let dst = &mut out.spare_capacity_mut()[..len];
    let (frame, chunk) = (ho * wo * n, mt * g * wo * n);
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
                    .zip(r.chunks_mut(mt * g * n))
                    .for_each(|((gi, o), r)| group((bi, xp, 0), gi * g, o, Some(r))),
            }
        })
    };
    // else a task per group, which pads the rows it reads
    let one_group = |bi: usize, gi: usize, o: &mut [MaybeUninit<f32>], r: Option<&mut [f64]>| {
        PADDED.with_borrow_mut(|xp| {
            let (t0, top) = (gi * g, mt * gi * g);
            let rows = (th - t0).min(g);
            pad_rows(x, s, bi, top, mt * rows + 2, wp, xp);
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
                    .zip(r.par_chunks_mut(mt * g * n))
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

/// `V = Bᵀ d B` of a row of `tiles` patches of `tile`'s inputs, the first at the start of
/// `patches` and each `tile.outputs()` pixels right of the last (pixels `c` floats apart, rows
/// `row` apart), per channel, into `v` (tiles `ts` floats apart, elements `es` apart), first
/// down the columns, then along the rows. F(2x2, 3x3):
/// `Bᵀ = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]`; F(4x4, 3x3):
/// `Bᵀ = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0;
/// 0 4 0 -5 0 1]`.
fn input_row(
    isa: Isa,
    tile: Tile,
    patches: &[f32],
    row: usize,
    c: usize,
    tiles: usize,
    (v, ts, es): (&mut [f32], usize, usize),
) {
    let (mt, a) = (tile.outputs(), tile.inputs());
    assert!(c.is_multiple_of(8) && tiles > 0);
    assert!(patches.len() >= (a - 1) * row + (mt * tiles + 2) * c);
    assert!(v.len() >= (tiles - 1) * ts + (a * a - 1) * es + c);
    let (x, v) = (patches.as_ptr(), v.as_mut_ptr());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU supports `isa` (the caller asserted it, and AVX-512 CPUs have AVX2); the
    // loops read channels below c of `a` rows of mt * tiles + 2 pixels and write tiles * a * a
    // rows of c, inside the slices (asserted above)
    unsafe {
        // channels 16 at a time, then (AVX2) 8
        let wide = match isa {
            Isa::Avx512 => c / 16 * 16,
            Isa::Avx2 => 0,
        };
        match (tile, wide > 0) {
            (Tile::F2, true) => input2_16(x, row, c, tiles, (v, ts, es), 0),
            (Tile::F4, true) => input4_16(x, row, c, tiles, (v, ts, es), 0),
            _ => {}
        }
        if wide < c {
            match tile {
                Tile::F2 => input2_8(x, row, c, tiles, (v, ts, es), wide),
                Tile::F4 => input4_8(x, row, c, tiles, (v, ts, es), wide),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, x, v, row, tiles, ts, es);
        unreachable!("winograd without x86-64")
    }
}

/// `Y = Aᵀ M A` of a row of tiles' products `m` (tiles `ts` floats apart, elements `es`
/// apart), per channel, first down the columns, then along the rows: the outputs of `wo`
/// pixels (`n` floats each) into `o`, its first `rows` output rows (`tile.outputs()` or fewer
/// at the frame's bottom). F(2x2, 3x3): `Aᵀ = [1 1 1 0; 0 1 -1 -1]`; F(4x4, 3x3):
/// `Aᵀ = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1]`.
fn output_row(
    isa: Isa,
    tile: Tile,
    (m, ts, es): (&[f32], usize, usize),
    n: usize,
    wo: usize,
    o: &mut [MaybeUninit<f32>],
    rows: usize,
) {
    let (mt, a) = (tile.outputs(), tile.inputs());
    let tiles = wo.div_ceil(mt);
    assert!(n.is_multiple_of(8) && (1..=mt).contains(&rows));
    assert!(m.len() >= (tiles - 1) * ts + (a * a - 1) * es + n);
    assert!(o.len() >= rows * wo * n);
    let (mp, op) = (m.as_ptr(), o.as_mut_ptr().cast::<f32>());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as in `input_row`; the stores stay inside `o` (asserted above): mt pixels a
    // tile, fewer for a last tile at the row's end, in `rows` rows
    unsafe {
        let wide = match isa {
            Isa::Avx512 => n / 16 * 16,
            Isa::Avx2 => 0,
        };
        let m = (mp, ts, es);
        match (tile, wide > 0) {
            (Tile::F2, true) => output2_16(m, n, wo, op, rows, 0),
            (Tile::F4, true) => output4_16(m, n, wo, op, rows, 0),
            _ => {}
        }
        if wide < n {
            match tile {
                Tile::F2 => output2_8(m, n, wo, op, rows, wide),
                Tile::F4 => output4_8(m, n, wo, op, rows, wide),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, mp, op, wo, rows, ts, es);
        unreachable!("winograd without x86-64")
    }
}

/// The transforms of a row of tiles for one vector type, `$input(x, row, c, tiles, v, from)`
/// and `$output(m, n, wo, o, rows, from)`, F(2x2, 3x3) and F(4x4, 3x3), over the channels from
/// `from` in steps of `$lanes` while a whole step fits.
macro_rules! transforms {
    ($input2:ident, $output2:ident, $input4:ident, $output4:ident, $feature:literal, $vec:ty,
     $lanes:literal, $zero:ident, $set1:ident, $load:ident, $store:ident, $add:ident,
     $sub:ident, $fmadd:ident, $fnmadd:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        unsafe fn $input2(
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
        unsafe fn $output2(
            (m, ts, es): (*const f32, usize, usize),
            n: usize,
            wo: usize,
            o: *mut f32,
            rows: usize,
            from: usize,
        ) {
            let row = wo * n;
            let down = rows > 1;
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

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        unsafe fn $input4(
            x: *const f32,
            row: usize,
            c: usize,
            tiles: usize,
            (v, ts, es): (*mut f32, usize, usize),
            from: usize,
        ) {
            let (two, four, five) = ($set1(2.0), $set1(4.0), $set1(5.0));
            // Bᵀ of 6 values
            let bt = |d: [$vec; 6]| -> [$vec; 6] {
                [
                    $fmadd(four, d[0], $fnmadd(five, d[2], d[4])),
                    $fnmadd(four, $add(d[1], d[2]), $add(d[3], d[4])),
                    $fmadd(four, $sub(d[1], d[2]), $sub(d[4], d[3])),
                    $fmadd(two, $sub(d[3], d[1]), $sub(d[4], d[2])),
                    $fnmadd(two, $sub(d[3], d[1]), $sub(d[4], d[2])),
                    $fmadd(four, d[1], $fnmadd(five, d[3], d[5])),
                ]
            };
            for tile in 0..tiles {
                let (x, v) = (x.add(4 * tile * c), v.add(tile * ts));
                let mut ch = from;
                while ch + $lanes <= c {
                    // down each column, into t[row][column]
                    let mut t: [[$vec; 6]; 6] = [[$zero(); 6]; 6];
                    for j in 0..6 {
                        let mut d = [$zero(); 6];
                        for (i, di) in d.iter_mut().enumerate() {
                            *di = $load(x.add(i * row + j * c + ch));
                        }
                        for (i, r) in bt(d).into_iter().enumerate() {
                            t[i][j] = r;
                        }
                    }
                    for (i, ti) in t.iter().enumerate() {
                        for (j, r) in bt(*ti).into_iter().enumerate() {
                            $store(v.add((6 * i + j) * es + ch), r);
                        }
                    }
                    ch += $lanes;
                }
            }
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        unsafe fn $output4(
            (m, ts, es): (*const f32, usize, usize),
            n: usize,
            wo: usize,
            o: *mut f32,
            rows: usize,
            from: usize,
        ) {
            let (two, four, eight) = ($set1(2.0), $set1(4.0), $set1(8.0));
            // Aᵀ of 6 values
            let at = |e: [$vec; 6]| -> [$vec; 4] {
                let (p, q) = ($add(e[1], e[2]), $sub(e[1], e[2]));
                let (r, s) = ($add(e[3], e[4]), $sub(e[3], e[4]));
                [
                    $add($add(e[0], p), r),
                    $fmadd(two, s, q),
                    $fmadd(four, r, p),
                    $add($fmadd(eight, s, q), e[5]),
                ]
            };
            let row = wo * n;
            for tile in 0..wo.div_ceil(4) {
                let cols = (wo - 4 * tile).min(4);
                let (m, o) = (m.add(tile * ts), o.add(4 * tile * n));
                let mut ch = from;
                while ch + $lanes <= n {
                    // down each column, into s[output row][column]
                    let mut s: [[$vec; 6]; 4] = [[$zero(); 6]; 4];
                    for j in 0..6 {
                        let mut e = [$zero(); 6];
                        for (i, ei) in e.iter_mut().enumerate() {
                            *ei = $load(m.add((6 * i + j) * es + ch));
                        }
                        for (i, r) in at(e).into_iter().enumerate() {
                            s[i][j] = r;
                        }
                    }
                    for (i, si) in s.iter().enumerate().take(rows) {
                        for (j, y) in at(*si).into_iter().enumerate().take(cols) {
                            $store(o.add(i * row + j * n + ch), y);
                        }
                    }
                    ch += $lanes;
                }
            }
        }
    };
}

transforms!(
    input2_16,
    output2_16,
    input4_16,
    output4_16,
    "avx512f",
    __m512,
    16,
    _mm512_setzero_ps,
    _mm512_set1_ps,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_add_ps,
    _mm512_sub_ps,
    _mm512_fmadd_ps,
    _mm512_fnmadd_ps
);
transforms!(
    input2_8,
    output2_8,
    input4_8,
    output4_8,
    "avx2,fma",
    __m256,
    8,
    _mm256_setzero_ps,
    _mm256_set1_ps,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_add_ps,
    _mm256_sub_ps,
    _mm256_fmadd_ps,
    _mm256_fnmadd_ps
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
        for (isa, tile) in isas()
            .into_iter()
            .flat_map(|i| [(i, Tile::F2), (i, Tile::F4)])
        {
            for &case in &cases {
                let (s, x, weight) = random_case(case, &mut rand);
                let u = transform_weights(&weight, s.c, s.cout, tile);
                let (got, _) = conv_mean_then_with(isa, &x, &u, s, false, None);
                let want = reference(&x, &weight, s);
                assert_eq!(got.len(), want.len(), "{isa:?} {s:?}");
                // the outputs' scale: inputs and weights in [-1, 1), 9 * c terms. Measured on
                // these cases: F(2x2) at most 2.5e-8 of it (the direct kernel's: 6e-8), F(4x4)
                // 4.1e-7
                let scale = (9 * s.c) as f64;
                let tol = match tile {
                    Tile::F2 => 1e-7,
                    Tile::F4 => 1e-6,
                };
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        ((*g as f64) - w).abs() <= tol * scale,
                        "{isa:?} {tile:?} {s:?} output {i}: {g} vs {w}"
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
        for (case, tile) in [
            (3, 10, 9, 16, 24, 3, 1, 1),
            (2, 8, 8, 64, 64, 3, 1, 1),
            (9, 11, 13, 16, 16, 3, 1, 1),
        ]
        .into_iter()
        .flat_map(|c| [(c, Tile::F2), (c, Tile::F4)])
        {
            let (s, x, weight) = random_case(case, &mut rand);
            let u = transform_weights(&weight, s.c, s.cout, tile);
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
