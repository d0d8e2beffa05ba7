//! A small bootable-looking disk built with the real tools: an MBR
//! (`sfdisk`), a FAT16 boot partition (`mkfs.vfat`, mtools) holding a
//! SYSLINUX configuration, a kernel and an initramfs (one fragmented),
//! and an ext4 root (`mkfs.ext4 -d`, `debugfs`) with an init, libc, a
//! large non-boot file and a file fragmented on purpose. Contents are
//! pseudo-random, so bytes read through wrong extents never match.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::process::Command;

use crate::{cmd, pattern_bytes, run};

/// An mtools command, without its check of the drive's geometry.
pub fn mtools(name: &str) -> Command {
    let mut c = cmd(name);
    c.env("MTOOLS_SKIP_CHECK", "1");
    c
}

fn write(path: &Path, data: &[u8]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, data).unwrap();
}

/// An MBR disk: a FAT16 boot partition (SYSLINUX-style files, one of them
/// fragmented, long names) and an ext4 root with extents (one file
/// fragmented by deleting every other small file before writing it).
#[derive(Debug)]
pub struct Disk {
    /// The whole disk.
    pub bytes: Vec<u8>,
    /// The filesystems' images, as built (for debugfs and mtools).
    pub ext4: std::path::PathBuf,
    pub fat: std::path::PathBuf,
    /// Each file's path and bytes.
    pub files: BTreeMap<&'static str, Vec<u8>>,
}

/// The first sector of a disk of `size` bytes whose MBR partition table
/// `sfdisk` writes from `partitions` (its script lines, after `label: dos`).
pub fn mbr(dir: &Path, size: u64, partitions: &str) -> Vec<u8> {
    let disk = dir.join("mbr.img");
    fs::File::create(&disk).unwrap().set_len(size).unwrap();
    let mut child = cmd("sfdisk")
        .arg("--no-reread")
        .arg("--no-tell-kernel")
        .arg(&disk)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("label: dos\n{partitions}").as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk failed");
    let sector = fs::read(&disk).unwrap()[..512].to_vec();
    fs::remove_file(&disk).unwrap();
    sector
}

pub fn build_disk(dir: &Path) -> Disk {
    let root = dir.join("root");
    let mut files = BTreeMap::new();
    let mut add = |path: &'static str, data: Vec<u8>| {
        write(&root.join(&path[1..]), &data);
        files.insert(path, data);
    };
    add("/etc/fstab", b"LABEL=root / ext4 defaults 0 1\n".to_vec());
    add("/usr/bin/big", pattern_bytes(3 << 20, 1));
    add(
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
        pattern_bytes(200_000, 2),
    );
    add("/usr/sbin/myinit", pattern_bytes(40_000, 3));
    add("/deep/a/b/c/d/e/file", pattern_bytes(5000, 4));
    for i in 0..40 {
        write(
            &root.join(format!("many/f{i:02}")),
            &pattern_bytes(16 << 10, 100 + i),
        );
    }
    fs::create_dir_all(root.join("lib")).ok();
    fs::remove_dir(root.join("lib")).ok();
    std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
    fs::create_dir_all(root.join("sbin")).unwrap();
    std::os::unix::fs::symlink("../usr/sbin/myinit", root.join("sbin/init")).unwrap();
    let ext4 = dir.join("ext4.img");
    run(cmd("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-d"])
        .arg(&root)
        .arg(&ext4)
        .arg("24M"));
    // Free every other small file, then write one that fills the gaps.
    let frag = pattern_bytes(300 << 10, 5);
    let src = dir.join("frag");
    fs::write(&src, &frag).unwrap();
    let mut script = String::new();
    for i in (0..40).step_by(2) {
        writeln!(script, "rm /many/f{i:02}").unwrap();
    }
    writeln!(script, "write {} /frag", src.display()).unwrap();
    fs::write(dir.join("cmds"), script).unwrap();
    run(cmd("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(dir.join("cmds"))
        .arg(&ext4));
    files.insert("/frag", frag);

    let fat = dir.join("fat.img");
    run(cmd("mkfs.vfat")
        .args(["-C", "-F", "16", "-n", "BOOT"])
        .arg(&fat)
        .arg("16384"));
    let put = |name: &str, data: &[u8]| {
        let p = dir.join("fatsrc").join(name);
        write(&p, data);
        p
    };
    let cfg = b"DEFAULT x\nLABEL x\n  KERNEL /vmlinuz\n  INITRD /initrd.img\n  APPEND root=LABEL=root ro init=/sbin/init\n".to_vec();
    let vmlinuz = pattern_bytes(1 << 20, 6);
    let filler = pattern_bytes(64 << 10, 7);
    let initrd = pattern_bytes(2 << 20, 8);
    let efi = pattern_bytes(70_000, 9);
    run(mtools("mcopy")
        .arg("-i")
        .arg(&fat)
        .arg(put("syslinux.cfg", &cfg))
        .arg(put("vmlinuz", &vmlinuz))
        .arg(put("filler", &filler))
        .arg("::/"));
    run(mtools("mcopy")
        .arg("-i")
        .arg(&fat)
        .arg(put("spacer", &filler))
        .arg("::/"));
    run(mtools("mdel").arg("-i").arg(&fat).arg("::/filler"));
    // Goes into the freed clusters first, then after the spacer.
    run(mtools("mcopy")
        .arg("-i")
        .arg(&fat)
        .arg(put("initrd.img", &initrd))
        .arg("::/"));
    run(mtools("mmd")
        .arg("-i")
        .arg(&fat)
        .arg("::/EFI")
        .arg("::/EFI/BOOT"));
    run(mtools("mcopy")
        .arg("-i")
        .arg(&fat)
        .arg(put("A-Long-Loader-Name.efi", &efi))
        .arg("::/EFI/BOOT/"));
    files.insert("/syslinux.cfg", cfg);
    files.insert("/vmlinuz", vmlinuz);
    files.insert("/initrd.img", initrd);
    files.insert("/EFI/BOOT/A-Long-Loader-Name.efi", efi);

    // 1 MiB head, 16 MiB FAT, 24 MiB ext4.
    let mut bytes = vec![0u8; 42 << 20];
    let size = bytes.len() as u64;
    bytes[..512].copy_from_slice(&mbr(
        dir,
        size,
        "start=2048, size=32768, type=e, bootable\nstart=34816, size=49152, type=83\n",
    ));
    let f = fs::read(&fat).unwrap();
    bytes[1 << 20..(1 << 20) + f.len()].copy_from_slice(&f);
    let e = fs::read(&ext4).unwrap();
    bytes[17 << 20..(17 << 20) + e.len()].copy_from_slice(&e);
    Disk {
        bytes,
        ext4,
        fat,
        files,
    }
}
