#!/usr/bin/env python3
"""Independent reference for ``freqtag prune``: recomputes its accuracy curves.

What this is
------------
``freqtag prune`` removes convolution filters (output channels) of a CIFAR-10
ResNet and measures top-1 accuracy on labelled images, without fine-tuning.
This script re-does that measurement with the numpy network of
``ref_paper.py`` (its own legacy-checkpoint reader, option-A ResNet, PIL image
loading and normalisation), sharing no code with the Rust project, and compares
the number of correct predictions of every configuration.

Usage::

    python tests/reference/ref_prune.py --weights W --arch resnet32 --prune-dir D \
        [--max-configs N] [--tol-images K] [--dtype float32|float64] [--batch B]

The prune folder D holds what freqtag wrote:

``images.parquet``  image_id (str), path (str, absolute), label (int): the
                    evaluation set, in order.
``filters.parquet`` selector (str), seed (int, null except for random),
                    fraction (float), layer (str, a conv's module path such as
                    ``conv1`` or ``layer2.0.conv1``), channel (int): one row per
                    pruned filter per configuration.
``curves.parquet``  selector, rank_by (nullable), seed (nullable), scope, mode
                    (``zero`` | ``silence``), fraction, n_pruned, n_candidates,
                    n_images, correct, accuracy: one row per configuration
                    (selector, seed, fraction).

Pruning semantics
-----------------
``zero``     the conv's weight[channel] (all of [cin, k, k]) is set to 0 (the
             CIFAR ResNets' convs have no bias; a bias would be zeroed too);
             the following batch norm still adds its constant.
``silence``  as ``zero``, and the following batch norm's weight[channel] and
             bias[channel] are set to 0 (conv1 -> bn1, layerX.Y.convZ ->
             layerX.Y.bnZ), so the channel is exactly 0 after batch norm.

Prediction is the argmax of the logits of the plain (normalised) image.

Checks and exit status
----------------------
Every configuration's ``n_pruned`` must equal its number of filter rows, and
the structural facts below must hold for every row; then, for every
configuration (or the first N rows of curves.parquet with --max-configs, plus
every fraction-0 row), the pruned model is run and its number of correct
predictions compared with freqtag's ``correct``.  The tolerance is
``--tol-images`` images, by default max(1, ceil(0.005 * n_images)), because PIL
and the Rust JPEG decoder can differ by one level in a few pixels.

A JSON summary goes to stdout (also on failure, when the files could be read)::

    {"ok": ..., "configs": [{"selector", "seed", "fraction", "mode", "n_pruned",
      "freqtag_correct", "reference_correct", "diff", ...}], "max_abs_diff": ...,
     "n_images": ..., "tol_images": ..., "errors": [...], "timing_s": {...}}

and the script exits 0 when every check passes, 1 otherwise, with every problem
also printed to stderr as ``FAIL: <file>: <problem>``.  Exit 2 is a usage error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ref_paper  # noqa: E402  (the float64 reference network, loader and preprocessing)

IMAGES = "images.parquet"
FILTERS = "filters.parquet"
CURVES = "curves.parquet"
MODES = ("zero", "silence")
MAX_ERRORS = 50  # problems reported before giving up listing more


class Malformed(Exception):
    """A prune-folder file that cannot be used at all (missing, unreadable, wrong columns)."""


# ---------------------------------------------------------------------------
# Reading the Parquet files
# ---------------------------------------------------------------------------

def _kind(t) -> str:
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "str"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    return str(t)


def read_table(folder: Path, name: str, schema: dict) -> dict:
    """Read folder/name; schema: column -> (kind, nullable).  Returns column -> list.

    Raises Malformed naming the file on a missing file, a missing column, a
    column of the wrong type, or nulls in a non-nullable column.
    """
    import pyarrow.parquet as pq

    path = folder / name
    if not path.is_file():
        raise Malformed(f"{path}: missing")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise Malformed(f"{path}: cannot be read as Parquet ({e})")
    out = {}
    for col, (kind, nullable) in schema.items():
        if col not in table.column_names:
            raise Malformed(f"{path}: no column {col!r} (columns: {', '.join(table.column_names)})")
        c = table.column(col)
        if _kind(c.type) != kind:
            raise Malformed(f"{path}: column {col!r} is {c.type}, expected {kind}")
        if not nullable and c.null_count:
            raise Malformed(f"{path}: column {col!r} has {c.null_count} null(s)")
        out[col] = c.to_pylist()
    out["_n"] = table.num_rows
    out["_path"] = path
    return out


# ---------------------------------------------------------------------------
# Pruning
# ---------------------------------------------------------------------------

def bn_after(conv: str) -> str:
    """The batch norm that follows a conv: conv1 -> bn1, layerX.Y.convZ -> layerX.Y.bnZ."""
    head, _, last = conv.rpartition(".")
    assert last.startswith("conv"), conv
    bn = "bn" + last[len("conv"):]
    return f"{head}.{bn}" if head else bn


def pruned_model(base: ref_paper.CifarResNet, filters, mode: str) -> ref_paper.CifarResNet:
    """A copy of base with filters [(layer, channel), ...] pruned in `mode`.

    Only the touched tensors are copied; base is left unchanged.
    """
    sd = dict(base.sd)
    by_layer: dict = {}
    for layer, ch in filters:
        by_layer.setdefault(layer, []).append(ch)
    for layer, chans in by_layer.items():
        idx = np.array(sorted(chans), dtype=np.int64)
        names = [f"{layer}.weight"]
        if f"{layer}.bias" in sd:
            names.append(f"{layer}.bias")
        if mode == "silence":
            bn = bn_after(layer)
            names += [f"{bn}.weight", f"{bn}.bias"]
        for n in names:
            t = np.array(sd[n], copy=True)
            t[idx] = 0
            sd[n] = t
    return ref_paper.CifarResNet(sd, dtype=base.dtype)


def count_correct(model: ref_paper.CifarResNet, x: np.ndarray, labels: np.ndarray,
                  batch: int) -> int:
    preds = []
    for s in range(0, x.shape[0], batch):
        logits, _ = model.forward(x[s:s + batch], taps=False)
        preds.append(np.argmax(logits, axis=1))
    return int((np.concatenate(preds) == labels).sum())


# ---------------------------------------------------------------------------
# Main check
# ---------------------------------------------------------------------------

def _cfg_key(selector, seed, fraction):
    return (selector, seed, fraction)


def _fmt_key(k) -> str:
    sel, seed, frac = k
    return f"(selector={sel!r}, seed={seed}, fraction={frac!r})"


def run(args) -> int:
    t_start = time.perf_counter()
    errors: list = []
    warnings: list = []

    def err(msg):
        errors.append(msg)
        print(f"FAIL: {msg}", file=sys.stderr)

    def warn(msg):
        warnings.append(msg)
        print(f"warning: {msg}", file=sys.stderr)

    def bail():  # stop early: a JSON summary with the problems found so far
        print(json.dumps({"ok": False, "errors": errors[:MAX_ERRORS],
                          "warnings": warnings[:MAX_ERRORS]}))
        return 1

    folder = Path(args.prune_dir)
    if not folder.is_dir():
        err(f"{folder}: prune folder does not exist")
        return bail()

    # --- model ------------------------------------------------------------
    dtype = np.float32 if args.dtype == "float32" else np.float64
    try:
        base = ref_paper.load_model(args.weights, dtype=dtype)
    except Exception as e:
        err(f"{args.weights}: cannot load the checkpoint ({e})")
        return bail()
    if args.arch is not None and args.arch != f"resnet{base.depth}":
        err(f"{args.weights}: is resnet{base.depth}, but --arch says {args.arch}")
        return bail()
    convs = base.conv_names()
    n_out = {c: int(base.sd[f"{c}.weight"].shape[0]) for c in convs}
    n_classes = int(base.sd["linear.weight"].shape[0])
    t_model = time.perf_counter()

    # --- read the three files --------------------------------------------
    try:
        img = read_table(folder, IMAGES, {
            "image_id": ("str", False), "path": ("str", False), "label": ("int", False)})
        fil = read_table(folder, FILTERS, {
            "selector": ("str", False), "seed": ("int", True), "fraction": ("float", False),
            "layer": ("str", False), "channel": ("int", False)})
        cur = read_table(folder, CURVES, {
            "selector": ("str", False), "rank_by": ("str", True), "seed": ("int", True),
            "scope": ("str", False), "mode": ("str", False), "fraction": ("float", False),
            "n_pruned": ("int", False), "n_candidates": ("int", True),
            "n_images": ("int", False), "correct": ("int", False),
            "accuracy": ("float", False)})
    except Malformed as e:
        err(str(e))
        return bail()
    p_img, p_fil, p_cur = img["_path"], fil["_path"], cur["_path"]

    # --- images.parquet -----------------------------------------------------
    n_images = img["_n"]
    if n_images == 0:
        err(f"{p_img}: no images")
    seen = {}
    for i, iid in enumerate(img["image_id"]):
        if iid in seen:
            err(f"{p_img}: image_id {iid!r} on rows {seen[iid]} and {i}")
        seen[iid] = i
    for i, (p, lb) in enumerate(zip(img["path"], img["label"])):
        if not 0 <= lb < n_classes:
            err(f"{p_img}: row {i} ({img['image_id'][i]!r}) has label {lb}, "
                f"outside 0..{n_classes - 1}")
        if not Path(p).is_absolute():
            err(f"{p_img}: row {i} path {p!r} is not absolute")
        elif not Path(p).is_file():
            err(f"{p_img}: row {i} path {p} does not exist")

    # --- curves.parquet -----------------------------------------------------
    configs = []  # one dict per curves row, in file order
    cfg_index = {}  # configuration key -> index into configs
    for r in range(cur["_n"]):
        c = {k: cur[k][r] for k in ("selector", "rank_by", "seed", "scope", "mode", "fraction",
                                    "n_pruned", "n_candidates", "n_images", "correct",
                                    "accuracy")}
        key = _cfg_key(c["selector"], c["seed"], c["fraction"])
        where = f"{p_cur}: row {r} {_fmt_key(key)}"
        if key in cfg_index:
            err(f"{where}: duplicate configuration (also row {configs[cfg_index[key]]['_row']})")
            continue
        if not (isinstance(c["fraction"], float) and 0.0 <= c["fraction"] <= 1.0):
            err(f"{where}: fraction {c['fraction']!r} not in [0, 1]")
        if c["mode"] not in MODES:
            err(f"{where}: mode {c['mode']!r}, expected one of {MODES}")
        if c["n_images"] != n_images:
            err(f"{where}: n_images {c['n_images']}, but {p_img.name} has {n_images} rows")
        if not 0 <= c["correct"] <= c["n_images"]:
            err(f"{where}: correct {c['correct']} not in 0..n_images ({c['n_images']})")
        elif c["n_images"] > 0:
            acc = c["correct"] / c["n_images"]
            if not (abs(c["accuracy"] - acc) <= 1e-9):
                err(f"{where}: accuracy {c['accuracy']!r} != correct/n_images = {acc!r}")
        if c["fraction"] == 0.0 and c["n_pruned"] != 0:
            err(f"{where}: fraction 0 with n_pruned {c['n_pruned']}")
        if c["n_candidates"] is not None and not 0 <= c["n_pruned"] <= c["n_candidates"]:
            err(f"{where}: n_pruned {c['n_pruned']} not in 0..n_candidates ({c['n_candidates']})")
        if c["seed"] is not None and c["selector"] != "random":
            warn(f"{where}: seed set for a non-random selector")
        c["_key"], c["_row"], c["_filters"] = key, r, []
        cfg_index[key] = len(configs)
        configs.append(c)
    if not configs:
        err(f"{p_cur}: no configurations")

    # --- filters.parquet ----------------------------------------------------
    seen_f = set()
    for r in range(fil["_n"]):
        key = _cfg_key(fil["selector"][r], fil["seed"][r], fil["fraction"][r])
        layer, ch = fil["layer"][r], fil["channel"][r]
        where = f"{p_fil}: row {r} {_fmt_key(key)}"
        if len(errors) > MAX_ERRORS:
            break
        if key not in cfg_index:
            err(f"{where}: configuration not in {p_cur.name}")
            continue
        if layer not in n_out:
            err(f"{where}: layer {layer!r} is not a conv of resnet{base.depth}")
            continue
        if not 0 <= ch < n_out[layer]:
            err(f"{where}: {layer} channel {ch} out of range 0..{n_out[layer] - 1}")
            continue
        if (key, layer, ch) in seen_f:
            err(f"{where}: {layer} channel {ch} listed twice")
            continue
        seen_f.add((key, layer, ch))
        configs[cfg_index[key]]["_filters"].append((layer, ch))
    for c in configs:
        if c["n_pruned"] != len(c["_filters"]):
            err(f"{p_cur}: row {c['_row']} {_fmt_key(c['_key'])}: n_pruned {c['n_pruned']}, "
                f"but {p_fil.name} has {len(c['_filters'])} valid filter row(s) for it")

    if errors:
        return bail()

    # --- which configurations to run ---------------------------------------
    if args.max_configs is not None:
        chosen = [c for i, c in enumerate(configs)
                  if i < args.max_configs or c["fraction"] == 0.0]
    else:
        chosen = configs

    # --- images -------------------------------------------------------------
    xs = []
    for i, p in enumerate(img["path"]):
        try:
            a = ref_paper.load_image(p)
        except Exception as e:
            err(f"{p_img}: row {i} path {p} cannot be read as an image ({e})")
            continue
        if a.shape[1:] != (32, 32):
            err(f"{p_img}: row {i} path {p} is {a.shape[2]}x{a.shape[1]}; "
                f"this reference only handles 32x32 images (no resize)")
            continue
        xs.append(ref_paper.normalise(a))
    if errors:
        return bail()
    x = np.stack(xs).astype(dtype)
    labels = np.asarray(img["label"], dtype=np.int64)
    t_images = time.perf_counter()

    # --- run ----------------------------------------------------------------
    tol = args.tol_images if args.tol_images is not None else max(1, math.ceil(0.005 * n_images))
    cache: dict = {}  # identical pruned models are evaluated once
    out_cfgs = []
    max_abs = 0
    forward_s = []
    for c in chosen:
        filt = frozenset(c["_filters"])
        ck = ("none",) if not filt else (c["mode"], filt)
        if ck not in cache:
            t0 = time.perf_counter()
            model = pruned_model(base, sorted(filt), c["mode"])
            cache[ck] = count_correct(model, x, labels, args.batch)
            forward_s.append(time.perf_counter() - t0)
        ref = cache[ck]
        diff = int(c["correct"]) - ref
        max_abs = max(max_abs, abs(diff))
        ok = abs(diff) <= tol
        out_cfgs.append({
            "selector": c["selector"], "seed": c["seed"], "fraction": c["fraction"],
            "rank_by": c["rank_by"], "scope": c["scope"], "mode": c["mode"],
            "n_pruned": c["n_pruned"], "n_candidates": c["n_candidates"],
            "freqtag_correct": c["correct"], "reference_correct": ref, "diff": diff,
            "reference_accuracy": ref / n_images, "ok": ok,
        })
        if not ok:
            err(f"{p_cur}: row {c['_row']} {_fmt_key(c['_key'])} mode {c['mode']}: "
                f"freqtag has {c['correct']} correct, the reference {ref} "
                f"(|diff| {abs(diff)} > tolerance {tol})")
    t_end = time.perf_counter()

    summary = {
        "ok": not errors,
        "arch": f"resnet{base.depth}",
        "weights": str(args.weights),
        "prune_dir": str(folder),
        "dtype": args.dtype,
        "n_images": n_images,
        "tol_images": tol,
        "n_configs": len(configs),
        "n_configs_checked": len(out_cfgs),
        "n_forwards": len(forward_s),
        "configs": out_cfgs,
        "max_abs_diff": max_abs,
        "errors": errors[:MAX_ERRORS],
        "warnings": warnings[:MAX_ERRORS],
        "timing_s": {
            "load_model": round(t_model - t_start, 3),
            "load_images": round(t_images - t_model, 3),
            "forwards": round(sum(forward_s), 3),
            "per_forward": round(sum(forward_s) / len(forward_s), 3) if forward_s else None,
            "total": round(t_end - t_start, 3),
        },
    }
    print(json.dumps(summary, indent=1))
    return 0 if not errors else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", required=True, help="legacy PyTorch checkpoint (.th)")
    ap.add_argument("--arch", default=None,
                    help="e.g. resnet32; checked against the checkpoint's depth")
    ap.add_argument("--prune-dir", required=True,
                    help="folder with images.parquet, filters.parquet, curves.parquet")
    ap.add_argument("--max-configs", type=int, default=None,
                    help="run only the first N rows of curves.parquet (plus every fraction-0 row)")
    ap.add_argument("--tol-images", type=int, default=None,
                    help="allowed |correct difference| per configuration "
                         "(default max(1, ceil(0.005 * n_images)))")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                    help="arithmetic of the reference forward (default float32, ~2x faster)")
    ap.add_argument("--batch", type=int, default=50,
                    help="images per forward chunk (default 50: fastest on 2 cores)")
    args = ap.parse_args(argv)
    if args.max_configs is not None and args.max_configs < 0:
        ap.error("--max-configs must be >= 0")
    if args.tol_images is not None and args.tol_images < 0:
        ap.error("--tol-images must be >= 0")
    if args.batch < 1:
        ap.error("--batch must be >= 1")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
