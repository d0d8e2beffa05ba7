//! The portable engine: positioned blocking syscalls on tokio's blocking
//! pool. Works wherever `pread`/`pwrite` do.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;

use super::{join_error, to_off};

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

/// Reads `len` bytes at `offset`; bytes past the end of the file read as
/// zeroes (the device size is fixed at open).
pub(super) async fn read(file: Arc<File>, offset: u64, len: usize) -> io::Result<Bytes> {
    blocking(move || {
        let mut buf = vec![0u8; len];
        let mut done = 0;
        while done < len {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                // End of file: the rest stays zero.
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Bytes::from(buf))
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
