#!/usr/bin/env bash
# Installs the Debian packages vinfra and its tests need. Idempotent; run as root.
#
# Why backports: the machine ships qemu-utils 10 from bookworm-backports, and
# bookworm's qemu-system-x86 (7.2) conflicts with it — a plain
# `apt-get install qemu-system-x86` would REMOVE qemu-img/qemu-nbd. So QEMU comes
# from the same suite as qemu-utils. (See docs/OPERATIONS.md.)
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

need() { for b in "$@"; do command -v "$b" >/dev/null 2>&1 || return 1; done; }

# rust-toolchain.toml pins the Rust release (1.95.0). Where rustup cannot download it (no
# network but the package registries) and the installed stable is that release, give it
# that name too, or every cargo command in this tree would try to download it first.
pin=$(sed -n 's/^channel = "\(.*\)"$/\1/p' "$(dirname "$0")/../rust-toolchain.toml")
if command -v rustup >/dev/null 2>&1 && ! rustup toolchain list | grep -q "^$pin-"; then
  if rustup run stable rustc --version | grep -q "^rustc $pin "; then
    host=$(rustup run stable rustc -vV | sed -n 's/^host: //p')
    ln -s "$(rustup run stable rustc --print sysroot)" "$(rustup show home)/toolchains/$pin-$host"
    echo "setup: the installed stable Rust is $pin: named it so for rust-toolchain.toml"
  fi
fi

# Never let a package postinst start a daemon on default ports (etcd would
# grab 127.0.0.1:2379): tests start their own on free ports.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod +x /usr/sbin/policy-rc.d
fi

BINS="qemu-system-x86_64 qemu-img qemu-nbd qemu-io nbdkit nbdinfo nbdcopy fio etcd etcdctl busybox socat ip ping protoc virsh libvirtd virtlogd nft clang bpftool tc nfcapd nfdump chromium chromedriver mmdebstrap depmod mkfs.ext4 websockify"
if need $BINS && [ -x /bin/busybox ] && busybox --list | grep -qx cpio; then
  echo "setup: all packages present"
else
  $SUDO apt-get update -qq
  sfx=""
  if dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null | grep -q 'bpo'; then
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
      S=/etc/apt/sources.list.d/debian.sources
      uri=$(awk '/^URIs:/{print $2; exit}' "$S" 2>/dev/null || true)
      key=$(awk '/^Signed-By:/{print $2; exit}' "$S" 2>/dev/null || true)
      [ -n "$uri" ] || { echo "setup: cannot find the Debian mirror in $S" >&2; exit 1; }
      printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: %s\n' \
        "$uri" "${key:-/usr/share/keyrings/debian-archive-keyring.gpg}" |
        $SUDO tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null
      $SUDO apt-get update -qq
    fi
    sfx="-t bookworm-backports"
  fi
  # shellcheck disable=SC2086
  $SUDO apt-get install -y -qq --no-install-recommends $sfx qemu-system-x86 qemu-utils >/dev/null
  $SUDO apt-get install -y -qq --no-install-recommends \
    busybox-static nbdkit libnbd-bin fio socat etcd-server etcd-client iproute2 iputils-ping \
    xz-utils cpio gzip protobuf-compiler nftables >/dev/null
  # The Debian guest image (scripts/build-guest-debian.sh): mmdebstrap makes its root file
  # system, kmod's depmod the kernel's module list, e2fsprogs the ext4 image.
  $SUDO apt-get install -y -qq --no-install-recommends mmdebstrap kmod e2fsprogs >/dev/null
  # The in-kernel traffic classifier: clang compiles it (net's build.rs, with libbpf-dev's
  # headers), bpftool loads it and reads its maps, tc attaches it; nfdump's nfcapd is the
  # IPFIX collector of the traffic tests.
  $SUDO apt-get install -y -qq --no-install-recommends \
    clang llvm libbpf-dev bpftool nfdump >/dev/null
  # libvirt for the multi-site tests (a real libvirtd runs in a test namespace). The
  # -sysv variant avoids upgrading systemd, which is not PID 1 here.
  $SUDO apt-get install -y -qq --no-install-recommends \
    libvirt-daemon-system libvirt-clients libvirt-daemon-system-sysv >/dev/null
  # The dashboard's browser tests: Debian's Chromium, driven headless over WebDriver by
  # chromedriver (nothing downloads a browser).
  $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
  # The VNC baseline of `vinfra bench terminal`: QEMU's VNC server behind websockify.
  $SUDO apt-get install -y -qq --no-install-recommends websockify >/dev/null
fi

# The classifier attaches at the kernel's tcx hooks (docs/NET.md), which bpftool knows
# from 7.4; bookworm has 7.1, bookworm-backports 7.5 (without it vinfra falls back to a
# clsact qdisc, slower per frame).
if ! bpftool net help 2>&1 | grep -q tcx_ingress; then
  if grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends -t bookworm-backports bpftool >/dev/null
    echo "setup: $(bpftool version | head -1) (bookworm-backports, for tcx)"
  else
    echo "setup: bpftool without tcx and no bookworm-backports: the classifier uses clsact" >&2
  fi
fi

# ... driven by the vncdotool VNC client library (PyPI), in its own venv so that the
# system's Python stays as Debian made it.
VNC_VENV=/var/cache/vinfra/vnc-venv
VNCDOTOOL_VERSION=1.4.2
if ! "$VNC_VENV/bin/python3" -c "import vncdotool, importlib.metadata as m; assert m.version('vncdotool') == '$VNCDOTOOL_VERSION'" 2>/dev/null; then
  $SUDO mkdir -p "$(dirname "$VNC_VENV")"
  $SUDO python3 -m venv "$VNC_VENV"
  $SUDO "$VNC_VENV/bin/pip" install --quiet --disable-pip-version-check "vncdotool==$VNCDOTOOL_VERSION"
  echo "setup: vncdotool $VNCDOTOOL_VERSION in $VNC_VENV"
fi

# Both halves of QEMU must be present: the conflict above is silent otherwise.
for b in $BINS; do
  command -v "$b" >/dev/null 2>&1 || { echo "setup: $b missing after install" >&2; exit 1; }
done
echo "setup: $(qemu-system-x86_64 --version | head -1); $(qemu-img --version | head -1)"
