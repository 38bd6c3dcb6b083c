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
    let (images, skipped, _) = list_checked(path, cfg);
    (images, skipped)
}

/// As [`list`], with a warning where the labels look wrong (see [`numbered_files_warning`]).
pub fn list_checked(
    path: &Path,
    cfg: &SourceConfig,
) -> (Vec<ImageRef>, Vec<Skipped>, Option<String>) {
    let mut warning = None;
    let (mut out, mut skipped) = match cfg.kind {
        SourceKind::Folder => list_folder(path, cfg, &mut warning),
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
    (out, skipped, warning)
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

fn list_folder(
    dir: &Path,
    cfg: &SourceConfig,
    warning: &mut Option<String>,
) -> (Vec<ImageRef>, Vec<Skipped>) {
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
    if cfg.labels == LabelSource::Filename {
        *warning = numbered_files_warning(&files);
    }
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

/// A warning where `source.labels = "filename"` looks like a mistake, from the relative paths
/// of all a folder's images (before `source.limit`): they sit in two or more sub-folders, and
/// the numbers ending their file names give more labels than there are sub-folders, as in a
/// class-folder dataset whose files are numbered (`airplane/0000.jpg` gets label 0, and so
/// does `automobile/0000.jpg`). Its labels are then wrong, and with `output.per_class` each of
/// them keeps its own exact sums, so memory grows with the number of files (the paper pipeline
/// on 450 CIFAR-10 test images in class folders: 1.6 GB, against 0.2 GB with `folders`).
fn numbered_files_warning(files: &[String]) -> Option<String> {
    let folders: std::collections::BTreeSet<&str> = files
        .iter()
        .filter_map(|f| f.split_once('/').map(|(d, _)| d))
        .collect();
    if folders.len() < 2 {
        return None;
    }
    let labels: std::collections::BTreeSet<i64> =
        files.iter().filter_map(|f| label_from_name(f)).collect();
    if labels.len() <= folders.len() {
        return None;
    }
    let example = files
        .iter()
        .filter(|f| f.contains('/'))
        .find_map(|f| label_from_name(f).map(|l| format!(" ({f} has label {l})")))
        .unwrap_or_default();
    Some(format!(
        "source.labels = \"filename\" takes each label from the number ending the file name, \
         which gives the {} images of {} sub-folders {} different labels{example}: if the \
         sub-folders are the classes, set source.labels = \"folders\" (with \
         output.per_class, every label keeps its own exact score sums, so memory grows with \
         the number of labels)",
        files.len(),
        folders.len(),
        labels.len()
    ))
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

/// Decodes `bytes` (JPEGs through libjpeg-turbo's code, see `decode_jpeg`) and applies `pre`
/// as torchvision's `Resize(pre.resize)` + `CenterCrop(pre.crop)` + `ToTensor` do on a PIL image
/// (see `resize_crop`); returns RGB in [0,1] as `[3, crop, crop]`.
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
    let libjpeg = match format {
        Some(image::ImageFormat::Jpeg) => decode_jpeg(bytes)?,
        _ => None,
    };
    let img = match libjpeg {
        Some(img) => img,
        None => reader()?
            .decode()
            .map_err(|e| format!("cannot decode: {e}"))?
            .into_rgb8(),
    };
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return Err("empty image".into());
    }
    let (nw, nh) = resized_size(w, h, pre.resize);
    let vertical_first = pre.pillow.vertical_first(w, h, nw, nh);
    Ok(resize_crop(&img, nw, nh, pre.crop, vertical_first))
}

/// A JPEG decoded as Pillow and torchvision decode it, by libjpeg-turbo's code (through
/// mozjpeg): the same pixels to the bit. The `image` crate's decoder (zune-jpeg) upsamples
/// 4:2:0 colour and rounds the inverse DCT differently, a few levels apart in a fifth of the
/// pixels, enough to move spectra by a quarter of a neuron's peak (README, "Inputs"). `None`
/// for colour spaces libjpeg does not turn into RGB (CMYK, YCCK), which the `image` crate
/// decodes instead. libjpeg's fatal errors unwind (mozjpeg resumes the unwind without a panic
/// message) and come back as the reason.
fn decode_jpeg(bytes: &[u8]) -> Result<Option<image::RgbImage>, String> {
    let decode = || -> std::io::Result<Option<(usize, usize, Vec<u8>)>> {
        let d = mozjpeg::Decompress::new_mem(bytes)?;
        if matches!(
            d.color_space(),
            mozjpeg::ColorSpace::JCS_CMYK | mozjpeg::ColorSpace::JCS_YCCK
        ) {
            return Ok(None);
        }
        let (w, h) = (d.width(), d.height());
        let mut started = d.rgb()?;
        let px = started.read_scanlines::<u8>()?;
        started.finish()?;
        Ok(Some((w, h, px)))
    };
    let decoded = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode)) {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => return Err(format!("cannot decode: {e}")),
        Err(payload) => {
            let why = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("libjpeg failed");
            return Err(format!("cannot decode: {why}"));
        }
    };
    let Some((w, h, px)) = decoded else {
        return Ok(None);
    };
    image::RgbImage::from_raw(w as u32, h as u32, px)
        .map(Some)
        .ok_or_else(|| format!("cannot decode: {w}x{h} pixels but fewer values"))
}

/// The size of a `w x h` image whose short side is resized to `short`, as torchvision's
/// `Resize(short)` computes it: the long side scaled and truncated (`int(short * long / s)`).
fn resized_size(w: u32, h: u32, short: u32) -> (u32, u32) {
    let scaled = |long: u32, s: u32| ((long as u64 * short as u64) / s as u64).max(1) as u32;
    if w <= h {
        (short, scaled(h, w))
    } else {
        (scaled(w, h), short)
    }
}

/// Where a centre crop of `crop` starts in `len` pixels, as torchvision's `CenterCrop` puts it:
/// `round((len - crop) / 2)` with Python's rounding (half to even); negative where the image
/// is smaller than the crop, which torchvision pads with zeros, `(crop - len) // 2` before it.
fn centre_offset(len: u32, crop: u32) -> i64 {
    if len >= crop {
        let d = (len - crop) as i64;
        let k = d / 2;
        if d % 2 == 1 && k % 2 == 1 {
            k + 1
        } else {
            k
        }
    } else {
        -(((crop - len) / 2) as i64)
    }
}

/// Fixed-point fraction bits of the resampling weights, as Pillow has them (32 - 8 - 2).
const WEIGHT_BITS: u32 = 22;

/// The weights of Pillow's bilinear resampling (a triangle filter widened by the scale when
/// shrinking, so antialiased) of `len` pixels to `new_len`, for the output pixels `range`:
/// each one's first input pixel and its weights in fixed point. Computed as Pillow computes
/// them (float64 weights normalised to sum 1, then rounded to `WEIGHT_BITS`), so that the
/// resized pixels are Pillow's to the bit.
fn bilinear_weights(len: u32, new_len: u32, range: std::ops::Range<u32>) -> Vec<(u32, Vec<i32>)> {
    let scale = len as f64 / new_len as f64;
    let widen = scale.max(1.0);
    // Pillow multiplies by the reciprocal, which can round apart from dividing
    let narrow = 1.0 / widen;
    range
        .map(|o| {
            let centre = (o as f64 + 0.5) * scale;
            // truncation toward zero, then clamped, as Pillow's C casts do
            let first = ((centre - widen + 0.5) as i64).max(0);
            let end = ((centre + widen + 0.5) as i64).min(len as i64);
            let mut ws: Vec<f64> = (first..end)
                .map(|i| {
                    let x = ((i as f64 - centre + 0.5) * narrow).abs();
                    if x < 1.0 {
                        1.0 - x
                    } else {
                        0.0
                    }
                })
                .collect();
            let sum = ws.iter().fold(0.0f64, |s, w| s + w);
            if sum != 0.0 {
                for w in &mut ws {
                    *w /= sum;
                }
            }
            let one = (1u64 << WEIGHT_BITS) as f64;
            let fixed = ws
                .iter()
                .map(|&w| (w * one + if w < 0.0 { -0.5 } else { 0.5 }) as i32)
                .collect();
            (first as u32, fixed)
        })
        .collect()
}

/// One resampled value: the fixed-point sum rounded and clamped to a byte, as Pillow does.
fn to_byte(sum: i64) -> u8 {
    (sum >> WEIGHT_BITS).clamp(0, 255) as u8
}

/// One resampled pixel: the weighted sum of `ks` over the pixels `at(0)`, `at(1)`..., rounded
/// and clamped into bytes as Pillow does.
#[inline(always)]
fn resample(ks: &[i32], at: impl Fn(u32) -> [u8; 3]) -> [u8; 3] {
    let mut s = [1i64 << (WEIGHT_BITS - 1); 3];
    for (i, k) in ks.iter().enumerate() {
        for (s, p) in s.iter_mut().zip(at(i as u32)) {
            *s += p as i64 * *k as i64;
        }
    }
    s.map(to_byte)
}

/// The input pixels `weights` read: from the first one's first to the last one's end.
fn support(weights: &[(u32, Vec<i32>)]) -> std::ops::Range<u32> {
    let lo = weights.iter().map(|(f, _)| *f).min().unwrap_or(0);
    let hi = weights
        .iter()
        .map(|(f, k)| f + k.len() as u32)
        .max()
        .unwrap_or(0);
    lo..hi
}

/// `img` resized to `nw x nh` with Pillow's bilinear filter, then its centre `crop x crop` as
/// torchvision's `CenterCrop` takes it (zeros where the image is smaller than the crop), as
/// RGB in [0,1] `[3, crop, crop]`: the tensor of torchvision's `Resize` + `CenterCrop` +
/// `ToTensor` on a PIL image, to the bit. Like Pillow, one pass into bytes, then the other:
/// horizontal first, or vertical first with `vertical_first` (Pillow 13 for some shapes, see
/// [`crate::model::Pillow`]); an axis whose size does not change is not resampled. Only the
/// pixels inside the crop are computed, from the input rows and columns they need (an ImageNet
/// photo resized to 256 and cropped to 224: about a third of the work of resizing it whole).
fn resize_crop(
    img: &image::RgbImage,
    nw: u32,
    nh: u32,
    crop: u32,
    vertical_first: bool,
) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let c = crop as usize;
    let n = c * c;
    let mut out = vec![0f32; 3 * n];
    let (left, top) = (centre_offset(nw, crop), centre_offset(nh, crop));
    // the resized columns and rows inside the crop
    let cols = left.max(0) as u32..(left + crop as i64).min(nw as i64) as u32;
    let rows = top.max(0) as u32..(top + crop as i64).min(nh as i64) as u32;
    let across = (nw != w).then(|| bilinear_weights(w, nw, cols.clone()));
    let down = (nh != h).then(|| bilinear_weights(h, nh, rows.clone()));
    let px = img.as_raw();
    let pixel = |x: u32, y: u32| {
        let i = 3 * (y as usize * w as usize + x as usize);
        [px[i], px[i + 1], px[i + 2]]
    };
    let mut put = |r: usize, j: usize, p: [u8; 3]| {
        let oy = (rows.start as i64 + r as i64 - top) as usize;
        let ox = (cols.start as i64 + j as i64 - left) as usize;
        let i = oy * c + ox;
        for (ch, v) in p.iter().enumerate() {
            out[ch * n + i] = *v as f32 / 255.0;
        }
    };
    if vertical_first {
        // vertical pass: the crop's rows of every input column the horizontal pass reads
        let needed = across.as_deref().map_or(cols.clone(), support);
        let span = needed.len();
        let mut tall: Vec<[u8; 3]> = Vec::with_capacity(rows.len() * span);
        for (r, y) in rows.clone().enumerate() {
            tall.extend(needed.clone().map(|x| match &down {
                None => pixel(x, y),
                Some(ws) => resample(&ws[r].1, |i| pixel(x, ws[r].0 + i)),
            }));
        }
        // horizontal pass, into the crop
        for r in 0..rows.len() {
            let line = &tall[r * span..][..span];
            for (j, x) in cols.clone().enumerate() {
                let p = match &across {
                    None => line[(x - needed.start) as usize],
                    Some(ws) => {
                        let (first, ks) = &ws[j];
                        resample(ks, |i| line[(first + i - needed.start) as usize])
                    }
                };
                put(r, j, p);
            }
        }
        return out;
    }
    // horizontal pass: the crop's columns of every input row the vertical pass reads
    let needed = down.as_deref().map_or(rows.clone(), support);
    let span = cols.len();
    let mut wide: Vec<[u8; 3]> = Vec::with_capacity(needed.len() * span);
    for y in needed.clone() {
        // along the row's contiguous bytes, not through `resample` and `pixel`: 6-8 % of the
        // resize's time (`cargo bench --bench analysis`)
        let row = &px[3 * y as usize * w as usize..][..3 * w as usize];
        wide.extend(cols.clone().enumerate().map(|(j, x)| match &across {
            None => pixel(x, y),
            Some(ws) => {
                let (first, ks) = &ws[j];
                let mut s = [1i64 << (WEIGHT_BITS - 1); 3];
                for (k, p) in ks.iter().zip(row[3 * *first as usize..].chunks_exact(3)) {
                    for (s, p) in s.iter_mut().zip(p) {
                        *s += *p as i64 * *k as i64;
                    }
                }
                s.map(to_byte)
            }
        }));
    }
    // vertical pass, into the crop
    for (r, y) in rows.clone().enumerate() {
        for j in 0..span {
            let p = match &down {
                None => wide[(y - needed.start) as usize * span + j],
                Some(ws) => {
                    let (first, ks) = &ws[r];
                    resample(ks, |i| wide[(first + i - needed.start) as usize * span + j])
                }
            };
            put(r, j, p);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes and crop offsets as torchvision computes them: the long side truncated, the crop
    /// centred with Python's half-to-even rounding, negative (zero padding) where the image is
    /// smaller than the crop. The pixels themselves are checked against Pillow in the
    /// integration tests (`preprocessing_gives_torchvision_s_tensors`).
    /// Pillow 13's choice of first pass (`ImagingResampleInner`): vertical first where the
    /// height shrinks by more than twice as many pixels as the width; Pillow 12 only for images
    /// more than 100 times taller than wide.
    #[test]
    fn pillow_13_runs_the_vertical_pass_first_for_tall_shrinks() {
        use crate::model::Pillow;
        let v = |w, h, nw, nh| Pillow::V13.vertical_first(w, h, nw, nh);
        // the one ImageNet sample of 1 000 whose bytes differ between the versions: 137 rows
        // against 2 x 64 columns
        assert!(v(320, 685, 256, 548));
        assert!(!v(320, 650, 256, 578));
        // at exactly twice, horizontal first
        assert!(!v(300, 600, 200, 400));
        assert!(v(300, 601, 200, 400));
        // common photo shapes: horizontal first
        assert!(!v(500, 375, 341, 256));
        assert!(!v(375, 500, 256, 341));
        // the height grows, or the width grows while the height shrinks a little
        assert!(!v(100, 50, 80, 60));
        assert!(v(50, 100, 60, 99));
        assert!(!v(50, 100, 60, 100));
        assert!(!Pillow::V12.vertical_first(320, 685, 256, 548));
        // Pillow 12's exception (`Image.resize`): more than 100 times taller than wide
        assert!(Pillow::V12.vertical_first(3, 301, 2, 200));
        assert!(!Pillow::V12.vertical_first(3, 300, 2, 200));
        assert!(!Pillow::V12.vertical_first(3, 301, 2, 400));
    }

    #[test]
    fn sizes_and_crops_follow_torchvision() {
        // int(256 * 500 / 375) = 341; int(32 * 64 / 41) = 49 (rounding would give 50)
        assert_eq!(resized_size(500, 375, 256), (341, 256));
        assert_eq!(resized_size(375, 500, 256), (256, 341));
        assert_eq!(resized_size(41, 64, 32), (32, 49));
        assert_eq!(resized_size(256, 256, 256), (256, 256));
        assert_eq!(resized_size(1, 1000, 2), (2, 2000));
        // round(117 / 2) = 58, round(3 / 2) = 2, round(5 / 2) = 2, round(7 / 2) = 4
        assert_eq!(centre_offset(341, 224), 58);
        assert_eq!(centre_offset(49, 46), 2);
        assert_eq!(centre_offset(51, 46), 2);
        assert_eq!(centre_offset(53, 46), 4);
        assert_eq!(centre_offset(224, 224), 0);
        // smaller than the crop: (46 - 32) // 2 = 7 columns of zeros before it
        assert_eq!(centre_offset(32, 46), -7);
        assert_eq!(centre_offset(33, 46), -6);
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

    #[test]
    fn numbered_files_in_class_folders_are_warned_about() {
        let listed = |files: &[&str], labels: &str| {
            let dir = tempfile::tempdir().unwrap();
            for f in files {
                let p = dir.path().join(f);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, b"").unwrap();
            }
            let cfg: SourceConfig =
                toml::from_str(&format!("path = \".\"\nlabels = \"{labels}\"")).unwrap();
            let cfg = SourceConfig {
                limit: Some(1),
                ..cfg
            };
            list_checked(dir.path(), &cfg).2
        };
        // CIFAR-10's test set in class folders: three labels from two folders
        let numbered = [
            "airplane/0000.jpg",
            "airplane/0001.jpg",
            "automobile/0002.jpg",
        ];
        let w = listed(&numbered, "filename").expect("a warning");
        // from all the files, not only the first (source.limit)
        assert!(
            w.contains("3 images of 2 sub-folders 3 different labels"),
            "{w}"
        );
        assert!(w.contains("airplane/0000.jpg has label 0"), "{w}");
        assert!(w.contains("source.labels = \"folders\""), "{w}");
        // the same files with the folders' labels, or none
        assert_eq!(listed(&numbered, "folders"), None);
        assert_eq!(listed(&numbered, "none"), None);
        // labelled file names in class folders: as many labels as folders
        let named = [
            "cat/cifar10_00_3.png",
            "cat/cifar10_01_3.png",
            "dog/cifar10_02_5.png",
        ];
        assert_eq!(listed(&named, "filename"), None);
        // numbered files in one folder, or none: nothing to suggest
        assert_eq!(
            listed(&["a/cifar10_00_3.png", "a/cifar10_01_4.png"], "filename"),
            None
        );
        assert_eq!(
            listed(&["cifar10_00_3.png", "cifar10_01_4.png"], "filename"),
            None
        );
    }
}
