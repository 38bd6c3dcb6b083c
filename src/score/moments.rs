//! An exact accumulator for mean and standard deviation over images.
//!
//! Each value is converted once to 384-bit two's-complement fixed point (128 fractional bits);
//! sums of those integers are exact, so the totals do not depend on the order in which images
//! were added or how they were split over workers and processes. [`Acc`] is the
//! differential-dataflow difference type of the aggregation.

use differential_dataflow::difference::{Abelian, IsZero, Monoid, Semigroup};
use serde::{Deserialize, Serialize};

/// Names of the per-term scores aggregated, in [`super::TermScores::as_array`] order; the last,
/// the authors' per-neuron mean dB-SNR, is the same for every term of a neuron.
pub const SCORE_NAMES: [&str; 9] = [
    "amplitude",
    "snr",
    "snr_db",
    "snr_lattice",
    "snr_lattice_db",
    "zscore",
    "baseline_corrected",
    "response_share",
    "mean_snr_db",
];
/// Number of scores an [`Acc`] carries.
pub const N_SCORES: usize = SCORE_NAMES.len();

/// 64-bit limbs of a [`Fixed`].
pub const LIMBS: usize = 6;
const FRAC_BITS: i32 = 128;
/// Values with a magnitude at or above this (2^90) are not accumulated (counted as missing);
/// their squares stay below 2^180, leaving 2^74 of headroom for the sums.
pub const MAX_ABS: f64 = 1.2379400392853803e27;

/// Whether [`Fixed`] holds `v`: finite and `|v| < 2^90`.
fn representable(v: f64) -> bool {
    v.is_finite() && v.abs() < MAX_ABS
}

/// `|v|` in fixed point as `m * 2^s` (units of 2^-128, truncated below 2^-128),
/// `m < 2^53`; `None` where nothing is left.
fn parts(v: f64) -> Option<(u64, u32)> {
    let bits = v.abs().to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i32;
    let frac = bits & ((1u64 << 52) - 1);
    let (mant, e) = if exp == 0 {
        (frac, -1074)
    } else {
        (frac | (1u64 << 52), exp - 1075)
    };
    let shift = e + FRAC_BITS;
    let (m, s) = if shift >= 0 {
        (mant, shift as u32)
    } else if shift > -64 {
        (mant >> (-shift), 0)
    } else {
        (0, 0)
    };
    (m != 0).then_some((m, s))
}

/// `|v|` in fixed point, truncated below 2^-128: `(word, lo, hi)`, its (at most) two non-zero
/// limbs at `word` and `word + 1`; `None` where nothing is left above 2^-128.
fn magnitude(v: f64) -> Option<(usize, u64, u64)> {
    let (m, s) = parts(v)?;
    let (word, bit) = ((s / 64) as usize, s % 64);
    let wide = (m as u128) << bit;
    Some((word, wide as u64, (wide >> 64) as u64))
}

/// A signed 384-bit fixed-point number, `limbs` little-endian two's complement.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Fixed {
    limbs: [u64; LIMBS],
}

impl Fixed {
    /// The fixed-point value of `v` (truncated below 2^-128), or `None` if `v` is not finite or
    /// `|v| >= 2^90`.
    pub fn from_f64(v: f64) -> Option<Fixed> {
        if !representable(v) {
            return None;
        }
        let mut limbs = [0u64; LIMBS];
        if let Some((word, lo, hi)) = magnitude(v) {
            limbs[word] = lo;
            if word + 1 < LIMBS {
                limbs[word + 1] = hi;
            }
        }
        let mut f = Fixed { limbs };
        if v < 0.0 {
            f.negate();
        }
        Some(f)
    }

    /// Adds the fixed-point value of `v` in place, exactly as `add(&from_f64(v)?)` but without
    /// building and negating a whole number: the magnitude's (at most two) limbs are added, or
    /// subtracted for a negative `v`, and the carry runs only as far as it must. Returns
    /// `false`, adding nothing, where [`Fixed::from_f64`] gives `None`.
    pub fn add_f64(&mut self, v: f64) -> bool {
        if !representable(v) {
            return false;
        }
        self.add_representable(v);
        true
    }

    /// [`Fixed::add_f64`] of a value known to be representable: the two limbs the magnitude
    /// covers are added (or subtracted) as one 128-bit number, and a carry (or borrow) out of
    /// them, rare, runs on through the limbs above.
    #[inline(always)]
    fn add_representable(&mut self, v: f64) {
        let Some((word, lo, hi)) = magnitude(v) else {
            return;
        };
        // |v| < 2^90 puts the magnitude below bit 218: word + 1 < LIMBS
        if word + 1 >= LIMBS {
            unreachable!("a representable value spans limbs below the last");
        }
        let pair = (self.limbs[word] as u128) | ((self.limbs[word + 1] as u128) << 64);
        let x = (lo as u128) | ((hi as u128) << 64);
        let (sum, mut carry) = if v < 0.0 {
            pair.overflowing_sub(x)
        } else {
            pair.overflowing_add(x)
        };
        self.limbs[word] = sum as u64;
        self.limbs[word + 1] = (sum >> 64) as u64;
        let mut i = word + 2;
        while carry && i < LIMBS {
            let (a, c) = if v < 0.0 {
                self.limbs[i].overflowing_sub(1)
            } else {
                self.limbs[i].overflowing_add(1)
            };
            self.limbs[i] = a;
            carry = c;
            i += 1;
        }
    }

    /// The limbs, little-endian two's complement, 128 fractional bits.
    pub fn limbs(&self) -> [u64; LIMBS] {
        self.limbs
    }

    /// The number with these limbs (as [`Fixed::limbs`] gives them).
    pub fn from_limbs(limbs: [u64; LIMBS]) -> Fixed {
        Fixed { limbs }
    }

    /// The nearest f64 (the limbs summed in f64, deterministic).
    pub fn to_f64(self) -> f64 {
        let neg = self.is_negative();
        let mut m = self;
        if neg {
            m.negate();
        }
        let mut v = 0.0;
        for (i, l) in m.limbs.iter().enumerate().rev() {
            v += *l as f64 * 2f64.powi(64 * i as i32 - FRAC_BITS);
        }
        if neg {
            -v
        } else {
            v
        }
    }

    fn is_negative(&self) -> bool {
        self.limbs[LIMBS - 1] >> 63 == 1
    }

    /// Two's-complement negation.
    pub fn negate(&mut self) {
        let mut carry = 1u64;
        for l in self.limbs.iter_mut() {
            let (v, c) = (!*l).overflowing_add(carry);
            *l = v;
            carry = c as u64;
        }
    }

    /// Exact addition (wrapping at 2^384, far beyond any reachable sum).
    pub fn add(&mut self, rhs: &Fixed) {
        let mut carry = 0u64;
        for (a, b) in self.limbs.iter_mut().zip(rhs.limbs) {
            let (s1, c1) = a.overflowing_add(b);
            let (s2, c2) = s1.overflowing_add(carry);
            *a = s2;
            carry = (c1 || c2) as u64;
        }
    }

    /// Whether the value is zero.
    pub fn is_zero(&self) -> bool {
        self.limbs == [0; LIMBS]
    }
}

/// Count, sum and sum of squares of each of [`N_SCORES`] scores, exact.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Acc {
    /// Number of values per score (missing values are not counted).
    pub count: [i64; N_SCORES],
    /// Sum per score.
    pub sum: [Fixed; N_SCORES],
    /// Sum of squares per score.
    pub sumsq: [Fixed; N_SCORES],
}

impl Acc {
    /// The accumulator of one observation; `None` scores are not counted.
    pub fn of(values: &[Option<f64>]) -> Acc {
        let mut acc = Acc::zero();
        acc.add_values(values);
        acc
    }

    /// Adds one observation in place: the same exact sums as `plus_equals(&Acc::of(values))`,
    /// without building and adding a whole accumulator of mostly zero limbs.
    pub fn add_values(&mut self, values: &[Option<f64>]) {
        for (i, v) in values.iter().enumerate().take(N_SCORES) {
            let Some(v) = *v else { continue };
            let q = v * v;
            if representable(v) && representable(q) {
                self.count[i] += 1;
                self.sum[i].add_representable(v);
                self.sumsq[i].add_representable(q);
            }
        }
    }

    /// Mean of score `i`, or `None` with no values.
    pub fn mean(&self, i: usize) -> Option<f64> {
        (self.count[i] > 0).then(|| self.sum[i].to_f64() / self.count[i] as f64)
    }

    /// Sample standard deviation of score `i` (n - 1), or `None` with fewer than two values.
    pub fn std(&self, i: usize) -> Option<f64> {
        let n = self.count[i] as f64;
        (self.count[i] > 1).then(|| {
            let s = self.sum[i].to_f64();
            let var = (self.sumsq[i].to_f64() - s * s / n) / (n - 1.0);
            var.max(0.0).sqrt()
        })
    }
}

impl IsZero for Acc {
    fn is_zero(&self) -> bool {
        self.count.iter().all(|c| *c == 0)
            && self.sum.iter().all(Fixed::is_zero)
            && self.sumsq.iter().all(Fixed::is_zero)
    }
}

impl Semigroup for Acc {
    fn plus_equals(&mut self, rhs: &Self) {
        for i in 0..N_SCORES {
            self.count[i] += rhs.count[i];
            self.sum[i].add(&rhs.sum[i]);
            self.sumsq[i].add(&rhs.sumsq[i]);
        }
    }
}

impl Monoid for Acc {
    fn zero() -> Self {
        Acc {
            count: [0; N_SCORES],
            sum: [Fixed::default(); N_SCORES],
            sumsq: [Fixed::default(); N_SCORES],
        }
    }
}

impl Abelian for Acc {
    fn negate(&mut self) {
        for i in 0..N_SCORES {
            self.count[i] = -self.count[i];
            self.sum[i].negate();
            self.sumsq[i].negate();
        }
    }
}

impl differential_dataflow::difference::Multiply<isize> for Acc {
    type Output = Acc;
    fn multiply(self, rhs: &isize) -> Acc {
        let mut out = Acc::zero();
        let mut base = self;
        if *rhs < 0 {
            base.negate();
        }
        for _ in 0..rhs.unsigned_abs() {
            out.plus_equals(&base);
        }
        out
    }
}

/// The [`Fixed`] of `win * 2^base` (units of 2^-128).
fn window_fixed(win: i128, base: u32) -> Fixed {
    let ext = if win < 0 { u64::MAX } else { 0 };
    let mut wide = [ext; LIMBS + 1];
    (wide[0], wide[1]) = (win as u64, ((win as u128) >> 64) as u64);
    let (words, bits) = ((base / 64) as usize, base % 64);
    let mut limbs = [0u64; LIMBS];
    for (i, l) in limbs.iter_mut().enumerate() {
        let Some(j) = i.checked_sub(words) else {
            continue;
        };
        let below = if bits > 0 && j > 0 {
            wide[j - 1] >> (64 - bits)
        } else {
            0
        };
        *l = (wide[j] << bits) | below;
    }
    Fixed::from_limbs(limbs)
}

/// The window `(win, base)` that holds `f` exactly, placed [`MARGIN`] bits below its lowest
/// set bit where its top leaves room (as [`window_add`] places a first value), or `None` where
/// its bits span too much for one: `(0, EMPTY)` for zero.
fn fixed_window(f: &Fixed) -> Option<(i128, u16)> {
    if f.is_zero() {
        return Some((0, EMPTY));
    }
    let mut mag = *f;
    if f.is_negative() {
        mag.negate();
    }
    let limbs = mag.limbs();
    let low = limbs
        .iter()
        .enumerate()
        .find(|(_, l)| **l != 0)
        .map(|(i, l)| 64 * i as u32 + l.trailing_zeros())?;
    let high = limbs
        .iter()
        .enumerate()
        .rev()
        .find(|(_, l)| **l != 0)
        .map(|(i, l)| 64 * i as u32 + 64 - l.leading_zeros())?;
    // the sum's bits must lie within [base, base + 125), as `window_add` keeps them
    let base = low.saturating_sub(MARGIN).max(high.saturating_sub(125));
    if base > low {
        return None;
    }
    // bits base..base + 128 of the two's complement: the value shifted down, its sign kept
    let (word, bit) = ((base / 64) as usize, base % 64);
    let at = |i: usize| {
        f.limbs()
            .get(i)
            .copied()
            .unwrap_or(if f.is_negative() { u64::MAX } else { 0 })
    };
    let part = |i: usize| -> u64 {
        if bit == 0 {
            at(i)
        } else {
            (at(i) >> bit) | (at(i + 1) << (64 - bit))
        }
    };
    let win = (part(word) as u128 | ((part(word + 1) as u128) << 64)) as i128;
    Some((win, base as u16))
}

/// A window not yet used.
const EMPTY: u16 = u16::MAX;
/// A window whose sum moved to the table's spills.
const SPILLED: u16 = u16::MAX - 1;
/// Bits below a window's first value left for smaller values to come.
const MARGIN: u32 = 24;

/// Adds representable `v` to the window `(win, base)`; `false`, adding nothing, where the
/// window cannot hold it (or has spilled).
#[inline(always)]
fn window_add(win: &mut i128, base: &mut u16, v: f64) -> bool {
    let Some((m, s)) = parts(v) else {
        return true;
    };
    // EMPTY and SPILLED lie above every value's place: the common case is the first test
    if s < *base as u32 {
        if *base == SPILLED {
            return false;
        }
        if *win == 0 {
            // empty (or back to zero): placed by this value
            *base = s.saturating_sub(MARGIN) as u16;
        } else {
            // moved down, if its sum leaves room above
            let k = *base as u32 - s;
            if k >= 127 || win.unsigned_abs().leading_zeros() <= k + 1 {
                return false;
            }
            *win <<= k;
            *base = s as u16;
        }
    }
    let d = s - *base as u32;
    if d + 64 - m.leading_zeros() > 125 {
        return false;
    }
    let x = (m as i128) << d;
    let sum = if v < 0.0 {
        win.checked_sub(x)
    } else {
        win.checked_add(x)
    };
    match sum {
        Some(sum) => {
            *win = sum;
            true
        }
        None => false,
    }
}

/// Adds representable `v` to window `k` of `slot` as a full [`Fixed`] in `spills`, moving the
/// window's sum there first if it has not spilled before.
#[cold]
fn spill(
    spills: &mut std::collections::HashMap<(u32, u8), Fixed>,
    slot: usize,
    k: usize,
    win: &mut i128,
    base: &mut u16,
    v: f64,
) {
    let key = (slot as u32, k as u8);
    if *base != SPILLED {
        let f = if *base == EMPTY {
            Fixed::default()
        } else {
            window_fixed(*win, *base as u32)
        };
        (*win, *base) = (0, SPILLED);
        spills.insert(key, f);
    }
    if let Some(f) = spills.get_mut(&key) {
        f.add_representable(v);
    }
}

/// Exact sums ([`Acc`]) of many slots, held in 360 bytes a slot instead of 936: each sum and
/// sum of squares is a 128-bit window of the [`Fixed`] number, `win * 2^base`, placed by the
/// first value added and moved down when a smaller one comes. The values of one neuron's score
/// over a chunk's images span far fewer than the 128 bits, so a window nearly always holds the
/// exact sum; one that cannot (a value too small to move the window down to, or a sum that
/// would pass 2^127) moves to a full [`Fixed`] in a side map. [`SumTable::take`] gives the same
/// [`Acc`] as [`Acc::add_values`] of the same values, bit for bit (tested).
#[derive(Default)]
pub struct SumTable {
    count: Vec<[u32; N_SCORES]>,
    /// Sums, then sums of squares.
    win: Vec<[i128; 2 * N_SCORES]>,
    base: Vec<[u16; 2 * N_SCORES]>,
    spills: std::collections::HashMap<(u32, u8), Fixed>,
}

impl SumTable {
    /// Bytes a slot takes.
    pub const SLOT_BYTES: usize = std::mem::size_of::<[u32; N_SCORES]>()
        + std::mem::size_of::<[i128; 2 * N_SCORES]>()
        + std::mem::size_of::<[u16; 2 * N_SCORES]>();

    /// `slots` zero sums.
    pub fn new(slots: usize) -> SumTable {
        SumTable {
            count: vec![[0; N_SCORES]; slots],
            win: vec![[0; 2 * N_SCORES]; slots],
            base: vec![[EMPTY; 2 * N_SCORES]; slots],
            spills: Default::default(),
        }
    }

    /// Slots.
    pub fn len(&self) -> usize {
        self.count.len()
    }

    /// Whether the table has no slots.
    pub fn is_empty(&self) -> bool {
        self.count.is_empty()
    }

    /// Adds one observation to `slot`: as [`Acc::add_values`].
    pub fn add(&mut self, slot: usize, values: &[Option<f64>]) {
        let (count, win, base) = (
            &mut self.count[slot],
            &mut self.win[slot],
            &mut self.base[slot],
        );
        for (i, v) in values.iter().enumerate().take(N_SCORES) {
            let Some(v) = *v else { continue };
            let q = v * v;
            if representable(v) && representable(q) {
                count[i] += 1;
                for (k, x) in [(i, v), (N_SCORES + i, q)] {
                    if !window_add(&mut win[k], &mut base[k], x) {
                        spill(&mut self.spills, slot, k, &mut win[k], &mut base[k], x);
                    }
                }
            }
        }
    }

    /// Appends a zero slot and returns its index.
    pub fn push(&mut self) -> usize {
        self.count.push([0; N_SCORES]);
        self.win.push([0; 2 * N_SCORES]);
        self.base.push([EMPTY; 2 * N_SCORES]);
        self.count.len() - 1
    }

    /// Adds exact sums to `slot`: as [`Acc::plus_equals`]. Each sum goes into its window where
    /// the total fits one, else to a full number in the side map.
    pub fn add_acc(&mut self, slot: usize, acc: &Acc) {
        for i in 0..N_SCORES {
            let c = &mut self.count[slot][i];
            *c = u32::try_from(*c as i64 + acc.count[i])
                .expect("a count of images past 2^32, or below zero");
        }
        for (k, f) in acc.sum.iter().chain(&acc.sumsq).enumerate() {
            if f.is_zero() {
                continue;
            }
            let (win, base) = (&mut self.win[slot][k], &mut self.base[slot][k]);
            let key = (slot as u32, k as u8);
            if *base == SPILLED {
                if let Some(total) = self.spills.get_mut(&key) {
                    total.add(f);
                }
                continue;
            }
            let total = match *base {
                EMPTY => *f,
                b => {
                    let mut t = window_fixed(*win, b as u32);
                    t.add(f);
                    t
                }
            };
            match fixed_window(&total) {
                Some(w) => (*win, *base) = w,
                None => {
                    (*win, *base) = (0, SPILLED);
                    self.spills.insert(key, total);
                }
            }
        }
    }

    /// The sums of `slot`, left as they are.
    pub fn get(&self, slot: usize) -> Acc {
        let mut acc = Acc::zero();
        acc.count = self.count[slot].map(|c| c as i64);
        for k in 0..2 * N_SCORES {
            let f = match self.base[slot][k] {
                EMPTY => Fixed::default(),
                SPILLED => self
                    .spills
                    .get(&(slot as u32, k as u8))
                    .copied()
                    .unwrap_or_default(),
                b => window_fixed(self.win[slot][k], b as u32),
            };
            if k < N_SCORES {
                acc.sum[k] = f;
            } else {
                acc.sumsq[k - N_SCORES] = f;
            }
        }
        acc
    }

    /// The sums of `slot`, which is left zero.
    pub fn take(&mut self, slot: usize) -> Acc {
        let acc = self.get(slot);
        for k in 0..2 * N_SCORES {
            if self.base[slot][k] == SPILLED {
                self.spills.remove(&(slot as u32, k as u8));
            }
        }
        self.count[slot] = [0; N_SCORES];
        self.win[slot] = [0; 2 * N_SCORES];
        self.base[slot] = [EMPTY; 2 * N_SCORES];
        acc
    }
}

/// A worker's aggregates: each key's exact sums, compact. A key with one image's scores keeps
/// them as they came ([`Update::One`], 72 bytes); any other keeps its sums in a slot of a
/// growing [`SumTable`] (360 bytes, against 936 for a boxed [`Acc`] and its allocation).
/// MobileNetV2's 102 336 keys of all images: about 45 against 100 MB, and as much less again
/// per class with `output.per_class`. [`Sums::iter`] gives each key the [`Acc`] that adding up
/// its updates' [`Update::to_acc`] gives, bit for bit (tested).
pub struct Sums<K> {
    /// Each key's place: a slot of `table`, or (with [`Sums::ONE`] set) an entry of `ones`.
    keys: std::collections::BTreeMap<K, u32>,
    table: SumTable,
    ones: Vec<[u64; N_SCORES]>,
    /// Entries of `ones` whose key has moved to the table, for the next key of one image.
    free: Vec<u32>,
}

impl<K: Ord> Default for Sums<K> {
    fn default() -> Self {
        Sums {
            keys: Default::default(),
            table: SumTable::default(),
            ones: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<K: Ord> Sums<K> {
    /// The tag of a place in `ones`.
    const ONE: u32 = 1 << 31;

    /// Keys held.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Adds `update` to `key`'s sums.
    pub fn add(&mut self, key: K, update: Update) {
        use std::collections::btree_map::Entry;
        match self.keys.entry(key) {
            Entry::Vacant(v) => {
                let place = match update {
                    Update::One(bits) => {
                        let i = match self.free.pop() {
                            Some(i) => {
                                self.ones[i as usize] = bits;
                                i
                            }
                            None => {
                                self.ones.push(bits);
                                (self.ones.len() - 1) as u32
                            }
                        };
                        assert!(i < Self::ONE, "more than 2^31 keys");
                        i | Self::ONE
                    }
                    Update::Sum(acc) => {
                        let slot = self.table.push();
                        self.table.add_acc(slot, &acc);
                        slot as u32
                    }
                };
                v.insert(place);
            }
            Entry::Occupied(mut o) => {
                let place = *o.get();
                let slot = if place & Self::ONE != 0 {
                    // a second image: the first one's scores move into a slot of their own
                    let i = place & !Self::ONE;
                    let slot = self.table.push();
                    self.table
                        .add(slot, &Update::values(&self.ones[i as usize]));
                    self.free.push(i);
                    *o.get_mut() = slot as u32;
                    slot
                } else {
                    place as usize
                };
                match update {
                    Update::One(bits) => self.table.add(slot, &Update::values(&bits)),
                    Update::Sum(acc) => self.table.add_acc(slot, &acc),
                }
            }
        }
    }

    /// Each key with its sums, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, Acc)> + '_ {
        self.keys.iter().map(|(k, &place)| {
            let acc = if place & Self::ONE != 0 {
                Acc::of(&Update::values(&self.ones[(place & !Self::ONE) as usize]))
            } else {
                self.table.get(place as usize)
            };
            (k, acc)
        })
    }
}

/// A difference of the score aggregation: one image's scores as they are, or an exact sum.
///
/// A chunk's sums per class are mostly of one image (a chunk of ten images of ten classes, as
/// in the paper's benchmark): as an [`Acc`] each is 936 bytes of mostly zero limbs, built,
/// copied through the exchange and kept in the aggregates; as `One` it is the 72 bytes of its
/// scores, turned into sums only where it meets another. Either way the sums are the exact
/// ones of [`Acc::of`] and [`Acc::plus_equals`], whatever meets what and in which order.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Update {
    /// One image's scores, as f64 bits; NaN where a score is missing (a value [`Acc`] does not
    /// count, whatever it is, is not counted here either).
    One([u64; N_SCORES]),
    /// An exact sum.
    Sum(Box<Acc>),
}

impl Update {
    /// One image's scores (`None` = missing).
    pub fn one(values: &[Option<f64>; N_SCORES]) -> Update {
        Update::One(values.map(|v| v.unwrap_or(f64::NAN).to_bits()))
    }

    /// One image's scores from floats, NaN where missing.
    pub fn one_from_f64(values: &[f64]) -> Update {
        let mut bits = [f64::NAN.to_bits(); N_SCORES];
        for (b, v) in bits.iter_mut().zip(values) {
            *b = v.to_bits();
        }
        Update::One(bits)
    }

    fn values(bits: &[u64; N_SCORES]) -> [Option<f64>; N_SCORES] {
        bits.map(|b| Some(f64::from_bits(b)).filter(|v| !v.is_nan()))
    }

    /// The exact sums.
    pub fn to_acc(&self) -> std::borrow::Cow<'_, Acc> {
        match self {
            Update::One(bits) => std::borrow::Cow::Owned(Acc::of(&Self::values(bits))),
            Update::Sum(acc) => std::borrow::Cow::Borrowed(acc),
        }
    }

    /// Adds these sums to `acc`.
    pub fn add_to(&self, acc: &mut Acc) {
        match self {
            Update::One(bits) => acc.add_values(&Self::values(bits)),
            Update::Sum(a) => acc.plus_equals(&**a),
        }
    }
}

impl Clone for Update {
    fn clone(&self) -> Self {
        match self {
            Update::One(bits) => Update::One(*bits),
            Update::Sum(acc) => Update::Sum(acc.clone()),
        }
    }

    /// Copies into the box already there where both are sums: differential's consolidation
    /// clones each update into its running sum and back (`clone_from`), which otherwise
    /// allocated two 936-byte boxes per update and freed two.
    fn clone_from(&mut self, source: &Self) {
        match (self, source) {
            (Update::Sum(mine), Update::Sum(theirs)) => mine.as_mut().clone_from(theirs),
            (mine, _) => *mine = source.clone(),
        }
    }
}

impl From<Acc> for Update {
    fn from(acc: Acc) -> Update {
        Update::Sum(Box::new(acc))
    }
}

impl IsZero for Update {
    fn is_zero(&self) -> bool {
        match self {
            // as `Acc::of(values).is_zero()`: no value it would count
            Update::One(bits) => !bits.iter().any(|b| {
                let v = f64::from_bits(*b);
                representable(v) && representable(v * v)
            }),
            Update::Sum(acc) => acc.is_zero(),
        }
    }
}

impl Semigroup for Update {
    fn plus_equals(&mut self, rhs: &Self) {
        if let Update::One(bits) = self {
            *self = Update::Sum(Box::new(Acc::of(&Self::values(bits))));
        }
        if let Update::Sum(acc) = self {
            rhs.add_to(acc);
        }
    }
}

impl Monoid for Update {
    fn zero() -> Self {
        Update::Sum(Box::new(Acc::zero()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A seeded stream of 53-bit numbers.
    fn stream(seed: u64) -> impl FnMut() -> u64 {
        let mut rng = seed;
        move || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            rng >> 11
        }
    }

    /// Kinds of values, each from a random number, that exact sums in windows must hold: one
    /// magnitude, magnitudes 2^300 apart, ones too small or too large for a window, values
    /// that cancel, tiny ones truncated away, negative zero, ones not counted.
    const KINDS: [fn(u64) -> f64; 8] = [
        |r| (r % 1000) as f64 * 1e-3 - 0.3,
        |r| ((r % 2000) as f64 - 1000.0) * 2f64.powi((r % 200) as i32 - 120),
        |r| if r % 2 == 0 { 1e20 } else { -3e-30 },
        |r| [1.5, -1.5, 0.0, -0.0][(r % 4) as usize],
        |r| (r % 7) as f64 * 1e-45,
        |r| [f64::NAN, f64::INFINITY, 2e27, 1e-200][(r % 4) as usize],
        |r| 1.2e27 * ((r % 3) as f64 - 1.0),
        |r| f64::from_bits(r) % 1e6,
    ];

    /// A [`SumTable`]'s sums are [`Acc::add_values`]' bit for bit: values of one magnitude and
    /// of magnitudes 2^300 apart, smaller ones after larger (the window moves down), ones too
    /// small or too large for the window (it spills to a full number), cancellations to zero,
    /// tiny values truncated away, negative zero, values not counted; a slot taken is zero.
    #[test]
    fn sum_table_sums_are_exact() {
        let mut next = stream(12345);
        let kinds = KINDS;
        let slots = 64;
        let mut table = SumTable::new(slots);
        let mut want = vec![Acc::zero(); slots];
        for round in 0..40 {
            for (slot, w) in want.iter_mut().enumerate() {
                let kind = kinds[(slot + round / 20) % kinds.len()];
                let values: Vec<Option<f64>> = (0..N_SCORES)
                    .map(|i| (!next().is_multiple_of(9)).then(|| kind(next()) * (1 + i) as f64))
                    .collect();
                table.add(slot, &values);
                w.add_values(&values);
            }
        }
        assert!(!table.spills.is_empty(), "no window spilled");
        for (slot, w) in want.iter().enumerate() {
            assert_eq!(&table.take(slot), w, "slot {slot}");
            assert_eq!(table.take(slot), Acc::zero(), "slot {slot} left non-zero");
        }
        assert!(table.spills.is_empty());
    }

    /// [`Sums`] gives each key the exact sums of its updates ([`Update::to_acc`] added up),
    /// whatever their mix: keys of one image's scores only, scores then sums and sums then
    /// scores, values whose sums cannot share a window (magnitudes 2^300 apart: the slot
    /// spills, through `SumTable::add_acc` too), sums that cancel to zero. A place freed by a
    /// key of one image that moved to the table is reused.
    #[test]
    fn sums_hold_each_keys_exact_sums() {
        let mut next = stream(99);
        let kinds = KINDS;
        let mut sums = Sums::<u32>::default();
        let mut want: std::collections::BTreeMap<u32, Acc> = Default::default();
        let mut ones_ever = 0;
        for round in 0..30usize {
            for key in 0..40u32 {
                // keys 30.. take one update only, in a late round; the others one a round
                if key >= 30 && round != 20 + (key as usize - 30) {
                    continue;
                }
                let kind = kinds[(key as usize + round / 10) % kinds.len()];
                let images = 1 + next() % 4;
                let mut values = || -> Vec<Option<f64>> {
                    (0..N_SCORES)
                        .map(|i| (!next().is_multiple_of(9)).then(|| kind(next()) * (1 + i) as f64))
                        .collect()
                };
                let update = if (key as usize + round).is_multiple_of(3) {
                    let mut acc = Acc::zero();
                    for _ in 0..images {
                        acc.add_values(&values());
                    }
                    Update::from(acc)
                } else {
                    let v = values();
                    Update::one(&std::array::from_fn(|i| v[i]))
                };
                if matches!(update, Update::One(_)) && !want.contains_key(&key) {
                    ones_ever += 1;
                }
                want.entry(key)
                    .or_insert_with(Acc::zero)
                    .plus_equals(&*update.to_acc());
                sums.add(key, update);
            }
        }
        assert_eq!(sums.len(), want.len());
        for ((k, got), (wk, w)) in sums.iter().zip(&want) {
            assert_eq!(k, wk);
            assert_eq!(&got, w, "key {k}");
        }
        assert!(!sums.table.spills.is_empty(), "no slot spilled");
        assert!(sums.ones.len() < ones_ever, "no place of one image reused");
        assert!(
            sums.keys.values().any(|p| p & Sums::<u32>::ONE != 0),
            "no key of one image"
        );
    }

    /// `clone_from` gives what `clone` gives, between every pair of kinds, and keeps a sum's
    /// box where it copies one sum into another.
    #[test]
    fn clone_from_equals_clone() {
        let mut scores = [None; N_SCORES];
        (scores[0], scores[2]) = (Some(1.5), Some(-3.0));
        let a = Update::one(&scores);
        let b = Update::from(Acc::of(&[Some(2.0), Some(1e-9)]));
        let c = Update::from(Acc::of(&[None, Some(-7.0), Some(4e20)]));
        for source in [&a, &b, &c] {
            for target in [&a, &b, &c] {
                let mut t = target.clone();
                let before = match &t {
                    Update::Sum(acc) => Some(&**acc as *const Acc),
                    Update::One(_) => None,
                };
                t.clone_from(source);
                assert_eq!(&t, source);
                if let (Some(p), Update::Sum(acc), Update::Sum(_)) = (before, &t, source) {
                    assert_eq!(p, &**acc as *const Acc, "a sum copied into a new box");
                }
            }
        }
    }

    /// Updates added up in any mix of one image's scores and sums, in any order, give the
    /// exact sums of adding every image's `Acc::of`; an image with nothing countable is zero,
    /// as its `Acc::of` is; an update survives serialisation (processes exchange them).
    #[test]
    fn updates_add_up_to_the_exact_sums() {
        let odd = [
            Some(1.5),
            None,
            Some(-2.25e-7),
            Some(f64::NAN),
            Some(f64::INFINITY),
            Some(1e20),
            Some(3e15),
            Some(-0.0),
            Some(1e-200),
        ];
        let images: Vec<[Option<f64>; N_SCORES]> = (0..6)
            .map(|i| {
                std::array::from_fn(|k| {
                    odd[(i * 5 + k) % odd.len()].map(|v| v * (1.0 + i as f64 / 7.0))
                })
            })
            .collect();
        let mut want = Acc::zero();
        for v in &images {
            want.plus_equals(&Acc::of(v));
        }
        // one at a time onto a One; two Sums of three; Ones onto a Sum, backwards
        let mut a = Update::one(&images[0]);
        for v in &images[1..] {
            a.plus_equals(&Update::one(v));
        }
        let mut left = Update::one(&images[0]);
        left.plus_equals(&Update::one(&images[1]));
        left.plus_equals(&Update::one(&images[2]));
        let mut right: Update = Acc::of(&images[3]).into();
        right.plus_equals(&Update::one(&images[4]));
        right.plus_equals(&Update::one(&images[5]));
        let mut b = right.clone();
        b.plus_equals(&left);
        let mut c = Update::zero();
        for v in images.iter().rev() {
            c.plus_equals(&Update::one(v));
        }
        for u in [&a, &b, &c] {
            assert_eq!(*u.to_acc(), want);
        }
        for v in &images {
            let one = Update::one(v);
            assert_eq!(*one.to_acc(), Acc::of(v));
            assert_eq!(one.is_zero(), Acc::of(v).is_zero());
        }
        let none = Update::one(&[
            None,
            Some(f64::NAN),
            Some(1e300),
            None,
            None,
            None,
            None,
            None,
            None,
        ]);
        assert!(none.is_zero() && Acc::of(&[None, Some(f64::NAN), Some(1e300)]).is_zero());
        assert!(
            !Update::one(&[Some(1e-200), None, None, None, None, None, None, None, None]).is_zero()
        );
        for u in [Update::one(&images[1]), b] {
            let back: Update = serde_json::from_str(&serde_json::to_string(&u).unwrap()).unwrap();
            assert_eq!(back, u);
        }
    }

    #[test]
    fn fixed_round_trips_and_adds_exactly() {
        for v in [
            0.0, 1.0, -1.0, 0.1, -3.75e-7, 1e20, -2.5e-25, 123456.789, 1e-30,
        ] {
            let f = Fixed::from_f64(v).unwrap();
            assert!((f.to_f64() - v).abs() <= v.abs() * 1e-15 + 1e-38, "{v}");
        }
        assert!(Fixed::from_f64(f64::NAN).is_none());
        assert!(Fixed::from_f64(1e28).is_none());
        let big = Fixed::from_f64(1e26).unwrap();
        assert!((big.to_f64() / 1e26 - 1.0).abs() < 1e-15);
        // a sum that f64 gets wrong in one order but not the other is exact here
        let vals = [1e16, 1.0, -1e16, 1.0];
        let mut a = Fixed::default();
        for v in vals {
            a.add(&Fixed::from_f64(v).unwrap());
        }
        let mut b = Fixed::default();
        for v in vals.iter().rev() {
            b.add(&Fixed::from_f64(*v).unwrap());
        }
        assert_eq!(a, b);
        assert_eq!(a.to_f64(), 2.0);
    }

    /// `add_f64` against building the number and adding it, from sums of either sign (so that
    /// carries and borrows run through every limb), on values of every scale: subnormals,
    /// values below 2^-128, both sides of each limb boundary, powers of two, the limit.
    #[test]
    fn add_f64_equals_adding_the_converted_value() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut values = vec![
            0.0,
            -0.0,
            5e-324,
            -5e-324,
            1e-300,
            2f64.powi(-128),
            2f64.powi(-129),
        ];
        for e in [
            -140, -129, -128, -127, -65, -64, -63, -1, 0, 1, 63, 64, 65, 88, 89,
        ] {
            let p = 2f64.powi(e);
            values.extend([p, -p, p * (1.0 - f64::EPSILON), -p * 1.5]);
        }
        values.extend([
            MAX_ABS * (1.0 - f64::EPSILON),
            -MAX_ABS * 0.999,
            MAX_ABS,
            f64::NAN,
        ]);
        for _ in 0..20_000 {
            let r = next();
            let mant = f64::from_bits((r >> 12) | 0x3ff0_0000_0000_0000) - 1.0;
            let scale = 2f64.powi((next() % 240) as i32 - 150);
            values.push(if r & 1 == 1 {
                -mant * scale
            } else {
                mant * scale
            });
        }
        for start in [0.0, 1e20, -1e20, -2f64.powi(-100), 3.5] {
            let (mut fast, mut slow) = (
                Fixed::from_f64(start).unwrap(),
                Fixed::from_f64(start).unwrap(),
            );
            for v in &values {
                let added = fast.add_f64(*v);
                let f = Fixed::from_f64(*v);
                assert_eq!(added, f.is_some(), "{v}");
                if let Some(f) = f {
                    slow.add(&f);
                }
                assert_eq!(fast, slow, "after adding {v} to sums from {start}");
            }
        }
    }

    #[test]
    fn acc_is_order_independent_and_matches_f64() {
        let xs: Vec<f64> = (0..1000)
            .map(|i| ((i * 37 % 101) as f64 - 50.0) * 0.013)
            .collect();
        let forward = xs.iter().fold(Acc::zero(), |mut a, x| {
            a.plus_equals(&Acc::of(&[Some(*x)]));
            a
        });
        let mut halves = xs[500..].iter().rev().fold(Acc::zero(), |mut a, x| {
            a.plus_equals(&Acc::of(&[Some(*x)]));
            a
        });
        let first = xs[..500].iter().fold(Acc::zero(), |mut a, x| {
            a.plus_equals(&Acc::of(&[Some(*x)]));
            a
        });
        halves.plus_equals(&first);
        assert_eq!(forward, halves);
        // in place, with missing and unaccumulable values among them: the same sums
        let mut in_place = Acc::zero();
        let mut whole = Acc::zero();
        for x in &xs {
            let values = [Some(*x), None, Some(-x * 1e3), Some(f64::NAN), Some(2e30)];
            in_place.add_values(&values);
            whole.plus_equals(&Acc::of(&values));
        }
        assert_eq!(in_place, whole);
        assert_eq!(&in_place.sum[..1], &forward.sum[..1]);
        assert_eq!(in_place.count[..5], [1000, 0, 1000, 0, 0]);
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let sd = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        assert!((forward.mean(0).unwrap() - mean).abs() < 1e-12);
        assert!((forward.std(0).unwrap() - sd).abs() < 1e-10);
        assert_eq!(forward.count[1], 0);
        assert_eq!(forward.mean(1), None);
        let mut neg = forward.clone();
        neg.negate();
        neg.plus_equals(&forward);
        assert!(neg.is_zero());
    }
}
