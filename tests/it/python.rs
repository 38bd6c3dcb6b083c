//! The quickstart read back by pandas and DuckDB, as a user would.

use crate::common::{freqtag, root, run_python, show, tmp};

#[test]
fn quickstart_outputs_read_back_in_pandas_and_duckdb() {
    let dir = tmp();
    let out = dir.path().join("quick");
    let o = freqtag(&[
        "run",
        &root()
            .join("pipelines/quickstart.toml")
            .display()
            .to_string(),
        "--out",
        &out.display().to_string(),
        "--workers",
        "2",
        "--set",
        "source.limit=2",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let said = run_python(
        "python/check_outputs.py",
        &[&out.display().to_string(), "2"],
    );
    assert!(said.contains("ok"), "{said}");
}
