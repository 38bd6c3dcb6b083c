//! The paper pipeline end to end through the binary: the tagging signature, independence from
//! the worker count, frame de-duplication, stimulus noise, and the float64 reference.

use crate::common::{
    freqtag_args, freqtag_env, paper_args, resnet32, root, run_python, shared_data, show, tmp,
};

fn run_paper(out: &std::path::Path, workers: usize, weights: &std::path::Path, extra: &[&str]) {
    let mut more = vec!["--set", "source.limit=4"];
    more.extend_from_slice(extra);
    let o = freqtag_args(&paper_args(out, workers, weights, &more));
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    // the log goes to a pipe here: plain text, no terminal colour codes
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(
        log.contains("INFO") && !log.contains('\u{1b}'),
        "{}",
        show(&o)
    );
}

#[test]
fn paper_pipeline_is_tagged_and_identical_for_1_2_and_4_workers() {
    let Some(shared) = shared_data("paper pipeline workers") else {
        return;
    };
    let w = resnet32(&shared);
    let dir = tmp();
    let outs: Vec<_> = [1, 2, 4]
        .iter()
        .map(|n| dir.path().join(format!("w{n}")))
        .collect();
    for (o, n) in outs.iter().zip([1, 2, 4]) {
        run_paper(o, n, &w, &[]);
    }
    let a = outs[0].display().to_string();
    run_python("python/check_tagging.py", &[&a]);
    run_python("python/check_outputs.py", &[&a, "4"]);
    for o in &outs[1..] {
        run_python("python/compare_runs.py", &[&a, &o.display().to_string()]);
    }
}

#[test]
fn paper_pipeline_matches_the_float64_reference() {
    let Some(shared) = shared_data("float64 reference") else {
        return;
    };
    let w = resnet32(&shared);
    let dir = tmp();
    let out = dir.path().join("out");
    run_paper(&out, 2, &w, &[]);
    let images = root().join("data/cifar10-foolbox-20");
    let said = run_python(
        "reference/ref_paper.py",
        &[
            "compare",
            "--weights",
            &w.display().to_string(),
            "--images",
            &images.display().to_string(),
            "--out",
            &out.display().to_string(),
            "--limit",
            "4",
            "--amp-tol",
            "1e-4",
        ],
    );
    assert!(said.contains("OK"), "{said}");
}

#[test]
fn frame_deduplication_gives_the_same_spectra() {
    let Some(shared) = shared_data("frame dedup") else {
        return;
    };
    let w = resnet32(&shared);
    let dir = tmp();
    let (a, b) = (dir.path().join("dedup"), dir.path().join("all"));
    run_paper(&a, 2, &w, &["--set", "source.limit=2"]);
    run_paper(
        &b,
        2,
        &w,
        &[
            "--set",
            "source.limit=2",
            "--set",
            "stimulus.dedup_frames=false",
        ],
    );
    let images = std::fs::read_to_string(a.join("run.json")).unwrap();
    assert!(images.contains("\"distinct_frames\": 49"), "{images}");
    run_python(
        "python/compare_runs.py",
        &[
            &a.display().to_string(),
            &b.display().to_string(),
            "--amp-tol",
            "1e-5",
        ],
    );
}

#[test]
fn seeded_stimulus_noise_is_independent_of_workers() {
    let Some(shared) = shared_data("stimulus noise") else {
        return;
    };
    let w = resnet32(&shared);
    let dir = tmp();
    let (a, b) = (dir.path().join("n1"), dir.path().join("n2"));
    let noise = [
        "--set",
        "stimulus.noise_std=0.01",
        "--set",
        "stimulus.noise_seed=7",
        "--set",
        "source.limit=2",
    ];
    run_paper(&a, 1, &w, &noise);
    run_paper(&b, 2, &w, &noise);
    run_python(
        "python/compare_runs.py",
        &[&a.display().to_string(), &b.display().to_string()],
    );
    let run = std::fs::read_to_string(a.join("run.json")).unwrap();
    assert!(run.contains("\"stimulus_noise\": true"), "{run}");
}

#[test]
fn float16_spectra_are_half_the_precision_and_read_back() {
    let Some(shared) = shared_data("float16 spectra") else {
        return;
    };
    let w = resnet32(&shared);
    let dir = tmp();
    let (a, b) = (dir.path().join("f32"), dir.path().join("f16"));
    run_paper(&a, 2, &w, &["--set", "source.limit=2"]);
    run_paper(
        &b,
        2,
        &w,
        &["--set", "source.limit=2", "--set", "output.float16=true"],
    );
    let (a, b) = (a.display().to_string(), b.display().to_string());
    // float16 keeps about 3 significant digits of each neuron's largest amplitude
    run_python("python/compare_runs.py", &[&a, &b, "--amp-tol", "1e-3"]);
    run_python("python/check_outputs.py", &[&b, "2"]);
}

/// `freqtag bench --only paper --json` with `args`, its figures.
fn bench_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["bench", "--only", "paper", "--json"];
    all.extend(args);
    let o = crate::common::freqtag(&all);
    assert!(o.status.success(), "{}", show(&o));
    serde_json::from_slice(&o.stdout).expect("bench --json prints JSON")
}

/// `freqtag bench` runs the paper pipeline in its own process per worker count and reports its
/// figures (a smoke test of the command, not a timing: speed is judged by running it).
#[test]
fn bench_command_reports_figures_per_worker_count() {
    if shared_data("bench_command_reports_figures_per_worker_count").is_none() {
        return;
    }
    let v = bench_json(&[
        "--images",
        "2",
        "--workers",
        "1",
        "--workers",
        "2",
        "--repeat",
        "1",
    ]);
    let runs = v["runs"].as_array().unwrap();
    // 1 and 2 workers with their default threads (cores / workers), then, on a machine of
    // several cores, one thread per worker for the dataflow's own scaling
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut want = vec![(1, cores), (2, (cores / 2).max(1))];
    if cores > 1 {
        want.push((1, 1));
        if cores / 2 > 1 {
            want.push((2, 1));
        }
    }
    assert_eq!(runs.len(), want.len(), "{v}");
    for (r, (w, t)) in runs.iter().zip(want) {
        assert_eq!(r["name"], "paper");
        assert_eq!(r["workers"], w);
        assert_eq!(r["threads_per_worker"], t, "{r}");
        assert_eq!(r["images"], 2);
        assert!(r["images_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["peak_rss_mb"].as_f64().unwrap() > 0.0, "{r}");
        // the stages, each timed: decode, stimulus, forward, spectrum and scores, write
        let st = &r["stage_seconds"];
        for stage in ["decode", "stimulus", "forward", "spectrum", "write"] {
            assert!(st[stage].as_f64().unwrap() > 0.0, "{stage}: {r}");
        }
        // building 49 frames of 32x32 is a small part of running them through ResNet-32
        let stimulus = st["stimulus"].as_f64().unwrap();
        assert!(stimulus < st["forward"].as_f64().unwrap(), "{r}");
    }
}

/// `freqtag bench --images N` beyond a set's 20 images runs the set over again (as links of
/// other names, labels kept), and `--repeat` runs each configuration several times, reporting
/// the median run with every run's images/s.
#[test]
fn bench_cycles_its_images_and_repeats_runs() {
    if shared_data("bench_cycles_its_images_and_repeats_runs").is_none() {
        return;
    }
    let v = bench_json(&["--images", "23", "--workers", "1", "--repeat", "2"]);
    let runs = v["runs"].as_array().unwrap();
    // one worker count: no one-thread runs besides
    assert_eq!(runs.len(), 1, "{v}");
    let r = &runs[0];
    assert_eq!(r["images"], 23, "{r}");
    assert_eq!(r["runs"], 2, "{r}");
    let each: Vec<f64> = r["images_per_s_runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(each.len(), 2, "{r}");
    assert!(each.iter().all(|&x| x > 0.0), "{r}");
    // the lower of two is the median reported
    let low = each.iter().cloned().fold(f64::MAX, f64::min);
    assert_eq!(r["images_per_s"].as_f64().unwrap(), low, "{r}");
    // bad values are refused by name
    for flag in ["--repeat", "--images"] {
        let o = crate::common::freqtag(&["bench", flag, "0"]);
        assert!(!o.status.success());
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(flag),
            "{}",
            show(&o)
        );
    }
}

/// The GPU's code path end to end, run here on the CPU (`FREQTAG_GPU_PATH_ON_CPU`): images held
/// back and sent through the network several at a time (3 a pass, 4 a chunk: full passes and
/// the rest of a chunk), frames built as tensors, layers as tensor ops. Same spectra as the CPU
/// kernels within 1e-4 of each neuron's peak, same predictions, complete tables.
#[test]
fn gpu_code_path_run_matches_the_cpu_run() {
    let Some(shared) = shared_data("GPU code path run") else {
        return;
    };
    let w = resnet32(&shared);
    let dir = tmp();
    let (cpu, gpu) = (dir.path().join("cpu"), dir.path().join("gpu"));
    let extra = ["--set", "source.limit=7", "--chunk", "4"];
    let o = freqtag_args(&paper_args(&cpu, 2, &w, &extra));
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let mut args = paper_args(&gpu, 2, &w, &extra);
    args.extend(
        [
            "--set",
            "model.device_batch=150",
            "--log-level",
            "freqtag=debug",
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = freqtag_env(&args, &[("FREQTAG_GPU_PATH_ON_CPU", "1")]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    // 7 images over 2 workers in chunks of 4: groups of 3 and the rest of each chunk
    let groups = String::from_utf8_lossy(&o.stderr)
        .lines()
        .filter(|l| l.contains("one group on the device"))
        .count();
    assert!((3..=6).contains(&groups), "{groups} groups:\n{}", show(&o));
    // the frames built as tensors are timed as a stage of their own, apart from the passes
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(gpu.join("run.json")).unwrap()).unwrap();
    // the switch it ran with is on record, beside only those this test's own environment sets
    let env = &run["environment"];
    assert_eq!(env["FREQTAG_GPU_PATH_ON_CPU"], "1", "{env}");
    for (k, v) in env.as_object().unwrap() {
        let own = std::env::var(k).ok();
        assert!(
            k == "FREQTAG_GPU_PATH_ON_CPU" || own.as_deref() == v.as_str(),
            "{k}={v} on record: {env}"
        );
    }
    let st = &run["stage_seconds"];
    let (stimulus, forward) = (st["stimulus"].as_f64(), st["forward"].as_f64());
    assert!(
        stimulus.is_some_and(|s| s > 0.0) && forward.is_some_and(|f| f > 0.0),
        "{st}"
    );
    let (c, g) = (cpu.display().to_string(), gpu.display().to_string());
    run_python("python/check_outputs.py", &[&g, "7"]);
    run_python(
        "python/spectra_error.py",
        &[&c, &g, "--tol", "1e-4", "--same-predictions"],
    );
}

/// On a GPU the Record stage holds decoded images until a pass takes them, and the worker
/// feeds no more while two passes' worth wait: chunks far larger than a pass (MobileNetV2's
/// 182 images against passes of 3) no longer keep hundreds of decoded images a worker. Here
/// passes of 2 images (100 frames) and chunks of 8 on one worker: at most 4 images wait (16,
/// two chunks, without the bound), and every image is written.
#[test]
fn gpu_code_path_holds_at_most_two_passes_of_decoded_images() {
    let Some(shared) = shared_data("GPU code path holding decoded images") else {
        return;
    };
    let w = resnet32(&shared);
    let dir = tmp();
    let out = dir.path().join("gpu");
    let extra = [
        "--set",
        "source.limit=16",
        "--chunk",
        "8",
        "--set",
        "model.device_batch=100",
        "--log-level",
        "freqtag=debug",
    ];
    let args = paper_args(&out, 1, &w, &extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = freqtag_env(&args, &[("FREQTAG_GPU_PATH_ON_CPU", "1")]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let held: Vec<usize> = String::from_utf8_lossy(&o.stderr)
        .lines()
        .filter(|l| l.contains("decoded images waiting for a pass"))
        .filter_map(|l| l.split("held=").nth(1)?.trim().parse().ok())
        .collect();
    let most = held.iter().copied().max().unwrap_or(0);
    assert!((2..=4).contains(&most), "held {held:?}:\n{}", show(&o));
    run_python(
        "python/check_outputs.py",
        &[&out.display().to_string(), "16"],
    );
}

/// With pixel noise the GPU path builds frames on the CPU (the noise stream is sequential) and
/// uploads them: the same spectra and predictions as the CPU path.
#[test]
fn gpu_code_path_with_noise_matches_the_cpu_run() {
    let Some(shared) = shared_data("GPU code path with noise") else {
        return;
    };
    let w = resnet32(&shared);
    let dir = tmp();
    let (cpu, gpu) = (dir.path().join("cpu"), dir.path().join("gpu"));
    let extra = [
        "--set",
        "source.limit=3",
        "--set",
        "stimulus.noise_std=0.02",
    ];
    let o = freqtag_args(&paper_args(&cpu, 2, &w, &extra));
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let args = paper_args(&gpu, 2, &w, &extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = freqtag_env(&args, &[("FREQTAG_GPU_PATH_ON_CPU", "1")]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let (c, g) = (cpu.display().to_string(), gpu.display().to_string());
    run_python(
        "python/spectra_error.py",
        &[&c, &g, "--tol", "1e-4", "--same-predictions"],
    );
}

/// `model.winograd`: the paper pipeline's 3x3 stride-1 convolutions by F(2x2, 3x3) (the
/// default), F(4x4, 3x3) and the direct kernel (`off`) give spectra within 1e-4 of each
/// neuron's peak of one another and the same predictions, each setting really runs (the three
/// differ in their rounding), and run.json records it.
#[test]
fn winograd_settings_agree_with_the_direct_kernel() {
    let Some(shared) = shared_data("Winograd settings") else {
        return;
    };
    let w = resnet32(&shared);
    let dir = tmp();
    let run = |setting: &str| {
        let out = dir.path().join(setting);
        let extra = [
            "--set",
            "source.limit=4",
            "--set",
            &format!("model.winograd={setting}"),
        ];
        let o = freqtag_args(&paper_args(&out, 2, &w, &extra));
        assert_eq!(o.status.code(), Some(0), "{setting}: {}", show(&o));
        let run: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
        assert_eq!(run["pipeline"]["model"]["winograd"], setting, "{run}");
        out.display().to_string()
    };
    let off = run("off");
    for setting in ["f2", "f4"] {
        let other = run(setting);
        let json = dir.path().join(format!("{setting}.json"));
        let json_s = json.display().to_string();
        run_python(
            "python/spectra_error.py",
            &[
                &off,
                &other,
                "--tol",
                "1e-4",
                "--same-predictions",
                "--json",
                &json_s,
            ],
        );
        let r: serde_json::Value = serde_json::from_str(
            std::fs::read_to_string(&json)
                .unwrap()
                .lines()
                .last()
                .unwrap(),
        )
        .unwrap();
        let max = r["max_of_peak"].as_f64().unwrap();
        assert!(
            max > 0.0,
            "{setting}: the same spectra as the direct kernel: {r}"
        );
    }
}
