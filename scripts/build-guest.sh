#!/usr/bin/env bash
# build-guest.sh OUTDIR — builds vinfra's default test guest, offline from Debian packages:
#   OUTDIR/vmlinuz            the Debian kernel (downloaded and unpacked, NOT installed: installing
#                             linux-image-amd64 would pull systemd, udev and run boot hooks)
#   OUTDIR/initramfs.cpio.gz  busybox-static + 10 virtio modules + /init (a disk workload; NICs
#                             configured from vinfra.nic= on the kernel command line; the
#                             seed-2 link endpoint on its CPs, driven over a virtio-serial port)
#   OUTDIR/disk.img           disk template: DISK_MIB MiB, MiB k begins with "BLK%06d", last MiB scratch
#   OUTDIR/manifest.json      what was built (kernel package, sizes, sha256); written last
#
# The build happens in a temporary sibling directory that is renamed onto OUTDIR at the end,
# so an interrupted build never leaves a half image behind. Progress goes to stdout as
# "build-guest: ..." lines; errors go to stderr. Run as root (mknod for /dev/console).
# The Rust side (compute::guest) embeds this file and runs it with `bash -s OUTDIR`.
#
# Environment knobs:
#   DISK_MIB=64                  size of the disk template
#   GUEST_BUILDER_SHA256=        recorded in the manifest; the Rust side uses it to notice
#                                that the builder changed and the cached image is stale
set -euo pipefail

OUT=${1:?usage: build-guest.sh OUTDIR}
DISK_MIB=${DISK_MIB:-64}
BUILDER_SHA=${GUEST_BUILDER_SHA256:-unknown}
CMDLINE="console=ttyS0 quiet panic=-1"

say() { printf 'build-guest: %s\n' "$*"; }
die() { printf 'build-guest: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (mknod /dev/console in the initramfs)"
for b in apt-get apt-cache dpkg sha256sum gzip; do
  command -v "$b" >/dev/null 2>&1 || die "$b not found (Debian host needed; run scripts/setup.sh)"
done
BUSYBOX=""
for c in /bin/busybox /usr/bin/busybox; do [ -x "$c" ] && { BUSYBOX=$c; break; }; done
[ -n "$BUSYBOX" ] || die "busybox not found: install busybox-static (scripts/setup.sh)"
# Not `grep -q`: it stops reading early, busybox dies of SIGPIPE, and pipefail fails the check.
"$BUSYBOX" --list | grep -x cpio >/dev/null || die "$BUSYBOX has no cpio applet: install busybox-static (scripts/setup.sh)"
# The guest has no libc: a dynamically linked busybox would not start as /init.
if command -v ldd >/dev/null 2>&1 && ldd "$BUSYBOX" >/dev/null 2>&1; then
  die "$BUSYBOX is dynamically linked: install busybox-static (scripts/setup.sh)"
fi

mkdir -p "$(dirname "$OUT")"
OUT=$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")
TMP="$OUT.tmp.$$"
rm -rf "$TMP"; mkdir -p "$TMP"
trap 'rm -rf "$TMP"' EXIT
trap 'exit 130' INT TERM   # bash skips the EXIT trap on a fatal signal unless it is trapped

# ------------------------------------------------------------------ kernel
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
say "unpacking $KPKG"
dpkg -x "$TMP"/deb/*.deb "$TMP/root"
KVER=$(ls "$TMP/root/lib/modules" | head -1)
[ -n "$KVER" ] && [ -f "$TMP/root/boot/vmlinuz-$KVER" ] || die "no vmlinuz in $KPKG"
cp "$TMP/root/boot/vmlinuz-$KVER" "$TMP/vmlinuz"

# ------------------------------------------------------------------ initramfs
R="$TMP/initramfs"
mkdir -p "$R"/{bin,dev,proc,sys,tmp,lib/modules}
cp "$BUSYBOX" "$R/bin/busybox"
# Load order matters: each module needs the ones before it.
for m in drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_modern_dev \
         drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci drivers/block/virtio_blk \
         net/core/failover drivers/net/net_failover drivers/net/virtio_net drivers/char/virtio_console; do
  f="$TMP/root/lib/modules/$KVER/kernel/$m.ko"
  dst="$R/lib/modules/$(basename "$m").ko"
  if [ -f "$f" ]; then cp "$f" "$dst"
  elif [ -f "$f.xz" ]; then   # newer kernels (6.12 in backports) compress their modules
    if command -v xz >/dev/null 2>&1; then xz -dc "$f.xz" > "$dst"; else "$BUSYBOX" xz -dc "$f.xz" > "$dst"; fi
  else die "module $m not found in $KPKG"; fi
done
rm -rf "$TMP/root" "$TMP/deb"   # ~400 MiB unpacked; only vmlinuz and the modules are kept

mknod -m 600 "$R/dev/console" c 5 1   # else /init has no stdout until devtmpfs is mounted
mknod -m 666 "$R/dev/null" c 1 3
cat > "$R/init" <<'EOF'
#!/bin/busybox sh
# vinfra test guest. Serial protocol (the host's tests parse these lines):
#   GUEST: init started ...           once per boot (a second one after a migration = a reboot)
#   GUEST: READY vda=<MiB>MiB ...     the disk is there, the workload starts
#   GUEST: TYPED <line>               a line typed on the VM's keyboard (tty1), e.g. by a terminal
#   TICK <i> up=<s> off=<MiB>MiB read=ok|BAD(..) write=ok|BAD(..)   one per tick
#   GUEST: POWEROFF reason=<why>      last line before the guest powers off
#   GUEST: NIC <if> mac=<mac> ip=<a.b.c.d/p>   one per vinfra.nic= (before READY)
#   PING <ip> ok|fail                 one per tick with vinfra.ping=<ip> (after the TICK line)
# Kernel command line knobs: vinfra.tick_ms=100  vinfra.ticks=0 (0 = forever)  vinfra.dirty=0 (MiB of RAM to rewrite)
#   vinfra.nic=<mac>,<ip>/<prefix>[,<cp name>] (repeatable; set by the vinfra agent from the VM's NICs)
#   GUEST: LINK <link> up|failed|accepted ...   seed 2 in the guest (see /bin/link-ctl, /bin/link-ack)
#   vinfra.ping=<ip> (ping it once per tick and say whether it answered)
#   vinfra.load=<ip>[,<interval s>[,<bytes>]] (after READY, ping <ip> every <interval> (0.01) with
#     <bytes> (1400) of payload until power-off: a steady load on the network; skipped, with a
#     line saying so, when <ip> is one of the guest's own addresses, so that every VM of a VNF
#     can share one image whose load targets one of them)
#   GUEST: LOAD <ip> every <s>s <bytes>B | LOAD skipped own-address <ip>   (before READY)
/bin/busybox mkdir -p /usr/bin /sbin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec 0</dev/console 1>/dev/console 2>&1
off() { echo "GUEST: POWEROFF reason=$1"; sync; poweroff -f; sleep 10; }
echo "GUEST: init started, uptime $(cut -d' ' -f1 /proc/uptime)s"
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk failover net_failover virtio_net virtio_console; do
  insmod /lib/modules/$m.ko || echo "GUEST: insmod $m failed"
done
n=0; while [ ! -b /dev/vda ] && [ $n -lt 200 ]; do usleep 50000; n=$((n+1)); done
[ -b /dev/vda ] || { echo "GUEST: FATAL no /dev/vda"; off no-disk; }
MIB=$(( $(cat /sys/block/vda/size) / 2048 ))
[ "$MIB" -ge 2 ] || { echo "GUEST: FATAL disk too small"; off disk-too-small; }
TICK_MS=100; TICKS=0; DIRTY=0; NICS=""; PING=""; LOAD=""
for a in $(cat /proc/cmdline); do
  case $a in
    vinfra.tick_ms=*) TICK_MS=${a#*=};; vinfra.ticks=*) TICKS=${a#*=};; vinfra.dirty=*) DIRTY=${a#*=};;
    vinfra.nic=*) NICS="$NICS ${a#*=}";; vinfra.ping=*) PING=${a#*=};; vinfra.load=*) LOAD=${a#*=};;
  esac
done
ip link set lo up
: > /tmp/cps
for nic in $NICS; do
  mac=${nic%%,*}; rest=${nic#*,}; addr=${rest%%,*}; name=""; dev=""; n=0
  case $rest in *,*) name=${rest#*,};; esac
  # virtio-net probes asynchronously: wait for the interface with this MAC.
  while [ -z "$dev" ] && [ $n -lt 100 ]; do
    for d in /sys/class/net/*; do [ "$(cat $d/address)" = "$mac" ] && dev=${d##*/}; done
    [ -n "$dev" ] || { usleep 50000; n=$((n+1)); }
  done
  if [ -z "$dev" ]; then echo "GUEST: NIC missing mac=$mac"; continue; fi
  ip link set "$dev" up && ip addr add "$addr" dev "$dev" && echo "GUEST: NIC $dev mac=$mac ip=$addr" \
    || echo "GUEST: NIC $dev mac=$mac failed to configure $addr"
  [ -n "$name" ] && echo "$name" >> /tmp/cps
done
# Seed 2: named CPs accept link hellos on port 7946, and the host agent asks this guest to
# connect one of its CPs to another VNF's CP over the virtio-serial port "vinfra.link".
if [ -s /tmp/cps ]; then
  nc -ll -p 7946 -e /bin/link-ack &
  port=""; n=0
  while [ -z "$port" ] && [ $n -lt 40 ]; do
    for p in /sys/class/virtio-ports/*; do [ "$(cat $p/name 2>/dev/null)" = vinfra.link ] && port=/dev/${p##*/}; done
    [ -n "$port" ] || { usleep 50000; n=$((n+1)); }
  done
  if [ -n "$port" ]; then /bin/link-ctl "$port" & else echo "GUEST: no vinfra.link port"; fi
fi
if [ "$DIRTY" -gt 0 ]; then
  # memory dirtier: rewrite DIRTY MiB of tmpfs (guest RAM) with non-zero data, forever
  dd if=/dev/urandom of=/tmp/chunk bs=1M count=1 2>/dev/null
  ( while :; do k=0; while [ $k -lt $DIRTY ]; do dd if=/tmp/chunk of=/tmp/dirty bs=1M seek=$k count=1 conv=notrunc 2>/dev/null; k=$((k+1)); done; done ) &
  echo "GUEST: dirtying ${DIRTY}MiB of RAM in a loop"
fi
# Keys a terminal operates the VM with reach the PS/2 keyboard, whose input goes to the
# first virtual terminal of the VGA console: each line typed there is echoed here.
# Opened here, before READY, not in the background reader: keys typed on a VT nobody has
# open are dropped, and under load the reader could open it after the first keys came.
[ -c /dev/tty1 ] || mknod /dev/tty1 c 4 1 2>/dev/null
if exec 3</dev/tty1; then
  ( while read -r line <&3; do echo "GUEST: TYPED $line"; done ) &
fi
if [ -n "$LOAD" ]; then
  lip=${LOAD%%,*}; lrest=${LOAD#"$lip"}; lrest=${lrest#,}
  lint=${lrest%%,*}; lint=${lint:-0.01}; lsize=${lrest#"${lrest%%,*}"}; lsize=${lsize#,}; lsize=${lsize:-1400}
  own=""; for nic in $NICS; do a=${nic#*,}; a=${a%%,*}; [ "${a%/*}" = "$lip" ] && own=1; done
  if [ -n "$own" ]; then echo "GUEST: LOAD skipped own-address $lip"
  else
    ping -q -i "$lint" -s "$lsize" "$lip" >/dev/null 2>&1 &
    echo "GUEST: LOAD $lip every ${lint}s ${lsize}B"
  fi
fi
echo "GUEST: READY vda=${MIB}MiB uptime $(cut -d' ' -f1 /proc/uptime)s"
# Each tick: O_DIRECT read of 1 MiB at a strided offset + header check (data came through the
# disk path, not the page cache), then a 4 KiB sequence record written with fsync into the last
# MiB and read back O_DIRECT. `i` lives in guest RAM: after a live migration it continues.
# Under TCG a tick costs ~70 ms of CPU, nearly all of it forking and exec'ing dd: shell
# builtins (read, printf into a file) stand in wherever a pipe or $(...) would fork, and the
# pause is a read with a timeout on a FIFO nobody writes (fd 5), not usleep (a tick cost
# ~150 ms of CPU before). Each file dd writes is emptied first, so a failed read cannot
# leave an earlier tick's bytes to compare.
LAST=$((MIB-1)); i=0
mkfifo /tmp/pause && [ -p /tmp/pause ] && exec 5<>/tmp/pause && PAUSE_FD=5
PAUSE=$((TICK_MS/1000)).$(printf '%03d' $((TICK_MS%1000)))
while [ "$TICKS" = 0 ] || [ $i -lt "$TICKS" ]; do
  o=$(( (i*37) % LAST ))
  : > /tmp/blk; dd if=/dev/vda of=/tmp/blk bs=1M skip=$o count=1 iflag=direct 2>/dev/null
  hdr=""; read -r -n 9 hdr < /tmp/blk
  printf 'BLK%06d' $o > /tmp/want; want=""; read -r want < /tmp/want
  [ "$hdr" = "$want" ] && r=ok || r="BAD($hdr)"
  printf 'SEQ%08d' $i > /tmp/seq; seq=""; read -r seq < /tmp/seq
  dd if=/tmp/seq of=/dev/vda bs=4096 seek=$((LAST*256)) count=1 conv=sync,notrunc,fsync 2>/dev/null
  : > /tmp/back; dd if=/dev/vda of=/tmp/back bs=4096 skip=$((LAST*256)) count=1 iflag=direct 2>/dev/null
  back=""; read -r -n 11 back < /tmp/back
  [ "$back" = "$seq" ] && w=ok || w="BAD($back)"
  read -r up _ < /proc/uptime
  echo "TICK $i up=$up off=${o}MiB read=$r write=$w"
  if [ -n "$PING" ]; then ping -c 1 -W 1 "$PING" >/dev/null 2>&1 && echo "PING $PING ok" || echo "PING $PING fail"; fi
  i=$((i+1))
  if [ -n "$PAUSE_FD" ]; then read -r -t "$PAUSE" _ <&5; else usleep $((TICK_MS*1000)); fi
done
off "ticks-done"
EOF
chmod +x "$R/init"
cat > "$R/bin/link-ack" <<'EOF'
#!/bin/busybox sh
# The first CP's side of seed 2: answer "LINK <link> FROM <cp2> TO <cp1>" addressed to one
# of this guest's CPs with "ACK <link> FROM <cp2> TO <cp1> BY <cp1>".
read -r l
rest=${l#LINK }
set -- $rest
if [ "${l%% *}" = LINK ] && [ "$2" = FROM ] && [ "$4" = TO ] && grep -qx "$5" /tmp/cps; then
  echo "ACK $rest BY $5"
  echo "GUEST: LINK $1 accepted from $3 on $5" > /dev/console
else
  echo "NAK $l"
fi
EOF
cat > "$R/bin/link-ctl" <<'EOF'
#!/bin/busybox sh
# The second CP's side of seed 2, driven by the host agent over a virtio-serial port:
#   in:  CONNECT <link> <cp2> <cp1> <ip> <port> <secs>
#   out: UP <link> <ack>  |  FAIL <link> <reason>
# The port reads EOF while the host side is not connected: wait and read again, keeping
# the port open (closing it discards what a reconnecting host already sent). It is opened
# by redirecting a function call, never with `exec`: a failed `exec` redirection would
# end the whole script.
# A request the host gave up on may still be answered later: the link name lets the host
# skip that answer.
serve() {
  while :; do
    read -r cmd link cp2 cp1 ip port secs <&3 || { usleep 200000; continue; }
    [ "$cmd" = CONNECT ] || { echo "FAIL - unknown command $cmd" >&3; continue; }
    if ! grep -qx "$cp2" /tmp/cps; then echo "FAIL $link this guest has no CP $cp2" >&3; continue; fi
    # The first VNF may still be booting: retry until the deadline.
    end=$(( $(cut -d. -f1 /proc/uptime) + secs ))
    while :; do
      ack=$(echo "LINK $link FROM $cp2 TO $cp1" | timeout 2 nc -w 2 "$ip" "$port" 2>&1)
      [ "$ack" = "ACK $link FROM $cp2 TO $cp1 BY $cp1" ] && break
      [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ] || break
      usleep 300000
    done
    if [ "$ack" = "ACK $link FROM $cp2 TO $cp1 BY $cp1" ]; then
      echo "UP $link $ack" >&3
      echo "GUEST: LINK $link up from $cp2 to $cp1 at $ip:$port" > /dev/console
    else
      echo "FAIL $link ${ack:-no answer from $ip:$port within ${secs}s}" >&3
      echo "GUEST: LINK $link failed from $cp2 to $cp1 at $ip:$port: ${ack:-no answer}" > /dev/console
    fi
  done
}
while :; do
  serve 3<>"$1" 2>/dev/null
  usleep 200000
done
EOF
chmod +x "$R/bin/link-ack" "$R/bin/link-ctl"
say "packing initramfs"
(cd "$R" && find . | "$BUSYBOX" cpio -o -H newc 2>/dev/null | gzip -1 > "$TMP/initramfs.cpio.gz")
rm -rf "$R"

# ------------------------------------------------------------------ disk template
say "writing ${DISK_MIB} MiB disk template"
truncate -s "${DISK_MIB}M" "$TMP/disk.img"
i=0
while [ $i -lt "$DISK_MIB" ]; do
  printf 'BLK%06d\n' "$i" | dd of="$TMP/disk.img" bs=1M seek="$i" conv=notrunc status=none
  i=$((i+1))
done

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
  "files": {
    $(entry vmlinuz),
    $(entry initramfs.cpio.gz),
    $(entry disk.img)
  }
}
EOF
sync -f "$TMP/disk.img" 2>/dev/null || sync
mv "$TMP/manifest.json.tmp" "$TMP/manifest.json"

# ------------------------------------------------------------------ publish atomically
if [ -e "$OUT" ]; then
  mv "$OUT" "$OUT.old.$$"
fi
mv "$TMP" "$OUT"
trap - EXIT
rm -rf "$OUT.old.$$"
say "done: $OUT ($KPKG, initramfs $(( $(stat -c %s "$OUT/initramfs.cpio.gz") / 1024 )) KiB)"
