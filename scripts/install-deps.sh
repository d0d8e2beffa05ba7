#!/usr/bin/env bash
# Install everything the test suite and the system benchmarks need.
# Idempotent: installs only what is missing, runs `apt-get update` at most once,
# and fails loudly when something cannot be installed.
set -euo pipefail

# mkfs.ext4, debugfs, sfdisk... live in sbin, not on every user's PATH.
export PATH="$PATH:/usr/sbin:/sbin"

# command -> Debian package that provides it
declare -A TOOLS=(
  [qemu-io]=qemu-utils
  [qemu-img]=qemu-utils
  [qemu-nbd]=qemu-utils
  [nbdinfo]=libnbd-bin
  [nbdcopy]=libnbd-bin
  [nbdsh]=python3-libnbd
  [nbdkit]=nbdkit
  [fio]=fio
  [openssl]=openssl
  [python3]=python3
  [sha256sum]=coreutils
  [truncate]=coreutils
  [cmp]=diffutils
  # The cache's RocksDB index: librocksdb-sys compiles RocksDB (C++) and
  # runs bindgen, which asks clang for the system include paths.
  [g++]=g++
  [clang]=clang
  # iSCSI: libiscsi's conformance suite and tools, and tgt as the
  # benchmark peer.
  [iscsi-test-cu]=libiscsi-bin
  [iscsi-ls]=libiscsi-bin
  [iscsi-perf]=libiscsi-bin
  [tgtd]=tgt
  [tgtadm]=tgt
  # The VM boot test (tests/tests/vm_boot.rs): qemu boots a Debian disk
  # from the edge; scripts/make-vm-image.sh builds that disk without loop
  # devices (debootstrap, mkfs.ext4 -d, a FAT boot partition with SYSLINUX
  # installed through mtools), and the test reads the guest's writes back
  # with debugfs/e2fsck.
  [qemu-system-x86_64]=qemu-system-x86
  [debootstrap]=debootstrap
  [mkfs.ext4]=e2fsprogs
  [debugfs]=e2fsprogs
  [e2fsck]=e2fsprogs
  [mkfs.vfat]=dosfstools
  [mcopy]=mtools
  [syslinux]=syslinux
  [sfdisk]=fdisk
  # NTFS file awareness (tests/tests/layout.rs, the layout_ntfs fuzz
  # seed): mkntfs, ntfscp and ntfsinfo write and read NTFS without a
  # mount, wimapply applies a directory tree to an unmounted NTFS image.
  [mkntfs]=ntfs-3g
  [ntfscp]=ntfs-3g
  [ntfsinfo]=ntfs-3g
  [wimcapture]=wimtools
  [wimapply]=wimtools
  [flock]=util-linux
  # The management API and metrics tests: curl speaks to the API's TLS
  # listener, promtool (Prometheus) parses /metrics.
  [curl]=curl
  [promtool]=prometheus
  [timeout]=coreutils
)

# Debian packages with no command of their own, checked with dpkg.
# libclang-dev: the libclang.so that bindgen loads at run time
# (librocksdb-sys's `bindgen-runtime`), with clang's builtin headers.
# qemu-block-extra: qemu's iSCSI driver (iscsi:// URLs in qemu-img/qemu-io).
# syslinux-common: mbr.bin for the VM image's boot sector.
# ipxe: ipxe.lkrn, the network boot stage of `ferry staging-image`.
LIB_PKGS=(
  libclang-dev
  qemu-block-extra
  syslinux-common
  ipxe
)

pkg_installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

missing=()
for tool in "${!TOOLS[@]}"; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    missing+=("${TOOLS[$tool]}")
  fi
done

for pkg in "${LIB_PKGS[@]}"; do
  if ! pkg_installed "$pkg"; then
    missing+=("$pkg")
  fi
done

if ((${#missing[@]})); then
  # De-duplicate package names.
  mapfile -t pkgs < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "install-deps: installing ${pkgs[*]}"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
  fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${pkgs[@]}"
  # qemu-block-extra can pull in a qemu-utils of another build; the
  # modules only load into the qemu-img/qemu-io/qemu-system of the same
  # version.
  if printf '%s\n' "${pkgs[@]}" | grep -qxE 'qemu-block-extra|qemu-system-x86'; then
    $SUDO apt-get install -y -q --no-install-recommends qemu-utils qemu-system-x86 qemu-block-extra
  fi
fi

# Verify: every tool must be there now.
for tool in "${!TOOLS[@]}"; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "install-deps: ERROR: $tool still missing after installing ${TOOLS[$tool]}" >&2
    exit 1
  fi
done
for pkg in "${LIB_PKGS[@]}"; do
  if ! pkg_installed "$pkg"; then
    echo "install-deps: ERROR: package $pkg still missing after installing it" >&2
    exit 1
  fi
done
# nbdsh is `python3 -m nbd` with python3 taken from PATH; the bindings live in
# Debian's python (/usr/bin/python3), not in a pyenv/venv one that may shadow
# it, so the tests run nbdsh with /usr/bin first on PATH. Check it the same way.
if ! PATH="/usr/bin:$PATH" nbdsh -c 'pass' >/dev/null 2>&1; then
  echo "install-deps: ERROR: nbdsh cannot start (python3-libnbd broken?)" >&2
  PATH="/usr/bin:$PATH" nbdsh -c 'pass' >&2 || true
  exit 1
fi
# qemu-img must load the iSCSI driver (same build as qemu-block-extra).
if ! qemu-img --help 2>/dev/null | grep -q ' iscsi'; then
  echo "install-deps: ERROR: qemu-img has no iscsi driver (qemu-utils and qemu-block-extra versions differ?)" >&2
  exit 1
fi
if ! qemu-system-x86_64 -drive format=help 2>/dev/null | grep -q ' iscsi'; then
  echo "install-deps: ERROR: qemu-system-x86_64 has no iscsi driver (qemu-system-x86 and qemu-block-extra versions differ?)" >&2
  exit 1
fi
# fio must have its NBD engine (libnbd-backed).
if ! fio --enghelp=nbd >/dev/null 2>&1; then
  echo "install-deps: ERROR: fio lacks the nbd ioengine" >&2
  exit 1
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "install-deps: installing cargo-nextest"
  cargo install cargo-nextest --locked
  cargo nextest --version >/dev/null
fi

echo "install-deps: all dependencies present"
