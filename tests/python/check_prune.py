"""Checks a `freqtag prune` output folder against its own settings, the run's scores and the
checkpoint, independently of the Rust code:

- every configuration's n_pruned equals its rows in filters.parquet, and per-class correct
  counts add up to the overall count (read with pandas, recounted with DuckDB);
- the number pruned follows the scope (global: round(f * candidates); layer: round(f * C) in
  every layer) and the exclusions (stem = conv1, residual_last = every block's conv2);
- each ranking selector took the right filters: for score-high the pruned filters' mean dB-SNR
  (from the run's scores/, all images) is never below a kept candidate's in the same ranking
  group (all candidates, or one layer), for score-low never above; for l1-norm and bn-scale the
  pruned filters' L1 norm / |BN scale| (recomputed from the checkpoint here) never above a kept
  one's; random seeds give different sets.

Usage: check_prune.py PRUNE_DIR --scores RUN_DIR --weights CHECKPOINT   (CIFAR ResNet)
Prints "ok" and exits 0, or lists every problem and exits 1.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reference"))
from ref_paper import load_legacy_checkpoint  # noqa: E402


def rnd(x: float) -> int:
    """Round half away from zero, as Rust's f64::round."""
    return int(math.floor(x + 0.5))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("prune_dir")
    ap.add_argument("--scores", required=True)
    ap.add_argument("--weights", required=True)
    a = ap.parse_args()
    d = Path(a.prune_dir)
    problems = []
    meta = json.loads((d / "prune.json").read_text())
    st = meta["settings"]
    curves = pd.read_parquet(d / "curves.parquet")
    classes = pd.read_parquet(d / "classes.parquet")
    filters = pd.read_parquet(d / "filters.parquet")
    n_cand = int(curves["n_candidates"].iloc[0])

    # candidates: convs of the checkpoint minus exclusions (ResNet naming)
    ck = load_legacy_checkpoint(a.weights)
    sd = ck["state_dict"] if "state_dict" in ck else ck
    sd = {k.removeprefix("module."): np.asarray(v) for k, v in sd.items()}
    convs = [k[: -len(".weight")] for k, v in sd.items() if k.endswith(".weight") and v.ndim == 4]
    excl = set(st.get("exclude", []))
    cands = [c for c in convs
             if c not in excl
             and not ("stem" in excl and c == "conv1")
             and not ("residual_last" in excl and c.endswith(".conv2"))]
    size = {c: sd[c + ".weight"].shape[0] for c in cands}
    if sum(size.values()) != n_cand:
        problems.append(f"n_candidates {n_cand} != {sum(size.values())} from the checkpoint")
    bn_of = {c: ("bn1" if c == "conv1" else c[:-len("conv1")] + "bn" + c[-1]) for c in cands}
    l1 = {(c, ch): float(np.abs(sd[c + ".weight"][ch]).sum()) for c in cands for ch in range(size[c])}
    bn = {(c, ch): float(abs(sd[bn_of[c] + ".weight"][ch])) for c in cands for ch in range(size[c])}

    con = duckdb.connect()
    sc = con.execute(
        f"""select layer, channel, any_value(mean_snr_db_mean) as v
            from read_parquet('{a.scores}/scores/*.parquet') where label is null
            group by layer, channel""").df()
    score = {(r.layer, int(r.channel)): r.v for r in sc.itertuples()}

    dk = con.execute(
        f"""select c.selector, c.seed, c.fraction, c.correct, sum(k.correct) as k_correct
            from read_parquet('{d}/curves.parquet') c
            join read_parquet('{d}/classes.parquet') k
              on c.selector = k.selector and c.fraction = k.fraction
             and coalesce(c.seed, -1) = coalesce(k.seed, -1)
            group by all""").df()
    bad = dk[dk["correct"] != dk["k_correct"]]
    if len(bad):
        problems.append(f"per-class correct counts do not add up:\n{bad}")
    if len(dk) != len(curves):
        problems.append(f"{len(curves)} configurations but {len(dk)} with per-class rows")

    random_sets = {}
    for row in curves.itertuples():
        seed = None if pd.isna(row.seed) else int(row.seed)
        sel = filters[(filters.selector == row.selector) & (filters.fraction == row.fraction)
                      & ((filters.seed == seed) if seed is not None else filters.seed.isna())]
        tag = f"{row.selector} seed {seed} fraction {row.fraction}"
        if len(sel) != row.n_pruned:
            problems.append(f"{tag}: n_pruned {row.n_pruned} but {len(sel)} filter rows")
        pruned = set(zip(sel.layer, sel.channel.astype(int)))
        if not all(p[0] in size for p in pruned):
            problems.append(f"{tag}: pruned a filter that is not a candidate: "
                            f"{sorted(p for p in pruned if p[0] not in size)[:3]}")
            continue
        if row.scope == "global":
            want = rnd(row.fraction * n_cand)
            if row.n_pruned != want:
                problems.append(f"{tag}: {row.n_pruned} pruned, want {want}")
            groups = {"all": [(c, ch) for c in cands for ch in range(size[c])]}
        else:
            for c in cands:
                got = sum(1 for p in pruned if p[0] == c)
                if got != rnd(row.fraction * size[c]):
                    problems.append(f"{tag}: {c} lost {got} filters, want {rnd(row.fraction * size[c])}")
            groups = {c: [(c, ch) for ch in range(size[c])] for c in cands}
        if row.n_pruned == 0:
            continue
        if row.selector == "random":
            random_sets.setdefault(row.fraction, []).append(frozenset(pruned))
            continue
        value, high = {
            "score-high": (score, True),
            "score-low": (score, False),
            "l1-norm": (l1, False),
            "bn-scale": (bn, False),
        }[row.selector]
        for g, members in groups.items():
            p = [value.get(m, -math.inf) for m in members if m in pruned]
            k = [value.get(m, -math.inf) for m in members if m not in pruned]
            if not p or not k:
                continue
            ok = min(p) >= max(k) - 1e-9 if high else max(p) <= min(k) + 1e-9
            if not ok:
                problems.append(f"{tag}: in {g} a kept filter ranks before a pruned one "
                                f"(pruned {min(p) if high else max(p):.6g}, kept {max(k) if high else min(k):.6g})")
    for f, sets in random_sets.items():
        if len(sets) > 1 and len(set(sets)) == 1:
            problems.append(f"random seeds prune identical sets at fraction {f}")
    if problems:
        print("\n".join(problems))
        return 1
    print(f"ok: {len(curves)} configurations, {n_cand} candidates, scope {curves.scope.iloc[0]}, "
          f"mode {curves['mode'].iloc[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
