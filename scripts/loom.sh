#!/usr/bin/env bash
# Runs the loom models of the migration, replication and reclamation
# protocols (tests/loom_models.rs). They build only with `--cfg loom`, in
# their own target directory so that the flag does not invalidate the
# ordinary build. Extra arguments go to the test binary, for example a
# model's name. LOOM_MAX_PREEMPTIONS overrides the models' preemption
# bounds.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
    cargo test --release --locked --test loom_models -- "$@"
