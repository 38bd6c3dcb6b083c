#!/usr/bin/env python3
"""Independent float64 reference for EfficientNet-Lite0 (numpy only, no torch).

What this is
------------
A from-scratch numpy implementation of EfficientNet-Lite0 (Tan and Le 2019; the
"Lite" variant: no squeeze-excitation, ReLU6, stem and head not scaled) run in
float64 on the converted TensorFlow weights stored with the EfficientNet-PyTorch
names (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` / ``_bn0`` /
``_depthwise_conv`` / ``_bn1`` / ``_project_conv`` / ``_bn2``, ``_conv_head``,
``_bn1``, ``_fc``).  Only the legacy checkpoint reader is borrowed, from
``ref_paper.py``; the layers are written here (ref_paper's ``conv2d`` only pads
symmetrically, which is not what this network needs).

Architecture
------------
* stem: 3x3 conv stride 2, 3 -> 32, BN, ReLU6;
* 16 MBConv blocks, stages (repeats, kernel, stride, expand, out) =
  (1,3,1,1,16) (2,3,2,6,24) (2,5,2,6,40) (3,3,2,6,80) (3,5,1,6,112)
  (4,5,2,6,192) (1,3,1,6,320); the stride applies to a stage's first block.
  Block: [1x1 expand conv + BN + ReLU6 when expand != 1], depthwise kxk conv +
  BN + ReLU6, 1x1 project conv + BN (no activation), plus the input when the
  stride is 1 and in == out channels.  The kernel sizes and channel counts are
  checked against the checkpoint's shapes.
* head: 1x1 conv 320 -> 1280, BN, ReLU6, global average pool, fc 1280 -> 1000.
* BN: inference (running statistics), eps 1e-3.  No conv has a bias.
* Padding: TensorFlow "SAME".  Per spatial dim: out = ceil(in / stride),
  pad_total = max((out - 1) * stride + k - in, 0), pad_before = pad_total // 2,
  pad_after = pad_total - pad_before.  (At stride 2 on an even size the extra
  zero row / column is after, i.e. bottom / right.)  ``--padding symmetric``
  swaps in k // 2 zeros on every side (what a naive PyTorch port does), for
  diagnostics only.

Preprocessing (file images)
---------------------------
RGB uint8; the short side resized to 256 with PIL bilinear (``Image.BILINEAR``,
PIL's antialiasing resampler); the long side = int(256 * long / short)
(torchvision's ``Resize(256)`` rule: truncation); centre crop 224 with offsets
top = int(round((h - 224) / 2)), left = int(round((w - 224) / 2)) (torchvision's
``CenterCrop``; Python rounds halves to even); then (x - 127) / 128 on the 0..255
values, in float64.  ``--dump-inputs DIR`` writes each image's preprocessed
input as float32 [1, 3, 224, 224] ``DIR/<stem>.npy``, so that another
implementation can be fed an identical tensor (``--input-npy`` reads one back).

Usage
-----
::

    python tests/reference/ref_efficientnet_lite0.py --weights W --images DIR \
        [--json OUT.json] [--dump-inputs DIR2] [--compare-symmetric]
    python tests/reference/ref_efficientnet_lite0.py --weights W --input-npy X.npy \
        [--json OUT.json]
    python tests/reference/ref_efficientnet_lite0.py --selftest

The image mode prints every image's top-1 and its label (the last number of the
file name, ``imagenet_II_L.jpg``) and the number correct, and writes
``{file: {"logits": [1000 floats], "top1": k}}`` (file = path relative to DIR).
The npy mode prints the top-5 and writes ``{npy file name: {...}}`` likewise.
``--compare-symmetric`` also runs the network with symmetric padding and prints
its accuracy and the largest |logit| difference from SAME padding.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ref_paper import load_legacy_checkpoint  # noqa: E402  (reader only)

BN_EPS = 1e-3
STAGES = [  # (repeats, kernel, stride, expand, out)
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
]
STEM_CH, HEAD_CH, N_CLASSES = 32, 1280, 1000
IMAGE_EXTS = {".png", ".jpg", ".jpeg"}


# ---------------------------------------------------------------------------
# Padding and layers (one image, HWC float64)
# ---------------------------------------------------------------------------


def pads(size: int, k: int, stride: int, mode: str):
    """(before, after, out) zero padding of one spatial dim."""
    if mode == "same":
        out = -(-size // stride)  # ceil
        total = max((out - 1) * stride + k - size, 0)
        before = total // 2
        return before, total - before, out
    if mode == "symmetric":
        p = k // 2
        return p, p, (size + 2 * p - k) // stride + 1
    raise ValueError(f"unknown padding mode {mode!r}")


def pad_hw(x: np.ndarray, k: int, stride: int, mode: str):
    """Zero-pads x (H, W, C) for a k x k window; returns (padded, Ho, Wo)."""
    h, w, _ = x.shape
    pt, pb, ho = pads(h, k, stride, mode)
    pl, pr, wo = pads(w, k, stride, mode)
    if pt or pb or pl or pr:
        x = np.pad(x, ((pt, pb), (pl, pr), (0, 0)))
    return x, ho, wo


def conv_full(x: np.ndarray, w: np.ndarray, stride: int, mode: str) -> np.ndarray:
    """Dense conv (cross-correlation).  x (H, W, C), w (O, C, k, k) -> (Ho, Wo, O)."""
    o, c, kh, kw = w.shape
    assert kh == kw and c == x.shape[2], (w.shape, x.shape)
    k = kh
    if k == 1 and stride == 1:
        h, wd, _ = x.shape
        return (x.reshape(h * wd, c) @ w.reshape(o, c).T).reshape(h, wd, o)
    xp, ho, wo = pad_hw(x, k, stride, mode)
    xp = np.ascontiguousarray(xp)
    sy, sx, sc = xp.strides
    # cols[y, x, dy, dx, c] = xp[y*stride + dy, x*stride + dx, c]
    cols = np.lib.stride_tricks.as_strided(
        xp, shape=(ho, wo, k, k, c), strides=(sy * stride, sx * stride, sy, sx, sc),
        writeable=False)
    wmat = w.transpose(2, 3, 1, 0).reshape(k * k * c, o)  # rows (dy, dx, c)
    return (np.ascontiguousarray(cols).reshape(ho * wo, k * k * c) @ wmat).reshape(ho, wo, o)


def conv_depthwise(x: np.ndarray, w: np.ndarray, stride: int, mode: str) -> np.ndarray:
    """Depthwise conv.  x (H, W, C), w (C, 1, k, k) -> (Ho, Wo, C): a sum of k*k shifted views."""
    c, one, kh, kw = w.shape
    assert one == 1 and kh == kw and c == x.shape[2], (w.shape, x.shape)
    k = kh
    xp, ho, wo = pad_hw(x, k, stride, mode)
    out = np.zeros((ho, wo, c), dtype=np.float64)
    for dy in range(k):
        for dx in range(k):
            view = xp[dy:dy + (ho - 1) * stride + 1:stride, dx:dx + (wo - 1) * stride + 1:stride, :]
            out += view * w[:, 0, dy, dx]
    return out


def relu6(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 6.0)


# ---------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------


def block_specs():
    """[(index, cin, cout, kernel, stride, expand)] for the 16 blocks."""
    out, cin = [], STEM_CH
    for reps, k, s, e, cout in STAGES:
        for i in range(reps):
            out.append((len(out), cin, cout, k, s if i == 0 else 1, e))
            cin = cout
    return out


class EfficientNetLite0:
    def __init__(self, state_dict: dict):
        sd = {}
        for name, v in state_dict.items():
            if name.startswith("module."):
                name = name[len("module."):]
            sd[name] = np.asarray(v)
        self.sd = sd
        self._check()
        # BN folded into (scale, shift), float64.
        self.bn = {}
        for name in sd:
            if name.endswith(".running_var"):
                p = name[: -len(".running_var")]
                var = sd[f"{p}.running_var"].astype(np.float64)
                scale = sd[f"{p}.weight"].astype(np.float64) / np.sqrt(var + BN_EPS)
                shift = sd[f"{p}.bias"].astype(np.float64) - sd[f"{p}.running_mean"] * scale
                self.bn[p] = (scale, shift)

    def w(self, name):
        return self.sd[name].astype(np.float64)

    def _check(self):
        """Every expected tensor is there with the expected shape; nothing else is."""
        sd, expect = self.sd, {}

        def conv(name, o, c, k):
            expect[f"{name}.weight"] = (o, c, k, k)

        def bn(name, c):
            for t in ("weight", "bias", "running_mean", "running_var"):
                expect[f"{name}.{t}"] = (c,)

        conv("_conv_stem", STEM_CH, 3, 3)
        bn("_bn0", STEM_CH)
        for i, cin, cout, k, _s, e in block_specs():
            p, mid = f"_blocks.{i}", cin * e
            if e != 1:
                conv(f"{p}._expand_conv", mid, cin, 1)
                bn(f"{p}._bn0", mid)
            conv(f"{p}._depthwise_conv", mid, 1, k)
            bn(f"{p}._bn1", mid)
            conv(f"{p}._project_conv", cout, mid, 1)
            bn(f"{p}._bn2", cout)
        conv("_conv_head", HEAD_CH, block_specs()[-1][2], 1)
        bn("_bn1", HEAD_CH)
        expect["_fc.weight"] = (N_CLASSES, HEAD_CH)
        expect["_fc.bias"] = (N_CLASSES,)
        for name, shape in expect.items():
            if name not in sd:
                raise ValueError(f"checkpoint lacks {name}")
            if tuple(sd[name].shape) != shape:
                raise ValueError(f"{name}: shape {tuple(sd[name].shape)}, expected {shape}")
        extra = [n for n in sd if n not in expect and not n.endswith(".num_batches_tracked")]
        if extra:
            raise ValueError(f"unexpected tensors in the checkpoint: {extra[:10]}")

    def _bn(self, x, name):
        scale, shift = self.bn[name]
        return x * scale + shift

    def forward(self, x_chw: np.ndarray, padding: str = "same") -> np.ndarray:
        """x (3, H, W) normalised image -> logits (1000,) float64."""
        x = np.ascontiguousarray(np.asarray(x_chw, dtype=np.float64).transpose(1, 2, 0))
        x = relu6(self._bn(conv_full(x, self.w("_conv_stem.weight"), 2, padding), "_bn0"))
        for i, cin, cout, k, s, e in block_specs():
            p = f"_blocks.{i}"
            y = x
            if e != 1:
                y = relu6(self._bn(conv_full(y, self.w(f"{p}._expand_conv.weight"), 1, padding),
                                   f"{p}._bn0"))
            y = relu6(self._bn(conv_depthwise(y, self.w(f"{p}._depthwise_conv.weight"), s, padding),
                               f"{p}._bn1"))
            y = self._bn(conv_full(y, self.w(f"{p}._project_conv.weight"), 1, padding), f"{p}._bn2")
            x = y + x if (s == 1 and cin == cout) else y
        x = relu6(self._bn(conv_full(x, self.w("_conv_head.weight"), 1, padding), "_bn1"))
        pooled = x.mean(axis=(0, 1))
        return self.w("_fc.weight") @ pooled + self.w("_fc.bias")


def load_model(weights) -> EfficientNetLite0:
    ckpt = load_legacy_checkpoint(weights)
    if isinstance(ckpt, dict) and "state_dict" in ckpt:
        ckpt = ckpt["state_dict"]
    return EfficientNetLite0(ckpt)


# ---------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------


def preprocess(path, resize: int = 256, crop: int = 224) -> np.ndarray:
    """(3, crop, crop) float64: PIL bilinear short side -> resize, centre crop, (x-127)/128."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        if w <= h:
            nw, nh = resize, int(resize * h / w)
        else:
            nw, nh = int(resize * w / h), resize
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.BILINEAR)
        top = int(round((nh - crop) / 2.0))
        left = int(round((nw - crop) / 2.0))
        im = im.crop((left, top, left + crop, top + crop))
        arr = np.asarray(im, dtype=np.float64)  # (crop, crop, 3), 0..255
    return ((arr - 127.0) / 128.0).transpose(2, 0, 1)


def list_images(folder: Path):
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def label_from_name(path):
    nums = re.findall(r"\d+", Path(path).stem)
    return int(nums[-1]) if nums else None


def load_npy_input(path) -> np.ndarray:
    x = np.load(path)
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise ValueError(f"{path}: batch of {x.shape[0]}, expected 1")
        x = x[0]
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"{path}: shape {x.shape}, expected [1, 3, H, W]")
    return x.astype(np.float64)


# ---------------------------------------------------------------------------
# Self-test: the layers against naive loops
# ---------------------------------------------------------------------------


def _naive_conv(x, w, stride, mode, depthwise):
    h, wd, c = x.shape
    k = w.shape[2]
    pt, _, ho = pads(h, k, stride, mode)
    pl, _, wo = pads(wd, k, stride, mode)
    o = w.shape[0]
    out = np.zeros((ho, wo, o))
    for y in range(ho):
        for xx in range(wo):
            for dy in range(k):
                for dx in range(k):
                    iy, ix = y * stride + dy - pt, xx * stride + dx - pl
                    if 0 <= iy < h and 0 <= ix < wd:
                        if depthwise:
                            out[y, xx] += x[iy, ix] * w[:, 0, dy, dx]
                        else:
                            out[y, xx] += w[:, :, dy, dx] @ x[iy, ix]
    return out


def selftest() -> int:
    rng = np.random.default_rng(0)
    # TF SAME pads against hand-worked cases: (size, k, stride) -> (before, after, out)
    cases = {(224, 3, 2): (0, 1, 112), (112, 3, 1): (1, 1, 112), (112, 3, 2): (0, 1, 56),
             (56, 5, 2): (1, 2, 28), (14, 5, 2): (1, 2, 7), (7, 5, 1): (2, 2, 7),
             (7, 3, 2): (1, 1, 4), (5, 1, 1): (0, 0, 5)}
    ok = True
    for (n, k, s), want in cases.items():
        got = pads(n, k, s, "same")
        if got != want:
            print(f"FAIL pads({n},{k},{s}) = {got}, want {want}")
            ok = False
    worst = 0.0
    for mode in ("same", "symmetric"):
        for (h, wd) in ((7, 7), (8, 6), (9, 10)):
            for k in (1, 3, 5):
                for s in (1, 2):
                    x = rng.standard_normal((h, wd, 4))
                    wf = rng.standard_normal((3, 4, k, k))
                    wd_ = rng.standard_normal((4, 1, k, k))
                    e1 = np.abs(conv_full(x, wf, s, mode) - _naive_conv(x, wf, s, mode, False)).max()
                    e2 = np.abs(conv_depthwise(x, wd_, s, mode)
                                - _naive_conv(x, wd_, s, mode, True)).max()
                    worst = max(worst, e1, e2)
    if worst > 1e-12:
        print(f"FAIL conv vs naive loops: max |diff| {worst:.3g}")
        ok = False
    print(f"selftest {'ok' if ok else 'FAILED'} (conv vs naive max |diff| {worst:.3g})")
    return 0 if ok else 1


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def _entry(logits):
    return {"logits": [float(v) for v in logits], "top1": int(np.argmax(logits))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", help="efficientnet-lite0 legacy .pth checkpoint")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--images", help="folder of images (sorted, recursive)")
    src.add_argument("--input-npy", help="preprocessed float32 [1,3,H,W] input")
    ap.add_argument("--json", help="write {file: {logits, top1}} here")
    ap.add_argument("--dump-inputs", help="write each image's preprocessed input (npy) here")
    ap.add_argument("--padding", choices=("same", "symmetric"), default="same")
    ap.add_argument("--compare-symmetric", action="store_true",
                    help="also run with symmetric padding; report its accuracy and max |dlogit|")
    ap.add_argument("--selftest", action="store_true", help="layers vs naive loops, then exit")
    args = ap.parse_args(argv)

    if args.selftest:
        return selftest()
    if not args.weights or not (args.images or args.input_npy):
        ap.error("--weights and one of --images / --input-npy are required")

    t0 = time.perf_counter()
    model = load_model(args.weights)
    print(f"loaded {args.weights} in {time.perf_counter() - t0:.2f} s")
    result = {}

    if args.input_npy:
        x = load_npy_input(args.input_npy)
        t0 = time.perf_counter()
        logits = model.forward(x, args.padding)
        dt = time.perf_counter() - t0
        top5 = np.argsort(-logits)[:5]
        print(f"{Path(args.input_npy).name}: top-5 {[int(i) for i in top5]} "
              f"logits {[round(float(logits[i]), 4) for i in top5]} ({dt:.2f} s)")
        result[Path(args.input_npy).name] = _entry(logits)
        if args.compare_symmetric:
            other = "symmetric" if args.padding == "same" else "same"
            l2 = model.forward(x, other)
            print(f"{other} padding: top-1 {int(np.argmax(l2))}, "
                  f"max |logit diff| {np.abs(l2 - logits).max():.4f}")
    else:
        folder = Path(args.images)
        files = list_images(folder)
        if not files:
            print(f"error: no images in {folder}", file=sys.stderr)
            return 1
        if args.dump_inputs:
            Path(args.dump_inputs).mkdir(parents=True, exist_ok=True)
        correct = correct_sym = labelled = 0
        max_diff, t_fwd, t_all = 0.0, 0.0, time.perf_counter()
        for p in files:
            rel = p.relative_to(folder).as_posix()
            x = preprocess(p)
            if args.dump_inputs:
                np.save(Path(args.dump_inputs) / f"{p.stem}.npy",
                        x[None].astype(np.float32))
            t0 = time.perf_counter()
            logits = model.forward(x, args.padding)
            t_fwd += time.perf_counter() - t0
            top1 = int(np.argmax(logits))
            label = label_from_name(p)
            line = f"{rel}: top-1 {top1}, label {label}"
            if label is not None:
                labelled += 1
                correct += top1 == label
                if top1 != label:
                    line += "  WRONG"
            if args.compare_symmetric:
                other = "symmetric" if args.padding == "same" else "same"
                l2 = model.forward(x, other)
                d = float(np.abs(l2 - logits).max())
                max_diff = max(max_diff, d)
                t2 = int(np.argmax(l2))
                if label is not None:
                    correct_sym += t2 == label
                line += f"   [{other}: top-1 {t2}, max |dlogit| {d:.3f}]"
            print(line)
            result[rel] = _entry(logits)
        n = len(files)
        print(f"efficientnet-lite0 ({args.padding} padding): {correct}/{labelled} correct; "
              f"{n} images, forward {t_fwd:.2f} s ({t_fwd / n:.3f} s/image), "
              f"total {time.perf_counter() - t_all:.2f} s")
        if args.compare_symmetric:
            print(f"{other} padding: {correct_sym}/{labelled} correct; "
                  f"max |logit diff| vs {args.padding}: {max_diff:.4f}")

    if args.json:
        Path(args.json).write_text(json.dumps(result))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
