#!/usr/bin/env bash
# Creates benches/.venv with the PyTorch baseline's packages (PyPI only). The default Linux torch
# wheel pulls the CUDA runtime packages (~3 GB); the baseline itself runs on the CPU.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
if [ ! -x "$here/.venv/bin/python" ]; then
    "$python" -m venv "$here/.venv"
fi
"$here/.venv/bin/python" -m pip install -q --upgrade pip
"$here/.venv/bin/python" -m pip install -q -r "$here/requirements.txt"
"$here/.venv/bin/python" -c 'import torch, torchvision, numpy, PIL, pyarrow; print("benches/.venv: torch", torch.__version__, "torchvision", torchvision.__version__, "numpy", numpy.__version__, "pyarrow", pyarrow.__version__)'
