//! `freqtag report OUT`: a self-contained HTML page of a run's outputs, with its figures as SVG
//! files beside it (no network, no scripts but one that counts the loaded figures).
//!
//! In: a run's output folder (`run.json`, `scores/`, optionally `spectra/`, `prune/`). Out:
//! `OUT/report/index.html` and `OUT/report/*.svg`, written to a staging folder and renamed into
//! place. The page shows the run's settings and counts, the spectra of the most responsive (and
//! chosen) neurons with the scored bins marked, a heatmap of SNR (dB) by layer and channel for
//! each term, the distribution of the authors' mean dB-SNR per layer, the most and least
//! responsive neurons, and the pruning curves when `freqtag prune` has run.

pub mod svg;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write;
use std::path::{Path, PathBuf};

use arrow_array::{
    Array, ArrayRef, Float16Array, Float32Array, Float64Array, Int32Array, Int64Array, ListArray,
    RecordBatch, StringArray,
};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use crate::error::{Error, Result};
use svg::esc;

/// The Parquet files of `table` in a run folder (and in its `process-*` folders).
pub fn table_files(out: &Path, table: &str) -> Vec<PathBuf> {
    let mut dirs = vec![out.join(table)];
    if let Ok(rd) = std::fs::read_dir(out) {
        let mut p: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.is_dir()
                    && p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("process-"))
            })
            .map(|p| p.join(table))
            .collect();
        p.sort();
        dirs.extend(p);
    }
    let mut files = Vec::new();
    for d in dirs {
        if let Ok(rd) = std::fs::read_dir(&d) {
            let mut f: Vec<PathBuf> = rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
                .collect();
            f.sort();
            files.extend(f);
        }
    }
    files
}

/// Reads `columns` of every file of `table` (all columns when empty), calling `each` per batch
/// until it returns `false`; returns the number of files.
pub fn scan(
    out: &Path,
    table: &str,
    columns: &[&str],
    mut each: impl FnMut(&RecordBatch) -> Result<bool>,
) -> Result<usize> {
    let files = table_files(out, table);
    for f in &files {
        let bad = |msg: String| Error::Output {
            file: f.clone(),
            msg,
        };
        let file = std::fs::File::open(f).map_err(|e| Error::io(f, e))?;
        let b = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| bad(format!("not a readable Parquet file: {e}")))?;
        let b = if columns.is_empty() {
            b
        } else {
            let schema = b.schema().clone();
            let mut roots = Vec::new();
            for c in columns {
                roots.push(schema.index_of(c).map_err(|_| {
                    bad(format!(
                        "no column `{c}`: not a table of this freqtag version"
                    ))
                })?);
            }
            let mask = ProjectionMask::roots(b.parquet_schema(), roots);
            b.with_projection(mask)
        };
        for batch in b.build().map_err(|e| bad(e.to_string()))? {
            if !each(&batch.map_err(|e| bad(e.to_string()))?)? {
                return Ok(files.len());
            }
        }
    }
    Ok(files.len())
}

/// Column `name` of `b` as array type `T`; an error names the column.
pub fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> Result<&'a T> {
    b.column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| Error::Output {
            file: PathBuf::from(name),
            msg: "missing or unexpected column type".into(),
        })
}

fn f64s(a: &ArrayRef) -> Vec<f64> {
    if let Some(x) = a.as_any().downcast_ref::<Float32Array>() {
        x.values().iter().map(|v| *v as f64).collect()
    } else if let Some(x) = a.as_any().downcast_ref::<Float16Array>() {
        x.values().iter().map(|v| v.to_f64()).collect()
    } else if let Some(x) = a.as_any().downcast_ref::<Float64Array>() {
        x.values().to_vec()
    } else {
        Vec::new()
    }
}

/// One row of `scores/` for all images.
#[derive(Debug, Clone)]
struct ScoreRow {
    layer: String,
    channel: usize,
    term: String,
    kind: String,
    alias_hz: f64,
    snr_db: Option<f64>,
    mean_snr_db: Option<f64>,
}

fn opt(a: &Float64Array, i: usize) -> Option<f64> {
    (!a.is_null(i) && a.value(i).is_finite()).then(|| a.value(i))
}

/// Writes the report of the run in `out`; returns the page's path. `top`: how many of the most
/// responsive neurons get a spectrum; `chosen`: more neurons as `layer:channel`.
pub fn write(out: &Path, top: usize, chosen: &[String]) -> Result<PathBuf> {
    let run_json = Some(out.join("run.json"))
        .filter(|p| p.is_file())
        .or_else(|| {
            let mut p: Vec<PathBuf> = std::fs::read_dir(out)
                .ok()?
                .flatten()
                .map(|e| e.path().join("run.json"))
                .filter(|p| p.is_file())
                .collect();
            p.sort();
            p.into_iter().next()
        })
        .ok_or_else(|| Error::Output {
            file: out.join("run.json"),
            msg: "no run.json: not the output folder of a finished freqtag run".into(),
        })?;
    let run: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&run_json).map_err(|e| Error::io(&run_json, e))?,
    )
    .map_err(|e| Error::Output {
        file: run_json.clone(),
        msg: format!("unreadable: {e}"),
    })?;
    let taps: Vec<String> = run["resolved"]["taps"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let bin_hz = run["resolved"]["bin_hz"].as_f64().unwrap_or(1.0);

    // scores for all images
    let mut rows: Vec<ScoreRow> = Vec::new();
    let mut per_class: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
    let n_files = scan(out, "scores", &[], |b| {
        let layer = col::<StringArray>(b, "layer")?;
        let ch = col::<Int32Array>(b, "channel")?;
        let term = col::<StringArray>(b, "term")?;
        let kind = col::<StringArray>(b, "term_kind")?;
        let alias = col::<Float64Array>(b, "alias_hz")?;
        let label = col::<Int64Array>(b, "label")?;
        let snr_db = col::<Float64Array>(b, "snr_db_mean")?;
        let msd = col::<Float64Array>(b, "mean_snr_db_mean")?;
        for i in 0..b.num_rows() {
            if !label.is_null(i) {
                // one value per (neuron, class): mean_snr_db repeats on every term row
                if i == 0 || term.value(i) == term.value(0) {
                    if let Some(v) = opt(msd, i) {
                        per_class.entry(label.value(i)).or_default().push(v);
                    }
                }
                continue;
            }
            rows.push(ScoreRow {
                layer: layer.value(i).to_string(),
                channel: ch.value(i) as usize,
                term: term.value(i).to_string(),
                kind: kind.value(i).to_string(),
                alias_hz: alias.value(i),
                snr_db: opt(snr_db, i),
                mean_snr_db: opt(msd, i),
            });
        }
        Ok(true)
    })?;
    if n_files == 0 || rows.is_empty() {
        return Err(Error::Output {
            file: out.join("scores"),
            msg: "no scores: the run has not finished (or wrote nothing); run or --resume it first"
                .into(),
        });
    }
    let layer_order: Vec<String> = {
        let present: HashSet<&str> = rows.iter().map(|r| r.layer.as_str()).collect();
        let mut v: Vec<String> = taps
            .iter()
            .filter(|t| present.contains(t.as_str()))
            .cloned()
            .collect();
        let mut extra: Vec<String> = present
            .into_iter()
            .filter(|l| !taps.iter().any(|t| t == l))
            .map(String::from)
            .collect();
        extra.sort();
        v.extend(extra);
        v
    };
    let mut terms: Vec<(String, String, f64)> = Vec::new();
    for r in &rows {
        if !terms.iter().any(|t| t.0 == r.term) {
            terms.push((r.term.clone(), r.kind.clone(), r.alias_hz));
        }
    }
    let first_term = terms[0].0.clone();
    // one row per neuron: the authors' mean dB-SNR
    let mut neurons: Vec<(&str, usize, f64)> = rows
        .iter()
        .filter(|r| r.term == first_term)
        .filter_map(|r| r.mean_snr_db.map(|v| (r.layer.as_str(), r.channel, v)))
        .collect();
    neurons.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(b.0)).then(a.1.cmp(&b.1)));

    let staging = out.join(format!(".report.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    let save = |name: &str, svg_text: String| -> Result<String> {
        let file = format!("{name}.svg");
        crate::sink::write_atomic(&staging.join(&file), &svg_text)?;
        Ok(file)
    };

    // spectra of the top and chosen neurons
    let mut wanted: Vec<(String, usize)> = neurons
        .iter()
        .take(top)
        .map(|n| (n.0.to_string(), n.1))
        .collect();
    for c in chosen {
        let Some((l, ch)) = c.rsplit_once(':') else {
            return Err(Error::Output {
                file: PathBuf::from(c),
                msg: "--neuron expects LAYER:CHANNEL, for example layer1.0.conv1:3".into(),
            });
        };
        let ch: usize = ch.parse().map_err(|_| Error::Output {
            file: PathBuf::from(c),
            msg: "--neuron: the channel after `:` must be a number".into(),
        })?;
        if !rows.iter().any(|r| r.layer == l && r.channel == ch) {
            return Err(Error::Output {
                file: PathBuf::from(c),
                msg: format!(
                    "--neuron: the run has no neuron {l}:{ch} (see scores/ for its layers)"
                ),
            });
        }
        if !wanted.iter().any(|w| w.0 == l && w.1 == ch) {
            wanted.push((l.to_string(), ch));
        }
    }
    let want_set: HashMap<(String, usize), usize> = wanted
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, w)| (w, i))
        .collect();
    // per wanted neuron: summed amplitude per bin, images
    let mut sums: Vec<(BTreeMap<usize, f64>, usize)> = vec![(BTreeMap::new(), 0); wanted.len()];
    let spectra_files = table_files(out, "spectra").len();
    if spectra_files > 0 && !wanted.is_empty() {
        scan(
            out,
            "spectra",
            &["layer", "channel", "bins", "amplitude"],
            |b| {
                let layer = col::<StringArray>(b, "layer")?;
                let ch = col::<Int32Array>(b, "channel")?;
                let bins = col::<ListArray>(b, "bins")?;
                let amp = col::<ListArray>(b, "amplitude")?;
                for i in 0..b.num_rows() {
                    let key = (layer.value(i).to_string(), ch.value(i) as usize);
                    let Some(&w) = want_set.get(&key) else {
                        continue;
                    };
                    if sums[w].1 >= MAX_SPECTRUM_IMAGES {
                        continue;
                    }
                    let a = f64s(&amp.value(i));
                    let idx: Vec<usize> = if bins.is_null(i) {
                        (0..a.len()).collect()
                    } else {
                        let v = bins.value(i);
                        v.as_any()
                            .downcast_ref::<Int32Array>()
                            .map(|x| x.values().iter().map(|b| *b as usize).collect())
                            .unwrap_or_default()
                    };
                    for (k, v) in idx.into_iter().zip(a) {
                        *sums[w].0.entry(k).or_default() += v;
                    }
                    sums[w].1 += 1;
                }
                // enough images for a mean spectrum of every wanted neuron: stop reading
                Ok(sums.iter().any(|s| s.1 < MAX_SPECTRUM_IMAGES))
            },
        )?;
    }
    let mut spectrum_figs = Vec::new();
    for (i, (l, ch)) in wanted.iter().enumerate() {
        let (s, n) = &sums[i];
        if *n == 0 {
            continue;
        }
        let nb = s.keys().max().map_or(0, |m| m + 1);
        let mut amp = vec![0f64; nb];
        for (k, v) in s {
            amp[*k] = v / *n as f64;
        }
        let marks: Vec<svg::Mark> = terms
            .iter()
            .map(|t| svg::Mark {
                hz: t.2,
                kind: t.1.clone(),
                label: t.0.clone(),
            })
            .collect();
        let score = neurons
            .iter()
            .find(|x| x.0 == l && x.1 == *ch)
            .map(|x| format!(", mean dB-SNR {:.1}", x.2))
            .unwrap_or_default();
        let title = format!("{l} channel {ch}: mean amplitude over {n} images{score}");
        let file = save(
            &format!("spectrum-{}", i + 1),
            svg::spectrum_chart(&title, bin_hz, &amp, &marks),
        )?;
        spectrum_figs.push((file, title));
    }

    // SNR heatmaps, one per term
    let mut heat_figs = Vec::new();
    for (ti, (t, kind, hz)) in terms.iter().enumerate() {
        let mut by_layer: HashMap<&str, Vec<Option<f64>>> = HashMap::new();
        for r in rows.iter().filter(|r| &r.term == t) {
            let v = by_layer.entry(r.layer.as_str()).or_default();
            if v.len() <= r.channel {
                v.resize(r.channel + 1, None);
            }
            v[r.channel] = r.snr_db;
        }
        let hrows: Vec<(String, Vec<Option<f64>>)> = layer_order
            .iter()
            .filter_map(|l| by_layer.remove(l.as_str()).map(|v| (l.clone(), v)))
            .collect();
        let title = format!("SNR at {t} ({kind}, {hz} Hz) by layer and channel, mean over images");
        let file = save(
            &format!("snr-heatmap-{}", ti + 1),
            svg::heatmap(&title, &hrows, "channel", "SNR (dB)", None),
        )?;
        heat_figs.push((file, title));
    }

    // distribution of mean dB-SNR per layer
    let groups: Vec<(String, Vec<f64>)> = layer_order
        .iter()
        .map(|l| {
            (
                l.clone(),
                neurons.iter().filter(|n| n.0 == l).map(|n| n.2).collect(),
            )
        })
        .collect();
    let dist_title = "The authors' mean dB-SNR per neuron, by layer (mean over images)".to_string();
    let dist = save(
        "score-distribution",
        svg::box_plot(&dist_title, &groups, "mean dB-SNR"),
    )?;
    let class_fig = if per_class.len() > 1 {
        let g: Vec<(String, Vec<f64>)> = per_class
            .iter()
            .map(|(l, v)| (format!("class {l}"), v.clone()))
            .collect();
        let t = "mean dB-SNR per neuron, by the class of the images".to_string();
        Some((
            save("score-by-class", svg::box_plot(&t, &g, "mean dB-SNR"))?,
            t,
        ))
    } else {
        None
    };

    // pruning curves
    let prune_dir = out.join("prune");
    let prune_svg = prune_dir.join("curves.svg");
    let prune = if prune_svg.is_file() {
        let text = std::fs::read_to_string(&prune_svg).map_err(|e| Error::io(&prune_svg, e))?;
        let file = save("prune-curves", text)?;
        let meta: serde_json::Value = std::fs::read_to_string(prune_dir.join("prune.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        Some((file, meta))
    } else {
        None
    };

    // the page
    let mut h = String::new();
    let title = format!(
        "freqtag report: {} on {}",
        run["resolved"]["arch"].as_str().unwrap_or("?"),
        run["resolved"]["source"].as_str().unwrap_or("?")
    );
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{}</style></head><body>\n<h1>{}</h1>\n<p id=\"status\">figures: loading</p>\n",
        esc(&title),
        CSS,
        esc(&title)
    );
    let c = &run["counts"];
    let st = &run["resolved"];
    let _ = write!(
        h,
        "<h2>Run</h2><table><tr><th>pipeline</th><td>{}</td></tr><tr><th>model</th><td>{}</td></tr><tr><th>images</th><td>{} processed of {} listed, {} skipped</td></tr><tr><th>stimulus</th><td>frequencies {} Hz, {} regions, bins of {} Hz, {} distinct frames</td></tr><tr><th>layers</th><td>{} taps, {} neurons scored</td></tr><tr><th>speed</th><td>{:.2} images/s, {} workers, peak memory {:.0} MB</td></tr></table>",
        esc(run["pipeline_file"].as_str().unwrap_or("?")),
        esc(st["arch"].as_str().unwrap_or("?")),
        c["images_processed"], c["images_listed"], c["skipped"],
        esc(&run["pipeline"]["stimulus"]["frequencies"].to_string()),
        esc(st["regions"].as_str().unwrap_or("?")),
        bin_hz,
        st["distinct_frames"],
        layer_order.len(),
        neurons.len(),
        run["images_per_s"].as_f64().unwrap_or(0.0),
        run["workers"],
        run["peak_rss_mb"].as_f64().unwrap_or(0.0),
    );
    if let Some(note) = run["scoring"]["note"].as_str() {
        let _ = writeln!(h, "<p class=\"note\">Scoring: {}</p>", esc(note));
    }
    h.push_str("<h2>Spectra of the most responsive neurons</h2>\n");
    if spectrum_figs.is_empty() {
        h.push_str("<p class=\"note\">No spectra in this run (output.spectra = \"none\"): run with spectra to see them here.</p>\n");
    }
    for (f, t) in &spectrum_figs {
        let _ = writeln!(h, "<figure><img src=\"{f}\" alt=\"{}\"></figure>", esc(t));
    }
    h.push_str("<h2>Most and least responsive neurons (mean dB-SNR)</h2>\n<div class=\"row\">");
    for (name, list) in [
        ("most", neurons.iter().take(10).collect::<Vec<_>>()),
        ("least", neurons.iter().rev().take(10).collect::<Vec<_>>()),
    ] {
        let _ = write!(h, "<table><tr><th colspan=\"3\">{name} responsive</th></tr><tr><th>layer</th><th>channel</th><th>mean dB-SNR</th></tr>");
        for n in list {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{:.2}</td></tr>",
                esc(n.0),
                n.1,
                n.2
            );
        }
        h.push_str("</table>");
    }
    h.push_str("</div>\n<h2>Score distribution per layer</h2>\n");
    let _ = writeln!(
        h,
        "<figure><img src=\"{dist}\" alt=\"{}\"></figure>",
        esc(&dist_title)
    );
    if let Some((f, t)) = &class_fig {
        let _ = writeln!(h, "<figure><img src=\"{f}\" alt=\"{}\"></figure>", esc(t));
    }
    h.push_str("<h2>SNR by layer and channel, per term</h2>\n");
    for (f, t) in &heat_figs {
        let _ = writeln!(h, "<figure><img src=\"{f}\" alt=\"{}\"></figure>", esc(t));
    }
    if let Some((f, meta)) = &prune {
        let _ = write!(
            h,
            "<h2>Pruning</h2>\n<p>Top-1 accuracy without fine-tuning on {} images (unpruned {:.2} %), {} candidate filters.</p><figure><img src=\"{f}\" alt=\"pruning curves\"></figure>\n",
            meta["n_images"], 100.0 * meta["baseline_accuracy"].as_f64().unwrap_or(0.0), meta["n_candidates"]
        );
    }
    let _ = write!(
        h,
        "<h2>Settings</h2><details><summary>run.json</summary><pre>{}</pre></details>\n<script>{}</script>\n</body></html>\n",
        esc(&serde_json::to_string_pretty(&run).unwrap_or_default()),
        SCRIPT
    );
    crate::sink::write_atomic(&staging.join("index.html"), &h)?;
    let dest = out.join("report");
    let old = out.join(format!(".report.old-{}", std::process::id()));
    if dest.exists() {
        std::fs::rename(&dest, &old).map_err(|e| Error::io(&dest, e))?;
    }
    std::fs::rename(&staging, &dest).map_err(|e| Error::io(&dest, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(dest.join("index.html"))
}

/// Images averaged into a drawn spectrum at most: a huge run's `spectra/` is not read whole.
const MAX_SPECTRUM_IMAGES: usize = 256;

const CSS: &str = "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse;margin:0 1em 1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}.row{display:flex;flex-wrap:wrap}.note{color:#555;font-style:italic}figure{margin:1em 0}img{max-width:100%}";

/// Counts the figures that loaded, for people (the status line) and for the browser test
/// (`data-images-loaded` on `<body>`).
const SCRIPT: &str = "window.addEventListener('load',function(){var im=document.images,ok=0;for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0)ok++;}document.body.setAttribute('data-images-loaded',ok+'/'+im.length);document.getElementById('status').textContent=(ok===im.length?'all '+ok+' figures loaded':(im.length-ok)+' of '+im.length+' figures failed to load');});";
