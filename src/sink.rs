//! Parquet outputs (zstd). Each worker writes its own part of every table into a staging folder;
//! a part is written to a temporary name, fsynced and renamed; when the run ends the staging
//! tables replace the output tables by rename, so no output is ever left half-written.
//!
//! Tables (schemas in README.md): `spectra/`, `neurons/`, `images/` (per image, written as images
//! stream in) and `scores/` (aggregates, written by the worker that owns each key).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{BooleanBufferBuilder, StringBuilder};
use arrow_array::types::{ArrowPrimitiveType, Float16Type, Float32Type};
use arrow_array::{
    ArrayRef, BooleanArray, Float64Array, Int32Array, Int64Array, ListArray, PrimitiveArray,
    RecordBatch,
};
use arrow_buffer::{NullBuffer, OffsetBuffer};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::{ArrowSchemaConverter, ArrowWriter};
use parquet::basic::{Compression, Encoding, Type as PhysicalType, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::config::{Plan, SpectraMode};
use crate::error::{Error, Result};
use crate::score::{ImageScores, Neuron, Sums, SCORE_NAMES};
use crate::source::ImageRef;

/// The tables, in the order they are committed.
pub const TABLES: [&str; 4] = ["spectra", "neurons", "images", "scores"];

fn field(name: &str, dt: DataType, nullable: bool) -> Field {
    Field::new(name, dt, nullable)
}

/// `spectra/`: one row per (image, tap, channel).
/// `spectra/` with `float16` amplitudes or not.
pub fn spectra_schema(float16: bool) -> SchemaRef {
    let amp = if float16 {
        DataType::Float16
    } else {
        DataType::Float32
    };
    Arc::new(Schema::new(vec![
        field("image_id", DataType::Utf8, false),
        field("label", DataType::Int64, true),
        field("layer", DataType::Utf8, false),
        field("channel", DataType::Int32, false),
        field("bin_hz", DataType::Float64, false),
        field(
            "bins",
            DataType::List(Arc::new(Field::new("item", DataType::Int32, true))),
            true,
        ),
        field(
            "amplitude",
            DataType::List(Arc::new(Field::new("item", amp, true))),
            false,
        ),
    ]))
}

/// The amplitude lists of `neurons`, at `kept` bins or all, as `T` values: one flat values
/// buffer and its offsets, built in one pass (not a value at a time through a list builder).
fn amplitude_list<T: ArrowPrimitiveType>(
    neurons: &[Neuron],
    kept: Option<&[usize]>,
    convert: impl Fn(f32) -> T::Native,
) -> ArrayRef {
    let mut values = Vec::with_capacity(
        neurons
            .iter()
            .map(|nr| kept.map_or(nr.amplitude.len(), <[usize]>::len))
            .sum(),
    );
    let mut offsets = Vec::with_capacity(neurons.len() + 1);
    offsets.push(0i32);
    for nr in neurons {
        match kept {
            Some(kept) => values.extend(kept.iter().map(|k| convert(nr.amplitude[*k]))),
            None => values.extend(nr.amplitude.iter().map(|a| convert(*a))),
        }
        offsets.push(values.len() as i32);
    }
    let item = Arc::new(Field::new("item", T::DATA_TYPE, true));
    Arc::new(ListArray::new(
        item,
        OffsetBuffer::new(offsets.into()),
        Arc::new(PrimitiveArray::<T>::new(values.into(), None)),
        None,
    ))
}

/// A string column of `values`, its buffers sized before it is filled.
fn strings<'a>(values: impl Iterator<Item = &'a str> + Clone) -> ArrayRef {
    let (rows, bytes) = values
        .clone()
        .fold((0, 0), |(n, b), v| (n + 1, b + v.len()));
    let mut b = StringBuilder::with_capacity(rows, bytes);
    for v in values {
        b.append_value(v);
    }
    Arc::new(b.finish())
}

/// A float column filled a value at a time: null where a value is `None` or not finite.
struct Floats {
    values: Vec<f64>,
    valid: BooleanBufferBuilder,
}

impl Floats {
    fn with_capacity(rows: usize) -> Self {
        Floats {
            values: Vec::with_capacity(rows),
            valid: BooleanBufferBuilder::new(rows),
        }
    }

    #[inline]
    fn push(&mut self, v: Option<f64>) {
        self.push_value(v.unwrap_or(f64::NAN));
    }

    /// As `push`, NaN standing for `None`.
    #[inline]
    fn push_value(&mut self, v: f64) {
        let finite = v.is_finite();
        self.values.push(if finite { v } else { 0.0 });
        self.valid.append(finite);
    }

    /// The column (without a null buffer where no value is null).
    fn finish(mut self) -> ArrayRef {
        let nulls = NullBuffer::new(self.valid.finish());
        Arc::new(Float64Array::new(
            self.values.into(),
            (nulls.null_count() > 0).then_some(nulls),
        ))
    }
}

/// The term columns ([`term_fields`]) of rows of `terms`.
fn term_columns<'a>(terms: impl Iterator<Item = &'a crate::score::Term> + Clone) -> Vec<ArrayRef> {
    vec![
        strings(terms.clone().map(|t| t.name.as_str())),
        strings(terms.clone().map(|t| t.kind.as_str())),
        Arc::new(Float64Array::from_iter_values(
            terms.clone().map(|t| t.freq_hz),
        )),
        Arc::new(Float64Array::from_iter_values(
            terms.clone().map(|t| t.alias_hz),
        )),
        Arc::new(BooleanArray::from_iter(
            terms.clone().map(|t| Some(t.aliased)),
        )),
        Arc::new(Int32Array::from_iter_values(
            terms.clone().map(|t| t.bin as i32),
        )),
        Arc::new(BooleanArray::from_iter(terms.map(|t| Some(t.on_bin)))),
    ]
}

fn term_fields() -> Vec<Field> {
    vec![
        field("term", DataType::Utf8, false),
        field("term_kind", DataType::Utf8, false),
        field("freq_hz", DataType::Float64, false),
        field("alias_hz", DataType::Float64, false),
        field("aliased", DataType::Boolean, false),
        field("bin", DataType::Int32, false),
        field("on_bin", DataType::Boolean, false),
    ]
}

/// `neurons/`: one row per (image, tap, channel, term).
pub fn neurons_schema() -> SchemaRef {
    let mut f = vec![
        field("image_id", DataType::Utf8, false),
        field("label", DataType::Int64, true),
        field("layer", DataType::Utf8, false),
        field("channel", DataType::Int32, false),
    ];
    f.extend(term_fields());
    for s in SCORE_NAMES {
        f.push(field(
            s,
            DataType::Float64,
            s != "amplitude" && s != "mean_snr_db",
        ));
    }
    Arc::new(Schema::new(f))
}

/// `images/`: one row per processed image.
pub fn images_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        field("image_id", DataType::Utf8, false),
        field("label", DataType::Int64, true),
        field("pred", DataType::Int64, false),
        field("prob", DataType::Float32, false),
        field("correct", DataType::Boolean, true),
        field("frames", DataType::Int32, false),
        field("distinct_frames", DataType::Int32, false),
    ]))
}

/// `scores/`: one row per (tap, channel, term, label group).
pub fn scores_schema() -> SchemaRef {
    let mut f = vec![
        field("layer", DataType::Utf8, false),
        field("channel", DataType::Int32, false),
    ];
    f.extend(term_fields());
    f.push(field("label", DataType::Int64, true));
    f.push(field("n_images", DataType::Int64, false));
    for s in SCORE_NAMES {
        f.push(field(&format!("{s}_mean"), DataType::Float64, true));
        f.push(field(&format!("{s}_std"), DataType::Float64, true));
    }
    Arc::new(Schema::new(f))
}

/// One Parquet file being written under a temporary name.
pub struct Part {
    writer: ArrowWriter<File>,
    tmp: PathBuf,
    dest: PathBuf,
}

impl Part {
    /// Starts `dir/name` with `schema`.
    pub fn create(dir: &Path, name: &str, schema: SchemaRef) -> Result<Part> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Output {
            file: dir.to_path_buf(),
            msg: format!("cannot create folder: {e}"),
        })?;
        let dest = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        let file = File::create(&tmp).map_err(|e| Error::Output {
            file: tmp.clone(),
            msg: format!("cannot create: {e}"),
        })?;
        let mut props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).unwrap_or_default()))
            .set_max_row_group_row_count(Some(64 * 1024));
        // Floating-point columns (amplitudes, scores) almost never repeat: a dictionary is built
        // for each page only to be dropped for plain encoding. Skip it, and split the floats'
        // bytes into streams so that zstd finds the shared exponents.
        let descr = ArrowSchemaConverter::new()
            .convert(&schema)
            .map_err(|e| Error::Output {
                file: tmp.clone(),
                msg: e.to_string(),
            })?;
        for col in descr.columns() {
            let path = col.path().clone();
            match col.physical_type() {
                PhysicalType::FLOAT | PhysicalType::DOUBLE => {
                    props = props
                        .set_column_dictionary_enabled(path.clone(), false)
                        .set_column_encoding(path, Encoding::BYTE_STREAM_SPLIT);
                }
                // float16 (`output.float16`): readers' support for split half floats is newer
                PhysicalType::FIXED_LEN_BYTE_ARRAY => {
                    props = props.set_column_dictionary_enabled(path, false);
                }
                _ => {}
            }
        }
        let props = props.build();
        let writer =
            ArrowWriter::try_new(file, schema, Some(props)).map_err(|e| Error::Output {
                file: tmp.clone(),
                msg: e.to_string(),
            })?;
        Ok(Part { writer, tmp, dest })
    }

    /// Appends a batch, flushing a row group when the buffered data grows past 8 MiB (a row
    /// group of about 21 000 amplitude spectra, 2.5 MobileNetV2 images). Each worker buffers
    /// its own parts: at 64 MiB the quickstart on 16 workers (48 photos, full outputs) peaked
    /// at 1 306-1 334 MB against 1 153-1 232, with the same files otherwise.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        self.writer.write(batch).map_err(|e| self.err(e))?;
        if self.writer.in_progress_size() > 8 << 20 {
            self.writer.flush().map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        Error::Output {
            file: self.tmp.clone(),
            msg: e.to_string(),
        }
    }

    /// Writes the footer, fsyncs and renames to the final name.
    pub fn finish(self) -> Result<()> {
        let file = self.writer.into_inner().map_err(|e| Error::Output {
            file: self.tmp.clone(),
            msg: e.to_string(),
        })?;
        file.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| Error::io(&self.dest, e))
    }
}

/// A record batch of `cols` under `schema`.
pub fn batch(schema: SchemaRef, cols: Vec<ArrayRef>) -> Result<RecordBatch> {
    RecordBatch::try_new(schema, cols).map_err(|e| Error::Output {
        file: PathBuf::from("<record batch>"),
        msg: e.to_string(),
    })
}

/// A worker's per-image tables.
pub struct ImageTables {
    spectra: Option<Part>,
    /// The bins written with `spectra = "terms"` (`None`: all of them).
    kept: Option<Vec<usize>>,
    neurons: Option<Part>,
    images: Part,
    plan: Arc<Plan>,
}

impl ImageTables {
    /// Opens the parts `name` of each table under `staging` that the output has: spectra unless
    /// `output.spectra = "none"`, neurons if `output.neurons` (without it, a resumed run takes
    /// the aggregates of committed images from each segment's sums, see
    /// [`crate::resume::SumsFile`]), images.
    pub fn create(staging: &Path, name: &str, plan: Arc<Plan>) -> Result<Self> {
        let out = &plan.pipeline.output;
        Ok(ImageTables {
            spectra: (out.spectra != SpectraMode::None)
                .then(|| {
                    let schema = spectra_schema(out.float16);
                    Part::create(&staging.join("spectra"), name, schema)
                })
                .transpose()?,
            kept: (out.spectra == SpectraMode::Terms).then(|| {
                let sp = &plan.pipeline.spectrum;
                plan.terms.kept_bins(sp.skip + sp.neighbours)
            }),
            neurons: out
                .neurons
                .then(|| Part::create(&staging.join("neurons"), name, neurons_schema()))
                .transpose()?,
            images: Part::create(&staging.join("images"), name, images_schema())?,
            plan,
        })
    }

    /// Writes one image's rows: its spectra and neuron rows in batches of [`Self::SLICE`]
    /// neurons, then its row of `images/`.
    pub fn write(
        &mut self,
        img: &ImageRef,
        pred: i64,
        prob: f32,
        distinct: usize,
        scores: &ImageScores,
    ) -> Result<()> {
        self.write_scores(img, scores)?;
        self.write_image(img, pred, prob, distinct)
    }

    /// The spectra and neuron rows of `scores`, all or some of an image's neurons (an image
    /// analysed a few taps at a time is written a slice at a time).
    pub fn write_scores(&mut self, img: &ImageRef, scores: &ImageScores) -> Result<()> {
        let neurons: Vec<Neuron> = scores.neurons().collect();
        for slice in neurons.chunks(Self::SLICE) {
            self.write_neurons(img, slice)?;
        }
        Ok(())
    }

    /// The image's row, once its neurons' rows are written.
    pub fn write_image(
        &mut self,
        img: &ImageRef,
        pred: i64,
        prob: f32,
        distinct: usize,
    ) -> Result<()> {
        let st = &self.plan.stimulus;
        let cols: Vec<ArrayRef> = vec![
            Arc::new(arrow_array::StringArray::from(vec![img.id.clone()])),
            Arc::new(arrow_array::Int64Array::from(vec![img.label])),
            Arc::new(arrow_array::Int64Array::from(vec![pred])),
            Arc::new(arrow_array::Float32Array::from(vec![prob])),
            Arc::new(arrow_array::BooleanArray::from(vec![img
                .label
                .map(|l| l == pred)])),
            Arc::new(arrow_array::Int32Array::from(vec![st.frames as i32])),
            Arc::new(arrow_array::Int32Array::from(vec![distinct as i32])),
        ];
        self.images.write(&batch(images_schema(), cols)?)
    }

    /// Neurons per record batch: an image's batches are built and encoded a slice at a time, so
    /// that a worker holds one slice's Arrow arrays (about 1.5 MB with full spectra) rather than
    /// the whole image's (MobileNetV2: 17 056 neurons, about 25 MB).
    pub const SLICE: usize = 2048;

    /// The spectra and neuron rows of some of an image's neurons.
    fn write_neurons(&mut self, img: &ImageRef, neurons: &[Neuron]) -> Result<()> {
        let plan = &self.plan;
        let st = &plan.stimulus;
        let n = neurons.len();
        let label = |rows| -> ArrayRef {
            Arc::new(match img.label {
                Some(l) => Int64Array::from_value(l, rows),
                None => Int64Array::new_null(rows),
            })
        };
        if let Some(part) = self.spectra.as_mut() {
            let bins: ArrayRef = match &self.kept {
                // the same kept bins on every row
                Some(kept) => {
                    let k = kept.len() as i32;
                    Arc::new(ListArray::new(
                        Arc::new(Field::new("item", DataType::Int32, true)),
                        OffsetBuffer::new((0..=n as i32).map(|i| i * k).collect()),
                        Arc::new(Int32Array::from_iter_values(
                            (0..n).flat_map(|_| kept.iter().map(|b| *b as i32)),
                        )),
                        None,
                    ))
                }
                None => Arc::new(ListArray::new_null(
                    Arc::new(Field::new("item", DataType::Int32, true)),
                    n,
                )),
            };
            let float16 = plan.pipeline.output.float16;
            let kept = self.kept.as_deref();
            let amp = if float16 {
                amplitude_list::<Float16Type>(neurons, kept, half::f16::from_f32)
            } else {
                amplitude_list::<Float32Type>(neurons, kept, |a| a)
            };
            let cols: Vec<ArrayRef> = vec![
                strings(std::iter::repeat_n(img.id.as_str(), n)),
                label(n),
                strings(neurons.iter().map(|nr| plan.taps[nr.tap as usize].as_str())),
                Arc::new(Int32Array::from_iter_values(
                    neurons.iter().map(|nr| nr.channel as i32),
                )),
                Arc::new(Float64Array::from_value(st.fps / st.frames as f64, n)),
                bins,
                amp,
            ];
            part.write(&batch(spectra_schema(float16), cols)?)?;
        }
        if let Some(part) = self.neurons.as_mut() {
            let terms = &plan.terms.terms;
            let nt = terms.len();
            let rows = n * nt;
            // a neuron's rows are its terms'
            let mut cols: Vec<ArrayRef> =
                vec![
                    strings(std::iter::repeat_n(img.id.as_str(), rows)),
                    label(rows),
                    strings(neurons.iter().flat_map(|nr| {
                        std::iter::repeat_n(plan.taps[nr.tap as usize].as_str(), nt)
                    })),
                    Arc::new(Int32Array::from_iter_values(
                        neurons
                            .iter()
                            .flat_map(|nr| std::iter::repeat_n(nr.channel as i32, nt)),
                    )),
                ];
            cols.extend(term_columns((0..n).flat_map(|_| terms.iter())));
            let mut scores: Vec<Floats> = (0..SCORE_NAMES.len())
                .map(|_| Floats::with_capacity(rows))
                .collect();
            for nr in neurons {
                for term in nr.scores.chunks_exact(SCORE_NAMES.len()) {
                    for (c, v) in scores.iter_mut().zip(term) {
                        c.push_value(*v);
                    }
                }
            }
            cols.extend(scores.into_iter().map(Floats::finish));
            part.write(&batch(neurons_schema(), cols)?)?;
        }
        Ok(())
    }

    /// Closes every part.
    pub fn finish(self) -> Result<()> {
        if let Some(p) = self.spectra {
            p.finish()?;
        }
        if let Some(p) = self.neurons {
            p.finish()?;
        }
        self.images.finish()
    }
}

/// Key of an aggregate: (tap, channel, term index, label group; `None` = all images).
pub type ScoreKey = (u32, u32, u32, Option<i64>);

/// Writes worker `worker`'s aggregates to `staging/scores/`.
pub fn write_scores(
    staging: &Path,
    worker: usize,
    plan: &Plan,
    aggregates: &Sums<ScoreKey>,
) -> Result<()> {
    let mut part = Part::create(
        &staging.join("scores"),
        &format!("part-{worker:05}.parquet"),
        scores_schema(),
    )?;
    let rows = aggregates.len();
    let terms = &plan.terms.terms;
    let mut keys = Vec::with_capacity(rows);
    let mut n_images = Vec::with_capacity(rows);
    let mut cols: Vec<Floats> = (0..2 * SCORE_NAMES.len())
        .map(|_| Floats::with_capacity(rows))
        .collect();
    for (key, acc) in aggregates.iter() {
        keys.push(*key);
        n_images.push(acc.count[0]);
        for i in 0..SCORE_NAMES.len() {
            cols[2 * i].push(acc.mean(i));
            cols[2 * i + 1].push(acc.std(i));
        }
    }
    let keys = keys.iter();
    let mut arrays: Vec<ArrayRef> = vec![
        strings(keys.clone().map(|k| plan.taps[k.0 as usize].as_str())),
        Arc::new(Int32Array::from_iter_values(
            keys.clone().map(|k| k.1 as i32),
        )),
    ];
    arrays.extend(term_columns(keys.clone().map(|k| &terms[k.2 as usize])));
    arrays.push(Arc::new(Int64Array::from_iter(keys.map(|k| k.3))));
    arrays.push(Arc::new(Int64Array::from(n_images)));
    arrays.extend(cols.into_iter().map(Floats::finish));
    part.write(&batch(scores_schema(), arrays)?)?;
    part.finish()
}

/// Replaces `out/<table>` by `staging/<table>` for every table in `tables` (rename, so a
/// reader sees the old or the new table, never a mix), then removes the staging folder.
pub fn commit(staging: &Path, out: &Path, tables: &[&str]) -> Result<()> {
    for t in TABLES {
        let new = staging.join(t);
        if !tables.contains(&t) {
            let _ = std::fs::remove_dir_all(&new);
        }
        let dest = out.join(t);
        let old = out.join(format!(".{t}.old-{}", std::process::id()));
        if dest.exists() {
            std::fs::rename(&dest, &old).map_err(|e| Error::io(&dest, e))?;
        }
        if new.exists() {
            std::fs::rename(&new, &dest).map_err(|e| Error::io(&dest, e))?;
        }
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
    }
    std::fs::remove_dir_all(staging).map_err(|e| Error::io(staging, e))
}

/// Writes `text` to `path` atomically (temporary file, fsync, rename).
pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(text.as_bytes())
        .map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
