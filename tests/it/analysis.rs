//! After a run: pruning evaluation checked against an independent numpy implementation, the
//! HTML report opened in headless Chromium, and the examples/ questions answered by DuckDB and
//! pandas alike. One real run of the paper pipeline feeds all three.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{freqtag_args, paper_args, resnet32, root, run_python, shared_data, show, tmp};

/// A list file of `per_class` CIFAR-10 test JPEGs per class, from file number `first` on.
fn cifar_list(shared: &Path, dir: &Path, first: usize, per_class: usize) -> PathBuf {
    let root = shared.join("cifar10-test-jpeg");
    let mut classes: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    classes.sort();
    let mut text = String::new();
    for (i, c) in classes.iter().enumerate() {
        for k in first..first + per_class {
            text.push_str(&format!("{}/{c}/{k:04}.jpg {i}\n", root.display()));
        }
    }
    let p = dir.join("eval.txt");
    std::fs::write(&p, text).unwrap();
    p
}

fn prune_args(out: &Path, weights: &Path, list: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = vec![
        "prune".to_string(),
        crate::common::paper_pipeline(),
        "--scores".into(),
        out.display().to_string(),
        "--set".into(),
        format!("model.weights={}", weights.display()),
        "--set".into(),
        "prune.source.kind=list".into(),
        "--set".into(),
        format!("prune.source.path={}", list.display()),
        "--set".into(),
        "prune.source.labels=source".into(),
        "--set".into(),
        "prune.fractions=[0.1, 0.3]".into(),
        "--set".into(),
        "prune.seeds=2".into(),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Chromium, if installed (`.ci/run` installs Debian's `chromium`).
fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join(name))
                    .find(|p| p.is_file())
            })
        })
}

#[test]
fn prune_report_and_examples_on_a_real_run() {
    let Some(shared) = shared_data("prune_report_and_examples_on_a_real_run") else {
        return;
    };
    let w = resnet32(&shared);
    let dir = tmp();
    let out = dir.path().join("run");
    let o = freqtag_args(&paper_args(
        &out,
        2,
        &w,
        &["--set", "output.per_class=true"],
    ));
    assert!(o.status.success(), "{}", show(&o));

    // pruning: 200 labelled test images (20 per class), every selector, two modes and scopes;
    // re-encoded as PNG so both sides see the same pixels (see to_png.py)
    let jpegs = cifar_list(&shared, dir.path(), 100, 20);
    let pngs = dir.path().join("png");
    run_python(
        "python/to_png.py",
        &[jpegs.to_str().unwrap(), pngs.to_str().unwrap()],
    );
    let list = pngs.join("list.txt");
    // one unreadable image among them: reported, skipped, counted, the evaluation goes on
    std::fs::write(pngs.join("broken.png"), b"not a png").unwrap();
    let mut text = std::fs::read_to_string(&list).unwrap();
    text.push_str(&format!("{} 3\n", pngs.join("broken.png").display()));
    std::fs::write(&list, text).unwrap();
    let o = freqtag_args(&prune_args(&out, &w, &list, &[]));
    assert_eq!(
        o.status.code(),
        Some(1),
        "one input skipped: exit 1\n{}",
        show(&o)
    );
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(
        said.contains("1 skipped") && said.contains("broken.png"),
        "{said}"
    );
    for s in ["score-high", "score-low", "random", "l1-norm", "bn-scale"] {
        assert!(said.contains(s), "{s} missing:\n{said}");
    }
    let silence = dir.path().join("prune-silence");
    let o = freqtag_args(&prune_args(
        &out,
        &w,
        &list,
        &[
            "--out",
            silence.to_str().unwrap(),
            "--set",
            "prune.mode=silence",
            "--set",
            "prune.scope=layer",
            "--set",
            "prune.exclude=[\"stem\", \"residual_last\"]",
            "--set",
            "prune.selectors=[\"score-low\", \"random\", \"bn-scale\"]",
        ],
    ));
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    for d in [out.join("prune"), silence.clone()] {
        for f in [
            "curves.parquet",
            "classes.parquet",
            "filters.parquet",
            "images.parquet",
            "curves.svg",
            "prune.json",
        ] {
            assert!(d.join(f).is_file(), "{} missing", d.join(f).display());
        }
        // the independent implementation: numpy forward of the same pruned checkpoint
        let said = run_python(
            "reference/ref_prune.py",
            &[
                "--weights",
                w.to_str().unwrap(),
                "--arch",
                "resnet32",
                "--prune-dir",
                d.to_str().unwrap(),
            ],
        );
        assert!(said.contains("max_abs_diff"), "{said}");
        // counts, scope, exclusions and every ranking, recomputed from scores/ and the checkpoint
        let said = run_python(
            "python/check_prune.py",
            &[
                d.to_str().unwrap(),
                "--scores",
                out.to_str().unwrap(),
                "--weights",
                w.to_str().unwrap(),
            ],
        );
        assert!(said.starts_with("ok"), "{said}");
    }

    // the report, opened as a user would
    let o = crate::common::freqtag(&[
        "report",
        out.to_str().unwrap(),
        "--neuron",
        "layer1.0.conv1:3",
    ]);
    assert!(o.status.success(), "{}", show(&o));
    let page = out.join("report/index.html");
    let html = std::fs::read_to_string(&page).unwrap();
    for needle in [
        "Pruning",
        "SNR by layer and channel",
        "most responsive",
        "layer1.0.conv1 channel 3",
    ] {
        assert!(html.contains(needle), "report lacks `{needle}`");
    }
    let figures = html.matches("<img ").count();
    assert!(figures >= 10, "only {figures} figures");
    assert!(
        !html.contains("http://") || !html.contains("src=\"http"),
        "the page must not fetch from the network"
    );
    match chromium() {
        None => eprintln!(
            "\n!!! SKIPPED the browser check of the report: no chromium on PATH (.ci/run installs Debian's `chromium`) !!!\n"
        ),
        Some(browser) => {
            let profile = dir.path().join("chromium-profile");
            let base = |extra: &[&str]| {
                let mut c = Command::new(&browser);
                c.args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--no-first-run",
                    "--disable-dev-shm-usage",
                    "--virtual-time-budget=5000",
                ])
                .arg(format!("--user-data-dir={}", profile.display()))
                .args(extra)
                .arg(format!("file://{}", page.display()));
                c.output().expect("chromium runs")
            };
            let dom = base(&["--dump-dom"]);
            let text = String::from_utf8_lossy(&dom.stdout);
            let want = format!("data-images-loaded=\"{figures}/{figures}\"");
            assert!(text.contains(&want), "not every figure loaded in Chromium (want {want}):\n{}", show(&dom));
            let artifacts = root().join("target/test-artifacts");
            std::fs::create_dir_all(&artifacts).unwrap();
            let shot = artifacts.join("report.png");
            let _ = std::fs::remove_file(&shot);
            let o = base(&[
                &format!("--screenshot={}", shot.display()),
                "--window-size=1200,4000",
            ]);
            assert!(
                shot.metadata().map(|m| m.len() > 10_000).unwrap_or(false),
                "no screenshot:\n{}",
                show(&o)
            );
            eprintln!("report screenshot kept at {}", shot.display());
        }
    }

    // examples/: DuckDB SQL and pandas answer the same questions on this run
    let said = run_python("python/check_examples.py", &[out.to_str().unwrap()]);
    assert!(!said.is_empty());
}

#[test]
fn prune_settings_are_checked_by_validate() {
    let Some(shared) = shared_data("prune_settings_are_checked_by_validate") else {
        return;
    };
    let pipeline = crate::common::paper_pipeline();
    let weights = format!("model.weights={}", resnet32(&shared).display());
    // `freqtag validate` of the paper pipeline with these --set overrides
    let validate = |sets: &[&str]| {
        let mut args = vec!["validate", pipeline.as_str(), "--set", weights.as_str()];
        for s in sets {
            args.extend(["--set", s]);
        }
        crate::common::freqtag(&args)
    };
    let o = validate(&[
        "prune.source.path=/no/such/folder",
        "prune.source.labels=folders",
        "prune.fractions=[0.1, 1.5]",
        "prune.rank_by=snr",
        "prune.exclude=[\"layer9.0.conv1\"]",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    for needle in [
        "prune.source.path: /no/such/folder does not exist",
        "prune.fractions: 1.5",
        "prune.term",
        "prune.exclude: `layer9.0.conv1`",
    ] {
        assert!(err.contains(needle), "`{needle}` not reported:\n{err}");
    }
    let o = validate(&["prune.source.path=.", "prune.selectors=[\"biggest\"]"]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("prune.selectors"),
        "{}",
        show(&o)
    );
}
