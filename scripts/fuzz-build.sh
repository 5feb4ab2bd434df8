#!/usr/bin/env bash
# Builds every fuzz target in fuzz/ (a standalone cargo-fuzz workspace: nightly + libFuzzer),
# so that CI notices a target that no longer compiles against the crates it fuzzes. Builds
# only (`--release`: the optimised build scripts/fuzz-run.sh runs); to run a target see the
# commands at the top of fuzz/Cargo.toml.
#
# Installs cargo-fuzz when missing. Artifacts go to $FUZZ_TARGET_DIR (default /var/cache/vinfra/target-cargo-fuzz),
# outside the repo and apart from the main workspace's target dir (other compiler flags).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

# A machine here has one toolchain (rust-toolchain.toml pins it) and cannot fetch
# nightly: cargo-fuzz's nightly-only flags are let through by RUSTC_BOOTSTRAP on it.
# The build is a compile check, so it is built without a sanitizer (faster); run
# targets with the sanitizer on a machine with nightly (see fuzz/Cargo.toml).
export RUSTC_BOOTSTRAP=1
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz-build: installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi

export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-/var/cache/vinfra/target-cargo-fuzz}"
mkdir -p "$CARGO_TARGET_DIR"
# fuzz/Cargo.lock is committed; when a change to the workspace's dependencies left it
# behind, cargo brings it up to date here (crates.io is reachable) rather than failing.
# Unoptimised (`--dev`): CI only needs to know that every target still compiles and
# links, and the dev profile recompiles a fresh clone's unchanged crates incrementally
# (12 s on a warm target dir, against 175 s for the optimised build, which recompiles every
# workspace crate). scripts/fuzz-run.sh builds the optimised targets it runs.
profile=(--dev)
[[ ${1:-} == --release ]] && profile=()
cargo fuzz build "${profile[@]}" --sanitizer none
echo "fuzz-build: built $(cargo fuzz list | wc -l) fuzz targets (${profile[*]:-release})"
