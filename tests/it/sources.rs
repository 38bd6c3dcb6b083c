//! Every source kind gives the same results as the folder of the same images; broken shards are
//! reported and the run goes on.

use std::path::Path;

use crate::common::{freqtag_args, paper_args, resnet32, root, run_python, shared_data, show, tmp};

fn run(out: &Path, weights: &Path, kind: &str, path: &Path, expect: i32) -> serde_json::Value {
    let (k, p) = (
        format!("source.kind={kind}"),
        format!("source.path={}", path.display()),
    );
    let labels = if kind == "folder" {
        "source.labels=filename"
    } else {
        "source.labels=source"
    };
    let o = freqtag_args(&paper_args(
        out,
        2,
        weights,
        &["--set", &k, "--set", &p, "--set", labels],
    ));
    assert_eq!(o.status.code(), Some(expect), "{}", show(&o));
    serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap()
}

#[test]
fn list_tar_and_parquet_sources_equal_the_folder() {
    let Some(shared) = shared_data("sources") else {
        return;
    };
    let w = resnet32(&shared);
    let dir = tmp();
    let d = dir.path();
    let images = d.join("images");
    std::fs::create_dir(&images).unwrap();
    let src = root().join("data/cifar10-foolbox-20");
    for f in [
        "cifar10_00_3.png",
        "cifar10_01_8.png",
        "cifar10_02_8.png",
        "cifar10_03_0.png",
    ] {
        std::fs::copy(src.join(f), images.join(f)).unwrap();
    }
    let made = d.join("made");
    run_python(
        "python/make_sources.py",
        &[
            &images.display().to_string(),
            "4",
            &made.display().to_string(),
        ],
    );
    let folder = d.join("folder");
    run(&folder, &w, "folder", &images, 0);
    let ids = made.join("ids.json").display().to_string();
    for (kind, path) in [
        ("list", made.join("list.txt")),
        ("tar", made.join("shard-*.tar")),
        ("parquet", made.join("hf/train-*.parquet")),
    ] {
        let out = d.join(kind);
        run(&out, &w, kind, &path, 0);
        run_python(
            "python/compare_sources.py",
            &[
                &folder.display().to_string(),
                &out.display().to_string(),
                &ids,
                "4",
            ],
        );
    }
    // a tar shard cut short: the complete members before the cut are processed, the cut reported
    let cut = d.join("cut-run");
    let report = run(&cut, &w, "tar", &made.join("cut/cut.tar"), 1);
    assert_eq!(report["counts"]["images_processed"], 1, "{report}");
    let reasons = report["skipped"].to_string();
    assert!(reasons.contains("cut short"), "{reasons}");
    // a parquet file with another schema is skipped with the reason, the good one processed
    let mixed = d.join("mixed");
    let report = run(&mixed, &w, "parquet", &made.join("hf/*.parquet"), 1);
    assert_eq!(report["counts"]["images_processed"], 4, "{report}");
    let reasons = report["skipped"].to_string();
    assert!(
        reasons.contains("wrong-schema.parquet") && reasons.contains("wrong schema"),
        "{reasons}"
    );
}

/// Images prepared for the network are torchvision's tensors to the bit, on random pixels:
/// `Resize` (Pillow's bilinear) then `CenterCrop`, as `tests/python/torchvision_preprocess.py`
/// computes them with Pillow: with `source.pillow = 13` (the default) as Pillow 13's own
/// `Image.resize` gives them, and with `12` as Pillow 12 resizes, horizontal pass first (two
/// one-axis resizes by Pillow). Tall shapes whose height shrinks by more than twice as many
/// pixels as their width are where the two differ; some must come out differently. Shrinking and enlarging, portrait and landscape, a long side that
/// truncation and rounding size differently, crop offsets where half-to-even rounding and
/// flooring differ, an image whose short side needs no resize, and crops larger than the image
/// (zero padding), and 24 random shapes. Each as a PNG (the random ones) and as a JPEG (the `image` crate's encoder, quality 90), and
/// a photo that ships in `data/photos` (a 4:2:0 JPEG): JPEGs decode through libjpeg-turbo's
/// code as in Pillow, where the `image` crate's decoder differs by a few levels.
#[test]
fn preprocessing_gives_torchvision_s_tensors() {
    use freqtag::model::{Pillow, Preprocess};
    let dir = tmp();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 56) as u8
    };
    // (width, height, short side, crop)
    let cases = [
        (97, 73, 64, 56),
        (73, 97, 64, 56),
        (23, 31, 64, 56),
        (64, 80, 64, 56),
        (41, 64, 32, 46),
        (50, 30, 32, 40),
        (300, 7, 16, 12),
        (32, 32, 32, 32),
        // the vertical pass first in Pillow 13: 60x150 -> 32x80, 45x200 -> 40x177
        (60, 150, 32, 30),
        (45, 200, 40, 36),
    ];
    let mut files = Vec::new();
    for (w, h, short, crop) in cases {
        let img = image::RgbImage::from_fn(w, h, |_, _| image::Rgb([next(), next(), next()]));
        let png = dir.path().join(format!("{w}x{h}.png"));
        img.save(&png).unwrap();
        let jpg = dir.path().join(format!("{w}x{h}.jpg"));
        let mut bytes = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 90)
            .encode_image(&img)
            .unwrap();
        std::fs::write(&jpg, bytes).unwrap();
        files.extend([(png, short, crop), (jpg, short, crop)]);
    }
    // and 24 random shapes, short sides and crops (PNG)
    for _ in 0..24 {
        let mut pick = |lo: u32, span: u32| lo + (next() as u32 * 256 + next() as u32) % span;
        let (w, h, short) = (pick(3, 200), pick(3, 200), pick(4, 96));
        let crop = pick(2, short + 12);
        let img = image::RgbImage::from_fn(w, h, |_, _| image::Rgb([next(), next(), next()]));
        let png = dir.path().join(format!("r{w}x{h}-{short}-{crop}.png"));
        img.save(&png).unwrap();
        files.push((png, short, crop));
    }
    files.push((root().join("data/photos/mpl_grace_hopper.jpg"), 256, 224));
    let mut apart = 0;
    for (file, short, crop) in files {
        let bytes = std::fs::read(&file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        let (out13, out12) = (
            dir.path().join(format!("{name}.13.bytes")),
            dir.path().join(format!("{name}.12.bytes")),
        );
        let (s, c) = (short.to_string(), crop.to_string());
        let f = file.display().to_string();
        let (o13, o12) = (out13.display().to_string(), out12.display().to_string());
        run_python(
            "python/torchvision_preprocess.py",
            &[&f, &s, &c, &o13, &o12],
        );
        let mut got = Vec::new();
        for (pillow, out) in [(Pillow::V13, &out13), (Pillow::V12, &out12)] {
            let pre = Preprocess {
                resize: short,
                crop,
                pillow,
                ..freqtag::model::Arch::MobileNetV2.preprocess()
            };
            let ours = freqtag::source::prepare_bytes(&bytes, pre).unwrap();
            let theirs = std::fs::read(out).unwrap();
            assert_eq!(ours.len(), theirs.len(), "{name}");
            let differ = ours
                .iter()
                .zip(&theirs)
                .filter(|(a, b)| **a != **b as f32 / 255.0)
                .count();
            assert_eq!(
                differ, 0,
                "{name} -> {short}, crop {crop}, Pillow {pillow:?}: {differ} values differ"
            );
            got.push(ours);
        }
        apart += (got[0] != got[1]) as usize;
    }
    // the orders are told apart: the tall shapes above (and random ones) resize differently
    assert!(
        apart >= 2,
        "only {apart} images differ between Pillow 12 and 13's orders"
    );
}
