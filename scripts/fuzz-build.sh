#!/usr/bin/env bash
# Builds every fuzz target in fuzz/ (a standalone cargo-fuzz workspace: nightly + libFuzzer),
# so that CI notices a target that no longer compiles against the crates it fuzzes. Builds
# only; to run a target see the commands at the top of fuzz/Cargo.toml.
#
# Installs what it needs when missing: the nightly toolchain (minimal profile) and
# cargo-fuzz. Artifacts go to $FUZZ_TARGET_DIR (default /var/cache/vinfra/target-cargo-fuzz),
# outside the repo and apart from the main workspace's target dir (other compiler flags).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz-build: installing the nightly toolchain"
  rustup toolchain install nightly --profile minimal || {
    echo "fuzz-build: cannot install the nightly toolchain (rustup toolchain install nightly)" >&2
    exit 1
  }
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz-build: installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi

export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-/var/cache/vinfra/target-cargo-fuzz}"
mkdir -p "$CARGO_TARGET_DIR"
# fuzz/Cargo.lock is committed and must be up to date (`cargo fuzz build` takes no --locked).
cargo +nightly metadata --locked --format-version 1 >/dev/null
cargo +nightly fuzz build
echo "fuzz-build: built $(cargo +nightly fuzz list | wc -l) fuzz targets"
