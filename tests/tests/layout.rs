//! File awareness against real filesystems: images built here with the
//! real tools (`mkfs.ext4 -d`, `debugfs`, `mkfs.vfat`, mtools, `sfdisk`;
//! `mkntfs`, `ntfscp`, `ntfstruncate` and wimlib's `wimapply`, which
//! write NTFS without a mount), mapped by `prefetch::layout`, and checked
//! against what those tools say: debugfs's block lists, mshowfat's
//! cluster runs, ntfsinfo's runlists, and the files' bytes read back
//! through the extents found.

#![allow(clippy::cast_possible_truncation)] // offsets into in-memory test images

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use ferry_tests::disk::{build_disk, mbr, mtools};
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

const NTFS_CLUSTER: u64 = 4096;

/// A fresh NTFS of `mib` MiB in `image`, clusters of 4 KiB.
fn mkntfs(image: &Path, mib: u64) {
    fs::File::create(image).unwrap().set_len(mib << 20).unwrap();
    // -F: a regular file, -Q: no zeroing or bad-sector scan, -f as -Q.
    run(cmd("mkntfs")
        .args(["-F", "-f", "-Q", "-q", "-c", "4096", "-L", "data"])
        .arg(image));
}

/// Copies `data` into the unmounted NTFS `image` as `path` (created or
/// overwritten).
fn ntfscp(image: &Path, scratch: &Path, path: &str, data: &[u8]) {
    let src = scratch.join("ntfscp-src");
    fs::write(&src, data).unwrap();
    run(cmd("ntfscp").arg("-q").arg(image).arg(&src).arg(path));
}

/// ntfsinfo's runlist of the attribute `attr` (`$DATA`,
/// `$INDEX_ALLOCATION`) of `path`: (VCN, LCN or none for a hole,
/// clusters) per run, of every piece when an attribute list splits it.
fn ntfsinfo_runs(image: &Path, path: &str, attr: &str) -> Vec<(u64, Option<u64>, u64)> {
    let out = run(cmd("ntfsinfo").arg("-F").arg(path).arg("-v").arg(image));
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    let pieces: Vec<&str> = out
        .split("Dumping attribute ")
        .filter(|s| s.starts_with(&format!("{attr} ")))
        .collect();
    assert!(
        !pieces.is_empty(),
        "no {attr} in ntfsinfo's dump of {path}:\n{out}"
    );
    pieces
        .iter()
        .flat_map(|piece| {
            let list = piece
                .split_once("Runlist:")
                .unwrap_or_else(|| panic!("{path}'s {attr} is resident:\n{piece}"))
                .1;
            list.lines()
                .skip(1) // VCN LCN Length
                .map_while(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
                    [vcn, lcn, len] => Some((hex(vcn)?, hex(lcn), hex(len)?)),
                    _ => None,
                })
        })
        .collect()
}

/// Cluster by cluster (VCN -> LCN) what ntfsinfo lists for a stream of
/// `size` bytes (clusters allocated past its end left out).
fn their_clusters(runs: &[(u64, Option<u64>, u64)], size: u64) -> BTreeMap<u64, u64> {
    let used = size.div_ceil(NTFS_CLUSTER);
    runs.iter()
        .filter_map(|&(vcn, lcn, n)| Some((vcn, lcn?, n)))
        .flat_map(|(vcn, lcn, n)| (0..n).map(move |i| (vcn + i, lcn + i)))
        .filter(|&(vcn, _)| vcn < used)
        .collect()
}

/// The same from the extents found.
fn our_clusters(layout: &VolumeLayout, fs: usize, path: &str) -> BTreeMap<u64, u64> {
    let start = layout.filesystems[fs].start;
    let f = layout
        .resolve(fs, path)
        .unwrap_or_else(|| panic!("{path} not found"));
    f.extents
        .iter()
        .zip(f.extent_offsets())
        .flat_map(|(&(s, l), at)| {
            (0..l.div_ceil(NTFS_CLUSTER))
                .map(move |i| (at / NTFS_CLUSTER + i, (s - start) / NTFS_CLUSTER + i))
        })
        .collect()
}

/// `path`'s bytes read back through its extents are `want`; or, for a
/// file kept in its file record (resident, no extents), its size is.
fn check_ntfs_file(disk: &[u8], layout: &VolumeLayout, path: &str, want: &[u8]) {
    let f = layout.resolve(0, path).unwrap();
    if f.extents.is_empty() && f.size < 1024 {
        assert_eq!(f.size, want.len() as u64, "{path}");
        return;
    }
    let got = read_through_extents(disk, layout, 0, path);
    assert!(
        got == want,
        "{path}: {} bytes read through its extents differ from the file",
        got.len()
    );
}

/// `volume` as an MBR disk's one partition (of type `kind`), at 1 MiB.
fn in_mbr_partition(dir: &Path, volume: &[u8], kind: &str) -> Vec<u8> {
    let mut bytes = vec![0u8; (1 << 20) + volume.len()];
    let size = bytes.len() as u64;
    bytes[..512].copy_from_slice(&mbr(
        dir,
        size,
        &format!("start=2048, size={}, type={kind}\n", volume.len() / 512),
    ));
    bytes[1 << 20..].copy_from_slice(volume);
    bytes
}

#[test]
fn an_ntfs_partition_is_mapped_run_for_run_as_ntfsinfo_lists_it() {
    let dir = tempdir();
    let img = dir.path().join("ntfs.img");
    mkntfs(&img, 24);
    let mut files: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
    // Small enough to stay in its file record.
    files.insert("/small.txt", b"resident bytes\n".to_vec());
    files.insert("/kernel.bin", pattern_bytes(1 << 20, 21));
    files.insert("/spacer", pattern_bytes(50_000, 22));
    files.insert("/frag.bin", pattern_bytes(300_000, 23));
    files.insert("/empty", Vec::new());
    for (path, data) in &files {
        if *path == "/frag.bin" {
            // Written small before the spacer, then grown past it: its
            // first run stays where it was, the rest follows the spacer.
            ntfscp(&img, dir.path(), path, &data[..40_000]);
        } else {
            ntfscp(&img, dir.path(), path, data);
        }
    }
    ntfscp(&img, dir.path(), "/frag.bin", &files["/frag.bin"]);
    // 5000 bytes grown to 1 MiB by ntfstruncate: a sparse tail.
    let sparse = pattern_bytes(5000, 24);
    ntfscp(&img, dir.path(), "/sparse.bin", &sparse);
    let inode = run(cmd("ntfsls").arg("-i").arg(&img))
        .lines()
        .find_map(|l| {
            let (n, name) = l.trim().split_once(char::is_whitespace)?;
            (name.trim() == "sparse.bin").then(|| n.to_owned())
        })
        .expect("sparse.bin's inode in ntfsls -i");
    run(cmd("ntfstruncate")
        .arg(&img)
        .arg(&inode)
        .arg((1u64 << 20).to_string()));
    let mut grown = sparse.clone();
    grown.resize(1 << 20, 0);
    files.insert("/sparse.bin", grown);

    let ntfs = fs::read(&img).unwrap();
    let disk = in_mbr_partition(dir.path(), &ntfs, "7");
    for (bytes, start) in [(&ntfs, 0u64), (&disk, 1 << 20)] {
        let layout = scan(bytes, Limits::default());
        assert!(layout.warnings.is_empty(), "{:?}", layout.warnings);
        let kinds: Vec<(&str, u64)> = layout
            .filesystems
            .iter()
            .map(|f| (f.kind, f.start))
            .collect();
        assert_eq!(kinds, [("ntfs", start)]);

        for (path, want) in &files {
            check_ntfs_file(bytes, &layout, path, want);
        }
        let small = layout.resolve(0, "/small.txt").unwrap();
        assert!(small.extents.is_empty(), "resident: {:?}", small.extents);
        assert_eq!(small.size, 15);
        assert_eq!(
            layout.resolve_nocase(0, "/KERNEL.BIN").map(|f| f.size),
            Some(1 << 20),
            "NTFS names compare without case"
        );
        assert_eq!(
            layout.resolve(0, "/").map(|f| f.kind),
            Some(FileKind::Directory)
        );
        assert!(
            layout.files.iter().all(|f| !f.path.starts_with("/$")),
            "system files are metadata, not files"
        );

        // Cluster for cluster what ntfsinfo lists, holes and all.
        for path in ["/kernel.bin", "/frag.bin", "/spacer", "/sparse.bin"] {
            let runs = ntfsinfo_runs(&img, path, "$DATA");
            let size = files[path].len() as u64;
            assert_eq!(
                our_clusters(&layout, 0, path),
                their_clusters(&runs, size),
                "{path}: ntfsinfo lists {runs:x?}"
            );
        }
        let frag = layout.resolve(0, "/frag.bin").unwrap();
        assert_eq!(frag.extents.len(), 2, "fragmented around the spacer");
        let sparse = layout.resolve(0, "/sparse.bin").unwrap();
        assert_eq!(
            sparse.extents,
            [(sparse.extents[0].0, 2 * NTFS_CLUSTER)],
            "two clusters, then a hole to 1 MiB"
        );

        // Metadata: the boot sector, then the MFT from where the boot
        // sector puts it; a file's record is in the MFT by its number.
        let mft_lcn = u64::from_le_bytes(ntfs[0x30..0x38].try_into().unwrap());
        let mft = start + mft_lcn * NTFS_CLUSTER;
        let meta = &layout.filesystems[0].meta;
        assert_eq!(meta[0], (start, 512));
        assert_eq!(meta[1].0, mft, "{meta:?}");
        let kernel = layout.resolve(0, "/kernel.bin").unwrap();
        let record = run(cmd("ntfsls").arg("-i").arg(&img))
            .lines()
            .find_map(|l| {
                let (n, name) = l.trim().split_once(char::is_whitespace)?;
                (name.trim() == "kernel.bin").then(|| n.parse::<u64>().unwrap())
            })
            .unwrap();
        assert_eq!(kernel.meta, Some(mft + record * 1024));

        // A read in a file finds it; its group is the rest of it.
        let index = FileIndex::new(&layout, 64 << 10);
        let (file, ranges) = index
            .group(kernel.extents[0].0 + 100_000, 64 << 20)
            .unwrap();
        assert_eq!(index.path(file), Some("/kernel.bin"));
        let pushed: u64 = ranges.iter().map(|r| r.1).sum();
        assert!(
            ((1 << 20) - 128 * 1024..=1 << 20).contains(&pushed),
            "{pushed}"
        );
    }
}

/// The one warning a scan of `disk` gives, its NTFS not mapped.
fn ntfs_warning(disk: &[u8]) -> String {
    let layout = scan(&disk, Limits::default());
    assert!(layout.filesystems.is_empty(), "{:?}", layout.filesystems);
    assert_eq!(layout.warnings.len(), 1, "{:?}", layout.warnings);
    let w = layout.warnings[0].clone();
    assert!(
        w.starts_with("partition 1 (ntfs): ") && w.ends_with("not file-aware"),
        "{w}"
    );
    w
}

#[test]
fn a_damaged_ntfs_is_a_warning_even_where_its_reader_would_panic() {
    let dir = tempdir();
    let img = dir.path().join("ntfs.img");
    mkntfs(&img, 16);
    ntfscp(&img, dir.path(), "/file.bin", &pattern_bytes(100_000, 41));
    let disk = in_mbr_partition(dir.path(), &fs::read(&img).unwrap(), "7");
    let layout = scan(&disk, Limits::default());
    assert!(layout.warnings.is_empty(), "{:?}", layout.warnings);
    let root_node = layout.resolve(0, "/").unwrap().extents[0].0 as usize;
    let record = layout.resolve(0, "/file.bin").unwrap().meta.unwrap() as usize;

    // The root directory's record overwritten.
    let mut broken = disk.clone();
    let root_record = layout.resolve(0, "/").unwrap().meta.unwrap() as usize;
    broken[root_record..root_record + 1024].copy_from_slice(&pattern_bytes(1024, 42));
    let w = ntfs_warning(&broken);
    assert!(w.contains("damaged"), "{w}");

    // The `ntfs` crate indexes out of bounds on these two; the scan
    // catches that. An index entry shorter than its header, in the root's
    // first index node (its length field 8 bytes into it):
    let mut broken = disk.clone();
    assert_eq!(&broken[root_node..root_node + 4], b"INDX");
    let entries = u32::from_le_bytes(
        broken[root_node + 0x18..root_node + 0x1c]
            .try_into()
            .unwrap(),
    );
    let entry = root_node + 0x18 + entries as usize;
    broken[entry + 8..entry + 10].copy_from_slice(&8u16.to_le_bytes());
    let w = ntfs_warning(&broken);
    assert!(w.contains("could not parse"), "{w}");

    // An attribute at the end of a file record, too short for the fields
    // of a non-resident one: file.bin's $DATA renamed away (another type)
    // and stretched to 1000 bytes into the record, a 16-byte $DATA after.
    let mut broken = disk.clone();
    let le16 = |b: &[u8], at: usize| usize::from(u16::from_le_bytes([b[at], b[at + 1]]));
    let le32 = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let mut at = le16(&broken, record + 0x14);
    while le32(&broken, record + at) != 0x80 {
        at += le32(&broken, record + at + 4) as usize;
        assert!(at < 1000, "no $DATA in file.bin's record");
    }
    let a = record + at;
    broken[a..a + 4].copy_from_slice(&0x100u32.to_le_bytes());
    broken[a + 4..a + 8].copy_from_slice(&(1000 - at as u32).to_le_bytes());
    let fake = record + 1000;
    broken[fake..fake + 4].copy_from_slice(&0x80u32.to_le_bytes());
    broken[fake + 4..fake + 8].copy_from_slice(&16u32.to_le_bytes());
    broken[fake + 8] = 1; // non-resident
    broken[fake + 9..fake + 16].fill(0);
    broken[fake + 16..fake + 20].copy_from_slice(&u32::MAX.to_le_bytes());
    let w = ntfs_warning(&broken);
    assert!(w.contains("could not parse"), "{w}");
}

#[test]
fn an_ntfs_directory_tree_written_by_wimapply_is_walked_whole() {
    let dir = tempdir();
    let root = dir.path().join("root");
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut add = |path: &str, data: Vec<u8>| {
        let at = root.join(&path[1..]);
        fs::create_dir_all(at.parent().unwrap()).unwrap();
        fs::write(&at, &data).unwrap();
        files.insert(path.to_owned(), data);
    };
    add("/Windows/System32/ntoskrnl.exe", pattern_bytes(700_000, 31));
    add("/Windows/System32/config/SYSTEM", pattern_bytes(90_000, 32));
    // Enough names that the directory's index spills out of its record
    // into index nodes ($INDEX_ALLOCATION).
    for i in 0..120 {
        add(
            &format!("/Windows/System32/drivers/driver-with-a-long-name-{i:03}.sys"),
            pattern_bytes(100 + i * 50, 100 + i as u64),
        );
    }
    add("/deep/a/b/c/d/e/f/leaf.txt", b"deep\n".to_vec());
    add("/Program Files/App/app.dll", pattern_bytes(20_000, 33));
    add("/Users/Zoë/naïve.txt", "ünïcödé\n".as_bytes().to_vec());
    let wim = dir.path().join("tree.wim");
    run(cmd("wimcapture")
        .arg(&root)
        .arg(&wim)
        .arg("--no-acls")
        .arg("--compress=none"));
    let img = dir.path().join("ntfs.img");
    mkntfs(&img, 32);
    // wimapply writes an NTFS volume (a file or a device) through
    // libntfs-3g when the target is not a directory: no mount needed.
    run(cmd("wimapply").arg(&wim).arg("1").arg(&img));
    let bytes = fs::read(&img).unwrap();
    let layout = scan(&bytes, Limits::default());
    assert!(layout.warnings.is_empty(), "{:?}", layout.warnings);

    // Every file and directory there, once each, and nothing else.
    let mut want: Vec<String> = files.keys().cloned().collect();
    for path in files.keys() {
        let mut p = path.as_str();
        while let Some((parent, _)) = p.rsplit_once('/') {
            want.push(if parent.is_empty() { "/" } else { parent }.to_owned());
            p = parent;
        }
    }
    want.sort();
    want.dedup();
    let mut got: Vec<String> = layout.files.iter().map(|f| f.path.clone()).collect();
    got.sort();
    assert_eq!(got, want);
    for (path, data) in &files {
        assert_eq!(layout.resolve(0, path).unwrap().kind, FileKind::Regular);
        check_ntfs_file(&bytes, &layout, path, data);
    }
    assert_eq!(
        layout.resolve(0, "/deep/a/b/c/d/e/f").unwrap().kind,
        FileKind::Directory
    );
    // The large directory's index nodes, as ntfsinfo lists them.
    let drivers = "/Windows/System32/drivers";
    let runs = ntfsinfo_runs(&img, drivers, "$INDEX_ALLOCATION");
    let size = layout.resolve(0, drivers).unwrap().size;
    assert!(size > 0);
    assert_eq!(
        our_clusters(&layout, 0, drivers),
        their_clusters(&runs, size),
        "ntfsinfo lists {runs:x?}"
    );
    let kernel = "/Windows/System32/ntoskrnl.exe";
    assert_eq!(
        our_clusters(&layout, 0, kernel),
        their_clusters(&ntfsinfo_runs(&img, kernel, "$DATA"), 700_000)
    );

    // Limits hold: too shallow a walk is a warning, not a partial map.
    let shallow = Limits {
        max_depth: 4,
        ..Limits::default()
    };
    let layout = scan(&bytes, shallow);
    assert!(
        layout.warnings.iter().any(|w| w.contains("nested deeper")),
        "{:?}",
        layout.warnings
    );
}

#[test]
fn a_file_whose_runs_fill_its_record_is_mapped_through_its_attribute_list() {
    let dir = tempdir();
    let img = dir.path().join("ntfs.img");
    mkntfs(&img, 64);
    // Grown a cluster at a time with another file written after each
    // step: a run per cluster, more than its record holds, so ntfs-3g
    // moves its $DATA into further records that an attribute list names.
    let data = pattern_bytes(220 << 12, 51);
    for i in 1..=220 {
        ntfscp(&img, dir.path(), "/frag.bin", &data[..i << 12]);
        ntfscp(&img, dir.path(), &format!("/s{i}"), &[i as u8; 4096]);
    }
    let dump = run(cmd("ntfsinfo")
        .arg("-F")
        .arg("/frag.bin")
        .arg("-v")
        .arg(&img));
    assert!(dump.contains("$ATTRIBUTE_LIST"), "{dump}");
    assert!(
        dump.matches("Dumping attribute $DATA").count() > 1,
        "$DATA in pieces: {dump}"
    );
    let bytes = fs::read(&img).unwrap();
    let layout = scan(&bytes, Limits::default());
    assert!(layout.warnings.is_empty(), "{:?}", layout.warnings);
    let frag = layout.resolve(0, "/frag.bin").unwrap();
    assert!(frag.extents.len() > 200, "{} extents", frag.extents.len());
    check_ntfs_file(&bytes, &layout, "/frag.bin", &data);
    // ntfsinfo lists the runs of each piece: all of them, in file order.
    let runs = ntfsinfo_runs(&img, "/frag.bin", "$DATA");
    assert_eq!(
        our_clusters(&layout, 0, "/frag.bin"),
        their_clusters(&runs, data.len() as u64)
    );
}
