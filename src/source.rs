//! Image sources: a folder read recursively (JPEG and PNG), labels from class sub-folders or
//! file names, decoding and the model's preprocessing.
//!
//! In: the `[source]` settings. Out: [`ImageRef`]s in a fixed order (sorted paths; the image id is
//! the path relative to the folder), then per image RGB in [0,1] as `[3, crop, crop]`, or the
//! reason it was skipped.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use serde::{Deserialize, Serialize};

use crate::config::{LabelSource, SourceConfig};
use crate::model::Preprocess;

/// One image to process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    /// Position in the sorted listing; images are sharded by it.
    pub seq: u64,
    /// Path relative to the source folder, `/`-separated.
    pub id: String,
    /// Full path.
    pub path: PathBuf,
    /// Label, if the source gives one.
    pub label: Option<i64>,
}

/// An input that was not processed, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// Image id (relative path) or the path itself.
    pub id: String,
    /// What was wrong.
    pub reason: String,
}

/// Lists the images of `dir` in sorted order, with labels; unreadable entries are skipped.
pub fn list(dir: &Path, cfg: &SourceConfig) -> (Vec<ImageRef>, Vec<Skipped>) {
    let mut files = Vec::new();
    let mut skipped = Vec::new();
    walk(dir, dir, &mut files, &mut skipped);
    let exts: Vec<String> = cfg.extensions.iter().map(|e| e.to_lowercase()).collect();
    files.retain(|rel| {
        let ext = Path::new(rel)
            .extension()
            .map(|e| e.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        exts.contains(&ext)
    });
    files.sort();
    // class index = position of the top-level folder among the sorted folders holding images
    let classes: Vec<String> = if cfg.labels == LabelSource::Folders {
        let mut c: Vec<String> = files
            .iter()
            .filter_map(|rel| rel.split_once('/').map(|(d, _)| d.to_string()))
            .collect();
        c.sort();
        c.dedup();
        c
    } else {
        Vec::new()
    };
    let mut out = Vec::new();
    for rel in files {
        let label = match cfg.labels {
            LabelSource::None => None,
            LabelSource::Folders => rel
                .split_once('/')
                .and_then(|(d, _)| classes.iter().position(|c| c == d))
                .map(|i| i as i64),
            LabelSource::Filename => label_from_name(&rel),
        };
        if cfg.labels != LabelSource::None && label.is_none() {
            skipped.push(Skipped {
                id: rel.clone(),
                reason: format!(
                    "no label: source.labels = \"{}\" finds none for this file",
                    match cfg.labels {
                        LabelSource::Folders => "folders",
                        _ => "filename",
                    }
                ),
            });
            continue;
        }
        out.push(ImageRef {
            seq: 0,
            path: dir.join(&rel),
            id: rel,
            label,
        });
        if cfg.limit.is_some_and(|l| out.len() >= l) {
            break;
        }
    }
    for (i, r) in out.iter_mut().enumerate() {
        r.seq = i as u64;
    }
    (out, skipped)
}

fn walk(root: &Path, dir: &Path, files: &mut Vec<String>, skipped: &mut Vec<Skipped>) {
    let rel = |p: &Path| {
        p.strip_prefix(root)
            .unwrap_or(p)
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/")
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            skipped.push(Skipped {
                id: rel(dir),
                reason: format!("cannot read folder: {e}"),
            });
            return;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => walk(root, &path, files, skipped),
            Ok(_) => files.push(rel(&path)),
            Err(e) => skipped.push(Skipped {
                id: rel(&path),
                reason: format!("cannot read (broken link or no permission): {e}"),
            }),
        }
    }
}

/// The integer at the end of the file stem: `cifar10_03_0.png` -> 0, `img-17.jpg` -> 17.
pub fn label_from_name(rel: &str) -> Option<i64> {
    let stem = Path::new(rel).file_stem()?.to_string_lossy().to_string();
    let digits: String = stem
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_digit())
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    if digits.is_empty() {
        return None;
    }
    digits.parse().ok()
}

/// Largest image decoded, in pixels; larger ones are refused before their pixels are allocated.
pub const MAX_PIXELS: u64 = 100_000_000;

/// Decodes `path` and applies `pre`: short side resized to `pre.resize` (triangle filter, as
/// bilinear with antialiasing), centre crop `pre.crop`; returns RGB in [0,1] as `[3, crop, crop]`.
pub fn prepare(path: &Path, pre: Preprocess) -> Result<Vec<f32>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    if bytes.is_empty() {
        return Err("empty file".into());
    }
    let reader = || {
        image::ImageReader::new(std::io::Cursor::new(&bytes[..]))
            .with_guessed_format()
            .map_err(|e| format!("cannot read: {e}"))
    };
    let format = reader()?.format();
    match format {
        Some(image::ImageFormat::Jpeg) => {
            // a JPEG cut short still decodes (grey fill) in lenient decoders: refuse it here
            let tail = &bytes[bytes.len().saturating_sub(64)..];
            if !tail.windows(2).any(|w| w == [0xff, 0xd9]) {
                return Err(
                    "truncated JPEG (no end-of-image marker): the file is incomplete".into(),
                );
            }
        }
        Some(image::ImageFormat::Png) => {}
        _ => return Err("not a JPEG or PNG image (unrecognised content)".into()),
    }
    let (w, h) = reader()?
        .into_dimensions()
        .map_err(|e| format!("cannot read the image header: {e}"))?;
    if w as u64 * h as u64 > MAX_PIXELS {
        return Err(format!(
            "{w}x{h} pixels is above the limit of {MAX_PIXELS} pixels (decode bomb guard)"
        ));
    }
    let img = reader()?
        .decode()
        .map_err(|e| format!("cannot decode: {e}"))?
        .to_rgb8();
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return Err("empty image".into());
    }
    let img = if w.min(h) != pre.resize {
        let (nw, nh) = if w <= h {
            (
                pre.resize,
                ((h as u64 * pre.resize as u64 + w as u64 / 2) / w as u64).max(1) as u32,
            )
        } else {
            (
                ((w as u64 * pre.resize as u64 + h as u64 / 2) / h as u64).max(1) as u32,
                pre.resize,
            )
        };
        image::imageops::resize(&img, nw, nh, FilterType::Triangle)
    } else {
        img
    };
    let (w, h) = img.dimensions();
    let c = pre.crop;
    let (x0, y0) = ((w.saturating_sub(c)) / 2, (h.saturating_sub(c)) / 2);
    let n = (c * c) as usize;
    let mut out = vec![0f32; 3 * n];
    for y in 0..c {
        for x in 0..c {
            let p = img.get_pixel((x0 + x).min(w - 1), (y0 + y).min(h - 1)).0;
            let i = (y * c + x) as usize;
            for ch in 0..3 {
                out[ch * n + i] = p[ch] as f32 / 255.0;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_from_sorted_class_folders() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "b/y.png",
            "b/z.JPG",
            "a/x.png",
            "top.png",
            "c/notes.txt",
            "d/e/deep.jpg",
        ] {
            let p = dir.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"").unwrap();
        }
        let cfg: SourceConfig = toml::from_str("path = \".\"\nlabels = \"folders\"").unwrap();
        let (images, skipped) = list(dir.path(), &cfg);
        let got: Vec<(&str, Option<i64>, u64)> = images
            .iter()
            .map(|r| (r.id.as_str(), r.label, r.seq))
            .collect();
        // c holds no image, so it is not a class; d/e/deep.jpg belongs to class d
        assert_eq!(
            got,
            vec![
                ("a/x.png", Some(0), 0),
                ("b/y.png", Some(1), 1),
                ("b/z.JPG", Some(1), 2),
                ("d/e/deep.jpg", Some(2), 3)
            ]
        );
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].id, "top.png");
        assert!(skipped[0].reason.contains("no label"));
    }

    #[test]
    fn labels_from_file_names() {
        assert_eq!(label_from_name("cifar10_03_0.png"), Some(0));
        assert_eq!(label_from_name("a/imagenet_00_243.jpg"), Some(243));
        assert_eq!(label_from_name("cat.png"), None);
    }
}
