#!/usr/bin/env bash
# Lets a CI run on a fresh clone reuse the warm target dir for the crates it did not change.
#
# Why: cargo decides whether a workspace crate is up to date by comparing its source files'
# modification times with the last build's. A fresh clone gives every file the clone's time,
# so without this every workspace crate recompiles on every run, even when a commit only
# touched a test (clippy alone: 105 s against 0.4 s; the test build and docs likewise).
#
#   ci-warm-target.sh restore   before the first cargo call: when the target dirs were last
#                               built by a green CI run of commit S (the stamp), gives every
#                               tracked file unchanged since S an old modification time and
#                               leaves the changed ones at the clone's time, so cargo rebuilds
#                               exactly what changed since S. Removes the stamp meanwhile.
#   ci-warm-target.sh stamp     after a green run: records HEAD as the commit the target
#                               dirs now hold builds of.
#
# It never makes cargo trust a stale build: it does nothing (a full rebuild, as without it)
# unless the tree is clean (every file is HEAD's), the stamp names a commit this clone has,
# and no cargo build wrote into the target dirs after the stamp was written (someone else's
# build from other sources). A run that fails leaves no stamp, so the run after it rebuilds.
set -euo pipefail
cd "$(dirname "$0")/.."

target=${CARGO_TARGET_DIR:-/var/cache/vinfra/target}
fuzz_target=${FUZZ_TARGET_DIR:-/var/cache/vinfra/target-cargo-fuzz}
stamp=$target/.vinfra-ci-built-commit

case ${1:-} in
restore)
    if [[ ! -f $stamp ]]; then
        echo "ci-warm-target: no stamp in $target: every workspace crate rebuilds"
        exit 0
    fi
    built=$(cat "$stamp")
    # A fingerprint newer than the stamp: a build from sources this script cannot see.
    newer=""
    for dir in "$target" "$fuzz_target"; do
        [[ -d $dir ]] || continue
        newer=$(find "$dir" -maxdepth 5 -path '*/.fingerprint/*' -newer "$stamp" -print -quit)
        [[ -n $newer ]] && break
    done
    rm -f "$stamp"
    if [[ -n $newer ]]; then
        echo "ci-warm-target: $newer was built after the stamp: every workspace crate rebuilds"
        exit 0
    fi
    if [[ -n $(git status --porcelain) ]]; then
        echo "ci-warm-target: the tree has uncommitted changes: every workspace crate rebuilds"
        exit 0
    fi
    if ! git cat-file -e "${built}^{commit}" 2>/dev/null; then
        echo "ci-warm-target: stamp names ${built}, not in this clone: every workspace crate rebuilds"
        exit 0
    fi
    # Old times for every tracked file, then the clone's time again for what changed.
    git ls-files -z | xargs -0 touch -h -d '2001-01-01 00:00:00 UTC'
    changed=0
    while IFS= read -r -d '' f; do
        if [[ -e $f ]]; then
            touch -h "$f"
            changed=$((changed + 1))
        fi
    done < <(git diff -z --no-renames --name-only "$built" HEAD)
    echo "ci-warm-target: target dirs hold ${built:0:12}; ${changed} files changed since"
    ;;
stamp)
    git rev-parse HEAD >"$stamp.tmp"
    mv "$stamp.tmp" "$stamp"
    echo "ci-warm-target: stamped $target with $(cat "$stamp")"
    ;;
*)
    echo "usage: $0 restore|stamp" >&2
    exit 2
    ;;
esac
