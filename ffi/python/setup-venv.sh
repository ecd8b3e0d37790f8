#!/usr/bin/env bash
# Create (or reuse) the virtual environment at $MESHMEM_VENV (default
# ~/.cache/meshmem/venv, shared by every clone) with what the
# Python tests of the C ABI need: numpy, pytest, torch and setuptools (for
# building the example PyTorch extension).
#
# torch comes from PyPI, whose default Linux wheel is a CUDA build that also
# runs on machines without a GPU; the first run downloads about 3 GB. Later
# runs find everything installed and return in a second or two.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${MESHMEM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/meshmem/venv}"
mkdir -p "$(dirname "$venv")"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "setup-venv: creating $venv"
    "$python" -m venv "$venv"
fi

if "$venv/bin/python" -c 'import numpy, pytest, torch, setuptools, ninja' 2>/dev/null; then
    echo "setup-venv: $venv already has numpy, pytest, torch, setuptools and ninja"
    exit 0
fi

"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet numpy pytest setuptools wheel ninja torch
echo "setup-venv: installed into $venv"
