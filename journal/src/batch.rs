//! Coalescing a batch's records into entries: overlapping writes and zeroes
//! ship once (newest wins), sorted by offset, adjacent data merged up to
//! [`MAX_ENTRY_BYTES`]. The result depends only on the records, so a batch
//! rebuilt after a restart is identical.

use std::io;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::extents::{ExtentMap, Shift};
use super::storage::StorageFile;
use super::{WriteEntry, MAX_ENTRY_BYTES};

/// Where a write's data is.
#[derive(Clone, Debug)]
pub(crate) enum Source {
    Mem(Bytes),
    /// A segment file and the data's offset in it.
    File(Arc<dyn StorageFile>, u64),
}

/// One data record of a batch, oldest first.
#[derive(Clone, Debug)]
pub(crate) struct Item {
    pub offset: u64,
    pub end: u64,
    /// `None` for zeroes.
    pub source: Option<Source>,
}

#[derive(Clone, Copy, Debug)]
struct Part {
    item: usize,
    /// Offset within the item's data; `None` for zeroes.
    off: Option<u64>,
}

impl Shift for Part {
    fn shifted(&self, by: u64) -> Self {
        Part {
            item: self.item,
            off: self.off.map(|o| o + by),
        }
    }
}

fn data_of(item: &Item, off: u64, len: u64) -> io::Result<Bytes> {
    let to_usize = |x: u64| usize::try_from(x).map_err(io::Error::other);
    match item.source.as_ref().expect("data parts come from writes") {
        Source::Mem(b) => Ok(b.slice(to_usize(off)?..to_usize(off + len)?)),
        Source::File(file, pos) => {
            let mut buf = vec![0; to_usize(len)?];
            file.read_exact_at(&mut buf, pos + off)?;
            Ok(buf.into())
        }
    }
}

/// The coalesced entries of `items` (applied in order).
pub(crate) fn coalesce(items: &[Item]) -> io::Result<Vec<WriteEntry>> {
    let mut map = ExtentMap::default();
    for (i, it) in items.iter().enumerate() {
        let off = it.source.is_some().then_some(0);
        map.insert(it.offset, it.end, Part { item: i, off }, |_, _, _| {});
    }
    let mut out = Vec::new();
    // A run of adjacent data pieces to merge: start, pieces, total length.
    let mut run: (u64, Vec<Bytes>, usize) = (0, Vec::new(), 0);
    let flush = |out: &mut Vec<WriteEntry>, run: &mut (u64, Vec<Bytes>, usize)| {
        let data = match run.1.len() {
            0 => return,
            1 => run.1.pop().expect("one piece"),
            _ => {
                let mut b = BytesMut::with_capacity(run.2);
                for p in run.1.drain(..) {
                    b.extend_from_slice(&p);
                }
                b.freeze()
            }
        };
        out.push(WriteEntry::Data {
            offset: run.0,
            data,
        });
        run.2 = 0;
    };
    for (s, e, part) in map.iter() {
        match part.off {
            None => {
                flush(&mut out, &mut run);
                match out.last_mut() {
                    Some(WriteEntry::Zero { offset, len }) if *offset + *len == s => {
                        *len += e - s;
                    }
                    _ => out.push(WriteEntry::Zero {
                        offset: s,
                        len: e - s,
                    }),
                }
            }
            Some(off) => {
                let data = data_of(&items[part.item], off, e - s)?;
                let adjacent = !run.1.is_empty() && run.0 + run.2 as u64 == s;
                if !adjacent || run.2 + data.len() > MAX_ENTRY_BYTES {
                    flush(&mut out, &mut run);
                    run.0 = s;
                }
                run.2 += data.len();
                run.1.push(data);
            }
        }
    }
    flush(&mut out, &mut run);
    Ok(out)
}
