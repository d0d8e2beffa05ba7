//! Application groups (the design's DLL case): the shared libraries an
//! ELF executable or library loads (`DT_NEEDED`, found the way the
//! dynamic loader finds them: `DT_RUNPATH`/`DT_RPATH` with `$ORIGIN`,
//! then the system's library directories) and its loader (`PT_INTERP`).
//!
//! Only the parts the loader reads are read: the header, the program
//! headers, the dynamic section and its string table, a few hundred
//! bytes per file through [`Image`], where a general ELF parser (such as
//! `goblin`) wants the whole file in memory. 64-bit little-endian ELF
//! only (x86-64, AArch64); other files have no group. PE imports are not
//! read yet.

use std::collections::{BTreeMap, HashMap};

use super::{le16, le32, le64, File, FileKind, Image, VolumeLayout};

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_STRSZ: u64 = 10;
const DT_RPATH: u64 = 15;
const DT_RUNPATH: u64 = 29;

const MAX_PHDRS: u64 = 128;
const MAX_DYNAMIC: u64 = 64 << 10;
const MAX_STRTAB: u64 = 1 << 20;
const MAX_NEEDED: usize = 256;

/// Where executables and libraries live (others are not read).
const CODE_DIRS: &[&str] = &[
    "/bin/",
    "/sbin/",
    "/lib/",
    "/lib64/",
    "/usr/bin/",
    "/usr/sbin/",
    "/usr/lib/",
    "/usr/lib64/",
    "/usr/libexec/",
    "/usr/local/bin/",
    "/usr/local/sbin/",
    "/usr/local/lib/",
];
/// The system's library directories, in the loader's order (Debian's
/// multiarch ones first).
const LIB_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib/aarch64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

/// What one ELF file asks the loader for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// `PT_INTERP`: the dynamic loader.
    pub interp: Option<String>,
    /// `DT_NEEDED` names, in order.
    pub needed: Vec<String>,
    /// `DT_RUNPATH`/`DT_RPATH` directories, `$ORIGIN` unexpanded.
    pub search: Vec<String>,
}

/// For every ELF file of the layout's code directories, the files (as
/// indexes into `layout.files`) it loads directly: its interpreter and
/// each `DT_NEEDED` library found.
pub(super) fn dependencies(img: &dyn Image, layout: &VolumeLayout) -> BTreeMap<usize, Vec<usize>> {
    let by_path: HashMap<(usize, &str), usize> = layout
        .files
        .iter()
        .enumerate()
        .map(|(i, f)| ((f.fs, f.path.as_str()), i))
        .collect();
    let mut out = BTreeMap::new();
    for (i, f) in layout.files.iter().enumerate() {
        if f.kind != FileKind::Regular
            || f.size < 64
            || !CODE_DIRS.iter().any(|d| f.path.starts_with(d))
        {
            continue;
        }
        let Some(needs) = read_needs(img, f) else {
            continue;
        };
        let dir = f.path.rsplit_once('/').map_or("", |(d, _)| d);
        let mut deps = Vec::new();
        let mut add = |path: &str| {
            let resolved = layout.resolve(f.fs, path).map(|r| (r.fs, r.path.as_str()));
            if let Some(&j) = resolved.and_then(|k| by_path.get(&k)) {
                if j != i && !deps.contains(&j) {
                    deps.push(j);
                }
                return true;
            }
            false
        };
        if let Some(interp) = &needs.interp {
            add(interp);
        }
        for lib in &needs.needed {
            if lib.contains('/') {
                add(lib);
                continue;
            }
            let runpath = needs
                .search
                .iter()
                .map(|p| p.replace("$ORIGIN", dir).replace("${ORIGIN}", dir));
            let dirs: Vec<String> = runpath
                .chain(LIB_DIRS.iter().map(|d| (*d).to_owned()))
                .collect();
            for d in dirs {
                if add(&format!("{d}/{lib}")) {
                    break;
                }
            }
        }
        if !deps.is_empty() {
            out.insert(i, deps);
        }
    }
    out
}

fn read_in_file(img: &dyn Image, f: &File, at: u64, len: u64) -> Option<Vec<u8>> {
    f.read(img, at, len)
}

/// What `f` asks the loader for; `None` if it is not a 64-bit
/// little-endian ELF file or its headers do not hold together.
pub fn read_needs(img: &dyn Image, f: &File) -> Option<Needs> {
    let h = read_in_file(img, f, 0, 64)?;
    if h[..4] != [0x7f, b'E', b'L', b'F'] || h[4] != 2 || h[5] != 1 {
        return None;
    }
    let (phoff, phentsize, phnum) = (
        le64(&h, 0x20),
        u64::from(le16(&h, 0x36)),
        u64::from(le16(&h, 0x38)),
    );
    if phentsize < 56 || phnum == 0 || phnum > MAX_PHDRS {
        return None;
    }
    let ph = read_in_file(img, f, phoff, phentsize * phnum)?;
    let mut loads = Vec::new();
    let (mut dynamic, mut interp) = (None, None);
    for p in ph.chunks_exact(phentsize as usize) {
        let (kind, offset, vaddr, filesz) = (le32(p, 0), le64(p, 8), le64(p, 16), le64(p, 32));
        match kind {
            PT_LOAD => loads.push((vaddr, offset, filesz)),
            PT_DYNAMIC => dynamic = Some((offset, filesz)),
            PT_INTERP if filesz > 1 && filesz <= 4096 => interp = Some((offset, filesz)),
            _ => {}
        }
    }
    let mut needs = Needs::default();
    if let Some((offset, len)) = interp {
        let raw = read_in_file(img, f, offset, len)?;
        let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
        needs.interp = Some(String::from_utf8_lossy(&raw[..end]).into_owned());
    }
    let Some((offset, len)) = dynamic else {
        return Some(needs);
    };
    let d = read_in_file(img, f, offset, len.min(MAX_DYNAMIC))?;
    let (mut strtab, mut strsz) = (None, None);
    let mut needed = Vec::new();
    let mut search = Vec::new();
    for e in d.chunks_exact(16) {
        let (tag, val) = (le64(e, 0), le64(e, 8));
        match tag {
            0 => break,
            DT_NEEDED if needed.len() < MAX_NEEDED => needed.push(val),
            DT_STRTAB => strtab = Some(val),
            DT_STRSZ => strsz = Some(val),
            DT_RPATH | DT_RUNPATH => search.push(val),
            _ => {}
        }
    }
    let (Some(strtab), Some(strsz)) = (strtab, strsz) else {
        return Some(needs);
    };
    // The string table's address, as a file offset.
    let at = loads
        .iter()
        .find(|&&(vaddr, _, filesz)| vaddr <= strtab && strtab < vaddr.saturating_add(filesz))
        .and_then(|&(vaddr, offset, _)| (strtab - vaddr).checked_add(offset))?;
    let table = read_in_file(
        img,
        f,
        at,
        strsz.min(MAX_STRTAB).min(f.size.saturating_sub(at)),
    )?;
    let string = |off: u64| -> Option<String> {
        let s = table.get(usize::try_from(off).ok()?..)?;
        let end = s.iter().position(|&c| c == 0)?;
        Some(String::from_utf8_lossy(&s[..end]).into_owned())
    };
    needs.needed = needed
        .into_iter()
        .filter_map(&string)
        .filter(|s| !s.is_empty())
        .collect();
    needs.search = search
        .into_iter()
        .filter_map(string)
        .flat_map(|s| s.split(':').map(str::to_owned).collect::<Vec<_>>())
        .filter(|s| !s.is_empty())
        .collect();
    Some(needs)
}
