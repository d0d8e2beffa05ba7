//! The file operations ferry's persistent structures need (the journals,
//! the origin's state, the overlay's metadata), behind a small trait so
//! tests and the simulator can inject faults at every write, sync,
//! truncate, rename and remove (the role of raft-engine's `FileSystem`
//! trait and `fail_point!`s), and an encryption layer could slot in later.
//! [`replace_file`] is the one atomic replace of a small file.
//!
//! [`DiskStorage`] is the real thing. [`mem::MemStorage`] keeps files in
//! memory, remembers what was last synced, can fail operations (every one
//! after the Nth, the next sync, writes with `ENOSPC`), and "loses power":
//! files fall back to their synced bytes plus a random part of what was
//! written after, and the directory to its last synced listing. The tests
//! and the simulator use it.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// A directory of files.
pub trait Storage: Send + Sync + fmt::Debug {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Names of the files in `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Creates a new, empty file; fails if it exists.
    fn create(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>>;
    fn open(&self, path: &Path, writable: bool) -> io::Result<Arc<dyn StorageFile>>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Renames `from` to `to`, replacing `to` (durable once the directory
    /// is synced).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes creations, renames and removals in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Removes `dir` and everything under it; nothing there is not an
    /// error.
    fn remove_dir_all(&self, dir: &Path) -> io::Result<()>;
}

/// The whole content of `path`, or `None` if there is no such file.
pub fn read_file(storage: &dyn Storage, path: &Path) -> io::Result<Option<Vec<u8>>> {
    let f = match storage.open(path, false) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = usize::try_from(f.size()?).map_err(io::Error::other)?;
    let mut buf = vec![0; len];
    f.read_exact_at(&mut buf, 0)?;
    Ok(Some(buf))
}

/// Replaces `path` with `bytes` atomically and durably: a crash leaves the
/// old content or the new, never a mix or nothing. Writes `path.tmp`,
/// syncs it, renames it over `path`, syncs the directory.
pub fn replace_file(storage: &dyn Storage, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    match storage.remove(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let f = storage.create(&tmp)?;
    f.write_all_at(bytes, 0)?;
    f.sync_data()?;
    storage.rename(&tmp, path)?;
    storage.sync_dir(dir)
}

/// One open file. Reads and writes are positional, so one handle serves
/// every thread.
pub trait StorageFile: Send + Sync + fmt::Debug {
    fn size(&self) -> io::Result<u64>;
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// `fdatasync`.
    fn sync_data(&self) -> io::Result<()>;
    fn truncate(&self, len: u64) -> io::Result<()>;
}

/// Real files.
#[derive(Debug, Default)]
pub struct DiskStorage;

#[derive(Debug)]
struct DiskFile(File);

impl Storage for DiskStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }

    fn create(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        use std::os::unix::fs::OpenOptionsExt;
        // Journals hold guest data and the origin's state holds keys:
        // owner-only.
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        Ok(Arc::new(DiskFile(f)))
    }

    fn open(&self, path: &Path, writable: bool) -> io::Result<Arc<dyn StorageFile>> {
        let f = OpenOptions::new().read(true).write(writable).open(path)?;
        Ok(Arc::new(DiskFile(f)))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn remove_dir_all(&self, dir: &Path) -> io::Result<()> {
        match fs::remove_dir_all(dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => {
                if let Some(parent) = dir.parent() {
                    self.sync_dir(parent)?;
                }
                Ok(())
            }
        }
    }
}

impl StorageFile for DiskFile {
    fn size(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn truncate(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
}

pub mod mem {
    //! In-memory files with fault injection and simulated power loss.

    use std::collections::BTreeMap;
    use std::io;
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
    use std::time::Duration;

    use super::{Storage, StorageFile};

    #[derive(Debug, Default)]
    struct Data {
        /// What a reader sees now.
        current: Vec<u8>,
        /// What survives a power loss: the bytes at the last sync.
        durable: Vec<u8>,
    }

    #[derive(Debug)]
    pub struct MemFile {
        data: Mutex<Data>,
        faults: Arc<Faults>,
    }

    #[derive(Debug, Default)]
    struct FaultState {
        /// Mutating operations so far (writes, syncs, truncates, creates,
        /// removes, directory syncs).
        ops: u64,
        /// Fail every mutating operation after this many.
        fail_after: Option<u64>,
        /// File syncs completed.
        file_syncs: u64,
        /// While set, file syncs block (to line callers up behind one).
        hold_syncs: bool,
        /// The next file sync fails.
        fail_next_sync: bool,
        /// Writes that grow a file fail with ENOSPC.
        no_space: bool,
        syncs_blocked: u64,
    }

    #[derive(Debug, Default)]
    struct Faults {
        state: Mutex<FaultState>,
        changed: Condvar,
    }

    impl Faults {
        fn lock(&self) -> MutexGuard<'_, FaultState> {
            self.state.lock().unwrap_or_else(PoisonError::into_inner)
        }

        /// Counts one mutating operation; fails it if past the limit.
        fn op(&self, what: &str) -> io::Result<()> {
            let mut s = self.lock();
            if s.fail_after.is_some_and(|n| s.ops >= n) {
                return Err(io::Error::other(format!("injected fault at {what}")));
            }
            s.ops += 1;
            Ok(())
        }

        fn sync_gate(&self) -> io::Result<()> {
            let mut s = self.lock();
            if std::mem::take(&mut s.fail_next_sync) {
                return Err(io::Error::other("injected fault: fdatasync failed"));
            }
            if s.hold_syncs {
                s.syncs_blocked += 1;
                self.changed.notify_all();
                while s.hold_syncs {
                    s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
                }
                s.syncs_blocked -= 1;
            }
            s.file_syncs += 1;
            Ok(())
        }
    }

    #[derive(Debug, Default)]
    struct Dir {
        /// Files as they are now.
        current: BTreeMap<PathBuf, Arc<MemFile>>,
        /// Files as of the last directory sync.
        durable: BTreeMap<PathBuf, Arc<MemFile>>,
    }

    /// A fake file system. Clones share it.
    #[derive(Clone, Debug, Default)]
    pub struct MemStorage {
        dir: Arc<Mutex<Dir>>,
        faults: Arc<Faults>,
    }

    impl MemStorage {
        fn dir(&self) -> MutexGuard<'_, Dir> {
            self.dir.lock().unwrap_or_else(PoisonError::into_inner)
        }

        /// Mutating operations counted so far.
        pub fn ops(&self) -> u64 {
            self.faults.lock().ops
        }

        /// File syncs completed so far.
        pub fn file_syncs(&self) -> u64 {
            self.faults.lock().file_syncs
        }

        /// Makes every mutating operation after `n` more fail.
        pub fn fail_after(&self, n: u64) {
            let mut s = self.faults.lock();
            s.fail_after = Some(s.ops + n);
        }

        /// Makes the next file sync fail.
        pub fn fail_next_sync(&self) {
            self.faults.lock().fail_next_sync = true;
        }

        /// Clears every injected fault.
        pub fn clear_faults(&self) {
            let mut s = self.faults.lock();
            s.fail_after = None;
            s.fail_next_sync = false;
            s.no_space = false;
        }

        /// While `full`, writes that would grow a file fail with ENOSPC.
        pub fn set_no_space(&self, full: bool) {
            self.faults.lock().no_space = full;
        }

        /// Makes file syncs block until [`Self::release_syncs`].
        pub fn hold_syncs(&self) {
            self.faults.lock().hold_syncs = true;
        }

        pub fn release_syncs(&self) {
            self.faults.lock().hold_syncs = false;
            self.faults.changed.notify_all();
        }

        /// Waits (bounded) until a sync is blocked by [`Self::hold_syncs`].
        pub fn wait_sync_blocked(&self) -> bool {
            let mut s = self.faults.lock();
            for _ in 0..100 {
                if s.syncs_blocked > 0 {
                    return true;
                }
                s = self
                    .faults
                    .changed
                    .wait_timeout(s, Duration::from_millis(100))
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            false
        }

        /// A power loss and reboot: every file keeps its synced bytes and
        /// `keep(file, unsynced_len)` more of what was written after (a torn
        /// tail; `zero_torn` zero-fills the kept part as a file system that
        /// grew the file but never wrote the blocks would), the directory its
        /// last synced listing; faults are cleared.
        pub fn power_loss(&self, mut keep: impl FnMut(usize) -> (usize, bool)) {
            let mut dir = self.dir();
            dir.current = dir.durable.clone();
            for file in dir.current.values() {
                let mut d = file.data.lock().unwrap_or_else(PoisonError::into_inner);
                let d = &mut *d;
                if d.current.starts_with(&d.durable) {
                    let extra = d.current.len() - d.durable.len();
                    let (k, zero) = keep(extra);
                    let k = k.min(extra);
                    let start = d.durable.len();
                    d.current.truncate(start + k);
                    if zero {
                        d.current[start..].fill(0);
                    }
                } else {
                    d.current.clone_from(&d.durable);
                }
                d.durable.clone_from(&d.current);
            }
            let mut s = self.faults.lock();
            s.fail_after = None;
            s.fail_next_sync = false;
            s.no_space = false;
        }

        /// The current bytes of a file (for tests that damage it).
        pub fn file_bytes(&self, path: &Path) -> Option<Vec<u8>> {
            let dir = self.dir();
            let f = dir.current.get(path)?;
            let d = f.data.lock().unwrap_or_else(PoisonError::into_inner);
            Some(d.current.clone())
        }

        /// Replaces a file's bytes, durably.
        pub fn set_file_bytes(&self, path: &Path, bytes: Vec<u8>) {
            let dir = self.dir();
            let f = &dir.current[path];
            let mut d = f.data.lock().unwrap_or_else(PoisonError::into_inner);
            d.durable.clone_from(&bytes);
            d.current = bytes;
        }
    }

    impl Storage for MemStorage {
        fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
            Ok(())
        }

        fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
            Ok(self
                .dir()
                .current
                .keys()
                .filter(|p| p.parent() == Some(dir))
                .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
                .collect())
        }

        fn create(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
            self.faults.op("create")?;
            let mut dir = self.dir();
            if dir.current.contains_key(path) {
                return Err(io::Error::new(io::ErrorKind::AlreadyExists, "exists"));
            }
            let f = Arc::new(MemFile {
                data: Mutex::default(),
                faults: self.faults.clone(),
            });
            dir.current.insert(path.to_owned(), f.clone());
            Ok(f)
        }

        fn open(&self, path: &Path, _writable: bool) -> io::Result<Arc<dyn StorageFile>> {
            let dir = self.dir();
            match dir.current.get(path) {
                Some(f) => Ok(f.clone()),
                None => Err(io::Error::new(io::ErrorKind::NotFound, "no such file")),
            }
        }

        fn remove(&self, path: &Path) -> io::Result<()> {
            self.faults.op("remove")?;
            match self.dir().current.remove(path) {
                Some(_) => Ok(()),
                None => Err(io::Error::new(io::ErrorKind::NotFound, "no such file")),
            }
        }

        fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
            self.faults.op("rename")?;
            let mut dir = self.dir();
            let f = dir
                .current
                .remove(from)
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such file"))?;
            dir.current.insert(to.to_owned(), f);
            Ok(())
        }

        fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
            self.faults.op("sync_dir")?;
            let mut dir = self.dir();
            dir.durable = dir.current.clone();
            Ok(())
        }

        fn remove_dir_all(&self, dir: &Path) -> io::Result<()> {
            self.faults.op("remove_dir_all")?;
            self.dir().current.retain(|p, _| !p.starts_with(dir));
            Ok(())
        }
    }

    impl MemFile {
        fn data(&self) -> MutexGuard<'_, Data> {
            self.data.lock().unwrap_or_else(PoisonError::into_inner)
        }
    }

    impl StorageFile for MemFile {
        fn size(&self) -> io::Result<u64> {
            Ok(self.data().current.len() as u64)
        }

        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            let d = self.data();
            let start = usize::try_from(offset).map_err(io::Error::other)?;
            let src = d
                .current
                .get(start..start + buf.len())
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            buf.copy_from_slice(src);
            Ok(())
        }

        fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.faults.op("write")?;
            let mut d = self.data();
            let start = usize::try_from(offset).map_err(io::Error::other)?;
            if d.current.len() < start + buf.len() {
                if self.faults.lock().no_space {
                    return Err(io::Error::from_raw_os_error(28));
                }
                d.current.resize(start + buf.len(), 0);
            }
            d.current[start..start + buf.len()].copy_from_slice(buf);
            Ok(())
        }

        fn sync_data(&self) -> io::Result<()> {
            self.faults.op("sync")?;
            self.faults.sync_gate()?;
            let mut d = self.data();
            let d = &mut *d;
            d.durable.clone_from(&d.current);
            Ok(())
        }

        fn truncate(&self, len: u64) -> io::Result<()> {
            self.faults.op("truncate")?;
            let len = usize::try_from(len).map_err(io::Error::other)?;
            self.data().current.truncate(len);
            Ok(())
        }
    }
}
