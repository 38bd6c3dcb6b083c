//! Bad input is reported and skipped, the run goes on; bad pipelines report every problem.

use crate::common::{
    freqtag, freqtag_args, paper_args, paper_pipeline, resnet32, root, run_python, shared_data,
    show, tmp,
};

#[test]
fn broken_images_are_skipped_with_reasons_and_exit_code_1() {
    let Some(shared) = shared_data("bad images") else {
        return;
    };
    let dir = tmp();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    for f in ["cifar10_00_3.png", "cifar10_01_8.png"] {
        std::fs::copy(
            root().join("data/cifar10-foolbox-20").join(f),
            images.join(f),
        )
        .unwrap();
    }
    // grey, grey+alpha, RGBA and 16-bit PNGs are converted to RGB and processed
    let src = image::open(root().join("data/cifar10-foolbox-20/cifar10_02_8.png")).unwrap();
    src.to_luma8().save(images.join("grey_8.png")).unwrap();
    src.to_luma_alpha8()
        .save(images.join("greyalpha_8.png"))
        .unwrap();
    src.to_rgba8().save(images.join("rgba_8.png")).unwrap();
    src.to_rgb16().save(images.join("deep_8.png")).unwrap();
    let jpeg = std::fs::read(root().join("data/imagenet-foolbox-20/imagenet_00_243.jpg")).unwrap();
    std::fs::write(images.join("truncated_5.jpg"), &jpeg[..jpeg.len() / 3]).unwrap();
    std::fs::write(images.join("empty_1.jpg"), b"").unwrap();
    std::fs::write(images.join("notes_2.png"), b"this is text, not a PNG\n").unwrap();
    let out = dir.path().join("out");
    let source = format!("source.path={}", images.display());
    let o = freqtag_args(&paper_args(
        &out,
        2,
        &resnet32(&shared),
        &["--set", &source],
    ));
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    let skipped = run["skipped"].as_array().unwrap();
    let ids: Vec<&str> = skipped.iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        vec!["empty_1.jpg", "notes_2.png", "truncated_5.jpg"],
        "{run}"
    );
    for s in skipped {
        assert!(!s["reason"].as_str().unwrap().is_empty());
    }
    assert_eq!(run["counts"]["images_processed"], 6);
    // every good image is in every output
    run_python(
        "python/check_outputs.py",
        &[&out.display().to_string(), "6"],
    );
}

#[test]
fn a_pipeline_with_three_mistakes_reports_all_three() {
    let dir = tmp();
    let p = dir.path().join("bad.toml");
    std::fs::write(
        &p,
        format!(
            r#"
[source]
path = "{}"
colour = "rgb"

[model]
arch = "resnet32"
weights = "{}"
taps = ["conv1", "layer9.0.conv1"]

[stimulus]
frequencies = [6.0, 75.0]
"#,
            root().join("data/cifar10-foolbox-20").display(),
            root().join("Cargo.toml").display()
        ),
    )
    .unwrap();
    let o = freqtag(&["validate", &p.display().to_string()]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("unknown setting `source.colour`"), "{err}");
    assert!(err.contains("layer9.0.conv1"), "{err}");
    assert!(err.contains("75 Hz is at or above Nyquist"), "{err}");
    assert!(err.contains("3 problem(s)"), "{err}");
}

#[test]
fn validate_prints_the_plan_of_every_shipped_pipeline() {
    for entry in std::fs::read_dir(root().join("pipelines")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_none_or(|e| e != "toml") {
            continue; // pipelines/lists/: image lists the pipelines name
        }
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(
            text.starts_with('#'),
            "{} must start with a comment saying what it is for",
            p.display()
        );
        let o = freqtag(&["validate", &p.display().to_string()]);
        let out = String::from_utf8_lossy(&o.stdout);
        let err = String::from_utf8_lossy(&o.stderr);
        // some pipelines read weights or images in ../shared; without it they may fail on that
        let missing_shared = !root().join("../shared/data").is_dir()
            && text.contains("shared/data")
            && err.contains("does not exist");
        assert!(o.status.success() || missing_shared, "{}", show(&o));
        if o.status.success() {
            assert!(
                out.contains("distinct frames") && out.contains("f1+f2"),
                "{out}"
            );
            assert!(
                out.contains("\nimages     ") && out.contains(" listed"),
                "{out}"
            );
        }
    }
}

/// `validate` lists the source as a run would: how many images and labels it finds, and a
/// warning where file-name labels look wrong (numbered files in class folders, as CIFAR-10's
/// test set comes), with the setting to use instead.
#[test]
fn validate_warns_of_numbered_files_in_class_folders() {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "airplane/0000.png",
        "airplane/0001.png",
        "automobile/0002.png",
    ] {
        let p = dir.path().join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"").unwrap(); // listed, not read
    }
    let pipeline = root().join("pipelines/paper-resnet32-cifar10.toml");
    let validate = |labels: &str| {
        freqtag(&[
            "validate",
            &pipeline.display().to_string(),
            "--set",
            &format!("source.path={}", dir.path().display()),
            "--set",
            &format!("source.labels=\"{labels}\""),
            // the weights are checked, not read: any existing file will do
            "--set",
            &format!("model.weights={}", root().join("Cargo.toml").display()),
        ])
    };
    let o = validate("filename");
    assert!(o.status.success(), "{}", show(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("images     3 listed, 3 different labels"),
        "{out}"
    );
    assert!(
        out.contains("warning    source.labels = \"filename\"")
            && out.contains("set source.labels = \"folders\""),
        "{out}"
    );
    let o = validate("folders");
    assert!(o.status.success(), "{}", show(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("images     3 listed, 2 different labels"),
        "{out}"
    );
    assert!(!out.contains("warning"), "{out}");
}

#[test]
fn set_overrides_and_bad_set_syntax() {
    let o = freqtag(&[
        "validate",
        &paper_pipeline(),
        "--set",
        "stimulus.fps=60",
        "--set",
        "stimulus.frames=120",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    if o.status.success() {
        assert!(out.contains("120 frames at 60 fps (bin 0.5 Hz)"), "{out}");
    }
    let o = freqtag(&["validate", &paper_pipeline(), "--set", "nonsense"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("expected key=value"));
}

#[test]
fn unwritable_output_fails_before_work() {
    let Some(shared) = shared_data("unwritable output") else {
        return;
    };
    let dir = tmp();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let o = freqtag_args(&paper_args(&file.join("out"), 1, &resnet32(&shared), &[]));
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--out"),
        "{}",
        show(&o)
    );
}

#[test]
fn a_corpus_of_awkward_and_broken_images_is_processed_or_skipped_with_reasons() {
    let Some(shared) = shared_data("bad-input corpus") else {
        return;
    };
    let dir = tmp();
    let images = dir.path().join("corpus");
    let good = root().join("data/cifar10-foolbox-20/cifar10_00_3.png");
    run_python(
        "python/make_bad_inputs.py",
        &[&good.display().to_string(), &images.display().to_string()],
    );
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(images.join("expected.json")).unwrap())
            .unwrap();
    let out = dir.path().join("out");
    let source = format!("source.path={}", images.display());
    let more = ["--set", &source, "--set", "source.labels=none"];
    let o = freqtag_args(&paper_args(&out, 2, &resnet32(&shared), &more));
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    let mut skipped: Vec<&str> = run["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    skipped.sort();
    let want: Vec<&str> = expected["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(skipped, want, "{}", run["skipped"]);
    let bomb = run["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "bomb-20000x20000.png")
        .unwrap();
    assert!(
        bomb["reason"].as_str().unwrap().contains("decode bomb"),
        "{bomb}"
    );
    let n = expected["processed"].as_array().unwrap().len();
    assert_eq!(run["counts"]["images_processed"], n);
    run_python(
        "python/check_outputs.py",
        &[&out.display().to_string(), &n.to_string()],
    );
}

/// Exact per-class sums grow with the classes: 1000 labelled images of 1000 classes on
/// MobileNetV2 (17 056 neurons) would need hundreds of GB; the run refuses before any work,
/// naming the setting, instead of being killed for memory.
#[test]
fn per_class_sums_that_cannot_fit_in_memory_are_refused_up_front() {
    let dir = tmp();
    let photo = root().join("data/photos");
    let first = std::fs::read_dir(&photo)
        .unwrap()
        .map(|e| e.unwrap().path())
        .min()
        .unwrap();
    let list: String = (0..1000)
        .map(|i| format!("{} {i}\n", first.display()))
        .collect();
    let lf = dir.path().join("many-classes.txt");
    std::fs::write(&lf, list).unwrap();
    let out = dir.path().join("out");
    let o = freqtag(&[
        "run",
        &root()
            .join("pipelines/quickstart.toml")
            .display()
            .to_string(),
        "--out",
        out.to_str().unwrap(),
        "--set",
        "source.kind=list",
        "--set",
        &format!("source.path={}", lf.display()),
        "--set",
        "source.labels=source",
        "--set",
        "output.per_class=true",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("output.per_class") && err.contains("1000 classes"),
        "{err}"
    );
    assert!(!out.join("scores").exists());
}
