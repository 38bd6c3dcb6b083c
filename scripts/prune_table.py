"""Prints a `freqtag prune` result as a Markdown table: top-1 accuracy (%) per selector and
fraction pruned, random as mean +- sample sd over its seeds (min-max in brackets).

Usage: python scripts/prune_table.py [--where FRACTION] PRUNE_DIR [PRUNE_DIR ...]
  --where F: also where each selector's pruned filters sit (per stage) at fraction F
(REPRODUCTION.md's tables are this script's output.)
"""

import json
import sys
from pathlib import Path

import pandas as pd


def table(d: Path) -> str:
    c = pd.read_parquet(d / "curves.parquet")
    meta = json.loads((d / "prune.json").read_text())
    st = meta["settings"]
    rank = c["rank_by"].dropna()
    head = (f"**{d}**: {meta['arch']}, scope {st['scope']}, mode {st['mode']}, "
            f"ranked by `{rank.iloc[0] if len(rank) else '-'}`, {meta['n_images']} images, "
            f"{meta['n_candidates']} candidate filters, unpruned {100 * meta['baseline_accuracy']:.2f} %")
    fracs = sorted(c.fraction.unique())
    lines = [head, "",
             "| selector | " + " | ".join(f"{100 * f:g} %" for f in fracs) + " |",
             "| --- | " + " | ".join("---:" for _ in fracs) + " |"]
    for sel in c.selector.drop_duplicates():
        s = c[c.selector == sel]
        cells = []
        for f in fracs:
            a = 100 * s[s.fraction == f].accuracy
            if len(a) == 0:
                cells.append("")
            elif len(a) == 1:
                cells.append(f"{a.iloc[0]:.2f}")
            else:
                cells.append(f"{a.mean():.2f} ± {a.std(ddof=1):.2f} [{a.min():.2f}-{a.max():.2f}]")
        n = s.seed.nunique()
        name = f"{sel} ({n} seeds)" if n > 1 else sel
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stage(layer: str) -> str:
    """conv1, layer2, features.7, _blocks.3 ... (the first one or two parts of the name)."""
    parts = layer.split(".")
    return ".".join(parts[:2]) if parts[0] in ("features", "_blocks") else parts[0]


def composition(d: Path, fraction: float) -> str:
    """Where each selector's pruned filters sit at `fraction` (first seed for random)."""
    f = pd.read_parquet(d / "filters.parquet")
    f = f[(f.fraction - fraction).abs() < 1e-9]
    f = f[f.seed.isna() | (f.seed == 0)]
    f = f.assign(stage=f.layer.map(stage))
    t = f.groupby(["selector", "stage"], sort=False).size().unstack(fill_value=0)
    # forward order: the stem first, then stages by their number
    def key(name: str):
        parts = name.split(".")
        num = int(parts[-1]) if parts[-1].isdigit() else -1
        return (0 if name in ("conv1", "_conv_stem", "features.0") else 1, parts[0], num, name)
    cols = sorted(t.columns, key=key)
    lines = [f"pruned filters by stage at {100 * fraction:g} % ({d.name})", "",
             "| selector | " + " | ".join(cols) + " |",
             "| --- | " + " | ".join("---:" for _ in cols) + " |"]
    for sel, row in t.iterrows():
        lines.append(f"| {sel} | " + " | ".join(str(int(row[c])) for c in cols) + " |")
    return "\n".join(lines)


def main() -> int:
    args = sys.argv[1:]
    at = None
    if "--where" in args:
        i = args.index("--where")
        at = float(args[i + 1])
        del args[i:i + 2]
    for arg in args:
        print(table(Path(arg)))
        print()
        if at is not None:
            print(composition(Path(arg), at))
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
