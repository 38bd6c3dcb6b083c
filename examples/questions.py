"""Questions users ask of a freqtag run, answered with pandas and pyarrow.

    python examples/questions.py OUT [--top N] [--threshold-db DB]

OUT is the folder given to `freqtag run --out` (default out/<pipeline name>). The same three
questions as examples/questions.sql, with the same definitions (tests/python/check_examples.py
checks that the two agree):

  (a) the top neurons of each layer by mean SNR at the intermodulation term f1+f2;
  (b) the share of neurons per layer with an intermodulation response;
  (c) per layer, the class whose images give the highest mean of mean_snr_db, and the spread
      between classes.

Everything is read from scores/, the per-(layer, channel, term, label group) aggregates (label
missing = over all images). Each function takes that table and returns a DataFrame, so the
answers can be used from other code:

    import questions
    scores = questions.load_scores("out/paper-resnet32-cifar10")
    questions.top_neurons(scores)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

# The work folder of an unfinished run (see `--resume`); its parts are not results yet.
WORK_FOLDER = ".freqtag"
# The columns that identify one row of scores/.
KEY = ["layer", "channel", "term", "label"]
NO_LABELS = ('no labelled rows in scores/: the images carry no labels (source.labels = "none") '
             "or the run had output.per_class = false")


def score_parts(out: str) -> list[str]:
    """Every Parquet part of scores/ under `out`, in both layouts: OUT/scores/ (one process)
    and OUT/process-<i>/scores/ (a cluster run, where each process writes the score keys it
    owns). Parts inside a `.freqtag` work folder are left out. Same rule as questions.sql."""
    parts = []
    for folder, subfolders, files in os.walk(out):
        subfolders[:] = [d for d in subfolders if d != WORK_FOLDER]  # do not descend into it
        if os.path.basename(folder) == "scores":
            parts += [os.path.join(folder, f) for f in files
                      if f.endswith(".parquet") and not f.startswith(".")]
    return sorted(parts)


def load_scores(out: str) -> pd.DataFrame:
    """scores/ of the run in `out` as one DataFrame (labels as nullable integers)."""
    parts = score_parts(out)
    if not parts:
        raise FileNotFoundError(f"no scores/*.parquet under {out!r}: is it a freqtag output folder?")
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    scores = table.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)
    dup = scores.duplicated(KEY)
    if dup.any():
        # A folder holding a one-process run and a cluster run (or two cluster runs) would
        # otherwise count rows twice.
        first = scores.loc[dup, KEY].iloc[0].to_dict()
        raise ValueError(f"{out!r} holds {int(dup.sum())} duplicate score rows (e.g. {first}): "
                         "it mixes the outputs of more than one run; point at one of them")
    return scores


def layer_order(name: str) -> tuple:
    """Sort key putting layers in network order: numeric parts of the dotted name compare as
    numbers (features.2 before features.10). Same rule as questions.sql."""
    return tuple(p.zfill(12) if re.fullmatch(r"[0-9]+", p) else p for p in name.split("."))


def _by_layer(df: pd.DataFrame, *then: str) -> pd.DataFrame:
    """`df` sorted by layer in network order, then by the columns `then`."""
    order = df["layer"].map(layer_order)
    df = df.assign(_order=order).sort_values(["_order", *then], kind="stable")
    return df.drop(columns="_order").reset_index(drop=True)


def top_neurons(scores: pd.DataFrame, term: str = "f1+f2", n: int = 5) -> pd.DataFrame:
    """(a) The `n` neurons of each layer with the highest mean SNR at `term`, over all images.

    "Mean SNR" is snr_db_mean: the mean over images of the standard SNR in dB, i.e. the
    geometric mean of the SNRs, so one image with a huge ratio cannot carry a neuron to the
    top (snr_mean, the plain mean of the ratio, is shown beside it). The lattice-aware SNR is
    not used: without stimulus noise it measures float rounding (run.json,
    scoring.rounding_sensitive). Ties go to the lower channel; neurons with no SNR at the term
    are not ranked. Empty when the run has no such term."""
    rows = scores[(scores["term"] == term) & scores["label"].isna()
                  & scores["snr_db_mean"].notna()]
    rows = rows.sort_values(["layer", "snr_db_mean", "channel"], ascending=[True, False, True])
    rows = rows.assign(rank=rows.groupby("layer").cumcount() + 1)
    top = rows[rows["rank"] <= n]
    cols = ["layer", "rank", "channel", "snr_db_mean", "snr_db_std", "snr_mean", "n_images"]
    return _by_layer(top[cols], "rank")


def intermod_share(scores: pd.DataFrame, threshold_db: float = 3.0) -> pd.DataFrame:
    """(b) Per layer: neurons, those with an intermodulation response, and their share.

    A neuron has an intermodulation response when, at one or more intermodulation terms
    (term_kind "intermod"), its mean over all images of the standard SNR in dB (snr_db_mean)
    is at least `threshold_db`: 3 dB by default, a geometric-mean SNR of about 2, the term's
    amplitude twice the mean of its neighbourhood. Terms without an SNR (their neighbourhood
    leaves the spectrum, like f2-f1 = 1.5 Hz at 0.5 Hz bins) cannot count. See
    questions.sql for why this definition."""
    everything = scores[scores["label"].isna()]
    intermod = everything[everything["term_kind"] == "intermod"]
    best = intermod.groupby(["layer", "channel"])["snr_db_mean"].max()
    neurons = everything[["layer", "channel"]].drop_duplicates()
    per_neuron = neurons.merge(best.rename("best").reset_index(), how="left",
                               on=["layer", "channel"])
    per_neuron["responds"] = per_neuron["best"] >= threshold_db  # a missing SNR is False
    out = (per_neuron.groupby("layer")
           .agg(neurons=("channel", "size"), responsive=("responds", "sum"))
           .reset_index())
    out["neurons"] = out["neurons"].astype("int64")
    out["responsive"] = out["responsive"].astype("int64")
    out["share"] = out["responsive"] / out["neurons"]
    return _by_layer(out)


def class_differences(scores: pd.DataFrame) -> pd.DataFrame:
    """(c) Per layer: the class with the highest and the lowest mean of mean_snr_db, the
    spread (best minus worst) and the sample sd of the class means.

    mean_snr_db is one value per (image, neuron), repeated on each term row, so one row per
    (layer, channel, label) is kept; a class's mean in a layer is the mean over the layer's
    neurons. Ties go to the lower label. Empty (no rows) when scores/ has no labelled rows."""
    cols = ["layer", "classes", "best_class", "best_mean_snr_db", "best_class_images",
            "worst_class", "worst_mean_snr_db", "spread_db", "between_class_sd"]
    labelled = scores[scores["label"].notna()]
    if labelled.empty:
        return pd.DataFrame(columns=cols)
    per_neuron = (labelled.groupby(["layer", "channel", "label"])
                  .agg(mean_snr_db=("mean_snr_db_mean", "min"), n_images=("n_images", "min"))
                  .reset_index())
    per_class = (per_neuron.groupby(["layer", "label"])
                 .agg(mean_snr_db=("mean_snr_db", "mean"), n_images=("n_images", "max"))
                 .reset_index())
    rows = []
    for layer, g in per_class.groupby("layer"):
        best = g.sort_values(["mean_snr_db", "label"], ascending=[False, True]).iloc[0]
        worst = g.sort_values(["mean_snr_db", "label"], ascending=[True, True]).iloc[0]
        rows.append({
            "layer": layer,
            "classes": len(g),
            "best_class": int(best["label"]),
            "best_mean_snr_db": float(best["mean_snr_db"]),
            "best_class_images": int(best["n_images"]),
            "worst_class": int(worst["label"]),
            "worst_mean_snr_db": float(worst["mean_snr_db"]),
            "spread_db": float(best["mean_snr_db"] - worst["mean_snr_db"]),
            "between_class_sd": float(g["mean_snr_db"].std(ddof=1)) if len(g) > 1 else np.nan,
        })
    return _by_layer(pd.DataFrame(rows, columns=cols))


def run_notes(out: str) -> list[str]:
    """Caveats from run.json (the first one found, as cluster runs write one per process)."""
    found = sorted(glob.glob(os.path.join(glob.escape(out), "run.json"))
                   + glob.glob(os.path.join(glob.escape(out), "process-*", "run.json")))
    if not found:
        return []
    with open(found[0]) as f:
        run = json.load(f)
    scoring = run.get("scoring", {})
    notes = []
    sensitive = scoring.get("rounding_sensitive") or []
    if "mean_snr_db" in sensitive:
        notes.append("run without stimulus noise: mean_snr_db (question c) is rounding-sensitive "
                     "(METHOD.md section 3); the standard SNR of (a) and (b) is not")
    return notes


def _show(df: pd.DataFrame) -> str:
    with pd.option_context("display.width", 200, "display.max_columns", None,
                           "display.float_format", "{:.4f}".format):
        return df.to_string(index=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="the run's output folder (freqtag run --out)")
    ap.add_argument("--top", type=int, default=5, help="neurons per layer in (a) (default 5)")
    ap.add_argument("--threshold-db", type=float, default=3.0,
                    help="intermodulation threshold of (b), dB of the standard SNR (default 3)")
    args = ap.parse_args(argv)
    try:
        scores = load_scores(args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    layers = scores["layer"].nunique()
    images = scores.loc[scores["label"].isna(), "n_images"].max()
    print(f"{args.out}: {layers} layers, {images} images")
    for note in run_notes(args.out):
        print(f"note: {note}")

    a = top_neurons(scores, n=args.top)
    print(f"\n(a) top {args.top} neurons per layer by mean SNR (dB) at f1+f2, over all images")
    print(_show(a) if not a.empty else "    no f1+f2 term with an SNR in this run")

    b = intermod_share(scores, args.threshold_db)
    print(f"\n(b) neurons with an intermodulation response: mean SNR >= {args.threshold_db:g} dB "
          "at some intermod term")
    unscored = sorted(set(scores.loc[scores["term_kind"] == "intermod", "term"])
                      - set(scores.loc[(scores["term_kind"] == "intermod")
                                       & scores["snr_db_mean"].notna(), "term"]))
    if unscored:
        print(f"    (no SNR at {', '.join(unscored)}: the neighbourhood leaves the spectrum)")
    print(_show(b))

    c = class_differences(scores)
    print("\n(c) per layer, the class with the highest mean of mean_snr_db, and the spread")
    print(_show(c) if not c.empty else f"    {NO_LABELS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
