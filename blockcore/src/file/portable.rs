//! The portable engine: positioned blocking syscalls on tokio's blocking
//! pool. Works wherever `pread`/`pwrite` do.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::{join_error, read_into, to_off};

async fn blocking<T, F>(f: F) -> io::Result<T>
where
    F: FnOnce() -> io::Result<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| join_error(&e))
        .and_then(|r| r)
}

/// Reads `[offset + buf.len(), offset + total)` into the rest of `buf`
/// (whose first `buf.len()` bytes are already read); bytes past the end of
/// the file read as zeroes (the device size is fixed at open).
pub(super) async fn read(
    file: Arc<File>,
    offset: u64,
    mut buf: BytesMut,
    total: usize,
) -> io::Result<Bytes> {
    blocking(move || {
        while buf.len() < total {
            match read_into(&file, &mut buf, total, offset, 0) {
                Ok(0) => {
                    // End of file: the rest reads as zeroes.
                    buf.resize(total, 0);
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(buf.freeze())
    })
    .await
}

pub(super) async fn write(file: Arc<File>, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
    blocking(move || {
        file.write_all_at(&data, offset)?;
        if fua {
            file.sync_data()?;
        }
        Ok(())
    })
    .await
}

pub(super) async fn fdatasync(file: Arc<File>) -> io::Result<()> {
    blocking(move || file.sync_data()).await
}

pub(super) async fn fallocate(file: Arc<File>, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    blocking(move || {
        let (off, len) = (to_off(offset)?, to_off(len)?);
        loop {
            // SAFETY: fallocate on a descriptor kept open by `file`; it takes
            // no pointers.
            let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    })
    .await
}
