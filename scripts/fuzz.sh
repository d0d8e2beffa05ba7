#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS each (default 10).
# Usage: scripts/fuzz.sh [SECONDS]
set -euo pipefail

seconds="${1:-10}"
case "$seconds" in
    '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/../fuzz"

# Sanitizer builds on nightly: keep them apart from the workspace's target
# dir, and outside the clone so CI runs in fresh clones reuse them.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$HOME/.cache/ferry/fuzz-target}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz..." >&2
    cargo install cargo-fuzz --locked
fi

# The filesystem walkers start from real, tiny filesystems: a fuzzer
# does not find ext4's, FAT's or NTFS's structure from nothing. Built once
# per corpus directory (mkfs.ext4, mkfs.vfat, mkntfs and wimapply are test
# dependencies).
seed_filesystems() {
    local work
    work=$(mktemp -d)
    mkdir -p "$work/root/dir/sub" corpus/layout_ext4 corpus/layout_fat corpus/layout_partitions
    echo hello >"$work/root/dir/file"
    head -c 20000 /dev/zero | tr '\0' 'x' >"$work/root/dir/sub/big"
    ln -s dir/file "$work/root/link"
    PATH="$PATH:/usr/sbin:/sbin"
    if [ -z "$(ls -A corpus/layout_ext4)" ]; then
        mkfs.ext4 -q -F -b 1024 -N 16 -O ^has_journal,^resize_inode -d "$work/root" corpus/layout_ext4/extents 128K
        mkfs.ext4 -q -F -b 1024 -N 16 -O ^has_journal,^resize_inode,^extent,^64bit -d "$work/root" corpus/layout_ext4/blockmap 128K
    fi
    if [ -z "$(ls -A corpus/layout_fat)" ]; then
        mkfs.vfat -C corpus/layout_fat/fat12 64 >/dev/null
        MTOOLS_SKIP_CHECK=1 mcopy -s -i corpus/layout_fat/fat12 "$work/root/dir" ::/
    fi
    if [ -z "$(ls -A corpus/layout_ntfs 2>/dev/null)" ]; then
        mkdir -p corpus/layout_ntfs
        # The smallest NTFS mkntfs makes, 512-byte clusters, with the tree
        # applied by wimapply (no mount); and its head alone (boot sector,
        # MFT, root index), which the target pads to the volume's size.
        truncate -s 1100K corpus/layout_ntfs/tree
        mkntfs -F -f -Q -q -c 512 corpus/layout_ntfs/tree >/dev/null 2>&1
        wimcapture "$work/root" "$work/tree.wim" --compress=none >/dev/null
        wimapply "$work/tree.wim" 1 corpus/layout_ntfs/tree >/dev/null
        head -c 196608 corpus/layout_ntfs/tree >corpus/layout_ntfs/head
    fi
    if [ -z "$(ls -A corpus/layout_partitions)" ]; then
        head -c 262144 /dev/zero >corpus/layout_partitions/mbr
        printf 'label: dos\nstart=1, size=255, type=83\n' |
            sfdisk --no-reread --no-tell-kernel -q corpus/layout_partitions/mbr >/dev/null
        dd if=corpus/layout_ext4/extents of=corpus/layout_partitions/mbr bs=512 seek=1 conv=notrunc status=none
    fi
    if [ -z "$(ls -A corpus/layout_elf 2>/dev/null)" ]; then
        mkdir -p corpus/layout_elf
        # A real dynamic executable and a library (the first 64 KiB:
        # headers, dynamic section and string table are at the front).
        head -c 65536 "$(command -v ls)" >corpus/layout_elf/ls
        head -c 65536 "$(readlink -f /lib/x86_64-linux-gnu/libz.so.1 2>/dev/null || command -v ls)" >corpus/layout_elf/lib
    fi
    rm -rf "$work"
}
seed_filesystems

for target in $(cargo +nightly fuzz list); do
    echo "=== fuzzing $target for ${seconds}s ===" >&2
    cargo +nightly fuzz run "$target" -- -max_total_time="$seconds"
done
