//! Pruning evaluation: does the ranking find the filters that matter? Filters are removed by a
//! selector (a run's scores, random, L1 norm, batch-norm scale) at a list of fractions, without
//! fine-tuning, and top-1 accuracy is measured on labelled images the scores did not see.
//!
//! In: a pipeline with a `[prune]` section, the `scores/` of a finished run of it, the weights.
//! Out: `curves.parquet` (one row per selector, seed and fraction), `classes.parquet` (per-class
//! accuracy), `filters.parquet` (what was pruned), `images.parquet` (the evaluation set),
//! `curves.svg` and `prune.json`, written together into `OUT/prune/` (a staging folder renamed
//! into place, so a reader never sees half a result).

pub mod select;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow_array::builder::{Float64Builder, Int32Builder, Int64Builder, StringBuilder};
use arrow_array::{Array, ArrayRef, Float64Array, Int32Array, Int64Array, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::config::{LabelSource, Plan, SourceConfig};
use crate::error::{Error, Result};
use crate::model::{weights, ConvRole, Network, TapGroup};
use crate::report::{col as report_col, svg};
use crate::sink::{self, Part};
use crate::source::{self, Locator, Skipped};
pub use select::{Candidate, Scope, Selector};

/// `[prune]`: how to test a ranking by pruning.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PruneConfig {
    /// The labelled evaluation images (a `[source]` table; relative paths resolve against the
    /// pipeline file's folder).
    pub source: SourceConfig,
    /// Leave out evaluation images that are also in the pipeline's `[source]` (the images the
    /// scores came from).
    #[serde(default = "yes")]
    pub exclude_scored: bool,
    /// Selectors compared: `score-high`, `score-low`, `random`, `l1-norm`, `bn-scale`.
    #[serde(default = "all_selectors")]
    pub selectors: Vec<Selector>,
    /// The score that ranks (a `scores/` column without `_mean`): `mean_snr_db` (the authors'
    /// score, the default), `snr`, `snr_lattice`, `z`, `amplitude`... Its mean over images.
    #[serde(default = "default_rank_by")]
    pub rank_by: String,
    /// The term whose score ranks (`f1`, `f1+f2`...); needed for per-term scores, ignored for
    /// `mean_snr_db`, which is the same on every term row.
    #[serde(default)]
    pub term: Option<String>,
    /// Fractions of the candidate filters removed (0 is always measured, as the baseline).
    #[serde(default = "default_fractions")]
    pub fractions: Vec<f64>,
    /// Seeds of the random selector: 0 to seeds-1.
    #[serde(default = "default_seeds")]
    pub seeds: u64,
    /// `global` (one ranking across layers) or `layer` (the same fraction of every layer).
    #[serde(default)]
    pub scope: Scope,
    /// `zero` (the conv's weights and bias, as the method's authors did) or `silence` (also the
    /// following batch norm's scale and shift, so the channel outputs exactly zero).
    #[serde(default)]
    pub mode: Mode,
    /// Convolutions never pruned: `stem`, `residual_last` (the last conv of every residual
    /// branch) or layer names.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Images per forward pass.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
}

fn yes() -> bool {
    true
}
fn all_selectors() -> Vec<Selector> {
    Selector::ALL.to_vec()
}
fn default_rank_by() -> String {
    "mean_snr_db".into()
}
fn default_fractions() -> Vec<f64> {
    vec![0.05, 0.1, 0.2, 0.3, 0.5]
}
fn default_seeds() -> u64 {
    3
}
fn default_batch() -> usize {
    128
}

/// How a pruned filter is removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Zero the convolution's weights (and bias).
    #[default]
    Zero,
    /// Also zero the following batch norm's scale and shift.
    Silence,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Zero => "zero",
            Mode::Silence => "silence",
        }
    }
}

/// Checks a `[prune]` section; every problem is returned. `taps`: the architecture's taps.
pub fn check(
    pr: &PruneConfig,
    arch: crate::model::Arch,
    terms: Option<&crate::score::TermSet>,
    source_path: &Path,
) -> Vec<String> {
    let mut p = Vec::new();
    if !source_path.exists() {
        p.push(format!(
            "prune.source.path: {} does not exist: point it at labelled evaluation images",
            source_path.display()
        ));
    }
    if pr.source.labels == LabelSource::None {
        p.push(
            "prune.source.labels: accuracy needs labels; set it to folders, filename or source"
                .into(),
        );
    }
    if pr.selectors.is_empty() {
        p.push("prune.selectors is empty: name at least one of score-high, score-low, random, l1-norm, bn-scale".into());
    }
    for f in &pr.fractions {
        if !(0.0..=1.0).contains(f) {
            p.push(format!(
                "prune.fractions: {f} is not a fraction between 0 and 1"
            ));
        }
    }
    if pr.selectors.contains(&Selector::Random) && pr.seeds == 0 {
        p.push("prune.seeds must be at least 1 when the random selector is used".into());
    }
    if pr.batch_size == 0 {
        p.push("prune.batch_size must be at least 1".into());
    }
    if !crate::score::SCORE_NAMES.contains(&pr.rank_by.as_str()) {
        p.push(format!(
            "prune.rank_by: unknown score `{}`; one of {}",
            pr.rank_by,
            crate::score::SCORE_NAMES.join(", ")
        ));
    } else if pr.rank_by != "mean_snr_db" {
        match (&pr.term, terms) {
            (None, _) => p.push(format!(
                "prune.term: rank_by = \"{}\" is scored per term; set prune.term (for example \"f1+f2\")",
                pr.rank_by
            )),
            (Some(t), Some(ts)) if !ts.terms.iter().any(|x| &x.name == t) => p.push(format!(
                "prune.term: no term `{t}` in this pipeline; terms: {}",
                ts.terms.iter().map(|x| x.name.as_str()).collect::<Vec<_>>().join(", ")
            )),
            _ => {}
        }
    }
    let convs: Vec<String> = arch
        .taps()
        .into_iter()
        .filter(|t| t.group == TapGroup::Conv)
        .map(|t| t.name)
        .collect();
    for e in &pr.exclude {
        if e != "stem" && e != "residual_last" && !convs.contains(e) {
            p.push(format!(
                "prune.exclude: `{e}` is not `stem`, `residual_last` or a convolution of {} (see `freqtag models {}`)",
                arch.name(),
                arch.name()
            ));
        }
    }
    p
}

/// One measured configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// Selector name.
    pub selector: &'static str,
    /// Seed (random only).
    pub seed: Option<u64>,
    /// Fraction asked for.
    pub fraction: f64,
    /// Filters removed.
    pub n_pruned: usize,
    /// Correct predictions.
    pub correct: usize,
    /// Top-1 accuracy.
    pub accuracy: f64,
    /// Per label: (images, correct).
    #[serde(skip)]
    pub per_class: BTreeMap<i64, (usize, usize)>,
    /// The pruned filters, in removal order: (layer, channel).
    #[serde(skip)]
    pub filters: Vec<(String, usize)>,
}

/// What a prune run did.
#[derive(Debug, Clone, Serialize)]
pub struct PruneSummary {
    /// Output folder.
    pub out: PathBuf,
    /// Evaluation images used.
    pub n_images: usize,
    /// Evaluation images left out because the scores saw them.
    pub n_excluded: usize,
    /// Candidate filters.
    pub n_candidates: usize,
    /// Unpruned accuracy.
    pub baseline_accuracy: f64,
    /// Every configuration.
    pub points: Vec<Point>,
    /// Unreadable evaluation images.
    pub skipped: Vec<Skipped>,
    /// Seconds.
    pub wall_s: f64,
}

/// The scores of a finished run: `(layer, channel) -> mean of rank_by over all images`.
pub fn read_scores(
    scores_dir: &Path,
    rank_by: &str,
    term: Option<&str>,
) -> Result<HashMap<(String, usize), Option<f64>>> {
    let col = format!("{rank_by}_mean");
    let mut out = HashMap::new();
    let columns = ["layer", "channel", "term", "label", col.as_str()];
    let files = crate::report::scan(scores_dir, "scores", &columns, |batch| {
        let layer = report_col::<StringArray>(batch, "layer")?;
        let ch = report_col::<Int32Array>(batch, "channel")?;
        let tm = report_col::<StringArray>(batch, "term")?;
        let lab = report_col::<Int64Array>(batch, "label")?;
        let v = report_col::<Float64Array>(batch, &col)?;
        for i in 0..batch.num_rows() {
            if !lab.is_null(i) || term.is_some_and(|t| tm.value(i) != t) {
                continue;
            }
            let value = (!v.is_null(i)).then(|| v.value(i));
            out.entry((layer.value(i).to_string(), ch.value(i) as usize))
                .or_insert(value);
        }
        Ok(true)
    })?;
    if files == 0 {
        return Err(Error::Output {
            file: scores_dir.join("scores"),
            msg: "no scores here: run the pipeline first (`freqtag run PIPELINE --out OUT`) and pass --scores OUT".into(),
        });
    }
    if out.is_empty() {
        return Err(Error::Output {
            file: scores_dir.join("scores"),
            msg: format!(
                "no rows for all images{}: was the run made with this pipeline?",
                term.map(|t| format!(" at term {t}")).unwrap_or_default()
            ),
        });
    }
    Ok(out)
}

/// Evaluation images, decoded and preprocessed: `[n, 3, S, S]` flat, with labels and ids.
struct EvalSet {
    pixels: Vec<f32>,
    labels: Vec<i64>,
    ids: Vec<String>,
    paths: Vec<String>,
    excluded: usize,
    skipped: Vec<Skipped>,
}

fn locator_key(l: &Locator) -> String {
    match l {
        Locator::File(p) => std::fs::canonicalize(p)
            .unwrap_or_else(|_| p.clone())
            .display()
            .to_string(),
        other => format!("{other:?}"),
    }
}

fn load_eval(plan: &Plan, pr: &PruneConfig, eval_path: &Path) -> EvalSet {
    let (refs, mut skipped, warning) = source::list_checked(eval_path, &pr.source);
    if let Some(w) = warning {
        // the evaluation's accuracy rests on these labels
        tracing::warn!("[prune] {w}");
    }
    let scored: HashSet<String> = if pr.exclude_scored {
        let (r, _) = source::list(&plan.source_dir, &plan.pipeline.source);
        r.iter().map(|r| locator_key(&r.loc)).collect()
    } else {
        HashSet::new()
    };
    let before = refs.len();
    let refs: Vec<_> = refs
        .into_iter()
        .filter(|r| !scored.contains(&locator_key(&r.loc)))
        .collect();
    let excluded = before - refs.len();
    let pre = plan.preprocess();
    let decoded: Vec<_> = refs
        .par_iter()
        .map(|r| source::prepare(&r.loc, pre))
        .collect();
    let mut set = EvalSet {
        pixels: Vec::new(),
        labels: Vec::new(),
        ids: Vec::new(),
        paths: Vec::new(),
        excluded,
        skipped: Vec::new(),
    };
    for (r, d) in refs.iter().zip(decoded) {
        match (d, r.label) {
            (Ok(px), Some(label)) => {
                set.pixels.extend(px);
                set.labels.push(label);
                set.ids.push(r.id.clone());
                set.paths.push(match &r.loc {
                    Locator::File(p) => locator_key(&Locator::File(p.clone())),
                    other => format!("{other:?}"),
                });
            }
            (Err(reason), _) => skipped.push(Skipped {
                id: r.id.clone(),
                reason,
            }),
            (Ok(_), None) => skipped.push(Skipped {
                id: r.id.clone(),
                reason: "no label (prune.source.labels)".into(),
            }),
        }
    }
    set.skipped = skipped;
    set
}

/// Predicted classes of every evaluation image.
fn predict(
    net: &Network,
    set: &EvalSet,
    side: usize,
    mean: [f32; 3],
    std: [f32; 3],
    batch: usize,
) -> Result<Vec<i64>> {
    let frame = 3 * side * side;
    let n = set.labels.len();
    let mut preds = Vec::with_capacity(n);
    let mut buf = vec![0f32; batch.min(n.max(1)) * frame];
    for start in (0..n).step_by(batch) {
        let b = batch.min(n - start);
        for i in 0..b {
            let src = &set.pixels[(start + i) * frame..(start + i + 1) * frame];
            let dst = &mut buf[i * frame..(i + 1) * frame];
            for c in 0..3 {
                let plane = side * side;
                for k in 0..plane {
                    dst[c * plane + k] = (src[c * plane + k] - mean[c]) / std[c];
                }
            }
        }
        let x = Tensor::from_slice(&buf[..b * frame], (b, 3, side, side), &Device::Cpu)?;
        let logits = net.forward(&x, &mut crate::model::Recorder::new(&[]))?;
        let am = logits.argmax(1)?.to_vec1::<u32>()?;
        preds.extend(am.into_iter().map(i64::from));
    }
    Ok(preds)
}

/// Zeroes channels of a `[cout, ...]` tensor.
fn zero_channels(t: &Tensor, chans: &[usize]) -> Result<Tensor> {
    let cout = t.dim(0)?;
    let mut m = vec![1f32; cout];
    for &c in chans {
        m[c] = 0.0;
    }
    let mut shape = vec![1usize; t.rank()];
    shape[0] = cout;
    let mask = Tensor::from_vec(m, shape, t.device())?;
    Ok(t.broadcast_mul(&mask)?)
}

/// Runs the pruning evaluation of `plan`'s `[prune]` section with the scores in `scores_dir`,
/// writing into `out`.
pub fn run(plan: &Plan, scores_dir: &Path, out: &Path) -> Result<PruneSummary> {
    let t0 = Instant::now();
    let pr = plan.pipeline.prune.clone().ok_or_else(|| Error::Config {
        file: plan.file.clone(),
        problems: vec!["no [prune] section: add one naming the labelled evaluation images (see README.md, Pruning)".into()],
    })?;
    let eval_path = plan.prune_source.clone().unwrap_or_default();
    let weights_file = crate::dataflow::weights_path(plan)?;
    let tensors = weights::load(&weights_file)?;

    // candidates: the convolutions of the model the run scored, minus exclusions
    let needs_scores = pr
        .selectors
        .iter()
        .any(|s| matches!(s, Selector::ScoreHigh | Selector::ScoreLow));
    let scores = if needs_scores {
        let term = (pr.rank_by != "mean_snr_db")
            .then_some(pr.term.as_deref())
            .flatten();
        Some(read_scores(scores_dir, &pr.rank_by, term)?)
    } else {
        None
    };
    let taps: Vec<_> = plan
        .arch
        .taps()
        .into_iter()
        .filter(|t| t.group == TapGroup::Conv)
        .filter(|t| !pr.exclude.contains(&t.name))
        .filter(|t| !(t.role == ConvRole::Stem && pr.exclude.iter().any(|e| e == "stem")))
        .filter(|t| {
            !(t.role == ConvRole::ResidualLast && pr.exclude.iter().any(|e| e == "residual_last"))
        })
        .filter(|t| {
            scores
                .as_ref()
                .is_none_or(|s| s.contains_key(&(t.name.clone(), 0)))
        })
        .collect();
    if taps.is_empty() {
        return Err(Error::Config {
            file: plan.file.clone(),
            problems: vec!["prune: no convolution is left to prune (were the convolutions tapped in the run? see prune.exclude)".into()],
        });
    }
    if pr.selectors.contains(&Selector::BnScale) {
        if let Some(t) = taps.iter().find(|t| t.bn.is_none()) {
            return Err(Error::Config {
                file: plan.file.clone(),
                problems: vec![format!(
                    "prune.selectors: bn-scale ranks by the batch norm after each convolution, and {} of {} has none; drop bn-scale or exclude that layer",
                    t.name,
                    plan.arch.name()
                )],
            });
        }
    }
    let mut cands = Vec::new();
    for (l, t) in taps.iter().enumerate() {
        for c in 0..t.channels {
            cands.push(Candidate {
                layer: l,
                channel: c,
            });
        }
    }
    let layer_of = |c: &Candidate| taps[c.layer].name.clone();
    // the values each selector ranks by
    let weight_of = |name: &str| -> Result<&Tensor> {
        tensors.get(name).ok_or_else(|| Error::Weights {
            file: weights_file.clone(),
            msg: format!("no tensor `{name}`"),
        })
    };
    let mut l1 = Vec::with_capacity(cands.len());
    let mut bn = Vec::with_capacity(cands.len());
    for t in &taps {
        let w = weight_of(&format!("{}.weight", t.name))?;
        let v = w.abs()?.flatten_from(1)?.sum(1)?.to_vec1::<f32>()?;
        l1.extend(v.into_iter().map(|x| Some(x as f64)));
        match &t.bn {
            Some(b) => {
                let g = weight_of(&format!("{b}.weight"))?.abs()?.to_vec1::<f32>()?;
                bn.extend(g.into_iter().map(|x| Some(x as f64)));
            }
            None => bn.extend(std::iter::repeat_n(None, t.channels)),
        }
    }
    let score_vals: Vec<Option<f64>> = cands
        .iter()
        .map(|c| {
            scores
                .as_ref()
                .and_then(|s| s.get(&(layer_of(c), c.channel)).copied().flatten())
        })
        .collect();

    let set = load_eval(plan, &pr, &eval_path);
    if set.labels.is_empty() {
        return Err(Error::Config {
            file: plan.file.clone(),
            problems: vec![format!(
                "prune: no usable labelled evaluation images in {} ({} skipped, {} left out as scored)",
                eval_path.display(),
                set.skipped.len(),
                set.excluded
            )],
        });
    }
    for s in &set.skipped {
        tracing::warn!(image = %s.id, "skipped: {}", s.reason);
    }
    tracing::info!(
        images = set.labels.len(),
        excluded = set.excluded,
        candidates = cands.len(),
        "pruning evaluation"
    );
    let pre = plan.preprocess();
    let side = pre.crop as usize;
    let batch = pr.batch_size;
    let evaluate = |pruned: &[usize]| -> Result<Vec<i64>> {
        let mut edited = tensors.clone();
        let mut by_layer: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for &i in pruned {
            by_layer
                .entry(cands[i].layer)
                .or_default()
                .push(cands[i].channel);
        }
        for (l, chans) in by_layer {
            let t = &taps[l];
            let mut names = vec![format!("{}.weight", t.name), format!("{}.bias", t.name)];
            if pr.mode == Mode::Silence {
                if let Some(b) = &t.bn {
                    names.push(format!("{b}.weight"));
                    names.push(format!("{b}.bias"));
                }
            }
            for n in names {
                if let Some(w) = edited.get(&n) {
                    let z = zero_channels(w, &chans)?;
                    edited.insert(n, z);
                }
            }
        }
        let net = Network::from_tensors_with(
            plan.arch,
            &weights_file,
            edited,
            &Device::Cpu,
            candle_core::DType::F32,
            plan.pipeline.model.winograd,
        )?;
        predict(&net, &set, side, pre.mean, pre.std, batch)
    };
    let tally = |preds: &[i64]| {
        let mut per: BTreeMap<i64, (usize, usize)> = BTreeMap::new();
        let mut correct = 0;
        for (p, l) in preds.iter().zip(&set.labels) {
            let e = per.entry(*l).or_default();
            e.0 += 1;
            if p == l {
                e.1 += 1;
                correct += 1;
            }
        }
        (correct, per)
    };
    let base_preds = evaluate(&[])?;
    let (base_correct, base_per) = tally(&base_preds);
    let n = set.labels.len();
    let baseline_accuracy = base_correct as f64 / n as f64;
    tracing::info!(
        "unpruned: {:.2} % top-1 on {n} images",
        100.0 * baseline_accuracy
    );

    let mut fractions: Vec<f64> = pr.fractions.iter().copied().filter(|f| *f > 0.0).collect();
    fractions.sort_by(f64::total_cmp);
    fractions.dedup();
    let mut runs: Vec<(Selector, Option<u64>, Vec<usize>)> = Vec::new();
    for s in &pr.selectors {
        match s {
            Selector::ScoreHigh => runs.push((*s, None, select::order_by(&score_vals, true))),
            Selector::ScoreLow => runs.push((*s, None, select::order_by(&score_vals, false))),
            Selector::L1Norm => runs.push((*s, None, select::order_by(&l1, false))),
            Selector::BnScale => runs.push((*s, None, select::order_by(&bn, false))),
            Selector::Random => {
                for seed in 0..pr.seeds {
                    runs.push((*s, Some(seed), select::random_order(cands.len(), seed)));
                }
            }
        }
    }
    let mut points = Vec::new();
    for (sel, seed, order) in &runs {
        points.push(Point {
            selector: sel.name(),
            seed: *seed,
            fraction: 0.0,
            n_pruned: 0,
            correct: base_correct,
            accuracy: baseline_accuracy,
            per_class: base_per.clone(),
            filters: Vec::new(),
        });
        for &f in &fractions {
            let t = Instant::now();
            let pruned = select::take(&cands, order, f, pr.scope);
            let preds = evaluate(&pruned)?;
            let (correct, per_class) = tally(&preds);
            let accuracy = correct as f64 / n as f64;
            tracing::info!(
                "{}{} {:.0} % pruned ({} filters): {:.2} % top-1 [{:.1} s]",
                sel.name(),
                seed.map(|s| format!(" seed {s}")).unwrap_or_default(),
                100.0 * f,
                pruned.len(),
                100.0 * accuracy,
                t.elapsed().as_secs_f64()
            );
            points.push(Point {
                selector: sel.name(),
                seed: *seed,
                fraction: f,
                n_pruned: pruned.len(),
                correct,
                accuracy,
                per_class,
                filters: pruned
                    .iter()
                    .map(|&i| (layer_of(&cands[i]), cands[i].channel))
                    .collect(),
            });
        }
    }
    let summary = PruneSummary {
        out: out.to_path_buf(),
        n_images: n,
        n_excluded: set.excluded,
        n_candidates: cands.len(),
        baseline_accuracy,
        points,
        skipped: set.skipped.clone(),
        wall_s: t0.elapsed().as_secs_f64(),
    };
    write_outputs(plan, &pr, &summary, &set, scores_dir, out)?;
    Ok(summary)
}

fn f(name: &str, dt: DataType, nullable: bool) -> Field {
    Field::new(name, dt, nullable)
}

/// Schema of `curves.parquet`.
pub fn curves_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        f("selector", DataType::Utf8, false),
        f("rank_by", DataType::Utf8, true),
        f("seed", DataType::Int64, true),
        f("scope", DataType::Utf8, false),
        f("mode", DataType::Utf8, false),
        f("fraction", DataType::Float64, false),
        f("n_pruned", DataType::Int64, false),
        f("n_candidates", DataType::Int64, false),
        f("n_images", DataType::Int64, false),
        f("correct", DataType::Int64, false),
        f("accuracy", DataType::Float64, false),
    ]))
}

fn write_outputs(
    plan: &Plan,
    pr: &PruneConfig,
    s: &PruneSummary,
    set: &EvalSet,
    scores_dir: &Path,
    out: &Path,
) -> Result<()> {
    let staging = out.with_file_name(format!(
        ".{}.tmp-{}",
        out.file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "prune".into()),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    let rank_by = match &pr.term {
        Some(t) if pr.rank_by != "mean_snr_db" => format!("{}@{t}", pr.rank_by),
        _ => pr.rank_by.clone(),
    };
    // curves
    let mut sel = StringBuilder::new();
    let mut rb = StringBuilder::new();
    let mut seed = Int64Builder::new();
    let mut scope = StringBuilder::new();
    let mut mode = StringBuilder::new();
    let mut frac = Float64Builder::new();
    let mut npr = Int64Builder::new();
    let mut ncand = Int64Builder::new();
    let mut nimg = Int64Builder::new();
    let mut corr = Int64Builder::new();
    let mut acc = Float64Builder::new();
    for p in &s.points {
        sel.append_value(p.selector);
        rb.append_option(p.selector.starts_with("score").then_some(&rank_by));
        seed.append_option(p.seed.map(|x| x as i64));
        scope.append_value(match pr.scope {
            Scope::Global => "global",
            Scope::Layer => "layer",
        });
        mode.append_value(pr.mode.name());
        frac.append_value(p.fraction);
        npr.append_value(p.n_pruned as i64);
        ncand.append_value(s.n_candidates as i64);
        nimg.append_value(s.n_images as i64);
        corr.append_value(p.correct as i64);
        acc.append_value(p.accuracy);
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(sel.finish()),
        Arc::new(rb.finish()),
        Arc::new(seed.finish()),
        Arc::new(scope.finish()),
        Arc::new(mode.finish()),
        Arc::new(frac.finish()),
        Arc::new(npr.finish()),
        Arc::new(ncand.finish()),
        Arc::new(nimg.finish()),
        Arc::new(corr.finish()),
        Arc::new(acc.finish()),
    ];
    write_table(&staging, "curves.parquet", curves_schema(), cols)?;

    // per class
    let mut sel = StringBuilder::new();
    let mut seed = Int64Builder::new();
    let mut frac = Float64Builder::new();
    let mut label = Int64Builder::new();
    let mut nimg = Int64Builder::new();
    let mut corr = Int64Builder::new();
    let mut acc = Float64Builder::new();
    for p in &s.points {
        for (l, (n, c)) in &p.per_class {
            sel.append_value(p.selector);
            seed.append_option(p.seed.map(|x| x as i64));
            frac.append_value(p.fraction);
            label.append_value(*l);
            nimg.append_value(*n as i64);
            corr.append_value(*c as i64);
            acc.append_value(*c as f64 / *n as f64);
        }
    }
    let schema = Arc::new(Schema::new(vec![
        f("selector", DataType::Utf8, false),
        f("seed", DataType::Int64, true),
        f("fraction", DataType::Float64, false),
        f("label", DataType::Int64, false),
        f("n_images", DataType::Int64, false),
        f("correct", DataType::Int64, false),
        f("accuracy", DataType::Float64, false),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(sel.finish()),
        Arc::new(seed.finish()),
        Arc::new(frac.finish()),
        Arc::new(label.finish()),
        Arc::new(nimg.finish()),
        Arc::new(corr.finish()),
        Arc::new(acc.finish()),
    ];
    write_table(&staging, "classes.parquet", schema, cols)?;

    // pruned filters
    let mut sel = StringBuilder::new();
    let mut seed = Int64Builder::new();
    let mut frac = Float64Builder::new();
    let mut layer = StringBuilder::new();
    let mut chan = Int32Builder::new();
    let mut rank = Int32Builder::new();
    for p in &s.points {
        for (r, (l, c)) in p.filters.iter().enumerate() {
            sel.append_value(p.selector);
            seed.append_option(p.seed.map(|x| x as i64));
            frac.append_value(p.fraction);
            layer.append_value(l);
            chan.append_value(*c as i32);
            rank.append_value(r as i32);
        }
    }
    let schema = Arc::new(Schema::new(vec![
        f("selector", DataType::Utf8, false),
        f("seed", DataType::Int64, true),
        f("fraction", DataType::Float64, false),
        f("layer", DataType::Utf8, false),
        f("channel", DataType::Int32, false),
        f("rank", DataType::Int32, false),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(sel.finish()),
        Arc::new(seed.finish()),
        Arc::new(frac.finish()),
        Arc::new(layer.finish()),
        Arc::new(chan.finish()),
        Arc::new(rank.finish()),
    ];
    write_table(&staging, "filters.parquet", schema, cols)?;

    // the evaluation set
    let mut id = StringBuilder::new();
    let mut path = StringBuilder::new();
    let mut label = Int64Builder::new();
    for i in 0..set.ids.len() {
        id.append_value(&set.ids[i]);
        path.append_value(&set.paths[i]);
        label.append_value(set.labels[i]);
    }
    let schema = Arc::new(Schema::new(vec![
        f("image_id", DataType::Utf8, false),
        f("path", DataType::Utf8, false),
        f("label", DataType::Int64, false),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(id.finish()),
        Arc::new(path.finish()),
        Arc::new(label.finish()),
    ];
    write_table(&staging, "images.parquet", schema, cols)?;

    // the plot: mean over seeds with the min-max band for random
    let mut series = Vec::new();
    let mut names: Vec<&str> = Vec::new();
    for p in &s.points {
        if !names.contains(&p.selector) {
            names.push(p.selector);
        }
    }
    for name in names {
        let mut by_f: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
        for p in s.points.iter().filter(|p| p.selector == name) {
            by_f.entry(p.fraction.to_bits())
                .or_default()
                .push(100.0 * p.accuracy);
        }
        let mut pts = Vec::new();
        let mut band = Vec::new();
        let mut fr: Vec<(f64, Vec<f64>)> = by_f
            .into_iter()
            .map(|(k, v)| (f64::from_bits(k), v))
            .collect();
        fr.sort_by(|a, b| a.0.total_cmp(&b.0));
        let multi = fr.iter().any(|(_, v)| v.len() > 1);
        for (x, v) in fr {
            let m = v.iter().sum::<f64>() / v.len() as f64;
            pts.push((100.0 * x, m));
            if multi {
                let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                band.push((100.0 * x, lo, hi));
            }
        }
        let label = match name {
            "random" => format!("random ({} seeds)", pr.seeds),
            n => n.to_string(),
        };
        series.push(svg::Series {
            name: label,
            points: pts,
            band,
        });
    }
    let title = format!(
        "{}: top-1 after pruning (scores: {rank_by}; {} scope, mode {}, {} images)",
        plan.arch.name(),
        match pr.scope {
            Scope::Global => "global",
            Scope::Layer => "per-layer",
        },
        pr.mode.name(),
        s.n_images
    );
    let chart = svg::line_chart(
        &title,
        "filters pruned (%)",
        "top-1 accuracy (%)",
        &series,
        None,
    );
    sink::write_atomic(&staging.join("curves.svg"), &chart)?;
    let meta = serde_json::json!({
        "freqtag_version": env!("CARGO_PKG_VERSION"),
        "pipeline_file": plan.file,
        "arch": plan.arch.name(),
        "scores_from": scores_dir,
        "settings": pr,
        "n_images": s.n_images,
        "n_excluded_as_scored": s.n_excluded,
        "n_candidates": s.n_candidates,
        "baseline_accuracy": s.baseline_accuracy,
        "skipped": s.skipped,
        "wall_s": s.wall_s,
    });
    sink::write_atomic(
        &staging.join("prune.json"),
        &serde_json::to_string_pretty(&meta).unwrap_or_default(),
    )?;
    // swap the folder in
    let old = out.with_file_name(format!(".prune.old-{}", std::process::id()));
    if out.exists() {
        std::fs::rename(out, &old).map_err(|e| Error::io(out, e))?;
    }
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    std::fs::rename(&staging, out).map_err(|e| Error::io(out, e))?;
    if old.exists() {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(())
}

fn write_table(dir: &Path, name: &str, schema: SchemaRef, cols: Vec<ArrayRef>) -> Result<()> {
    let mut part = Part::create(dir, name, schema.clone())?;
    part.write(&sink::batch(schema, cols)?)?;
    part.finish()
}
