#!/usr/bin/env bash
# Memory and throughput benchmark (issue: "at scale"): the quickstart's MobileNetV2 pipeline over
# the first N images of ../shared/data/imagenet-samples, full spectra off, release build.
# Prints images per second and peak resident memory for each N given (default: 100 1000), so
# the peak can be compared across dataset sizes side by side.
#   scripts/bench-memory.sh [N ...]
set -euo pipefail
cd "$(dirname "$0")/.."
data=../shared/data/imagenet-samples
[ -d "$data" ] || { echo "!!! $data is absent: nothing to benchmark" >&2; exit 1; }
cargo build --release --quiet
for n in "${@:-100 1000}"; do
  for m in $n; do
    out=out/bench-memory-$m
    ./target/release/freqtag run pipelines/quickstart.toml --out "$out" --log-level warn \
      --set source.path="$PWD/$data" --set source.limit="$m" --set output.spectra=none >/dev/null
    python3 - "$out/run.json" "$m" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"images {sys.argv[2]:>5}: {r['images_per_s']:.2f} images/s, peak RSS {r['peak_rss_mb']:.0f} MB, wall {r['wall_s']:.0f} s, {r['workers']} workers")
PY
  done
done
