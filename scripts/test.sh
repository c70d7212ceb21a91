#!/usr/bin/env bash
# Runs every check CI runs, from a fresh clone: installs libtorch (PyPI torch 2.11.0) when missing,
# then fmt, clippy (once, whole workspace), build and tests, all in the one `release` profile.
# Prints each stage's duration. Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
t_all=$(date +%s)
stage() {
    local name=$1; shift
    local t0; t0=$(date +%s)
    echo "=== $name"
    "$@"
    echo "=== $name: $(( $(date +%s) - t0 )) s"
}
# shellcheck source=env.sh
stage "libtorch (torch 2.11.0 venv)" source scripts/env.sh
stage "fixtures match tests/fixtures/SHA256SUMS" scripts/fixtures/sha256sums.sh --check
stage "cargo fmt --check" cargo fmt --all --check
stage "cargo clippy" cargo clippy --release --workspace --all-targets --locked -- -D warnings
stage "cargo build" cargo build --release --workspace --all-targets --locked
stage "cargo test" cargo test --release --workspace --locked
echo "=== all checks passed in $(( $(date +%s) - t_all )) s"
