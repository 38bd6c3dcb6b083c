#!/usr/bin/env bash
# The test command (README.md): makes .venv with the Python the tests read outputs with
# (pandas, pyarrow, DuckDB, numpy, Pillow; tests/requirements.txt) when it is missing, then runs
# the whole test suite. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/python -c "import pandas, pyarrow, duckdb, numpy, PIL" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r tests/requirements.txt
fi
export FREQTAG_TEST_PYTHON="$PWD/.venv/bin/python"
if [ ! -d ../shared/data/weights ]; then
  echo "!!! ../shared/data is absent: the tests that need the real CIFAR-10 checkpoints will be SKIPPED !!!" >&2
fi
cargo test "$@"
