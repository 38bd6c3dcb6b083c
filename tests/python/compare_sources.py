"""Checks that a run over another source kind gives, image for image, the same spectra and
predictions as the run over the original folder (ids mapped with ids.json from make_sources.py).

usage: python compare_sources.py FOLDER_RUN OTHER_RUN IDS_JSON EXPECTED_IMAGES
"""
import json
import sys

import pandas as pd

a, b, ids, expected = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3])), int(sys.argv[4])
ref = pd.read_parquet(f"{a}/spectra")
got = pd.read_parquet(f"{b}/spectra")
got["image_id"] = got.image_id.map(ids)
if got.image_id.isna().any():
    sys.exit("compare_sources: an image id is not in ids.json")
if got.image_id.nunique() != expected:
    sys.exit(f"compare_sources: {got.image_id.nunique()} images, expected {expected}")
keys = ["image_id", "layer", "channel"]
ref = ref[ref.image_id.isin(set(got.image_id))].sort_values(keys).reset_index(drop=True)
got = got.sort_values(keys).reset_index(drop=True)
for df in (ref, got):
    df["amplitude"] = df.amplitude.map(tuple)
pd.testing.assert_frame_equal(ref, got, check_exact=True)
ia, ib = pd.read_parquet(f"{a}/images"), pd.read_parquet(f"{b}/images")
ib["image_id"] = ib.image_id.map(ids)
m = ia.merge(ib, on="image_id", suffixes=("_a", "_b"))
if len(m) != expected or (m.pred_a != m.pred_b).any() or (m.label_a != m.label_b).any():
    sys.exit("compare_sources: predictions or labels differ")
print(f"compare_sources: {expected} images identical to the folder run")
