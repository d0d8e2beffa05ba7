//! File awareness against real filesystems: images built here with the
//! real tools (`mkfs.ext4 -d`, `debugfs`, `mkfs.vfat`, mtools, `sfdisk`),
//! mapped by `prefetch::layout`, and checked against what those tools
//! say: debugfs's block lists, mshowfat's cluster runs, and the files'
//! bytes read back through the extents found.

#![allow(clippy::cast_possible_truncation)] // offsets into in-memory test images

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use ferry_tests::disk::{build_disk, mtools};
use ferry_tests::{cmd, pattern_bytes, run, tempdir};
use prefetch::layout::{boot_order, scan, FileIndex, FileKind, Limits, VolumeLayout};

/// The file's bytes as its extents on `disk` hold them.
fn read_through_extents(disk: &[u8], layout: &VolumeLayout, fs: usize, path: &str) -> Vec<u8> {
    let f = layout
        .resolve(fs, path)
        .unwrap_or_else(|| panic!("{path} not found on filesystem {fs}"));
    f.read(&disk, 0, f.size).expect("readable")
}

/// debugfs's `stat` block list of `path`: data blocks by logical block,
/// indirect and extent-tree blocks left out.
fn debugfs_blocks(image: &Path, path: &str) -> Vec<u64> {
    let out = run(cmd("debugfs")
        .arg("-R")
        .arg(format!("stat {path}"))
        .arg(image));
    let list = out
        .split_once("BLOCKS:")
        .or_else(|| out.split_once("EXTENTS:"))
        .unwrap_or_else(|| panic!("no block list in debugfs's stat of {path}:\n{out}"))
        .1;
    let mut blocks = BTreeMap::new();
    for item in list.split(|c: char| c == ',' || c.is_whitespace()) {
        let Some((logical, physical)) = item.trim().split_once(':') else {
            continue;
        };
        let logical = logical.trim_matches(|c| c == '(' || c == ')');
        if logical.chars().any(|c| c.is_ascii_alphabetic()) {
            continue; // (IND), (DIND), (ETB0)...
        }
        let range = |s: &str| -> (u64, u64) {
            match s.split_once('-') {
                Some((a, b)) => (a.parse().unwrap(), b.parse().unwrap()),
                None => (s.parse().unwrap(), s.parse().unwrap()),
            }
        };
        let (l0, l1) = range(logical);
        let (p0, _) = range(physical);
        for i in 0..=l1 - l0 {
            blocks.insert(l0 + i, p0 + i);
        }
    }
    blocks.into_values().collect()
}

fn our_blocks(layout: &VolumeLayout, fs: usize, path: &str, block: u64) -> Vec<u64> {
    let start = layout.filesystems[fs].start;
    let f = layout.resolve(fs, path).unwrap();
    f.extents
        .iter()
        .flat_map(|&(s, l)| (s - start) / block..(s - start + l) / block)
        .collect()
}

#[test]
fn an_mbr_disk_of_fat_and_ext4_is_mapped_as_debugfs_and_mshowfat_see_it() {
    let dir = tempdir();
    let disk = build_disk(dir.path());
    let layout = scan(&disk.bytes, Limits::default());
    assert!(layout.warnings.is_empty(), "{:?}", layout.warnings);
    let kinds: Vec<(&str, u64)> = layout
        .filesystems
        .iter()
        .map(|f| (f.kind, f.start))
        .collect();
    assert_eq!(kinds, [("fat", 1 << 20), ("ext4", 17 << 20)]);

    // Every file's bytes, read through the extents found, are the file.
    for (path, want) in &disk.files {
        let fs = usize::from(
            !path.starts_with("/EFI")
                && !["/syslinux.cfg", "/vmlinuz", "/initrd.img"].contains(path),
        );
        let got = read_through_extents(&disk.bytes, &layout, fs, path);
        assert!(
            got == *want,
            "{path}: {} bytes read through its extents differ from the file",
            got.len()
        );
    }

    // ext4: block for block what debugfs says, fragmented or not.
    for path in [
        "/usr/bin/big",
        "/frag",
        "/deep/a/b/c/d/e/file",
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
    ] {
        assert_eq!(
            our_blocks(&layout, 1, path, 4096),
            debugfs_blocks(&disk.ext4, path),
            "{path}"
        );
    }
    let frag = layout.resolve(1, "/frag").unwrap();
    assert!(
        frag.extents.len() > 3,
        "the fragmented file has {} extents",
        frag.extents.len()
    );
    assert_eq!(
        layout.resolve(1, "/sbin/init").unwrap().path,
        "/usr/sbin/myinit",
        "symlinks followed"
    );
    assert_eq!(
        layout
            .resolve(1, "/lib/x86_64-linux-gnu/libc.so.6")
            .unwrap()
            .kind,
        FileKind::Regular
    );
    assert!(layout.resolve(1, "/many/f00").is_none(), "deleted");

    // FAT: as many runs of clusters as mshowfat lists.
    for path in ["/initrd.img", "/vmlinuz"] {
        let out = run(mtools("mshowfat")
            .arg("-i")
            .arg(&disk.fat)
            .arg(format!("::{path}")));
        let runs = out.matches('<').count();
        assert_eq!(
            layout.resolve(0, path).unwrap().extents.len(),
            runs,
            "{path}: mshowfat says {out}"
        );
    }
    assert_eq!(
        layout.resolve(0, "/initrd.img").unwrap().extents.len(),
        2,
        "fragmented around the spacer"
    );

    // A read in a file finds it; its group is the rest of it.
    let index = FileIndex::new(&layout, 64 << 10);
    let big = layout.resolve(1, "/usr/bin/big").unwrap();
    let (file, ranges) = index.group(big.extents[0].0 + 100_000, 64 << 20).unwrap();
    assert_eq!(index.path(file), Some("/usr/bin/big"));
    let pushed: u64 = ranges.iter().map(|r| r.1).sum();
    assert!(
        ((3 << 20) - 128 * 1024..=3 << 20).contains(&pushed),
        "{pushed}"
    );
}

#[test]
fn a_first_boot_is_planned_from_the_boot_loaders_configuration() {
    let dir = tempdir();
    let disk = build_disk(dir.path());
    let layout = scan(&disk.bytes, Limits::default());
    let order = boot_order(&disk.bytes, &layout, 64 << 10);
    let files: Vec<&str> = order.files.iter().map(|f| f.1.as_str()).collect();
    let at = |p: &str| {
        files
            .iter()
            .position(|f| *f == p)
            .unwrap_or_else(|| panic!("{p} not in {files:?}"))
    };
    assert!(at("/syslinux.cfg") < at("/vmlinuz"));
    assert!(at("/vmlinuz") < at("/initrd.img"));
    assert!(
        at("/initrd.img") < at("/usr/sbin/myinit"),
        "init= of the configuration, through /sbin/init"
    );
    assert!(at("/usr/sbin/myinit") < at("/etc/fstab"));
    assert!(!files.contains(&"/usr/bin/big"), "not a boot file");
    assert_eq!(order.chunks[0], 0, "the MBR first");
    let mut seen = std::collections::HashSet::new();
    assert!(
        order.chunks.iter().all(|c| seen.insert(*c)),
        "each chunk once"
    );
    // The kernel's chunks come before the initramfs's.
    let chunk_of = |p: &str, fs| layout.resolve(fs, p).unwrap().extents[0].0 / (64 << 10);
    let pos = |c: u64| order.chunks.iter().position(|&x| x == c).unwrap();
    assert!(pos(chunk_of("/vmlinuz", 0)) < pos(chunk_of("/initrd.img", 0)));
}

#[test]
fn ext2_style_block_maps_through_double_indirect_blocks() {
    let dir = tempdir();
    let root = dir.path().join("root");
    let data = pattern_bytes(6 << 20, 11);
    fs::create_dir_all(&root).unwrap();
    fs::write(root.join("big"), &data).unwrap();
    fs::write(root.join("small"), b"small").unwrap();
    let img = dir.path().join("ind.img");
    run(cmd("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-O",
            "^extent,^64bit,^flex_bg",
            "-b",
            "1024",
            "-d",
        ])
        .arg(&root)
        .arg(&img)
        .arg("16M"));
    let bytes = fs::read(&img).unwrap();
    let layout = scan(&bytes, Limits::default());
    assert!(layout.warnings.is_empty(), "{:?}", layout.warnings);
    assert_eq!(layout.filesystems[0].kind, "ext4");
    assert_eq!(
        our_blocks(&layout, 0, "/big", 1024),
        debugfs_blocks(&img, "/big")
    );
    assert!(read_through_extents(&bytes, &layout, 0, "/big") == data);
    assert_eq!(read_through_extents(&bytes, &layout, 0, "/small"), b"small");
}

#[test]
fn a_damaged_filesystem_is_a_warning_and_the_others_are_still_mapped() {
    let dir = tempdir();
    let disk = build_disk(dir.path());
    // ext4's root directory block, overwritten with garbage.
    let mut bytes = disk.bytes.clone();
    let clean = scan(&bytes, Limits::default());
    let root = clean.resolve(1, "/").unwrap().extents[0].0 as usize;
    bytes[root..root + 4096].copy_from_slice(&pattern_bytes(4096, 99));
    let layout = scan(&bytes, Limits::default());
    assert_eq!(layout.filesystems.len(), 1, "FAT is still mapped");
    assert!(
        layout
            .warnings
            .iter()
            .any(|w| w.contains("partition 2 (ext4)") && w.contains("not file-aware")),
        "{:?}",
        layout.warnings
    );
    // And its superblock's geometry made absurd.
    let mut bytes = disk.bytes.clone();
    let sb = (17 << 20) + 1024;
    bytes[sb + 0x18] = 40; // block size 1024 << 40
    let layout = scan(&bytes, Limits::default());
    assert!(
        layout.warnings.iter().any(|w| w.contains("block size")),
        "{:?}",
        layout.warnings
    );
    // Garbage everywhere: nothing found, no panic.
    for seed in 0..20 {
        let junk = pattern_bytes(1 << 20, 1000 + seed);
        let layout = scan(&junk, Limits::default());
        let _ = boot_order(&junk, &layout, 64 << 10);
    }
}

/// Copies `path` from this machine into `root` at the same place: a
/// symlink as the same symlink (then what it points to), a file as its
/// bytes. Directories that are symlinks here (Debian's /lib, /lib64) must
/// exist in `root` already.
fn replicate(root: &Path, path: &Path) {
    let dir = fs::canonicalize(path.parent().unwrap()).unwrap();
    let at = root
        .join(dir.strip_prefix("/").unwrap())
        .join(path.file_name().unwrap());
    fs::create_dir_all(at.parent().unwrap()).unwrap();
    if fs::symlink_metadata(path).unwrap().file_type().is_symlink() {
        let target = fs::read_link(path).unwrap();
        if fs::symlink_metadata(&at).is_err() {
            std::os::unix::fs::symlink(&target, &at).unwrap();
        }
        let next = if target.is_absolute() {
            target
        } else {
            path.parent().unwrap().join(target)
        };
        replicate(root, &next);
    } else {
        fs::copy(path, &at).unwrap();
    }
}

#[test]
fn an_executables_application_group_is_what_ldd_loads() {
    let dir = tempdir();
    let root = dir.path().join("root");
    fs::create_dir_all(root.join("usr/lib64")).unwrap();
    std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
    std::os::unix::fs::symlink("usr/lib64", root.join("lib64")).unwrap();
    let binary = fs::canonicalize(ferry_tests::tool("curl")).unwrap();
    replicate(&root, &binary);
    // ldd: "name => /path (addr)" per library, "/path (addr)" for the loader.
    let out = run(cmd("ldd").arg(&binary));
    let mut want: Vec<String> = out
        .lines()
        .filter_map(|l| {
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| path.to_owned())
        })
        .map(|p| {
            replicate(&root, Path::new(&p));
            fs::canonicalize(&p).unwrap().display().to_string()
        })
        .collect();
    want.sort();
    want.dedup();
    assert!(want.len() >= 5, "ldd found {want:?}");
    let img = dir.path().join("root.img");
    run(cmd("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&img)
        .arg("96M"));
    let bytes = fs::read(&img).unwrap();
    let layout = scan(&bytes, Limits::default());
    assert!(layout.warnings.is_empty(), "{:?}", layout.warnings);
    let exe = layout.resolve(0, &binary.display().to_string()).unwrap();
    // Read back through its extents, holes included (mkfs.ext4 -d keeps
    // a binary's runs of zero blocks as holes).
    assert!(exe.read(&bytes, 0, exe.size).unwrap() == fs::read(&binary).unwrap());
    let i = layout.index_of(exe).unwrap();
    let mut got: Vec<String> = layout
        .group_of(i, 256)
        .into_iter()
        .map(|d| layout.files[d].path.clone())
        .collect();
    got.sort();
    assert_eq!(got, want, "{} loads what ldd says", binary.display());
    // And the index the origin's sessions use has the same group.
    let index = FileIndex::new(&layout, 64 << 10);
    let file = index.file_at(exe.extents[0].0).unwrap();
    assert_eq!(index.group_files(file).len(), want.len());
}
