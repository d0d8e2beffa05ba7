//! Maps a raw image's files and prints what a first boot would be sent:
//! `cargo run -p prefetch --example scan -- disk.img`.

use std::os::unix::fs::FileExt;

use prefetch::layout::{boot_order, scan, Image, Limits};

struct RawFile(std::fs::File, u64);

impl Image for RawFile {
    fn size(&self) -> u64 {
        self.1
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        self.0.read_exact_at(buf, offset).map_err(|e| e.to_string())
    }
}

fn main() {
    let path = std::env::args().nth(1).expect("usage: scan IMAGE");
    let file = std::fs::File::open(&path).expect("open");
    let size = file.metadata().expect("stat").len();
    let img = RawFile(file, size);
    let started = std::time::Instant::now();
    let layout = scan(&img, Limits::default());
    let scanned = started.elapsed();
    for p in &layout.partitions {
        println!(
            "partition {} at {} ({} bytes) {:?}",
            p.number, p.start, p.len, p.kind
        );
    }
    for f in &layout.filesystems {
        println!("{} at {}", f.kind, f.start);
    }
    for w in &layout.warnings {
        println!("warning: {w}");
    }
    println!("{} files in {scanned:?}", layout.files.len());
    println!("{} programs with an application group", layout.needs.len());
    for path in ["/usr/lib/systemd/systemd", "/usr/bin/apt", "/usr/bin/bash"] {
        let Some(i) = (0..layout.filesystems.len())
            .find_map(|fs| layout.resolve(fs, path))
            .and_then(|f| layout.index_of(f))
        else {
            continue;
        };
        let group: Vec<&str> = layout
            .group_of(i, 64)
            .into_iter()
            .map(|d| layout.files[d].path.as_str())
            .collect();
        println!("  {path}: {group:?}");
    }
    let order = boot_order(&img, &layout, 64 << 10);
    println!(
        "first boot: {} chunks ({} MiB)",
        order.chunks.len(),
        order.chunks.len() / 16
    );
    for (fs, path, size) in &order.files {
        println!("  fs{fs} {path} {size}");
    }
}
