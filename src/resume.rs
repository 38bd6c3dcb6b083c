//! Committed segments and `--resume`. A run works in `OUT/.freqtag/`: each worker commits its
//! rows in segments (one chunk of images: parts written, fsynced and renamed, then one manifest
//! line, fsynced, naming the parts and the images they cover). After a crash, a `kill -9` or
//! Ctrl-C, `--resume` keeps the committed segments, deletes parts no manifest line names, skips the
//! committed images and recomputes their aggregates from the committed `neurons` parts (the same
//! f64 values, so the totals equal an uninterrupted run's exactly). When the run completes, its
//! tables replace the output tables and the work folder is removed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use arrow_array::{Array, Float64Array, Int32Array, Int64Array, StringArray};
use differential_dataflow::difference::{Monoid, Semigroup};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};

use crate::config::Plan;
use crate::error::{Error, Result};
use crate::score::{Acc, Fixed, LIMBS, SCORE_NAMES};
use crate::sink::ScoreKey;
use crate::source::Skipped;

/// Name of the work folder inside the output folder.
pub const WORK: &str = ".freqtag";

/// One worker's committed segment of a chunk. A manifest line holds a chunk's segments of all
/// the workers of a process, committed together (they share the chunk's sums); a line of one
/// segment, as written before session 19, is still read.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Segment {
    /// Part file name shared by the segment's tables.
    pub part: String,
    /// Ids of the images whose rows the parts hold.
    pub images: Vec<String>,
    /// Inputs of the segment that were skipped.
    pub skipped: Vec<Skipped>,
    /// The sums file (in the work folder's `sums/`) with this segment's share of the chunk's
    /// sums, when `output.neurons` is off; absent in lines written before session 19, whose
    /// sums file is named after the part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sums: Option<String>,
}

/// The segments of a manifest line: a list, or one segment (lines before session 19). A line
/// torn by a crash parses as neither: its segments were not committed.
fn parse_line(line: &str) -> Option<Vec<Segment>> {
    serde_json::from_str::<Vec<Segment>>(line)
        .or_else(|_| serde_json::from_str::<Segment>(line).map(|s| vec![s]))
        .ok()
}

#[derive(Debug, Serialize, Deserialize)]
struct Stamp {
    attempts: u32,
    pipeline: serde_json::Value,
}

/// The work folder of a run.
#[derive(Debug, Clone)]
pub struct WorkDir {
    root: PathBuf,
    /// This attempt's number (0 for a fresh run), part of every file name.
    pub attempt: u32,
}

/// What a resumed run starts from.
#[derive(Debug, Default)]
pub struct Resumed {
    /// Images already committed (or skipped) by earlier attempts.
    pub done: HashSet<String>,
    /// Inputs skipped by earlier attempts.
    pub skipped: Vec<Skipped>,
    /// The committed `neurons` parts, whose rows seed the aggregates (`output.neurons` on).
    pub neuron_parts: Vec<PathBuf>,
    /// The committed segments' sums (`output.neurons` off), which seed the aggregates.
    pub sum_files: Vec<PathBuf>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(path, e)
}

fn flatten(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

impl WorkDir {
    /// Where the tables are staged.
    pub fn tables(&self) -> PathBuf {
        self.root.join("tables")
    }

    /// Where the segments' sums are kept (`output.neurons` off).
    pub fn sums_dir(&self) -> PathBuf {
        self.root.join("sums")
    }

    /// The part name of `worker`'s segment `seg` in this attempt.
    pub fn part_name(&self, worker: usize, seg: u64) -> String {
        format!("part-a{:02}-w{worker:05}-s{seg:06}.parquet", self.attempt)
    }

    /// Starts a fresh run in `out`. An unfinished run there is never thrown away silently: the
    /// user continues it with `--resume` or removes its work folder.
    ///
    /// The work folder appears whole: it is set up under another name, stamped, then renamed
    /// into place, so a run killed while starting leaves no half work folder that would be
    /// taken for an unfinished run.
    pub fn fresh(out: &Path, plan: &Plan) -> Result<WorkDir> {
        let root = out.join(WORK);
        if root.exists() {
            if root.join("stamp.json").exists() {
                return Err(Error::Output {
                    file: out.to_path_buf(),
                    msg: format!(
                        "an unfinished run is in {}: continue it with --resume, or remove that folder to start over",
                        root.display()
                    ),
                });
            }
            // no stamp: nothing to resume (a run of an earlier version killed while it set
            // up its work folder, or while it removed it after its tables were published)
            tracing::warn!(folder = %root.display(), "removing a work folder without its stamp.json: it holds no run to resume");
            std::fs::remove_dir_all(&root).map_err(io(&root))?;
        }
        clear_leftovers(out);
        let new = out.join(format!("{WORK}-new-{}", std::process::id()));
        std::fs::create_dir_all(new.join("tables")).map_err(io(&new))?;
        WorkDir {
            root: new.clone(),
            attempt: 0,
        }
        .write_stamp(plan, 1)?;
        std::fs::rename(&new, &root).map_err(io(&root))?;
        Ok(WorkDir { root, attempt: 0 })
    }

    fn write_stamp(&self, plan: &Plan, attempts: u32) -> Result<()> {
        let stamp = Stamp {
            attempts,
            pipeline: serde_json::to_value(&plan.pipeline).unwrap_or_default(),
        };
        crate::sink::write_atomic(
            &self.root.join("stamp.json"),
            &serde_json::to_string_pretty(&stamp).unwrap_or_default(),
        )
    }

    /// Opens the unfinished run in `out` for `--resume`: refuses if a setting changed (naming
    /// it), keeps committed segments, deletes orphan parts.
    pub fn resume(out: &Path, plan: &Plan) -> Result<(WorkDir, Resumed)> {
        clear_leftovers(out);
        let root = out.join(WORK);
        let stamp_path = root.join("stamp.json");
        let fail = |msg: String| Error::Output {
            file: out.to_path_buf(),
            msg,
        };
        let text = std::fs::read_to_string(&stamp_path).map_err(|_| {
            fail("--resume: no unfinished run here (it completed, or never started): run without --resume".into())
        })?;
        let stamp: Stamp = serde_json::from_str(&text).map_err(|e| {
            fail(format!(
                "--resume: unreadable {}: {e}",
                stamp_path.display()
            ))
        })?;
        let (mut old, mut new) = (BTreeMap::new(), BTreeMap::new());
        flatten("", &stamp.pipeline, &mut old);
        flatten(
            "",
            &serde_json::to_value(&plan.pipeline).unwrap_or_default(),
            &mut new,
        );
        let changed: Vec<String> = old
            .keys()
            .chain(new.keys())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .filter(|k| old.get(*k) != new.get(*k))
            // where the forward passes ran does not change what they compute (beyond float
            // rounding): a run started on the CPU may go on on a GPU
            .filter(|k| !matches!(k.as_str(), "model.device" | "model.device_batch"))
            .map(|k| {
                format!(
                    "{k} (was {}, now {})",
                    old.get(k).map_or("unset", |v| v.as_str()),
                    new.get(k).map_or("unset", |v| v.as_str())
                )
            })
            .collect();
        if !changed.is_empty() {
            return Err(fail(format!(
                "--resume refused: the pipeline changed since the run started: {}; resume with the same settings, or run without --resume to start over",
                changed.join(", ")
            )));
        }
        let w = WorkDir {
            root,
            attempt: stamp.attempts,
        };
        w.write_stamp(plan, stamp.attempts + 1)?;
        let mut resumed = Resumed::default();
        let mut committed = HashSet::new();
        let mut committed_sums = HashSet::new();
        for entry in std::fs::read_dir(&w.root).map_err(io(&w.root))?.flatten() {
            let p = entry.path();
            if !p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("manifest-"))
            {
                continue;
            }
            let text = std::fs::read_to_string(&p).map_err(io(&p))?;
            // a line torn by a crash does not parse: its segment was not committed
            for seg in text.lines().filter_map(parse_line).flatten() {
                resumed.done.extend(seg.images.iter().cloned());
                resumed
                    .done
                    .extend(seg.skipped.iter().map(|s| s.id.clone()));
                resumed.skipped.extend(seg.skipped);
                let sums_file = seg.sums.unwrap_or_else(|| sums_name(&seg.part));
                let sums = w.sums_dir().join(&sums_file);
                let part = w.tables().join("neurons").join(&seg.part);
                if sums.is_file() {
                    resumed.sum_files.push(sums);
                } else if part.is_file() {
                    resumed.neuron_parts.push(part);
                }
                committed_sums.insert(sums_file);
                committed.insert(seg.part);
            }
        }
        resumed.neuron_parts.sort();
        resumed.sum_files.sort();
        if let Ok(entries) = std::fs::read_dir(w.sums_dir()) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if !committed_sums.contains(&name) {
                    std::fs::remove_file(e.path()).map_err(io(&e.path()))?;
                }
            }
        }
        // parts no manifest line names were cut off by the crash
        for table in crate::sink::TABLES {
            let dir = w.tables().join(table);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if !committed.contains(&name) {
                    std::fs::remove_file(e.path()).map_err(io(&e.path()))?;
                }
            }
        }
        Ok((w, resumed))
    }

    /// Appends one line of `segs` (a chunk's segments of this process's workers) to `worker`'s
    /// manifest and fsyncs it: the segments are committed together.
    pub fn commit_segments(&self, worker: usize, segs: &[Segment]) -> Result<()> {
        let path = self
            .root
            .join(format!("manifest-a{:02}-w{worker:05}.jsonl", self.attempt));
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        let mut line = serde_json::to_string(segs).unwrap_or_default();
        line.push('\n');
        f.write_all(line.as_bytes()).map_err(io(&path))?;
        f.sync_all().map_err(io(&path))
    }

    /// Removes the work folder after the tables were committed: renamed out of the way first,
    /// so that a run killed while the files go never leaves a work folder without its stamp
    /// (which neither a new run nor `--resume` would take).
    pub fn remove(&self) -> Result<()> {
        let done = self
            .root
            .with_file_name(format!("{WORK}-done-{}", std::process::id()));
        std::fs::rename(&self.root, &done).map_err(io(&self.root))?;
        std::fs::remove_dir_all(&done).map_err(io(&done))
    }
}

/// Removes what a killed run left of a work folder it was setting up or removing
/// (`.freqtag-new-*`, `.freqtag-done-*`): never a run to resume.
fn clear_leftovers(out: &Path) {
    let Ok(entries) = std::fs::read_dir(out) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let leftover = [format!("{WORK}-new-"), format!("{WORK}-done-")]
            .iter()
            .any(|p| name.starts_with(p.as_str()));
        if leftover && e.path().is_dir() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The sums file of the segment whose parts are named `part`.
/// The file name of the sums of the segment whose parts are named `part`.
pub fn sums_name(part: &str) -> String {
    format!("{part}.sums")
}

const SUMS_MAGIC: &[u8; 8] = b"FTSUMS03";
/// The format before: the record count after the magic (still read).
const SUMS_MAGIC_02: &[u8; 8] = b"FTSUMS02";

/// Appends `f`'s limbs without the high ones that only repeat the sign: a count (u8), then
/// that many little-endian limbs (a sum of values near 1 needs 3 of the 6).
fn put_fixed(raw: &mut Vec<u8>, f: &Fixed) {
    let limbs = f.limbs();
    let ext = |n: usize| {
        if n > 0 && limbs[n - 1] >> 63 == 1 {
            u64::MAX
        } else {
            0
        }
    };
    let n = (0..=LIMBS)
        .find(|&n| limbs[n..].iter().all(|&l| l == ext(n)))
        .unwrap_or(LIMBS);
    raw.push(n as u8);
    for l in &limbs[..n] {
        raw.extend_from_slice(&l.to_le_bytes());
    }
}

/// One segment's sums file (the exact [`Acc`] of each key its images added to), written as the
/// sums are handed on to the aggregation ([`SumsFile::push`]) and closed by
/// [`SumsFile::finish`] as `sums/{part}.sums`: zstd-compressed little-endian records, then the
/// record count (u64), streamed to a temporary name, fsynced and renamed, so that a file under
/// the final name is whole (a file not finished is removed). The segment's manifest line is
/// written after it; a resumed run reads the sums of committed segments back with
/// [`aggregates`]. This replaces a staged `neurons` table (one row per neuron and term and
/// image) when `output.neurons` is off: a file per chunk of images instead of rows per image.
/// Streamed, a chunk's sums take no memory of their own: encoded whole and then compressed, the
/// 102 000 of MobileNetV2 held 67 MB of records and 44 MB of their compression per worker at
/// every commit.
///
/// A record: tap, channel, term (u32), a label flag (u8) and label (i64), the count of each
/// score (i64), then the sum and the sum of squares of each score (see `put_fixed`).
pub struct SumsFile {
    tmp: PathBuf,
    dest: PathBuf,
    /// `None` once finished.
    out: Option<zstd::stream::write::Encoder<'static, std::io::BufWriter<File>>>,
    /// Records not yet handed to the compressor.
    raw: Vec<u8>,
    count: u64,
    /// The first write error, reported by [`SumsFile::finish`].
    failed: Option<std::io::Error>,
}

/// Bytes of records gathered before they go to the compressor.
const SUMS_BLOCK: usize = 1 << 18;

impl SumsFile {
    /// Starts the sums file of the segment whose parts are named `part` (file name
    /// [`sums_name`]).
    pub fn create(work: &WorkDir, part: &str) -> Result<Self> {
        let dir = work.sums_dir();
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let dest = dir.join(sums_name(part));
        let tmp = dir.join(format!(".{}.tmp", sums_name(part)));
        let f = File::create(&tmp).map_err(io(&tmp))?;
        let out =
            zstd::stream::write::Encoder::new(std::io::BufWriter::new(f), 1).map_err(io(&tmp))?;
        let mut raw = Vec::with_capacity(SUMS_BLOCK + 1024);
        raw.extend_from_slice(SUMS_MAGIC);
        Ok(SumsFile {
            tmp,
            dest,
            out: Some(out),
            raw,
            count: 0,
            failed: None,
        })
    }

    /// Hands the gathered records to the compressor.
    fn flush_raw(&mut self) {
        if let (None, Some(out)) = (&self.failed, self.out.as_mut()) {
            if let Err(e) = out.write_all(&self.raw) {
                self.failed = Some(e);
            }
        }
        self.raw.clear();
    }

    /// Appends the record of `key`.
    pub fn push(&mut self, key: &ScoreKey, acc: &Acc) {
        let (tap, channel, term, label) = key;
        let raw = &mut self.raw;
        raw.extend_from_slice(&tap.to_le_bytes());
        raw.extend_from_slice(&channel.to_le_bytes());
        raw.extend_from_slice(&term.to_le_bytes());
        raw.push(label.is_some() as u8);
        raw.extend_from_slice(&label.unwrap_or(0).to_le_bytes());
        for c in acc.count {
            raw.extend_from_slice(&c.to_le_bytes());
        }
        for f in acc.sum.iter().chain(&acc.sumsq) {
            put_fixed(raw, f);
        }
        self.count += 1;
        if self.raw.len() >= SUMS_BLOCK {
            self.flush_raw();
        }
    }

    /// Writes the record count, closes the compressed stream, and renames the file into
    /// place.
    pub fn finish(mut self) -> Result<()> {
        self.raw.extend_from_slice(&self.count.to_le_bytes());
        self.flush_raw();
        let tmp = self.tmp.clone();
        if let Some(e) = self.failed.take() {
            return Err(io(&tmp)(e));
        }
        let Some(out) = self.out.take() else {
            return Ok(());
        };
        let file = out
            .finish()
            .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
            .map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &self.dest).map_err(io(&self.dest))?;
        Ok(())
    }
}

impl Drop for SumsFile {
    /// A file not finished (its chunk failed) is removed: a resumed run does its images again.
    fn drop(&mut self) {
        if self.out.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Reads the records of a sums file (after its magic and count) one field at a time.
struct Reader<'a> {
    raw: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let b = self.raw.get(self.at..self.at + n)?;
        self.at += n;
        Some(b)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    }
    fn fixed(&mut self) -> Option<Fixed> {
        let n = self.u8()? as usize;
        if n > LIMBS {
            return None;
        }
        let mut limbs = [0u64; LIMBS];
        for l in limbs.iter_mut().take(n) {
            *l = self.u64()?;
        }
        if n > 0 && limbs[n - 1] >> 63 == 1 {
            limbs[n..].fill(u64::MAX);
        }
        Some(Fixed::from_limbs(limbs))
    }
    fn record(&mut self) -> Option<(ScoreKey, Acc)> {
        let (tap, channel, term) = (self.u32()?, self.u32()?, self.u32()?);
        let has_label = self.u8()? == 1;
        let label = self.u64()? as i64;
        let mut acc = Acc::zero();
        for c in acc.count.iter_mut() {
            *c = self.u64()? as i64;
        }
        for f in acc.sum.iter_mut().chain(acc.sumsq.iter_mut()) {
            *f = self.fixed()?;
        }
        Some(((tap, channel, term, has_label.then_some(label)), acc))
    }
}

/// The sums of committed segments, added up by key into `out`.
fn aggregates_from_sums(files: &[PathBuf], out: &mut HashMap<ScoreKey, Acc>) -> Result<()> {
    for file in files {
        let bad = |msg: &str| {
            Error::Output {
            file: file.clone(),
            msg: format!(
                "cannot resume from these committed sums: {msg}; remove the work folder {} to start over",
                file.parent().and_then(Path::parent).unwrap_or(file).display()
            ),
        }
        };
        let packed = std::fs::read(file).map_err(io(file))?;
        let raw = zstd::stream::decode_all(packed.as_slice()).map_err(|e| bad(&e.to_string()))?;
        // this version: the record count after the records; FTSUMS02 (before session 10's
        // streamed files): the count first
        let (n, at, end) = if raw.len() >= 16 && &raw[..8] == SUMS_MAGIC {
            let n = u64::from_le_bytes(raw[raw.len() - 8..].try_into().unwrap_or_default());
            (n, 8, raw.len() - 8)
        } else if raw.len() >= 16 && &raw[..8] == SUMS_MAGIC_02 {
            (
                u64::from_le_bytes(raw[8..16].try_into().unwrap_or_default()),
                16,
                raw.len(),
            )
        } else {
            return Err(bad("not a freqtag sums file of this version"));
        };
        let mut r = Reader {
            raw: &raw[..end],
            at,
        };
        for _ in 0..n {
            let (key, acc) = r.record().ok_or_else(|| bad("truncated"))?;
            out.entry(key).or_insert_with(Acc::zero).plus_equals(&acc);
        }
        if r.at != end {
            return Err(bad("trailing bytes"));
        }
    }
    Ok(())
}

/// The aggregates of the images committed by earlier attempts, keyed as the dataflow keys them:
/// from their segments' sums, or the rows of their `neurons` parts.
pub fn aggregates(resumed: &Resumed, plan: &Plan) -> Result<HashMap<ScoreKey, Acc>> {
    let mut out = aggregates_from_neurons(&resumed.neuron_parts, plan)?;
    aggregates_from_sums(&resumed.sum_files, &mut out)?;
    Ok(out)
}

/// The aggregates of the rows of committed `neurons` parts, keyed as the dataflow keys them.
fn aggregates_from_neurons(parts: &[PathBuf], plan: &Plan) -> Result<HashMap<ScoreKey, Acc>> {
    let taps: HashMap<&str, u32> = plan
        .taps
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i as u32))
        .collect();
    let terms: HashMap<&str, u32> = plan
        .terms
        .terms
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i as u32))
        .collect();
    let per_class = plan.pipeline.output.per_class;
    let mut out: HashMap<ScoreKey, Acc> = HashMap::new();
    for part in parts {
        let bad = |msg: String| Error::Output {
            file: part.clone(),
            msg: format!("cannot resume from this committed part: {msg}"),
        };
        let f = File::open(part).map_err(io(part))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(f)
            .and_then(|b| b.build())
            .map_err(|e| bad(e.to_string()))?;
        for batch in reader {
            let batch = batch.map_err(|e| bad(e.to_string()))?;
            let col = |name: &str| {
                batch
                    .column_by_name(name)
                    .ok_or_else(|| bad(format!("no column {name}")))
            };
            let layer = col("layer")?
                .as_any()
                .downcast_ref::<StringArray>()
                .cloned();
            let channel = col("channel")?
                .as_any()
                .downcast_ref::<Int32Array>()
                .cloned();
            let term = col("term")?.as_any().downcast_ref::<StringArray>().cloned();
            let label = col("label")?.as_any().downcast_ref::<Int64Array>().cloned();
            let (Some(layer), Some(channel), Some(term), Some(label)) =
                (layer, channel, term, label)
            else {
                return Err(bad("unexpected column types".into()));
            };
            let mut scores = Vec::new();
            for s in SCORE_NAMES {
                scores.push(
                    col(s)?
                        .as_any()
                        .downcast_ref::<Float64Array>()
                        .cloned()
                        .ok_or_else(|| bad(format!("{s} is not float64")))?,
                );
            }
            for r in 0..batch.num_rows() {
                let (Some(tap), Some(ti)) = (taps.get(layer.value(r)), terms.get(term.value(r)))
                else {
                    return Err(bad(format!("unknown layer or term in row {r}")));
                };
                let values: Vec<Option<f64>> = scores
                    .iter()
                    .map(|a| (!a.is_null(r)).then(|| a.value(r)))
                    .collect();
                let acc = Acc::of(&values);
                let lab = (!label.is_null(r)).then(|| label.value(r));
                let groups: &[Option<i64>] = match (per_class, lab) {
                    (true, Some(l)) => &[None, Some(l)],
                    _ => &[None],
                };
                for g in groups {
                    out.entry((*tap, channel.value(r) as u32, *ti, *g))
                        .or_insert_with(Acc::zero)
                        .plus_equals(&acc);
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sums streamed to a file read back as the same exact sums, added up by key: negative,
    /// huge and tiny values, labels, a key twice, more records than one block of the
    /// compressor. A file not finished leaves nothing behind; a file of the format before
    /// (count first, FTSUMS02) still reads.
    #[test]
    fn streamed_sums_files_read_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let work = WorkDir {
            root: dir.path().to_path_buf(),
            attempt: 0,
        };
        let mut records: Vec<(ScoreKey, Acc)> = Vec::new();
        for i in 0..3000u32 {
            let v = |k: u32| {
                let x = (i * 7 + k * 13) as f64;
                match (i + k) % 5 {
                    0 => Some(-x * 1e-9),
                    1 => Some(x * 1e20),
                    2 => None,
                    3 => Some(1e-30 / (x + 1.0)),
                    _ => Some(x - 1500.5),
                }
            };
            let values: Vec<Option<f64>> = (0..9).map(v).collect();
            let mut acc = Acc::of(&values);
            acc.plus_equals(&Acc::of(&values[1..]));
            let label = (i % 3 == 0).then_some(i as i64 % 4 - 1);
            // keys 0..2 999, then key 0 again
            records.push(((i / 6, i % 6, i % 2, label), acc));
        }
        records.push((records[0].0, records[5].1.clone()));
        let mut file = SumsFile::create(&work, "w0-s0").unwrap();
        let mut want: HashMap<ScoreKey, Acc> = HashMap::new();
        for (k, acc) in &records {
            file.push(k, acc);
            want.entry(*k).or_insert_with(Acc::zero).plus_equals(acc);
        }
        file.finish().unwrap();
        let path = work.sums_dir().join(sums_name("w0-s0"));
        let mut got = HashMap::new();
        aggregates_from_sums(std::slice::from_ref(&path), &mut got).unwrap();
        assert_eq!(got, want);

        // dropped before finishing: neither the file nor its temporary name is left
        let mut cut = SumsFile::create(&work, "w1-s0").unwrap();
        cut.push(&records[0].0, &records[0].1);
        drop(cut);
        let names: Vec<String> = std::fs::read_dir(work.sums_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(names, [sums_name("w0-s0")]);

        // the format before: magic, count, records
        let mut raw = SUMS_MAGIC_02.to_vec();
        raw.extend_from_slice(&2u64.to_le_bytes());
        for (k, acc) in &records[..2] {
            let mut one = SumsFile::create(&work, "scratch").unwrap();
            one.raw.clear();
            one.push(k, acc);
            raw.extend_from_slice(&one.raw);
        }
        let old = work.sums_dir().join("old.sums");
        std::fs::write(&old, zstd::bulk::compress(&raw, 1).unwrap()).unwrap();
        let mut got = HashMap::new();
        aggregates_from_sums(&[old], &mut got).unwrap();
        let want: HashMap<ScoreKey, Acc> = records[..2].iter().cloned().collect();
        assert_eq!(got, want);
    }
}
