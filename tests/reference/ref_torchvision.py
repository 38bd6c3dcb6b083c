#!/usr/bin/env python3
"""Independent numpy float64 reference for torchvision ResNet-18/34/50 and VGG-11/16.

What this is
------------
No real weights for these networks are available to the tests, and torch must
not be used, so this script

1. builds RANDOM weights with exactly torchvision's state-dict names, shapes,
   dtypes and order (``conv1.weight``, ``bn1.running_var``,
   ``layer2.0.downsample.1.num_batches_tracked``, ``features.28.bias``,
   ``classifier.6.weight``, ...), and writes them to ``weights.safetensors``
   with its own small safetensors writer (no ``safetensors`` package);
2. makes one deterministic input: the first photo of ``data/photos`` (sorted),
   prepared as torchvision's ImageNet preset (resize the short side to 256 with
   PIL bilinear, centre-crop 224, /255, normalise), saved as the float32
   ``input.npy`` [1, 3, S, S] that the Rust test feeds as is;
3. runs the network in float64 (from the float32 weights read back from the file
   and the float32 input), in eval mode, and writes ``expected.json`` with the
   logits and, per tap, the per-channel spatial mean of the tap's output.

It shares no code with the Rust project.

Usage
-----
::

    python tests/reference/ref_torchvision.py make --arch resnet18|resnet34|resnet50|vgg11|vgg16 \
        --out DIR [--seed S] [--size 224] [--image FILE]
    python tests/reference/ref_torchvision.py check --expected DIR/expected.json --got GOT.json [--tol 1e-3]
    python tests/reference/ref_torchvision.py selftest

``make`` writes ``DIR/weights.safetensors``, ``DIR/input.npy`` and
``DIR/expected.json``::

    {"arch": "resnet18", "seed": 0, "size": 224, "image": "mpl_grace_hopper.jpg",
     "logits": [1000 floats],
     "taps": {"conv1": [64 floats], "layer1.0.conv1": [...], ..., "layer1.0": [...], ...}}

Taps (names are torchvision module paths):

* every ``Conv2d``: the per-channel spatial mean of its output, i.e. before batch
  norm (ResNet) or before ReLU (VGG, bias included): ``conv1``,
  ``layer1.0.conv1`` ... ``layer4.1.conv2`` (``conv3`` for Bottleneck),
  ``layerK.0.downsample.0``; ``features.0``, ``features.2``, ...;
* ResNet blocks: ``layerK.i`` = the block's output after its final ReLU
  (per-channel spatial mean);
* VGG linear layers: ``classifier.0`` and ``classifier.3`` (4096 values, before
  ReLU).  The logits (``classifier.6`` / ``fc``) are the top-level ``logits``.

``check`` compares a JSON of the same layout written by the Rust side: for every
tap of ``expected`` (and the logits) the error is max|got - want| / max(1e-6,
max|want|); it prints a summary and exits 1 if any error exceeds ``--tol``, the
logits' argmax differs, or a tap of ``expected`` is missing from ``got`` (or has
another length).  Taps only in ``got`` are listed but do not fail.

Random weights
--------------
One ``numpy.random.default_rng(seed)`` draws every tensor in state-dict order
(large tensors in fixed chunks of float32 draws, so the stream is deterministic):

* conv weights ~ N(0, 2/fan_in) (He normal, fan_in = C_in*kh*kw);
* BN weight ~ U(0.5, 1.5), bias ~ N(0, 0.1^2), running_mean ~ N(0, 0.1^2),
  running_var ~ U(0.5, 1.5), num_batches_tracked = 0 (int64 scalar, shape []);
* conv biases (VGG) ~ N(0, 0.1^2);
* linear weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2);
* ResNet only: the weight of the LAST batch norm of every residual branch
  (``bn2`` of BasicBlock, ``bn3`` of Bottleneck) is further multiplied by
  ``RESIDUAL_BN_SCALE`` (0.2) so that the sum ``x + f(x)`` does not roughly
  double the activations' scale at every block (with eval-mode BN on random
  running stats nothing renormalises them); with it the block outputs stay O(1)
  down to ``layer4`` of ResNet-50.

Arithmetic
----------
Everything is float64: weights are read back from the written file (float32),
cast to float64 slice by slice (the 102M-weight ``classifier.0`` of VGG is
multiplied in row chunks, never copied whole to float64), and the input is the
float32 ``input.npy`` cast to float64.  BN uses the running statistics, eps 1e-5.
ResNet: 7x7/2 stem conv, BN, ReLU, max pool 3x3 stride 2 pad 1 (-inf padding),
4 stages (torchvision v1.5: the Bottleneck's stride is on conv2), global average
pool, fc.  VGG: 3x3 pad 1 convs + ReLU, max pool 2x2 stride 2, adaptive average
pool to 7x7 (identity at 224), flatten in (C, H, W) order, classifier with
dropout as identity.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = ROOT / "data" / "photos"
IMAGE_EXTS = {".png", ".jpg", ".jpeg"}

BN_EPS = 1e-5
RESIDUAL_BN_SCALE = 0.2
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])

RESNETS = {
    # name: (block kind, blocks per stage)
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
}
VGGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
}
ARCHS = list(RESNETS) + list(VGGS)

# ---------------------------------------------------------------------------
# 1. The state-dict layout (names, shapes, kinds) of torchvision's models
# ---------------------------------------------------------------------------
#
# A spec entry is (name, shape, kind, extra) where kind says how to draw it:
#   conv_w (extra = fan_in), lin_w (extra = fan_in), bias, bn_w (extra = scale),
#   bn_b, bn_rm, bn_rv, nbt (int64 scalar).


def _bn(prefix: str, c: int, scale: float = 1.0) -> list:
    return [
        (f"{prefix}.weight", (c,), "bn_w", scale),
        (f"{prefix}.bias", (c,), "bn_b", None),
        (f"{prefix}.running_mean", (c,), "bn_rm", None),
        (f"{prefix}.running_var", (c,), "bn_rv", None),
        (f"{prefix}.num_batches_tracked", (), "nbt", None),
    ]


def _conv(name: str, o: int, c: int, k: int) -> tuple:
    return (f"{name}.weight", (o, c, k, k), "conv_w", c * k * k)


def resnet_blocks(arch: str) -> list:
    """[(prefix, kind, in_ch, width, out_ch, stride, has_downsample)] in order."""
    kind, counts = RESNETS[arch]
    exp = 4 if kind == "bottleneck" else 1
    blocks = []
    inplanes = 64
    for k, (planes, n) in enumerate(zip([64, 128, 256, 512], counts), start=1):
        stride = 1 if k == 1 else 2
        for i in range(n):
            s = stride if i == 0 else 1
            down = i == 0 and (s != 1 or inplanes != planes * exp)
            blocks.append((f"layer{k}.{i}", kind, inplanes, planes, planes * exp, s, down))
            inplanes = planes * exp
    return blocks


def resnet_spec(arch: str) -> list:
    spec = [_conv("conv1", 64, 3, 7)] + _bn("bn1", 64)
    for prefix, kind, cin, width, cout, _stride, down in resnet_blocks(arch):
        if kind == "basic":
            spec += [_conv(f"{prefix}.conv1", width, cin, 3)] + _bn(f"{prefix}.bn1", width)
            spec += [_conv(f"{prefix}.conv2", cout, width, 3)]
            spec += _bn(f"{prefix}.bn2", cout, RESIDUAL_BN_SCALE)
        else:
            spec += [_conv(f"{prefix}.conv1", width, cin, 1)] + _bn(f"{prefix}.bn1", width)
            spec += [_conv(f"{prefix}.conv2", width, width, 3)] + _bn(f"{prefix}.bn2", width)
            spec += [_conv(f"{prefix}.conv3", cout, width, 1)]
            spec += _bn(f"{prefix}.bn3", cout, RESIDUAL_BN_SCALE)
        if down:
            spec += [_conv(f"{prefix}.downsample.0", cout, cin, 1)]
            spec += _bn(f"{prefix}.downsample.1", cout)
    feat = 512 * (4 if RESNETS[arch][0] == "bottleneck" else 1)
    spec += [("fc.weight", (1000, feat), "lin_w", feat), ("fc.bias", (1000,), "bias", None)]
    return spec


def vgg_layers(arch: str) -> list:
    """[("conv", idx, cin, cout) | ("pool", idx)] with torchvision's feature indices."""
    layers, idx, cin = [], 0, 3
    for v in VGGS[arch]:
        if v == "M":
            layers.append(("pool", idx))
            idx += 1
        else:
            layers.append(("conv", idx, cin, v))
            idx += 2  # Conv2d, ReLU
            cin = v
    return layers


def vgg_spec(arch: str) -> list:
    spec = []
    for layer in vgg_layers(arch):
        if layer[0] == "conv":
            _, idx, cin, cout = layer
            spec.append(_conv(f"features.{idx}", cout, cin, 3))
            spec.append((f"features.{idx}.bias", (cout,), "bias", None))
    for idx, (o, i) in zip([0, 3, 6], [(4096, 512 * 7 * 7), (4096, 4096), (1000, 4096)]):
        spec.append((f"classifier.{idx}.weight", (o, i), "lin_w", i))
        spec.append((f"classifier.{idx}.bias", (o,), "bias", None))
    return spec


def model_spec(arch: str) -> list:
    return resnet_spec(arch) if arch in RESNETS else vgg_spec(arch)


# ---------------------------------------------------------------------------
# 2. Random weights and a minimal safetensors writer / reader
# ---------------------------------------------------------------------------

CHUNK = 1 << 22  # float32 draws per chunk for large tensors (fixed: part of the stream)


def draw(rng: np.random.Generator, shape, kind: str, extra):
    """Yields the tensor's float32 (or int64) data in C order, chunk by chunk."""
    n = int(np.prod(shape, dtype=np.int64))
    if kind == "nbt":
        yield np.zeros((), dtype="<i8")
        return
    if kind in ("bn_w", "bn_rv"):
        a = rng.uniform(0.5, 1.5, size=n).astype("<f4")
        if kind == "bn_w" and extra != 1.0:
            a = (a * np.float32(extra)).astype("<f4")
        yield a
        return
    if kind in ("bias", "bn_b", "bn_rm"):
        yield (rng.standard_normal(n, dtype=np.float32) * np.float32(0.1)).astype("<f4")
        return
    std = math.sqrt((2.0 if kind == "conv_w" else 1.0) / extra)
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        a = rng.standard_normal(m, dtype=np.float32)
        a *= np.float32(std)
        yield a.astype("<f4", copy=False)


_ST_DTYPES = {"F32": ("<f4", 4), "I64": ("<i8", 8)}


def safetensors_header(entries) -> bytes:
    """entries: [(name, shape, st_dtype)]; returns length prefix + padded JSON header."""
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dt in entries:
        size = int(np.prod(shape, dtype=np.int64)) * _ST_DTYPES[dt][1]
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + size]}
        off += size
    js = json.dumps(header, separators=(",", ":")).encode("utf-8")
    js += b" " * ((-len(js)) % 8)
    return struct.pack("<Q", len(js)) + js


def write_random_weights(arch: str, path: Path, seed: int) -> int:
    """Draws the weights and streams them into `path`; returns the file size."""
    spec = model_spec(arch)
    rng = np.random.default_rng(seed)
    entries = [(name, shape, "I64" if kind == "nbt" else "F32") for name, shape, kind, _ in spec]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(safetensors_header(entries))
        for name, shape, kind, extra in spec:
            for chunk in draw(rng, shape, kind, extra):
                f.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
    tmp.replace(path)
    return path.stat().st_size


def read_safetensors(path) -> dict:
    """{name: read-only numpy memmap view} (F32, F64, I64, I32 only)."""
    dtypes = {"F32": "<f4", "F64": "<f8", "I64": "<i8", "I32": "<i4"}
    path = Path(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n).decode("utf-8"))
    base = 8 + n
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        b, e = meta["data_offsets"]
        arr = mm[base + b: base + e].view(dtypes[meta["dtype"]])
        out[name] = arr.reshape(meta["shape"])
    return out


# ---------------------------------------------------------------------------
# 3. The input image (torchvision's ImageNet preset, PIL)
# ---------------------------------------------------------------------------


def first_photo(folder: Path = PHOTOS) -> Path:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise SystemExit(f"no images in {folder}")
    return files[0]


def make_input(path: Path, size: int = 224, resize: int | None = None) -> np.ndarray:
    """float32 [1, 3, size, size]: Resize(short side) bilinear, CenterCrop, ToTensor, Normalize.

    The resize is 256 for size 224 (torchvision's ratio 224/256 otherwise).  Sizes
    follow torchvision: long side = int(short_target * long / short); crop offsets
    = int(round((dim - size) / 2)).  Normalisation is computed in float64 and
    rounded once to float32 (torchvision computes it in float32: <= 1 ulp apart;
    the Rust test reads this very file, so that does not matter).
    """
    from PIL import Image

    if resize is None:
        resize = 256 if size == 224 else int(round(size * 256 / 224))
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        if w <= h:
            nw, nh = resize, int(resize * h / w)
        else:
            nw, nh = int(resize * w / h), resize
        im = im.resize((nw, nh), Image.BILINEAR)
        top = int(round((nh - size) / 2.0))
        left = int(round((nw - size) / 2.0))
        im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.float64) / 255.0  # (H, W, 3)
    x = (arr - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


# ---------------------------------------------------------------------------
# 4. Float64 layers (one image, HWC layout internally)
# ---------------------------------------------------------------------------

IM2COL_BYTES = 48 << 20  # cap on one im2col buffer (float64)


def conv2d(x: np.ndarray, w, bias, stride: int, pad: int) -> np.ndarray:
    """Cross-correlation as torch.  x: (H, W, C) float64; w: (O, C, k, k) any float dtype.

    im2col + matmul, in chunks of output rows so the column buffer stays small.
    """
    h, wd, c = x.shape
    o, c2, kh, kw = w.shape
    assert c == c2, (c, c2)
    wmat = np.asarray(w, dtype=np.float64).transpose(2, 3, 1, 0).reshape(kh * kw * c, o)
    xp = np.pad(x, ((pad, pad), (pad, pad), (0, 0))) if pad else x
    xp = np.ascontiguousarray(xp, dtype=np.float64)
    ho = (h + 2 * pad - kh) // stride + 1
    wo = (wd + 2 * pad - kw) // stride + 1
    out = np.empty((ho, wo, o), dtype=np.float64)
    sy, sx, sc = xp.strides
    rows = max(1, IM2COL_BYTES // (wo * kh * kw * c * 8))
    for y0 in range(0, ho, rows):
        y1 = min(ho, y0 + rows)
        view = np.lib.stride_tricks.as_strided(
            xp[y0 * stride:], shape=(y1 - y0, wo, kh, kw, c),
            strides=(sy * stride, sx * stride, sy, sx, sc), writeable=False)
        cols = np.ascontiguousarray(view).reshape((y1 - y0) * wo, kh * kw * c)
        out[y0:y1] = (cols @ wmat).reshape(y1 - y0, wo, o)
    if bias is not None:
        out += np.asarray(bias, dtype=np.float64)
    return out


def batchnorm(x: np.ndarray, sd: dict, prefix: str) -> np.ndarray:
    g = np.asarray(sd[f"{prefix}.weight"], dtype=np.float64)
    b = np.asarray(sd[f"{prefix}.bias"], dtype=np.float64)
    m = np.asarray(sd[f"{prefix}.running_mean"], dtype=np.float64)
    v = np.asarray(sd[f"{prefix}.running_var"], dtype=np.float64)
    return (x - m) / np.sqrt(v + BN_EPS) * g + b


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def maxpool(x: np.ndarray, k: int, stride: int, pad: int) -> np.ndarray:
    h, w, c = x.shape
    xp = np.pad(x, ((pad, pad), (pad, pad), (0, 0)), constant_values=-np.inf) if pad else x
    ho = (h + 2 * pad - k) // stride + 1
    wo = (w + 2 * pad - k) // stride + 1
    out = np.full((ho, wo, c), -np.inf)
    for dy in range(k):
        for dx in range(k):
            np.maximum(out, xp[dy:dy + stride * (ho - 1) + 1:stride,
                               dx:dx + stride * (wo - 1) + 1:stride], out=out)
    return out


def adaptive_avgpool(x: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """torch's AdaptiveAvgPool2d: bin i covers [floor(i*H/oh), ceil((i+1)*H/oh))."""
    h, w, c = x.shape
    out = np.empty((oh, ow, c))
    for i in range(oh):
        y0, y1 = (i * h) // oh, -((-(i + 1) * h) // oh)
        for j in range(ow):
            x0, x1 = (j * w) // ow, -((-(j + 1) * w) // ow)
            out[i, j] = x[y0:y1, x0:x1].mean(axis=(0, 1))
    return out


def linear(x: np.ndarray, w, b, rows: int = 512) -> np.ndarray:
    """x: (in,) float64; w: (out, in) float32 (memmap); converted to float64 in row chunks."""
    out = np.empty(w.shape[0])
    for r0 in range(0, w.shape[0], rows):
        out[r0:r0 + rows] = np.asarray(w[r0:r0 + rows], dtype=np.float64) @ x
    return out + np.asarray(b, dtype=np.float64)


def chan_mean(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=(0, 1)) if x.ndim == 3 else x


# ---------------------------------------------------------------------------
# 5. The two families
# ---------------------------------------------------------------------------


def resnet_forward(arch: str, sd: dict, x_chw: np.ndarray):
    taps = {}
    x = np.ascontiguousarray(x_chw.transpose(1, 2, 0), dtype=np.float64)
    y = conv2d(x, sd["conv1.weight"], None, 2, 3)
    taps["conv1"] = chan_mean(y)
    x = maxpool(relu(batchnorm(y, sd, "bn1")), 3, 2, 1)
    for prefix, kind, _cin, _width, _cout, stride, down in resnet_blocks(arch):
        if kind == "basic":
            convs = [("conv1", 3, stride, 1), ("conv2", 3, 1, 1)]
        else:
            convs = [("conv1", 1, 1, 0), ("conv2", 3, stride, 1), ("conv3", 1, 1, 0)]
        h = x
        for n, (name, _k, s, p) in enumerate(convs):
            h = conv2d(h, sd[f"{prefix}.{name}.weight"], None, s, p)
            taps[f"{prefix}.{name}"] = chan_mean(h)
            h = batchnorm(h, sd, f"{prefix}.bn{n + 1}")
            if n + 1 < len(convs):
                h = relu(h)
        if down:
            idn = conv2d(x, sd[f"{prefix}.downsample.0.weight"], None, stride, 0)
            taps[f"{prefix}.downsample.0"] = chan_mean(idn)
            idn = batchnorm(idn, sd, f"{prefix}.downsample.1")
        else:
            idn = x
        x = relu(h + idn)
        taps[prefix] = chan_mean(x)
    pooled = x.mean(axis=(0, 1))
    logits = linear(pooled, sd["fc.weight"], sd["fc.bias"])
    return logits, taps


def vgg_forward(arch: str, sd: dict, x_chw: np.ndarray):
    taps = {}
    x = np.ascontiguousarray(x_chw.transpose(1, 2, 0), dtype=np.float64)
    for layer in vgg_layers(arch):
        if layer[0] == "pool":
            x = maxpool(x, 2, 2, 0)
            continue
        idx = layer[1]
        y = conv2d(x, sd[f"features.{idx}.weight"], sd[f"features.{idx}.bias"], 1, 1)
        taps[f"features.{idx}"] = chan_mean(y)
        x = relu(y)
    x = adaptive_avgpool(x, 7, 7)
    v = np.ascontiguousarray(x.transpose(2, 0, 1)).reshape(-1)  # torch.flatten of (C, H, W)
    for idx in (0, 3):
        v = linear(v, sd[f"classifier.{idx}.weight"], sd[f"classifier.{idx}.bias"])
        taps[f"classifier.{idx}"] = v.copy()
        v = relu(v)  # then Dropout: identity in eval
    logits = linear(v, sd["classifier.6.weight"], sd["classifier.6.bias"])
    return logits, taps


def forward(arch: str, sd: dict, x_chw: np.ndarray):
    return (resnet_forward if arch in RESNETS else vgg_forward)(arch, sd, x_chw)


# ---------------------------------------------------------------------------
# 6. Sub-commands
# ---------------------------------------------------------------------------


def cmd_make(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    wpath = out / "weights.safetensors"
    nbytes = write_random_weights(args.arch, wpath, args.seed)
    t1 = time.perf_counter()

    image = Path(args.image) if args.image else first_photo()
    x = make_input(image, args.size)
    np.save(out / "input.npy", x)
    t2 = time.perf_counter()

    sd = read_safetensors(wpath)
    expect = [n for n, *_ in model_spec(args.arch)]
    assert list(sd) == expect, "safetensors round trip changed the names"
    logits, taps = forward(args.arch, sd, x[0].astype(np.float64))
    del sd
    t3 = time.perf_counter()

    order = np.argsort(-logits)
    doc = {
        "arch": args.arch,
        "seed": args.seed,
        "size": args.size,
        "image": image.name,
        "residual_bn_scale": RESIDUAL_BN_SCALE if args.arch in RESNETS else None,
        "top5": [int(i) for i in order[:5]],
        "logit_margin": float(logits[order[0]] - logits[order[1]]),
        "logits": [float(v) for v in logits],
        "taps": {k: [float(v) for v in np.asarray(t).ravel()] for k, t in taps.items()},
    }
    (out / "expected.json").write_text(json.dumps(doc))
    t4 = time.perf_counter()
    amax = max(float(np.abs(t).max()) for t in taps.values())
    print(f"{args.arch}: {nbytes / 1e6:.1f} MB weights in {t1 - t0:.1f} s, input {t2 - t1:.1f} s, "
          f"forward {t3 - t2:.1f} s, json {t4 - t3:.1f} s, total {t4 - t0:.1f} s; "
          f"{len(taps)} taps (max |tap| {amax:.3g}); logits [{logits.min():.4g}, "
          f"{logits.max():.4g}] std {logits.std():.3g}, top1 {order[0]} margin "
          f"{doc['logit_margin']:.4g}")
    return 0


def _rel_err(got, want) -> float:
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.abs(got - want).max() / max(1e-6, float(np.abs(want).max())))


def cmd_check(args) -> int:
    want = json.loads(Path(args.expected).read_text())
    got = json.loads(Path(args.got).read_text())
    problems = []
    if got.get("arch", want["arch"]) != want["arch"]:
        problems.append(f"arch: got {got.get('arch')!r}, expected {want['arch']!r}")
    wt, gt = want["taps"], got.get("taps", {})
    missing = [k for k in wt if k not in gt]
    extra = [k for k in gt if k not in wt]
    errs = {}
    bad_len = []
    for k, w in wt.items():
        if k not in gt:
            continue
        if len(gt[k]) != len(w):
            bad_len.append(f"{k} ({len(gt[k])} values, expected {len(w)})")
            continue
        errs[k] = _rel_err(gt[k], w)
    if "logits" not in got:
        missing.append("logits")
    elif len(got["logits"]) != len(want["logits"]):
        bad_len.append(f"logits ({len(got['logits'])} values, expected {len(want['logits'])})")
    else:
        errs["logits"] = _rel_err(got["logits"], want["logits"])
        ga, wa = int(np.argmax(got["logits"])), int(np.argmax(want["logits"]))
        if ga != wa:
            problems.append(f"logits argmax: got {ga}, expected {wa} "
                            f"(expected top-1/top-2 margin {want.get('logit_margin', float('nan')):.3g})")
    over = {k: e for k, e in errs.items() if not (e <= args.tol)}
    if missing:
        problems.append(f"{len(missing)} tap(s) missing from got: {', '.join(missing)}")
    if bad_len:
        problems.append(f"{len(bad_len)} tap(s) of the wrong length: {', '.join(bad_len)}")
    if over:
        problems.append(f"{len(over)} tap(s) over tol {args.tol:g}: " + ", ".join(
            f"{k}={e:.3g}" for k, e in over.items()))
    worst = max(errs.items(), key=lambda kv: kv[1]) if errs else ("-", float("nan"))
    print(f"{want['arch']}: compared {len(errs)} of {len(wt) + 1} (taps + logits); worst "
          f"{worst[0]} {worst[1]:.3g} (tol {args.tol:g}); logits err "
          f"{errs.get('logits', float('nan')):.3g}"
          + (f"; {len(extra)} tap(s) only in got (ignored): {', '.join(extra[:10])}"
             + (" ..." if len(extra) > 10 else "") if extra else ""))
    for p in problems:
        print("FAIL:", p)
    if args.verbose:
        for k, e in errs.items():
            print(f"  {k}: {e:.3g}")
    return 1 if problems else 0


def cmd_selftest(args) -> int:
    """Checks the layers against naive loops and the safetensors round trip."""
    import tempfile

    rng = np.random.default_rng(1)
    ok = True
    x = rng.standard_normal((9, 11, 5))
    for k, s, p in [(3, 1, 1), (3, 2, 1), (7, 2, 3), (1, 2, 0), (1, 1, 0)]:
        w = rng.standard_normal((4, 5, k, k))
        b = rng.standard_normal(4)
        got = conv2d(x, w, b, s, p)
        xp = np.pad(x, ((p, p), (p, p), (0, 0)))
        want = np.zeros_like(got)
        for i in range(got.shape[0]):
            for j in range(got.shape[1]):
                patch = xp[i * s:i * s + k, j * s:j * s + k, :]  # (k, k, C)
                want[i, j] = np.einsum("yxc,ocyx->o", patch, w) + b
        ok &= np.allclose(got, want, atol=1e-12)
        global IM2COL_BYTES
        saved, IM2COL_BYTES = IM2COL_BYTES, 1  # one output row per chunk
        try:
            ok &= np.allclose(conv2d(x, w, b, s, p), want, atol=1e-12)
        finally:
            IM2COL_BYTES = saved
    got = maxpool(x, 3, 2, 1)
    want = np.zeros_like(got)
    for i in range(got.shape[0]):
        for j in range(got.shape[1]):
            ys = slice(max(0, 2 * i - 1), min(9, 2 * i + 2))
            xs = slice(max(0, 2 * j - 1), min(11, 2 * j + 2))
            want[i, j] = x[ys, xs].max(axis=(0, 1))
    ok &= np.array_equal(got, want)
    ok &= np.array_equal(adaptive_avgpool(x[:7, :7], 7, 7), x[:7, :7])
    ok &= np.allclose(adaptive_avgpool(x, 1, 1)[0, 0], x.mean(axis=(0, 1)))
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "w.safetensors"
        write_random_weights("resnet18", p, 3)
        sd = read_safetensors(p)
        spec = resnet_spec("resnet18")
        ok &= list(sd) == [n for n, *_ in spec]
        ok &= all(tuple(sd[n].shape) == tuple(s) for n, s, *_ in spec)
        ok &= sd["bn1.num_batches_tracked"].dtype == np.dtype("<i8")
        with open(p, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
        ok &= n % 8 == 0
    # torchvision's parameter counts (excluding buffers)
    counts = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
              "vgg11": 132_863_336, "vgg16": 138_357_544}
    for arch, c in counts.items():
        n = sum(int(np.prod(s)) for name, s, k, _ in model_spec(arch)
                if k not in ("nbt", "bn_rm", "bn_rv"))
        ok &= n == c
    print("selftest", "ok" if ok else "FAILED")
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="random weights, input.npy and expected.json")
    m.add_argument("--arch", required=True, choices=ARCHS)
    m.add_argument("--out", required=True)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--size", type=int, default=224)
    m.add_argument("--image", help="default: the first photo of data/photos (sorted)")
    c = sub.add_parser("check", help="compare the Rust side's JSON with expected.json")
    c.add_argument("--expected", required=True)
    c.add_argument("--got", required=True)
    c.add_argument("--tol", type=float, default=1e-3)
    c.add_argument("--verbose", "-v", action="store_true", help="print every tap's error")
    sub.add_parser("selftest", help="layers vs naive loops; safetensors round trip")
    args = ap.parse_args(argv)
    return {"make": cmd_make, "check": cmd_check, "selftest": cmd_selftest}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
