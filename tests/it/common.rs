//! Helpers shared by the integration tests: where the data is, the binary, Python.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The project root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `../shared/data`, or `None` with a loud message (the caller returns: the test is skipped).
pub fn shared_data(test: &str) -> Option<PathBuf> {
    let p = root().join("..").join("shared").join("data");
    if p.join("weights").is_dir() {
        Some(p)
    } else {
        eprintln!(
            "\n!!! SKIPPED {test}: ../shared/data is absent (real weights live there, not in the project) !!!\n"
        );
        None
    }
}

/// The ResNet-32 checkpoint in the shared data.
pub fn resnet32(shared: &Path) -> PathBuf {
    shared.join("weights/cifar10-resnet/resnet32-d509ac18.th")
}

/// Runs the freqtag binary.
pub fn freqtag(args: &[&str]) -> Output {
    freqtag_env(args, &[])
}

/// Runs the freqtag binary with extra environment variables.
pub fn freqtag_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_freqtag"))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(root())
        .output()
        .expect("the freqtag binary runs")
}

/// Prints a command's output (shown when a test fails).
pub fn show(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The Python with pandas, pyarrow and DuckDB: `$FREQTAG_TEST_PYTHON`, else `.venv/bin/python`
/// (made by `scripts/test.sh`). Its absence is a failure, not a skip: these checks are required.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("FREQTAG_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let p = root().join(".venv/bin/python");
    assert!(
        p.exists(),
        "no Python for the output checks: run scripts/test.sh (it makes .venv with pandas, pyarrow and duckdb) or set FREQTAG_TEST_PYTHON"
    );
    p
}

/// Runs a Python script of `tests/` with arguments; panics with its output if it fails.
pub fn run_python(script: &str, args: &[&str]) -> String {
    let o = Command::new(python())
        .arg(root().join("tests").join(script))
        .args(args)
        .output()
        .expect("python runs");
    assert!(o.status.success(), "{script} failed:\n{}", show(&o));
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// A fresh temporary folder.
pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temporary folder")
}

/// The paper pipeline file.
pub fn paper_pipeline() -> String {
    root()
        .join("pipelines/paper-resnet32-cifar10.toml")
        .display()
        .to_string()
}

/// `freqtag run` arguments for the paper pipeline writing to `out` with `workers` workers and
/// the ResNet-32 `weights`, followed by `extra` flags and `--set`s.
pub fn paper_args(out: &Path, workers: usize, weights: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = vec![
        "run".to_string(),
        paper_pipeline(),
        "--out".into(),
        out.display().to_string(),
        "--workers".into(),
        workers.to_string(),
        "--set".into(),
        format!("model.weights={}", weights.display()),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Runs the freqtag binary with owned arguments.
pub fn freqtag_args(args: &[String]) -> Output {
    freqtag(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>())
}
