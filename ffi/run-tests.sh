#!/usr/bin/env bash
# Runs every test of the C ABI and the Python package, in order:
#   1. the header check (meshmem.h equals a fresh cbindgen run);
#   2. the C program, on four node processes under the launcher;
#   3. the pytest suite, which builds and uses the example C++ extension.
# Exits non-zero on the first failure. Uses the virtual environment at
# $MESHMEM_VENV (default ~/.cache/meshmem/venv, shared by every clone),
# creating it with
# ffi/python/setup-venv.sh when it is missing (set MESHMEM_SKIP_VENV=1 to use
# the python3 on PATH instead).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
started=$SECONDS
step() { echo "== $* ($((SECONDS - started)) s)"; }

step "building the launcher and libmeshmem"
cargo build --bin meshmem -p meshmem -p meshmem-ffi

step "checking include/meshmem.h against cbindgen"
cargo test -p meshmem-ffi --test header

step "building and running the C test on 4 nodes"
mkdir -p target/ffi-tests
cc -std=c11 -Wall -Wextra -Werror -I ffi/include ffi/tests/abi_test.c \
    -L target/debug -lmeshmem -Wl,-rpath,"$repo/target/debug" -o target/ffi-tests/abi_test
target/debug/meshmem run --mesh 2x2x1 --env MESHMEM_PAGE_SIZE=64K --env MESHMEM_NODE_CAPACITY=64M \
    -- target/ffi-tests/abi_test

if [ "${MESHMEM_SKIP_VENV:-}" = 1 ]; then
    python=python3
else
    venv="${MESHMEM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/meshmem/venv}"
    step "preparing $venv"
    MESHMEM_VENV="$venv" bash ffi/python/setup-venv.sh
    python="$venv/bin/python"
    export PATH="$venv/bin:$PATH" # ninja, for the C++ extension
fi

step "running the Python tests and the C++ extension"
export MESHMEM_LIB="$repo/target/debug/libmeshmem.so"
export PYTHONPATH="$repo/ffi/python${PYTHONPATH:+:$PYTHONPATH}"
"$python" -m pytest -v ffi/python/tests

step "all C ABI and Python tests passed"
