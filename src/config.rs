//! Pipeline files: the serde structs a user writes (`pipelines/*.toml`), `--set` overrides, and
//! the compiler that checks everything at once and resolves a [`Plan`] the run executes.
//!
//! In: TOML text and `key=value` overrides. Out: a [`Plan`] or [`Error::Config`] listing every
//! problem found. The file says *what* to compute; command-line flags say *how* to run it.
//!
//! Unknown keys are errors, but the structs do not use `deny_unknown_fields`: that stops at the
//! first one. `serde_ignored` collects every unknown key instead, so all are reported at once.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::Arch;
use crate::score::{TermSet, Window};
use crate::stimulus::{Modulate, Regions, StimulusSpec};

/// A whole pipeline file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pipeline {
    /// Where images come from.
    pub source: SourceConfig,
    /// The network and what to record of it.
    pub model: ModelConfig,
    /// The frequency-tagged stimulus.
    #[serde(default)]
    pub stimulus: StimulusConfig,
    /// Spectra and the scores computed from them.
    #[serde(default)]
    pub spectrum: SpectrumConfig,
    /// What is written.
    #[serde(default)]
    pub output: OutputConfig,
    /// Pruning evaluation (`freqtag prune`); not part of what a run computes, so it is left
    /// out of run.json, resume checks and cluster fingerprints.
    #[serde(default, skip_serializing)]
    pub prune: Option<crate::prune::PruneConfig>,
}

/// `[source]`: where images come from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceConfig {
    /// `folder` (read recursively), `list` (a text file of `path [label]` lines), `tar`
    /// (WebDataset shards) or `parquet` (Hugging Face layout).
    #[serde(default = "default_kind")]
    pub kind: SourceKind,
    /// The folder, the list file, or a shard file or glob (`shards/train-*.tar`); relative paths
    /// resolve against the pipeline file's folder.
    pub path: PathBuf,
    /// Where labels come from: `folders` (sorted class sub-folders), `filename` (the number at
    /// the end of the file name), `source` (the list's second column, `key.cls`, the Parquet
    /// `label` column), or `none`.
    #[serde(default = "default_labels")]
    pub labels: LabelSource,
    /// File extensions taken, case-insensitive.
    #[serde(default = "default_extensions")]
    pub extensions: Vec<String>,
    /// Process at most this many images (the first ones in sorted order).
    #[serde(default)]
    pub limit: Option<usize>,
    /// Whose resize images are prepared with, to the bit, as torchvision's `Resize` gives them:
    /// `13` (Pillow 13, the default) or `12` (Pillow 12; earlier versions are taken as 12). They
    /// order their two passes differently for images whose height shrinks by more than twice as
    /// many pixels as their width (README, "Inputs").
    #[serde(default)]
    pub pillow: crate::model::Pillow,
}

/// How an image gets its label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LabelSource {
    /// The index of the class sub-folder among the sorted sub-folder names.
    Folders,
    /// The integer at the end of the file stem (`cifar10_03_0.png` has label 0).
    Filename,
    /// The source's own labels: list second column, `key.cls`, Parquet `label`.
    Source,
    /// No labels.
    None,
}

/// The kind of image source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// A folder of image files.
    Folder,
    /// A list file.
    List,
    /// WebDataset tar shards.
    Tar,
    /// Parquet files in the Hugging Face layout.
    Parquet,
}

fn default_kind() -> SourceKind {
    SourceKind::Folder
}

fn default_labels() -> LabelSource {
    LabelSource::None
}
fn default_extensions() -> Vec<String> {
    ["jpg", "jpeg", "png"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// `[model]`: the network, its weights and its taps.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Architecture: `resnet20`, `resnet32`, `resnet44`, `resnet56` (CIFAR-10) or `mobilenet_v2`.
    pub arch: String,
    /// Weights: a file (`.th`/`.pth` legacy or zip, `.safetensors`), or `fetch:<model>` to use the
    /// verified cache (fetched on first use, see `freqtag weights fetch`).
    pub weights: String,
    /// Layers recorded: groups `convs` (every convolution before batch norm), `blocks` (block
    /// outputs after the activation), `logits`, or tap names such as `layer1.0.conv1`.
    #[serde(default = "default_taps")]
    pub taps: Vec<String>,
    /// Most stimulus frames per forward pass on the CPU (each image's own, in passes of even
    /// size; the last pass also carries the unmodulated frame for the prediction).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Where the forward passes run: `cpu`, or `cuda` / `cuda:N` with a binary built with the
    /// `cuda` feature (`--device` sets it too).
    #[serde(default = "default_device")]
    pub device: String,
    /// What the network computes in: `f32`, or on a GPU `f16` / `bf16` (the spectra and scores
    /// stay f32).
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// Frames per forward pass on a GPU, across images; 0 sizes it from the card's free memory,
    /// the input size and the workers sharing the card (see
    /// [`ModelConfig::device_batch_for`]).
    #[serde(default)]
    pub device_batch: usize,
    /// The CPU's 3x3 stride-1 convolutions: `"f2"` (Winograd's F(2x2, 3x3), the default),
    /// `"f4"` (F(4x4, 3x3): faster, rounding more) or `"off"` (the direct kernel).
    #[serde(default)]
    pub winograd: crate::model::winograd::Setting,
}

fn default_device() -> String {
    "cpu".into()
}
fn default_dtype() -> String {
    "f32".into()
}

/// The most input pixels of a GPU pass in f32 that [`ModelConfig::device_batch_for`] gives
/// (about six million; twice that in f16 and bf16).
const PASS_PIXELS: u64 = 6_000_000;

impl ModelConfig {
    /// Frames per forward pass on a GPU for inputs of `side` x `side` with `workers` workers
    /// sharing the card: `device_batch` if set. Otherwise, with the card's free memory known,
    /// half of it shared by the workers at 200 bytes per input pixel and frame (what candle's
    /// passes took on an H100: 190 for ResNet-32 at 8 100 frames of 32x32, 180 for MobileNetV2
    /// at 256 and 512 frames of 224x224), 64 to 4 096 frames in f32 and 8 192 in f16 or bf16:
    /// on an 80 GB card 4 096 (f32) or 8 192 (f16) for the paper pipeline, 246 for MobileNetV2
    /// with 16 workers. Larger passes ran faster there (the paper pipeline in f16, 16 workers:
    /// 1 426 images/s at 2 048 frames, 1 567 at 8 192; MobileNetV2: 105 at 128, 124 at 246,
    /// session 13), except past cuDNN's workspace in f32 (below), and a pass stays small enough
    /// for the depthwise kernel's 32-bit indices. Since session 20 a pass also holds at most
    /// about 6 million input pixels (119 frames at 224x224): with the workers' passes on
    /// threads of their own, MobileNetV2 ran faster in small passes than large (on an H200, 16
    /// workers), and each frame in flight costs host memory.
    /// Without the free memory, about 4 million input pixels (256 to 4 096 frames), made smaller
    /// beyond 8 workers.
    pub fn device_batch_for(&self, side: usize, workers: usize, free_bytes: Option<u64>) -> usize {
        if self.device_batch > 0 {
            return self.device_batch;
        }
        let pixels = (side * side).max(1) as u64;
        if let Some(free) = free_bytes {
            let frames = free / 2 / (workers.max(1) as u64 * 200 * pixels);
            // the GPU depthwise kernel indexes a tensor in 32 bits: MobileNetV2's largest holds
            // 24 values per input pixel (112x112x96 at 224x224); 32 leaves a margin
            let indexable = (i32::MAX as u64) / (32 * pixels);
            // in f32, cuDNN's precomputed-index GEMM for ResNet-32's 16-channel layers needs
            // 530 MB of workspace per 4 050 frames; past the 1 GiB it is given, plain implicit
            // GEMM runs instead, at half the speed (603 against 1 235 images/s on an H100)
            let half = crate::model::device::parse_dtype(&self.dtype)
                .is_ok_and(|d| d != candle_core::DType::F32);
            let most = if half { 8192 } else { 4096 };
            // and at most about 6 million input pixels a pass (119 frames at 224x224, two
            // MobileNetV2 images): smaller passes hold less on the host (each frame's row of
            // channels comes back and is copied; MobileNetV2's is 72 KB) and, for 16 workers
            // on an H200, ran faster: 208 images/s at 120 frames a pass against 196 at 240 and
            // 186 at 465, with 1.6 GB peak RSS against 2.5 and 4.4 GB. 32x32 passes stay at
            // 4 096 frames (in half precision, twice these: 239 and 8 192)
            let by_pixels = if half { 2 } else { 1 } * PASS_PIXELS / pixels;
            return frames.min(indexable).min(most).min(by_pixels).max(64) as usize;
        }
        let base = ((4u64 << 20) / pixels).clamp(256, 4096) as usize;
        (base * 8 / workers.max(8)).max(64)
    }
}

fn default_taps() -> Vec<String> {
    vec!["convs".to_string()]
}
fn default_batch_size() -> usize {
    32
}

/// `[stimulus]`: regions, frequencies and contrast modulation (METHOD.md section 1).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StimulusConfig {
    /// Region layout: `halves`, `quadrants`, `grid` or `mask`.
    #[serde(default = "default_regions")]
    pub regions: String,
    /// Rows and columns for `regions = "grid"`.
    #[serde(default)]
    pub grid: Option<[usize; 2]>,
    /// Label image for `regions = "mask"`: each distinct grey value is a region, in ascending order.
    #[serde(default)]
    pub mask: Option<PathBuf>,
    /// Mask value left untagged (constant contrast 1) for `regions = "mask"`.
    #[serde(default)]
    pub mask_untagged: Option<u8>,
    /// Tag frequency per region, Hz.
    #[serde(default = "default_frequencies")]
    pub frequencies: Vec<f64>,
    /// Phase per region, radians (default all 0).
    #[serde(default)]
    pub phases: Option<Vec<f64>>,
    /// Frames per second.
    #[serde(default = "default_fps")]
    pub fps: f64,
    /// Number of frames N.
    #[serde(default = "default_frames")]
    pub frames: usize,
    /// Lowest contrast scalar.
    #[serde(default = "default_smin")]
    pub smin: f64,
    /// Highest contrast scalar.
    #[serde(default = "default_smax")]
    pub smax: f64,
    /// What the scalar multiplies: `normalized` (after mean/std) or `pixel` (RGB in [0,1]).
    #[serde(default = "default_modulate")]
    pub modulate: Modulate,
    /// A tagged frequency off the bin grid: `warn` or `error`.
    #[serde(default = "default_off_bin")]
    pub off_bin: OffBin,
    /// Standard deviation of seeded Gaussian pixel noise added to every frame (0 = off).
    #[serde(default)]
    pub noise_std: f64,
    /// Seed of the stimulus noise; each image's stream derives from (seed, image id).
    #[serde(default)]
    pub noise_seed: u64,
    /// Run each distinct frame once and scatter its activations back (exact; METHOD.md section 6).
    #[serde(default = "default_true")]
    pub dedup_frames: bool,
}

/// What to do with a tagged frequency that falls between bins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OffBin {
    /// Log a warning and go on.
    Warn,
    /// Refuse the pipeline.
    Error,
}

fn default_regions() -> String {
    "halves".into()
}
fn default_frequencies() -> Vec<f64> {
    vec![6.0, 7.5]
}
fn default_fps() -> f64 {
    120.0
}
fn default_frames() -> usize {
    240
}
fn default_smin() -> f64 {
    0.5
}
fn default_smax() -> f64 {
    1.0
}
fn default_modulate() -> Modulate {
    Modulate::Normalized
}
fn default_off_bin() -> OffBin {
    OffBin::Warn
}
fn default_true() -> bool {
    true
}

impl Default for StimulusConfig {
    fn default() -> Self {
        toml::from_str("").expect("all stimulus settings have defaults")
    }
}

/// `[spectrum]`: window, terms and SNR neighbourhood (METHOD.md section 3).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpectrumConfig {
    /// Window: `rect` (default, the run is bin-locked), `hann`, `hamming` or `blackman`.
    #[serde(default = "default_window")]
    pub window: Window,
    /// Highest harmonic H scored for each tagged frequency (`h*f` for h = 2..H).
    #[serde(default = "default_harmonics")]
    pub harmonics: u32,
    /// Highest intermodulation order (`sum |m_r|`); 0 or 1 turns intermodulation terms off.
    #[serde(default = "default_intermod_order")]
    pub intermod_order: u32,
    /// SNR neighbours per side.
    #[serde(default = "default_neighbours")]
    pub neighbours: usize,
    /// Adjacent bins left out on each side of the SNR neighbourhood.
    #[serde(default = "default_skip")]
    pub skip: usize,
}

fn default_window() -> Window {
    Window::Rect
}
fn default_harmonics() -> u32 {
    2
}
fn default_intermod_order() -> u32 {
    2
}
fn default_neighbours() -> usize {
    3
}
fn default_skip() -> usize {
    1
}

impl Default for SpectrumConfig {
    fn default() -> Self {
        toml::from_str("").expect("all spectrum settings have defaults")
    }
}

/// `[output]`: which tables are written.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutputConfig {
    /// Amplitude spectra in `spectra/`: `full` (every bin of every neuron), `terms` (only the
    /// term bins, their SNR neighbourhoods and DC: a fraction of the size), or `none`.
    #[serde(default = "default_spectra")]
    pub spectra: SpectraMode,
    /// Store spectrum amplitudes as float16 (half the size; about 3 significant digits).
    #[serde(default)]
    pub float16: bool,
    /// Write the per-image term scores to `neurons/`.
    #[serde(default = "default_true")]
    pub neurons: bool,
    /// Also aggregate scores per class where images carry labels.
    #[serde(default = "default_true")]
    pub per_class: bool,
}

/// How much of each spectrum is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpectraMode {
    /// All N/2+1 bins.
    Full,
    /// DC, the term bins and their SNR neighbourhoods.
    Terms,
    /// No `spectra/` table.
    None,
}

fn default_spectra() -> SpectraMode {
    SpectraMode::Full
}

impl Default for OutputConfig {
    fn default() -> Self {
        toml::from_str("").expect("all output settings have defaults")
    }
}

/// Where the weights come from, resolved.
#[derive(Debug, Clone, Serialize)]
pub enum WeightsSource {
    /// A file on disk.
    File(PathBuf),
    /// A model from the verified cache, fetched on first use.
    Fetch(String),
}

/// A compiled pipeline: everything checked, paths resolved, ready to run.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// The pipeline file it came from.
    pub file: PathBuf,
    /// The settings as resolved (after `--set`).
    pub pipeline: Pipeline,
    /// Image folder, resolved.
    pub source_dir: PathBuf,
    /// Architecture.
    pub arch: Arch,
    /// Weights.
    pub weights: WeightsSource,
    /// Tap names recorded, in the model's order.
    pub taps: Vec<String>,
    /// The stimulus, resolved.
    pub stimulus: StimulusSpec,
    /// The scored terms.
    pub terms: TermSet,
    /// Non-fatal findings (an off-bin frequency, a term that aliases...).
    pub warnings: Vec<String>,
    /// `[prune]` evaluation images, resolved.
    pub prune_source: Option<PathBuf>,
}

/// Reads a pipeline file, applies `--set` overrides and compiles it.
pub fn load(file: &Path, sets: &[String]) -> Result<Plan> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    compile_str(&text, file, sets)
}

/// Parses and compiles pipeline text; `file` names it in messages and anchors relative paths.
pub fn compile_str(text: &str, file: &Path, sets: &[String]) -> Result<Plan> {
    let fail = |problems: Vec<String>| Error::Config {
        file: file.to_path_buf(),
        problems,
    };
    let mut table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| fail(vec![format!("not valid TOML: {e}")]))?;
    let mut problems = Vec::new();
    let mut overridden = Vec::new();
    for set in sets {
        match apply_set(&mut table, set) {
            Ok(key) => overridden.push(key),
            Err(p) => problems.push(p),
        }
    }
    let mut unknown = Vec::new();
    let mut track = serde_path_to_error::Track::new();
    let parsed: Option<Pipeline> = {
        let de = serde_path_to_error::Deserializer::new(toml::Value::Table(table), &mut track);
        match serde_ignored::deserialize(de, |path| unknown.push(path.to_string())) {
            Ok(p) => Some(p),
            Err(e) => {
                let path = track.path().to_string();
                problems.push(format!("{path}: {}", e.message()));
                None
            }
        }
    };
    for key in unknown {
        problems.push(format!(
            "unknown setting `{key}`: check its spelling against README.md's pipeline format"
        ));
    }
    let Some(pipeline) = parsed else {
        return Err(fail(problems));
    };
    let base = file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let resolve = |key: &str, p: &Path| -> PathBuf {
        if p.is_absolute() || overridden.iter().any(|k| k == key) {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    };
    let source_dir = resolve("source.path", &pipeline.source.path);
    match pipeline.source.kind {
        SourceKind::Folder if !source_dir.is_dir() => problems.push(format!(
            "source.path: {} is not a folder of images: set source.path to a folder (or --set source.path=DIR)",
            source_dir.display()
        )),
        SourceKind::List if !source_dir.is_file() => problems.push(format!(
            "source.path: list file {} does not exist",
            source_dir.display()
        )),
        SourceKind::Tar | SourceKind::Parquet => {
            if let Err(e) = crate::source::shard_paths(&source_dir) {
                problems.push(format!("source.path: {e}"));
            }
        }
        _ => {}
    }
    if pipeline.source.labels == LabelSource::Folders && pipeline.source.kind != SourceKind::Folder
    {
        problems.push("source.labels = \"folders\" needs a folder source; use \"source\" for the labels a list, tar or parquet source carries".into());
    }
    if pipeline.source.labels == LabelSource::Source && pipeline.source.kind == SourceKind::Folder {
        problems.push("source.labels = \"source\" needs a list, tar or parquet source; use \"folders\" or \"filename\" for a folder".into());
    }
    if pipeline.model.batch_size == 0 {
        problems.push("model.batch_size must be at least 1".into());
    }
    problems.extend(crate::model::device::check(
        &pipeline.model.device,
        &pipeline.model.dtype,
    ));
    let arch = match Arch::parse(&pipeline.model.arch) {
        Ok(a) => Some(a),
        Err(msg) => {
            problems.push(format!("model.arch: {msg}"));
            None
        }
    };
    let weights = if let Some(name) = pipeline.model.weights.strip_prefix("fetch:") {
        if crate::model::fetch::known(name).is_none() {
            problems.push(format!(
                "model.weights: no fetchable model `{name}`; known: {}",
                crate::model::fetch::names().join(", ")
            ));
        }
        WeightsSource::Fetch(name.to_string())
    } else {
        let p = resolve("model.weights", Path::new(&pipeline.model.weights));
        if !p.is_file() {
            problems.push(format!(
                "model.weights: {} does not exist: point model.weights at a checkpoint (or use fetch:<model>, see `freqtag weights list`)",
                p.display()
            ));
        }
        WeightsSource::File(p)
    };
    let taps = match arch {
        Some(arch) => match arch.resolve_taps(&pipeline.model.taps) {
            Ok(t) => t,
            Err(mut msgs) => {
                problems.append(&mut msgs);
                Vec::new()
            }
        },
        None => Vec::new(),
    };
    let mut warnings = Vec::new();
    let input = arch.map(|a| a.input_size()).unwrap_or(32);
    let st = &pipeline.stimulus;
    let mask_path = st.mask.as_ref().map(|m| resolve("stimulus.mask", m));
    let regions = match Regions::from_config(st, mask_path.as_deref(), input) {
        Ok(r) => Some(r),
        Err(msg) => {
            problems.push(msg);
            None
        }
    };
    let stimulus =
        regions.and_then(
            |regions| match StimulusSpec::new(st, regions, &mut warnings) {
                Ok(s) => Some(s),
                Err(mut msgs) => {
                    problems.append(&mut msgs);
                    None
                }
            },
        );
    let sp = &pipeline.spectrum;
    if sp.neighbours == 0 {
        problems.push("spectrum.neighbours must be at least 1".into());
    }
    let terms = stimulus.as_ref().map(|s| {
        TermSet::new(
            &s.frequencies,
            s.fps,
            s.frames,
            sp.harmonics,
            sp.intermod_order,
            &mut warnings,
        )
    });
    let prune_source = pipeline
        .prune
        .as_ref()
        .map(|pr| resolve("prune.source.path", &pr.source.path));
    if let (Some(pr), Some(arch), Some(path)) = (&pipeline.prune, arch, &prune_source) {
        problems.extend(crate::prune::check(pr, arch, terms.as_ref(), path));
    }
    if !problems.is_empty() {
        return Err(fail(problems));
    }
    let (Some(arch), Some(stimulus), Some(terms)) = (arch, stimulus, terms) else {
        return Err(fail(vec!["internal: incomplete plan".into()]));
    };
    Ok(Plan {
        file: file.to_path_buf(),
        pipeline,
        source_dir,
        arch,
        weights,
        taps,
        stimulus,
        terms,
        warnings,
        prune_source,
    })
}

/// Applies one `dotted.key=value` override; returns the key. The value is read as TOML
/// (numbers, booleans, arrays), and as a plain string when it is not valid TOML.
fn apply_set(table: &mut toml::Table, set: &str) -> std::result::Result<String, String> {
    let Some((key, raw)) = set.split_once('=') else {
        return Err(format!(
            "--set {set}: expected key=value, for example --set stimulus.fps=60"
        ));
    };
    let key = key.trim();
    let value = match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or(toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = key.split('.').collect();
    let mut cur = table;
    for part in &parts[..parts.len() - 1] {
        let entry = cur
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = match entry {
            toml::Value::Table(t) => t,
            _ => return Err(format!("--set {key}: `{part}` is not a section")),
        };
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(key.to_string())
}

impl Plan {
    /// Neurons recorded per image: the channels of every tap.
    pub fn neurons(&self) -> usize {
        self.taps
            .iter()
            .filter_map(|t| self.arch.tap_channels(t))
            .sum()
    }

    /// How images are prepared: the model's sizes and normalisation, with `source.pillow`'s
    /// resize order.
    pub fn preprocess(&self) -> crate::model::Preprocess {
        crate::model::Preprocess {
            pillow: self.pipeline.source.pillow,
            ..self.arch.preprocess()
        }
    }

    /// Images in one forward pass on a GPU: `model.device_batch` frames over each image's
    /// distinct frames and its unmodulated one; at least 1.
    pub fn images_per_pass(&self) -> usize {
        let per_image = self.stimulus.distinct_frames().0.len() + 1;
        (self.pipeline.model.device_batch / per_image).max(1)
    }

    /// A human-readable summary of what the run will do, for `freqtag validate`.
    pub fn describe(&self) -> String {
        let s = &self.stimulus;
        let mut out = String::new();
        out.push_str(&format!("pipeline   {}\n", self.file.display()));
        out.push_str(&format!("source     {}\n", self.source_dir.display()));
        let pre = self.preprocess();
        out.push_str(&format!(
            "model      {} ({}x{} input: short side to {}, centre crop, as Pillow {} resizes), weights {}\n",
            self.arch.name(),
            pre.crop,
            pre.crop,
            pre.resize,
            pre.pillow.major(),
            match &self.weights {
                WeightsSource::File(p) => p.display().to_string(),
                WeightsSource::Fetch(n) => format!("fetch:{n}"),
            }
        ));
        if self.pipeline.model.device == "cpu" {
            out.push_str(&format!(
                "convolve   3x3 stride-1 convolutions by {} (model.winograd)\n",
                self.pipeline.model.winograd.describe()
            ));
        }
        out.push_str(&format!(
            "taps       {} ({} neurons): {}\n",
            self.taps.len(),
            self.neurons(),
            abbreviate(&self.taps, 6)
        ));
        out.push_str(&format!(
            "stimulus   {} regions at {:?} Hz, {} frames at {} fps (bin {} Hz), contrast [{}, {}], modulate {:?}, {} distinct frames\n",
            s.regions.count(),
            s.frequencies,
            s.frames,
            s.fps,
            s.fps / s.frames as f64,
            s.smin,
            s.smax,
            s.modulate,
            s.distinct_frames().0.len()
        ));
        out.push_str(&format!(
            "terms      {}\n",
            self.terms
                .terms
                .iter()
                .map(|t| format!(
                    "{}={}Hz{}",
                    t.name,
                    t.alias_hz,
                    if t.aliased { "(aliased)" } else { "" }
                ))
                .collect::<Vec<_>>()
                .join(" ")
        ));
        for w in &self.warnings {
            out.push_str(&format!("warning    {w}\n"));
        }
        out
    }
}

fn abbreviate(items: &[String], n: usize) -> String {
    if items.len() <= n {
        items.join(", ")
    } else {
        format!(
            "{}, ... , {}",
            items[..n - 1].join(", "),
            items[items.len() - 1]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `model.winograd` takes f2 (the default), f4 or off, and names them otherwise.
    #[test]
    fn winograd_takes_a_tile_or_off() {
        use crate::model::winograd::{Setting, Tile};
        let parse = |v: &str| {
            toml::from_str::<ModelConfig>(&format!("arch = \"resnet32\"\nweights = \"w\"\n{v}"))
                .map(|m| m.winograd)
                .map_err(|e| e.to_string())
        };
        assert_eq!(parse(""), Ok(Setting::F2));
        assert_eq!(parse("winograd = \"f4\""), Ok(Setting::F4));
        assert_eq!(parse("winograd = \"off\""), Ok(Setting::Off));
        assert_eq!(Setting::F4.tile(), Some(Tile::F4));
        assert_eq!(Setting::Off.tile(), None);
        let e = parse("winograd = \"f6\"").unwrap_err();
        assert!(
            e.contains("f2") && e.contains("f4") && e.contains("off"),
            "{e}"
        );
    }

    /// `source.pillow` takes a major version as a number or a string (a full version too), and
    /// names what it takes otherwise.
    #[test]
    fn pillow_takes_a_major_version() {
        use crate::model::Pillow;
        let parse = |v: &str| {
            toml::from_str::<SourceConfig>(&format!("path = \"x\"\n{v}"))
                .map(|s| s.pillow)
                .map_err(|e| e.to_string())
        };
        assert_eq!(parse(""), Ok(Pillow::V13));
        assert_eq!(parse("pillow = 12"), Ok(Pillow::V12));
        assert_eq!(parse("pillow = 13"), Ok(Pillow::V13));
        assert_eq!(parse("pillow = \"12.3.0\""), Ok(Pillow::V12));
        assert_eq!(parse("pillow = 12.3"), Ok(Pillow::V12));
        assert_eq!(parse("pillow = 9"), Ok(Pillow::V12));
        for bad in ["pillow = 14", "pillow = \"latest\"", "pillow = -1"] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains("12 (Pillow 12 and earlier) or 13"), "{bad}: {e}");
        }
    }

    #[test]
    fn device_batch_is_sized_for_the_input_and_the_workers_unless_set() {
        let mut m = ModelConfig {
            arch: "resnet32".into(),
            weights: String::new(),
            taps: default_taps(),
            batch_size: 32,
            device: "cuda".into(),
            dtype: "f32".into(),
            device_batch: 0,
            winograd: Default::default(),
        };
        // the card's free memory unknown
        assert_eq!(m.device_batch_for(32, 1, None), 4096);
        assert_eq!(m.device_batch_for(32, 8, None), 4096);
        assert_eq!(m.device_batch_for(32, 16, None), 2048);
        assert_eq!(m.device_batch_for(224, 4, None), 256);
        assert_eq!(m.device_batch_for(224, 64, None), 64);
        // an H100's 79 GB free: half of it over the workers, 200 bytes per pixel and frame
        let h100 = Some(79_000_000_000);
        assert_eq!(m.device_batch_for(32, 16, h100), 4096);
        // at 224x224, about 6 million input pixels a pass, whatever the card and workers
        assert_eq!(m.device_batch_for(224, 16, h100), 119);
        assert_eq!(m.device_batch_for(224, 1, h100), 119);
        assert_eq!(m.device_batch_for(224, 16, Some(143_000_000_000)), 119);
        // a 24 GB card with 16 workers at 224x224: its memory decides
        assert_eq!(m.device_batch_for(224, 16, Some(23_000_000_000)), 71);
        // 32x32 at most 4 096 in f32 (6 million pixels would be 5 859)
        assert_eq!(m.device_batch_for(32, 1, Some(143_000_000_000)), 4096);
        assert_eq!(m.device_batch_for(224, 64, Some(23_000_000_000)), 64);
        // in half precision, up to 8 192
        m.dtype = "f16".into();
        assert_eq!(m.device_batch_for(32, 16, h100), 8192);
        assert_eq!(m.device_batch_for(224, 16, h100), 239);
        m.device_batch = 500;
        assert_eq!(m.device_batch_for(224, 64, h100), 500);
    }
}
