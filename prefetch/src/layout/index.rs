//! Chunk -> file: which file a demand read falls in, and what of that
//! file to push after it.

use super::{FileKind, VolumeLayout};

/// The regular files of a [`VolumeLayout`], searchable by volume offset.
#[derive(Clone, Debug, Default)]
pub struct FileIndex {
    /// (start, end, file) over every extent, sorted by start.
    spans: Vec<(u64, u64, u32)>,
    /// Each file's extents, chunk-aligned and joined, in file order.
    files: Vec<Vec<(u64, u64)>>,
    paths: Vec<String>,
    sizes: Vec<u64>,
    /// Each file's application group: the files it loads, directly or
    /// not, breadth first.
    groups: Vec<Vec<u32>>,
    chunk: u64,
}

/// Files of one application group, at most.
const MAX_GROUP_FILES: usize = 64;

impl FileIndex {
    /// Regular files with data, their extents widened to `chunk_size`
    /// boundaries (what an edge caches).
    pub fn new(layout: &VolumeLayout, chunk_size: u32) -> FileIndex {
        let chunk = u64::from(chunk_size.max(1));
        let mut index = FileIndex {
            chunk,
            ..FileIndex::default()
        };
        let mut ids = std::collections::HashMap::new();
        for (i, f) in layout.files.iter().enumerate() {
            if f.kind != FileKind::Regular || f.extents.is_empty() {
                continue;
            }
            ids.insert(i, index.files.len() as u32);
            let Ok(id) = u32::try_from(index.files.len()) else {
                break;
            };
            let aligned = align(&f.extents, chunk);
            for &(start, len) in &f.extents {
                index.spans.push((start, start.saturating_add(len), id));
            }
            index.files.push(aligned);
            index.paths.push(f.path.clone());
            index.sizes.push(f.size);
        }
        index.spans.sort_unstable();
        index.groups = vec![Vec::new(); index.files.len()];
        for &i in layout.needs.keys() {
            let Some(&id) = ids.get(&i) else { continue };
            index.groups[id as usize] = layout
                .group_of(i, MAX_GROUP_FILES)
                .into_iter()
                .filter_map(|d| ids.get(&d).copied())
                .collect();
        }
        index
    }

    /// The files `file` loads (its application group), breadth first.
    pub fn group_files(&self, file: u32) -> &[u32] {
        self.groups.get(file as usize).map_or(&[], Vec::as_slice)
    }

    /// All of `file`, at most `max_bytes`, as chunk-aligned ranges in
    /// file order.
    pub fn whole(&self, file: u32, max_bytes: u64) -> Vec<(u64, u64)> {
        let mut left = max_bytes;
        let mut out = Vec::new();
        for &(s, l) in self.files.get(file as usize).into_iter().flatten() {
            let n = l.min(left);
            if n == 0 {
                break;
            }
            out.push((s, n));
            left -= n;
        }
        out
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The file holding the byte at `offset`.
    pub fn file_at(&self, offset: u64) -> Option<u32> {
        let i = self.spans.partition_point(|s| s.0 <= offset);
        let s = self.spans[..i].last()?;
        (offset < s.1).then_some(s.2)
    }

    pub fn path(&self, file: u32) -> Option<&str> {
        self.paths.get(file as usize).map(String::as_str)
    }

    pub fn size(&self, file: u32) -> Option<u64> {
        self.sizes.get(file as usize).copied()
    }

    /// The files with data in `[start, end)`, each with the bytes of it
    /// there, by position.
    pub fn files_in(&self, start: u64, end: u64) -> Vec<(u32, u64)> {
        let from = self
            .spans
            .partition_point(|s| s.0 < start)
            .saturating_sub(1);
        self.spans[from..]
            .iter()
            .take_while(|s| s.0 < end)
            .filter(|s| s.1 > start)
            .map(|s| (s.2, s.1.min(end) - s.0.max(start)))
            .collect()
    }

    /// After a demand read at `offset` inside a file: the file and the
    /// rest of it from the read's chunk on, at most `max_bytes`, as
    /// chunk-aligned ranges in file order. `None` outside every file.
    pub fn group(&self, offset: u64, max_bytes: u64) -> Option<(u32, Vec<(u64, u64)>)> {
        let file = self.file_at(offset)?;
        let from = offset - offset % self.chunk;
        let extents = &self.files[file as usize];
        let start = extents
            .iter()
            .position(|&(s, l)| s <= from && from < s + l)?;
        let mut out = Vec::new();
        let mut left = max_bytes;
        for (i, &(s, l)) in extents[start..].iter().enumerate() {
            let begin = if i == 0 { from } else { s };
            let n = (s + l - begin).min(left);
            if n == 0 {
                break;
            }
            out.push((begin, n));
            left -= n;
        }
        Some((file, out))
    }
}

/// Extents widened to `chunk` boundaries; overlapping or touching ones
/// joined (file order kept otherwise).
pub(super) fn align(extents: &[(u64, u64)], chunk: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(start, len) in extents {
        if len == 0 {
            continue;
        }
        let s = start - start % chunk;
        let e = start
            .saturating_add(len)
            .div_ceil(chunk)
            .saturating_mul(chunk);
        match out.last_mut() {
            Some(l) if s <= l.0 + l.1 && s >= l.0 => l.1 = l.1.max(e - l.0),
            _ => out.push((s, e - s)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::File;
    use super::*;

    fn layout(files: &[(&str, &[(u64, u64)])]) -> VolumeLayout {
        VolumeLayout {
            files: files
                .iter()
                .map(|&(path, extents)| File {
                    fs: 0,
                    path: path.into(),
                    kind: FileKind::Regular,
                    size: extents.iter().map(|e| e.1).sum(),
                    extents: extents.to_vec(),
                    offsets: vec![],
                    meta: None,
                    target: None,
                })
                .collect(),
            ..VolumeLayout::default()
        }
    }

    #[test]
    fn a_read_in_a_fragmented_file_pushes_the_rest_of_it_in_file_order() {
        let l = layout(&[
            ("/a", &[(10 << 20, 3 << 20), (2 << 20, 1 << 20)]),
            ("/b", &[(20 << 20, 100)]),
        ]);
        let idx = FileIndex::new(&l, 64 << 10);
        assert_eq!(idx.file_at((11 << 20) + 5), Some(0));
        assert_eq!(idx.file_at((2 << 20) + 5), Some(0));
        assert_eq!(idx.file_at(20 << 20), Some(1));
        assert_eq!(idx.file_at((20 << 20) + 100), None, "past its last byte");
        assert_eq!(idx.file_at(0), None);
        let (_, tail) = idx.group((2 << 20) + 5, 64 << 20).unwrap();
        assert_eq!(
            tail,
            [(2 << 20, 1 << 20)],
            "the last extent is the file's end"
        );
        let (f, ranges) = idx.group((11 << 20) + 70_000, 64 << 20).unwrap();
        assert_eq!(f, 0);
        assert_eq!(
            ranges,
            [((11 << 20) + 65536, (2 << 20) - 65536), (2 << 20, 1 << 20)]
        );
        let (_, bounded) = idx.group(10 << 20, 1 << 20).unwrap();
        assert_eq!(bounded, [(10 << 20, 1 << 20)]);
        assert_eq!(idx.files_in(0, 12 << 20), [(0, 1 << 20), (0, 2 << 20)]);
        assert_eq!(
            idx.files_in((12 << 20) + 1, 32 << 20),
            [(0, (1 << 20) - 1), (1, 100)]
        );
        assert_eq!(idx.size(1), Some(100));
        let (_, small) = idx.group(20 << 20, 1 << 20).unwrap();
        assert_eq!(small, [(20 << 20, 65536)], "widened to the chunk");
    }

    #[test]
    fn alignment_joins_what_chunks_make_adjacent() {
        assert_eq!(align(&[(100, 10), (5000, 10)], 4096), [(0, 8192)]);
        assert_eq!(
            align(&[(8192, 10), (0, 10)], 4096),
            [(8192, 4096), (0, 4096)]
        );
    }
}
