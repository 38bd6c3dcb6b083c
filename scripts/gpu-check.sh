#!/usr/bin/env bash
# The GPU check, prepared so that a GPU machine's few minutes go to measuring, not building.
#
#   scripts/gpu-check.sh prepare   here, no GPU needed: builds the CUDA binary
#                                  (scripts/build-cuda.sh) and packs it with the weights and
#                                  images the check needs into gpu/ (about 40 MB, git-ignored)
#   scripts/gpu-check.sh check     on the GPU machine, from the project root with gpu/ beside:
#                                  GPU against CPU outputs, the benchmark, a one-worker
#                                  profile, f16/bf16 against f32, cuDNN alone through PyTorch;
#                                  everything goes to $OUT (or gpu-out/). About 2 minutes on an
#                                  H100. PAPER_WORKERS, QUICK_WORKERS, SWEEP_WORKERS (more worker
#                                  counts), BENCH_HALF (half dtypes benchmarked), SKIP_CANDLE
#                                  (the A/B against candle's own ops), SKIP_SPIN (the A/B against
#                                  spinning while waiting for the GPU) and SKIP_PROBE choose;
#                                  SWITCHES (default: FREQTAG_GPU_OWN_CONV=0,
#                                  FREQTAG_GPU_FUSED_MEAN=0 and FREQTAG_GPU_PAGEABLE=1, the
#                                  defaults' alternatives; several
#                                  in one entry are written "A=1,B=1"; "" for none) are
#                                  environment settings under test, each checked against the
#                                  CPU's outputs and benchmarked beside the defaults;
#                                  TRIES adds benchmark runs with other settings and
#                                  environment variables (ONLY_TRIES=1: those alone);
#                                  COMPARE=1 adds benches/compare.sh on the GPU: freqtag
#                                  and the PyTorch baseline side by side on the packed
#                                  images (COMPARE_IMAGES=N: the first N of each).
#                                  gpu/libmimalloc.so (prepare builds it) puts mimalloc in
#                                  front of glibc's malloc in a try (LD_PRELOAD, above).
#                                  AGREE_ONLY=1: section 1 (GPU against CPU) and each of
#                                  SWITCHES (none unless given) against the CPU, then the
#                                  tries and the side by side only.
#
# The GPU machine needs the NVIDIA driver (580 or newer, for CUDA 13) and the CUDA 13
# libraries cuBLAS, cuRAND, NVRTC, the runtime and cuDNN 9, for example from PyTorch's cu13 wheels:
# the check looks for them under /opt, /usr and /usr/local, or takes CUDA_LIBS=DIR:DIR.
# Data: ../shared/data when preparing (see its README); the paper images and photos ship in data/.
set -uo pipefail
cd "$(dirname "$0")/.."
G=gpu

prepare() {
    set -e
    local shared=${SHARED_DATA:-../shared/data}
    [ -d "$shared" ] || { echo "gpu-check: $shared not found (set SHARED_DATA)" >&2; exit 2; }
    bash scripts/build-cuda.sh
    rm -rf "$G" && mkdir -p "$G/cifar" "$G/inet"
    strip -o "$G/freqtag" target/cuda/release/freqtag
    xz -T2 -6 "$G/freqtag"
    cp "$shared/weights/cifar10-resnet/resnet32-d509ac18.th" "$G/resnet32.th"
    # mimalloc as a shared library, from the source the `mimalloc` feature builds, for runs that
    # set it against glibc's malloc without a second CUDA build (session 20), e.g.
    # TRIES="pm LD_PRELOAD=$PWD/gpu/libmimalloc.so MIMALLOC_PURGE_DELAY=-1 paper --workers 16"
    local mi
    mi=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/libmimalloc-sys-*/c_src/mimalloc/v2 | tail -1)
    cc -O3 -DNDEBUG -DMI_BUILD_RELEASE -DMI_DEBUG=0 -DMI_MALLOC_OVERRIDE -fPIC -shared \
        -ftls-model=initial-exec -fno-builtin-malloc -I "$mi/include" "$mi/src/static.c" \
        -o "$G/libmimalloc.so" -lpthread
    local mb
    [ -x target/release/freqtag ] || cargo build --release
    mb=$(target/release/freqtag weights fetch mobilenet_v2 | sed 's/^mobilenet_v2: //')
    cp "$mb" "$G/mobilenet_v2.pth"
    # CIFAR-10 test images: the first 100 of each class, class folders
    local files
    for d in "$shared"/cifar10-test-jpeg/*/; do
        c=$(basename "$d"); mkdir -p "$G/cifar/$c"
        files=("$d"*.jpg)
        cp "${files[@]:0:100}" "$G/cifar/$c/"
    done
    # ImageNet samples: the first 120 photographs as they are (decoding them is part of the cost)
    files=("$shared"/imagenet-samples/*.JPEG)
    cp "${files[@]:0:120}" "$G/inet/"
    du -sh "$G"
}

check() {
    local out=${OUT:-$PWD/gpu-out}
    mkdir -p "$out"
    exec > >(tee -a "$out/gpu-check.log") 2>&1
    local bin=${FREQTAG_BIN:-/tmp/freqtag} dev=${GPU_DEVICE:-cuda}
    [ -n "${FREQTAG_BIN:-}" ] || { xz -dc "$G/freqtag.xz" >"$bin" && chmod +x "$bin"; }
    if [ -z "${CUDA_LIBS:-}" ]; then
        CUDA_LIBS=$(find /opt /usr/local /usr/lib -name 'libcublas.so.13' -o -name 'libcurand.so.10' \
            -o -name 'libnvrtc.so.13' -o -name 'libcudart.so.13' -o -name 'libcublasLt.so.13' -o -name 'libcudnn.so.9' 2>/dev/null |
            xargs -r -n1 dirname | sort -u | paste -sd:)
    fi
    export LD_LIBRARY_PATH=$CUDA_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    echo "== machine"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc
    lscpu 2>/dev/null | grep -E '^(Model name|Thread\(s\) per core|Core\(s\) per socket|Socket\(s\)|CPU max MHz)' || true
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    ldd "$bin" | grep -E 'cu|nvrtc' || true
    local py=${PYTHON:-python3} cores; cores=$(nproc)
    local paper=pipelines/paper-resnet32-cifar10.toml quick=pipelines/quickstart.toml
    local wp="--set model.weights=$PWD/$G/resnet32.th" wq="--set model.weights=$PWD/$G/mobilenet_v2.pth"
    run() { # name, then freqtag run arguments
        local name=$1; shift
        echo "== $name"
        local t0=$SECONDS
        rm -rf "/tmp/runs/$name"
        env ${RUN_ENV[@]+"${RUN_ENV[@]}"} timeout "${STEP_TIMEOUT:-75}" "$bin" run "$@" --out "/tmp/runs/$name" --log-level "${LOG_LEVEL:-warn}"; local rc=$?
        echo "$name: exit $rc in $((SECONDS - t0)) s"
        [ -f "/tmp/runs/$name/run.json" ] && $py -c "import json,sys; r=json.load(open('/tmp/runs/$name/run.json')); print(json.dumps({'run': '$name', 'images_per_s': r['images_per_s'], 'images': r['counts']['images_processed'], 'wall_s': r['wall_s'], 'peak_rss_mb': r['peak_rss_mb'], 'stage_seconds': r['stage_seconds']}))" | tee -a "$out/runs.jsonl"
        return $rc
    }
    # a SWITCHES entry's name for its runs, e.g.
    # FREQTAG_GPU_PAGEABLE=1,FREQTAG_CUDNN_ALGO=winograd -> pageable+cudnn-algo-winograd
    switch_tag() { echo "$1" | sed -E 's/=1(,|$)/\1/g; s/=/_/g; s/FREQTAG_(GPU_)?//g; s/,/+/g' | tr 'A-Z_' 'a-z-'; }
    err() { $py tests/python/spectra_error.py "/tmp/runs/$1" "/tmp/runs/$2" --json "$out/errors.jsonl" ${3:+--tol $3}; }

    local off="--set output.spectra=none --set output.neurons=false"
    mkdir -p /tmp/bench/cifar /tmp/bench/inet
    for i in $(seq "${BENCH_COPIES:-5}"); do ln -sfn "$PWD/$G/cifar" "/tmp/bench/cifar/copy$i"; done
    for i in $(seq "${BENCH_COPIES:-4}"); do ln -sfn "$PWD/$G/inet" "/tmp/bench/inet/copy$i"; done
    local cifar="--set source.path=/tmp/bench/cifar --set source.labels=none" inet="--set source.path=/tmp/bench/inet"
    local np="--set source.limit=${PAPER_IMAGES:-3000}" nq="--set source.limit=${QUICK_IMAGES:-240}"

    # TRIES="name [VAR=VALUE ...] paper|quick ARGS...; ...": benchmark runs with other settings
    # (full spectra off, the benchmark's images) and environment, e.g.
    # TRIES="q256 quick --workers 16 --set model.device_batch=256; ev FREQTAG_GPU_EVENTS=1 quick"
    RUN_ENV=()
    tries() {
        [ -n "${TRIES:-}" ] || return 0
        echo "== 7. tries"
        nvidia-smi dmon -s um -d 1 >"$out/dmon-tries.txt" 2>&1 &
        local dm=$! t
        local -a list
        IFS=';' read -ra list <<<"$TRIES"
        for t in "${list[@]}"; do
            # shellcheck disable=SC2086
            set -- $t
            local name=$1; shift
            RUN_ENV=()
            while [[ "${1:-}" =~ ^[A-Z_][A-Z0-9_]*= ]]; do RUN_ENV+=("$1"); shift; done
            local which=$1; shift
            if [ "$which" = paper ]; then
                run "try-$name" $paper $wp $off $cifar $np "$@" --device $dev
            else
                run "try-$name" $quick $wq $off $inet $nq "$@" --device $dev
            fi
        done
        RUN_ENV=()
        kill "$dm" 2>/dev/null
    }
    # freqtag and the PyTorch baseline (the machine's python3 with torch) side by side
    compare() {
        [ -n "${COMPARE:-}" ] || return 0
        echo "== 8. side by side with the PyTorch baseline on the GPU (benches/compare.sh)"
        FREQTAG=$bin PYTHON=$py DEVICE=$dev WORKERS=${QUICK_WORKERS:-16} \
            PAPER_IMAGES=$G/cifar QUICK_IMAGES=$G/inet PAPER_WEIGHTS=$G/resnet32.th \
            QUICK_WEIGHTS=$G/mobilenet_v2.pth timeout "${COMPARE_TIMEOUT:-300}" \
            bash benches/compare.sh ${COMPARE_IMAGES:-}
        echo "compare: exit $?"
    }
    if [ -n "${ONLY_TRIES:-}" ]; then
        # a fresh machine's first run takes 20-30 s longer (the driver compiling the kernels'
        # PTX, kept in its cache for later runs): a short run first, so the tries compare
        run warm-up $paper $wp $off $cifar --set source.limit=200 --workers 2 --device $dev
        tries
        compare
        echo "== done"
        return
    fi

    echo "== 1. GPU against CPU, f32 (tolerance 1e-4 of each neuron's peak)"
    if ! run paper-gpu $paper $wp --workers 2 --device $dev; then
        echo "gpu-check: the first GPU run failed; libraries seen:"
        ldd "$bin"; echo "$CUDA_LIBS" | tr : '\n' | xargs -r ls 2>&1 | head -40
        exit 1
    fi
    run paper-cpu $paper $wp --workers "$cores" && err paper-cpu paper-gpu 1e-4
    run quick-cpu $quick $wq --workers "$cores"
    run quick-gpu $quick $wq --workers 2 --device $dev && err quick-cpu quick-gpu 1e-4

    if [ -n "${AGREE_ONLY:-}" ]; then
        # the agreement above, each of SWITCHES (none unless given) against the CPU too, then the
        # tries and the side by side only
        local sw
        for sw in ${SWITCHES:-}; do
            local tag; tag=$(switch_tag "$sw")
            IFS=',' read -ra RUN_ENV <<<"$sw"
            run "paper-gpu-$tag" $paper $wp --workers 2 --device $dev && err paper-cpu "paper-gpu-$tag" 1e-4
            run "quick-gpu-$tag" $quick $wq --workers 2 --device $dev && err quick-cpu "quick-gpu-$tag" 1e-4
            RUN_ENV=()
        done
        tries
        compare
        echo "== done"
        return
    fi

    echo "== 2. benchmark, f32, full spectra off (output.spectra = none, neurons off)"
    # GPU utilisation once a second while the benchmark runs
    nvidia-smi dmon -s um -d 1 >"$out/dmon.txt" 2>&1 &
    local dmon=$!
    run bench-paper-gpu $paper $wp $off $cifar $np --workers "${PAPER_WORKERS:-12}" --device $dev
    run bench-quick-gpu $quick $wq $off $inet $nq --workers "${QUICK_WORKERS:-8}" --device $dev
    # candle's own convolution, batch norm and activation instead of cuDNN and the fused kernels
    [ -n "${SKIP_CANDLE:-}" ] || FREQTAG_NO_FUSED_GPU=1 run bench-paper-gpu-candle $paper $wp $off $cifar $np --workers "${PAPER_WORKERS:-12}" --device $dev
    # workers waiting for the GPU spin instead of sleeping (the driver's default), for comparison
    [ -n "${SKIP_SPIN:-}" ] || FREQTAG_GPU_SPIN=1 run bench-paper-gpu-spin $paper $wp $off $cifar $np --workers "${PAPER_WORKERS:-12}" --device $dev
    # the CPU side (spectra, scores, Parquet) runs one worker per core: more workers, more of it
    for w in ${SWEEP_WORKERS:-16}; do
        run "bench-paper-gpu-w$w" $paper $wp $off $cifar $np --workers "$w" --device $dev
        run "bench-quick-gpu-w$w" $quick $wq $off $inet $nq --workers "$w" --device $dev
    done
    kill "$dmon" 2>/dev/null

    echo "== 2b. switches under test (SWITCHES), each against the defaults above"
    # an entry is VAR=VALUE or several joined by commas; its runs are named by the variables
    local DEFAULT_SWITCHES="FREQTAG_GPU_OWN_CONV=0 FREQTAG_GPU_FUSED_MEAN=0 FREQTAG_GPU_PAGEABLE=1"
    # each: its outputs against the CPU's (tolerance 1e-4), then the benchmark in f32 and f16
    local sw
    for sw in ${SWITCHES-$DEFAULT_SWITCHES}; do
        local tag; tag=$(switch_tag "$sw")
        IFS=',' read -ra RUN_ENV <<<"$sw"
        run "paper-gpu-$tag" $paper $wp --workers 2 --device $dev && err paper-cpu "paper-gpu-$tag" 1e-4
        run "quick-gpu-$tag" $quick $wq --workers 2 --device $dev && err quick-cpu "quick-gpu-$tag" 1e-4
        run "bench-paper-gpu-$tag" $paper $wp $off $cifar $np --workers "${PAPER_WORKERS:-12}" --device $dev
        run "bench-quick-gpu-$tag" $quick $wq $off $inet $nq --workers "${QUICK_WORKERS:-8}" --device $dev
        run "bench-paper-gpu-f16-$tag" $paper $wp $off $cifar $np --workers "${PAPER_WORKERS:-12}" --device $dev --set model.dtype=f16
        RUN_ENV=()
    done

    echo "== 3. where the GPU time goes (FREQTAG_GPU_PROFILE, one worker)"
    export FREQTAG_GPU_PROFILE=1 LOG_LEVEL=warn,freqtag::model::cuda_ops=debug
    run profile-paper $paper $wp $off $cifar --set source.limit=500 --workers 1 --device $dev
    run profile-quick $quick $wq $off $inet --set source.limit=40 --workers 1 --device $dev
    for sw in ${SWITCHES-$DEFAULT_SWITCHES}; do
        local tag; tag=$(switch_tag "$sw")
        IFS=',' read -ra RUN_ENV <<<"$sw"
        run "profile-paper-$tag" $paper $wp $off $cifar --set source.limit=500 --workers 1 --device $dev
        RUN_ENV=()
    done
    unset FREQTAG_GPU_PROFILE LOG_LEVEL

    echo "== 4. half precision against f32 on the GPU"
    for dt in bf16 f16; do
        run "paper-$dt" $paper $wp --workers 2 --device $dev --set model.dtype=$dt && err paper-gpu "paper-$dt"
        run "quick-$dt" $quick $wq --workers 2 --device $dev --set model.dtype=$dt && err quick-gpu "quick-$dt"
    done
    for dt in ${BENCH_HALF:-bf16 f16}; do
        run "bench-paper-gpu-$dt" $paper $wp $off $cifar $np --workers "${PAPER_WORKERS:-12}" --device $dev --set model.dtype=$dt
        run "bench-quick-gpu-$dt" $quick $wq $off $inet $nq --workers "${QUICK_WORKERS:-8}" --device $dev --set model.dtype=$dt
    done

    echo "== 5. this machine's CPU, for the ratio"
    run bench-paper-cpu $paper $wp $off $cifar --set source.limit=500 --workers "$cores"
    if [ -z "${SKIP_PROBE:-}" ]; then
        echo "== 6. cuDNN by itself on ResNet-32's convolutions (PyTorch; benches/cudnn_probe.py)"
        timeout 90 $py benches/cudnn_probe.py 4096
    fi
    tries
    compare
    echo "== done"
}

case "${1:-}" in
prepare) prepare ;;
check) check ;;
*) echo "usage: scripts/gpu-check.sh prepare | check" >&2; exit 2 ;;
esac
