"""Reads a freqtag run's outputs with pandas (pyarrow) and DuckDB, as users would, and checks the
documented columns, types and invariants. Called by the Rust test suite (tests/it/python.rs).

usage: python check_outputs.py OUT_DIR EXPECTED_IMAGES
Exits non-zero with a message on the first mismatch.
"""
import json
import sys

import duckdb
import numpy as np
import pandas as pd

out, expected_images = sys.argv[1], int(sys.argv[2])

# The documented schema (README.md, "Outputs"): column -> pyarrow type name.
TERM = {"term": "string", "term_kind": "string", "freq_hz": "double", "alias_hz": "double",
        "aliased": "bool", "bin": "int32", "on_bin": "bool"}
SCORES = ["amplitude", "snr", "snr_db", "snr_lattice", "snr_lattice_db", "zscore",
          "baseline_corrected", "response_share", "mean_snr_db"]
SCHEMAS = {
    "spectra": {"image_id": "string", "label": "int64", "layer": "string", "channel": "int32",
                "bin_hz": "double", "bins": "list<item: int32>", "amplitude": "list<item: float>"},
    "neurons": {"image_id": "string", "label": "int64", "layer": "string", "channel": "int32",
                **TERM, **{s: "double" for s in SCORES}},
    "images": {"image_id": "string", "label": "int64", "pred": "int64", "prob": "float",
               "correct": "bool", "frames": "int32", "distinct_frames": "int32"},
    "scores": {"layer": "string", "channel": "int32", **TERM, "label": "int64",
               "n_images": "int64",
               **{f"{s}_{k}": "double" for s in SCORES for k in ("mean", "std")}},
}


def fail(msg):
    print(f"check_outputs: {msg}", file=sys.stderr)
    sys.exit(1)


import pyarrow.parquet as pq  # noqa: E402

tables = {}
for name, cols in SCHEMAS.items():
    schema = pq.read_schema(next(iter(sorted(__import__("glob").glob(f"{out}/{name}/*.parquet")))))
    got = {f.name: str(f.type) for f in schema}
    if name == "spectra" and got.get("amplitude") == "list<item: halffloat>":
        got["amplitude"] = "list<item: float>"  # output.float16 = true
    if got != cols:
        fail(f"{name}: columns/types {got} differ from the documented {cols}")
    tables[name] = pd.read_parquet(f"{out}/{name}")

img = tables["images"]
if len(img) != expected_images:
    fail(f"images: {len(img)} rows, expected {expected_images}")
if img.image_id.duplicated().any():
    fail("images: an image appears twice")

run = json.load(open(f"{out}/run.json"))
frames = run["pipeline"]["stimulus"]["frames"]
spec = tables["spectra"]
full = spec.bins.isna().all()
lengths = spec.amplitude.map(len).unique()
if full and list(lengths) != [frames // 2 + 1]:
    fail(f"spectra: amplitude lengths {lengths}, expected {frames // 2 + 1}")
if not full and (spec.bins.map(len) != spec.amplitude.map(len)).any():
    fail("spectra: bins and amplitude lists differ in length")
neurons_per_image = spec.groupby("image_id").size()
if neurons_per_image.nunique() != 1 or set(neurons_per_image.index) != set(img.image_id):
    fail("spectra: every image must have the same neurons")

# the neurons table agrees with the spectra at the term bins
neu = tables["neurons"]
row = neu.iloc[len(neu) // 2]
a = spec[(spec.image_id == row.image_id) & (spec.layer == row.layer) & (spec.channel == row.channel)]
amps = np.asarray(a.amplitude.iloc[0])
at = row.bin if full else list(a.bins.iloc[0]).index(row.bin)
tol = 1e-3 if amps.dtype == np.float16 else 1e-6
if abs(float(amps[at]) - row.amplitude) > tol * max(1.0, abs(row.amplitude)):
    fail("neurons.amplitude differs from spectra.amplitude at the term's bin")

# DuckDB reads the same files and recomputes an aggregate from the per-image rows
con = duckdb.connect()
n_spec = con.execute(f"select count(*) from read_parquet('{out}/spectra/*.parquet')").fetchone()[0]
if n_spec != len(spec):
    fail(f"duckdb sees {n_spec} spectra rows, pandas {len(spec)}")
q = f"""
with per as (
  select layer, channel, term, avg(snr_db) as m, count(*) as n, stddev_samp(amplitude) as sd
  from read_parquet('{out}/neurons/*.parquet') group by all)
select max(abs(per.m - s.snr_db_mean)), max(abs(per.n - s.n_images)),
       max(abs(coalesce(per.sd, 0) - coalesce(s.amplitude_std, 0)))
from per join read_parquet('{out}/scores/*.parquet') s using (layer, channel, term)
where s.label is null
"""
dm, dn, dsd = con.execute(q).fetchone()
if dn != 0 or (dm is not None and dm > 1e-9) or (dsd is not None and dsd > 1e-9):
    fail(f"scores disagree with a DuckDB recomputation from neurons: mean {dm}, n {dn}, std {dsd}")
# per class, where images carry labels
q = f"""
with per as (
  select layer, channel, term, label, avg(response_share) as m, count(*) as n
  from read_parquet('{out}/neurons/*.parquet') where label is not null group by all)
select count(*), max(abs(per.m - s.response_share_mean)), max(abs(per.n - s.n_images))
from per join read_parquet('{out}/scores/*.parquet') s using (layer, channel, term, label)
"""
rows, dm, dn = con.execute(q).fetchone()
labelled = neu.label.notna().any()
expected_rows = len(neu[neu.label.notna()][["layer", "channel", "term", "label"]].drop_duplicates())
if rows != expected_rows or (labelled and (dm > 1e-9 or dn != 0)):
    fail(f"per-class scores disagree with DuckDB: {rows} of {expected_rows} groups, mean {dm}, n {dn}")
print(f"check_outputs: ok ({len(img)} images, {len(spec)} spectra rows, {len(neu)} neuron rows)")
