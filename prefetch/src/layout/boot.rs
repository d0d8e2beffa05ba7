//! The order a boot reads a volume in, from its files alone: the plan for
//! a volume no boot profile was recorded for yet.
//!
//! The score, in full (earlier first; within a step, the order given):
//! 1. the volume's head before its first partition, at most 1 MiB, its
//!    chunks that are not all zero (the MBR and a boot loader's core,
//!    such as GRUB's in the MBR gap);
//! 2. each filesystem's metadata a mount reads first (superblock, group
//!    descriptors; boot sector, FAT and root directory; NTFS's boot
//!    sector and the head of its MFT);
//! 3. the boot loader's files (SYSLINUX/EXTLINUX, GRUB, EFI), by path;
//! 4. the kernel and initramfs the boot loader's configuration names
//!    (or, when it names none, the newest `vmlinuz*` and `initrd.img*`);
//! 5. init (the configuration's `init=`, else `/sbin/init`; a script's
//!    `#!` interpreter with it) and the libraries it loads, the dynamic
//!    loader, libc, and the `/etc` files every boot opens.
//!
//! A file comes with what opening it reads first: its directories and its
//! inode (or directory entry), then its data in file order.

use std::collections::HashSet;

use super::index::align;
use super::{read_vec, File, FileKind, Image, PartitionKind, VolumeLayout};

/// Bytes of a boot loader's configuration read, at most.
const MAX_CONFIG_BYTES: u64 = 256 << 10;
const HEAD_BYTES: u64 = 1 << 20;
/// Files of init's application group planned, at most.
const MAX_GROUP_FILES: usize = 64;

/// Files a boot of a Debian-like system opens after init starts.
const ROOT_FILES: &[&str] = &[
    "/lib64/ld-linux-x86-64.so.2",
    "/etc/ld.so.cache",
    "/lib/x86_64-linux-gnu/libc.so.6",
    "/etc/fstab",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/hostname",
    "/etc/machine-id",
    "/etc/os-release",
];

/// Chunks in the order a boot is expected to read them, and the files
/// they came from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BootOrder {
    pub chunks: Vec<u64>,
    /// (filesystem, path, size) in boot order.
    pub files: Vec<(usize, String, u64)>,
}

/// See the module docs for the score.
pub fn boot_order(img: &dyn Image, layout: &VolumeLayout, chunk_size: u32) -> BootOrder {
    // Nothing known about the volume: no guess (a blank or unknown disk's
    // head is not worth a push).
    if layout.filesystems.is_empty() {
        return BootOrder::default();
    }
    let mut b = Builder {
        layout,
        chunk: u64::from(chunk_size.max(1)),
        size: img.size(),
        seen: HashSet::new(),
        files_seen: HashSet::new(),
        out: BootOrder::default(),
    };
    let first = layout
        .partitions
        .iter()
        .filter(|p| p.kind != PartitionKind::Whole)
        .map(|p| p.start)
        .min()
        .unwrap_or(512);
    // The head's chunks that hold something (an empty MBR gap is not
    // worth a push).
    let head = first.clamp(512, HEAD_BYTES).min(b.size);
    for c in 0..head.div_ceil(b.chunk) {
        let (at, len) = (c * b.chunk, b.chunk.min(b.size - c * b.chunk));
        let used = read_vec(img, at, len as usize).map_or(true, |d| d.iter().any(|&x| x != 0));
        if used {
            b.range(at, len.min(head - at));
        }
    }
    for fs in &layout.filesystems {
        for &(s, l) in &fs.meta {
            b.range(s, l);
        }
    }
    let mut loaders: Vec<&File> = layout
        .files
        .iter()
        .filter(|f| f.kind == FileKind::Regular && is_loader(&f.path.to_ascii_lowercase()))
        .collect();
    loaders.sort_by(|a, b| (a.fs, &a.path).cmp(&(b.fs, &b.path)));
    let mut named = Vec::new();
    for f in &loaders {
        b.file(f);
        let ext = std::path::Path::new(&f.path).extension();
        if ext.is_some_and(|e| e.eq_ignore_ascii_case("cfg") || e.eq_ignore_ascii_case("conf")) {
            if let Some(text) = read_file(img, f, MAX_CONFIG_BYTES) {
                named.extend(
                    config_paths(&String::from_utf8_lossy(&text))
                        .into_iter()
                        .map(|p| (f.fs, p)),
                );
            }
        }
    }
    let mut kernels = 0;
    let mut init = None;
    for (fs, item) in named {
        match item {
            Named::Image(path) => {
                if let Some(f) = b.find_anywhere(fs, &path) {
                    b.file(f);
                    kernels += 1;
                }
            }
            Named::Init(path) => init = init.or(Some(path)),
        }
    }
    if kernels == 0 {
        for prefix in ["vmlinuz", "initrd.img", "initramfs"] {
            let newest = layout
                .files
                .iter()
                .filter(|f| f.kind == FileKind::Regular && f.size > 0)
                .filter(|f| {
                    let name = f.path.rsplit('/').next().unwrap_or("");
                    let dir = &f.path[..f.path.len() - name.len()];
                    name.starts_with(prefix) && (dir == "/" || dir == "/boot/")
                })
                .max_by(|a, b| a.path.cmp(&b.path));
            if let Some(f) = newest {
                b.file(f);
            }
        }
    }
    let root = (0..layout.filesystems.len()).find(|&fs| layout.resolve(fs, "/etc").is_some());
    if let Some(root) = root {
        let init = init.unwrap_or_else(|| "/sbin/init".into());
        if let Some(f) = layout.resolve(root, &init) {
            // A script's interpreter runs before the script is read.
            let interp = read_file(img, f, 256)
                .and_then(|head| shebang(&head))
                .and_then(|i| layout.resolve(root, &i));
            for program in std::iter::once(f).chain(interp) {
                b.file(program);
                // What it loads (its loader, its libraries, theirs).
                if let Some(i) = layout.index_of(program) {
                    for d in layout.group_of(i, MAX_GROUP_FILES) {
                        b.file(&layout.files[d]);
                    }
                }
            }
        }
        for path in ROOT_FILES {
            if let Some(f) = layout.resolve(root, path) {
                b.file(f);
            }
        }
    }
    b.out
}

struct Builder<'a> {
    layout: &'a VolumeLayout,
    chunk: u64,
    size: u64,
    seen: HashSet<u64>,
    files_seen: HashSet<(usize, &'a str)>,
    out: BootOrder,
}

impl<'a> Builder<'a> {
    fn range(&mut self, start: u64, len: u64) {
        if len == 0 || start >= self.size {
            return;
        }
        let end = start.saturating_add(len).min(self.size);
        for c in start / self.chunk..end.div_ceil(self.chunk) {
            if self.seen.insert(c) {
                self.out.chunks.push(c);
            }
        }
    }

    fn file(&mut self, f: &'a File) {
        if !self.files_seen.insert((f.fs, f.path.as_str())) {
            return;
        }
        // Its directories, root first, then its inode, then its data.
        let parts: Vec<&str> = f.path.split('/').filter(|p| !p.is_empty()).collect();
        let dirs = (0..parts.len()).map(|i| format!("/{}", parts[..i].join("/")));
        for d in dirs {
            if let Some(df) = self
                .layout
                .files
                .iter()
                .find(|x| x.fs == f.fs && x.path == d)
            {
                if let Some(m) = df.meta {
                    self.range(m, 1);
                }
                for (s, l) in align(&df.extents, self.chunk) {
                    self.range(s, l);
                }
            }
        }
        if let Some(m) = f.meta {
            self.range(m, 1);
        }
        for (s, l) in align(&f.extents, self.chunk) {
            self.range(s, l);
        }
        self.out.files.push((f.fs, f.path.clone(), f.size));
    }

    /// `path` on filesystem `fs`, else on any other (a boot loader on a
    /// boot partition naming files of the root, or the reverse).
    fn find_anywhere(&self, fs: usize, path: &str) -> Option<&'a File> {
        let n = self.layout.filesystems.len();
        std::iter::once(fs)
            .chain((0..n).filter(|&o| o != fs))
            .find_map(|fs| {
                self.layout
                    .resolve(fs, path)
                    .or_else(|| self.layout.resolve_nocase(fs, path))
            })
            .filter(|f| f.kind == FileKind::Regular)
    }
}

fn is_loader(lower: &str) -> bool {
    const DIRS: &[&str] = &[
        "/boot/grub/",
        "/grub/",
        "/efi/",
        "/syslinux/",
        "/extlinux/",
        "/boot/syslinux/",
        "/boot/extlinux/",
    ];
    const ROOT: &[&str] = &[
        "/ldlinux.sys",
        "/ldlinux.c32",
        "/syslinux.cfg",
        "/extlinux.conf",
    ];
    DIRS.iter().any(|d| lower.starts_with(d)) || ROOT.contains(&lower)
}

#[derive(Debug, PartialEq, Eq)]
enum Named {
    /// A kernel or an initramfs.
    Image(String),
    Init(String),
}

/// What a SYSLINUX or GRUB configuration names: `KERNEL`/`LINUX`/`linux`
/// and `INITRD`/`initrd` paths (several, comma- or space-separated),
/// `initrd=` and `init=` on the command line.
fn config_paths(text: &str) -> Vec<Named> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        let key = first.to_ascii_lowercase();
        let rest: Vec<&str> = words.collect();
        match key.as_str() {
            "kernel" | "linux" | "linux16" | "linuxefi" => {
                if let Some(p) = rest.first() {
                    out.push(Named::Image((*p).to_owned()));
                }
                out.extend(cmdline(&rest[1.min(rest.len())..]));
            }
            "initrd" | "initrd16" | "initrdefi" => {
                for p in rest.iter().flat_map(|w| w.split(',')) {
                    if !p.is_empty() {
                        out.push(Named::Image(p.to_owned()));
                    }
                }
            }
            "append" => out.extend(cmdline(&rest)),
            _ => {}
        }
    }
    out
}

fn cmdline(words: &[&str]) -> Vec<Named> {
    let mut out = Vec::new();
    for w in words {
        if let Some(p) = w.strip_prefix("init=") {
            out.push(Named::Init(p.to_owned()));
        } else if let Some(ps) = w.strip_prefix("initrd=") {
            out.extend(
                ps.split(',')
                    .filter(|p| !p.is_empty())
                    .map(|p| Named::Image(p.to_owned())),
            );
        }
    }
    out
}

/// The interpreter a `#!` line names.
fn shebang(head: &[u8]) -> Option<String> {
    let line = head.strip_prefix(b"#!")?;
    let line = &line[..line.iter().position(|&c| c == b'\n')?];
    let path = String::from_utf8_lossy(line)
        .split_whitespace()
        .next()?
        .to_owned();
    path.starts_with('/').then_some(path)
}

/// A file's first `max` bytes (at most its size).
pub(super) fn read_file(img: &dyn Image, f: &File, max: u64) -> Option<Vec<u8>> {
    f.read(img, 0, f.size.min(max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_script_names_its_interpreter() {
        assert_eq!(shebang(b"#!/bin/sh -e\necho"), Some("/bin/sh".into()));
        assert_eq!(
            shebang(b"#! /usr/bin/env python3\n"),
            Some("/usr/bin/env".into())
        );
        assert_eq!(shebang(b"\x7fELF"), None);
        assert_eq!(shebang(b"#!sh\n"), None);
    }

    #[test]
    fn configurations_name_kernels_initrds_and_init() {
        let syslinux = "DEFAULT ferry\nLABEL ferry\n  KERNEL /vmlinuz\n  INITRD /initrd.img\n  APPEND root=LABEL=x ro init=/usr/local/sbin/check panic=-1\n";
        assert_eq!(
            config_paths(syslinux),
            [
                Named::Image("/vmlinuz".into()),
                Named::Image("/initrd.img".into()),
                Named::Init("/usr/local/sbin/check".into())
            ]
        );
        let grub = "menuentry 'Debian' {\n\tlinux\t/boot/vmlinuz-6.1.0-28-amd64 root=UUID=x ro quiet\n\tinitrd\t/boot/initrd.img-6.1.0-28-amd64\n}\n";
        assert_eq!(
            config_paths(grub),
            [
                Named::Image("/boot/vmlinuz-6.1.0-28-amd64".into()),
                Named::Image("/boot/initrd.img-6.1.0-28-amd64".into())
            ]
        );
    }
}
