//! The dataflow one worker builds and drives: `Images` (input; worker w of W takes the images
//! with `seq % W == w`) -> `Decode` -> `Record` (stimulus + batched forward passes) -> `Analyse`
//! (FFT and term scores) -> `WriteImages` (this worker's segments, committed with the process's
//! other workers' of the same chunk; partial sums of the scores per key and chunk, in a table
//! the process's workers share, [`super::shared`]) -> differential `consolidate` (exchanged by
//! the key (tap, channel, term, label)) -> `CollectScores`. Image-level stages use `Pipeline`:
//! an image stays on its worker; only the partial sums cross workers.

use std::cell::RefCell;
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use differential_dataflow::collection::AsCollection;
use differential_dataflow::difference::{IsZero, Monoid};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::{Capability, Exchange, Input, Probe};
use timely::dataflow::{InputHandle, ProbeHandle};

use super::shared::{ProcessSums, SharedChunk};
use super::{StageTimes, WorkerReport, STOP};
use crate::config::Plan;
use crate::model::record::{record, record_many, DeviceStimulus, Recording};
use crate::model::Network;
use crate::resume::{sums_name, Segment, WorkDir};
use crate::score::{
    analyse_taps, tap_slices, Acc, Fixed, ImageScores, Neighbourhood, Sums, Update, N_SCORES,
};
use crate::sink::{self, ImageTables, ScoreKey};
use crate::source::{self, ImageRef, Skipped};
use crate::spectrum::Spectrum;

/// Where the neuron's own score, the authors' mean dB-SNR, sits among an [`Acc`]'s scores.
const MEAN_SNR: usize = N_SCORES - 1;

/// `FREQTAG_GPU_PATH_ON_CPU=1`: run the GPU's code path (its layers as tensor ops, frames
/// built as tensors, images batched across a pass) on the CPU, so that tests here cover it.
pub(crate) fn gpu_path_on_cpu() -> bool {
    std::env::var_os("FREQTAG_GPU_PATH_ON_CPU").is_some_and(|v| v != "0")
}

/// The message for a failed pass on a GPU: candle's first line (it appends a backtrace), and
/// what to do when the card ran out of memory.
fn inference_error(e: &candle_core::Error, frames: usize) -> String {
    let e = e.to_string();
    let first = e.lines().next().unwrap_or_default();
    if first.contains("OUT_OF_MEMORY") || first.to_lowercase().contains("out of memory") {
        format!("inference failed: {first}: the GPU ran out of memory; lower model.device_batch (now {frames} frames a pass) or --workers")
    } else {
        format!("inference failed: {first}")
    }
}

/// Runs `f` and adds its duration to `slot`.
fn timed<R>(
    slot: &RefCell<StageTimes>,
    field: fn(&mut StageTimes) -> &mut f64,
    f: impl FnOnce() -> R,
) -> R {
    let t = Instant::now();
    let r = f();
    *field(&mut slot.borrow_mut()) += t.elapsed().as_secs_f64();
    r
}

/// What a worker's analysis of its images needs: the spectrum's plan, the neighbourhood of the
/// scores, and whether amplitude spectra are kept (for the spectra table only).
struct Analyser {
    spectrum: Spectrum,
    nb: Neighbourhood,
    amplitude: bool,
}

/// What a worker's operators share.
pub(crate) struct WorkerCtx {
    index: usize,
    plan: Arc<Plan>,
    work: Arc<WorkDir>,
    done: Arc<AtomicU64>,
    /// The chunks' tables of sums this process's workers share.
    process: Arc<ProcessSums>,
    skipped: RefCell<Vec<Skipped>>,
    errors: RefCell<Vec<String>>,
    processed: std::cell::Cell<u64>,
    /// Chunks whose sums `WriteImages` is still handing on: the worker steps until there are
    /// none before it feeds another image.
    committing: std::cell::Cell<usize>,
    /// Decoded images the `Record` stage holds for the device thread (GPU path): the worker
    /// feeds no more while two passes' worth wait.
    held: std::cell::Cell<usize>,
    times: RefCell<StageTimes>,
}

impl WorkerCtx {
    pub(crate) fn new(
        index: usize,
        plan: Arc<Plan>,
        work: Arc<WorkDir>,
        done: Arc<AtomicU64>,
        process: Arc<ProcessSums>,
    ) -> Rc<Self> {
        Rc::new(WorkerCtx {
            index,
            plan,
            work,
            done,
            process,
            skipped: RefCell::new(Vec::new()),
            errors: RefCell::new(Vec::new()),
            processed: std::cell::Cell::new(0),
            committing: std::cell::Cell::new(0),
            held: std::cell::Cell::new(0),
            times: RefCell::new(StageTimes::default()),
        })
    }
}

/// Images a worker keeps as their scores before its sums of a chunk go into the chunk's shared
/// table. A kept image is 72 bytes per (neuron, term) against the table's 360. With one, a
/// worker with one image in a chunk (a short run on many workers: the quickstart's 5 photos on
/// 16 cores) hands on its scores, and where every worker has one, no table is built (16
/// workers: 1 284 -> 760 MB peak, session 10, when each worker had a table of its own).
const KEEP: usize = 1;

/// A worker's partial sums of a chunk. Up to [`KEEP`] images are kept as their scores (72 bytes
/// per neuron and term, NaN where absent); at drain their sums are built per key, or handed on
/// as the one image's scores ([`Update::One`]) where the worker has one image in the chunk.
/// Past that, the sums over all images go into the dense table of exact sums per (neuron, term)
/// in forward order that the process's workers share ([`SharedChunk`], 36 MB for MobileNetV2),
/// so that an image's updates walk memory in order (in a hash map of 936-byte [`Acc`]s each of
/// an image's updates, about 14 000 for the paper pipeline, missed the cache). Sums per label
/// are built only when the chunk is drained, from the kept scores of the worker's labelled
/// images: a dense table per label seen cost a chunk of ten classes 85 MB of fresh pages for
/// the paper pipeline. In the table the neuron's own score (the authors' mean dB-SNR, the same
/// for all its terms) is summed in its first term's sum only and copied into the others' when
/// the chunk is drained.
struct ChunkSums {
    terms: usize,
    /// First neuron of each tap (plan order), then the total.
    offsets: Vec<usize>,
    /// Images kept as scores before the table takes over ([`KEEP`]; tests set others).
    keep: usize,
    /// The chunk's table, shared with the process's other workers.
    shared: Arc<SharedChunk>,
    /// This worker, where its adds start in the table (workers start at different stripes).
    worker: usize,
    /// Whether this worker's all-images sums are in the table (else every image is in `kept`).
    folded: bool,
    /// Images' scores with their labels, [`N_SCORES`] per (neuron, term) slot, NaN where
    /// absent: every image of the chunk until it is folded into the table, then the labelled.
    kept: Vec<(Option<i64>, Vec<f64>)>,
}

impl ChunkSums {
    /// Worker `worker`'s sums of chunk `time`, joined to the process's table of it.
    fn new(
        channels: &[usize],
        terms: usize,
        process: &ProcessSums,
        time: u64,
        worker: usize,
    ) -> Self {
        let mut offsets = vec![0];
        for c in channels {
            offsets.push(offsets[offsets.len() - 1] + c);
        }
        let slots = offsets[offsets.len() - 1] * terms;
        ChunkSums {
            terms,
            offsets,
            keep: KEEP,
            shared: process.join(time, slots, terms),
            worker,
            folded: false,
            kept: Vec::new(),
        }
    }

    fn slots(&self) -> usize {
        self.offsets[self.offsets.len() - 1] * self.terms
    }

    fn slot(&self, tap: u32, channel: u32, term: u32) -> usize {
        (self.offsets[tap as usize] + channel as usize) * self.terms + term as usize
    }

    /// An image's scores, [`N_SCORES`] per slot, NaN where absent: its own buffer where it
    /// recorded every tap in order (as the pipeline does), else placed neuron by neuron.
    fn scores(&self, image: ImageScores) -> Vec<f64> {
        let taps = image.taps.iter().map(|&(t, c)| (t as usize, c as usize));
        if image.terms == self.terms && self.every_tap(taps) {
            return image.scores;
        }
        let mut kept = vec![f64::NAN; self.slots() * N_SCORES];
        for nr in image.neurons() {
            let base = self.slot(nr.tap, nr.channel, 0) * N_SCORES;
            kept[base..][..nr.scores.len()].copy_from_slice(nr.scores);
        }
        kept
    }

    /// Adds images' scores to all images' sums, and keeps each labelled one's (`Some` label)
    /// for its label's. Until the worker has more than `keep` images in the chunk they are only
    /// kept; then the kept ones are folded into the table. Into the table, the images' updates
    /// are interleaved, slot by slot: a stripe's sums are loaded once for all of them rather
    /// than once per image, as the whole table (36 MB for MobileNetV2) does not stay in cache
    /// from one image to the next (exact sums of 5 images 7.6 -> 5.4 ms an image,
    /// microbenchmark). Exact sums: the order changes nothing. An image kept keeps its own
    /// buffer of scores, not a copy.
    fn add_images(&mut self, images: Vec<(ImageScores, Option<i64>)>) {
        let images: Vec<(Option<i64>, Vec<f64>)> = images
            .into_iter()
            .map(|(scores, label)| (label, self.scores(scores)))
            .collect();
        if !self.folded {
            self.kept.extend(images);
            if self.kept.len() > self.keep {
                self.fold();
            }
            return;
        }
        self.add_to_table(&images);
        self.kept
            .extend(images.into_iter().filter(|(label, _)| label.is_some()));
    }

    /// Whether an image labelled `label` (for per-class sums) can be analysed, written and
    /// added to the table a few taps at a time, never whole: not where its scores are kept
    /// (the chunk's first `keep` images, counting `pending` ones not yet added, and labelled
    /// ones until the commit), and only where `rec` recorded every tap in order, whole (as the
    /// pipeline does), so that its slices are runs of slots. MobileNetV2's 7.4 MB of scores an
    /// image then never exist at once, nor its 8.3 MB of amplitude spectra.
    fn streams(&self, label: Option<i64>, rec: &Recording, pending: usize) -> bool {
        label.is_none()
            && (self.folded || self.kept.len() + pending >= self.keep)
            && self.every_tap(rec.taps.iter().map(|t| (t.tap, t.channels)))
    }

    /// Whether `taps` (tap index in the plan, channels) are every tap of the plan, in order,
    /// whole: then an image's neurons in recorded order are the table's slots in order.
    fn every_tap(&self, taps: impl ExactSizeIterator<Item = (usize, usize)>) -> bool {
        taps.len() + 1 == self.offsets.len()
            && taps.enumerate().all(|(i, (tap, channels))| {
                tap == i && channels == self.offsets[i + 1] - self.offsets[i]
            })
    }

    /// One slot's scores (`N_SCORES`, NaN where absent) as the table adds them, into `values`.
    /// The neuron's own score, the same for each of its terms, is summed in its first term's
    /// slot only (a ninth of the additions), and copied out by `drain_table`.
    fn slot_values(&self, slot: usize, scores: &[f64], values: &mut [Option<f64>; N_SCORES]) {
        for (v, k) in values.iter_mut().zip(scores) {
            *v = (!k.is_nan()).then_some(*k);
        }
        if !slot.is_multiple_of(self.terms) {
            values[MEAN_SNR] = None;
        }
    }

    /// Before an image is added a slice at a time ([`ChunkSums::add_slice`]): the kept images
    /// into the table, if they are not yet.
    fn begin_slices(&mut self) {
        if !self.folded {
            self.fold();
        }
    }

    /// Adds a slice of an image's scores (consecutive whole taps, from
    /// [`crate::score::analyse_taps`]; see [`ChunkSums::streams`]) to the shared table, a stripe
    /// at a time, as [`ChunkSums::add_to_table`] does for whole images.
    fn add_slice(&self, part: &ImageScores) {
        let Some(&(tap, _)) = part.taps.first() else {
            return;
        };
        let start = self.offsets[tap as usize] * self.terms;
        let end = start + part.scores.len() / N_SCORES;
        let mut values = [None; N_SCORES];
        self.shared.each_stripe_over(start..end, |first, table| {
            for slot in start.max(first)..end.min(first + table.len()) {
                let scores = &part.scores[(slot - start) * N_SCORES..][..N_SCORES];
                self.slot_values(slot, scores, &mut values);
                table.add(slot - first, &values);
            }
        });
    }

    /// Adds images' scores (slot-ordered buffers) to the shared table, a stripe at a time.
    fn add_to_table(&self, images: &[(Option<i64>, Vec<f64>)]) {
        let mut values = [None; N_SCORES];
        self.shared.each_stripe(self.worker, |first, table| {
            for i in 0..table.len() {
                let slot = first + i;
                for (_, kept) in images {
                    self.slot_values(slot, &kept[slot * N_SCORES..][..N_SCORES], &mut values);
                    table.add(i, &values);
                }
            }
        });
    }

    /// Moves the kept images' sums into the table and keeps only the labelled images' scores.
    fn fold(&mut self) {
        let kept = std::mem::take(&mut self.kept);
        self.add_to_table(&kept);
        self.kept = kept
            .into_iter()
            .filter(|(label, _)| label.is_some())
            .collect();
        self.folded = true;
    }

    /// The key of a slot, for `label`'s sums.
    fn key(&self, slot: usize, label: Option<i64>) -> ScoreKey {
        let (neuron, t) = (slot / self.terms, slot % self.terms);
        let tap = self.offsets.partition_point(|&o| o <= neuron) - 1;
        (
            tap as u32,
            (neuron - self.offsets[tap]) as u32,
            t as u32,
            label,
        )
    }

    /// Hands every non-zero sum to `emit` with its key, the shared table's (all of it that no
    /// worker has taken) first and then this worker's kept images', and leaves them empty. A
    /// group (all images, or a label) with one image in the chunk is handed on as that image's
    /// scores ([`Update::One`]), not as sums. (A commit hands the table on a slice at a time,
    /// shared with the other workers: [`Committing::step`].)
    #[cfg(test)]
    fn drain(&mut self, mut emit: impl FnMut(ScoreKey, Update)) {
        while let Some(slots) = self.shared.next_slice(usize::MAX) {
            self.drain_table(slots, &mut emit);
        }
        self.drain_rest(emit);
    }

    /// Hands on the shared table's non-zero sums in `slots` (whole stripes, from
    /// [`SharedChunk::next_slice`]) and zeroes them.
    fn drain_table(&self, slots: std::ops::Range<usize>, mut emit: impl FnMut(ScoreKey, Update)) {
        let terms = self.terms;
        let mut neuron = (0, Fixed::default(), Fixed::default());
        self.shared.each_stripe_of(slots, |first, table| {
            for i in 0..table.len() {
                let slot = first + i;
                let mut a = table.take(i);
                // each term carries its neuron's mean dB-SNR, summed in the first term only
                if slot % terms == 0 {
                    neuron = (a.count[MEAN_SNR], a.sum[MEAN_SNR], a.sumsq[MEAN_SNR]);
                } else {
                    (a.count[MEAN_SNR], a.sum[MEAN_SNR], a.sumsq[MEAN_SNR]) = neuron;
                }
                if !a.is_zero() {
                    emit(self.key(slot, None), a.into());
                }
            }
        });
    }

    /// Hands on the sums of the kept images (all images', unless they are in the table, and
    /// each label's) and leaves the chunk empty; the table's must have been handed on.
    fn drain_rest(&mut self, mut emit: impl FnMut(ScoreKey, Update)) {
        let slots = self.slots();
        let kept = std::mem::take(&mut self.kept);
        let folded = std::mem::replace(&mut self.folded, false);
        // one group's kept images: one image's scores, or their sums
        let mut values = [None; N_SCORES];
        let mut group = |images: &[&Vec<f64>], label: Option<i64>| {
            for slot in 0..slots {
                let update = if let [kept] = images {
                    Update::one_from_f64(&kept[slot * N_SCORES..][..N_SCORES])
                } else {
                    let mut acc = Acc::zero();
                    for kept in images {
                        let kept = &kept[slot * N_SCORES..][..N_SCORES];
                        for (v, k) in values.iter_mut().zip(kept) {
                            *v = (!k.is_nan()).then_some(*k);
                        }
                        acc.add_values(&values);
                    }
                    acc.into()
                };
                if !update.is_zero() {
                    emit(self.key(slot, label), update);
                }
            }
        };
        if !folded && !kept.is_empty() {
            let all: Vec<&Vec<f64>> = kept.iter().map(|(_, k)| k).collect();
            group(&all, None);
        }
        // each label's images, in a fixed order (the sums are exact, so it does not matter)
        let mut labelled: Vec<(i64, &Vec<f64>)> =
            kept.iter().filter_map(|(l, k)| l.map(|l| (l, k))).collect();
        labelled.sort_by_key(|(l, _)| *l);
        for same in labelled.chunk_by(|a, b| a.0 == b.0) {
            let images: Vec<&Vec<f64>> = same.iter().map(|(_, k)| *k).collect();
            group(&images, Some(same[0].0));
        }
    }
}

/// One chunk (timestamp) of a worker's images while it is written: its parts, the partial sums
/// of its scores, and what it covers.
struct ChunkState {
    cap: Capability<u64>,
    partial: ChunkSums,
    tables: Option<ImageTables>,
    images: Vec<String>,
    skipped: Vec<Skipped>,
    /// Sums of the images committed by an earlier attempt (a resumed run's first chunk), emitted
    /// with this chunk's but not part of its committed sums.
    seeds: Vec<(ScoreKey, Update)>,
}

impl ChunkState {
    /// A chunk whose partial sums go into `partial` (zero; dense tables kept from an earlier
    /// chunk are reused, so a chunk does not page in several MB of fresh sums).
    fn new(cap: Capability<u64>, partial: ChunkSums) -> Self {
        ChunkState {
            cap,
            partial,
            tables: None,
            images: Vec::new(),
            skipped: Vec::new(),
            seeds: Vec::new(),
        }
    }

    /// Analyses the images of a batch, writes their rows and folds their scores into the
    /// partial sums. An image whose scores need not be kept ([`ChunkSums::streams`]) is
    /// analysed, written and added a slice of taps at a time; the others whole, added together
    /// at the end (on a GPU a batch is a pass's images).
    fn fold(
        &mut self,
        ctx: &WorkerCtx,
        time: u64,
        data: &mut Vec<(ImageRef, std::result::Result<Recording, String>)>,
        an: &mut Analyser,
    ) {
        let plan = ctx.plan.clone();
        let per_class = plan.pipeline.output.per_class;
        let mut whole: Vec<(ImageScores, Option<i64>)> = Vec::new();
        for (r, res) in data.drain(..) {
            ctx.done.fetch_add(1, Ordering::Relaxed);
            let rec = match res {
                Ok(rec) => rec,
                Err(reason) => {
                    tracing::warn!(image = %r.id, %reason, "skipped");
                    let s = Skipped { id: r.id, reason };
                    ctx.skipped.borrow_mut().push(s.clone());
                    self.skipped.push(s);
                    continue;
                }
            };
            if self.tables.is_none() {
                let name = ctx.work.part_name(ctx.index, time);
                match ImageTables::create(&ctx.work.tables(), &name, plan.clone()) {
                    Ok(t) => self.tables = Some(t),
                    Err(e) => ctx.errors.borrow_mut().push(e.to_string()),
                }
            }
            let label = r.label.filter(|_| per_class);
            let mut analyse = |taps: std::ops::Range<usize>| {
                timed(
                    &ctx.times,
                    |t| &mut t.spectrum,
                    || {
                        analyse_taps(
                            &rec,
                            taps,
                            &mut an.spectrum,
                            &plan.terms,
                            an.nb,
                            an.amplitude,
                        )
                    },
                )
            };
            let write = |tables: &mut Option<ImageTables>, part: &ImageScores| {
                if let Some(t) = tables.as_mut() {
                    if let Err(e) = t.write_scores(&r, part) {
                        ctx.errors.borrow_mut().push(e.to_string());
                    }
                }
            };
            if self.partial.streams(label, &rec, whole.len()) {
                self.partial.begin_slices();
                for taps in tap_slices(&rec, ImageTables::SLICE) {
                    let part = analyse(taps);
                    write(&mut self.tables, &part);
                    self.partial.add_slice(&part);
                }
            } else {
                let scores = analyse(0..rec.taps.len());
                write(&mut self.tables, &scores);
                whole.push((scores, label));
            }
            if let Some(t) = self.tables.as_mut() {
                if let Err(e) = t.write_image(&r, rec.pred, rec.prob, rec.distinct_frames) {
                    ctx.errors.borrow_mut().push(e.to_string());
                }
            }
            self.images.push(r.id.clone());
            ctx.processed.set(ctx.processed.get() + 1);
        }
        if !whole.is_empty() {
            self.partial.add_images(whole);
        }
    }

    /// Starts committing the chunk: its parts (renamed into place) and, when `output.neurons`
    /// is off, its sums file (a [`crate::resume::SumsFile`], streamed to disk as the sums are
    /// handed on: this worker's kept images' and its slices of the shared table's).
    /// [`Committing::step`] hands the sums on and arrives at the chunk's commit.
    fn start_commit(self, ctx: &WorkerCtx, time: u64) -> Committing {
        let ChunkState {
            cap,
            partial,
            tables,
            images,
            skipped,
            seeds,
        } = self;
        let name = ctx.work.part_name(ctx.index, time);
        let mut ok = true;
        let part = match tables {
            Some(t) => match t.finish() {
                Ok(()) => name.clone(),
                Err(e) => {
                    ctx.errors.borrow_mut().push(e.to_string());
                    ok = false;
                    String::new()
                }
            },
            None => String::new(),
        };
        let (mut file, mut sums) = (None, None);
        if !ctx.plan.pipeline.output.neurons && (!images.is_empty() || partial.shared.has_table()) {
            match crate::resume::SumsFile::create(&ctx.work, &name) {
                Ok(f) => (file, sums) = (Some(f), Some(sums_name(&name))),
                Err(e) => {
                    ctx.errors.borrow_mut().push(e.to_string());
                    ok = false;
                }
            }
        }
        Committing {
            time,
            cap,
            partial,
            file,
            ok,
            segment: Segment {
                part,
                images,
                skipped,
                sums,
            },
            seeds,
        }
    }
}

/// Table slots a worker hands on per activation of `WriteImages` (about 7.7 MB of sums):
/// between two slices this worker's aggregation takes in its share, so that a commit does not
/// put a whole table's sums in flight at once.
const SLICE: usize = 8192;

/// A chunk whose parts are committed and whose sums are being handed on, a slice at a time.
struct Committing {
    time: u64,
    cap: Capability<u64>,
    partial: ChunkSums,
    file: Option<crate::resume::SumsFile>,
    /// Whether the parts and the sums file so far were written.
    ok: bool,
    segment: Segment,
    /// Sums of the images committed by an earlier attempt (a resumed run's first chunk).
    seeds: Vec<(ScoreKey, Update)>,
}

impl Committing {
    /// Hands the next slice of the shared table's sums that no worker has taken to `emit` (and
    /// the sums file); once none is left, this worker's other sums, a resumed run's seeds and
    /// the sums file, and arrives at the chunk's commit: the process's last worker to arrive
    /// writes the manifest line of all their segments (and gives the table back). Returns
    /// whether this worker is done with the chunk. A part or sums file that cannot be written
    /// leaves the chunk uncommitted, so that a resumed run does its images again; the error,
    /// naming the file, fails the run, so the sums already handed on are never final.
    fn step(&mut self, ctx: &WorkerCtx, mut emit: impl FnMut(ScoreKey, Update)) -> bool {
        let file = &mut self.file;
        // into the sums file too
        let mut hand_on = |k: ScoreKey, update: Update| {
            if let Some(f) = file.as_mut() {
                f.push(&k, &update.to_acc());
            }
            emit(k, update);
        };
        // whole stripes, so whole neurons (the mean dB-SNR is copied from a neuron's first term)
        if let Some(slots) = self.partial.shared.next_slice(SLICE) {
            self.partial.drain_table(slots, &mut hand_on);
            return false;
        }
        self.partial.drain_rest(&mut hand_on);
        // an earlier attempt's sums: handed on, not part of this chunk's file
        for (k, update) in self.seeds.drain(..) {
            emit(k, update);
        }
        if let Some(f) = self.file.take() {
            if self.ok {
                if let Err(e) = f.finish() {
                    ctx.errors.borrow_mut().push(e.to_string());
                    self.ok = false;
                }
            }
        }
        let segment = std::mem::take(&mut self.segment);
        let all = ctx.process.arrive(&self.partial.shared, segment, self.ok);
        if let Some(segments) = all.filter(|s| !s.is_empty()) {
            if let Err(e) = ctx.work.commit_segments(ctx.index, &segments) {
                ctx.errors.borrow_mut().push(e.to_string());
            }
        }
        true
    }
}

type Decoded = (ImageRef, std::result::Result<Vec<f32>, String>);
type Recorded = (ImageRef, std::result::Result<Recording, String>);

/// A chunk's decoded images waiting at the `Record` operator on the GPU path, and how many of
/// its groups are at the device thread.
struct Held {
    cap: Capability<u64>,
    items: Vec<Decoded>,
    in_flight: usize,
}

impl Held {
    fn new(cap: Capability<u64>) -> Self {
        Held {
            cap,
            items: Vec::new(),
            in_flight: 0,
        }
    }
}

/// One group's recordings, back from the device thread.
struct Done {
    time: u64,
    recorded: Vec<Recorded>,
    seconds: f64,
}

/// A worker's forward passes on a GPU, on a thread of their own: the worker hands it groups of
/// decoded images (a pass's worth) through a channel and goes on analysing and writing the
/// images before, while the thread builds the frames, runs the pass and waits for the GPU.
/// Done synchronously, every worker alternated between waiting for its pass and working on
/// the CPU, and the GPU idled while the workers were all on the CPU at once. The thread wakes
/// the worker's `Record` operator when a group is done; dropping the feed ends the thread.
struct DeviceFeed {
    jobs: Option<crossbeam_channel::Sender<(u64, Vec<Decoded>)>>,
    done: crossbeam_channel::Receiver<Done>,
    thread: Option<std::thread::JoinHandle<()>>,
    in_flight: usize,
}

impl DeviceFeed {
    /// Groups at the device thread at once: one in its pass, one ready to start.
    const AHEAD: usize = 2;

    fn start(
        worker: usize,
        net: &Arc<Network>,
        plan: &Arc<Plan>,
        pre: crate::model::Preprocess,
        wake: timely::scheduling::SyncActivator,
    ) -> Self {
        let (jobs, inbox) = crossbeam_channel::bounded::<(u64, Vec<Decoded>)>(Self::AHEAD);
        let (outbox, done) = crossbeam_channel::unbounded::<Done>();
        let (net, plan) = (net.clone(), plan.clone());
        let thread = std::thread::Builder::new()
            .name(format!("freqtag-w{worker}-gpu"))
            .spawn(move || {
                // the stimulus is uploaded by this thread, whose stream runs the passes
                let stim = DeviceStimulus::new(&plan.stimulus, net.device())
                    .map_err(|e| format!("inference failed: cannot upload the stimulus: {e}"));
                for (time, items) in inbox {
                    let started = Instant::now();
                    // a panic in a pass fails its images, named, and the run goes on
                    let ids: Vec<ImageRef> = items.iter().map(|(r, _)| r.clone()).collect();
                    let recorded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        record_group(&net, &plan, pre, stim.as_ref(), items)
                    }))
                    .unwrap_or_else(|panic| {
                        let what = panic
                            .downcast_ref::<String>()
                            .map(String::as_str)
                            .or_else(|| panic.downcast_ref::<&str>().copied())
                            .unwrap_or("unknown");
                        let e = format!("inference failed: the GPU pass panicked ({what})");
                        ids.into_iter().map(|r| (r, Err(e.clone()))).collect()
                    });
                    let seconds = started.elapsed().as_secs_f64();
                    let sent = outbox.send(Done {
                        time,
                        recorded,
                        seconds,
                    });
                    if sent.is_err() || wake.activate().is_err() {
                        break;
                    }
                }
            });
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(worker, error = %e, "cannot start the GPU thread");
                None
            }
        };
        DeviceFeed {
            jobs: thread.as_ref().map(|_| jobs),
            done,
            thread,
            in_flight: 0,
        }
    }

    /// Hands a group to the device thread, or gives it back if the thread is gone.
    fn send(&mut self, time: u64, group: Vec<Decoded>) -> std::result::Result<(), Vec<Decoded>> {
        let Some(jobs) = self.jobs.as_ref() else {
            return Err(group);
        };
        match jobs.send((time, group)) {
            Ok(()) => {
                self.in_flight += 1;
                Ok(())
            }
            Err(e) => Err(e.into_inner().1),
        }
    }
}

impl Drop for DeviceFeed {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Several images through the network on the device in one go (see [`record_many`]);
/// decoding errors pass through, and a failed pass fails each of its images with the reason.
fn record_group(
    net: &Network,
    plan: &Plan,
    pre: crate::model::Preprocess,
    stim: std::result::Result<&DeviceStimulus, &String>,
    items: Vec<Decoded>,
) -> Vec<Recorded> {
    let images: Vec<(&[f32], &str)> = items
        .iter()
        .filter_map(|(r, rgb)| rgb.as_ref().ok().map(|v| (v.as_slice(), r.id.as_str())))
        .collect();
    let frames = plan.pipeline.model.device_batch.max(1);
    tracing::debug!(images = images.len(), "record: one group on the device");
    let recs = stim.map_err(|e| e.clone()).and_then(|ds| {
        record_many(
            net,
            &plan.taps,
            &plan.stimulus,
            pre,
            &images,
            frames,
            Some(ds),
        )
        .map_err(|e| inference_error(&e, frames))
    });
    let mut recs = match recs {
        Ok(v) => v.into_iter().map(Ok).collect::<Vec<_>>(),
        Err(e) => vec![Err(e); images.len()],
    }
    .into_iter();
    items
        .into_iter()
        .map(|(r, rgb)| {
            let rec = match rgb {
                Ok(_) => recs
                    .next()
                    .unwrap_or_else(|| Err("inference failed: no recording".into())),
                Err(e) => Err(e),
            };
            (r, rec)
        })
        .collect()
}

/// Builds and drives one worker's dataflow.
pub(crate) fn run_worker(
    worker: &mut timely::worker::Worker,
    ctx: Rc<WorkerCtx>,
    net: Arc<Network>,
    images: Arc<Vec<ImageRef>>,
    seeds: Option<Arc<HashMap<ScoreKey, Acc>>>,
    chunk: u64,
) -> std::result::Result<WorkerReport, String> {
    let index = worker.index();
    let peers = worker.peers();
    let plan = ctx.plan.clone();
    // each key's exact sums, compact (a key of one image keeps its scores, any other a slot of
    // a table of 128-bit windows)
    let aggregates: Rc<RefCell<Sums<ScoreKey>>> = Rc::new(RefCell::new(Sums::default()));
    let mut input: InputHandle<u64, _> = InputHandle::new();
    let probe = ProbeHandle::new();
    let pre = plan.preprocess();
    let nb = Neighbourhood {
        n: plan.pipeline.spectrum.neighbours,
        skip: plan.pipeline.spectrum.skip,
    };
    worker.dataflow::<u64, _, _>(|scope| {
        let c = ctx.clone();
        let decoded = scope
            .input_from(&mut input)
            .container::<Vec<ImageRef>>()
            .map(move |r| {
                let rgb = timed(&c.times, |t| &mut t.decode, || source::prepare(&r.loc, pre));
                (r, rgb)
            });
        let (c, n) = (ctx.clone(), net.clone());
        // This worker's own rayon pool for the kernels of its forward passes: with the global
        // pool, every worker's parallel kernels queue on the same (cores / workers) threads, so
        // two workers ran no faster than one.
        let threads = super::threads_per_worker();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(move |i| format!("freqtag-w{index}-{i}"))
            .build()
            .map_err(|e| format!("cannot start the worker's threads: {e}"));
        // On a GPU the stimulus lives there (uploaded once per worker), and the Record operator
        // holds decoded images back until it has `device_batch` frames' worth, or the chunk is
        // complete, then runs them through the network together: images arrive one by one, and
        // one image's 50 frames leave a GPU nearly idle.
        let gpu_path = !n.device().is_cpu() || gpu_path_on_cpu();
        let scope = decoded.scope();
        let per_pass = plan.images_per_pass();
        let recorded = decoded.unary_frontier(Pipeline, "Record", move |_, info| {
            // on the GPU path: groups of images go to this worker's device thread, and their
            // recordings come back while the worker analyses and writes the ones before
            let mut feed = gpu_path.then(|| {
                let wake = scope.worker().sync_activator_for(info.address.to_vec());
                DeviceFeed::start(index, &n, &c.plan, pre, wake)
            });
            let mut stash: BTreeMap<u64, Held> = BTreeMap::new();
            move |(input, frontier), output| {
                if let Some(feed) = feed.as_mut() {
                    // recordings back from the device thread, to the chunk they belong to
                    loop {
                        match feed.done.try_recv() {
                            Ok(done) => {
                                feed.in_flight -= 1;
                                let stimulus: f64 = done
                                    .recorded
                                    .iter()
                                    .filter_map(|(_, rec)| rec.as_ref().ok())
                                    .map(|rec| rec.stimulus_seconds)
                                    .sum();
                                let mut times = c.times.borrow_mut();
                                times.stimulus += stimulus;
                                times.forward += done.seconds - stimulus;
                                drop(times);
                                if let Some(held) = stash.get_mut(&done.time) {
                                    held.in_flight -= 1;
                                    let mut session = output.session(&held.cap);
                                    for out in done.recorded {
                                        session.give(out);
                                    }
                                }
                            }
                            Err(crossbeam_channel::TryRecvError::Empty) => break,
                            Err(crossbeam_channel::TryRecvError::Disconnected) => {
                                // the thread is gone with groups in it: the run fails, naming
                                // it, rather than waiting for them for ever
                                if feed.in_flight > 0 {
                                    c.errors.borrow_mut().push(format!(
                                        "worker {index}: the GPU thread stopped with {} passes unfinished",
                                        feed.in_flight
                                    ));
                                    feed.in_flight = 0;
                                    for held in stash.values_mut() {
                                        held.in_flight = 0;
                                    }
                                }
                                feed.jobs = None;
                                break;
                            }
                        }
                    }
                }
                input.for_each(|cap, data| {
                    if gpu_path {
                        let Some(time) = cap.least().copied() else {
                            return;
                        };
                        let held = match stash.entry(time) {
                            Entry::Occupied(e) => e.into_mut(),
                            Entry::Vacant(v) => match cap.retain_least(output.output_index()) {
                                Some(cap) => v.insert(Held::new(cap)),
                                None => return,
                            },
                        };
                        held.items.append(data);
                        return;
                    }
                    let mut session = output.session(&cap);
                    for (r, rgb) in data.drain(..) {
                        let p = &c.plan;
                        let rec = rgb.and_then(|rgb| {
                            let batch = p.pipeline.model.batch_size;
                            let run = || record(&n, &p.taps, &p.stimulus, pre, &rgb, &r.id, batch);
                            let pool = pool.as_ref().map_err(|e| e.clone())?;
                            let rec = timed(&c.times, |t| &mut t.forward, || pool.install(run))
                                .map_err(|e| format!("inference failed: {e}"))?;
                            // building the frames is a stage of its own
                            let mut times = c.times.borrow_mut();
                            times.forward -= rec.stimulus_seconds;
                            times.stimulus += rec.stimulus_seconds;
                            Ok(rec)
                        });
                        session.give((r, rec));
                    }
                });
                let Some(feed) = feed.as_mut() else {
                    return;
                };
                // full passes now, oldest chunk first, at most AHEAD groups at the device
                // thread; what is left of a chunk once the chunk is complete
                let times: Vec<u64> = stash.keys().copied().collect();
                for time in times {
                    let complete = !frontier.frontier().less_equal(&time);
                    let Some(held) = stash.get_mut(&time) else {
                        continue;
                    };
                    while feed.in_flight < DeviceFeed::AHEAD
                        && (held.items.len() >= per_pass || (complete && !held.items.is_empty()))
                    {
                        let take = per_pass.min(held.items.len());
                        let group: Vec<Decoded> = held.items.drain(..take).collect();
                        match feed.send(time, group) {
                            Ok(()) => held.in_flight += 1,
                            Err(lost) => {
                                // the device thread is gone: its images fail, named
                                let mut session = output.session(&held.cap);
                                for (r, _) in lost {
                                    let e = "inference failed: the GPU thread stopped".to_string();
                                    session.give((r, Err(e)));
                                }
                            }
                        }
                    }
                    if complete && held.items.is_empty() && held.in_flight == 0 {
                        stash.remove(&time);
                    }
                }
                let held: usize = stash.values().map(|h| h.items.len()).sum();
                if held != c.held.replace(held) {
                    tracing::debug!(held, "record: decoded images waiting for a pass");
                }
            }
        });
        let mut analyser = Analyser {
            spectrum: Spectrum::new(plan.stimulus.frames, plan.pipeline.spectrum.window),
            nb,
            amplitude: plan.pipeline.output.spectra != crate::config::SpectraMode::None,
        };
        // Analyses each image as it arrives (its spectra and scores), writes its rows and folds
        // its score updates into one partial sum per key and chunk; once the frontier passes the
        // chunk, its parts and manifest line are committed and the partial sums emitted: far
        // fewer records enter the exchange than one per image. Aggregates of images committed
        // by an earlier attempt seed chunk 0.
        let c = ctx.clone();
        let channels: Vec<usize> = plan
            .taps
            .iter()
            .map(|t| plan.arch.tap_channels(t).unwrap_or(0))
            .collect();
        let terms = plan.terms.terms.len();
        let scope = recorded.scope();
        let updates = recorded.unary_frontier(Pipeline, "WriteImages", move |cap, info| {
            let mut stash: BTreeMap<u64, ChunkState> = BTreeMap::new();
            let mut committing: std::collections::VecDeque<Committing> = Default::default();
            let again = scope.worker().activator_for(info.address.clone());
            let sums = move |c: &WorkerCtx, time| {
                ChunkSums::new(&channels, terms, &c.process, time, c.index)
            };
            if let Some(seeds) = seeds {
                let mut state = ChunkState::new(cap, sums(&c, 0));
                state.seeds = seeds.iter().map(|(k, acc)| (*k, acc.clone().into())).collect();
                stash.insert(0, state);
            }
            move |(input, frontier), output| {
                let started = Instant::now();
                let spectrum_before = c.times.borrow().spectrum;
                // chunks the frontier has passed first (no data of theirs can be queued: every
                // worker of the process has added its images of them to the shared table), so
                // that their tables are back before the next chunk's images want one
                let finished: Vec<u64> = stash
                    .keys()
                    .copied()
                    .filter(|time| !frontier.frontier().less_equal(time))
                    .collect();
                for time in finished {
                    if let Some(state) = stash.remove(&time) {
                        committing.push_back(state.start_commit(&c, time));
                    }
                }
                // one slice of the oldest commit's sums; the next when activated again
                if let Some(chunk) = committing.front_mut() {
                    let (cap, time) = (chunk.cap.clone(), chunk.time);
                    let mut session = output.session(&cap);
                    if chunk.step(&c, |k, acc| session.give((k, time, acc))) {
                        committing.pop_front();
                    }
                }
                if !committing.is_empty() {
                    again.activate();
                }
                c.committing.set(committing.len());
                input.for_each(|cap, data| {
                    let Some(time) = cap.least().copied() else {
                        return;
                    };
                    let state = match stash.entry(time) {
                        Entry::Occupied(e) => e.into_mut(),
                        Entry::Vacant(v) => match cap.retain_least(output.output_index()) {
                            Some(cap) => v.insert(ChunkState::new(cap, sums(&c, time))),
                            None => return,
                        },
                    };
                    state.fold(&c, time, data, &mut analyser);
                });
                // the analysis is a stage of its own (timed as `spectrum` in `fold`)
                let analysed = c.times.borrow().spectrum - spectrum_before;
                c.times.borrow_mut().write += started.elapsed().as_secs_f64() - analysed;
            }
        });
        let ag = aggregates.clone();
        let c = ctx.clone();
        updates
            .container::<Vec<(ScoreKey, u64, Update)>>()
            .exchange(|(k, _, _)| differential_dataflow::Hashable::hashed(k))
            .as_collection()
            .consolidate_stream()
            .inner
            .probe_with(&probe)
            .sink(Pipeline, "CollectScores", move |(input, _frontier)| {
                let started = Instant::now();
                input.for_each(|_, data| {
                    let mut ag = ag.borrow_mut();
                    for (k, _t, update) in data.drain(..) {
                        ag.add(k, update);
                    }
                });
                c.times.borrow_mut().aggregate += started.elapsed().as_secs_f64();
            });
    });
    // Images of one chunk share a timestamp; at most IN_FLIGHT chunks are ahead of the
    // aggregation, and one image at a time is in the image-level stages. Ctrl-C (STOP) ends the feeding: the chunks in flight finish and commit.
    const IN_FLIGHT: u64 = 2;
    // a worker with nothing to do sleeps until a message, its GPU thread or this long wakes it,
    // rather than spinning on a core that the other workers' spectra and passes need
    const PARK: std::time::Duration = std::time::Duration::from_millis(2);
    let hold = 2 * plan.images_per_pass();
    let mut n = 0u64;
    let mut interrupted = false;
    for r in images.iter().filter(|r| r.seq as usize % peers == index) {
        if STOP.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        input.send(r.clone());
        n += 1;
        // push this image through decode, forward passes, spectra and writing now: an operator
        // handles everything queued at its input in one call, so feeding many images between
        // steps would hold all their recordings (16 MB each for MobileNetV2) at once
        input.flush();
        worker.step();
        // a commit in progress hands its sums on a slice a step, and this worker's share is
        // taken in between: finish it before the next image's passes
        while ctx.committing.get() > 0 {
            worker.step();
        }
        // On a GPU, decoded images wait in Record until a pass takes them; without this the
        // worker decoded up to IN_FLIGHT chunks ahead (MobileNetV2: chunks of 182 images at
        // 600 KB each, against passes of 3, about 218 MB a worker). While two passes' worth
        // wait a full pass is ready, and the device thread frees its slot on its own.
        while ctx.held.get() >= hold {
            worker.step_or_park(Some(PARK));
        }
        if n.is_multiple_of(chunk) {
            let c = n / chunk;
            input.advance_to(c);
            let wait = c.saturating_sub(IN_FLIGHT);
            worker.step_or_park_while(Some(PARK), || probe.less_than(&wait));
        }
    }
    drop(input);
    while !probe.with_frontier(|f| f.is_empty()) {
        worker.step_or_park(Some(PARK));
    }
    let mut errs = ctx.errors.borrow().clone();
    if !interrupted {
        if let Err(e) = sink::write_scores(&ctx.work.tables(), index, &plan, &aggregates.borrow()) {
            errs.push(e.to_string());
        }
    }
    if !errs.is_empty() {
        return Err(errs.join("; "));
    }
    let skipped = ctx.skipped.borrow().clone();
    let stages = *ctx.times.borrow();
    Ok(WorkerReport {
        processed: ctx.processed.get(),
        skipped,
        stages,
        interrupted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::score::TermScores;
    use differential_dataflow::difference::Semigroup;

    /// Eight images' scores of taps of `channels` (`terms` terms), some scores missing, some
    /// negative; labels 0 and 1 of two images each, 7 of one (the last), and none.
    fn test_images(channels: &[usize], terms: usize) -> Vec<(ImageScores, Option<i64>)> {
        let mut rng = 7u64;
        let mut next = || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng >> 11) as f64 / (1u64 << 53) as f64 - 0.3
        };
        (0..8)
            .map(|i| {
                let neurons: usize = channels.iter().sum();
                let mut scores = Vec::new();
                for _ in 0..neurons {
                    let mean_snr_db = next() * 30.0;
                    for t in 0..terms {
                        let s = TermScores {
                            amplitude: next().abs(),
                            snr: Some(next() * 10.0),
                            snr_db: (t % 2 == 0).then(&mut next),
                            snr_lattice: None,
                            snr_lattice_db: Some(next() * 1e-9),
                            zscore: Some(next() * 1e6),
                            baseline_corrected: Some(next()),
                            response_share: Some(next()),
                        };
                        scores.extend(s.as_array(mean_snr_db).map(|v| v.unwrap_or(f64::NAN)));
                    }
                }
                let image = ImageScores {
                    taps: channels
                        .iter()
                        .enumerate()
                        .map(|(tap, &c)| (tap as u32, c as u32))
                        .collect(),
                    terms,
                    scores,
                    bins: 0,
                    amplitude: Vec::new(),
                };
                let label = if i == 7 { 7 } else { i as i64 % 2 };
                (image, (i % 3 != 0).then_some(label))
            })
            .collect()
    }

    /// What a chunk's sums must be: each image's own accumulator, added up per key (over all
    /// images, and over the image's label's if it has one).
    fn want_sums(images: &[(ImageScores, Option<i64>)], terms: usize) -> BTreeMap<ScoreKey, Acc> {
        let mut want: BTreeMap<ScoreKey, Acc> = BTreeMap::new();
        for (image, label) in images {
            for nr in image.neurons() {
                for t in 0..terms {
                    let one = Acc::of(&nr.term(t));
                    let labels = std::iter::once(None).chain(label.map(Some));
                    for l in labels {
                        let key = (nr.tap, nr.channel, t as u32, l);
                        want.entry(key).or_insert_with(Acc::zero).plus_equals(&one);
                    }
                }
            }
        }
        want
    }

    /// Drains a chunk: its sums by key; a group (all images, or a label) of one image comes as
    /// its scores (exactly the groups `ones`).
    fn drained(sums: &mut ChunkSums, ones: &[Option<i64>]) -> BTreeMap<ScoreKey, Acc> {
        let mut got: BTreeMap<ScoreKey, Acc> = BTreeMap::new();
        sums.drain(|k, update| {
            let one = matches!(update, Update::One(_));
            assert_eq!(one, ones.contains(&k.3), "{k:?}");
            assert!(
                got.insert(k, update.to_acc().into_owned()).is_none(),
                "{k:?} twice"
            );
        });
        got
    }

    /// Images added a few taps at a time (`begin_slices`, `add_slice`), as `ChunkState::fold`
    /// adds an image whose scores need not be kept, give the sums of whole images: the first
    /// `keep` images kept whole, labelled images whole (their scores kept for their label's
    /// sums), the rest in slices of one tap or of two; stripes of 8 slots, so that slices
    /// start and end inside stripes.
    #[test]
    #[allow(clippy::single_range_in_vec_init)] // a slice of one range of taps: all three
    fn chunk_sums_of_slices_are_those_of_whole_images() {
        let (channels, terms) = ([3usize, 2, 5], 4usize);
        let images = test_images(&channels, terms);
        let slice = |image: &ImageScores, taps: std::ops::Range<usize>| {
            let per = terms * N_SCORES;
            let first: usize = channels[..taps.start].iter().sum();
            let n: usize = channels[taps.clone()].iter().sum();
            ImageScores {
                taps: image.taps[taps].to_vec(),
                scores: image.scores[first * per..(first + n) * per].to_vec(),
                ..image.clone()
            }
        };
        let cuts: [&[std::ops::Range<usize>]; 3] = [&[0..1, 1..2, 2..3], &[0..2, 2..3], &[0..3]];
        for (keep, cuts) in [0, 1, 3].into_iter().zip(cuts) {
            let process = ProcessSums::with_stripe(8);
            let mut sums = ChunkSums::new(&channels, terms, &process, 0, 0);
            sums.keep = keep;
            let mut sliced = 0;
            for (image, label) in &images {
                if label.is_none() && (sums.folded || sums.kept.len() >= sums.keep) {
                    sums.begin_slices();
                    for taps in cuts {
                        sums.add_slice(&slice(image, taps.clone()));
                    }
                    sliced += 1;
                } else {
                    sums.add_images(vec![(image.clone(), *label)]);
                }
            }
            // images 0, 3 and 6 are unlabelled: the first is kept where keep > 0
            assert_eq!(sliced, if keep == 0 { 3 } else { 2 }, "keep {keep}");
            assert!(sums.folded);
            assert_eq!(
                drained(&mut sums, &[Some(7)]),
                want_sums(&images, terms),
                "keep {keep}"
            );
        }
    }

    /// A chunk's drained sums equal, key by key, the sums of each image's own accumulator
    /// (`Acc::of` of its scores): images kept as scores or added to the table in batches of
    /// several, neuron by neuron, the mean dB-SNR summed once per neuron and copied out,
    /// labelled images' sums per label, one image's scores where a group has one image.
    #[test]
    fn chunk_sums_are_the_sums_of_each_image_scores() {
        let (channels, terms) = ([3usize, 2], 4usize);
        let images = test_images(&channels, terms);
        let want = |images: &[(ImageScores, Option<i64>)]| want_sums(images, terms);
        let drain = drained;
        // kept as scores throughout (keep 8), folded into the table at the first batch (keep
        // 0), and in the middle of the last batch (keep 5); each in batches of 3, 1 and 3
        // images, then a chunk of the first image alone (the table, if built, reused), then
        // nothing. Stripes of 8 slots (two neurons): the 20 slots in 3 stripes.
        for keep in [8, 0, 5] {
            let process = ProcessSums::with_stripe(8);
            let mut sums = ChunkSums::new(&channels, terms, &process, 0, 1);
            sums.keep = keep;
            for batch in [&images[..3], &images[3..4], &images[4..]] {
                sums.add_images(batch.to_vec());
            }
            assert_eq!(sums.folded, keep < images.len(), "keep {keep}");
            assert_eq!(drain(&mut sums, &[Some(7)]), want(&images), "keep {keep}");
            let segments = process.arrive(&sums.shared, Segment::default(), true);
            assert_eq!(segments.map(|s| s.len()), Some(0), "keep {keep}");
            let mut sums = ChunkSums::new(&channels, terms, &process, 1, 1);
            sums.keep = keep;
            let first = &images[..1];
            sums.add_images(first.to_vec());
            let ones: &[Option<i64>] = if keep > 0 { &[None] } else { &[] };
            assert_eq!(drain(&mut sums, ones), want(first), "keep {keep}");
            // drained: nothing left
            sums.drain(|k, _| panic!("{k:?} left after draining"));
            assert_eq!(
                process.built(),
                usize::from(keep < images.len()),
                "keep {keep}"
            );
        }
        // two workers in one chunk: one folds at once, the other keeps its first image, then
        // folds; they hand the table on a slice each in turn, then their own sums. The first
        // to arrive gets nothing to commit, the last both segments, and the table goes back
        // for the next chunk (not built again). A worker whose files failed: nothing committed.
        let batch = |r: std::ops::Range<usize>| images[r].to_vec();
        let process = ProcessSums::with_stripe(8);
        let mut a = ChunkSums::new(&channels, terms, &process, 5, 0);
        let mut b = ChunkSums::new(&channels, terms, &process, 5, 1);
        (a.keep, b.keep) = (0, 1);
        a.add_images(batch(0..2));
        b.add_images(batch(2..3));
        assert!(a.folded && !b.folded);
        b.add_images(batch(3..5));
        a.add_images(batch(5..8));
        assert!(b.folded && process.built() == 1);
        let mut got: BTreeMap<ScoreKey, Acc> = BTreeMap::new();
        let mut add = |k: ScoreKey, update: Update| {
            let sum = got.entry(k).or_insert_with(Acc::zero);
            sum.plus_equals(update.to_acc().as_ref());
        };
        let mut slices = 0;
        for turn in 0.. {
            let w = if turn % 2 == 0 { &a } else { &b };
            let Some(slots) = w.shared.next_slice(8) else {
                break;
            };
            assert_eq!(slots.len(), if slots.start < 16 { 8 } else { 4 });
            w.drain_table(slots, &mut add);
            slices += 1;
        }
        assert_eq!(slices, 3);
        a.drain_rest(&mut add);
        b.drain_rest(&mut add);
        assert_eq!(got, want(&images));
        let segment = |part: &str| Segment {
            part: part.into(),
            images: vec![part.into()],
            ..Segment::default()
        };
        assert!(process.arrive(&a.shared, segment("a"), true).is_none());
        let both = process.arrive(&b.shared, segment("b"), true).unwrap();
        assert_eq!(
            both.iter().map(|s| s.part.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        let mut a = ChunkSums::new(&channels, terms, &process, 6, 0);
        let b = ChunkSums::new(&channels, terms, &process, 6, 1);
        a.keep = 0;
        a.add_images(batch(0..2));
        assert_eq!(process.built(), 1);
        a.drain(|_, _| {});
        assert!(process.arrive(&a.shared, segment("a"), false).is_none());
        assert!(process.arrive(&b.shared, segment("b"), true).is_none());
        let first = a;
        // an image whose taps came in another order is placed neuron by neuron
        let image = &images[0].0;
        let split = channels[0] * terms * N_SCORES;
        let swapped = ImageScores {
            taps: vec![(1, 2), (0, 3)],
            scores: [&image.scores[split..], &image.scores[..split]].concat(),
            ..image.clone()
        };
        let bits = |v: Vec<f64>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(first.scores(swapped)), bits(image.scores.clone()));
        assert_eq!(
            bits(first.scores(image.clone())),
            bits(image.scores.clone())
        );
    }

    #[test]
    fn an_out_of_memory_pass_says_what_to_lower() {
        let oom = candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")\n   0: backtrace".into(),
        );
        let m = inference_error(&oom, 4096);
        assert!(m.contains("model.device_batch (now 4096"), "{m}");
        assert!(!m.contains("backtrace"), "{m}");
        let other = candle_core::Error::Msg("shape mismatch".into());
        assert_eq!(
            inference_error(&other, 4096),
            "inference failed: shape mismatch"
        );
    }
}
