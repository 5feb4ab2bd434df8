#!/usr/bin/env bash
# build-guest-debian.sh OUTDIR — builds vinfra's Debian guest, offline from Debian packages:
#   OUTDIR/vmlinuz            the Debian kernel (downloaded and unpacked with dpkg -x, as for the
#                             default image; its modules are not installed in the root fs)
#   OUTDIR/initramfs.cpio.gz  busybox-static + the virtio and ext4 modules + /init, which mounts
#                             /dev/vda and switches to systemd on it
#   OUTDIR/disk.img           ext4 root file system (DISK_MIB MiB, sparse): Debian bookworm minbase
#                             (mmdebstrap, no recommends, no docs/man/locales), systemd,
#                             PostgreSQL 15 (pgbench ships in postgresql-15) with a pgbench
#                             database "bench" initialised at PGBENCH_SCALE, and fio
#   OUTDIR/manifest.json      what was built (kernel package, sizes, sha256); written last
#
# The guest reports on its serial console (ttyS0); the workload is chosen on the kernel command
# line (vinfra.workload=pgbench|fio|idle; see /usr/local/sbin/vinfra-workload below).
#
# Like build-guest.sh: the build happens in a temporary sibling directory renamed onto OUTDIR at
# the end; progress on stdout as "build-guest-debian: ..." lines, errors on stderr. Run as root.
# The Rust side (compute::guest) embeds this file and runs it with `bash -s OUTDIR`.
#
# Environment knobs:
#   DISK_MIB=1536                size of the root file system image (sparse)
#   PGBENCH_SCALE=20             pgbench scale factor of the database in the image (~300 MiB:
#                                more than the guest's page cache at 256 MiB of RAM, so that
#                                pgbench reads reach the disk and its block cache)
#   DEBIAN_MIRROR=               default: the host's Debian mirror (/etc/apt), else deb.debian.org
#   GUEST_BUILDER_SHA256=        recorded in the manifest (see build-guest.sh)
set -euo pipefail

OUT=${1:?usage: build-guest-debian.sh OUTDIR}
DISK_MIB=${DISK_MIB:-1536}
SCALE=${PGBENCH_SCALE:-20}
BUILDER_SHA=${GUEST_BUILDER_SHA256:-unknown}
SUITE=bookworm
# systemd.show_status=0: only the workload's lines on the console, not a line per unit.
CMDLINE="console=ttyS0 quiet panic=-1 systemd.show_status=0 vinfra.image=debian"

say() { printf 'build-guest-debian: %s\n' "$*"; }
die() { printf 'build-guest-debian: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (mmdebstrap, chroot, mknod)"
for b in apt-get apt-cache dpkg sha256sum gzip chroot mkfs.ext4 depmod; do
  command -v "$b" >/dev/null 2>&1 || die "$b not found (Debian host needed; run scripts/setup.sh)"
done
command -v mmdebstrap >/dev/null 2>&1 || die "mmdebstrap not found: install mmdebstrap (scripts/setup.sh)"
BUSYBOX=""
for c in /bin/busybox /usr/bin/busybox; do [ -x "$c" ] && { BUSYBOX=$c; break; }; done
[ -n "$BUSYBOX" ] || die "busybox not found: install busybox-static (scripts/setup.sh)"
"$BUSYBOX" --list | grep -x switch_root >/dev/null || die "$BUSYBOX has no switch_root: install busybox-static (scripts/setup.sh)"
if command -v ldd >/dev/null 2>&1 && ldd "$BUSYBOX" >/dev/null 2>&1; then
  die "$BUSYBOX is dynamically linked: install busybox-static (scripts/setup.sh)"
fi

if [ -z "${DEBIAN_MIRROR:-}" ]; then
  DEBIAN_MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$DEBIAN_MIRROR" ] || DEBIAN_MIRROR=$(awk '$1=="deb" && $3=="'$SUITE'" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$DEBIAN_MIRROR" ] || DEBIAN_MIRROR=http://deb.debian.org/debian
fi

mkdir -p "$(dirname "$OUT")"
OUT=$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")
TMP="$OUT.tmp.$$"
ROOT="$TMP/rootfs"
MOUNTS=()
cleanup() {
  local i
  for ((i=${#MOUNTS[@]}-1; i>=0; i--)); do umount -l "${MOUNTS[$i]}" 2>/dev/null || true; done
  rm -rf "$TMP"
}
rm -rf "$TMP"; mkdir -p "$TMP"
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------ kernel (as build-guest.sh)
KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}' || true)
if [ -z "$KPKG" ]; then
  say "apt lists are empty, running apt-get update"
  apt-get update -qq || die "apt-get update failed"
  KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
fi
[ -n "$KPKG" ] || die "cannot resolve the kernel package behind linux-image-amd64"
say "downloading $KPKG"
mkdir -p "$TMP/deb"
(cd "$TMP/deb" && apt-get download -q -o APT::Sandbox::User=root "$KPKG" >/dev/null) \
  || die "apt-get download $KPKG failed"
dpkg -x "$TMP"/deb/*.deb "$TMP/kernel"
KVER=$(ls "$TMP/kernel/lib/modules" | head -1)
[ -n "$KVER" ] && [ -f "$TMP/kernel/boot/vmlinuz-$KVER" ] || die "no vmlinuz in $KPKG"
cp "$TMP/kernel/boot/vmlinuz-$KVER" "$TMP/vmlinuz"
MODDIR="$TMP/kernel/lib/modules/$KVER"
# The package ships no modules.dep (its postinst makes it): make it here.
depmod -b "$TMP/kernel" "$KVER" || die "depmod failed on $KPKG"

# The modules the initramfs loads, with what they need first (from modules.dep; a module
# built into the kernel is in modules.builtin and needs nothing).
ORDER=()
add_mod() {
  local name=$1 line path dep
  line=$(grep -E "/${name}\.ko(\.xz|\.zst)?:" "$MODDIR/modules.dep" | head -1 || true)
  if [ -z "$line" ]; then
    grep -qE "/${name}\.ko$" "$MODDIR/modules.builtin" || die "module $name not in $KPKG"
    return 0
  fi
  path=${line%%:*}
  for p in "${ORDER[@]}"; do [ "$p" = "$path" ] && return 0; done
  # modules.dep lists every dependency; load them deepest first.
  for dep in $(echo "${line#*:}" | tr ' ' '\n' | tac); do
    dep=$(basename "$dep"); dep=${dep%%.ko*}
    add_mod "$dep"
  done
  for p in "${ORDER[@]}"; do [ "$p" = "$path" ] && return 0; done
  ORDER+=("$path")
}
for m in virtio_pci virtio_blk crc32c_generic ext4; do add_mod "$m"; done

# ------------------------------------------------------------------ initramfs
R="$TMP/initramfs"
mkdir -p "$R"/{bin,dev,proc,sys,newroot,lib/modules}
cp "$BUSYBOX" "$R/bin/busybox"
: > "$R/lib/modules/order"
for path in "${ORDER[@]}"; do
  base=$(basename "$path"); base=${base%%.ko*}
  case $path in
    *.ko.xz) xz -dc "$MODDIR/$path" > "$R/lib/modules/$base.ko" ;;
    *.ko.zst) zstd -qdc "$MODDIR/$path" > "$R/lib/modules/$base.ko" ;;
    *) cp "$MODDIR/$path" "$R/lib/modules/$base.ko" ;;
  esac
  echo "$base" >> "$R/lib/modules/order"
done
rm -rf "$TMP/kernel" "$TMP/deb"
mknod -m 600 "$R/dev/console" c 5 1
mknod -m 666 "$R/dev/null" c 1 3
cat > "$R/init" <<'EOF'
#!/bin/busybox sh
# vinfra Debian guest, stage 1: load the disk modules, mount /dev/vda, hand over to systemd.
/bin/busybox mkdir -p /usr/bin /sbin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec 0</dev/console 1>/dev/console 2>&1
echo "GUEST: init started, uptime $(cut -d' ' -f1 /proc/uptime)s"
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko || echo "GUEST: insmod $m failed"; done
n=0; while [ ! -b /dev/vda ] && [ $n -lt 200 ]; do usleep 50000; n=$((n+1)); done
if ! mount -t ext4 -o rw,noatime /dev/vda /newroot; then
  echo "GUEST: FATAL cannot mount /dev/vda"; echo "GUEST: POWEROFF reason=no-root"; poweroff -f; sleep 10
fi
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
EOF
chmod +x "$R/init"
(cd "$R" && find . | "$BUSYBOX" cpio -o -H newc 2>/dev/null | gzip -1 > "$TMP/initramfs.cpio.gz")
rm -rf "$R"

# ------------------------------------------------------------------ root file system
say "mmdebstrap $SUITE minbase from $DEBIAN_MIRROR (systemd, postgresql-15, fio)"
# libLLVM is only PostgreSQL's JIT (off in this guest): ~100 MiB left out.
mmdebstrap --mode=root --variant=minbase --quiet \
  --include=systemd-sysv,postgresql-15,fio \
  --aptopt='APT::Install-Recommends "false"' \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/lib/x86_64-linux-gnu/libLLVM*' \
  --dpkgopt='path-exclude=/usr/lib/postgresql/15/lib/bitcode/*' \
  --dpkgopt='path-exclude=/usr/lib/postgresql/15/lib/llvmjit*' \
  "$SUITE" "$ROOT" "deb $DEBIAN_MIRROR $SUITE main" >"$TMP/mmdebstrap.log" 2>&1 \
  || { tail -20 "$TMP/mmdebstrap.log" >&2; die "mmdebstrap failed"; }
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*

say "configuring the guest"
echo vinfra-debian > "$ROOT/etc/hostname"
: > "$ROOT/etc/machine-id"
# Root is mounted by the initramfs; nothing else to mount.
echo '# root: /dev/vda, mounted rw by the initramfs' > "$ROOT/etc/fstab"
# Nothing but the workload on the serial console, and no timers doing I/O behind its back.
for u in getty@tty1.service serial-getty@ttyS0.service console-getty.service \
         apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
         fstrim.timer systemd-tmpfiles-clean.timer man-db.timer dpkg-db-backup.timer \
         systemd-networkd-wait-online.service systemd-timesyncd.service \
         systemd-journald-audit.socket; do
  ln -sf /dev/null "$ROOT/etc/systemd/system/$u"
done
mkdir -p "$ROOT/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\nForwardToConsole=no\n' > "$ROOT/etc/systemd/journald.conf.d/vinfra.conf"

PGCONF="$ROOT/etc/postgresql/15/main/conf.d/vinfra.conf"
[ -d "$(dirname "$PGCONF")" ] || die "postgresql-15 did not create the cluster 'main'"
cat > "$PGCONF" <<'EOF'
# vinfra guest: small and durable (every commit reaches the virtio disk, so the block cache
# under it sees a database's real I/O).
jit = off
shared_buffers = 32MB
max_wal_size = 96MB
min_wal_size = 32MB
checkpoint_timeout = 60s
fsync = on
synchronous_commit = on
full_page_writes = on
log_destination = 'stderr'
logging_collector = off
EOF

cat > "$ROOT/usr/local/sbin/vinfra-workload" <<'EOF'
#!/bin/bash
# vinfra Debian guest, stage 2 (systemd unit vinfra-workload.service, output on ttyS0).
# Serial protocol (the host's tests and `vinfra bench migrate-vm` parse these lines):
#   GUEST: init started ...                      from the initramfs, once per boot
#   GUEST: READY vda=<MiB>MiB uptime <s>s workload=<w>   PostgreSQL is up, the workload starts
#   PGBENCH START scale=<s> clients=<c> secs=<t>
#   PGBENCH progress: <t> s, <tps> tps, lat <ms> ms stddev <ms>, <n> failed   (pgbench -P 1)
#   PGBENCH <line of pgbench's summary>           e.g. "PGBENCH tps = 41.2 (without initial connection time)"
#   PGBENCH LAT sec=<i> n=<transactions> p50_ms=<ms> p99_ms=<ms>   one per second of the run
#   PGBENCH CHECK exit=<rc> processed=<n> failed=<n> history_new=<n> accounts=<n> expected_accounts=<n> sum_a=<x> sum_b=<x> sum_t=<x> sum_h=<x> amcheck=<ok|..>
#   PGBENCH RESULT ok | PGBENCH RESULT FAIL <why>
#   FIO START secs=<t> ; FIO RESULT read_iops=<x> write_iops=<x> read_kib_s=<x> write_kib_s=<x> err=<n> ; FIO RESULT FAIL <why>
#   GUEST: WORKLOAD DONE <w>
# Kernel command line knobs:
#   vinfra.workload=idle|pgbench|fio       (default idle)
#   vinfra.pgbench_secs=60  vinfra.pgbench_clients=2  vinfra.pgbench_scale=<the image's>
#     (another scale re-initialises the database first: slow under TCG)
#   vinfra.pgbench_delay=0  seconds to wait after READY before pgbench starts
#   vinfra.fio_secs=30  vinfra.fio_mib=64
exec >/dev/ttyS0 2>&1
WL=idle; SECS=60; CLIENTS=2; SCALE=""; DELAY=0; FSECS=30; FMIB=64
for a in $(cat /proc/cmdline); do
  case $a in
    vinfra.workload=*) WL=${a#*=};; vinfra.pgbench_secs=*) SECS=${a#*=};;
    vinfra.pgbench_clients=*) CLIENTS=${a#*=};; vinfra.pgbench_scale=*) SCALE=${a#*=};;
    vinfra.pgbench_delay=*) DELAY=${a#*=};;
    vinfra.fio_secs=*) FSECS=${a#*=};; vinfra.fio_mib=*) FMIB=${a#*=};;
  esac
done
num() { [[ $1 =~ ^[0-9]+$ ]]; }
for v in "$SECS" "$CLIENTS" "$DELAY" "$FSECS" "$FMIB"; do num "$v" || { echo "GUEST: bad vinfra.* number '$v'"; exit 1; }; done
PGB=/usr/lib/postgresql/15/bin
psql_b() { runuser -u postgres -- $PGB/psql -X -q -At -d bench -c "$1"; }
n=0; until runuser -u postgres -- $PGB/pg_isready -q -d bench; do
  n=$((n+1)); [ $n -lt 300 ] || { echo "GUEST: FATAL postgresql not ready"; exit 1; }; sleep 0.2
done
MIB=$(( $(cat /sys/block/vda/size) / 2048 ))
echo "GUEST: READY vda=${MIB}MiB uptime $(cut -d' ' -f1 /proc/uptime)s workload=$WL"
IMG_SCALE=$(cat /var/lib/vinfra/pgbench_scale)
case $WL in
pgbench)
  [ "$DELAY" -gt 0 ] && sleep "$DELAY"
  if [ -n "$SCALE" ] && [ "$SCALE" != "$IMG_SCALE" ]; then
    num "$SCALE" || { echo "PGBENCH RESULT FAIL bad scale '$SCALE'"; exit 1; }
    echo "PGBENCH INIT scale=$SCALE"
    runuser -u postgres -- $PGB/pgbench -i -q -s "$SCALE" bench 2>&1 | sed 's/^/PGBENCH /'
    echo "$SCALE" > /var/lib/vinfra/pgbench_scale
  fi
  SCALE=$(cat /var/lib/vinfra/pgbench_scale)
  H0=$(psql_b "select count(*) from pgbench_history")
  echo "PGBENCH START scale=$SCALE clients=$CLIENTS secs=$SECS"
  LOGDIR=$(mktemp -d /tmp/pgb.XXXXXX); chown postgres "$LOGDIR"
  # -P 1: a progress line each second; -l: every transaction's latency, for p50/p99 per
  # second below. pgbench prints progress on stderr: both go, prefixed, to the console.
  set -o pipefail
  (cd "$LOGDIR" && runuser -u postgres -- $PGB/pgbench -n -P 1 -c "$CLIENTS" -j 1 -T "$SECS" -l --log-prefix="$LOGDIR/tx" bench 2>&1) \
    | stdbuf -oL sed 's/^/PGBENCH /' | tee "$LOGDIR/out"
  RC=$?
  set +o pipefail
  # Per-transaction log: client tx latency_us script epoch_s epoch_us. Seconds from the first.
  cat "$LOGDIR"/tx* 2>/dev/null | awk '{printf "%d.%06d %.3f\n", $5, $6, $3/1000}' | sort -n \
    | awk 'NR==1{t0=int($1)} {s=int($1)-t0; print s, $2}' | sort -k1,1n -k2,2n \
    | awk 'function flush(){ if(n>0){ i50=int((n-1)*0.50)+1; i99=int((n-1)*0.99)+1;
             printf "PGBENCH LAT sec=%d n=%d p50_ms=%.1f p99_ms=%.1f\n", cur, n, v[i50], v[i99] } }
           { if($1!=cur && n>0){ flush(); n=0 } cur=$1; n++; v[n]=$2 } END{ flush() }'
  PROC=$(sed -n 's/^PGBENCH number of transactions actually processed: \([0-9]*\).*/\1/p' "$LOGDIR/out")
  FAILED=$(sed -n 's/^PGBENCH number of failed transactions: \([0-9]*\).*/\1/p' "$LOGDIR/out")
  H1=$(psql_b "select count(*) from pgbench_history")
  ACC=$(psql_b "select count(*) from pgbench_accounts")
  SUMS=$(psql_b "select (select sum(abalance) from pgbench_accounts)||' '||(select sum(bbalance) from pgbench_branches)||' '||(select sum(tbalance) from pgbench_tellers)||' '||(select coalesce(sum(delta),0) from pgbench_history)")
  read -r SA SB ST SH <<<"$SUMS"
  AM=$(psql_b "select bt_index_check('pgbench_accounts_pkey', true); select bt_index_check('pgbench_branches_pkey', true); select bt_index_check('pgbench_tellers_pkey', true)" 2>&1 | tr '\n' ' ')
  [ -z "${AM// /}" ] && AM=ok || AM="FAIL(${AM// /_})"
  HN=$(( ${H1:-0} - ${H0:-0} ))
  echo "PGBENCH CHECK exit=$RC processed=${PROC:-?} failed=${FAILED:-?} history_new=$HN accounts=$ACC expected_accounts=$((SCALE*100000)) sum_a=$SA sum_b=$SB sum_t=$ST sum_h=$SH amcheck=$AM"
  why=""
  [ "$RC" = 0 ] || why="$why pgbench-exit-$RC"
  [ "${FAILED:-x}" = 0 ] || why="$why failed-transactions"
  [ "$HN" = "${PROC:-x}" ] || why="$why history-rows-$HN-vs-processed-${PROC:-?}"
  [ "$ACC" = $((SCALE*100000)) ] || why="$why account-rows"
  [ -n "$SA" ] && [ "$SA" = "$SB" ] && [ "$SA" = "$ST" ] && [ "$SA" = "$SH" ] || why="$why balance-sums"
  [ "$AM" = ok ] || why="$why amcheck"
  if [ -z "$why" ]; then echo "PGBENCH RESULT ok"; else echo "PGBENCH RESULT FAIL$why"; fi
  rm -rf "$LOGDIR"
  ;;
fio)
  mkdir -p /var/lib/vinfra/fio
  echo "FIO START secs=$FSECS mib=$FMIB"
  # A database-like mix: 4 KiB random reads and writes (70/30), skewed (zipf), O_DIRECT,
  # so every request reaches the virtio disk.
  OUTF=$(fio --name=vinfra --directory=/var/lib/vinfra/fio --size="${FMIB}M" --rw=randrw \
    --rwmixread=70 --bs=4k --direct=1 --ioengine=psync --iodepth=1 --random_distribution=zipf:1.1 \
    --time_based --runtime="$FSECS" --output-format=terse --terse-version=3 2>&1)
  RC=$?
  # terse v3: 5 error, 7 read KiB/s, 8 read IOPS, 48 write KiB/s, 49 write IOPS
  echo "$OUTF" | grep '^3;' | awk -F';' -v rc=$RC '{printf "FIO RESULT read_iops=%s write_iops=%s read_kib_s=%s write_kib_s=%s err=%s\n", $8, $49, $7, $48, $5 + rc}'
  echo "$OUTF" | grep -q '^3;' || echo "FIO RESULT FAIL rc=$RC ${OUTF//$'\n'/ }"
  ;;
idle) ;;
*) echo "GUEST: unknown vinfra.workload=$WL" ;;
esac
echo "GUEST: WORKLOAD DONE $WL"
EOF
chmod +x "$ROOT/usr/local/sbin/vinfra-workload"
cat > "$ROOT/etc/systemd/system/vinfra-workload.service" <<'EOF'
[Unit]
Description=vinfra guest workload (serial console protocol)
After=postgresql.service postgresql@15-main.service
Wants=postgresql@15-main.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/vinfra-workload
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
EOF
ln -sf /etc/systemd/system/vinfra-workload.service \
  "$ROOT/etc/systemd/system/multi-user.target.wants/vinfra-workload.service"

say "initialising the pgbench database (scale $SCALE)"
mkdir -p "$ROOT/var/lib/vinfra"
for d in proc sys dev dev/shm; do
  mkdir -p "$ROOT/$d"
  case $d in
    proc) mount -t proc proc "$ROOT/proc" ;;
    sys) mount -t sysfs sys "$ROOT/sys" ;;
    dev) mount --bind /dev "$ROOT/dev" ;;
    dev/shm) mount -t tmpfs shm "$ROOT/dev/shm" ;;
  esac
  MOUNTS+=("$ROOT/$d")
done
PGB=/usr/lib/postgresql/15/bin
mkdir -p "$ROOT/tmp/pgrun"; chmod 1777 "$ROOT/tmp/pgrun"
inroot() { chroot "$ROOT" runuser -u postgres -- "$@"; }
inroot $PGB/pg_ctl -D /var/lib/postgresql/15/main -w -l /tmp/pgrun/log \
  -o "-c config_file=/etc/postgresql/15/main/postgresql.conf -c unix_socket_directories=/tmp/pgrun -c listen_addresses=''" start >/dev/null \
  || { cat "$ROOT/tmp/pgrun/log" >&2; die "postgres did not start in the chroot"; }
pg_ok=1
inroot $PGB/createdb -h /tmp/pgrun bench || pg_ok=0
[ $pg_ok = 1 ] && { inroot $PGB/pgbench -h /tmp/pgrun -i -q -s "$SCALE" bench >"$TMP/pgbench-init.log" 2>&1 || pg_ok=0; }
[ $pg_ok = 1 ] && { inroot $PGB/psql -X -q -h /tmp/pgrun -d bench -c "create extension amcheck; checkpoint" || pg_ok=0; }
inroot $PGB/pg_ctl -D /var/lib/postgresql/15/main -w -m fast stop >/dev/null || pg_ok=0
[ $pg_ok = 1 ] || { cat "$TMP/pgbench-init.log" "$ROOT/tmp/pgrun/log" >&2 2>/dev/null; die "pgbench -i failed in the chroot"; }
echo "$SCALE" > "$ROOT/var/lib/vinfra/pgbench_scale"
rm -rf "$ROOT/tmp/pgrun"
for ((i=${#MOUNTS[@]}-1; i>=0; i--)); do umount "${MOUNTS[$i]}"; done
MOUNTS=()

# ------------------------------------------------------------------ disk image
USED=$(du -sm "$ROOT" | cut -f1)
[ "$USED" -lt $((DISK_MIB - 128)) ] || die "root fs is ${USED} MiB: DISK_MIB=$DISK_MIB leaves too little room"
say "ext4 image: ${USED} MiB used of ${DISK_MIB} MiB"
truncate -s "${DISK_MIB}M" "$TMP/disk.img"
# No lazy init: the guest kernel would zero inode tables in the background, I/O no workload asked for.
mkfs.ext4 -q -F -L vinfra-root -E lazy_itable_init=0,lazy_journal_init=0 -d "$ROOT" "$TMP/disk.img" \
  || die "mkfs.ext4 -d failed"
rm -rf "$ROOT"

# ------------------------------------------------------------------ manifest (last: its presence marks a complete build)
entry() { printf '"%s": {"size": %s, "sha256": "%s"}' "$1" "$(stat -c %s "$TMP/$1")" "$(sha256sum "$TMP/$1" | cut -d' ' -f1)"; }
cat > "$TMP/manifest.json.tmp" <<EOF
{
  "format": 1,
  "builder_sha256": "$BUILDER_SHA",
  "kernel_package": "$KPKG",
  "kernel_version": "$KVER",
  "cmdline": "$CMDLINE",
  "disk_mib": $DISK_MIB,
  "pgbench_scale": $SCALE,
  "root_used_mib": $USED,
  "files": {
    $(entry vmlinuz),
    $(entry initramfs.cpio.gz),
    $(entry disk.img)
  }
}
EOF
sync -f "$TMP/disk.img" 2>/dev/null || sync
mv "$TMP/manifest.json.tmp" "$TMP/manifest.json"
rm -f "$TMP/mmdebstrap.log" "$TMP/pgbench-init.log"
rmdir "$ROOT" 2>/dev/null || true

# ------------------------------------------------------------------ publish atomically
if [ -e "$OUT" ]; then
  mv "$OUT" "$OUT.old.$$"
fi
mv "$TMP" "$OUT"
trap - EXIT
rm -rf "$OUT.old.$$"
say "done: $OUT ($KPKG, root fs ${USED} MiB, pgbench scale $SCALE)"
