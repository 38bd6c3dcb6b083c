"""How far two freqtag runs of the same images are apart (a GPU run against the CPU, or f16/bf16
against f32): each neuron's largest amplitude difference as a fraction of its largest amplitude,
and how many images got the same predicted class.

usage: python spectra_error.py REFERENCE OTHER [--tol T] [--json FILE] [--same-predictions]
Exit 1 when the largest difference is above T (default: no limit, report only), or with
--same-predictions when an image's predicted class differs.
"""
import json
import sys

import numpy as np
import pandas as pd

args = sys.argv[1:]
tol = float(args[args.index("--tol") + 1]) if "--tol" in args else None
out = args[args.index("--json") + 1] if "--json" in args else None
a, b = args[0], args[1]
k = ["image_id", "layer", "channel"]
x = pd.read_parquet(f"{a}/spectra").sort_values(k).reset_index(drop=True)
y = pd.read_parquet(f"{b}/spectra").sort_values(k).reset_index(drop=True)
if len(x) != len(y) or not (x[k] == y[k]).all().all():
    sys.exit(f"spectra_error: {a} and {b} hold different neurons ({len(x)} against {len(y)} rows)")
ax, ay = np.stack(x.amplitude.to_numpy()), np.stack(y.amplitude.to_numpy())
peak = np.maximum(ax.max(axis=1), 1e-30)
rel = np.abs(ax - ay).max(axis=1) / peak
ia = pd.read_parquet(f"{a}/images").set_index("image_id").sort_index()
ib = pd.read_parquet(f"{b}/images").set_index("image_id").sort_index()
agree = int((ia.pred == ib.pred).sum())
w = int(np.argmax(rel))
layer_peak = pd.Series(peak).groupby(x.layer).median()
r = {
    "reference": a,
    "other": b,
    "neurons": int(len(rel)),
    "max_of_peak": float(rel.max()),
    "p99_of_peak": float(np.quantile(rel, 0.99)),
    "median_of_peak": float(np.median(rel)),
    "images": int(len(ia)),
    "same_prediction": agree,
    # the worst neuron, and how its largest amplitude compares with its layer's typical one
    "worst": {
        "image_id": str(x.image_id[w]),
        "layer": str(x.layer[w]),
        "channel": int(x.channel[w]),
        "peak": float(peak[w]),
        "layer_median_peak": float(layer_peak[x.layer[w]]),
    },
}
if tol is not None:
    r["neurons_above_tol"] = int((rel > tol).sum())
print(json.dumps(r))
if out:
    with open(out, "a") as f:
        f.write(json.dumps(r) + "\n")
if tol is not None and r["max_of_peak"] > tol:
    sys.exit(f"spectra_error: {b} differs from {a} by {r['max_of_peak']:.2e} of a neuron's peak (tolerance {tol})")
if "--same-predictions" in args and agree != len(ia):
    sys.exit(f"spectra_error: {len(ia) - agree} of {len(ia)} images have another predicted class")
