#!/usr/bin/env python3
"""Independent float64 reference for freqtag's frequency tagging (paper defaults).

What this is
------------
A from-scratch re-implementation, in Python with numpy only (Pillow reads the
images, pyarrow reads the Rust tool's Parquet output), of the method described
in ``../shared/METHOD.md`` sections 1-4 for the CIFAR-10 ResNets of He et al.
2016 (akamaster/pytorch_resnet_cifar10, option-A shortcut):

* it reads the legacy (pre-1.6) PyTorch checkpoint format without torch;
* it runs the network in float64;
* it builds the paper's stimulus (left half of the image at 6 Hz, right half at
  7.5 Hz, 120 fps, 240 frames, contrast in [0.5, 1.0] multiplying the
  normalised image), records every convolution's output before batch norm
  (one neuron = one output channel, spatially averaged), and computes the
  amplitude spectrum ``|rfft(x)| / N`` and the authors' overall mean dB-SNR.

It shares no code with the Rust project, so agreement between the two is
evidence that both implement the method as written.

How the Rust tests use it
-------------------------
A Rust integration test runs the ``freqtag`` binary on a folder of images with
the paper's settings, writing ``OUT/spectra/*.parquet`` and
``OUT/neurons/*.parquet``, and then runs::

    python tests/reference/ref_paper.py compare --weights W --images DIR \
        [--limit K] --out OUT

which exits 0 (and prints a one-line summary) when every neuron's amplitude
spectrum agrees with this reference to within 1e-4 of that neuron's largest
amplitude, and exits 1 otherwise (or when images, layers or channels are
missing from the Rust output).  The test should skip, loudly, when Python or
the shared data are absent.

Sub-commands
------------
``accuracy --weights W --images DIR``
    Unmodulated top-1 on the labelled images of DIR (label = last number of the
    file name, as in ``cifar10_II_L.png``).  ResNet-32 gets 19/20 on
    ``cifar10-foolbox-20``.
``spectrum --weights W --image FILE --layer L --channel C``
    Prints one neuron's reference amplitude spectrum (and its mean dB-SNR) as
    JSON, for debugging.
``compare --weights W --images DIR [--limit K] --out OUT``
    As above.

The stimulus settings (``--fps --frames --f1 --f2 --smin --smax``) default to
the paper's and are accepted by every sub-command that builds a stimulus.
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import re
import struct
import sys
import time
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------
# 1. Legacy PyTorch checkpoint reader (no torch)
# ---------------------------------------------------------------------------
#
# torch.save before 1.6 ("legacy" format, not a zip) writes, back to back:
#   pickle 1: the magic number 0x1950a86a20f9469cfc6c
#   pickle 2: the protocol version (1001)
#   pickle 3: sys info (a dict: little_endian, type_sizes, ...)
#   pickle 4: the saved object; every tensor is pickled as a call to
#             torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)
#             where `storage` is a persistent id
#             ('storage', <StorageType class>, key, location, numel, view_metadata)
#   pickle 5: the list of storage keys, in the order their data follows
# then, for every key of that list: a little-endian u64 element count and the
# raw little-endian element data.
#
# Because the tensors are rebuilt (pickle 4) before the storages' bytes are
# read, tensors are first created as lazy references and resolved afterwards.

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


class _StorageType:
    """Marker standing for a torch.<X>Storage class: only its dtype matters."""

    def __init__(self, name: str, dtype: np.dtype):
        self.name = name
        self.dtype = np.dtype(dtype)

    def __repr__(self):
        return f"<{self.name}>"


# Little-endian numpy dtypes of the storage classes torch can write.
_STORAGE_DTYPES = {
    "FloatStorage": "<f4",
    "DoubleStorage": "<f8",
    "HalfStorage": "<f2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "<i1",
    "ByteStorage": "<u1",
    "BoolStorage": "?",
}


class _StorageRef:
    """A storage named in pickle 4; `array` is filled in once its bytes are read.

    For the very old 'view' storages (view_metadata not None) it points at a
    slice [offset, offset+size) of a root storage.
    """

    def __init__(self, key, stype: _StorageType, numel: int, root=None, offset=0):
        self.key = key
        self.stype = stype
        self.numel = numel
        self.root = root  # _StorageRef of the root storage for a view, else None
        self.offset = offset
        self.array = None  # 1-D numpy array, set after reading the data section

    def data(self) -> np.ndarray:
        if self.root is not None:
            return self.root.data()[self.offset:self.offset + self.numel]
        if self.array is None:
            raise ValueError(f"storage {self.key!r} has no data in the file")
        return self.array


class _LazyTensor:
    """Arguments of _rebuild_tensor(_v2): a strided view of a storage."""

    def __init__(self, storage: _StorageRef, offset: int, size, stride):
        self.storage = storage
        self.offset = int(offset)
        self.size = tuple(int(s) for s in size)
        self.stride = tuple(int(s) for s in stride)

    def resolve(self) -> np.ndarray:
        base = self.storage.data()
        n = len(self.size)
        if n == 0:
            return np.array(base[self.offset])
        # Bounds check: the farthest element addressed must lie in the storage.
        last = self.offset + sum((s - 1) * st for s, st in zip(self.size, self.stride) if s > 0)
        if any(s == 0 for s in self.size):
            return np.zeros(self.size, dtype=base.dtype)
        if last >= base.shape[0] or self.offset < 0:
            raise ValueError("tensor view runs past its storage")
        item = base.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[self.offset:],
            shape=self.size,
            strides=tuple(st * item for st in self.stride),
            writeable=False,
        )
        return np.array(view)  # own, contiguous copy


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data  # an nn.Parameter is just its tensor here


class _PlainDict(dict):
    """Stands in for collections.OrderedDict.

    A subclass (rather than dict itself) so that it has a __dict__: torch pickles
    a state_dict with a `_metadata` attribute, which pickle's BUILD opcode sets.
    """


class _CheckpointUnpickler(pickle.Unpickler):
    """Unpickler that only knows the few globals a state-dict checkpoint uses."""

    def __init__(self, file, storages: dict):
        super().__init__(file)
        self._storages = storages  # key -> _StorageRef, shared across pickles

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch._utils" and name == "_rebuild_tensor":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return _PlainDict
        raise pickle.UnpicklingError(
            f"checkpoint refers to {module}.{name}, which this reader does not support")

    def persistent_load(self, pid):
        # pid = ('storage', storage_type, key, location, numel, view_metadata)
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        _, stype, key, _location, numel, view_metadata = pid
        if not isinstance(stype, _StorageType):
            raise pickle.UnpicklingError(f"unknown storage type {stype!r}")
        root = self._storages.get(key)
        if root is None:
            root = _StorageRef(key, stype, int(numel))
            self._storages[key] = root
        if view_metadata is not None:
            view_key, offset, view_size = view_metadata
            view = self._storages.get(view_key)
            if view is None:
                view = _StorageRef(view_key, stype, int(view_size), root=root, offset=int(offset))
                self._storages[view_key] = view
            return view
        return root


def _resolve(obj):
    """Replace every _LazyTensor inside obj (dicts, lists, tuples) by its array."""
    if isinstance(obj, _LazyTensor):
        return obj.resolve()
    if isinstance(obj, dict):
        for k in list(obj.keys()):
            obj[k] = _resolve(obj[k])
        return obj
    if isinstance(obj, list):
        return [_resolve(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_resolve(v) for v in obj)
    return obj


def load_legacy_checkpoint(path) -> object:
    """Load a pre-1.6 torch.save file; tensors come back as numpy arrays."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"PK":
        raise ValueError(f"{path}: is a zip (torch >= 1.6) checkpoint, not the legacy format")
    f = io.BytesIO(raw)
    storages: dict = {}

    def next_pickle():
        return _CheckpointUnpickler(f, storages).load()

    magic = next_pickle()
    if magic != LEGACY_MAGIC:
        raise ValueError(f"{path}: bad magic number {magic!r}")
    protocol = next_pickle()
    if protocol != LEGACY_PROTOCOL:
        raise ValueError(f"{path}: unsupported protocol version {protocol!r}")
    sys_info = next_pickle()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise ValueError(f"{path}: big-endian checkpoints are not supported")
    obj = next_pickle()
    keys = next_pickle()

    # Data section: for each key, u64 LE element count then the raw elements.
    pos = f.tell()
    for key in keys:
        ref = storages.get(key)
        if ref is None:
            raise ValueError(f"{path}: data for storage {key!r} that no tensor uses")
        (numel,) = struct.unpack_from("<Q", raw, pos)
        pos += 8
        if numel != ref.numel:
            raise ValueError(f"{path}: storage {key!r} holds {numel} elements, "
                             f"the pickle said {ref.numel}")
        nbytes = numel * ref.stype.dtype.itemsize
        if pos + nbytes > len(raw):
            raise ValueError(f"{path}: truncated data for storage {key!r}")
        ref.array = np.frombuffer(raw, dtype=ref.stype.dtype, count=numel, offset=pos)
        pos += nbytes
    if pos != len(raw):
        raise ValueError(f"{path}: {len(raw) - pos} trailing bytes after the storages")
    return _resolve(obj)


# ---------------------------------------------------------------------------
# 2. CIFAR-10 ResNet (He et al. 2016, akamaster), float64, NHWC internally
# ---------------------------------------------------------------------------

BN_EPS = 1e-5


def conv2d(x: np.ndarray, w: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """Convolution (cross-correlation, as torch) by im2col + one matmul.

    x: (B, H, W, C) float64; w: (O, C, kh, kw) torch layout.  Returns (B, Ho, Wo, O).
    The arithmetic is in the common dtype of x and w (float64 for float64 inputs).
    """
    b, h, wd, c = x.shape
    o, c2, kh, kw = w.shape
    assert c == c2, (c, c2)
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))) if pad else x
    ho = (h + 2 * pad - kh) // stride + 1
    wo = (wd + 2 * pad - kw) // stride + 1
    # cols[b, y, x, dy, dx, c] = xp[b, y*stride+dy, x*stride+dx, c], gathered by one
    # copy of a strided (read-only) view of xp: (dx, c) is contiguous in both, which
    # makes the copy several times faster than one slice assignment per (dy, dx).
    xp = np.ascontiguousarray(xp, dtype=np.result_type(x.dtype, w.dtype))
    sb, sy, sx, sc = xp.strides
    cols = np.ascontiguousarray(np.lib.stride_tricks.as_strided(
        xp, shape=(b, ho, wo, kh, kw, c),
        strides=(sb, sy * stride, sx * stride, sy, sx, sc), writeable=False))
    wmat = w.transpose(2, 3, 1, 0).reshape(kh * kw * c, o)  # rows ordered (dy, dx, c)
    out = cols.reshape(b * ho * wo, kh * kw * c) @ wmat
    return out.reshape(b, ho, wo, o)


class CifarResNet:
    """ResNet-(6n+2) for CIFAR-10 with option-A shortcuts, from a state dict.

    `dtype` is the arithmetic precision (float64 by default; ref_prune.py may ask
    for float32 for speed).
    """

    def __init__(self, state_dict: dict, dtype=np.float64):
        self.dtype = np.dtype(dtype)
        # Strip the 'module.' prefix DataParallel added; keep float64 copies.
        sd = {}
        for k, v in state_dict.items():
            if k.startswith("module."):
                k = k[len("module."):]
            sd[k] = np.asarray(v)
        self.sd = sd
        # Blocks per stage: count distinct layer1.<i>.conv1.weight.
        self.n = {}
        for stage in (1, 2, 3):
            idx = {int(m.group(1)) for k in sd
                   for m in [re.match(rf"layer{stage}\.(\d+)\.conv1\.weight$", k)] if m}
            if not idx or idx != set(range(len(idx))):
                raise ValueError(f"state dict: bad or missing blocks in layer{stage}")
            self.n[stage] = len(idx)
        if len(set(self.n.values())) != 1:
            raise ValueError(f"unequal stages {self.n}")
        self.depth = 6 * self.n[1] + 2

    def w(self, name) -> np.ndarray:
        return self.sd[name].astype(self.dtype)

    def conv_names(self):
        """Every convolution's module path, in forward order (the taps)."""
        names = ["conv1"]
        for stage in (1, 2, 3):
            for i in range(self.n[stage]):
                names += [f"layer{stage}.{i}.conv1", f"layer{stage}.{i}.conv2"]
        return names

    def bn(self, x, name):
        """Batch norm, eval mode: running statistics, eps 1e-5 (channels last)."""
        mean = self.w(f"{name}.running_mean")
        var = self.w(f"{name}.running_var")
        gamma = self.w(f"{name}.weight")
        beta = self.w(f"{name}.bias")
        return (x - mean) / np.sqrt(var + BN_EPS) * gamma + beta

    def forward(self, x_nchw: np.ndarray, taps: bool = True):
        """x: (B, 3, H, W) normalised images.  Returns (logits (B,10), taps)

        taps: dict conv name -> (B, O) spatial mean of the conv output before BN.
        """
        x = np.ascontiguousarray(np.asarray(x_nchw, dtype=self.dtype).transpose(0, 2, 3, 1))
        rec = {}

        def conv(x, name, stride):
            y = conv2d(x, self.w(f"{name}.weight"), stride=stride, pad=1)
            if f"{name}.bias" in self.sd:  # none in these nets, but be general
                y = y + self.w(f"{name}.bias")
            if taps:
                rec[name] = y.mean(axis=(1, 2))
            return y

        relu = lambda t: np.maximum(t, 0.0)
        out = relu(self.bn(conv(x, "conv1", 1), "bn1"))
        in_planes = 16
        for stage, planes in ((1, 16), (2, 32), (3, 64)):
            for i in range(self.n[stage]):
                stride = 2 if (stage > 1 and i == 0) else 1
                p = f"layer{stage}.{i}"
                y = relu(self.bn(conv(out, f"{p}.conv1", stride), f"{p}.bn1"))
                y = self.bn(conv(y, f"{p}.conv2", 1), f"{p}.bn2")
                if stride != 1 or in_planes != planes:
                    # Option A: subsample by 2 and zero-pad planes//4 channels each side.
                    sc = out[:, ::2, ::2, :]
                    q = planes // 4
                    sc = np.pad(sc, ((0, 0), (0, 0), (0, 0), (q, q)))
                else:
                    sc = out
                out = relu(y + sc)
                in_planes = planes
        pooled = out.mean(axis=(1, 2))  # global average pool -> (B, 64)
        logits = pooled @ self.w("linear.weight").T + self.w("linear.bias")
        return logits, rec

    def forward_batched(self, x_nchw, chunk: int = 80):
        """forward() over chunks of the batch (bounds im2col memory)."""
        logits, taps = [], {}
        for s in range(0, x_nchw.shape[0], chunk):
            lg, tp = self.forward(x_nchw[s:s + chunk])
            logits.append(lg)
            for k, v in tp.items():
                taps.setdefault(k, []).append(v)
        return np.concatenate(logits), {k: np.concatenate(v) for k, v in taps.items()}


def load_model(weights, dtype=np.float64) -> CifarResNet:
    ckpt = load_legacy_checkpoint(weights)
    sd = ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
    return CifarResNet(sd, dtype=dtype)


# ---------------------------------------------------------------------------
# 3. Preprocessing
# ---------------------------------------------------------------------------

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
IMAGE_EXTS = {".png", ".jpg", ".jpeg"}


def load_image(path) -> np.ndarray:
    """RGB in [0, 1], float64, (3, H, W), taken as is (CIFAR images are 32x32)."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0
    return arr.transpose(2, 0, 1)


def normalise(x_chw: np.ndarray) -> np.ndarray:
    return (x_chw - MEAN[:, None, None]) / STD[:, None, None]


def list_images(folder) -> list:
    """Image files under folder (recursive), sorted by their relative posix path."""
    folder = Path(folder)
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def label_from_name(path) -> int:
    """cifar10_II_L.png -> L (the last number in the file name)."""
    nums = re.findall(r"\d+", Path(path).stem)
    if not nums:
        raise ValueError(f"no label in file name {path}")
    return int(nums[-1])


# ---------------------------------------------------------------------------
# 4. Stimulus, recording, spectrum and the authors' score
# ---------------------------------------------------------------------------


class Settings:
    """Paper defaults (METHOD.md sections 1-4); every one overridable on the CLI."""

    def __init__(self, fps=120.0, frames=240, f1=6.0, f2=7.5, smin=0.5, smax=1.0,
                 phase1=0.0, phase2=0.0):
        self.fps, self.frames = float(fps), int(frames)
        self.freqs = (float(f1), float(f2))
        self.phases = (float(phase1), float(phase2))
        self.smin, self.smax = float(smin), float(smax)

    def scalars(self) -> np.ndarray:
        """(N, 2): s_r(i) = smin + (smax-smin)/2 * (1 + sin(2 pi f_r i / fps + phi_r))."""
        i = np.arange(self.frames, dtype=np.float64)[:, None]
        f = np.array(self.freqs)[None, :]
        ph = np.array(self.phases)[None, :]
        return self.smin + (self.smax - self.smin) / 2.0 * (
            1.0 + np.sin(2.0 * np.pi * f * i / self.fps + ph))


def make_frames(x_norm: np.ndarray, st: Settings) -> np.ndarray:
    """(N, 3, H, W) frames: the normalised image times each region's scalar.

    Region 0 = left half (columns < W/2), region 1 = right half; modulate =
    'normalized' (the scalar multiplies all channels of the normalised image).
    """
    _, h, w = x_norm.shape
    left = (np.arange(w) < w / 2.0)  # columns < W/2
    s = st.scalars()  # (N, 2)
    # per-frame, per-column gain: (N, W)
    gain = np.where(left[None, :], s[:, 0:1], s[:, 1:2])
    return x_norm[None, :, :, :] * gain[:, None, None, :]


def amplitude_spectrum(series: np.ndarray) -> np.ndarray:
    """series (N, ...) -> A (N//2+1, ...) = |rfft(x)| / N, rectangular window."""
    n = series.shape[0]
    return np.abs(np.fft.rfft(series, axis=0)) / n


def authors_mean_snr_db(amp: np.ndarray, n_neigh: int = 3, skip: int = 1,
                        guard: float = 1e-8) -> np.ndarray:
    """The authors' overall score, METHOD.md section 4.

    amp: (K, M) amplitude spectra (bin axis first, DC included), M neurons.
    Drop DC; for each remaining bin j (0-based in the DC-dropped spectrum of
    K-1 bins) the baseline is the mean of the bins j-skip-n .. j-skip-1 and
    j+skip+1 .. j+skip+n that exist (a window running off either end uses only
    the neighbours inside); SNR = (A[j] + guard) / (baseline + guard); in dB,
    10*log10(SNR), floored at 0; averaged over all K-1 bins.
    """
    a = amp[1:]  # drop DC
    nb = a.shape[0]
    db = np.empty_like(a)
    for j in range(nb):
        neigh = [t for t in range(j - skip - n_neigh, j - skip)] + \
                [t for t in range(j + skip + 1, j + skip + n_neigh + 1)]
        neigh = [t for t in neigh if 0 <= t < nb]
        base = a[neigh].mean(axis=0)
        snr = (a[j] + guard) / (base + guard)
        db[j] = np.maximum(10.0 * np.log10(snr), 0.0)
    return db.mean(axis=0)


def reference_for_image(model: CifarResNet, path, st: Settings):
    """All neurons of one image: {layer: (amp (K, O), mean_snr_db (O,))}."""
    frames = make_frames(normalise(load_image(path)), st)
    _, taps = model.forward_batched(frames)
    out = {}
    for name in model.conv_names():
        amp = amplitude_spectrum(taps[name])  # (K, O)
        out[name] = (amp, authors_mean_snr_db(amp))
    return out


# ---------------------------------------------------------------------------
# Sub-commands
# ---------------------------------------------------------------------------


def cmd_accuracy(args) -> int:
    model = load_model(args.weights)
    files = list_images(args.images)
    if not files:
        print(f"error: no images in {args.images}", file=sys.stderr)
        return 1
    x = np.stack([normalise(load_image(p)) for p in files])
    logits, _ = model.forward(x, taps=False)
    pred = logits.argmax(axis=1)
    labels = np.array([label_from_name(p) for p in files])
    correct = int((pred == labels).sum())
    for p, pr, lb in zip(files, pred, labels):
        if args.verbose:
            print(f"{p.name}: predicted {pr}, label {lb}{'' if pr == lb else '  WRONG'}")
    print(f"resnet{model.depth}: {correct}/{len(files)} correct "
          f"({100.0 * correct / len(files):.1f} %)")
    return 0


def cmd_spectrum(args) -> int:
    st = settings_from(args)
    model = load_model(args.weights)
    if args.layer not in model.conv_names():
        print(f"error: unknown layer {args.layer!r}; layers: {', '.join(model.conv_names())}",
              file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    ref = reference_for_image(model, args.image, st)
    dt = time.perf_counter() - t0
    amp, snr = ref[args.layer]
    if not 0 <= args.channel < amp.shape[1]:
        print(f"error: channel {args.channel} out of range 0..{amp.shape[1] - 1}", file=sys.stderr)
        return 1
    a = amp[:, args.channel]
    print(json.dumps({
        "image": str(args.image), "layer": args.layer, "channel": args.channel,
        "fps": st.fps, "frames": st.frames, "bin_hz": st.fps / st.frames,
        "amplitude": [float(v) for v in a],
        "mean_snr_db": float(snr[args.channel]),
        "seconds": round(dt, 3),
    }))
    return 0


def _read_parquet_dir(folder: Path, columns):
    """Concatenate OUT/<kind>/*.parquet into one pyarrow table of `columns`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet files in {folder}")
    tables = []
    for f in files:
        t = pq.read_table(f, columns=columns)
        tables.append(t)
    return pa.concat_tables(tables)


def _amplitudes_from_arrow(col, n_bins):
    """A list<float32> column -> (rows, n_bins) float64 array (checks lengths)."""
    import pyarrow.compute as pc

    parts = []
    for chunk in col.chunks:
        if chunk.null_count:
            raise ValueError("null amplitude lists in the Rust output")
        lengths = pc.list_value_length(chunk).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths != n_bins).any():
            bad = sorted(set(int(v) for v in lengths if v != n_bins))
            raise ValueError(f"amplitude lists of length {bad}, expected {n_bins} (N/2+1)")
        flat = chunk.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
        parts.append(flat.reshape(len(lengths), n_bins))
    return np.concatenate(parts) if parts else np.zeros((0, n_bins))


def cmd_compare(args) -> int:
    st = settings_from(args)
    n_bins = st.frames // 2 + 1
    out = Path(args.out)
    images_dir = Path(args.images)

    def fail(msg):
        print(f"FAIL: {msg}", file=sys.stderr)
        return 1

    try:
        spec = _read_parquet_dir(out / "spectra", ["image_id", "layer", "channel", "amplitude"])
        neur = _read_parquet_dir(out / "neurons", ["image_id", "layer", "channel", "mean_snr_db"])
        amps = _amplitudes_from_arrow(spec.column("amplitude"), n_bins)
    except (FileNotFoundError, ValueError, KeyError) as e:
        return fail(f"reading the Rust output in {out}: {e}")

    # Index the Rust output: (image, layer, channel) -> row / score.
    s_img = spec.column("image_id").to_pylist()
    s_lay = spec.column("layer").to_pylist()
    s_ch = spec.column("channel").to_pylist()
    rust_amp = {}
    for r, key in enumerate(zip(s_img, s_lay, s_ch)):
        if key in rust_amp:
            return fail(f"duplicate spectra row for {key}")
        rust_amp[key] = r
    rust_snr = {}
    for key, v in zip(zip(neur.column("image_id").to_pylist(), neur.column("layer").to_pylist(),
                          neur.column("channel").to_pylist()),
                      neur.column("mean_snr_db").to_pylist()):
        # The score is repeated on every term row of a neuron: they must agree.
        if key in rust_snr and not (rust_snr[key] == v or
                                    (rust_snr[key] is None and v is None)):
            return fail(f"mean_snr_db differs between term rows of {key}")
        rust_snr[key] = v

    # Expected images: those of the images folder (sorted relative paths),
    # the first --limit of them; every one must be in both Rust outputs.
    files = list_images(images_dir)
    if not files:
        return fail(f"no images in {images_dir}")
    if args.limit is not None:
        files = files[:args.limit]
    ids = [p.relative_to(images_dir).as_posix() for p in files]
    spec_ids, neur_ids = set(s_img), {k[0] for k in rust_snr}
    missing = [i for i in ids if i not in spec_ids or i not in neur_ids]
    if missing:
        return fail(f"{len(missing)} image(s) missing from the Rust output "
                    f"(spectra has {len(spec_ids)}, neurons has {len(neur_ids)} image ids): "
                    f"{missing[:10]}")

    model = load_model(args.weights)
    layers = model.conv_names()
    worst = []  # (rel_err, image, layer, channel)
    snr_diff_other, snr_diff_conv1 = 0.0, 0.0
    n_neurons, t_total = 0, 0.0
    for path, img in zip(files, ids):
        t0 = time.perf_counter()
        ref = reference_for_image(model, path, st)
        t_total += time.perf_counter() - t0
        for layer in layers:
            amp_ref, snr_ref = ref[layer]
            n_ch = amp_ref.shape[1]
            rows = [rust_amp.get((img, layer, c)) for c in range(n_ch)]
            if all(r is None for r in rows):
                return fail(f"layer {layer!r} missing from the Rust spectra of {img}")
            if any(r is None for r in rows):
                miss = [c for c, r in enumerate(rows) if r is None]
                return fail(f"{img} {layer}: channels {miss[:10]} missing from the Rust spectra")
            if (img, layer, n_ch) in rust_amp:
                return fail(f"{img} {layer}: Rust output has channel {n_ch} (only {n_ch} exist)")
            a_rust = amps[rows].T  # (K, O)
            peak = amp_ref.max(axis=0)
            err = np.abs(a_rust - amp_ref).max(axis=0) / np.where(peak > 0, peak, 1.0)
            for c in range(n_ch):
                worst.append((float(err[c]), img, layer, c))
                v = rust_snr.get((img, layer, c))
                if v is None:
                    return fail(f"{img} {layer} channel {c}: no mean_snr_db in the Rust neurons")
                d = abs(float(v) - float(snr_ref[c]))
                if layer == "conv1":
                    snr_diff_conv1 = max(snr_diff_conv1, d)
                else:
                    snr_diff_other = max(snr_diff_other, d)
            n_neurons += n_ch

    worst.sort(key=lambda t: -t[0])
    max_err = worst[0][0]
    bad = [w for w in worst if not (w[0] <= args.amp_tol)]  # NaN counts as bad
    snr_bad = args.snr_tol is not None and not (snr_diff_other <= args.snr_tol)
    summary = (f"resnet{model.depth}: {len(ids)} image(s), {len(layers)} layers, {n_neurons} neurons; "
               f"max amplitude error {max_err:.3e} of the neuron's peak (tol {args.amp_tol:g}); "
               f"max |mean_snr_db diff| {snr_diff_other:.3e} dB (layers past conv1), "
               f"{snr_diff_conv1:.3e} dB (conv1, rounding-sensitive); "
               f"reference {t_total / len(ids):.2f} s/image")
    if bad or snr_bad:
        print("FAIL: " + summary, file=sys.stderr)
        if bad:
            print(f"{len(bad)} neuron(s) over the amplitude tolerance; worst:", file=sys.stderr)
            for e, img, layer, c in bad[:args.show]:
                print(f"  {img} {layer} ch {c}: {e:.3e}", file=sys.stderr)
        if snr_bad:
            print(f"mean_snr_db differs by {snr_diff_other:.3e} dB > {args.snr_tol:g}",
                  file=sys.stderr)
        return 1
    print("OK: " + summary)
    return 0


def cmd_selftest(args) -> int:
    """Standalone checks of part 5 on one image (no Rust output needed)."""
    st = settings_from(args)
    model = load_model(args.weights)
    t0 = time.perf_counter()
    ref = reference_for_image(model, args.image, st)
    dt = time.perf_counter() - t0
    k = np.arange(st.frames // 2 + 1)
    lattice = (k % 3 == 0)  # multiples of 1.5 Hz at 0.5 Hz resolution (paper settings)
    ok = True
    for layer, (amp, snr) in ref.items():
        nondc = amp[1:]
        peak = amp.max(axis=0)
        off = (amp[~lattice] / peak).max()
        top2 = np.sort(np.argsort(nondc, axis=0)[-2:] + 1, axis=0)  # two largest non-DC bins
        frac = np.mean((top2[0] == 12) & (top2[1] == 15))
        line = (f"{layer:16s} off-lattice max/peak {off:.2e}  top-2 bins==(12,15) in "
                f"{100 * frac:5.1f} % of channels  mean_snr_db {snr.mean():.4f} "
                f"[{snr.min():.4f}, {snr.max():.4f}]")
        print(line)
        if layer == "conv1" and frac < 1.0:
            ok = False
        if off > 1e-9:
            ok = False
    print(f"reference for one image: {dt:.2f} s; {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


def settings_from(args) -> Settings:
    return Settings(fps=args.fps, frames=args.frames, f1=args.f1, f2=args.f2,
                    smin=args.smin, smax=args.smax)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    def stim(p):
        g = p.add_argument_group("stimulus (paper defaults)")
        g.add_argument("--fps", type=float, default=120.0)
        g.add_argument("--frames", type=int, default=240)
        g.add_argument("--f1", type=float, default=6.0, help="left half, Hz")
        g.add_argument("--f2", type=float, default=7.5, help="right half, Hz")
        g.add_argument("--smin", type=float, default=0.5)
        g.add_argument("--smax", type=float, default=1.0)

    p = sub.add_parser("accuracy", help="unmodulated top-1 on labelled images")
    p.add_argument("--weights", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=cmd_accuracy)

    p = sub.add_parser("spectrum", help="one neuron's reference spectrum as JSON")
    p.add_argument("--weights", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--layer", required=True)
    p.add_argument("--channel", type=int, required=True)
    stim(p)
    p.set_defaults(func=cmd_spectrum)

    p = sub.add_parser("compare", help="check the Rust tool's Parquet output")
    p.add_argument("--weights", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--out", required=True, help="the Rust run's output folder")
    p.add_argument("--limit", type=int, default=None,
                   help="check only the first K images (sorted relative paths)")
    p.add_argument("--amp-tol", type=float, default=1e-4,
                   help="max amplitude error relative to each neuron's peak (default 1e-4)")
    p.add_argument("--snr-tol", type=float, default=None,
                   help="also fail if mean_snr_db (layers past conv1) differs by more (default: report only)")
    p.add_argument("--show", type=int, default=20, help="worst neurons listed on failure")
    stim(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("selftest", help="standalone checks of the spectra on one image")
    p.add_argument("--weights", required=True)
    p.add_argument("--image", required=True)
    stim(p)
    p.set_defaults(func=cmd_selftest)

    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
