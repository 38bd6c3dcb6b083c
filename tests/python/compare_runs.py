"""Compares two freqtag output folders table by table as sorted rows (exact equality).
Used to check that results do not depend on the number of workers or processes. A cluster run's
folder (process-0/, process-1/, ...) is read as the union of its processes' tables.

usage: python compare_runs.py OUT_A OUT_B [--amp-tol T]
A table that neither folder has (spectra = "none", neurons off) is named and skipped.
With --amp-tol, only the spectra are compared, each neuron's amplitudes within T of its largest
amplitude (for runs that differ only in float rounding, such as frame de-duplication).
"""
import sys

import numpy as np
import pandas as pd

KEYS = {
    "spectra": ["image_id", "layer", "channel"],
    "neurons": ["image_id", "layer", "channel", "term"],
    "images": ["image_id"],
    "scores": ["layer", "channel", "term", "label"],
}


def read(out, table):
    import glob

    parts = sorted(glob.glob(f"{out}/process-*/{table}"))
    if parts:
        return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    return pd.read_parquet(f"{out}/{table}")


a, b = sys.argv[1], sys.argv[2]
if len(sys.argv) == 5 and sys.argv[3] == "--amp-tol":
    tol = float(sys.argv[4])
    k = KEYS["spectra"]
    x = read(a, "spectra").sort_values(k).reset_index(drop=True)
    y = read(b, "spectra").sort_values(k).reset_index(drop=True)
    assert (x[k] == y[k]).all().all(), "different neurons"
    ax, ay = np.stack(x.amplitude.to_numpy()), np.stack(y.amplitude.to_numpy())
    err = (np.abs(ax - ay).max(axis=1) / np.maximum(ax.max(axis=1), 1e-30)).max()
    if err > tol:
        sys.exit(f"compare_runs: spectra differ by {err:.2e} of a neuron's peak (tolerance {tol})")
    print(f"compare_runs: spectra agree within {err:.2e} of each neuron's peak")
    sys.exit(0)
def has(out, table):
    import glob
    import os

    return os.path.isdir(f"{out}/{table}") or bool(glob.glob(f"{out}/process-*/{table}"))


for table, keys in KEYS.items():
    if not has(a, table) and not has(b, table):
        print(f"compare_runs: {table} written by neither (the pipeline's output settings)")
        continue
    if has(a, table) != has(b, table):
        sys.exit(f"compare_runs: {table} is in only one of {a} and {b}")
    x = read(a, table).sort_values(keys, na_position="first").reset_index(drop=True)
    y = read(b, table).sort_values(keys, na_position="first").reset_index(drop=True)
    if table == "spectra":
        x["amplitude"] = x.amplitude.map(tuple)
        y["amplitude"] = y.amplitude.map(tuple)
    try:
        pd.testing.assert_frame_equal(x, y, check_exact=True)
    except AssertionError as e:
        print(f"compare_runs: {table} differs between {a} and {b}:\n{e}", file=sys.stderr)
        sys.exit(1)
    print(f"compare_runs: {table} identical ({len(x)} rows)")
