//! Image sources, decoding and the model's preprocessing. Kinds (`source.kind`):
//! - `folder`: a folder read recursively (JPEG and PNG); id = path relative to the folder;
//! - `list`: a text file, one `path [label]` per line (paths relative to the list's folder);
//! - `tar`: WebDataset shards (`key.jpg`/`key.png`, label in `key.cls`), a file or a glob;
//! - `parquet`: files in the Hugging Face layout (`image` struct of `bytes` and `path`, integer
//!   `label`), a file or a glob.
//!
//! In: the `[source]` settings. Out: [`ImageRef`]s in a fixed order (the listing only reads names,
//! headers and labels; image bytes are read when an image is decoded), then per image RGB in
//! [0,1] as `[3, crop, crop]`, or the reason it was skipped.

mod listfile;
mod parquet_rows;
mod tar;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{LabelSource, SourceConfig, SourceKind};
use crate::model::Preprocess;

/// Where an image's bytes are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Locator {
    /// A file.
    File(PathBuf),
    /// A member of a tar shard: data offset and length.
    Tar {
        /// The shard.
        tar: PathBuf,
        /// Offset of the member's data.
        offset: u64,
        /// Length of the member's data.
        len: u64,
    },
    /// A row of a Parquet file in the Hugging Face layout.
    ParquetRow {
        /// The file.
        file: PathBuf,
        /// Row index in the file.
        row: u64,
    },
}

impl Locator {
    /// Reads the encoded image.
    pub fn read(&self) -> Result<Vec<u8>, String> {
        match self {
            Locator::File(p) => std::fs::read(p).map_err(|e| format!("cannot read: {e}")),
            Locator::Tar { tar, offset, len } => tar::read_member(tar, *offset, *len),
            Locator::ParquetRow { file, row } => parquet_rows::read_row(file, *row),
        }
    }
}

/// One image to process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    /// Position in the listing; images are sharded by it.
    pub seq: u64,
    /// Id: path relative to the source folder (`/`-separated), the path in a list file,
    /// `shard.tar/key.ext`, or `file.parquet#row`.
    pub id: String,
    /// Where its bytes are.
    pub loc: Locator,
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

/// Lists the images of a source, with labels; unreadable entries are skipped with a reason.
/// `path` is the resolved `source.path` (a folder, a list file, or a file or glob of shards).
pub fn list(path: &Path, cfg: &SourceConfig) -> (Vec<ImageRef>, Vec<Skipped>) {
    let (mut out, mut skipped) = match cfg.kind {
        SourceKind::Folder => list_folder(path, cfg),
        SourceKind::List => listfile::list(path, cfg),
        SourceKind::Tar => per_shard(path, cfg, tar::list),
        SourceKind::Parquet => per_shard(path, cfg, parquet_rows::list),
    };
    if cfg.kind != SourceKind::Folder {
        // labels from file names apply to any kind; `source` labels were set by the reader
        if cfg.labels == LabelSource::Filename {
            for r in &mut out {
                r.label = label_from_name(&r.id);
            }
        }
        let needs = cfg.labels != LabelSource::None;
        out.retain(|r| {
            let ok = !needs || r.label.is_some();
            if !ok {
                skipped.push(Skipped {
                    id: r.id.clone(),
                    reason: "no label found for this image (source.labels)".into(),
                });
            }
            ok
        });
    }
    if let Some(l) = cfg.limit {
        out.truncate(l);
    }
    for (i, r) in out.iter_mut().enumerate() {
        r.seq = i as u64;
    }
    (out, skipped)
}

/// The files a `tar`/`parquet` source path names: the file itself or the sorted matches of a glob.
pub fn shard_paths(path: &Path) -> Result<Vec<PathBuf>, String> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let pattern = path.to_string_lossy();
    let mut files: Vec<PathBuf> = glob::glob(&pattern)
        .map_err(|e| format!("bad glob pattern {pattern}: {e}"))?
        .filter_map(|p| p.ok())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("{pattern} matches no file"));
    }
    Ok(files)
}

/// Lists one shard into the images and skips found so far.
type ShardLister = fn(&Path, &SourceConfig, &mut Vec<ImageRef>, &mut Vec<Skipped>);

fn per_shard(path: &Path, cfg: &SourceConfig, each: ShardLister) -> (Vec<ImageRef>, Vec<Skipped>) {
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    match shard_paths(path) {
        Ok(files) => {
            for f in files {
                each(&f, cfg, &mut out, &mut skipped);
            }
        }
        Err(reason) => skipped.push(Skipped {
            id: path.display().to_string(),
            reason,
        }),
    }
    (out, skipped)
}

/// The file name of a shard, used in image ids.
fn shard_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| p.display().to_string())
}

fn list_folder(dir: &Path, cfg: &SourceConfig) -> (Vec<ImageRef>, Vec<Skipped>) {
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
            LabelSource::Filename | LabelSource::Source => label_from_name(&rel),
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
            loc: Locator::File(dir.join(&rel)),
            id: rel,
            label,
        });
        if cfg.limit.is_some_and(|l| out.len() >= l) {
            break;
        }
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

/// Reads and decodes the image at `loc` and applies `pre` (see [`prepare_bytes`]).
pub fn prepare(loc: &Locator, pre: Preprocess) -> Result<Vec<f32>, String> {
    prepare_bytes(&loc.read()?, pre)
}

/// Decodes `bytes` and applies `pre`: short side resized to `pre.resize` (triangle filter, as
/// bilinear with antialiasing), centre crop `pre.crop`; returns RGB in [0,1] as `[3, crop, crop]`.
pub fn prepare_bytes(bytes: &[u8], pre: Preprocess) -> Result<Vec<f32>, String> {
    if bytes.is_empty() {
        return Err("empty file".into());
    }
    let reader = || {
        image::ImageReader::new(std::io::Cursor::new(bytes))
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
        .into_rgb8();
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return Err("empty image".into());
    }
    let (nw, nh) = if w.min(h) == pre.resize {
        (w, h)
    } else if w <= h {
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
    Ok(resize_crop(&img, nw, nh, pre.crop))
}

/// The weights of a triangle filter (bilinear with antialiasing) resampling `len` pixels to
/// `new_len`, for the output pixels `range`: each one's first input pixel and its normalised
/// weights. The same f32 operations in the same order as the `image` crate's `resize` with
/// `FilterType::Triangle`, so that the results are its bits.
fn triangle_weights(len: u32, new_len: u32, range: std::ops::Range<u32>) -> Vec<(u32, Vec<f32>)> {
    let ratio = len as f32 / new_len as f32;
    let sratio = if ratio < 1.0 { 1.0 } else { ratio };
    let support = sratio;
    range
        .map(|o| {
            let centre = (o as f32 + 0.5) * ratio;
            let left = ((centre - support).floor() as i64).clamp(0, len as i64 - 1) as u32;
            let right =
                ((centre + support).ceil() as i64).clamp(left as i64 + 1, len as i64) as u32;
            let centre = centre - 0.5;
            let mut ws: Vec<f32> = (left..right)
                .map(|i| {
                    let x = (i as f32 - centre) / sratio;
                    if x.abs() < 1.0 {
                        1.0 - x.abs()
                    } else {
                        0.0
                    }
                })
                .collect();
            let sum = ws.iter().fold(0.0f32, |s, w| s + w);
            for w in &mut ws {
                *w /= sum;
            }
            (left, ws)
        })
        .collect()
}

/// `img` resized to `nw x nh` with a triangle filter, then its centre `crop x crop` (pixels past
/// a smaller image repeat its last row or column), as RGB in [0,1] `[3, crop, crop]`. Only the
/// pixels inside the crop are resampled, and only from the input rows and columns they need:
/// the same values as the `image` crate's `resize` (its two passes, vertical then horizontal,
/// with its f32 weights, sums, clamping and rounding) followed by the crop, at a fraction of
/// the work (an ImageNet photo resized to 256 and cropped to 224: about a third).
fn resize_crop(img: &image::RgbImage, nw: u32, nh: u32, crop: u32) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let c = crop;
    let n = (c * c) as usize;
    let mut out = vec![0f32; 3 * n];
    let (x0, y0) = ((nw.saturating_sub(c)) / 2, (nh.saturating_sub(c)) / 2);
    // the resized rows and columns the crop reads
    let (x1, y1) = ((x0 + c).min(nw), (y0 + c).min(nh));
    let px = img.as_raw();
    // (resized pixel's row, column) -> 3 values, for the crop's rows and columns only
    let resized: Vec<[u8; 3]> = if (nw, nh) == (w, h) {
        (y0..y1)
            .flat_map(|y| (x0..x1).map(move |x| (y, x)))
            .map(|(y, x)| {
                let i = 3 * (y as usize * w as usize + x as usize);
                [px[i], px[i + 1], px[i + 2]]
            })
            .collect()
    } else {
        let cols = triangle_weights(w, nw, x0..x1);
        let rows = triangle_weights(h, nh, y0..y1);
        // the input columns the crop's columns read
        let lo = cols.iter().map(|(l, _)| *l).min().unwrap_or(0);
        let hi = cols
            .iter()
            .map(|(l, ws)| l + ws.len() as u32)
            .max()
            .unwrap_or(0);
        let span = (hi - lo) as usize;
        // vertical pass: f32 sums of u8 inputs, per resized row and input column
        let mut tmp = vec![0f32; rows.len() * span * 3];
        for ((top, ws), t) in rows.iter().zip(tmp.chunks_exact_mut(span * 3)) {
            for (k, wt) in ws.iter().enumerate() {
                let row = &px[3 * ((*top as usize + k) * w as usize + lo as usize)..][..span * 3];
                for (t, p) in t.iter_mut().zip(row) {
                    *t += *p as f32 * wt;
                }
            }
        }
        // horizontal pass, clamped and rounded to u8 as the `image` crate does
        let mut res = Vec::with_capacity(rows.len() * cols.len());
        for t in tmp.chunks_exact(span * 3) {
            for (left, ws) in &cols {
                let mut s = [0f32; 3];
                for (k, wt) in ws.iter().enumerate() {
                    let p = &t[3 * (*left - lo) as usize + 3 * k..][..3];
                    for (s, p) in s.iter_mut().zip(p) {
                        *s += p * wt;
                    }
                }
                res.push(s.map(|v| v.clamp(0.0, 255.0).round() as u8));
            }
        }
        res
    };
    let rw = (x1 - x0) as usize;
    for y in 0..c {
        let ry = ((y0 + y).min(nh - 1) - y0) as usize;
        for x in 0..c {
            let rx = ((x0 + x).min(nw - 1) - x0) as usize;
            let p = resized[ry * rw + rx];
            let i = (y * c + x) as usize;
            for ch in 0..3 {
                out[ch * n + i] = p[ch] as f32 / 255.0;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The crop-aware resize gives the bits of the `image` crate's triangle `resize` followed by
    /// the centre crop (the way it was done before), on random pixels: down- and upsampling,
    /// portrait and landscape, odd sizes, single rows and columns, no resize at all, and crops
    /// larger than the resized image.
    #[test]
    fn resize_crop_gives_the_image_crate_bits() {
        fn reference(img: &image::RgbImage, nw: u32, nh: u32, c: u32) -> Vec<f32> {
            let img = if (nw, nh) == img.dimensions() {
                img.clone()
            } else {
                image::imageops::resize(img, nw, nh, image::imageops::FilterType::Triangle)
            };
            let (w, h) = img.dimensions();
            let (x0, y0) = ((w.saturating_sub(c)) / 2, (h.saturating_sub(c)) / 2);
            let n = (c * c) as usize;
            let mut out = vec![0f32; 3 * n];
            for y in 0..c {
                for x in 0..c {
                    let p = img.get_pixel((x0 + x).min(w - 1), (y0 + y).min(h - 1)).0;
                    for ch in 0..3 {
                        out[ch * n + (y * c + x) as usize] = p[ch] as f32 / 255.0;
                    }
                }
            }
            out
        }
        let mut seed = 11u64;
        let cases: [(u32, u32, u32, u32, u32); 14] = [
            // (w, h, nw, nh, crop)
            (500, 375, 341, 256, 224),
            (375, 500, 256, 341, 224),
            (640, 427, 384, 256, 224),
            (512, 512, 256, 256, 224),
            (256, 300, 256, 300, 224),
            (100, 80, 320, 256, 224),
            (33, 31, 36, 34, 32),
            (1, 1, 256, 256, 224),
            (1, 300, 256, 76800, 224),
            (300, 1, 76800, 256, 224),
            (32, 32, 32, 32, 32),
            (40, 30, 34, 25, 32),
            (301, 257, 299, 256, 300),
            (7, 5, 3, 2, 4),
        ];
        for (w, h, nw, nh, c) in cases {
            let img = image::RgbImage::from_fn(w, h, |_, _| {
                let mut b = [0u8; 3];
                for v in &mut b {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    *v = (seed >> 56) as u8;
                }
                image::Rgb(b)
            });
            let got = resize_crop(&img, nw, nh, c);
            let want = reference(&img, nw, nh, c);
            let same = got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{w}x{h} -> {nw}x{nh}, crop {c}");
        }
    }

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
