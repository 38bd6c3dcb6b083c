//! Reporting for a run: the progress bar or log line, the expected output size, peak memory and
//! `run.json`.

use std::path::Path;
use std::time::Instant;

use super::Summary;
use crate::config::Plan;

/// Progress of this process: a bar on a terminal, else a log line every 30 seconds.
pub(crate) struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    started: Instant,
    last_log: Instant,
}

impl Progress {
    pub(crate) fn new(total: u64, process: usize) -> Self {
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

    pub(crate) fn update(&mut self, done: u64) {
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

    pub(crate) fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Upper estimate of the uncompressed size of a run's tables (zstd usually halves it).
pub fn expected_output_bytes(plan: &Plan, images: usize) -> u64 {
    use crate::config::SpectraMode;
    let out = &plan.pipeline.output;
    let neurons = plan.neurons() as u64;
    let sp = &plan.pipeline.spectrum;
    let bins = match out.spectra {
        SpectraMode::Full => {
            (plan.stimulus.frames / 2 + 1) as u64 * if out.float16 { 2 } else { 4 }
        }
        SpectraMode::Terms => plan.terms.kept_bins(sp.skip + sp.neighbours).len() as u64 * 8,
        SpectraMode::None => 0,
    };
    let spectra = if bins > 0 { bins + 40 } else { 0 };
    let terms = plan.terms.terms.len() as u64;
    let per_term = if out.neurons { 140 } else { 0 };
    images as u64 * neurons * (spectra + terms * per_term)
}

/// Memory the exact score sums take: a slot of a [`crate::score::SumTable`] and its key per
/// (neuron, term, label group) in the aggregates ([`crate::score::Sums`]), and an
/// [`crate::score::Acc`] in flight (a chunk's partial sums and the exchange).
pub fn expected_aggregate_bytes(plan: &Plan, labels: usize) -> u64 {
    let neurons = plan.neurons() as u64;
    let groups = 1 + if plan.pipeline.output.per_class {
        labels as u64
    } else {
        0
    };
    let held = crate::score::SumTable::SLOT_BYTES + 64;
    let in_flight = std::mem::size_of::<crate::score::Acc>() + 64;
    neurons * plan.terms.terms.len() as u64 * groups * (held + in_flight) as u64
}

/// Physical memory of this machine (`MemTotal`), bytes; `None` where /proc is absent.
pub fn total_memory_bytes() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    })
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

pub(crate) fn human_bytes(b: u64) -> String {
    let units = ["B", "KB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1000.0 && u < units.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

/// Environment variables that change how a run computes (kernels, rounding, memory): run.json
/// records those set, under `environment`. The others freqtag reads are listed in the test's
/// `NOT_SWITCHES`.
pub(crate) const SWITCHES: &[&str] = &[
    "FREQTAG_NO_WINOGRAD",
    "FREQTAG_NO_FUSED_GPU",
    "FREQTAG_GPU_OWN_CONV",
    "FREQTAG_GPU_FUSED_MEAN",
    "FREQTAG_GPU_PAGEABLE",
    "FREQTAG_GPU_SPIN",
    "FREQTAG_GPU_EVENTS",
    "FREQTAG_CUDNN_ALGO",
    "FREQTAG_GPU_PATH_ON_CPU",
    "FREQTAG_GPU_PROFILE",
    "GLIBC_TUNABLES",
    "MIMALLOC_PURGE_DELAY",
    "FREQTAG_ALLOW_THP",
];

/// Variables freqtag reads that only say where things are, and `RAYON_NUM_THREADS`, which the
/// command line sets from `--threads` or the cores and run.json records as `threads_per_worker`.
#[cfg(test)]
const NOT_SWITCHES: &[&str] = &[
    "FREQTAG_CACHE",
    "FREQTAG_PYTHON",
    "HOME",
    "XDG_CACHE_HOME",
    "RAYON_NUM_THREADS",
];

/// The [`SWITCHES`] set in this process, with their values.
fn environment() -> serde_json::Map<String, serde_json::Value> {
    SWITCHES
        .iter()
        .filter_map(|name| {
            let v = std::env::var_os(name)?;
            Some((name.to_string(), v.to_string_lossy().into_owned().into()))
        })
        .collect()
}

pub(crate) fn run_json(plan: &Plan, weights: &Path, s: &Summary) -> serde_json::Value {
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
        "environment": environment(),
        "allocator": if cfg!(feature = "mimalloc") { "mimalloc" } else { "system (glibc's malloc, tuned)" },
        "counts": {
            "images_listed": s.images_listed,
            "images_processed": s.images_processed,
            "images_from_earlier_attempts": s.resumed_images,
            "skipped": s.skipped.len(),
        },
        "workers": s.workers,
        "chunk": s.chunk,
        "threads_per_worker": super::threads_per_worker(),
        "wall_s": s.wall_s,
        "peak_rss_mb": s.peak_rss_mb,
        "stage_seconds": s.stage_seconds,
        "images_per_s": s.images_per_s,
        "skipped": s.skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every environment variable the sources read is either recorded in run.json or names a
    /// place: a new switch cannot be left out of `SWITCHES` unnoticed.
    #[test]
    fn run_json_records_every_switch_the_sources_read() {
        fn walk(dir: &Path, names: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, names);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    let text = std::fs::read_to_string(&p).unwrap();
                    for pat in ["var(\"", "var_os(\""] {
                        for (i, _) in text.match_indices(pat) {
                            let rest = &text[i + pat.len()..];
                            let name: String = rest
                                .chars()
                                .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                                .collect();
                            if !name.is_empty() && rest[name.len()..].starts_with('"') {
                                names.push(name);
                            }
                        }
                    }
                }
            }
        }
        let mut names = Vec::new();
        walk(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut names,
        );
        assert!(
            names.iter().any(|n| n == "FREQTAG_NO_WINOGRAD"),
            "{names:?}"
        );
        for n in &names {
            assert!(
                SWITCHES.contains(&n.as_str()) || NOT_SWITCHES.contains(&n.as_str()),
                "{n} is read from the environment: add it to SWITCHES (run.json records it) or, \
                 if it only names a place, to NOT_SWITCHES"
            );
        }
    }
}
