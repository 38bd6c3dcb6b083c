"""Checks that examples/questions.sql (DuckDB) and examples/questions.py (pandas) give the same
answers on a run's output folder, and that the answers are sane.

    python tests/python/check_examples.py OUT

  (a) top neurons at f1+f2: the same (layer, rank, channel) rows, values within 1e-9, at most
      `top` per layer, ranked by descending snr_db_mean, the first equal to the layer's maximum
      read straight from the Parquet files, every layer with an f1+f2 SNR present;
  (b) intermodulation shares: the same counts and shares, shares in [0, 1], neuron counts
      equal to the layer's channels, every layer present;
  (c) per-class differences: the same best and worst classes (a different class is accepted
      only for an exact tie, within 1e-12), values within 1e-9, spread >= 0, every layer
      present; on a run without labels both must say so (the SQL's note row, pandas' empty
      frame).

Then negative controls: each comparison is run again on deliberately damaged pandas answers
and must report a disagreement, so a check that can no longer fail is itself a failure.
Exit code 0: all agree; 1: any disagreement or failed check; 2: OUT unreadable.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import sys
from pathlib import Path

import duckdb
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
SQL_FILE = ROOT / "examples" / "questions.sql"
PY_FILE = ROOT / "examples" / "questions.py"
TOL = 1e-9
TOP = 5
THRESHOLD_DB = 3.0


def load_questions():
    """examples/questions.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("freqtag_questions", PY_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_sql(out: str) -> list[pd.DataFrame]:
    """Every result set of questions.sql, in order, with `out` and the settings preset."""
    con = duckdb.connect()
    con.execute("SET VARIABLE out = ?", [out])
    con.execute("SET VARIABLE top_n = ?", [TOP])
    con.execute("SET VARIABLE im_threshold_db = ?", [THRESHOLD_DB])
    results = []
    for stmt in duckdb.extract_statements(SQL_FILE.read_text()):
        rel = con.execute(stmt)
        if stmt.type == duckdb.StatementType.SELECT:
            results.append(rel.df())
    return results


def close(x, y, tol=TOL) -> bool:
    """Equal within `tol`, both missing counting as equal."""
    x_missing = x is None or (isinstance(x, float) and math.isnan(x)) or x is pd.NA
    y_missing = y is None or (isinstance(y, float) and math.isnan(y)) or y is pd.NA
    if x_missing or y_missing:
        return x_missing and y_missing
    return abs(float(x) - float(y)) <= tol


def layers_with_f1f2(scores: pd.DataFrame) -> set:
    rows = scores[(scores.term == "f1+f2") & scores.label.isna() & scores.snr_db_mean.notna()]
    return set(rows.layer)


def compare_top(sql: pd.DataFrame, py: pd.DataFrame, scores: pd.DataFrame) -> list[str]:
    """(a): problems found, empty when the answers agree and are sane."""
    bad = []
    expected_layers = layers_with_f1f2(scores)
    if expected_layers and (sql.empty or py.empty):
        bad.append(f"(a) empty answer (sql {len(sql)} rows, pandas {len(py)} rows)")
    for name, df in (("sql", sql), ("pandas", py)):
        if set(df.layer) != expected_layers:
            missing = sorted(expected_layers - set(df.layer))
            extra = sorted(set(df.layer) - expected_layers)
            bad.append(f"(a) {name}: layers missing {missing[:3]}, unexpected {extra[:3]}")
        for layer, g in df.groupby("layer"):
            if len(g) > TOP or list(g["rank"]) != list(range(1, len(g) + 1)):
                bad.append(f"(a) {name}: {layer} ranks {list(g['rank'])}")
            if not g["snr_db_mean"].is_monotonic_decreasing:
                bad.append(f"(a) {name}: {layer} not in descending snr_db_mean")
    # Independent of both: the rank-1 value is the layer's maximum in the raw table.
    raw = scores[(scores.term == "f1+f2") & scores.label.isna()].groupby("layer").snr_db_mean.max()
    for name, df in (("sql", sql), ("pandas", py)):
        for row in df[df["rank"] == 1].itertuples():
            if not close(row.snr_db_mean, raw.get(row.layer)):
                bad.append(f"(a) {name}: {row.layer} rank 1 is {row.snr_db_mean}, "
                           f"the layer's maximum is {raw.get(row.layer)}")
    key = ["layer", "rank"]
    m = sql.merge(py, on=key, how="outer", suffixes=("_sql", "_py"), indicator="side")
    for row in m.itertuples():
        if row.side != "both":
            bad.append(f"(a) {row.layer} rank {row.rank}: only in {row.side}")
            continue
        if row.channel_sql != row.channel_py:
            bad.append(f"(a) {row.layer} rank {row.rank}: channel {row.channel_sql} (sql) "
                       f"vs {row.channel_py} (pandas)")
        for col in ("snr_db_mean", "snr_db_std", "snr_mean", "n_images"):
            a, b = getattr(row, col + "_sql"), getattr(row, col + "_py")
            if not close(a, b):
                bad.append(f"(a) {row.layer} rank {row.rank} {col}: {a} (sql) vs {b} (pandas)")
    return bad


def compare_share(sql: pd.DataFrame, py: pd.DataFrame, scores: pd.DataFrame) -> list[str]:
    """(b): problems found."""
    bad = []
    everything = scores[scores.label.isna()]
    channels = everything.groupby("layer").channel.nunique()
    for name, df in (("sql", sql), ("pandas", py)):
        if df.empty:
            bad.append(f"(b) {name}: empty answer")
        if set(df.layer) != set(channels.index):
            bad.append(f"(b) {name}: layers {len(set(df.layer))}, the run has {len(channels)}")
        for row in df.itertuples():
            if not 0.0 <= row.share <= 1.0 or not 0 <= row.responsive <= row.neurons:
                bad.append(f"(b) {name}: {row.layer} share {row.share} "
                           f"({row.responsive} of {row.neurons})")
            if row.neurons != channels.get(row.layer):
                bad.append(f"(b) {name}: {row.layer} has {row.neurons} neurons, "
                           f"the run {channels.get(row.layer)}")
            if not close(row.share, row.responsive / row.neurons if row.neurons else float("nan")):
                bad.append(f"(b) {name}: {row.layer} share {row.share} is not "
                           f"{row.responsive}/{row.neurons}")
    m = sql.merge(py, on="layer", how="outer", suffixes=("_sql", "_py"), indicator="side")
    for row in m.itertuples():
        if row.side != "both":
            bad.append(f"(b) {row.layer}: only in {row.side}")
            continue
        for col in ("neurons", "responsive"):
            a, b = getattr(row, col + "_sql"), getattr(row, col + "_py")
            if a != b:
                bad.append(f"(b) {row.layer} {col}: {a} (sql) vs {b} (pandas)")
        if not close(row.share_sql, row.share_py, 1e-12):
            bad.append(f"(b) {row.layer} share: {row.share_sql} (sql) vs {row.share_py} (pandas)")
    return bad


def compare_classes(sql: pd.DataFrame, py: pd.DataFrame, scores: pd.DataFrame) -> list[str]:
    """(c): problems found."""
    bad = []
    labelled = scores[scores.label.notna()]
    if labelled.empty:
        # Both must say "no labels": the SQL by one note row, pandas by an empty frame.
        if not (len(sql) == 1 and sql.layer.isna().all() and isinstance(sql.note.iloc[0], str)
                and "no labelled rows" in sql.note.iloc[0]):
            bad.append(f"(c) sql: the run has no labels, but the answer is not the note row "
                       f"({len(sql)} rows)")
        if not py.empty:
            bad.append(f"(c) pandas: the run has no labels, but the answer has {len(py)} rows")
        return bad
    layers = set(scores.layer)
    classes = labelled.groupby("layer").label.nunique()
    for name, df in (("sql", sql), ("pandas", py)):
        if df.empty:
            bad.append(f"(c) {name}: empty answer although the run has labels")
        if set(df.layer) != layers:
            bad.append(f"(c) {name}: layers {len(set(df.layer.dropna()))}, the run has {len(layers)}")
        for row in df.itertuples():
            if row.classes != classes.get(row.layer):
                bad.append(f"(c) {name}: {row.layer} has {row.classes} classes, "
                           f"the run {classes.get(row.layer)}")
            if not row.spread_db >= 0 or not close(row.spread_db,
                                                   row.best_mean_snr_db - row.worst_mean_snr_db):
                bad.append(f"(c) {name}: {row.layer} spread {row.spread_db}")
    # Class means per layer, to judge whether a differing class is a genuine tie.
    per_neuron = (labelled.groupby(["layer", "channel", "label"]).mean_snr_db_mean.min()
                  .reset_index())
    class_mean = per_neuron.groupby(["layer", "label"]).mean_snr_db_mean.mean()
    m = sql.merge(py, on="layer", how="outer", suffixes=("_sql", "_py"), indicator="side")
    for row in m.itertuples():
        if row.side != "both":
            bad.append(f"(c) {row.layer}: only in {row.side}")
            continue
        for which in ("best", "worst"):
            a, b = getattr(row, f"{which}_class_sql"), getattr(row, f"{which}_class_py")
            if a != b and not close(class_mean.get((row.layer, a)),
                                    class_mean.get((row.layer, b)), 1e-12):
                bad.append(f"(c) {row.layer} {which} class: {a} (sql) vs {b} (pandas)")
        for col in ("best_mean_snr_db", "worst_mean_snr_db", "spread_db", "between_class_sd",
                    "classes", "best_class_images"):
            a, b = getattr(row, col + "_sql"), getattr(row, col + "_py")
            if not close(a, b):
                bad.append(f"(c) {row.layer} {col}: {a} (sql) vs {b} (pandas)")
    return bad


def negative_controls(answers, scores) -> tuple[int, list[str]]:
    """Damages the pandas answers in ways a real bug would; returns how many damages were
    tried and those that the comparisons did NOT catch (each should be caught)."""
    (sa, pa_), (sb, pb), (sc, pc) = answers
    missed = []
    tried = 0

    def expect_caught(what, compare, sql, py):
        nonlocal tried
        tried += 1
        if not compare(sql, py, scores):
            missed.append(what)

    if not pa_.empty:
        d = pa_.copy()
        d.loc[d.index[0], "snr_db_mean"] += 1e-6
        expect_caught("(a) value off by 1e-6", compare_top, sa, d)
        d = pa_.copy()
        d.loc[d.index[0], "channel"] += 1
        expect_caught("(a) wrong channel", compare_top, sa, d)
        expect_caught("(a) a layer dropped", compare_top, sa, pa_[pa_.layer != pa_.layer.iloc[0]])
    d = pb.copy()
    d.loc[d.index[0], "responsive"] += 1
    d["share"] = d.responsive / d.neurons
    expect_caught("(b) one more responsive neuron", compare_share, sb, d)
    d = pb.copy()
    d.loc[d.index[-1], "share"] = 1.5
    expect_caught("(b) share out of [0, 1]", compare_share, sb, d)
    expect_caught("(b) empty answer", compare_share, sb, pb.iloc[0:0])
    if not pc.empty:
        d = pc.copy()
        labels = sorted(scores.label.dropna().unique())
        # A class that is not the best one (labels has at least one other when classes > 1).
        other = next((int(l) for l in labels if int(l) != d.best_class.iloc[0]), None)
        if other is not None:
            d.loc[d.index[0], "best_class"] = other
            expect_caught("(c) wrong best class", compare_classes, sc, d)
        expect_caught("(c) empty answer", compare_classes, sc, pc.iloc[0:0])
    else:
        expect_caught("(c) rows where the run has no labels", compare_classes, sc,
                      sb[["layer"]].assign(best_class=0))
    return tried, missed


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = argv[1]
    q = load_questions()
    try:
        scores = q.load_scores(out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    sql = run_sql(out)
    if len(sql) != 3:
        print(f"FAIL: questions.sql gave {len(sql)} result sets, expected 3")
        return 1
    py = [q.top_neurons(scores, n=TOP), q.intermod_share(scores, THRESHOLD_DB),
          q.class_differences(scores)]
    answers = list(zip(sql, py))

    problems = (compare_top(*answers[0], scores) + compare_share(*answers[1], scores)
                + compare_classes(*answers[2], scores))

    # The script's own entry point must run too (its printing is not compared).
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = q.main([out, "--top", str(TOP), "--threshold-db", str(THRESHOLD_DB)])
    if rc != 0 or "(c)" not in printed.getvalue():
        problems.append(f"questions.py main exited {rc}")

    tried, missed = negative_controls(answers, scores)
    problems += [f"negative control not caught: {m}" for m in missed]

    (sa, _), (sb, _), (sc, _) = answers
    print(f"check_examples: {out}: {scores.layer.nunique()} layers, "
          f"{len(scores)} score rows")
    print(f"  (a) {len(sa)} rows over {sa.layer.nunique()} layers; best f1+f2 neuron: "
          + (f"{sa.loc[sa.snr_db_mean.idxmax(), 'layer']} channel "
             f"{sa.loc[sa.snr_db_mean.idxmax(), 'channel']} "
             f"({sa.snr_db_mean.max():.2f} dB)" if not sa.empty else "none"))
    print(f"  (b) shares over {len(sb)} layers: min {sb.share.min():.3f}, "
          f"median {sb.share.median():.3f}, max {sb.share.max():.3f}; "
          f"{int(sb.responsive.sum())} of {int(sb.neurons.sum())} neurons respond")
    if sc.layer.notna().any():
        top = sc.best_class.value_counts()
        print(f"  (c) {len(sc)} layers, {int(sc.classes.max())} classes; most frequent best "
              f"class {top.index[0]} ({top.iloc[0]} layers); spread "
              f"{sc.spread_db.min():.3f} to {sc.spread_db.max():.3f} dB")
    else:
        print("  (c) no labels in this run (both say so)")
    print(f"  negative controls: {tried - len(missed)} of {tried} damaged answers caught")
    if problems:
        print(f"FAIL: {len(problems)} problems")
        for p in problems[:40]:
            print(f"  {p}")
        if len(problems) > 40:
            print(f"  ... and {len(problems) - 40} more")
        return 1
    print("OK: DuckDB and pandas agree on (a), (b) and (c)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
