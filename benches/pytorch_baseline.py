#!/usr/bin/env python3
"""PyTorch baseline of freqtag's pipeline, for side-by-side speed comparisons (never a test).

It works the way the method's authors' public code does: every frame of the frequency-tagged
stimulus (all 240, no de-duplication) goes through the network in batches, forward hooks on every
``nn.Conv2d`` take the spatial mean of each output channel, and numpy's rfft of each neuron's
series gives the amplitude spectrum ``|rfft(x)| / N`` and the authors' mean dB-SNR.

    python benches/pytorch_baseline.py --pipeline paper|quickstart --images DIR \
        [--limit N] [--batch B] [--threads T] [--device cpu|cuda] [--tf32] [--dump DIR]
        [--weights W] --json

On a GPU (--device cuda) the frames are built there and an image's 240 frames go through in one
batch unless --batch says otherwise; the hooks' spatial means come back to the host once per
image, and the FFTs and scores run on the host with numpy, as on the CPU. Stage times on a GPU
synchronise with it at each stage's end. Convolutions and matmuls compute in full float32 there:
PyTorch's default lets cuDNN's float32 convolutions run on TF32 tensor cores, which round the
inputs to 10 bits of mantissa (on an H100 in session 15, 89 261 of 113 600 neurons of 100 CIFAR
images came out more than 1e-4 of their peak from the CPU's spectra, 99th percentile 8e-3).
--tf32 keeps PyTorch's default, for its speed.

paper: ResNet-32 for CIFAR-10 (He et al. 2016, option-A shortcut, akamaster's layout), 32x32
inputs. quickstart: torchvision MobileNetV2, torchvision's Resize(256) (bilinear) and CenterCrop(224).
Both: ImageNet mean/std; left half (columns < W/2) at 6 Hz, right half at 7.5 Hz, 120 fps,
240 frames, contrast in [0.5, 1.0] multiplying the normalised image.

With --dump DIR, one .npz per image: ``amplitude:<layer>`` (channels x bins, float32) and
``mean_snr_db:<layer>`` (channels, float64), plus ``image_id`` and ``layers``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# The paper's stimulus and spectrum settings (pipelines/*.toml, METHOD.md).
FREQS = (6.0, 7.5)
PHASES = (0.0, 0.0)
FPS = 120.0
FRAMES = 240
SMIN, SMAX = 0.5, 1.0
NEIGHBOURS, SKIP = 3, 1

PIPELINES = {
    "paper": {
        "images": REPO / "data" / "cifar10-foolbox-20",
        "resize": 32,
        "crop": 32,
        "batch": 64,
    },
    "quickstart": {
        "images": REPO / "data" / "photos",
        "resize": 256,
        "crop": 224,
        "batch": 8,
    },
}


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the new channels on both sides."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)


class CifarBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.shortcut = ShortcutA(cout)
        else:
            self.shortcut = nn.Sequential()

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-6n+2 for 32x32 inputs; module names follow the checkpoint's keys."""

    def __init__(self, blocks_per_stage: int, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin = 16
        for i, (cout, stride) in enumerate([(16, 1), (32, 2), (64, 2)], start=1):
            blocks = []
            for b in range(blocks_per_stage):
                blocks.append(CifarBlock(cin, cout, stride if b == 0 else 1))
                cin = cout
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.avg_pool2d(x, x.shape[3]).flatten(1)
        return self.linear(x)


def load_checkpoint(path: Path):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        # a legacy pickle from a file we trust (the project's shared weights)
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}


def default_weights(pipeline: str) -> Path:
    if pipeline == "paper":
        return REPO.parent / "shared" / "data" / "weights" / "cifar10-resnet" / "resnet32-d509ac18.th"
    cache = os.environ.get("FREQTAG_CACHE") or str(Path.home() / ".cache" / "freqtag")
    return Path(cache) / "mobilenet_v2-b0353104.pth"


def build_model(pipeline: str, weights: Path) -> nn.Module:
    if pipeline == "paper":
        model = CifarResNet(blocks_per_stage=5)  # ResNet-32: 6*5+2
    else:
        import torchvision

        model = torchvision.models.mobilenet_v2()
    state = load_checkpoint(weights)
    model.load_state_dict(state, strict=True)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Images and stimulus
# --------------------------------------------------------------------------------------------


def list_images(root: Path, limit: int | None) -> list[tuple[str, Path]]:
    exts = {".jpg", ".jpeg", ".png"}
    found = sorted(
        (p.relative_to(root).as_posix(), p)
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in exts
    )
    return found[:limit] if limit is not None else found


def prepare(path: Path, resize: int, crop: int) -> torch.Tensor:
    """RGB in [0,1] as [3, crop, crop]: torchvision's standard transforms on the PIL image,
    Resize(resize) (bilinear, Pillow's), CenterCrop(crop), ToTensor."""
    img = Image.open(path).convert("RGB")
    resize_crop = T.Compose(
        [T.Resize(resize, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(crop), T.ToTensor()]
    )
    return resize_crop(img)


def contrast(freq: float, phase: float, frame: int) -> float:
    """s(i) = smin + (smax-smin)/2 (1 + sin(2 pi f i / fps + phi)), in float64."""
    t = 2.0 * math.pi * freq * frame / FPS + phase
    return SMIN + (SMAX - SMIN) / 2.0 * (1.0 + math.sin(t))


def scalar_maps(size: int) -> torch.Tensor:
    """The per-pixel contrast of every frame, [FRAMES, 1, size, size], float32 as the network
    sees it. Halves: columns < size/2 are region 0 (f1), the rest region 1 (f2)."""
    s = np.array(
        [[contrast(f, p, i) for f, p in zip(FREQS, PHASES)] for i in range(FRAMES)],
        dtype=np.float64,
    ).astype(np.float32)
    region = (np.arange(size) * 2 // size).astype(np.int64)  # 0 left, 1 right
    maps = s[:, region]  # [FRAMES, size] per column
    maps = np.broadcast_to(maps[:, None, None, :], (FRAMES, 1, size, size))
    return torch.from_numpy(np.ascontiguousarray(maps))


# --------------------------------------------------------------------------------------------
# Recording, spectra, scores
# --------------------------------------------------------------------------------------------


class ConvRecorder:
    """Forward hooks on every nn.Conv2d: the spatial mean of each output channel per frame."""

    def __init__(self, model: nn.Module):
        self.names: list[str] = []
        self.store: dict[str, list[torch.Tensor]] = {}
        self.handles = []
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Conv2d):
                self.names.append(name)
                self.store[name] = []
                self.handles.append(mod.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(_module, _inputs, output):
            self.store[name].append(output.mean(dim=(2, 3)))

        return hook

    def take(self) -> dict[str, np.ndarray]:
        """Each layer's [FRAMES, channels] series (on the host), and clears the store."""
        out = {n: torch.cat(self.store[n]).cpu().numpy() for n in self.names}
        for n in self.names:
            self.store[n] = []
        return out


def amplitude_spectra(series: np.ndarray) -> np.ndarray:
    """[frames, channels] -> [channels, frames/2+1]: |rfft(x)| / N, computed in float64."""
    n = series.shape[0]
    return (np.abs(np.fft.rfft(series.astype(np.float64), axis=0)) / n).T


def authors_mean_snr_db(amp: np.ndarray, n: int = NEIGHBOURS, skip: int = SKIP) -> np.ndarray:
    """The authors' overall score per row of amp [channels, bins]: drop DC; SNR of every bin
    against n neighbours per side skipping `skip` (windows running off an end use the
    neighbours that exist); (A + 1e-8) / (mean + 1e-8); 10 log10 floored at 0; mean over bins."""
    guard = 1e-8
    s = amp[:, 1:]
    length = s.shape[1]
    cs = np.concatenate([np.zeros((s.shape[0], 1)), np.cumsum(s, axis=1)], axis=1)
    j = np.arange(length)
    l0 = np.clip(j - skip - n, 0, None)
    l1 = np.clip(j - skip, 0, None)
    r0 = np.clip(j + skip + 1, None, length)
    r1 = np.clip(j + skip + 1 + n, None, length)
    total = (cs[:, l1] - cs[:, l0]) + (cs[:, r1] - cs[:, r0])
    count = (l1 - l0) + (r1 - r0)
    base = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    snr = (s + guard) / (base + guard)
    return np.maximum(10.0 * np.log10(snr), 0.0).mean(axis=1)


# --------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KB on Linux


def full_float32() -> None:
    """Convolutions and matmuls on a GPU in IEEE float32, not TF32 (PyTorch's default for cuDNN
    convolutions). Through the per-backend API where this PyTorch has it (2.9 and later; it
    refuses a mix with the older `allow_tf32` flags), else the older flags."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    else:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", choices=sorted(PIPELINES), required=True)
    ap.add_argument("--images", type=Path, help="image folder (default: the pipeline's)")
    ap.add_argument("--limit", type=int, help="the first N images in sorted order")
    ap.add_argument("--batch", type=int, help="frames per forward pass (default: the pipeline's)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    ap.add_argument("--weights", type=Path, help="checkpoint (default: the pipeline's)")
    ap.add_argument("--dump", type=Path, help="write one .npz of spectra per image here")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument(
        "--channels-last",
        action="store_true",
        help="model and frames in channels-last memory format (oneDNN's faster path on CPU; "
        "not what the authors' code does, but what a tuned PyTorch gets)",
    )
    ap.add_argument(
        "--tf32",
        action="store_true",
        help="on a GPU, keep PyTorch's default of TF32 tensor cores in cuDNN's float32 "
        "convolutions (faster, spectra about 1e-3 apart); without it everything is float32",
    )
    args = ap.parse_args(argv)
    if not args.tf32:
        full_float32()

    started = time.perf_counter()
    cfg = PIPELINES[args.pipeline]
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("this PyTorch sees no CUDA GPU")
    except RuntimeError as e:
        print(f"--device {args.device}: {e}", file=sys.stderr)
        return 2
    on_gpu = device.type == "cuda"

    def sync():
        if on_gpu:
            torch.cuda.synchronize(device)

    batch = args.batch or (FRAMES if on_gpu else cfg["batch"])
    root = args.images or cfg["images"]
    weights = args.weights or default_weights(args.pipeline)
    if not weights.is_file():
        print(f"weights not found: {weights} (give --weights)", file=sys.stderr)
        return 2
    images = list_images(root, args.limit)
    if not images:
        print(f"no images in {root}", file=sys.stderr)
        return 2
    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)

    model = build_model(args.pipeline, weights)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=fmt)
    recorder = ConvRecorder(model)
    mean = torch.tensor(MEAN, dtype=torch.float32, device=device).view(3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32, device=device).view(3, 1, 1)
    maps = scalar_maps(cfg["crop"]).to(device)
    stages = {"decode": 0.0, "stimulus": 0.0, "forward": 0.0, "spectrum": 0.0, "write": 0.0}
    snr_sum, snr_count = 0.0, 0

    with torch.no_grad():
        for image_id, path in images:
            t0 = time.perf_counter()
            rgb = prepare(path, cfg["resize"], cfg["crop"]).to(device)
            norm = (rgb - mean) / std
            sync()
            t1 = time.perf_counter()
            stages["decode"] += t1 - t0
            for start in range(0, FRAMES, batch):
                t1 = time.perf_counter()
                frames = (norm.unsqueeze(0) * maps[start : start + batch]).contiguous(memory_format=fmt)
                sync()
                t2 = time.perf_counter()
                model(frames)
                sync()
                t3 = time.perf_counter()
                stages["stimulus"] += t2 - t1
                stages["forward"] += t3 - t2
            t3 = time.perf_counter()
            series = recorder.take()
            amps = {name: amplitude_spectra(x) for name, x in series.items()}
            snrs = {name: authors_mean_snr_db(a) for name, a in amps.items()}
            t4 = time.perf_counter()
            stages["spectrum"] += t4 - t3
            for v in snrs.values():
                snr_sum += float(v.sum())
                snr_count += v.size
            if args.dump:
                payload = {"image_id": np.array(image_id), "layers": np.array(recorder.names)}
                for name in recorder.names:
                    payload[f"amplitude:{name}"] = amps[name].astype(np.float32)
                    payload[f"mean_snr_db:{name}"] = snrs[name]
                np.savez(args.dump / (image_id.replace("/", "__") + ".npz"), **payload)
                stages["write"] += time.perf_counter() - t4

    wall = time.perf_counter() - started
    result = {
        "name": args.pipeline,
        "images": len(images),
        "seconds": wall,
        "images_per_s": len(images) / wall,
        "peak_rss_mb": peak_rss_mb(),
        "stage_seconds": stages,
        "threads": torch.get_num_threads(),
        "batch": batch,
        "channels_last": args.channels_last,
        "tf32": args.tf32,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if on_gpu else ""),
        "frames_per_image": FRAMES,
        "neurons_per_image": sum(a.shape[0] for a in amps.values()),
        "mean_snr_db_overall": snr_sum / max(snr_count, 1),
        "torch": torch.__version__,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
