//! The timely dataflow every worker builds, and the run that drives it.
//!
//! `Images` (input; worker w feeds the images with `seq % workers == w`) -> `Decode` -> `Record`
//! (stimulus + batched forward passes) -> `Analyse` (FFT and term scores) -> `WriteImages` (this
//! worker's parts of `spectra/`, `neurons/`, `images/`; emits aggregate updates) -> differential
//! `consolidate` (exchanged by the key (tap, channel, term, label)) -> `CollectScores`.
//! All image-level stages use `Pipeline`: an image stays on the worker that read it; only the
//! aggregates cross workers, by key, so each key's total is exact and owned by one worker.

use std::cell::RefCell;
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use differential_dataflow::collection::AsCollection;
use differential_dataflow::difference::{Monoid, Semigroup};
use serde::Serialize;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::{Capability, Input, Probe};
use timely::dataflow::{InputHandle, ProbeHandle};

use crate::cluster::{self, Cluster};
use crate::config::{Plan, WeightsSource};
use crate::error::{Error, Result};
use crate::model::record::record;
use crate::model::{fetch, Network};
use crate::resume::{self, Segment, WorkDir};
use crate::score::{analyse, Acc, Neighbourhood, NeuronResult};
use crate::sink::{self, ImageTables, ScoreKey};
use crate::source::{self, ImageRef, Skipped};
use crate::spectrum::Spectrum;

/// How to run (command-line flags, not pipeline settings).
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Output folder.
    pub out: PathBuf,
    /// Worker threads (per process).
    pub workers: usize,
    /// This process's place in a cluster run, if any.
    pub cluster: Option<Cluster>,
    /// Continue the unfinished run in `out` instead of starting over.
    pub resume: bool,
    /// Images per worker in one chunk: one timestamp, one committed segment.
    pub chunk: u64,
}

/// Set by Ctrl-C: workers stop taking new images, finish the chunk in flight and commit it.
pub static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// What a run did, also written to `run.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Images found.
    pub images_listed: usize,
    /// Images processed into every output.
    pub images_processed: u64,
    /// Inputs skipped, with reasons.
    pub skipped: Vec<Skipped>,
    /// Wall time of the whole run, seconds.
    pub wall_s: f64,
    /// Images processed by this attempt per second of wall time.
    pub images_per_s: f64,
    /// Images committed by earlier attempts of a resumed run.
    pub resumed_images: u64,
    /// Peak resident memory of the process, MB (Linux; 0 elsewhere).
    pub peak_rss_mb: f64,
    /// Worker threads.
    pub workers: usize,
    /// Seconds per stage, summed over workers.
    pub stage_seconds: StageTimes,
    /// Output folder.
    pub out: PathBuf,
}

struct WorkerReport {
    processed: u64,
    skipped: Vec<Skipped>,
    stages: StageTimes,
    interrupted: bool,
}

/// Seconds spent in each stage, summed over workers (thread time, not wall time).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StageTimes {
    /// Reading, decoding and preprocessing images.
    pub decode: f64,
    /// Building frames and running the forward passes.
    pub forward: f64,
    /// FFTs and term scores.
    pub spectrum: f64,
    /// Writing per-image Parquet rows and emitting aggregate updates.
    pub write: f64,
    /// Folding consolidated aggregates.
    pub aggregate: f64,
}

impl StageTimes {
    fn add(&mut self, o: &StageTimes) {
        self.decode += o.decode;
        self.forward += o.forward;
        self.spectrum += o.spectrum;
        self.write += o.write;
        self.aggregate += o.aggregate;
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

/// One image after analysis.
#[derive(Clone)]
struct Analysed {
    image: ImageRef,
    pred: i64,
    prob: f32,
    distinct: usize,
    neurons: Vec<NeuronResult>,
}

/// Resolves the weights file, fetching into the cache when the pipeline asks for it.
pub fn weights_path(plan: &Plan) -> Result<PathBuf> {
    match &plan.weights {
        WeightsSource::File(p) => Ok(p.clone()),
        WeightsSource::Fetch(name) => {
            if fetch::cached(name).is_none() {
                tracing::info!(model = %name, cache = %fetch::cache_dir().display(), "fetching weights");
            }
            fetch::fetch(name)
        }
    }
}

/// Progress of this process: a bar on a terminal, else a log line every 30 seconds.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    started: Instant,
    last_log: Instant,
}

impl Progress {
    fn new(total: u64, process: usize) -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total);
            let style = indicatif::ProgressStyle::with_template(&format!(
                "process {process} [{{bar:30}}] {{pos}}/{{len}} images, {{per_sec}}, ETA {{eta}}"
            ))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            b.set_style(style);
            b
        });
        Progress {
            bar,
            total,
            started: Instant::now(),
            last_log: Instant::now(),
        }
    }

    fn update(&mut self, done: u64) {
        match &self.bar {
            Some(b) => b.set_position(done),
            None if self.last_log.elapsed().as_secs() >= 30 => {
                self.last_log = Instant::now();
                let rate = done as f64 / self.started.elapsed().as_secs_f64();
                let eta = (self.total.saturating_sub(done)) as f64 / rate.max(1e-9);
                tracing::info!(
                    done,
                    total = self.total,
                    per_s = format!("{rate:.2}"),
                    eta_s = eta.round(),
                    "progress"
                );
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Upper estimate of the uncompressed size of a run's tables (zstd usually halves it).
pub fn expected_output_bytes(plan: &Plan, images: usize) -> u64 {
    use crate::config::SpectraMode;
    let out = &plan.pipeline.output;
    let neurons: u64 = plan
        .taps
        .iter()
        .filter_map(|t| plan.arch.tap_channels(t))
        .sum::<usize>() as u64;
    let sp = &plan.pipeline.spectrum;
    let bins = match out.spectra {
        SpectraMode::Full => (plan.stimulus.frames / 2 + 1) as u64 * 4,
        SpectraMode::Terms => plan.terms.kept_bins(sp.skip + sp.neighbours).len() as u64 * 8,
        SpectraMode::None => 0,
    };
    let spectra = if bins > 0 { bins + 40 } else { 0 };
    let terms = plan.terms.terms.len() as u64;
    let per_term = if out.neurons { 140 } else { 0 };
    images as u64 * neurons * (spectra + terms * per_term)
}

/// The process's peak resident set size (`VmHWM`), MB; 0 where /proc is absent.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn human_bytes(b: u64) -> String {
    let units = ["B", "KB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1000.0 && u < units.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

fn check_writable(out: &Path) -> Result<()> {
    let err = |msg: String| Error::Output {
        file: out.to_path_buf(),
        msg,
    };
    std::fs::create_dir_all(out).map_err(|e| {
        err(format!(
            "cannot create the output folder ({e}): choose another with --out"
        ))
    })?;
    let probe = out.join(format!(".freqtag-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"ok").map_err(|e| {
        err(format!(
            "the output folder is not writable ({e}): choose another with --out"
        ))
    })?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

/// Runs a compiled pipeline end to end and commits its outputs.
pub fn run(plan: Plan, opts: &RunOptions) -> Result<Summary> {
    let started = Instant::now();
    // in a cluster every process writes its own complete set of tables under process-<i>/
    let out = match &opts.cluster {
        Some(c) => opts.out.join(format!("process-{}", c.process)),
        None => opts.out.clone(),
    };
    check_writable(&out)?;
    let weights = weights_path(&plan)?;
    let net = Arc::new(Network::load(plan.arch, &weights)?);
    let (mut images, mut skipped) = source::list(&plan.source_dir, &plan.pipeline.source);
    let expected = expected_output_bytes(&plan, images.len());
    tracing::info!(
        images = images.len(),
        skipped = skipped.len(),
        workers = opts.workers,
        expected_output = %human_bytes(expected),
        "starting run"
    );
    if expected > 20 << 30 {
        tracing::warn!(
            expected_output = %human_bytes(expected),
            "large output: set output.spectra = \"terms\" or \"none\" (and output.neurons = false) to shrink it"
        );
    }
    let fingerprint = cluster::fingerprint(&plan, &images);
    let listed = images.len();
    let (work, seeds, before) = if opts.resume {
        if opts.cluster.is_some() {
            return Err(Error::Output {
                file: out.clone(),
                msg: "--resume is not supported for cluster runs yet: rerun the cluster without it"
                    .into(),
            });
        }
        let (work, resumed) = WorkDir::resume(&out, &plan)?;
        let seeds = resume::aggregates_from_neurons(&resumed.neuron_parts, &plan)?;
        let before = (resumed.done.len() - resumed.skipped.len()) as u64;
        tracing::info!(
            committed = before,
            skipped = resumed.skipped.len(),
            "resuming"
        );
        images.retain(|r| !resumed.done.contains(&r.id));
        for (i, r) in images.iter_mut().enumerate() {
            r.seq = i as u64;
        }
        skipped.extend(resumed.skipped);
        (work, Some(Arc::new(seeds)), before)
    } else {
        (WorkDir::fresh(&out, &plan)?, None, 0)
    };
    let staging = work.tables();
    let work = Arc::new(work);
    let plan = Arc::new(plan);
    let images = Arc::new(images);
    let workers = opts.workers.max(1);
    let config = match &opts.cluster {
        None => timely::Config::process(workers),
        Some(c) => timely::Config {
            communication: timely::CommunicationConfig::Cluster {
                threads: workers,
                process: c.process,
                addresses: c.hosts.clone(),
                report: false,
                zerocopy: false,
            },
            worker: timely::WorkerConfig::default(),
        },
    };
    let joined = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let d = done.clone();
    let (p, n, i, w, j) = (
        plan.clone(),
        net.clone(),
        images.clone(),
        work.clone(),
        joined.clone(),
    );
    let chunk = opts.chunk.max(1);
    let check = opts.cluster.is_some().then(|| fingerprint.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let result = timely::execute(config, move |worker| {
            j.store(true, std::sync::atomic::Ordering::SeqCst);
            if let Some(f) = &check {
                cluster::check_fingerprints(worker, f)?;
            }
            let ctx = WorkerCtx::new(worker.index(), p.clone(), w.clone(), d.clone());
            let seeds = if worker.index() == 0 {
                seeds.clone()
            } else {
                None
            };
            run_worker(worker, ctx, n.clone(), i.clone(), seeds, chunk)
        })
        .map(|guards| guards.join());
        let _ = tx.send(result);
    });
    let timeout = opts.cluster.as_ref().map(|c| c.connect_timeout);
    let (processes, process) = opts
        .cluster
        .as_ref()
        .map_or((1, 0), |c| (c.processes, c.process));
    // this process's share of the images
    let mine = images
        .iter()
        .filter(|r| (r.seq as usize % (workers * processes)) / workers == process)
        .count() as u64;
    let mut progress = Progress::new(mine, process);
    let result = loop {
        progress.update(done.load(Ordering::Relaxed));
        match rx.recv_timeout(std::time::Duration::from_millis(200)) {
            Ok(r) => {
                progress.finish();
                break r;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                break Err("the worker threads stopped unexpectedly".into())
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let waiting = !joined.load(std::sync::atomic::Ordering::SeqCst);
                if let (Some(t), Some(c)) = (timeout, &opts.cluster) {
                    if waiting && started.elapsed() > t {
                        let _ = std::fs::remove_dir_all(&staging);
                        return Err(Error::Output {
                            file: opts.out.clone(),
                            msg: format!(
                                "process {} could not connect to all {} processes within {} s: {}",
                                c.process,
                                c.processes,
                                t.as_secs(),
                                c.unreachable()
                            ),
                        });
                    }
                }
            }
        }
    };
    let results = result.map_err(|e| Error::Output {
        file: opts.out.clone(),
        msg: format!("cannot start workers: {e}"),
    })?;
    let mut processed = before;
    let mut interrupted = false;
    let mut stages = StageTimes::default();
    let mut failures = Vec::new();
    for r in results {
        match r {
            Ok(Ok(rep)) => {
                processed += rep.processed;
                skipped.extend(rep.skipped);
                stages.add(&rep.stages);
                interrupted |= rep.interrupted;
            }
            Ok(Err(e)) => failures.push(e),
            Err(e) => failures.push(format!("worker failed: {e}")),
        }
    }
    if !failures.is_empty() {
        return Err(Error::Output {
            file: out.clone(),
            msg: format!(
                "run failed, previous outputs left as they were (committed parts kept for --resume):\n  - {}",
                failures.join("\n  - ")
            ),
        });
    }
    if interrupted {
        return Err(Error::Interrupted {
            out: out.clone(),
            processed,
        });
    }
    skipped.sort_by(|a, b| a.id.cmp(&b.id));
    let mut tables = vec!["images", "scores"];
    if plan.pipeline.output.neurons {
        tables.push("neurons");
    }
    if plan.pipeline.output.spectra != crate::config::SpectraMode::None {
        tables.push("spectra");
    }
    sink::commit(&staging, &out, &tables)?;
    work.remove()?;
    let wall_s = started.elapsed().as_secs_f64();
    let summary = Summary {
        images_listed: listed,
        images_processed: processed,
        skipped,
        wall_s,
        images_per_s: (processed - before) as f64 / wall_s.max(1e-9),
        resumed_images: before,
        peak_rss_mb: peak_rss_mb(),
        workers: opts.workers,
        stage_seconds: stages,
        out: out.clone(),
    };
    let report = run_json(&plan, &weights, &summary);
    sink::write_atomic(
        &out.join("run.json"),
        &serde_json::to_string_pretty(&report).unwrap_or_default(),
    )?;
    Ok(summary)
}

fn run_json(plan: &Plan, weights: &Path, s: &Summary) -> serde_json::Value {
    let noise = plan.stimulus.noise_std > 0.0;
    serde_json::json!({
        "freqtag_version": env!("CARGO_PKG_VERSION"),
        "versions": {
            "timely": "0.32", "differential-dataflow": "0.26", "candle": "0.11.1",
            "rustfft": "6.4", "parquet": "60.1"
        },
        "pipeline_file": plan.file,
        "pipeline": plan.pipeline,
        "resolved": {
            "source": plan.source_dir,
            "arch": plan.arch.name(),
            "weights": weights,
            "taps": plan.taps,
            "terms": plan.terms.terms,
            "lattice_step_bins": plan.terms.lattice_step,
            "bin_hz": plan.stimulus.fps / plan.stimulus.frames as f64,
            "distinct_frames": plan.stimulus.distinct_frames().0.len(),
            "regions": plan.stimulus.regions.layout,
        },
        "scoring": {
            "snr": "standard (snr, snr_db) and lattice-aware (snr_lattice, snr_lattice_db), both reported",
            "lattice": match plan.terms.lattice_step {
                Some(k) => format!("every multiple of {k} bins is a lattice bin"),
                None => "tagged frequencies are off the bin grid: the term bins stand in for the lattice".into(),
            },
            "stimulus_noise": noise,
            "rounding_sensitive": if noise { serde_json::json!([]) } else {
                serde_json::json!(["snr_lattice", "snr_lattice_db", "mean_snr_db"])
            },
            "note": if noise { "stimulus noise gives the baseline bins a real response" } else {
                "no stimulus noise: off-lattice bins hold float rounding only, so the listed scores measure rounding, not the network (METHOD.md section 3); response_share is stable"
            },
        },
        "warnings": plan.warnings,
        "counts": {
            "images_listed": s.images_listed,
            "images_processed": s.images_processed,
            "images_from_earlier_attempts": s.resumed_images,
            "skipped": s.skipped.len(),
        },
        "workers": s.workers,
        "wall_s": s.wall_s,
        "peak_rss_mb": s.peak_rss_mb,
        "stage_seconds": s.stage_seconds,
        "images_per_s": s.images_per_s,
        "skipped": s.skipped,
    })
}

/// What a worker's operators share.
struct WorkerCtx {
    index: usize,
    plan: Arc<Plan>,
    work: Arc<WorkDir>,
    done: Arc<AtomicU64>,
    skipped: RefCell<Vec<Skipped>>,
    errors: RefCell<Vec<String>>,
    processed: std::cell::Cell<u64>,
    times: RefCell<StageTimes>,
}

impl WorkerCtx {
    fn new(index: usize, plan: Arc<Plan>, work: Arc<WorkDir>, done: Arc<AtomicU64>) -> Rc<Self> {
        Rc::new(WorkerCtx {
            index,
            plan,
            work,
            done,
            skipped: RefCell::new(Vec::new()),
            errors: RefCell::new(Vec::new()),
            processed: std::cell::Cell::new(0),
            times: RefCell::new(StageTimes::default()),
        })
    }
}

/// One chunk (timestamp) of a worker's images while it is written: its parts, the partial sums
/// of its scores, and what it covers.
struct ChunkState {
    cap: Capability<u64>,
    partial: HashMap<ScoreKey, Acc>,
    tables: Option<ImageTables>,
    images: Vec<String>,
    skipped: Vec<Skipped>,
}

impl ChunkState {
    fn new(cap: Capability<u64>) -> Self {
        ChunkState {
            cap,
            partial: HashMap::new(),
            tables: None,
            images: Vec::new(),
            skipped: Vec::new(),
        }
    }

    /// Writes the images of a batch and folds their score updates into the partial sums.
    fn fold(
        &mut self,
        ctx: &WorkerCtx,
        time: u64,
        data: &mut Vec<(ImageRef, std::result::Result<Analysed, String>)>,
    ) {
        let per_class = ctx.plan.pipeline.output.per_class;
        for (r, res) in data.drain(..) {
            ctx.done.fetch_add(1, Ordering::Relaxed);
            let a = match res {
                Ok(a) => a,
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
                match ImageTables::create(&ctx.work.tables(), &name, ctx.plan.clone()) {
                    Ok(t) => self.tables = Some(t),
                    Err(e) => ctx.errors.borrow_mut().push(e.to_string()),
                }
            }
            if let Some(t) = self.tables.as_mut() {
                if let Err(e) = t.write(&a.image, a.pred, a.prob, a.distinct, &a.neurons) {
                    ctx.errors.borrow_mut().push(e.to_string());
                }
            }
            self.images.push(a.image.id.clone());
            ctx.processed.set(ctx.processed.get() + 1);
            let groups: &[Option<i64>] = match (per_class, a.image.label) {
                (true, Some(l)) => &[None, Some(l)],
                _ => &[None],
            };
            for nr in &a.neurons {
                for (ti, s) in nr.terms.iter().enumerate() {
                    let acc = Acc::of(&s.as_array(nr.mean_snr_db));
                    for g in groups {
                        self.partial
                            .entry((nr.tap, nr.channel, ti as u32, *g))
                            .or_insert_with(Acc::zero)
                            .plus_equals(&acc);
                    }
                }
            }
        }
    }

    /// Commits the chunk's parts and manifest line; returns its partial sums to emit.
    fn commit(self, ctx: &WorkerCtx, time: u64) -> (Capability<u64>, HashMap<ScoreKey, Acc>) {
        let part = match self.tables {
            Some(t) => match t.finish() {
                Ok(()) => ctx.work.part_name(ctx.index, time),
                Err(e) => {
                    ctx.errors.borrow_mut().push(e.to_string());
                    String::new()
                }
            },
            None => String::new(),
        };
        if !self.images.is_empty() || !self.skipped.is_empty() {
            let seg = Segment {
                part,
                images: self.images,
                skipped: self.skipped,
            };
            if let Err(e) = ctx.work.commit_segment(ctx.index, &seg) {
                ctx.errors.borrow_mut().push(e.to_string());
            }
        }
        (self.cap, self.partial)
    }
}

/// Builds and drives one worker's dataflow.
fn run_worker(
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
    let aggregates: Rc<RefCell<BTreeMap<ScoreKey, Acc>>> = Rc::new(RefCell::new(BTreeMap::new()));
    let mut input: InputHandle<u64, _> = InputHandle::new();
    let probe = ProbeHandle::new();
    let pre = plan.arch.preprocess();
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
        let recorded = decoded.unary(Pipeline, "Record", move |_, _| {
            move |input, output| {
                input.for_each(|cap, data| {
                    let mut session = output.session(&cap);
                    for (r, rgb) in data.drain(..) {
                        let p = &c.plan;
                        let rec = rgb.and_then(|rgb| {
                            let batch = p.pipeline.model.batch_size;
                            timed(
                                &c.times,
                                |t| &mut t.forward,
                                || record(&n, &p.taps, &p.stimulus, pre, &rgb, &r.id, batch),
                            )
                            .map_err(|e| format!("inference failed: {e}"))
                        });
                        session.give((r, rec));
                    }
                });
            }
        });
        let c = ctx.clone();
        let mut spectrum = Spectrum::new(plan.stimulus.frames, plan.pipeline.spectrum.window);
        let analysed = recorded.map(move |(r, rec)| {
            let p = &c.plan;
            let out = rec.map(|rec| Analysed {
                neurons: timed(
                    &c.times,
                    |t| &mut t.spectrum,
                    || analyse(&rec, &mut spectrum, &p.terms, nb, p.stimulus.frames),
                ),
                pred: rec.pred,
                prob: rec.prob,
                distinct: rec.distinct_frames,
                image: r.clone(),
            });
            (r, out)
        });
        // Writes each image's rows as it arrives and folds its score updates into one partial
        // sum per key and chunk; once the frontier passes the chunk, its parts and manifest line
        // are committed and the partial sums emitted: far fewer records enter the exchange than
        // one per image. Aggregates of images committed by an earlier attempt seed chunk 0.
        let c = ctx.clone();
        let updates = analysed.unary_frontier(Pipeline, "WriteImages", move |cap, _| {
            let mut stash: BTreeMap<u64, ChunkState> = BTreeMap::new();
            if let Some(seeds) = seeds {
                let mut state = ChunkState::new(cap);
                state.partial = (*seeds).clone();
                stash.insert(0, state);
            }
            move |(input, frontier), output| {
                let started = Instant::now();
                input.for_each(|cap, data| {
                    let Some(time) = cap.least().copied() else {
                        return;
                    };
                    let state = match stash.entry(time) {
                        Entry::Occupied(e) => e.into_mut(),
                        Entry::Vacant(v) => match cap.retain_least(output.output_index()) {
                            Some(cap) => v.insert(ChunkState::new(cap)),
                            None => return,
                        },
                    };
                    state.fold(&c, time, data);
                });
                let finished: Vec<u64> = stash
                    .keys()
                    .copied()
                    .filter(|time| !frontier.frontier().less_equal(time))
                    .collect();
                for time in finished {
                    if let Some(state) = stash.remove(&time) {
                        let (cap, partial) = state.commit(&c, time);
                        let mut session = output.session(&cap);
                        for (k, acc) in partial {
                            session.give((k, time, acc));
                        }
                    }
                }
                c.times.borrow_mut().write += started.elapsed().as_secs_f64();
            }
        });
        let ag = aggregates.clone();
        let c = ctx.clone();
        updates
            .container::<Vec<(ScoreKey, u64, Acc)>>()
            .as_collection()
            .consolidate()
            .inner
            .probe_with(&probe)
            .sink(Pipeline, "CollectScores", move |(input, _frontier)| {
                let started = Instant::now();
                input.for_each(|_, data| {
                    let mut ag = ag.borrow_mut();
                    for (k, _t, acc) in data.drain(..) {
                        ag.entry(k).or_insert_with(Acc::zero).plus_equals(&acc);
                    }
                });
                c.times.borrow_mut().aggregate += started.elapsed().as_secs_f64();
            });
    });
    // Images of one chunk share a timestamp; at most IN_FLIGHT chunks are ahead of the
    // aggregation. Ctrl-C (STOP) ends the feeding: the chunks in flight finish and commit.
    const IN_FLIGHT: u64 = 2;
    let mut n = 0u64;
    let mut interrupted = false;
    for r in images.iter().filter(|r| r.seq as usize % peers == index) {
        if STOP.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        input.send(r.clone());
        n += 1;
        if n.is_multiple_of(chunk) {
            let c = n / chunk;
            input.advance_to(c);
            let wait = c.saturating_sub(IN_FLIGHT);
            worker.step_while(|| probe.less_than(&wait));
        }
    }
    drop(input);
    while !probe.with_frontier(|f| f.is_empty()) {
        worker.step();
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
