//! What the workers of one process share of a chunk: one dense table of its exact sums, and its
//! commit.
//!
//! Until session 19 each worker summed its images of a chunk into a table of its own (36 MB for
//! MobileNetV2's 102 336 neuron terms), so 16 workers held 16 of them, 32 with the next chunk's.
//! Now a process holds one a chunk in flight: its workers add their images to it a stripe at a
//! time, each stripe behind its own lock, and once the frontier has passed the chunk (so every
//! worker's images of it are in) they hand its sums on together, a slice at a time from a
//! shared cursor, each into its own sums file. Since a worker's sums file then holds other
//! workers' images' sums, the chunk's segments are committed together: the last worker to
//! finish writes one manifest line naming them all ([`crate::resume::WorkDir::commit_segments`]).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::resume::Segment;
use crate::score::SumTable;

/// Slots a stripe holds, rounded down to whole neurons: a worker adding an image holds one
/// stripe's lock at a time (MobileNetV2's table is about 100 stripes, the paper's 7).
const STRIPE: usize = 1024;

/// A table's stripes.
type Striped = Vec<Mutex<SumTable>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // a worker that panicked fails the run; its sums are not needed then
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The chunks in flight of one process, and the zeroed tables the committed ones gave back.
pub(crate) struct ProcessSums {
    /// Slots a stripe holds at most ([`STRIPE`]; tests set fewer).
    stripe: usize,
    chunks: Mutex<HashMap<u64, Arc<SharedChunk>>>,
    spare: Arc<Mutex<Vec<Striped>>>,
    built: Arc<AtomicUsize>,
}

/// One chunk's table, built when a worker first needs it, and its commit.
pub(crate) struct SharedChunk {
    /// The chunk (timestamp).
    time: u64,
    slots: usize,
    stripe: usize,
    table: Mutex<Option<Arc<Striped>>>,
    spare: Arc<Mutex<Vec<Striped>>>,
    built: Arc<AtomicUsize>,
    /// The next slot to hand on once the chunk commits.
    next: AtomicUsize,
    commit: Mutex<Commit>,
}

#[derive(Default)]
struct Commit {
    /// Workers with images (or a resumed run's seeds) in the chunk.
    participants: usize,
    /// Those that have handed on their sums and finished their parts.
    arrived: usize,
    segments: Vec<Segment>,
    ok: bool,
}

impl Default for ProcessSums {
    fn default() -> Self {
        ProcessSums {
            stripe: STRIPE,
            chunks: Default::default(),
            spare: Default::default(),
            built: Default::default(),
        }
    }
}

impl ProcessSums {
    /// Stripes of at most `stripe` slots (tests).
    #[cfg(test)]
    pub(crate) fn with_stripe(stripe: usize) -> Self {
        ProcessSums {
            stripe,
            ..ProcessSums::default()
        }
    }

    /// Joins a worker to chunk `time` (a table of `slots` sums of `terms` terms a neuron); the
    /// worker must [`ProcessSums::arrive`] once it has handed on its sums.
    pub(crate) fn join(&self, time: u64, slots: usize, terms: usize) -> Arc<SharedChunk> {
        let mut chunks = lock(&self.chunks);
        let chunk = chunks.entry(time).or_insert_with(|| {
            Arc::new(SharedChunk {
                time,
                slots,
                stripe: (self.stripe / terms).max(1) * terms,
                table: Mutex::new(None),
                spare: self.spare.clone(),
                built: self.built.clone(),
                next: AtomicUsize::new(0),
                commit: Mutex::new(Commit {
                    ok: true,
                    ..Commit::default()
                }),
            })
        });
        lock(&chunk.commit).participants += 1;
        chunk.clone()
    }

    /// A worker is done with `chunk`: its sums handed on, its parts and sums file finished (or
    /// not: `ok`). The last one gets the segments of all, to commit in one line: `Some` only
    /// where every worker's were written. The last one also gives the table back, zero (every
    /// slice has been handed on by then), for a later chunk.
    pub(crate) fn arrive(
        &self,
        chunk: &SharedChunk,
        segment: Segment,
        ok: bool,
    ) -> Option<Vec<Segment>> {
        let (segments, ok) = {
            let mut c = lock(&chunk.commit);
            c.arrived += 1;
            c.ok &= ok;
            c.segments.push(segment);
            if c.arrived < c.participants {
                return None;
            }
            (std::mem::take(&mut c.segments), c.ok)
        };
        // the last worker: no other holds a lock of this chunk's now
        lock(&self.chunks).remove(&chunk.time);
        if let Some(table) = lock(&chunk.table).take() {
            if let Ok(table) = Arc::try_unwrap(table) {
                lock(&self.spare).push(table);
            }
        }
        ok.then(|| {
            segments
                .into_iter()
                .filter(|s| !s.images.is_empty() || !s.skipped.is_empty() || s.sums.is_some())
                .collect()
        })
    }

    /// Tables built so far (tests).
    #[cfg(test)]
    pub(crate) fn built(&self) -> usize {
        self.built.load(Ordering::Relaxed)
    }
}

impl SharedChunk {
    /// Runs `add` on each stripe in turn, with the stripe's first slot, holding its lock; the
    /// table is built (or a spare one taken) on first use. Workers start at different stripes
    /// (`start`, their index) so that they seldom wait for each other.
    pub(crate) fn each_stripe(&self, start: usize, mut add: impl FnMut(usize, &mut SumTable)) {
        let table = self.built_table();
        let n = table.len();
        for k in 0..n {
            let i = (start + k) % n;
            add(i * self.stripe, &mut lock(&table[i]));
        }
    }

    /// Runs `add` on each stripe that holds some of `slots`, in order, with the stripe's first
    /// slot, holding its lock; the table is built (or a spare one taken) on first use. `add`
    /// touches only the slots of `slots` (a slice of an image's neurons).
    pub(crate) fn each_stripe_over(
        &self,
        slots: Range<usize>,
        add: impl FnMut(usize, &mut SumTable),
    ) {
        self.over(&self.built_table(), slots, add);
    }

    /// Runs `f` on the stripes of `table` that hold some of `slots`, in order, with each
    /// stripe's first slot, holding its lock.
    fn over(&self, table: &Striped, slots: Range<usize>, mut f: impl FnMut(usize, &mut SumTable)) {
        let first = slots.start / self.stripe;
        let stripes = table[first..slots.end.div_ceil(self.stripe)].iter();
        for (i, stripe) in (first..).zip(stripes) {
            f(i * self.stripe, &mut lock(stripe));
        }
    }

    /// The table, built (or a spare one taken) if no worker has yet.
    fn built_table(&self) -> Arc<Striped> {
        lock(&self.table)
            .get_or_insert_with(|| {
                Arc::new(lock(&self.spare).pop().unwrap_or_else(|| {
                    self.built.fetch_add(1, Ordering::Relaxed);
                    (0..self.slots.div_ceil(self.stripe))
                        .map(|i| {
                            let n = self.stripe.min(self.slots - i * self.stripe);
                            Mutex::new(SumTable::new(n))
                        })
                        .collect()
                }))
            })
            .clone()
    }

    /// Whether the table has been built, i.e. some worker's images are in it.
    pub(crate) fn has_table(&self) -> bool {
        lock(&self.table).is_some()
    }

    /// The next slots to hand on, whole stripes of up to `max` slots (at least one stripe), or
    /// `None` once every slot has been taken (or no worker built the table). Call only after
    /// the frontier has passed the chunk.
    pub(crate) fn next_slice(&self, max: usize) -> Option<Range<usize>> {
        if !self.has_table() {
            return None;
        }
        let len = (max / self.stripe).max(1) * self.stripe;
        let start = self.next.fetch_add(len, Ordering::Relaxed);
        (start < self.slots).then(|| start..(start + len).min(self.slots))
    }

    /// Runs `take` on the stripes of `slots` (from [`SharedChunk::next_slice`]), with each
    /// stripe's first slot, holding its lock.
    pub(crate) fn each_stripe_of(
        &self,
        slots: Range<usize>,
        take: impl FnMut(usize, &mut SumTable),
    ) {
        let Some(table) = lock(&self.table).clone() else {
            return;
        };
        self.over(&table, slots, take);
    }
}
