//! What files a volume holds and where (`prefetch::layout`), for the
//! session's file-aware group pushes and for planning a first boot.
//!
//! Scanned on a blocking thread when an edge attaches (never in the way
//! of the attach: the session pushes fixed groups until the map is
//! there) and kept until a batch changes the volume; then the next
//! attach or plan scans again. The scan reads only metadata (superblock,
//! group descriptors, inodes, directories, boot configurations): tens of
//! milliseconds for a Debian root of 12,000 files.

use std::sync::{Arc, Mutex};

use blockcore::BlockDevice;
use prefetch::layout::{boot_order, scan, BootOrder, FileIndex, Image, Limits, VolumeLayout};

use crate::{lock, Origin, Volume};

/// A volume's files, as of one state of its data.
#[derive(Debug)]
pub struct VolumeFiles {
    pub layout: VolumeLayout,
    pub index: Arc<FileIndex>,
    /// The order a boot with no profile is planned in.
    pub boot: BootOrder,
}

/// The cached scan of a volume, keyed by what it was scanned at.
#[derive(Debug, Default)]
pub(crate) struct FilesCache(Mutex<Option<(ScanKey, Arc<VolumeFiles>)>>);

/// The volume's epoch and newest applied batch when it was scanned.
type ScanKey = (u64, u64);

/// The volume's device read from a blocking thread.
struct DeviceImage {
    device: Arc<dyn BlockDevice>,
    runtime: tokio::runtime::Handle,
}

impl Image for DeviceImage {
    fn size(&self) -> u64 {
        self.device.info().size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let data = self
            .runtime
            .block_on(self.device.read(offset, buf.len()))
            .map_err(|e| e.to_string())?;
        if data.len() != buf.len() {
            return Err(format!("short read: {} of {} bytes", data.len(), buf.len()));
        }
        buf.copy_from_slice(&data);
        Ok(())
    }
}

impl Origin {
    /// The volume's files, scanned now unless a scan of its current data
    /// is cached.
    pub async fn files(&self, v: &Volume) -> Arc<VolumeFiles> {
        let key = (v.epoch(), v.applied());
        if let Some((k, files)) = lock(&v.files.0).as_ref() {
            if *k == key {
                return files.clone();
            }
        }
        let image = DeviceImage {
            device: v.device().clone(),
            runtime: tokio::runtime::Handle::current(),
        };
        let chunk = self.config.session.chunk_size;
        let name = v.name().to_owned();
        let started = std::time::Instant::now();
        let files = tokio::task::spawn_blocking(move || {
            let layout = scan(&image, Limits::default());
            let boot = boot_order(&image, &layout, chunk);
            let index = Arc::new(FileIndex::new(&layout, chunk));
            VolumeFiles {
                layout,
                index,
                boot,
            }
        })
        .await
        .unwrap_or_else(|e| {
            tracing::error!(volume = %name, error = %e, "the file scan failed");
            VolumeFiles {
                layout: VolumeLayout::default(),
                index: Arc::default(),
                boot: BootOrder::default(),
            }
        });
        for w in &files.layout.warnings {
            tracing::warn!(volume = %name, "file awareness: {w}");
        }
        tracing::info!(
            volume = %name,
            filesystems = files.layout.filesystems.len(),
            files = files.index.len(),
            boot_files = files.boot.files.len(),
            ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "volume files mapped"
        );
        let files = Arc::new(files);
        *lock(&v.files.0) = Some((key, files.clone()));
        files
    }
}
