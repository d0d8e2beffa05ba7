//! What a migration needs of the origin: the allocation map of a volume
//! (so unallocated and zero ranges never cross the link), and its
//! migration record: which edge a volume was cut over to (a migration's
//! `Release { CutOver }`), kept in its state directory next to the fence
//! list, until the edge brings it home (`Release { Home }`) or an operator
//! force-releases it.
//!
//! While the record names an edge, every other edge's attach is refused
//! with [`ErrorCode::Migrated`]: that edge serves the volume from its own
//! copy, and a write through the origin would fork the disk. The edge it
//! names may attach again: that is how it moves the volume back.
//!
//! Format of `dir/migrated`: `FRYM | version u8 (1) | len u16 | edge id
//! UTF-8`, big-endian; `len` 0 means no record (edge ids are never empty).
//! Written with [`replace_file`], so a crash leaves the old record or the
//! new one.

use std::path::Path;
use std::sync::Arc;

use blockcore::Extent;
use journal::storage::{read_file, replace_file, Storage};
use link::proto::{Disposition, ErrorCode};
use link::session::{PartialBatch, Refusal};

use crate::{
    block_refusal, lock, not_held, refusal, state_err, Holder, Origin, OriginError, Volume,
};

/// The file in a volume's state directory naming the edge it was migrated
/// to.
pub(crate) const MIGRATED_FILE: &str = "migrated";
const MIGRATED_MAGIC: [u8; 4] = *b"FRYM";
const MIGRATED_VERSION: u8 = 1;

pub(crate) fn encode_migrated(edge: Option<&str>) -> Vec<u8> {
    let id = edge.unwrap_or("");
    let mut out = MIGRATED_MAGIC.to_vec();
    out.push(MIGRATED_VERSION);
    // Edge ids come off the wire: at most a wire string.
    let len = u16::try_from(id.len()).expect("an edge id fits a wire string");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(id.as_bytes());
    out
}

/// The bytes are not a migration record.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct NotARecord;

/// The edge the record names (`None`: migrated to no edge).
pub(crate) fn decode_migrated(b: &[u8]) -> Result<Option<String>, NotARecord> {
    let (magic, rest) = b.split_at_checked(4).ok_or(NotARecord)?;
    let (&version, rest) = rest.split_first().ok_or(NotARecord)?;
    let (len, id) = rest.split_at_checked(2).ok_or(NotARecord)?;
    if magic != MIGRATED_MAGIC || version != MIGRATED_VERSION {
        return Err(NotARecord);
    }
    let len = u16::from_be_bytes(len.try_into().map_err(|_| NotARecord)?);
    if id.len() != usize::from(len) {
        return Err(NotARecord);
    }
    let id = std::str::from_utf8(id).map_err(|_| NotARecord)?;
    Ok((!id.is_empty()).then(|| id.to_owned()))
}

/// The record in `path` (none if there is no file).
pub(crate) fn read_migrated(
    storage: &dyn Storage,
    path: &Path,
) -> Result<Option<String>, OriginError> {
    match read_file(storage, path).map_err(state_err(path))? {
        None => Ok(None),
        Some(b) => decode_migrated(&b).map_err(|NotARecord| OriginError::State {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not a migration record"),
        }),
    }
}

/// Why an edge other than `to` may not attach `volume`.
pub(crate) fn migrated_refusal(volume: &str, to: &str) -> Refusal {
    refusal(
        ErrorCode::Migrated,
        format!(
            "volume {volume:?} was migrated to edge {to:?}, which serves it from its own copy: \
             move it back from that edge first (or, if that edge is gone for good, \
             force-release the volume at the origin)"
        ),
    )
}

impl Volume {
    /// The edge the volume was migrated to (cut over), if it was: every
    /// other edge's attach is refused until it comes home.
    pub fn migrated_to(&self) -> Option<String> {
        lock(&self.migrated).clone()
    }

    /// Replaces the record with `to`, durably first.
    fn store_migrated(
        &self,
        current: &mut Option<String>,
        to: Option<String>,
    ) -> Result<(), OriginError> {
        let path = self.dir.join(MIGRATED_FILE);
        replace_file(
            self.storage.as_ref(),
            &path,
            &encode_migrated(to.as_deref()),
        )
        .map_err(state_err(&path))?;
        *current = to;
        Ok(())
    }

    /// [`Origin::release_as`] on the calling thread (it does one small
    /// durable write): under the holder's lock, so no operator's fence and
    /// no other connection slips in between the record and the release.
    fn release_as_now(
        &self,
        conn: u64,
        disposition: Disposition,
        partial: Option<PartialBatch>,
    ) -> Result<(), Refusal> {
        let mut holder = lock(&self.holder);
        let Some(edge_id) = holder
            .as_ref()
            .filter(|h| h.conn == conn)
            .map(|h| h.edge_id.clone())
        else {
            return Err(not_held());
        };
        {
            let mut migrated = lock(&self.migrated);
            let io = |e: OriginError| {
                tracing::error!(volume = %self.name, edge = %edge_id, error = %e, "recording a release failed");
                refusal(ErrorCode::Io, e.to_string())
            };
            match (disposition, migrated.clone()) {
                // Only an edge another edge's record let attach gets here
                // (an attach refuses the rest); refused all the same.
                (_, Some(to)) if to != edge_id => return Err(migrated_refusal(&self.name, &to)),
                // Again (the first `Detached` was lost with its link).
                (Disposition::CutOver, Some(_)) | (Disposition::Home, None) => {}
                (Disposition::CutOver, None) => {
                    self.store_migrated(&mut migrated, Some(edge_id.clone()))
                        .map_err(io)?;
                    tracing::info!(target: "ferry::audit", volume = %self.name, edge = %edge_id, "migrated: cut over to the edge; other edges are refused until it moves the volume back");
                }
                (Disposition::Home, Some(_)) => {
                    self.store_migrated(&mut migrated, None).map_err(io)?;
                    tracing::info!(target: "ferry::audit", volume = %self.name, edge = %edge_id, "moved back: the volume is home; any edge may attach it");
                }
            }
        }
        release_held(self, &mut holder, conn, partial);
        Ok(())
    }

    /// Clears the record if it names `edge_id` (an operator fenced that
    /// edge, so the volume comes home by force). Returns whether it did.
    pub(crate) fn force_home(&self, edge_id: &str) -> Result<bool, OriginError> {
        let mut migrated = lock(&self.migrated);
        if migrated.as_deref() != Some(edge_id) {
            return Ok(false);
        }
        self.store_migrated(&mut migrated, None)?;
        tracing::warn!(target: "ferry::audit", volume = %self.name, edge = %edge_id, "forced home: the migration record is cleared; the edge's copy and whatever it wrote since the cut-over are no longer the volume");
        Ok(true)
    }
}

/// Lets go of `v` if connection `conn` holds it, leaving the batch it was
/// receiving for the edge's next connection.
pub(crate) fn release_held(
    v: &Volume,
    holder: &mut Option<Holder>,
    conn: u64,
    partial: Option<PartialBatch>,
) {
    if let Some(h) = holder.as_ref().filter(|h| h.conn == conn) {
        if let Some(p) = partial {
            *lock(&v.partial) = Some((h.edge_id.clone(), p));
        }
        tracing::info!(volume = %v.name, edge = %h.edge_id, "edge detached");
        *holder = None;
    }
}

impl Origin {
    /// The allocation of a prefix of `[offset, offset + len)` of `v`, for
    /// connection `conn` (see [`BlockDevice::extents`]): what the volume's
    /// device reports (a raw file: `SEEK_DATA`/`SEEK_HOLE`; a device that
    /// cannot tell: all data).
    ///
    /// [`BlockDevice::extents`]: blockcore::BlockDevice::extents
    pub async fn extents(
        &self,
        conn: u64,
        v: &Volume,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>, Refusal> {
        if !v.held_by(conn) {
            return Err(not_held());
        }
        v.device
            .extents(offset, len)
            .await
            .map_err(|e| block_refusal(&e))
    }

    /// Connection `conn` releases `v` as `disposition` says (a `Release`
    /// from its edge, once every batch before it was applied): records the
    /// volume as migrated to the edge ([`Disposition::CutOver`]) or clears
    /// that record ([`Disposition::Home`]), durably, then lets go of it as
    /// [`Origin::release`] does. Refused (`Migrated`) when the volume was
    /// migrated to another edge, `NotAttached` when the connection no
    /// longer holds it, `Io` when the record cannot be written; the
    /// connection keeps the volume then.
    pub async fn release_as(
        &self,
        conn: u64,
        v: &Arc<Volume>,
        disposition: Disposition,
        partial: Option<PartialBatch>,
    ) -> Result<(), Refusal> {
        let v = v.clone();
        self.config
            .file_io
            .run(move || v.release_as_now(conn, disposition, partial))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FileIo, OriginConfig};
    use blockcore::storage::mem::MemStorage;
    use blockcore::{BlockDevice, ExtentKind, MemDevice, WriteFlags};

    const SIZE: u64 = 1 << 20;

    async fn open(storage: &MemStorage, device: Arc<dyn BlockDevice>) -> Origin {
        let mut n = 0u8;
        let config = OriginConfig {
            file_io: FileIo::Inline,
            ..OriginConfig::default()
        };
        Origin::open_with(
            Arc::new(storage.clone()),
            Path::new("/state"),
            vec![("vol".to_owned(), device)],
            config,
            || {
                n += 1;
                [n; 32]
            },
        )
        .await
        .unwrap()
    }

    fn mem() -> Arc<dyn BlockDevice> {
        Arc::new(MemDevice::new(SIZE))
    }

    #[tokio::test]
    async fn a_cut_over_volume_is_refused_to_other_edges_until_it_comes_home() {
        let storage = MemStorage::default();
        let origin = open(&storage, mem()).await;
        let (v, _) = origin.attach(1, "vol", "a").unwrap();
        origin
            .release_as(1, &v, Disposition::CutOver, None)
            .await
            .unwrap();
        assert_eq!(v.migrated_to().as_deref(), Some("a"));
        assert_eq!(v.holder(), None, "released");
        // Again (a lost `Detached`): nothing changes.
        let (v, _) = origin.attach(2, "vol", "a").unwrap();
        origin
            .release_as(2, &v, Disposition::CutOver, None)
            .await
            .unwrap();
        assert_eq!(v.migrated_to().as_deref(), Some("a"));

        let r = origin.attach(3, "vol", "b").unwrap_err();
        assert_eq!(r.code, ErrorCode::Migrated);
        assert!(
            r.message.contains("\"a\"") && r.message.contains("move it back"),
            "{}",
            r.message
        );
        assert_eq!(origin.counters().snapshot().attach_refusals, 1);

        // The record survives a restart.
        drop((v, origin));
        let origin = open(&storage, mem()).await;
        let v = origin.volume("vol").unwrap();
        assert_eq!(v.migrated_to().as_deref(), Some("a"));
        assert_eq!(
            origin.attach(4, "vol", "b").unwrap_err().code,
            ErrorCode::Migrated
        );
        // Its edge takes it back, and brings it home.
        let (v, _) = origin.attach(5, "vol", "a").unwrap();
        // Not from a connection that does not hold it.
        let r = origin
            .release_as(4, &v, Disposition::Home, None)
            .await
            .unwrap_err();
        assert_eq!(r.code, ErrorCode::NotAttached);
        assert_eq!(v.migrated_to().as_deref(), Some("a"));
        origin
            .release_as(5, &v, Disposition::Home, None)
            .await
            .unwrap();
        assert_eq!((v.migrated_to(), v.holder()), (None, None));
        drop((v, origin));
        let origin = open(&storage, mem()).await;
        assert_eq!(origin.volume("vol").unwrap().migrated_to(), None);
        let (v, _) = origin.attach(6, "vol", "b").unwrap();
        // Home with no record: any edge may (it is a detach).
        origin
            .release_as(6, &v, Disposition::Home, None)
            .await
            .unwrap();
        assert_eq!((v.migrated_to(), v.holder()), (None, None));
    }

    #[tokio::test]
    async fn a_record_that_cannot_be_written_keeps_the_volume_attached() {
        let storage = MemStorage::default();
        let origin = open(&storage, mem()).await;
        let (v, _) = origin.attach(1, "vol", "a").unwrap();
        storage.fail_next_sync();
        let r = origin
            .release_as(1, &v, Disposition::CutOver, None)
            .await
            .unwrap_err();
        assert_eq!(r.code, ErrorCode::Io);
        assert_eq!(v.migrated_to(), None);
        assert_eq!(v.holder().as_deref(), Some("a"));
        origin
            .release_as(1, &v, Disposition::CutOver, None)
            .await
            .unwrap();
        assert_eq!(v.migrated_to().as_deref(), Some("a"));
    }

    #[tokio::test]
    async fn a_forced_release_brings_a_migrated_volume_home() {
        let storage = MemStorage::default();
        let origin = open(&storage, mem()).await;
        let (v, _) = origin.attach(1, "vol", "a").unwrap();
        origin
            .release_as(1, &v, Disposition::CutOver, None)
            .await
            .unwrap();
        // Nobody holds it, but it is a's: that edge is fenced, and the
        // volume is home.
        assert_eq!(origin.force_release("vol").unwrap(), "a");
        assert_eq!(v.migrated_to(), None);
        assert_eq!(v.fenced(), ["a"]);
        assert_eq!(
            origin.attach(2, "vol", "a").unwrap_err().code,
            ErrorCode::Fenced
        );
        let (_, _) = origin.attach(3, "vol", "b").unwrap();
        drop((v, origin));
        let origin = open(&storage, mem()).await;
        let v = origin.volume("vol").unwrap();
        assert_eq!((v.migrated_to(), v.fenced()), (None, vec!["a".to_owned()]));

        // Held again by its edge (moving it back) when forced: the same.
        origin.unfence("vol", "a").unwrap();
        let (v, _) = origin.attach(4, "vol", "a").unwrap();
        origin
            .release_as(4, &v, Disposition::CutOver, None)
            .await
            .unwrap();
        let (v, _) = origin.attach(5, "vol", "a").unwrap();
        assert_eq!(origin.force_release("vol").unwrap(), "a");
        assert_eq!((v.migrated_to(), v.holder()), (None, None));
        // And fencing the edge by name does it too.
        origin.unfence("vol", "a").unwrap();
        let (v, _) = origin.attach(6, "vol", "a").unwrap();
        origin
            .release_as(6, &v, Disposition::CutOver, None)
            .await
            .unwrap();
        assert!(origin.fence("vol", "a").unwrap());
        assert_eq!(v.migrated_to(), None);
    }

    #[tokio::test]
    async fn extents_come_from_the_volume_device() {
        let storage = MemStorage::default();
        let device = Arc::new(MemDevice::new(SIZE));
        device
            .write(
                65536,
                bytes::Bytes::from(vec![1; 65536]),
                WriteFlags::default(),
            )
            .await
            .unwrap();
        let origin = open(&storage, device.clone()).await;
        let (v, _) = origin.attach(1, "vol", "a").unwrap();
        let got = origin.extents(1, &v, 0, SIZE).await.unwrap();
        assert_eq!(got, device.extents(0, SIZE).await.unwrap());
        assert!(got.iter().any(|e| e.kind == ExtentKind::Hole), "{got:?}");
        assert!(got.iter().any(|e| e.kind == ExtentKind::Data
            && e.offset <= 65536
            && e.offset + e.len >= 131_072));
        let r = origin.extents(2, &v, 0, SIZE).await.unwrap_err();
        assert_eq!(r.code, ErrorCode::NotAttached);
        let r = origin.extents(1, &v, SIZE - 1, 2).await.unwrap_err();
        assert_eq!(r.code, ErrorCode::OutOfRange);
    }

    #[test]
    fn records_round_trip_and_reject_garbage() {
        for rec in [None, Some("edge-β\n2")] {
            let b = encode_migrated(rec);
            assert_eq!(decode_migrated(&b), Ok(rec.map(str::to_owned)));
            for cut in 0..b.len() {
                assert_eq!(decode_migrated(&b[..cut]), Err(NotARecord), "cut at {cut}");
            }
            let mut long = b.clone();
            long.push(b'x');
            assert_eq!(decode_migrated(&long), Err(NotARecord));
        }
        let mut b = encode_migrated(Some("e"));
        b[4] = 2;
        assert_eq!(decode_migrated(&b), Err(NotARecord), "an unknown version");
        let mut b = encode_migrated(Some("e"));
        b[0] = b'X';
        assert_eq!(decode_migrated(&b), Err(NotARecord), "a wrong magic");
        let mut b = encode_migrated(Some("é"));
        b[8] = 0xff;
        assert_eq!(decode_migrated(&b), Err(NotARecord), "not UTF-8");
    }
}
