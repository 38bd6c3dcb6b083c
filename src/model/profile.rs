//! Where a GPU forward pass spends its time, for whoever speeds it up: with
//! `FREQTAG_GPU_PROFILE=1` each profiled operation synchronises the device before and after and
//! adds its seconds to a table printed at the end of the run. The figures are exact, but the run
//! is slower and workers no longer overlap on the device: profile with one worker.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use candle_core::{Result, Tensor};

static ENABLED: OnceLock<bool> = OnceLock::new();
static TABLE: Mutex<BTreeMap<&'static str, (f64, u64)>> = Mutex::new(BTreeMap::new());

/// Whether `FREQTAG_GPU_PROFILE` is set.
pub fn enabled() -> bool {
    *ENABLED.get_or_init(|| std::env::var_os("FREQTAG_GPU_PROFILE").is_some_and(|v| v != "0"))
}

/// Runs `f`, an operation on `x`'s device; when profiling a GPU, timed between two
/// synchronisations.
pub fn op<R>(name: &'static str, x: &Tensor, f: impl FnOnce() -> Result<R>) -> Result<R> {
    if !enabled() || x.device().is_cpu() {
        return f();
    }
    x.device().synchronize()?;
    let t = Instant::now();
    let r = f()?;
    x.device().synchronize()?;
    add(name, t.elapsed().as_secs_f64());
    Ok(r)
}

/// [`op`] under a name made by `name` when profiling (each distinct name kept for the run).
pub fn op_named<R>(
    name: impl FnOnce() -> String,
    x: &Tensor,
    f: impl FnOnce() -> Result<R>,
) -> Result<R> {
    if !enabled() || x.device().is_cpu() {
        return f();
    }
    op(intern(name()), x, f)
}

/// `name` as a `&'static str`, leaked once per distinct name (a few per run).
pub(crate) fn intern(name: String) -> &'static str {
    static NAMES: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    let Ok(mut names) = NAMES.lock() else {
        return "(unnamed)";
    };
    if let Some(n) = names.iter().find(|n| **n == name) {
        return n;
    }
    let n: &'static str = Box::leak(name.into_boxed_str());
    names.push(n);
    n
}

/// Adds `secs` to `name`.
pub fn add(name: &'static str, secs: f64) {
    if let Ok(mut t) = TABLE.lock() {
        let e = t.entry(name).or_insert((0.0, 0));
        e.0 += secs;
        e.1 += 1;
    }
}

/// The table, largest first, if anything was profiled.
pub fn report() -> Option<String> {
    let t = TABLE.lock().ok()?;
    if t.is_empty() {
        return None;
    }
    let mut rows: Vec<_> = t.iter().collect();
    rows.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    let mut s = String::from("GPU profile (seconds, calls):");
    for (name, (secs, n)) in rows {
        s.push_str(&format!("\n  {name:<14} {secs:>9.3} s {n:>8}"));
    }
    Some(s)
}
