#!/usr/bin/env bash
# Runs every test of the project: unit and property tests, integration
# tests that start groups of real node processes on the shared-memory
# backend, the launcher's tests, and the examples' tests.
#
# Needs a Rust toolchain (cargo) and a C compiler; installs nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

echo "== build (all targets, including benchmarks and examples)"
cargo build --workspace --all-targets --locked

echo "== tests"
cargo test --workspace --locked

echo "== example tests"
cargo test --workspace --examples --locked
