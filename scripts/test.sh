#!/usr/bin/env bash
# Runs every test of the project: unit and property tests, integration
# tests that start groups of real node processes on the shared-memory
# backend (and, as root, on simulated hosts joined over TCP), the loom
# models, the launcher's tests, the examples' tests, and the C ABI's tests
# (the header check, a C program on four nodes, and the Python and PyTorch
# tests).
#
# Needs a Rust toolchain, a C and C++ compiler and Python 3 with venv. The
# Python tests run in a virtual environment with numpy, pytest and torch,
# which ffi/python/setup-venv.sh creates on first use (about 3 GB of
# downloads) under $MESHMEM_VENV, by default ~/.cache/meshmem/venv so that
# later runs and other clones reuse it.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

echo "== build (all targets, including benchmarks and examples)"
cargo build --workspace --all-targets --locked

echo "== tests"
cargo test --workspace --locked

echo "== example tests"
cargo test --workspace --examples --locked

echo "== loom models of migration, replication and reclamation"
scripts/loom.sh

# The RDMA backend builds against libibverbs and librdmacm through rdma-sys,
# whose build script runs bindgen (libclang). CI installs them; elsewhere a
# missing package is reported and the RDMA step is skipped by name.
echo "== RDMA backend (feature rdma)"
rdma_deps=(pkg-config libibverbs-dev librdmacm-dev libclang-dev)
if ! pkg-config --exists libibverbs librdmacm 2>/dev/null && [ "${CI:-}" = true ] && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq "${rdma_deps[@]}" >/dev/null
fi
if pkg-config --exists libibverbs librdmacm 2>/dev/null; then
    cargo test --locked --features rdma --lib transport::rdma
    cargo test --locked --features rdma --test rdma
else
    echo "RDMA step NOT RUN: libibverbs/librdmacm development files are missing; install ${rdma_deps[*]}"
fi

echo "== C ABI, Python and PyTorch tests"
export MESHMEM_VENV="${MESHMEM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/meshmem/venv}"
mkdir -p "$(dirname "$MESHMEM_VENV")"
ffi/run-tests.sh
