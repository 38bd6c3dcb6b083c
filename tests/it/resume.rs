//! Resume: a run killed with SIGKILL at a random moment, or stopped with Ctrl-C, continues with
//! --resume and ends with outputs equal to an uninterrupted run's, from its committed `neurons`
//! parts or, with `output.neurons` off, from its committed chunk sums; a changed pipeline
//! refuses.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use crate::common::{freqtag_args, paper_args, resnet32, root, run_python, shared_data, show, tmp};

fn args(out: &Path, weights: &Path, extra: &[&str]) -> Vec<String> {
    let mut more = vec!["--chunk", "2", "--set", "source.limit=12"];
    more.extend_from_slice(extra);
    paper_args(out, 2, weights, &more)
}

fn interrupted_then_resumed(signal: &str, delay: Duration) {
    let Some(shared) = shared_data("resume") else {
        return;
    };
    let w = resnet32(&shared);
    let dir = tmp();
    let whole = dir.path().join("whole");
    let o = freqtag_args(&args(&whole, &w, &[]));
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let cut = dir.path().join("cut");
    let (code, err) = run_and_stop(&w, &cut, &[], signal, delay);
    if signal == "-INT" && code == Some(130) {
        assert!(err.contains("--resume"), "{err}");
    }
    if cut.join(".freqtag").exists() {
        assert!(
            !cut.join("scores").exists(),
            "an unfinished run must not publish tables"
        );
        let o = freqtag_args(&args(&cut, &w, &["--resume"]));
        assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    } else if !cut.join("scores").exists() {
        // killed before the run had set up its work folder: nothing to resume, start it again
        let o = freqtag_args(&args(&cut, &w, &[]));
        assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    }
    run_python(
        "python/compare_runs.py",
        &[&whole.display().to_string(), &cut.display().to_string()],
    );
}

#[test]
fn sigkill_at_a_random_moment_then_resume_equals_an_uninterrupted_run() {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    // between 0.3 s (nothing committed yet) and 4 s (most of the run committed)
    let delay = Duration::from_millis(300 + (nanos % 3700) as u64);
    interrupted_then_resumed("-KILL", delay);
}

#[test]
fn ctrl_c_commits_what_is_in_flight_then_resume_completes() {
    interrupted_then_resumed("-INT", Duration::from_millis(2500));
}

/// Starts a run in `out` and sends it `signal` after `delay` (if it is still running); returns
/// its exit code and what it printed on stderr.
fn run_and_stop(
    w: &Path,
    out: &Path,
    extra: &[&str],
    signal: &str,
    delay: Duration,
) -> (Option<i32>, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_freqtag"))
        .args(args(out, w, extra))
        .current_dir(root())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    let o = child.wait_with_output().unwrap();
    eprintln!("{signal} after {delay:?}: exit {:?}", o.status.code());
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

/// With `output.neurons` off no neurons rows are staged: each committed segment's sums are kept
/// instead, and a run stopped twice (so that the second attempt also starts from the first's
/// sums, and must not count them again) ends equal to an uninterrupted run.
#[test]
fn with_neurons_off_resume_from_the_chunk_sums_equals_an_uninterrupted_run() {
    let Some(shared) = shared_data("resume from sums") else {
        return;
    };
    let w = resnet32(&shared);
    let dir = tmp();
    // 24 images, so that the second attempt also commits chunks before it is stopped
    let off = ["--set", "output.neurons=false", "--set", "source.limit=24"];
    let whole = dir.path().join("whole");
    let o = freqtag_args(&args(&whole, &w, &off));
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let cut = dir.path().join("cut");
    run_and_stop(&w, &cut, &off, "-INT", Duration::from_millis(1500));
    if cut.join(".freqtag").exists() {
        let work = cut.join(".freqtag");
        let sums = std::fs::read_dir(work.join("sums"))
            .map(|d| d.count())
            .unwrap_or(0);
        let staged = std::fs::read_dir(work.join("tables/neurons"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(staged, 0, "neurons rows staged with output.neurons off");
        eprintln!("first stop: {sums} sums files committed");
        let mut again: Vec<&str> = off.to_vec();
        again.push("--resume");
        run_and_stop(&w, &cut, &again, "-INT", Duration::from_millis(1500));
        if cut.join(".freqtag").exists() {
            let second = std::fs::read_dir(work.join("sums"))
                .map(|d| {
                    d.flatten()
                        .filter(|e| e.file_name().to_string_lossy().starts_with("part-a01"))
                        .count()
                })
                .unwrap_or(0);
            eprintln!("second stop: {second} sums files committed by the second attempt");
            let o = freqtag_args(&args(&cut, &w, &again));
            assert_eq!(o.status.code(), Some(0), "{}", show(&o));
        }
    } else if !cut.join("scores").exists() {
        let o = freqtag_args(&args(&cut, &w, &off));
        assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    }
    assert!(!cut.join(".freqtag").exists() && !cut.join("neurons").exists());
    run_python(
        "python/compare_runs.py",
        &[&whole.display().to_string(), &cut.display().to_string()],
    );
}

#[test]
fn resume_with_a_changed_pipeline_refuses_naming_the_setting() {
    let Some(shared) = shared_data("resume refuses") else {
        return;
    };
    let w = resnet32(&shared);
    let dir = tmp();
    let out = dir.path().join("out");
    let forty = ["--set", "source.limit=40"];
    // an unfinished run: killed as soon as its work folder is in place (not after a fixed
    // time, which a fast machine finished the run in, and a busy one had not yet started it)
    let mut child = Command::new(env!("CARGO_BIN_EXE_freqtag"))
        .args(args(&out, &w, &forty))
        .current_dir(root())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stamp = out.join(".freqtag").join("stamp.json");
    let waited = std::time::Instant::now();
    while !stamp.exists() && waited.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(stamp.exists(), "the run never set up its work folder");
    assert!(
        !out.join("scores").exists(),
        "the run finished before it was killed"
    );
    // starting over without --resume would throw the committed work away: refused
    let o = freqtag_args(&args(&out, &w, &forty));
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("continue it with --resume"),
        "{}",
        show(&o)
    );
    let changed = [&forty[..], &["--resume", "--set", "stimulus.smin=0.2"]].concat();
    let o = freqtag_args(&args(&out, &w, &changed));
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("stimulus.smin (was 0.5, now 0.2)"), "{err}");
}

/// A run killed while it removed its work folder after publishing its tables (as earlier
/// versions could leave it: the folder without its stamp), or while it set one up or removed
/// it (`.freqtag-new-*`, `.freqtag-done-*`), leaves nothing that stops the next run: a new run
/// starts and clears the leftovers; `--resume` says there is nothing to resume.
#[test]
fn a_work_folder_without_its_stamp_does_not_block_the_next_run() {
    let Some(shared) = shared_data("work folder leftovers") else {
        return;
    };
    let w = resnet32(&shared);
    let dir = tmp();
    let out = dir.path().join("out");
    let small = ["--set", "source.limit=4"];
    let o = freqtag_args(&args(&out, &w, &small));
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(!out.join(".freqtag").exists());
    for leftover in [
        ".freqtag/tables/neurons",
        ".freqtag-new-1/tables",
        ".freqtag-done-2/sums",
    ] {
        std::fs::create_dir_all(out.join(leftover)).unwrap();
    }
    let mut resume = small.to_vec();
    resume.push("--resume");
    let o = freqtag_args(&args(&out, &w, &resume));
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no unfinished run here"),
        "{}",
        show(&o)
    );
    let o = freqtag_args(&args(&out, &w, &small));
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let left: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".freqtag"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(out.join("scores").exists());
}
