#!/usr/bin/env bash
# Side-by-side speed of freqtag and the PyTorch baseline (benches/pytorch_baseline.py) on the same
# images, for the paper pipeline (ResNet-32, data/cifar10-foolbox-20) and the quickstart
# (MobileNetV2, data/photos), and a check that the paper pipeline's spectra agree (the
# quickstart's agreement is printed too). The baseline
# runs twice: as the authors' code does (contiguous NCHW), and tuned (channels-last memory, about
# twice as fast on this kind of CPU); the ratio is taken against the faster.
#
#   benches/compare.sh [N_IMAGES]      # default: every image of each folder
#
# Needs target/release/freqtag (or FREQTAG=path) and benches/.venv (benches/setup.sh), or
# PYTHON=path to a Python that has torch, torchvision, numpy, pandas, pyarrow and Pillow.
# Optional: WORKERS (freqtag --workers; default its own), THREADS (torch threads; default torch's),
# KEEP=1 to keep the temporary outputs, PAPER_IMAGES=DIR and QUICK_IMAGES=DIR for the two
# pipelines' images (folders searched recursively), PAPER_WEIGHTS=FILE and QUICK_WEIGHTS=FILE, DEVICE=cuda (or cuda:N) to run both on a GPU
# (freqtag built with scripts/build-cuda.sh; the baseline then takes an image's 240 frames in
# one batch, in float32 unless TF32=1).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
n="${1:-}"
freqtag="${FREQTAG:-$repo/target/release/freqtag}"
py="${PYTHON:-$repo/benches/.venv/bin/python}"
[ -x "$freqtag" ] || { echo "no freqtag binary at $freqtag (cargo build --release, or set FREQTAG)" >&2; exit 2; }
[ -x "$py" ] || command -v "$py" >/dev/null || { echo "no Python at $py: run benches/setup.sh first, or set PYTHON" >&2; exit 2; }

tmp="$(mktemp -d "${TMPDIR:-/tmp}/freqtag-compare.XXXXXX")"
if [ "${KEEP:-0}" = 1 ]; then echo "outputs kept in $tmp"; else trap 'rm -rf "$tmp"' EXIT; fi

ft_args=()
pt_args=()
if [ -n "$n" ]; then ft_args+=(--set "source.limit=$n"); pt_args+=(--limit "$n"); fi
[ -n "${WORKERS:-}" ] && ft_args+=(--workers "$WORKERS")
[ -n "${THREADS:-}" ] && pt_args+=(--threads "$THREADS")
if [ -n "${DEVICE:-}" ]; then ft_args+=(--device "$DEVICE"); pt_args+=(--device "$DEVICE"); fi
# TF32=1: the baseline keeps PyTorch's default TF32 convolutions on a GPU (faster; its spectra
# then miss the 1e-4 agreement); by default it computes in float32 as freqtag does
[ "${TF32:-0}" = 1 ] && pt_args+=(--tf32)

run_pair() { # name pipeline-file image-folder [args of the baseline's first run...]
    # cl_more: arguments of the channels-last run only
    # pt_more: arguments of both baseline runs (the weights)
    local name="$1" toml="$2" images="$3"; shift 3
    echo "== $name: freqtag" >&2
    "$freqtag" run "$toml" --out "$tmp/ft-$name" "${ft_args[@]}" >"$tmp/ft-$name.log" 2>&1 \
        || { echo "freqtag failed on $name:" >&2; tail -20 "$tmp/ft-$name.log" >&2; exit 1; }
    echo "== $name: PyTorch baseline" >&2
    "$py" benches/pytorch_baseline.py --pipeline "$name" --images "$images" --json \
        "${pt_args[@]}" ${pt_more[@]+"${pt_more[@]}"} "$@" >"$tmp/pt-$name.json"
    echo "== $name: PyTorch baseline, channels-last" >&2
    "$py" benches/pytorch_baseline.py --pipeline "$name" --images "$images" --json \
        --channels-last "${pt_args[@]}" ${pt_more[@]+"${pt_more[@]}"} ${cl_more[@]+"${cl_more[@]}"} \
        >"$tmp/pt-$name-cl.json"
}

# PAPER_IMAGES=DIR: another folder of 32x32 images for the paper pipeline (e.g. a class folder of
# ../shared/data/cifar10-test-jpeg), so start-up costs weigh less than on the 20 shipped images
paper_images="${PAPER_IMAGES:-data/cifar10-foolbox-20}"
if [ -n "${PAPER_IMAGES:-}" ]; then
    ft_paper=(--set "source.path=$(cd "$paper_images" && pwd)" --set source.labels=none)
else
    ft_paper=()
fi
# PAPER_WEIGHTS / QUICK_WEIGHTS=FILE: the checkpoints, for both sides (default: ResNet-32 from
# ../shared/data, MobileNetV2 from freqtag's download cache)
pt_more=()
if [ -n "${PAPER_WEIGHTS:-}" ]; then
    w="$(cd "$(dirname "$PAPER_WEIGHTS")" && pwd)/$(basename "$PAPER_WEIGHTS")"
    ft_paper+=(--set "model.weights=$w"); pt_more=(--weights "$w")
fi
ft_args_base=("${ft_args[@]}")
ft_args=("${ft_args_base[@]}" "${ft_paper[@]}")
cl_more=()
run_pair paper pipelines/paper-resnet32-cifar10.toml "$paper_images" --dump "$tmp/dump-paper"
quick_images="${QUICK_IMAGES:-data/photos}"
ft_args=("${ft_args_base[@]}")
[ -n "${QUICK_IMAGES:-}" ] && ft_args+=(--set "source.path=$(cd "$quick_images" && pwd)")
pt_more=()
if [ -n "${QUICK_WEIGHTS:-}" ]; then
    w="$(cd "$(dirname "$QUICK_WEIGHTS")" && pwd)/$(basename "$QUICK_WEIGHTS")"
    ft_args+=(--set "model.weights=$w"); pt_more=(--weights "$w")
fi
# the channels-last run writes its spectra too (about 10 ms an image of its 3 or more seconds), to
# set the baseline against itself below
cl_more=(--dump "$tmp/dump-quickstart-cl")
run_pair quickstart pipelines/quickstart.toml "$quick_images" --dump "$tmp/dump-quickstart"

# the speed table first: the agreement below reads every neuron's spectra (MobileNetV2's 1.7
# million for 100 images) and is what a time limit cuts short
"$py" - "$tmp" <<'EOF'
import json, sys
from pathlib import Path
tmp = Path(sys.argv[1])
rows = []
for name in ["paper", "quickstart"]:
    ft = json.loads((tmp / f"ft-{name}" / "run.json").read_text())
    plain = json.loads((tmp / f"pt-{name}.json").read_text())
    cl = json.loads((tmp / f"pt-{name}-cl.json").read_text())
    pt = max(plain, cl, key=lambda r: r["images_per_s"])
    rows.append((name, ft, pt, plain, cl))
print()
hdr = (f"{'pipeline':<11} {'images':>6} {'freqtag img/s':>14} {'PyTorch img/s':>14} {'(NCHW':>7} "
       f"{'ch-last)':>9} {'ratio':>7} {'freqtag RSS MB':>15} {'PyTorch RSS MB':>15}")
print(hdr)
print("-" * len(hdr))
for name, ft, pt, plain, cl in rows:
    ratio = ft["images_per_s"] / pt["images_per_s"] if pt["images_per_s"] else float("nan")
    print(f"{name:<11} {ft['counts']['images_processed']:>6} {ft['images_per_s']:>14.3f} {pt['images_per_s']:>14.3f} "
          f"{plain['images_per_s']:>7.3f} {cl['images_per_s']:>9.3f} "
          f"{ratio:>6.2f}x {ft.get('peak_rss_mb', 0.0):>15.0f} {pt['peak_rss_mb']:>15.0f}")
print()
print("ratio = freqtag images/s over the faster PyTorch run's images/s. freqtag runs each distinct "
      "frame once (49 of 240) and writes Parquet; the baseline runs all 240 frames, as the authors' code does.")
for name, ft, pt, _, _ in rows:
    fs = ", ".join(f"{k} {v:.2f}" for k, v in ft["stage_seconds"].items())
    ps = ", ".join(f"{k} {v:.2f}" for k, v in pt["stage_seconds"].items())
    print(f"{name} stage seconds: freqtag ({ft['workers']} workers, summed) {fs}; "
          f"PyTorch ({pt['threads']} threads, {pt.get('device', 'cpu')}) {ps}")
EOF
echo "== paper: spectra agreement" >&2
set +e
"$py" benches/compare_spectra.py "$tmp/ft-paper" "$tmp/dump-paper" | tee "$tmp/agreement.txt"
agree=${PIPESTATUS[0]}
# MobileNetV2's too, for information: its inputs are the baseline's to the bit, but through 52
# layers a few near-silent channels differ by more than 1e-4 of their peak from the order of
# float sums alone (README, "Inputs")
echo "== quickstart: spectra agreement (information; the exit status is the paper's)" >&2
"$py" benches/compare_spectra.py "$tmp/ft-quickstart" "$tmp/dump-quickstart" | tee -a "$tmp/agreement.txt"
# for scale: the baseline's two runs (NCHW and channels-last: the same model, weights and frames,
# other float32 summation orders) against each other, by the same measure
echo "== quickstart: the PyTorch baseline against itself, NCHW against channels-last (for scale)" >&2
"$py" benches/compare_spectra.py "$tmp/dump-quickstart-cl" "$tmp/dump-quickstart" | tee -a "$tmp/agreement.txt"
set -e

exit "$agree"
