"""Builds the same images as every source kind freqtag reads, for tests/it/sources.rs:
a list file, WebDataset tar shards, Parquet files in the Hugging Face layout, plus broken ones
(a tar cut short, a Parquet file with another schema), and ids.json mapping each source's image
id to the original file name.

usage: python make_sources.py IMAGES_DIR N OUT_DIR
"""
import io
import json
import os
import sys
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

images_dir, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
files = sorted(f for f in os.listdir(images_dir) if f.endswith(".png"))[:n]
label = {f: int(f.rsplit("_", 1)[1].split(".")[0]) for f in files}
ids = {}
os.makedirs(out, exist_ok=True)

# list file: paths relative to the list's folder, then the label
os.makedirs(f"{out}/list-images", exist_ok=True)
with open(f"{out}/list.txt", "w") as lst:
    lst.write("# path label\n")
    for f in files:
        data = open(f"{images_dir}/{f}", "rb").read()
        name = f"list-images/img{f[8:10]}.png"
        open(f"{out}/{name}", "wb").write(data)
        lst.write(f"{name}\t{label[f]}\n")
        ids[name] = f

# two WebDataset shards: key.png + key.cls
half = (len(files) + 1) // 2
for s, chunk in enumerate([files[:half], files[half:]]):
    with tarfile.open(f"{out}/shard-{s:03d}.tar", "w", format=tarfile.USTAR_FORMAT) as t:
        for f in chunk:
            key = f"sample{f[8:10]}"
            for ext, payload in [("png", open(f"{images_dir}/{f}", "rb").read()),
                                 ("cls", str(label[f]).encode())]:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                t.addfile(info, io.BytesIO(payload))
            ids[f"shard-{s:03d}.tar/{key}.png"] = f

# a shard cut short in the middle of its third member's data (the second sample's image)
whole = open(f"{out}/shard-000.tar", "rb").read()
with tarfile.open(f"{out}/shard-000.tar") as t:
    third = t.getmembers()[2]
os.makedirs(f"{out}/cut", exist_ok=True)
open(f"{out}/cut/cut.tar", "wb").write(whole[: third.offset_data + 100])

# Hugging Face layout, two row groups
rows = [{"image": {"bytes": open(f"{images_dir}/{f}", "rb").read(), "path": f}, "label": label[f]}
        for f in files]
table = pa.Table.from_pylist(rows, schema=pa.schema([
    ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ("label", pa.int64()),
]))
os.makedirs(f"{out}/hf", exist_ok=True)
pq.write_table(table, f"{out}/hf/train-00000.parquet", row_group_size=max(1, len(files) // 2))
for i, f in enumerate(files):
    ids[f"train-00000.parquet#{i}"] = f
pq.write_table(pa.table({"pixels": [b"x"], "y": [1]}), f"{out}/hf/wrong-schema.parquet")

json.dump(ids, open(f"{out}/ids.json", "w"), indent=1)
print(f"make_sources: {len(files)} images as list, tar and parquet in {out}")
