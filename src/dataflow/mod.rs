//! The timely dataflow every worker builds, and the run that drives it.
//!
//! `Images` (input; worker w feeds the images with `seq % workers == w`) -> `Decode` -> `Record`
//! (stimulus + batched forward passes) -> `Analyse` (FFT and term scores) -> `WriteImages` (this
//! worker's parts of `spectra/`, `neurons/`, `images/`; emits aggregate updates) -> differential
//! `consolidate` (exchanged by the key (tap, channel, term, label)) -> `CollectScores`.
//! All image-level stages use `Pipeline`: an image stays on the worker that read it; only the
//! aggregates cross workers, by key, so each key's total is exact and owned by one worker.
//!
//! This module drives a run (`run`): it checks the output folder, loads the network, lists the
//! images, sets up the work folder (fresh or resumed), starts timely (threads, or a cluster of
//! processes with a connection timeout), waits while showing progress, and commits the outputs.
//! [`worker`] is the dataflow each worker builds; [`report`] the progress, size and `run.json`.

mod report;
mod shared;
mod worker;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::cluster::{self, Cluster};
use crate::config::{Plan, WeightsSource};
use crate::error::{Error, Result};
use crate::model::{fetch, Network};
use crate::resume::{self, WorkDir};
use crate::sink;
use crate::source::{self, Skipped};

pub use report::{
    expected_aggregate_bytes, expected_output_bytes, peak_rss_mb, total_memory_bytes,
};
use report::{human_bytes, run_json, Progress};
use worker::{run_worker, WorkerCtx};

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
    /// Images per worker in one chunk: one timestamp, one committed segment [default: 16; on
    /// a GPU enough to fill `model.device_batch`, at most 512].
    pub chunk: Option<u64>,
}

/// Threads of each worker's pool for the kernels of its forward passes: `RAYON_NUM_THREADS`,
/// which `freqtag run` sets from `--threads` or to cores / workers; 1 where unset.
pub fn threads_per_worker() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(1)
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
    /// Images per worker in a chunk (`--chunk` or its default).
    pub chunk: u64,
    /// Seconds per stage, summed over workers.
    pub stage_seconds: StageTimes,
    /// Output folder.
    pub out: PathBuf,
}

pub(crate) struct WorkerReport {
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
    /// Building the stimulus frames of each image from its pixels (on a GPU: the host's share,
    /// interleaving the image's channels, uploading it and queueing the kernels that build its
    /// frames there).
    pub stimulus: f64,
    /// The forward passes: running the frames through the network and reading back each tap's
    /// spatial means (on a GPU: the device thread's time, waiting for the card included).
    pub forward: f64,
    /// FFTs and term scores.
    pub spectrum: f64,
    /// Writing per-image Parquet rows and emitting aggregate updates.
    pub write: f64,
    /// Folding consolidated aggregates.
    pub aggregate: f64,
}

impl StageTimes {
    pub(crate) fn add(&mut self, o: &StageTimes) {
        self.decode += o.decode;
        self.stimulus += o.stimulus;
        self.forward += o.forward;
        self.spectrum += o.spectrum;
        self.write += o.write;
        self.aggregate += o.aggregate;
    }
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

/// Images per worker in a chunk when `--chunk` is not given: 16 on the CPU. On a GPU, enough
/// images to fill a pass (`model.device_batch`), and at least one per 512 KiB of the chunk's
/// sums counted as full [`crate::score::Acc`]s (936 bytes each; the table allocated is the
/// compact `SumTable`, 360 bytes a slot, 37 MB for MobileNetV2's 17 056 neurons and 6 terms,
/// and since session 19 one a chunk for all of a process's workers, which share its commit: the
/// figures here are from before, when each worker had its own): a commit compresses and hands
/// on the whole table (0.3 s of one core here: 105-130 ms
/// of zstd, 85-115 ms handing on 102 000 sums), which is 1.6 ms an image at the 182 images this
/// gives MobileNetV2 against 6.7 ms at the 45 of one per 2 MB. (Counted by `SumTable` slots it
/// would be 70: more commits, and a table for each chunk in flight.) Labelled images with `output.per_class` keep every
/// image's scores until the commit (7 MB an image for MobileNetV2), so there the table sets at
/// most 32. Always 16 to 512.
fn default_chunk(plan: &Plan, on_gpu: bool, labelled: bool) -> u64 {
    if !on_gpu {
        return 16;
    }
    let pass = plan.images_per_pass();
    let table = plan.neurons() * plan.terms.terms.len() * std::mem::size_of::<crate::score::Acc>();
    let mut by_table = table / (512 << 10);
    if labelled && plan.pipeline.output.per_class {
        by_table = by_table.min(32);
    }
    pass.max(by_table).clamp(16, 512) as u64
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
    let net = {
        use crate::model::device;
        let m = &plan.pipeline.model;
        let bad = |e: String| Error::Device { msg: e };
        let spec = device::parse_device(&m.device).map_err(bad)?;
        let dtype = device::parse_dtype(&m.dtype).map_err(bad)?;
        let dev = device::open(spec)?;
        tracing::info!(device = %device::describe(spec), dtype = %m.dtype, "model device");
        if worker::gpu_path_on_cpu() && dev.is_cpu() {
            tracing::warn!("FREQTAG_GPU_PATH_ON_CPU: running the GPU's code path on the CPU");
            Arc::new(Network::load_gpu_layers_on_cpu(plan.arch, &weights)?)
        } else {
            Arc::new(Network::load_with(
                plan.arch,
                &weights,
                &dev,
                dtype,
                plan.pipeline.model.winograd,
            )?)
        }
    };
    // on a GPU, frames per pass: resolved once, for the workers of this process (run.json
    // records the value used)
    let mut plan = plan;
    if !net.device().is_cpu() || worker::gpu_path_on_cpu() {
        let (side, m) = (plan.stimulus.regions.size, &plan.pipeline.model);
        let free = crate::model::device::free_memory(net.device());
        plan.pipeline.model.device_batch = m.device_batch_for(side, opts.workers, free);
        tracing::info!(
            frames = plan.pipeline.model.device_batch,
            free_gb = free.map(|f| f as f64 / 1e9),
            "frames per pass on the device"
        );
    }
    let (mut images, mut skipped, warning) =
        source::list_checked(&plan.source_dir, &plan.pipeline.source);
    if let Some(w) = warning {
        tracing::warn!("{w}");
        plan.warnings.push(w);
    }
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
    // exact per-class sums grow with the number of classes: refuse what cannot fit, before work
    let labels = images
        .iter()
        .filter_map(|r| r.label)
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let agg = expected_aggregate_bytes(&plan, labels);
    let fix =
        "set output.per_class = false (the scores over all images stay), or record fewer taps";
    match total_memory_bytes() {
        Some(total) if agg > total / 2 => {
            return Err(Error::Config {
                file: plan.file.clone(),
                problems: vec![format!(
                    "output.per_class: exact score sums for {labels} classes need about {} of memory, more than half of this machine's {}: {fix}",
                    human_bytes(agg),
                    human_bytes(total)
                )],
            })
        }
        _ if agg > 2 << 30 => tracing::warn!(
            memory = %human_bytes(agg),
            classes = labels,
            "the exact per-class score sums take a lot of memory: {fix}"
        ),
        _ => {}
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
        let seeds = resume::aggregates(&resumed, &plan)?;
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
    // the chunks' tables of sums, one a chunk for all of this process's workers
    let process = Arc::new(shared::ProcessSums::default());
    let (p, n, i, w, j) = (
        plan.clone(),
        net.clone(),
        images.clone(),
        work.clone(),
        joined.clone(),
    );
    let on_gpu = !net.device().is_cpu() || worker::gpu_path_on_cpu();
    let chunk = opts
        .chunk
        .unwrap_or_else(|| default_chunk(&plan, on_gpu, labels > 0));
    let chunk = chunk.max(1);
    let check = opts.cluster.is_some().then(|| fingerprint.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let result = timely::execute(config, move |worker| {
            j.store(true, std::sync::atomic::Ordering::SeqCst);
            if let Some(f) = &check {
                cluster::check_fingerprints(worker, f)?;
            }
            let ctx = WorkerCtx::new(
                worker.index(),
                p.clone(),
                w.clone(),
                d.clone(),
                process.clone(),
            );
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
        chunk,
        stage_seconds: stages,
        out: out.clone(),
    };
    let report = run_json(&plan, &weights, &summary);
    sink::write_atomic(
        &out.join("run.json"),
        &serde_json::to_string_pretty(&report).unwrap_or_default(),
    )?;
    if let Some(p) = crate::model::profile::report() {
        eprintln!("{p}");
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_chunk_grows_with_the_table_of_sums_on_a_gpu() {
        let load = |file: &str, sets: &[&str]| {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("pipelines")
                .join(file);
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            crate::config::load(&path, &sets).unwrap()
        };
        let paper = load("paper-resnet32-cifar10.toml", &["model.device_batch=4050"]);
        assert_eq!(default_chunk(&paper, false, false), 16);
        // 4 050 frames of 50 per image: a pass of 81 images; the table (6.4 MB) asks for less
        assert_eq!(default_chunk(&paper, true, false), 81);
        let quick = load("quickstart.toml", &["model.device_batch=128"]);
        assert_eq!(default_chunk(&quick, false, false), 16);
        // MobileNetV2: 17 056 neurons x 6 terms x 936 bytes = 96 MB of sums: 182 images
        let c = default_chunk(&quick, true, false);
        assert!((170..=200).contains(&c), "{c}");
        // labelled images keep their scores until the commit: at most 32
        assert_eq!(default_chunk(&quick, true, true), 32);
        let off = load(
            "quickstart.toml",
            &["model.device_batch=128", "output.per_class=false"],
        );
        assert_eq!(default_chunk(&off, true, true), c);
    }
}
