#!/usr/bin/env bash
# Build, once, a bootable Debian 12 disk for booting VMs from a ferry edge:
# the small one-shot image tests/tests/vm_boot.rs boots (and that you can boot
# by hand, see README "Booting a VM from the edge"), or, with --stock, a
# Debian that boots the usual way, for the boot benchmark
# (benches/system/boot-bench.sh).
#
#   scripts/make-vm-image.sh [--stock] [OUT]
#
# Prints the cached image's path as the last line of stdout (logs go to
# stderr); with OUT, also copies the image (sparse) to OUT.
#
# The default image: a 2 GiB sparse raw disk, MBR partition table:
#   p1  64 MiB FAT16, bootable: SYSLINUX (mbr.bin + ldlinux.sys), the kernel
#       and a small initramfs (virtio, SCSI and ext4 modules only)
#   p2  ext4 root, label ferry-root: Debian 12 --variant=minbase from
#       deb.debian.org, with linux-image-amd64 (modules, so the root is a
#       real installed system) and /usr/local/sbin/ferry-boot-check
#
# Why the disk's own bootloader rather than qemu -kernel/-initrd: the whole
# boot chain (SeaBIOS int13 reads of the MBR, SYSLINUX, the kernel and the
# initramfs, then the kernel's virtio-blk reads of the root filesystem) then
# comes over the network disk, so the test proves a VM boots from ferry with
# nothing from the host but the firmware. It costs a few seconds of BIOS
# reads over the WAN; that is part of the figure worth measuring.
#
# Why a one-shot init (init=/usr/local/sbin/ferry-boot-check) rather than
# systemd: under software emulation (TCG) a systemd boot takes minutes; the
# check script exercises what matters (root mounted read-write, files read
# and written through the block device, flushed) in seconds. It:
#   - remounts / read-write, reads /etc/ferry-image-id,
#   - writes a fresh random token to /var/lib/ferry/boot-token, syncs,
#   - remounts / read-only (ext4 checkpoints its journal, so the file is in
#     place on disk for debugfs on the host, no journal replay needed),
#   - prints `FERRY-BOOT-OK image=<id> token=<token>` on ttyS0, and
#   - powers off (sysrq o; qemu runs with -no-reboot, so a panic ends it too).
#
# The --stock image boots like an installed Debian, so that its read pattern
# is a real boot's (thousands of small serial reads: the boot loader's, the
# initramfs's, then systemd opening units, binaries and libraries):
#   p1  ext4 root, label ferry-root, the whole disk from 1 MiB: Debian 12
#       minbase with systemd-sysv, udev, linux-image-amd64, open-iscsi and
#       the stock initramfs (MODULES=most; it logs in to an iSCSI root when
#       booted diskless through iPXE, see `ferry staging-image`), and
#       /boot/grub (GRUB's modules, grub.cfg)
#   GRUB for BIOS: boot.img in the MBR and core.img in the gap before p1,
#       loading its modules and grub.cfg from /boot/grub on p1, as
#       grub-install lays them out
#   systemd up to multi-user.target, where ferry-boot-marker.service writes
#   a token to /var/lib/ferry/boot-token, syncs, prints
#   `FERRY-BOOT-OK image=<id> token=<token> uptime=<s>` on ttyS0 and powers
#   off.
# grub-install needs a block device; instead `grub-mkimage` builds core.img
# in the guest and dd places it at sector 1, where boot.img's default
# kernel sector and core.img's default block list point, so no setup step
# has to patch either.
#
# Built without loop devices or mounts (containers often have neither):
# debootstrap into a directory, `mkfs.ext4 -d` populates the root partition
# image, `mkfs.vfat` + mtools + `syslinux --install` (which works on an
# unmounted image) make the boot partition, and dd assembles the disk.
#
# Cached in $HOME/.cache/ferry/vm/<hash of this script>/disk.img, built in a
# temp dir next to it and moved into place atomically, under a lock, so
# concurrent callers build it once. Needs root (sudo when not root).
set -euo pipefail

FLAVOR=oneshot
if [ "${1:-}" = "--stock" ]; then
  FLAVOR=stock
  shift
fi
SCRIPT=$(readlink -f "$0")
HASH=$(sha256sum "$SCRIPT" | cut -c1-16)
CACHE_ROOT=${FERRY_VM_CACHE:-$HOME/.cache/ferry/vm}
DEST=$CACHE_ROOT/$HASH
[ "$FLAVOR" = oneshot ] || DEST=$CACHE_ROOT/$HASH-$FLAVOR
IMAGE=$DEST/disk.img
OUT=${1:-}

MIRROR=${FERRY_VM_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
DISK_SIZE_MIB=2048
BOOT_START_MIB=1
BOOT_SIZE_MIB=64
ROOT_START_MIB=$((BOOT_START_MIB + BOOT_SIZE_MIB))
ROOT_SIZE_MIB=$((DISK_SIZE_MIB - ROOT_START_MIB))
DEBOOTSTRAP_TIMEOUT=${FERRY_VM_DEBOOTSTRAP_TIMEOUT:-1200}
LOCK_TIMEOUT=${FERRY_VM_LOCK_TIMEOUT:-1800}

log() { echo "make-vm-image: $*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi

deliver() {
  if [ -n "$OUT" ]; then
    cp --sparse=always "$IMAGE" "$OUT"
    log "copied to $OUT"
  fi
  echo "$IMAGE"
}

if [ -f "$IMAGE" ]; then
  deliver
  exit 0
fi

TOOLS="debootstrap mkfs.ext4 e2fsck sfdisk flock timeout"
[ "$FLAVOR" = oneshot ] && TOOLS="$TOOLS mkfs.vfat mcopy syslinux"
for t in $TOOLS; do
  command -v "$t" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$t" >/dev/null 2>&1 ||
    die "missing $t: run scripts/install-deps.sh"
done
export PATH="$PATH:/usr/sbin:/sbin"
MBR_BIN=/usr/lib/syslinux/mbr/mbr.bin
if [ "$FLAVOR" = oneshot ] && [ ! -f "$MBR_BIN" ]; then
  die "missing $MBR_BIN (syslinux-common): run scripts/install-deps.sh"
fi
if [ "$FLAVOR" = stock ]; then
  # The whole disk is the root partition; GRUB's core.img sits in the gap.
  ROOT_START_MIB=1
  ROOT_SIZE_MIB=$((DISK_SIZE_MIB - ROOT_START_MIB))
fi

mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/.lock"
log "waiting for the build lock ($CACHE_ROOT/.lock)"
flock -w "$LOCK_TIMEOUT" 9 || die "could not take $CACHE_ROOT/.lock within ${LOCK_TIMEOUT}s"
if [ -f "$IMAGE" ]; then # built by another caller meanwhile
  deliver
  exit 0
fi

START=$SECONDS
WORK=$(mktemp -d "$CACHE_ROOT/build.XXXXXX")
cleanup() {
  # debootstrap may leave /proc and /sys mounted in the chroot on failure.
  for m in proc sys dev/pts dev; do
    if mountpoint -q "$WORK/root/$m" 2>/dev/null; then
      $SUDO umount -l "$WORK/root/$m" || true
    fi
  done
  $SUDO rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT
ROOT=$WORK/root

INCLUDE=linux-image-amd64,initramfs-tools,zstd
# grub-pc-bin, not grub-pc: the binaries and modules, without the package
# whose postinst wants to grub-install onto a disk.
# open-iscsi: the initramfs logs in to an iSCSI root when a network boot
# stage (iPXE, `ferry staging-image`) left its firmware table (iBFT).
[ "$FLAVOR" = stock ] && INCLUDE=$INCLUDE,systemd-sysv,udev,grub-pc-bin,open-iscsi
log "debootstrap $SUITE (minbase + $INCLUDE) from $MIRROR into $ROOT (timeout ${DEBOOTSTRAP_TIMEOUT}s)"
# initramfs-tools is configured before the kernel's postinst builds the
# initramfs: --include installs both in one go, so the config goes in after
# and the initramfs is rebuilt once below.
if ! $SUDO timeout --kill-after=30 "$DEBOOTSTRAP_TIMEOUT" debootstrap \
  --variant=minbase --arch=amd64 --include="$INCLUDE" \
  "$SUITE" "$ROOT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1; then
  tail -n 40 "$WORK/debootstrap.log" >&2 || true
  tail -n 40 "$ROOT/debootstrap/debootstrap.log" >&2 2>/dev/null || true
  die "debootstrap failed or timed out"
fi

log "configuring the guest"
IMAGE_ID="ferry-vm-$HASH"
[ "$FLAVOR" = oneshot ] || IMAGE_ID="$IMAGE_ID-$FLAVOR"
$SUDO tee "$ROOT/etc/ferry-image-id" >/dev/null <<<"$IMAGE_ID"
$SUDO tee "$ROOT/etc/hostname" >/dev/null <<<"ferry-vm"
$SUDO tee "$ROOT/etc/fstab" >/dev/null <<<"LABEL=ferry-root / ext4 defaults 0 1"
$SUDO mkdir -p "$ROOT/var/lib/ferry"

configure_oneshot() {
  # Only what this VM needs in the initramfs: a smaller initramfs is fewer
  # bytes over the WAN and a faster boot.
  $SUDO tee "$ROOT/etc/initramfs-tools/conf.d/ferry.conf" >/dev/null <<'EOF'
MODULES=list
COMPRESS=zstd
EOF
  $SUDO tee -a "$ROOT/etc/initramfs-tools/modules" >/dev/null <<'EOF'
virtio_pci
virtio_blk
virtio_scsi
sd_mod
ext4
crc32c_generic
EOF
  $SUDO tee "$ROOT/usr/local/sbin/ferry-boot-check" >/dev/null <<'EOF'
#!/bin/sh
# One-shot init for the ferry VM boot test (see scripts/make-vm-image.sh).
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
con=/dev/ttyS0
say() { echo "ferry-boot-check: $*" >"$con"; }
fail() {
  say "FAILED: $*"
  echo "FERRY-BOOT-FAILED $*" >"$con"
  sync
  echo o >/proc/sysrq-trigger
  sleep 10
  exit 1
}
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sys /sys 2>/dev/null
mount -o remount,rw / || fail "remount rw"
id=$(cat /etc/ferry-image-id) || fail "read /etc/ferry-image-id"
token=$(cat /proc/sys/kernel/random/uuid) || fail "make a token"
mkdir -p /var/lib/ferry || fail "mkdir"
echo "$token" >/var/lib/ferry/boot-token.tmp || fail "write token"
mv /var/lib/ferry/boot-token.tmp /var/lib/ferry/boot-token || fail "rename token"
sync
[ "$(cat /var/lib/ferry/boot-token)" = "$token" ] || fail "token read back differs"
umount /sys 2>/dev/null
mount -o remount,ro / || fail "remount ro"
sync
echo "FERRY-BOOT-OK image=$id token=$token" >"$con"
echo o >/proc/sysrq-trigger
sleep 10
EOF
  $SUDO chmod 0755 "$ROOT/usr/local/sbin/ferry-boot-check"
}

configure_stock() {
  # The stock initramfs (MODULES=most) is kept: its size and read pattern
  # are what a real Debian boot costs.
  $SUDO tee "$ROOT/usr/local/sbin/ferry-boot-marker" >/dev/null <<'EOF'
#!/bin/sh
# Marks a finished boot (see scripts/make-vm-image.sh --stock).
set -e
id=$(cat /etc/ferry-image-id)
token=$(cat /proc/sys/kernel/random/uuid)
mkdir -p /var/lib/ferry
echo "$token" >/var/lib/ferry/boot-token.tmp
mv /var/lib/ferry/boot-token.tmp /var/lib/ferry/boot-token
sync
up=$(cut -d' ' -f1 /proc/uptime)
echo "FERRY-BOOT-OK image=$id token=$token uptime=$up" >/dev/ttyS0
systemctl --no-block poweroff
EOF
  $SUDO chmod 0755 "$ROOT/usr/local/sbin/ferry-boot-marker"
  # Ordered after multi-user.target (which then does not order itself after
  # it), so it runs once the boot a user would log in to has finished.
  $SUDO tee "$ROOT/etc/systemd/system/ferry-boot-marker.service" >/dev/null <<'EOF'
[Unit]
Description=ferry boot marker
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/ferry-boot-marker

[Install]
WantedBy=multi-user.target
EOF
  $SUDO mkdir -p "$ROOT/etc/systemd/system/multi-user.target.wants"
  $SUDO ln -sf /etc/systemd/system/ferry-boot-marker.service \
    "$ROOT/etc/systemd/system/multi-user.target.wants/ferry-boot-marker.service"
  # Sourced by the initramfs's iSCSI script (local-top/iscsi): with an iBFT
  # (the table iPXE leaves when it sanboots an iSCSI disk) it logs in from
  # there, so one image boots from a local disk and diskless. Without one
  # the script does nothing.
  $SUDO tee "$ROOT/etc/iscsi/iscsi.initramfs" >/dev/null <<'EOF'
if modprobe -q iscsi_ibft 2>/dev/null && [ -d /sys/firmware/ibft/target0 ]; then
  ISCSI_AUTO=true
fi
EOF
}

configure_$FLAVOR

KVER=$(basename "$(ls -d "$ROOT"/lib/modules/*/ | head -n 1)")
[ -n "$KVER" ] || die "no kernel installed in the guest"
log "rebuilding the initramfs for $KVER"
if ! $SUDO timeout 600 chroot "$ROOT" update-initramfs -c -k "$KVER" >"$WORK/initramfs.log" 2>&1; then
  # -c fails when it exists already; -u then.
  $SUDO timeout 600 chroot "$ROOT" update-initramfs -u -k "$KVER" >>"$WORK/initramfs.log" 2>&1 ||
    {
      tail -n 40 "$WORK/initramfs.log" >&2
      die "update-initramfs failed"
    }
fi

if [ "$FLAVOR" = stock ]; then
  log "installing GRUB's files into /boot/grub and building core.img"
  $SUDO mkdir -p "$ROOT/boot/grub"
  $SUDO cp -a "$ROOT/usr/lib/grub/i386-pc" "$ROOT/boot/grub/"
  $SUDO tee "$ROOT/boot/grub/grub.cfg" >/dev/null <<EOF
serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
set timeout=0
menuentry 'Debian GNU/Linux (ferry)' {
  linux /boot/vmlinuz-$KVER root=LABEL=ferry-root ro console=ttyS0,115200 quiet
  initrd /boot/initrd.img-$KVER
}
EOF
  # core.img: the disk and MBR-partition drivers and ext2 (which reads
  # ext4), enough to find the prefix; everything else loads from there.
  if ! $SUDO chroot "$ROOT" grub-mkimage -O i386-pc -o /tmp/core.img \
    -p '(hd0,msdos1)/boot/grub' biosdisk part_msdos ext2 >"$WORK/grub.log" 2>&1; then
    cat "$WORK/grub.log" >&2
    die "grub-mkimage failed"
  fi
  $SUDO cat "$ROOT/tmp/core.img" >"$WORK/core.img"
  $SUDO cat "$ROOT/usr/lib/grub/i386-pc/boot.img" >"$WORK/boot.img"
  $SUDO rm -f "$ROOT/tmp/core.img"
  CORE_SECTORS=$((($(stat -c %s "$WORK/core.img") + 511) / 512))
  [ $((1 + CORE_SECTORS)) -le $((ROOT_START_MIB * 2048)) ] ||
    die "core.img ($CORE_SECTORS sectors) does not fit before the root partition"
fi
$SUDO chroot "$ROOT" apt-get clean >/dev/null 2>&1 || true
$SUDO rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT/debootstrap"

if [ "$FLAVOR" = oneshot ]; then
  log "building the boot partition (FAT16, SYSLINUX)"
  BOOT=$WORK/boot.part
  mkfs.vfat -F 16 -n FERRYBOOT -C "$BOOT" $((BOOT_SIZE_MIB * 1024)) >/dev/null
  # (vmlinuz is mode 0600: read it as root, write it as the caller.)
  $SUDO cat "$ROOT/boot/vmlinuz-$KVER" >"$WORK/vmlinuz"
  $SUDO cat "$ROOT/boot/initrd.img-$KVER" >"$WORK/initrd.img"
  cat >"$WORK/syslinux.cfg" <<'EOF'
SERIAL 0 115200
DEFAULT ferry
PROMPT 0
TIMEOUT 0
LABEL ferry
  KERNEL /vmlinuz
  INITRD /initrd.img
  APPEND root=LABEL=ferry-root ro console=ttyS0,115200 init=/usr/local/sbin/ferry-boot-check panic=-1
EOF
  MTOOLS_SKIP_CHECK=1 mcopy -i "$BOOT" "$WORK/vmlinuz" "$WORK/initrd.img" "$WORK/syslinux.cfg" ::/
  syslinux --install "$BOOT"
fi

log "building the root partition (ext4, ${ROOT_SIZE_MIB} MiB)"
ROOTP=$WORK/root.part
truncate -s "${ROOT_SIZE_MIB}M" "$ROOTP"
$SUDO mkfs.ext4 -q -L ferry-root -d "$ROOT" "$ROOTP"
if ! $SUDO e2fsck -fn "$ROOTP" >"$WORK/e2fsck.log" 2>&1; then
  cat "$WORK/e2fsck.log" >&2
  die "the new root filesystem does not check clean"
fi

log "assembling the disk"
DISK=$WORK/disk.img
truncate -s "${DISK_SIZE_MIB}M" "$DISK"
if [ "$FLAVOR" = oneshot ]; then
  sfdisk --quiet "$DISK" <<EOF
label: dos
start=${BOOT_START_MIB}MiB, size=${BOOT_SIZE_MIB}MiB, type=6, bootable
start=${ROOT_START_MIB}MiB, size=${ROOT_SIZE_MIB}MiB, type=83
EOF
  dd if="$MBR_BIN" of="$DISK" bs=440 count=1 conv=notrunc status=none
  dd if="$BOOT" of="$DISK" bs=1M seek="$BOOT_START_MIB" conv=notrunc,sparse status=none
else
  sfdisk --quiet "$DISK" <<EOF
label: dos
start=${ROOT_START_MIB}MiB, size=${ROOT_SIZE_MIB}MiB, type=83, bootable
EOF
  # boot.img's code only (the partition table after byte 440 stays);
  # core.img at sector 1, where boot.img looks for it.
  dd if="$WORK/boot.img" of="$DISK" bs=440 count=1 conv=notrunc status=none
  dd if="$WORK/core.img" of="$DISK" bs=512 seek=1 conv=notrunc status=none
fi
dd if="$ROOTP" of="$DISK" bs=1M seek="$ROOT_START_MIB" conv=notrunc,sparse status=none
sync "$DISK"

mkdir -p "$DEST"
mv "$DISK" "$DEST/disk.img.tmp"
cat >"$DEST/info" <<EOF
image_id=$IMAGE_ID
flavor=$FLAVOR
kernel=$KVER
root_offset=$((ROOT_START_MIB * 1024 * 1024))
token_path=/var/lib/ferry/boot-token
build_seconds=$((SECONDS - START))
EOF
mv "$DEST/disk.img.tmp" "$IMAGE"
log "built $IMAGE in $((SECONDS - START))s ($(du -h "$IMAGE" | cut -f1) allocated of ${DISK_SIZE_MIB} MiB)"
deliver
