#!/usr/bin/env bash
# Builds the fuzz targets optimised (scripts/fuzz-build.sh --release), then runs every one,
# SECONDS each (default 60), one after the other, on a fresh corpus in a temp dir; prints
# one line per target and exits non-zero when any found a crash (its reproducer is kept and
# named).
#   scripts/fuzz-run.sh [SECONDS] [TARGET…]
set -euo pipefail
bash "$(dirname "$0")/fuzz-build.sh" --release
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
shift || true
bin="${FUZZ_TARGET_DIR:-/var/cache/vinfra/target-cargo-fuzz}/x86_64-unknown-linux-gnu/release"
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    mapfile -t targets < <(ls fuzz_targets | sed 's/\.rs$//')
fi
work=$(mktemp -d /tmp/vinfra-fuzz.XXXXXX)
failed=0
for t in "${targets[@]}"; do
    [[ -x "$bin/$t" ]] || { echo "fuzz-run: $t was not built (no such target?)" >&2; exit 1; }
    mkdir -p "$work/$t/corpus" "$work/$t/artifacts"
    extra=()
    # Descriptors are whole YAML documents: room for a realistic one.
    [[ $t == nfv_descriptor ]] && extra+=(-max_len=300000)
    if "$bin/$t" "$work/$t/corpus" -max_total_time="$secs" -artifact_prefix="$work/$t/artifacts/" \
        "${extra[@]}" > "$work/$t/log" 2>&1; then
        runs=$(grep -oE '^Done [0-9]+ runs' "$work/$t/log" | awk '{print $2}' || true)
        echo "fuzz-run: $t clean for ${secs} s (${runs:-?} inputs, corpus $(ls "$work/$t/corpus" | wc -l))"
    else
        failed=1
        echo "fuzz-run: $t FAILED: $(ls "$work/$t/artifacts") in $work/$t/artifacts; log $work/$t/log"
        tail -20 "$work/$t/log"
    fi
done
[[ $failed -eq 0 ]] && rm -rf "$work"
exit $failed
