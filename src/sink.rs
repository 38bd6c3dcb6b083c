//! Parquet outputs (zstd). Each worker writes its own part of every table into a staging folder;
//! a part is written to a temporary name, fsynced and renamed; when the run ends the staging
//! tables replace the output tables by rename, so no output is ever left half-written.
//!
//! Tables (schemas in README.md): `spectra/`, `neurons/`, `images/` (per image, written as images
//! stream in) and `scores/` (aggregates, written by the worker that owns each key).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, Float64Builder, Int32Builder, Int64Builder, ListBuilder, PrimitiveBuilder,
    StringBuilder,
};
use arrow_array::types::{ArrowPrimitiveType, Float16Type, Float32Type};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::{ArrowSchemaConverter, ArrowWriter};
use parquet::basic::{Compression, Encoding, Type as PhysicalType, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::config::{Plan, SpectraMode};
use crate::error::{Error, Result};
use crate::score::{NeuronResult, Update, SCORE_NAMES};
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

/// The amplitude lists of `neurons`, at `kept` bins or all, as `T` values.
fn amplitude_list<T: ArrowPrimitiveType>(
    neurons: &[NeuronResult],
    kept: Option<&[usize]>,
    convert: impl Fn(f32) -> T::Native,
) -> ArrayRef {
    let mut amp = ListBuilder::new(PrimitiveBuilder::<T>::new());
    for nr in neurons {
        match kept {
            Some(kept) => {
                for k in kept {
                    amp.values().append_value(convert(nr.amplitude[*k]));
                }
            }
            None => {
                for a in &nr.amplitude {
                    amp.values().append_value(convert(*a));
                }
            }
        }
        amp.append(true);
    }
    Arc::new(amp.finish())
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

    /// Appends a batch (flushing a row group when the buffered data grows past 64 MiB).
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        self.writer.write(batch).map_err(|e| self.err(e))?;
        if self.writer.in_progress_size() > 64 << 20 {
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

fn opt_f64(b: &mut Float64Builder, v: Option<f64>) {
    b.append_option(v.filter(|x| x.is_finite()));
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
        neurons: &[NeuronResult],
    ) -> Result<()> {
        for slice in neurons.chunks(Self::SLICE) {
            self.write_neurons(img, slice)?;
        }
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
    const SLICE: usize = 2048;

    /// The spectra and neuron rows of some of an image's neurons.
    fn write_neurons(&mut self, img: &ImageRef, neurons: &[NeuronResult]) -> Result<()> {
        let plan = &self.plan;
        let st = &plan.stimulus;
        let n = neurons.len();
        if let Some(part) = self.spectra.as_mut() {
            let mut id = StringBuilder::new();
            let mut label = Int64Builder::new();
            let mut layer = StringBuilder::new();
            let mut channel = Int32Builder::new();
            let mut bin_hz = Float64Builder::new();
            let mut bins = ListBuilder::new(Int32Builder::new());
            for nr in neurons {
                id.append_value(&img.id);
                label.append_option(img.label);
                layer.append_value(&plan.taps[nr.tap as usize]);
                channel.append_value(nr.channel as i32);
                bin_hz.append_value(st.fps / st.frames as f64);
                match &self.kept {
                    Some(kept) => {
                        for k in kept {
                            bins.values().append_value(*k as i32);
                        }
                        bins.append(true);
                    }
                    None => bins.append_null(),
                }
            }
            let float16 = plan.pipeline.output.float16;
            let kept = self.kept.as_deref();
            let amp = if float16 {
                amplitude_list::<Float16Type>(neurons, kept, half::f16::from_f32)
            } else {
                amplitude_list::<Float32Type>(neurons, kept, |a| a)
            };
            let cols: Vec<ArrayRef> = vec![
                Arc::new(id.finish()),
                Arc::new(label.finish()),
                Arc::new(layer.finish()),
                Arc::new(channel.finish()),
                Arc::new(bin_hz.finish()),
                Arc::new(bins.finish()),
                amp,
            ];
            part.write(&batch(spectra_schema(float16), cols)?)?;
        }
        if let Some(part) = self.neurons.as_mut() {
            let rows = n * plan.terms.terms.len();
            let mut id = StringBuilder::with_capacity(rows, rows * img.id.len());
            let mut label = Int64Builder::with_capacity(rows);
            let mut layer = StringBuilder::new();
            let mut channel = Int32Builder::with_capacity(rows);
            let mut terms = TermColumns::default();
            let mut scores: Vec<Float64Builder> = (0..SCORE_NAMES.len())
                .map(|_| Float64Builder::with_capacity(rows))
                .collect();
            for nr in neurons {
                for (t, s) in plan.terms.terms.iter().zip(&nr.terms) {
                    id.append_value(&img.id);
                    label.append_option(img.label);
                    layer.append_value(&plan.taps[nr.tap as usize]);
                    channel.append_value(nr.channel as i32);
                    terms.push(t);
                    for (b, v) in scores.iter_mut().zip(s.as_array(nr.mean_snr_db)) {
                        opt_f64(b, v);
                    }
                }
            }
            let mut cols: Vec<ArrayRef> = vec![
                Arc::new(id.finish()),
                Arc::new(label.finish()),
                Arc::new(layer.finish()),
                Arc::new(channel.finish()),
            ];
            cols.extend(terms.finish());
            cols.extend(scores.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
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

#[derive(Default)]
struct TermColumns {
    term: StringBuilder,
    kind: StringBuilder,
    freq: Float64Builder,
    alias: Float64Builder,
    aliased: BooleanBuilder,
    bin: Int32Builder,
    on_bin: BooleanBuilder,
}

impl TermColumns {
    fn push(&mut self, t: &crate::score::Term) {
        self.term.append_value(&t.name);
        self.kind.append_value(t.kind.as_str());
        self.freq.append_value(t.freq_hz);
        self.alias.append_value(t.alias_hz);
        self.aliased.append_value(t.aliased);
        self.bin.append_value(t.bin as i32);
        self.on_bin.append_value(t.on_bin);
    }

    fn finish(mut self) -> Vec<ArrayRef> {
        vec![
            Arc::new(self.term.finish()),
            Arc::new(self.kind.finish()),
            Arc::new(self.freq.finish()),
            Arc::new(self.alias.finish()),
            Arc::new(self.aliased.finish()),
            Arc::new(self.bin.finish()),
            Arc::new(self.on_bin.finish()),
        ]
    }
}

/// Key of an aggregate: (tap, channel, term index, label group; `None` = all images).
pub type ScoreKey = (u32, u32, u32, Option<i64>);

/// Writes worker `worker`'s aggregates to `staging/scores/`.
pub fn write_scores(
    staging: &Path,
    worker: usize,
    plan: &Plan,
    aggregates: &BTreeMap<ScoreKey, Update>,
) -> Result<()> {
    let mut part = Part::create(
        &staging.join("scores"),
        &format!("part-{worker:05}.parquet"),
        scores_schema(),
    )?;
    let mut layer = StringBuilder::new();
    let mut channel = Int32Builder::new();
    let mut terms = TermColumns::default();
    let mut label = Int64Builder::new();
    let mut n_images = Int64Builder::new();
    let mut cols: Vec<Float64Builder> = (0..2 * SCORE_NAMES.len())
        .map(|_| Float64Builder::new())
        .collect();
    for ((tap, ch, term, lab), update) in aggregates {
        let acc = update.to_acc();
        layer.append_value(&plan.taps[*tap as usize]);
        channel.append_value(*ch as i32);
        terms.push(&plan.terms.terms[*term as usize]);
        label.append_option(*lab);
        n_images.append_value(acc.count[0]);
        for i in 0..SCORE_NAMES.len() {
            opt_f64(&mut cols[2 * i], acc.mean(i));
            opt_f64(&mut cols[2 * i + 1], acc.std(i));
        }
    }
    let mut arrays: Vec<ArrayRef> = vec![Arc::new(layer.finish()), Arc::new(channel.finish())];
    arrays.extend(terms.finish());
    arrays.push(Arc::new(label.finish()));
    arrays.push(Arc::new(n_images.finish()));
    arrays.extend(cols.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
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
