#!/usr/bin/env bash
# Side-by-side NBD server benchmark over TCP on loopback: our server
# (crates/nbd/examples/serve.rs), `nbdkit file` and `qemu-nbd -e 16 -t`, all
# exporting the same fully allocated random file (page-cache warm).
#
#   crates/nbd/benches/compare.sh            # 256 MiB file, 5 s per fio job, 2 rounds
#   SECS=4 ROUNDS=3 SIZE_MB=256 crates/nbd/benches/compare.sh
#
# Jobs (fio's nbd engine = libnbd, one connection per job):
#   randread 4k QD16   fio --rw=randread --bs=4k --iodepth=16
#   read 1M QD4        fio --rw=read --bs=1M --iodepth=4
#   nbdcopy            nbdcopy nbd://... null:   (whole export, its default 4 connections)
# Each cell is the best of ROUNDS; servers alternate within a round so that
# background load hits them alike. Not run by CI (timings only, no asserts).
#
# With a release `vinfra` binary (VINFRA=path, default $TARGET/release/vinfra if it
# exists) a fourth row measures the block cache's hit path: `vinfra nbd serve` with
# the whole file already in its cache (one nbdcopy pass warms it first).
set -euo pipefail

SECS=${SECS:-5}
ROUNDS=${ROUNDS:-2}
SIZE_MB=${SIZE_MB:-256}
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}

for b in fio nbdkit qemu-nbd nbdcopy; do
  command -v "$b" >/dev/null || { echo "compare.sh: $b missing: run scripts/setup.sh" >&2; exit 1; }
done

(cd "$ROOT" && cargo build --release -q -p nbd --example serve)
SERVE=$TARGET/release/examples/serve

W=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pick_port() {
  local p
  while :; do p=$((20000 + RANDOM % 20000)); port_free "$p" && { echo "$p"; return; }; done
}
wait_port() {
  for _ in $(seq 1 500); do port_free "$1" || return 0; sleep 0.02; done
  echo "compare.sh: nothing listening on port $1" >&2; exit 1
}

head -c "${SIZE_MB}M" /dev/urandom > "$W/disk.raw"
cat "$W/disk.raw" > /dev/null

P_OURS=$(pick_port); "$SERVE" "$W/disk.raw" --listen "127.0.0.1:$P_OURS" >/dev/null & PIDS+=($!)
# stderr silenced: the readiness probe (a bare connect) makes them log an error.
P_KIT=$(pick_port); nbdkit -f -i 127.0.0.1 -p "$P_KIT" file "$W/disk.raw" 2>/dev/null & PIDS+=($!)
P_QEMU=$(pick_port); qemu-nbd -f raw -e 16 -t -b 127.0.0.1 -p "$P_QEMU" "$W/disk.raw" 2>/dev/null & PIDS+=($!)
wait_port "$P_OURS"; wait_port "$P_KIT"; wait_port "$P_QEMU"

NAMES=(vinfra nbdkit qemu-nbd)
PORTS=("$P_OURS" "$P_KIT" "$P_QEMU")
VINFRA=${VINFRA:-$TARGET/release/vinfra}
if [ -x "$VINFRA" ]; then
  P_CACHE=$(pick_port)
  "$VINFRA" nbd serve --origin "$W/disk.raw" --cache-dir "$W/cache" --listen "127.0.0.1:$P_CACHE" >/dev/null 2>&1 & PIDS+=($!)
  wait_port "$P_CACHE"
  nbdcopy "nbd://127.0.0.1:$P_CACHE/" null:   # warm: every block now in the cache
  NAMES+=(vinfra-cache); PORTS+=("$P_CACHE")
fi
IDX=$(seq 0 $((${#NAMES[@]} - 1)))

# fio terse v3: field 7 = read bandwidth KiB/s, field 8 = read IOPS.
fio_job() { # port rw bs iodepth -> "iops kib_s"
  fio --name=bench --ioengine=nbd --uri="nbd://127.0.0.1:$1/" --rw="$2" --bs="$3" --iodepth="$4" \
      --size="${SIZE_MB}M" --runtime="$SECS" --time_based --output-format=terse --terse-version=3 2>/dev/null |
    awk -F';' '/^3;/ {print $8, $7}'
}
nbdcopy_secs() { # port -> seconds
  local t0 t1
  t0=$(date +%s.%N); nbdcopy "nbd://127.0.0.1:$1/" null:; t1=$(date +%s.%N)
  echo "$t0 $t1" | awk '{printf "%.3f", $2 - $1}'
}
max() { awk -v a="$1" -v b="$2" 'BEGIN{print (a+0 > b+0) ? a : b}'; }
min() { awk -v a="$1" -v b="$2" 'BEGIN{print (b == "" || a+0 < b+0) ? a : b}'; }

declare -A RR BW CP
for i in $IDX; do RR[$i]=0; BW[$i]=0; CP[$i]=""; done
for r in $(seq 1 "$ROUNDS"); do
  for i in $IDX; do
    read -r iops _ < <(fio_job "${PORTS[$i]}" randread 4k 16); RR[$i]=$(max "$iops" "${RR[$i]}")
    read -r _ kib < <(fio_job "${PORTS[$i]}" read 1M 4); BW[$i]=$(max "$kib" "${BW[$i]}")
    s=$(nbdcopy_secs "${PORTS[$i]}"); CP[$i]=$(min "$s" "${CP[$i]}")
    echo "round $r ${NAMES[$i]}: randread4k=${iops} IOPS, read1M=$((kib / 1024)) MiB/s, nbdcopy=${s}s" >&2
  done
done

printf '\nNBD servers, %s MiB random file, TCP loopback, %s s fio jobs, best of %s (nproc=%s)\n' \
  "$SIZE_MB" "$SECS" "$ROUNDS" "$(nproc)"
printf '| %-12s | %22s | %18s | %22s |\n' server "fio randread 4k QD16" "fio read 1M QD4" "nbdcopy -> null:"
printf '|%s|%s|%s|%s|\n' -------------- ------------------------ -------------------- ------------------------
for i in $IDX; do
  mibs=$(awk -v k="${BW[$i]}" 'BEGIN{printf "%.0f", k / 1024}')
  cps=$(awk -v s="${CP[$i]}" -v m="$SIZE_MB" 'BEGIN{printf "%.3f s (%.0f MiB/s)", s, m / s}')
  printf '| %-12s | %17s IOPS | %13s MiB/s | %22s |\n' "${NAMES[$i]}" "${RR[$i]}" "$mibs" "$cps"
done
