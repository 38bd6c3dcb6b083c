#!/usr/bin/env python3
"""Checks that freqtag's amplitude spectra agree with the PyTorch baseline's.

    python benches/compare_spectra.py FREQTAG_OUT DUMP_DIR [--tol 1e-4]

FREQTAG_OUT is a `freqtag run --out` folder (its spectra/ Parquet parts: image_id, layer, channel,
bin_hz, bins (null = every bin), amplitude); DUMP_DIR holds the baseline's --dump .npz files.
FREQTAG_OUT may be another baseline dump instead: the baseline against itself (its NCHW run
against its channels-last one), which shows how far float32 rounding alone moves the spectra.
Every neuron freqtag wrote must agree with the baseline within `tol` of that neuron's largest
baseline amplitude. Prints the largest error; exit 0 when all agree, 1 otherwise.
The authors' mean dB-SNR (freqtag's neurons/ table) is compared too, for information only: it is
rounding-sensitive without stimulus noise (METHOD.md section 3).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def read_table(folder: Path, columns: list[str]):
    parts = sorted(folder.glob("*.parquet"))
    if not parts:
        return None
    import pyarrow as pa

    return pa.concat_tables(pq.read_table(p, columns=columns) for p in parts)


def load_dumps(dump: Path) -> dict[str, dict]:
    out = {}
    for f in sorted(dump.glob("*.npz")):
        with np.load(f) as z:
            image_id = str(z["image_id"])
            layers = [str(x) for x in z["layers"]]
            out[image_id] = {
                "amplitude": {l: z[f"amplitude:{l}"] for l in layers},
                "mean_snr_db": {l: z[f"mean_snr_db:{l}"] for l in layers},
            }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("freqtag_out", type=Path)
    ap.add_argument("dump_dir", type=Path)
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args(argv)

    base = load_dumps(args.dump_dir)
    if not base:
        print(f"no .npz files in {args.dump_dir}", file=sys.stderr)
        return 1
    other = None
    if not (args.freqtag_out / "spectra").is_dir() and any(args.freqtag_out.glob("*.npz")):
        other = load_dumps(args.freqtag_out)
        ids, layers, channels, rows = [], [], [], []
        for img, d in other.items():
            for layer, a in d["amplitude"].items():
                for ch in range(a.shape[0]):
                    ids.append(img)
                    layers.append(layer)
                    channels.append(ch)
                    rows.append(a[ch].astype(np.float64))
        bins = [None] * len(ids)
        offsets = np.cumsum([0] + [r.size for r in rows])
        values = np.concatenate(rows) if rows else np.zeros(0)
    else:
        spectra = read_table(
            args.freqtag_out / "spectra", ["image_id", "layer", "channel", "bins", "amplitude"]
        )
        if spectra is None:
            print(f"no spectra/*.parquet under {args.freqtag_out}", file=sys.stderr)
            return 1
        ids = spectra.column("image_id").to_pylist()
        layers = spectra.column("layer").to_pylist()
        channels = spectra.column("channel").to_pylist()
        bins = spectra.column("bins").to_pylist()
        amp_col = spectra.column("amplitude").combine_chunks()
        offsets = amp_col.offsets.to_numpy()
        values = amp_col.values.to_numpy(zero_copy_only=False).astype(np.float64)

    missing: set[tuple[str, str]] = set()
    compared = 0
    worst = (0.0, None)  # (error relative to the neuron's peak, where)
    worst_abs = 0.0
    failures = 0
    errors = []
    failing = []  # (error, peak, image, layer)
    seen_images = set()
    for r in range(len(ids)):
        img, layer, ch = ids[r], layers[r], channels[r]
        b = base.get(img, {}).get("amplitude", {}).get(layer)
        if b is None:
            missing.add((img, layer))
            continue
        seen_images.add(img)
        ref = b[ch].astype(np.float64)
        got = values[offsets[r] : offsets[r + 1]]
        want = ref if bins[r] is None else ref[np.asarray(bins[r], dtype=np.int64)]
        if got.shape != want.shape:
            print(f"{img} {layer}[{ch}]: {got.size} bins in freqtag, {want.size} in the baseline")
            failures += 1
            continue
        peak = max(float(np.abs(ref).max()), 1e-30)
        err_abs = float(np.abs(got - want).max())
        err = err_abs / peak
        compared += 1
        worst_abs = max(worst_abs, err_abs)
        if err > worst[0]:
            worst = (err, f"{img} {layer}[{ch}]")
        errors.append(err)
        if err > args.tol:
            failures += 1
            failing.append((err, peak, img, layer))

    only_baseline = sorted(set(base) - seen_images)
    print(
        f"spectra: {compared} neurons of {len(seen_images)} images compared; "
        f"max error {worst[0]:.3e} of the neuron's peak (at {worst[1]}), max absolute {worst_abs:.3e}; "
        f"tolerance {args.tol:g}"
    )
    if failing:
        # how loud the failing neurons are: their peak against the median peak of their layer
        # in that image (near-silent channels hold little but rounding)
        ratios = []
        for err, peak, img, layer in failing:
            peaks = np.abs(base[img]["amplitude"][layer]).max(axis=1)
            ratios.append(peak / max(float(np.median(peaks)), 1e-30))
        print(
            f"99th percentile of the error {np.percentile(errors, 99):.3e}; the {len(failing)} neurons "
            f"above the tolerance peak at {min(ratios):.1e} to {max(ratios):.1e} of their layer's median peak"
        )
    if only_baseline:
        print(f"note: {len(only_baseline)} baseline images not in freqtag's output (e.g. {only_baseline[0]})")

    neurons = None if other is not None else read_table(
        args.freqtag_out / "neurons", ["image_id", "layer", "channel", "mean_snr_db"]
    )
    if neurons is not None:
        seen = {}
        for img, layer, ch, v in zip(*(neurons.column(c).to_pylist() for c in neurons.column_names)):
            seen[(img, layer, ch)] = v  # one value per neuron, repeated per term
        diffs = [
            abs(v - float(base[img]["mean_snr_db"][layer][ch]))
            for (img, layer, ch), v in seen.items()
            if v is not None and img in base and layer in base[img]["mean_snr_db"]
        ]
        if diffs:
            print(
                f"mean_snr_db (information only, rounding-sensitive): {len(diffs)} neurons, "
                f"max |difference| {max(diffs):.4f} dB, mean {np.mean(diffs):.5f} dB"
            )

    if missing:
        eg = sorted(missing)[0]
        print(f"FAIL: {len(missing)} (image, layer) pairs of {args.freqtag_out} are not in the dumps, e.g. {eg}")
        return 1
    if compared == 0:
        print("FAIL: nothing compared")
        return 1
    if failures:
        print(f"FAIL: {failures} neurons differ by more than {args.tol:g} of their peak")
        return 1
    print("OK: every neuron agrees")
    return 0


if __name__ == "__main__":
    sys.exit(main())
