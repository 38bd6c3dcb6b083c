//! The command line: what the user typed ([`Cli`]), then one small function per subcommand.
//! Exit codes: 0 all inputs processed, 1 the run finished but skipped some inputs, 2 a usage,
//! configuration or setup error (nothing was written).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use std::time::Duration;

use crate::cluster::Cluster;
use crate::config;
use crate::dataflow::{self, RunOptions};
use crate::model::{fetch, Arch};

/// Frequency tagging of CNN neurons: spectra and scores to Parquet.
#[derive(Debug, Parser)]
#[command(name = "freqtag", version, about)]
pub struct Cli {
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a pipeline and write its outputs.
    Run {
        /// The pipeline file (TOML).
        pipeline: PathBuf,
        /// Output folder [default: out/<pipeline name>].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Worker threads (per process) [default: number of cores].
        #[arg(long)]
        workers: Option<usize>,
        /// Override a setting by its dotted path, e.g. --set stimulus.fps=60 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Number of processes of a cluster run (timely cluster mode; needs --hostfile).
        #[arg(long, default_value_t = 1)]
        processes: usize,
        /// This process's index in a cluster run, 0 to processes-1.
        #[arg(long, default_value_t = 0)]
        process: usize,
        /// File with one host:port per process, in process order.
        #[arg(long)]
        hostfile: Option<PathBuf>,
        /// Seconds to wait for every process of a cluster run to connect.
        #[arg(long, default_value_t = 120)]
        connect_timeout: u64,
        /// Continue the unfinished run in the output folder (after a crash, kill or Ctrl-C).
        #[arg(long)]
        resume: bool,
        /// Images per worker committed together (one segment of every table) [default: 16;
        /// on a GPU enough images to fill model.device_batch].
        #[arg(long)]
        chunk: Option<u64>,
        /// Where the forward passes run: cpu, cuda or cuda:N (sets model.device).
        #[arg(long)]
        device: Option<String>,
        /// Threads per worker for the kernels of its forward passes [default: cores / workers,
        /// at least 1; or RAYON_NUM_THREADS].
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Check a pipeline, report every problem at once, and print the resolved plan.
    Validate {
        /// The pipeline file (TOML).
        pipeline: PathBuf,
        /// Override a setting by its dotted path (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Prune filters by a run's scores and other selectors, and measure top-1 accuracy
    /// (the pipeline's [prune] section says how).
    Prune {
        /// The pipeline file (TOML) with a [prune] section.
        pipeline: PathBuf,
        /// The output folder of a finished run of this pipeline [default: out/<pipeline name>].
        #[arg(long)]
        scores: Option<PathBuf>,
        /// Where to write [default: <scores>/prune].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override a setting by its dotted path, e.g. --set prune.scope=layer (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Write an HTML report (with its SVG figures) of a run's outputs.
    Report {
        /// The run's output folder.
        out: PathBuf,
        /// Neurons whose spectra are drawn: the N most responsive (by mean dB-SNR).
        #[arg(long, default_value_t = 6)]
        top: usize,
        /// Also draw these neurons' spectra, as layer:channel (repeatable).
        #[arg(long = "neuron", value_name = "LAYER:CHANNEL")]
        neurons: Vec<String>,
    },
    /// Manage real weights in the local cache.
    Weights {
        /// What to do.
        #[command(subcommand)]
        action: WeightsAction,
    },
    /// List the architectures, their input settings and taps.
    Models {
        /// Show every tap of this architecture.
        arch: Option<String>,
    },
    /// Measure speed: the paper pipeline (ResNet-32, CIFAR-10, 240 frames, every conv) and the
    /// quickstart (MobileNetV2) on fixed images, each run in its own process; prints
    /// images/s, peak memory and seconds per stage for each worker count.
    Bench {
        /// Images per pipeline: the first N of its set, or the set over and over (as links of
        /// other names) where N is larger [default: 100 for the paper pipeline, its 20 CIFAR-10
        /// images 5 times; 20 for the quickstart, the photos of data/imagenet-foolbox-20].
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        images: Option<u64>,
        /// Runs of each configuration, taken in turn (one of each, then again), so that a slow
        /// spell of the machine touches them all alike; the median run is reported, with the
        /// range.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
        repeat: u32,
        /// Worker counts measured (repeatable) [default: 1 and the number of cores].
        #[arg(long = "workers")]
        workers: Vec<usize>,
        /// Only this pipeline: `paper` or `quickstart`.
        #[arg(long)]
        only: Option<String>,
        /// Print the figures as JSON.
        #[arg(long)]
        json: bool,
        /// Run the pipelines on this device: cpu, cuda or cuda:N.
        #[arg(long)]
        device: Option<String>,
        /// Override a setting of both pipelines (repeatable), e.g. --set source.path=DIR.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
}

/// `freqtag weights ...`.
#[derive(Debug, Subcommand)]
pub enum WeightsAction {
    /// Fetch a model's weights into the cache, verified by sha256.
    Fetch {
        /// Model name (see `freqtag weights list`).
        model: String,
    },
    /// List fetchable models and whether they are cached.
    List,
}

/// `--set` overrides with `--device D` as `model.device=D`.
fn with_device(mut sets: Vec<String>, device: Option<String>) -> Vec<String> {
    if let Some(d) = device {
        sets.push(format!("model.device={d}"));
    }
    sets
}

/// Runs the parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Run {
            pipeline,
            out,
            workers,
            sets,
            processes,
            process,
            hostfile,
            connect_timeout,
            resume,
            chunk,
            device,
            threads,
        } => {
            let sets = with_device(sets, device);
            let cluster = match (processes, hostfile) {
                (1, None) => None,
                (_, Some(h)) => Some(Cluster::new(
                    processes,
                    process,
                    &h,
                    Duration::from_secs(connect_timeout),
                )?),
                (_, None) => anyhow::bail!(
                    "--processes {processes} needs --hostfile FILE with one host:port line per process"
                ),
            };
            let how = How {
                workers,
                threads,
                cluster,
                resume,
                chunk,
            };
            cmd_run(pipeline, out, &sets, how)
        }
        Command::Validate { pipeline, sets } => cmd_validate(pipeline, &sets),
        Command::Prune {
            pipeline,
            scores,
            out,
            sets,
        } => cmd_prune(pipeline, scores, out, &sets),
        Command::Report { out, top, neurons } => {
            let page = crate::report::write(&out, top, &neurons)?;
            println!("report: {}", page.display());
            Ok(0)
        }
        Command::Weights { action } => match action {
            WeightsAction::Fetch { model } => {
                let p = fetch::fetch(&model)?;
                println!("{model}: {}", p.display());
                Ok(0)
            }
            WeightsAction::List => {
                for name in fetch::names() {
                    let state = match fetch::cached(name) {
                        Some(p) => format!("cached at {}", p.display()),
                        None => "not cached (fetched on first use)".into(),
                    };
                    println!("{name}\t{state}");
                }
                Ok(0)
            }
        },
        Command::Models { arch } => cmd_models(arch),
        Command::Bench {
            images,
            repeat,
            workers,
            only,
            json,
            device,
            sets,
        } => cmd_bench(
            images.map(|n| n as usize),
            repeat as usize,
            workers,
            only,
            json,
            &with_device(sets, device),
        ),
    }
}

/// A pipeline file of the project: from the current folder, else from where it was built.
fn project_file(rel: &str) -> PathBuf {
    let here = PathBuf::from(rel);
    if here.exists() {
        here
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
    }
}

/// The folder of `n` images for a bench run from `dir`'s images: `dir` itself where it holds
/// `n` or more (the run takes its first `n`), else a folder under `tmp` of links to them, each
/// image as often as it takes, named `r{round}_{name}` (a label at the end of a name stays).
fn bench_images(dir: &std::path::Path, n: usize, tmp: &std::path::Path) -> anyhow::Result<PathBuf> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("bench: reading the images of {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name())
        .collect();
    names.sort();
    anyhow::ensure!(!names.is_empty(), "bench: no images in {}", dir.display());
    if n <= names.len() {
        return Ok(dir.to_path_buf());
    }
    let name = dir
        .file_name()
        .map_or("images".into(), |s| s.to_os_string());
    let to = tmp.join(name);
    std::fs::create_dir_all(&to).with_context(|| format!("bench: creating {}", to.display()))?;
    for i in 0..n {
        let f = &names[i % names.len()];
        let link = to.join(format!("r{:03}_{}", i / names.len(), f.to_string_lossy()));
        #[cfg(unix)]
        let made = std::os::unix::fs::symlink(dir.join(f), &link);
        #[cfg(not(unix))]
        let made = std::fs::copy(dir.join(f), &link).map(|_| ());
        made.with_context(|| format!("bench: linking {}", link.display()))?;
    }
    Ok(to)
}

/// The median of `v` (the lower middle one of an even count), by value.
fn median_index(v: &[f64]) -> usize {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    order[(v.len() - 1) / 2]
}

fn cmd_bench(
    images: Option<usize>,
    repeat: usize,
    workers: Vec<usize>,
    only: Option<String>,
    json: bool,
    sets: &[String],
) -> anyhow::Result<i32> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut counts = if workers.is_empty() {
        vec![1, cores]
    } else {
        workers
    };
    counts.sort_unstable();
    counts.dedup();
    // each count with its default threads (cores / workers), then, for the scaling of the
    // dataflow itself, one worker and the most workers with one thread each (where the default
    // differs): one worker's kernels already spread over every core
    let mut configs: Vec<(usize, Option<usize>)> = counts.iter().map(|&w| (w, None)).collect();
    let most = counts[counts.len() - 1];
    if counts.len() > 1 && cores > 1 {
        configs.push((1, Some(1)));
        if cores / most > 1 {
            configs.push((most, Some(1)));
        }
    }
    // the pipelines, their images and how many: the paper pipeline runs on its 20 CIFAR-10
    // images 5 times over, since 20 take about a second, start-up included, and the figures
    // moved by a third from run to run; the quickstart on the 20 shipped ImageNet photos
    // rather than its 5, which two workers split 3 and 2 (capping the scaling at 1.67x)
    let all = [
        (
            "paper",
            "pipelines/paper-resnet32-cifar10.toml",
            "data/cifar10-foolbox-20",
            100,
        ),
        (
            "quickstart",
            "pipelines/quickstart.toml",
            "data/imagenet-foolbox-20",
            20,
        ),
    ];
    if let Some(o) = &only {
        anyhow::ensure!(
            all.iter().any(|(n, ..)| n == o),
            "--only {o}: choose paper or quickstart"
        );
    }
    let exe = std::env::current_exe().context("locating the freqtag binary")?;
    let tmp = std::env::temp_dir().join(format!("freqtag-bench-{}", std::process::id()));
    let mut runs: Vec<Vec<serde_json::Value>> = Vec::new();
    let mut plan = Vec::new();
    for (name, file, images_dir, default_n) in all {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let pipeline = project_file(file);
        let n = images.unwrap_or(default_n);
        let dir = project_file(images_dir);
        let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
        let dir = match bench_images(&dir, n, &tmp.join("images")) {
            Ok(d) => d,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        for &(w, threads) in &configs {
            plan.push((name, pipeline.clone(), dir.clone(), n, w, threads));
            runs.push(Vec::new());
        }
    }
    let result = (|| -> anyhow::Result<()> {
        for round in 0..repeat {
            for (i, (name, pipeline, dir, n, w, threads)) in plan.iter().enumerate() {
                let out = tmp.join(format!("{name}-{w}-{}", threads.unwrap_or(0)));
                let mut cmd = std::process::Command::new(&exe);
                cmd.arg("run")
                    .arg(pipeline)
                    .arg("--out")
                    .arg(&out)
                    .arg("--workers")
                    .arg(w.to_string())
                    .args(["--log-level", "warn"])
                    .args(["--set", &format!("source.path={}", dir.display())])
                    .args(["--set", &format!("source.limit={n}")])
                    .env_remove("RAYON_NUM_THREADS");
                if let Some(t) = threads {
                    cmd.args(["--threads", &t.to_string()]);
                }
                for kv in sets {
                    cmd.args(["--set", kv]);
                }
                let of = if repeat > 1 {
                    format!(" (run {} of {repeat})", round + 1)
                } else {
                    String::new()
                };
                match threads {
                    Some(t) => eprintln!("bench: {name}, {w} worker(s) of {t} thread(s){of}..."),
                    None => eprintln!("bench: {name}, {w} worker(s){of}..."),
                }
                let o = cmd.output().context("running freqtag run")?;
                anyhow::ensure!(
                    o.status.success(),
                    "bench: the {name} pipeline failed ({}):\n{}",
                    pipeline.display(),
                    String::from_utf8_lossy(&o.stderr)
                );
                let run: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(out.join("run.json"))?)?;
                runs[i].push(serde_json::json!({
                    "name": name,
                    "workers": w,
                    "threads_per_worker": run["threads_per_worker"],
                    "threads_default": threads.is_none(),
                    "images": run["counts"]["images_processed"],
                    "seconds": run["wall_s"],
                    "images_per_s": run["images_per_s"],
                    "peak_rss_mb": run["peak_rss_mb"],
                    "stage_seconds": run["stage_seconds"],
                    "distinct_frames": run["resolved"]["distinct_frames"],
                    "device": run["pipeline"]["model"]["device"],
                    "dtype": run["pipeline"]["model"]["dtype"],
                }));
                let _ = std::fs::remove_dir_all(&out);
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // each configuration's median run, with every run's images/s
    let results: Vec<serde_json::Value> = runs
        .into_iter()
        .map(|rs| {
            let rates: Vec<f64> = rs
                .iter()
                .map(|r| r["images_per_s"].as_f64().unwrap_or(0.0))
                .collect();
            let mut r = rs[median_index(&rates)].clone();
            r["runs"] = rs.len().into();
            r["images_per_s_runs"] = rates.into();
            r
        })
        .collect();
    let _ = std::fs::remove_dir_all(&tmp);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "cores": cores, "runs": results }))?
        );
        return Ok(0);
    }
    println!(
        "{:<11} {:>7} {:>7} {:>6} {:>8} {:>9} {:>9}   stage seconds, all workers (decode/stimulus/forward/spectrum/write/aggregate)",
        "pipeline", "workers", "threads", "images", "seconds", "images/s", "peak MB"
    );
    if repeat > 1 {
        println!("(each row the median of {repeat} runs by images/s; every run's images/s below)");
    }
    for r in &results {
        let st = &r["stage_seconds"];
        let f = |k: &str| st[k].as_f64().unwrap_or(0.0);
        println!(
            "{:<11} {:>7} {:>7} {:>6} {:>8.2} {:>9.2} {:>9.0}   {:.2}/{:.2}/{:.2}/{:.2}/{:.2}/{:.2}",
            r["name"].as_str().unwrap_or(""),
            r["workers"].as_u64().unwrap_or(0),
            r["threads_per_worker"].as_u64().unwrap_or(0),
            r["images"].as_u64().unwrap_or(0),
            r["seconds"].as_f64().unwrap_or(0.0),
            r["images_per_s"].as_f64().unwrap_or(0.0),
            r["peak_rss_mb"].as_f64().unwrap_or(0.0),
            f("decode"),
            f("stimulus"),
            f("forward"),
            f("spectrum"),
            f("write"),
            f("aggregate")
        );
    }
    let rates = |r: &serde_json::Value| -> Vec<f64> {
        r["images_per_s_runs"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_f64()).collect())
            .unwrap_or_default()
    };
    if repeat > 1 {
        for r in &results {
            let each: Vec<String> = rates(r).iter().map(|v| format!("{v:.2}")).collect();
            println!(
                "{:<11} {:>7} {:>7}   images/s of each run: {}",
                r["name"].as_str().unwrap_or(""),
                r["workers"].as_u64().unwrap_or(0),
                r["threads_per_worker"].as_u64().unwrap_or(0),
                each.join(", ")
            );
        }
    }
    // worker scaling, per pipeline: the most workers against one, with the default threads
    // and with one thread per worker; each run against the other's run of the same round
    let runs_of = |name: &str, w: usize, threads: Option<usize>| {
        results
            .iter()
            .find(|r| {
                r["name"] == name
                    && r["workers"] == w
                    && match threads {
                        None => r["threads_default"] == true,
                        Some(t) => r["threads_per_worker"] == t,
                    }
            })
            .map(rates)
    };
    let ratio = |one: Vec<f64>, m: Vec<f64>| {
        let each: Vec<f64> = one.iter().zip(&m).map(|(a, b)| b / a).collect();
        let mid = each[median_index(&each)];
        if each.len() > 1 {
            let (lo, hi) = each
                .iter()
                .fold((f64::MAX, f64::MIN), |(l, h), &v| (l.min(v), h.max(v)));
            format!(
                "{mid:.2}x (median of {} rounds; {lo:.2}-{hi:.2}x)",
                each.len()
            )
        } else {
            format!("{mid:.2}x")
        }
    };
    for (name, ..) in all {
        if counts.len() < 2 {
            break;
        }
        if let (Some(one), Some(m)) = (runs_of(name, 1, None), runs_of(name, most, None)) {
            println!(
                "{name}: {most} workers run {} one worker of {cores} threads",
                ratio(one, m)
            );
        }
        if let (Some(one), Some(m)) = (runs_of(name, 1, Some(1)), runs_of(name, most, Some(1))) {
            println!(
                "{name}: with one thread per worker, {most} workers run {} one",
                ratio(one, m)
            );
        }
    }
    Ok(0)
}

fn default_out(pipeline: &std::path::Path) -> PathBuf {
    PathBuf::from("out").join(
        pipeline
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "run".into()),
    )
}

fn cmd_prune(
    pipeline: PathBuf,
    scores: Option<PathBuf>,
    out: Option<PathBuf>,
    sets: &[String],
) -> anyhow::Result<i32> {
    let plan = config::load(&pipeline, sets)?;
    let scores = scores.unwrap_or_else(|| default_out(&pipeline));
    let out = out.unwrap_or_else(|| scores.join("prune"));
    let s = crate::prune::run(&plan, &scores, &out)
        .with_context(|| format!("pruning with {}", pipeline.display()))?;
    println!(
        "pruning evaluation on {} images ({} left out as scored, {} skipped), {} candidate filters, unpruned top-1 {:.2} %, {:.1} s",
        s.n_images,
        s.n_excluded,
        s.skipped.len(),
        s.n_candidates,
        100.0 * s.baseline_accuracy,
        s.wall_s
    );
    println!(
        "{:<12} {:>5} {:>9} {:>9} {:>9}",
        "selector", "seed", "fraction", "pruned", "top-1 %"
    );
    for p in &s.points {
        println!(
            "{:<12} {:>5} {:>9.3} {:>9} {:>9.2}",
            p.selector,
            p.seed.map(|x| x.to_string()).unwrap_or_else(|| "-".into()),
            p.fraction,
            p.n_pruned,
            100.0 * p.accuracy
        );
    }
    for sk in &s.skipped {
        println!("  skipped {}: {}", sk.id, sk.reason);
    }
    println!("outputs in {} (curves.parquet, curves.svg)", out.display());
    Ok(if s.skipped.is_empty() { 0 } else { 1 })
}

fn cmd_validate(pipeline: PathBuf, sets: &[String]) -> anyhow::Result<i32> {
    let plan = config::load(&pipeline, sets)?;
    print!("{}", plan.describe());
    // what a run would find in the source: its images, their labels, and a labelling that
    // looks wrong (the source is listed as a run lists it, without reading an image)
    let src = &plan.pipeline.source;
    let (images, skipped, warning) = crate::source::list_checked(&plan.source_dir, src);
    let labels = images
        .iter()
        .filter_map(|r| r.label)
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let mut line = format!("images     {} listed", images.len());
    if src.limit.is_some() {
        line.push_str(" (source.limit)");
    }
    if !skipped.is_empty() {
        line.push_str(&format!(", {} skipped (a run names each)", skipped.len()));
    }
    if src.labels != config::LabelSource::None {
        line.push_str(&format!(", {labels} different labels"));
    }
    println!("{line}");
    if let Some(w) = warning {
        println!("warning    {w}");
    }
    println!("ok: {} is valid", pipeline.display());
    Ok(0)
}

/// How `run` runs (flags), as typed.
struct How {
    workers: Option<usize>,
    threads: Option<usize>,
    cluster: Option<Cluster>,
    resume: bool,
    chunk: Option<u64>,
}

fn cmd_run(
    pipeline: PathBuf,
    out: Option<PathBuf>,
    sets: &[String],
    how: How,
) -> anyhow::Result<i32> {
    let How {
        workers,
        threads,
        cluster,
        resume,
        chunk,
    } = how;
    let plan = config::load(&pipeline, sets)?;
    for w in &plan.warnings {
        tracing::warn!("{w}");
    }
    let out = out.unwrap_or_else(|| default_out(&pipeline));
    let workers = workers
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
        .max(1);
    // One worker per core is faster than workers sharing a rayon pool for these small nets
    // (BUILD-NOTES): give each worker's matmuls cores / workers threads unless the user chose.
    if let Some(t) = threads {
        anyhow::ensure!(t > 0, "--threads 0: give at least 1 thread per worker");
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    } else if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", (cores / workers).max(1).to_string());
    }
    let opts = RunOptions {
        out,
        workers,
        cluster,
        resume,
        chunk,
    };
    // Ctrl-C: stop taking images, commit the chunks in flight, exit saying how to resume
    let _ = ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: finishing the images in flight (Ctrl-C again to abort)");
        if dataflow::STOP.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(130);
        }
    });
    let summary = match dataflow::run(plan, &opts) {
        Err(e @ crate::Error::Interrupted { .. }) => {
            eprintln!("{e}");
            return Ok(130);
        }
        r => r.with_context(|| format!("running {}", pipeline.display()))?,
    };
    println!(
        "processed {} of {} images in {:.1} s ({:.2} images/s, {} workers, peak memory {:.0} MB); skipped {}",
        summary.images_processed,
        summary.images_listed,
        summary.wall_s,
        summary.images_per_s,
        summary.workers,
        summary.peak_rss_mb,
        summary.skipped.len()
    );
    let st = &summary.stage_seconds;
    println!(
        "stage seconds (all workers): decode {:.2}, stimulus {:.2}, forward {:.2}, spectrum {:.2}, write {:.2}, aggregate {:.2}",
        st.decode, st.stimulus, st.forward, st.spectrum, st.write, st.aggregate
    );
    for s in &summary.skipped {
        println!("  skipped {}: {}", s.id, s.reason);
    }
    println!("outputs in {} (see run.json)", summary.out.display());
    Ok(if summary.skipped.is_empty() { 0 } else { 1 })
}

fn cmd_models(arch: Option<String>) -> anyhow::Result<i32> {
    let names: Vec<String> = match arch {
        Some(a) => vec![a],
        None => Arch::NAMES.iter().map(|s| s.to_string()).collect(),
    };
    let detail = names.len() == 1;
    for name in names {
        let a = Arch::parse(&name).map_err(anyhow::Error::msg)?;
        let p = a.preprocess();
        let taps = a.taps();
        println!(
            "{name}: input {}x{} (resize short side {}, centre crop {}), mean {:?}, std {:?}, {} taps",
            p.crop, p.crop, p.resize, p.crop, p.mean, p.std, taps.len()
        );
        if detail {
            for t in taps {
                println!("  {:<28} {:>5} channels  {:?}", t.name, t.channels, t.group);
            }
        }
    }
    Ok(0)
}
