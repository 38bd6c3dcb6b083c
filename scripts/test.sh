#!/usr/bin/env bash
# The test command (README.md): makes .venv with the Python the tests read outputs with
# (pandas, pyarrow, DuckDB, numpy, Pillow; tests/requirements.txt) when it is missing or holds
# other versions than those pinned there, then runs the whole test suite. Extra arguments go to
# `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
pinned() { # whether .venv holds every version tests/requirements.txt pins
  .venv/bin/python - <<'EOF' 2>/dev/null
import importlib.metadata as m, sys
for line in open("tests/requirements.txt"):
    line = line.split("#")[0].strip()
    if line:
        name, version = line.split("==")
        if m.version(name) != version:
            sys.exit(1)
EOF
}
if ! pinned; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r tests/requirements.txt
fi
export FREQTAG_TEST_PYTHON="$PWD/.venv/bin/python"
if [ ! -d ../shared/data/weights ]; then
  echo "!!! ../shared/data is absent: the tests that need the real CIFAR-10 checkpoints will be SKIPPED !!!" >&2
fi
cargo test "$@"
