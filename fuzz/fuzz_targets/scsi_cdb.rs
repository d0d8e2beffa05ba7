//! Fuzzes SCSI CDB decoding, planning and execution (`scsi::decode_cdb`,
//! `LunMap::shape`, `LunMap::execute`) over 64 KiB in-memory devices.
//!
//! Every command runs twice: on a writable LUN and on a read-only one. The
//! read-only device only *reports* itself read-only and would accept
//! writes, so it is the SCSI layer that must keep its contents unchanged.
//!
//! Input: a sequence of records, each
//! - a header byte: bits 0-4 the CDB length n (0..=31 bytes follow; 29,
//!   30 and 31 instead mean LOGICAL UNIT RESET, TARGET RESET and loss of
//!   the I_T nexus, with no CDB), bit 5 which of two initiators sends it,
//!   bit 6 LUN 1 (absent) instead of LUN 0, bit 7 a two-byte Data-Out
//!   length (else one byte);
//! - n CDB bytes, the Data-Out length, then that many Data-Out bytes (cut
//!   to what the input holds).
//!
//! Invariants checked:
//! - `LunMap::shape` succeeds exactly when `decode_cdb` does, never panics;
//! - the status is GOOD, CHECK CONDITION, RESERVATION CONFLICT or
//!   CONDITION MET; CHECK CONDITION always carries sense, no other status
//!   does; only GOOD / CONDITION MET return data;
//! - a CDB that does not decode ends in CHECK CONDITION;
//! - Data-In never exceeds the planned `data_in_len`;
//! - the read-only device's contents never change.
#![no_main]

use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use blockcore::{BlockDevice, DeviceInfo, Extent, MemDevice, WriteFlags, ZeroFlags};
use bytes::Bytes;
use futures::executor::block_on;
use iscsi_target::scsi::{decode_cdb, status, Lun, LunIdentity, LunMap, Nexus, Outcome, ResetKind};
use libfuzzer_sys::fuzz_target;

const SIZE: usize = 64 * 1024;

/// A writable device that claims to be read-only.
#[derive(Debug)]
struct ClaimsReadOnly(Arc<MemDevice>);

#[async_trait]
impl BlockDevice for ClaimsReadOnly {
    fn info(&self) -> DeviceInfo {
        let mut info = self.0.info();
        info.caps.read_only = true;
        info
    }
    async fn read(&self, offset: u64, len: usize) -> blockcore::Result<Bytes> {
        self.0.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> blockcore::Result<()> {
        self.0.write(offset, data, flags).await
    }
    async fn flush(&self) -> blockcore::Result<()> {
        self.0.flush().await
    }
    async fn trim(&self, offset: u64, len: u64, flags: WriteFlags) -> blockcore::Result<()> {
        self.0.trim(offset, len, flags).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> blockcore::Result<()> {
        self.0.write_zeroes(offset, len, flags).await
    }
    async fn extents(&self, offset: u64, len: u64) -> blockcore::Result<Vec<Extent>> {
        self.0.extents(offset, len).await
    }
    async fn prefetch(&self, offset: u64, len: u64) -> blockcore::Result<()> {
        self.0.prefetch(offset, len).await
    }
}

fn pattern() -> &'static [u8] {
    static PATTERN: OnceLock<Vec<u8>> = OnceLock::new();
    PATTERN.get_or_init(|| (0..SIZE).map(|i| (i * 7 + i / 512) as u8).collect())
}

fn lun_map(device: Arc<dyn BlockDevice>, name: &str) -> LunMap {
    let identity = LunIdentity {
        volume_name: name.into(),
        vendor: "FERRY".into(),
        product: "fuzz disk".into(),
        revision: "0001".into(),
    };
    LunMap::new(vec![(0, Arc::new(Lun::new(device, identity)))])
}

fn check_outcome(o: &Outcome, decoded: bool, max_data_in: Option<u32>) {
    assert!(
        matches!(
            o.status,
            status::GOOD
                | status::CHECK_CONDITION
                | status::RESERVATION_CONFLICT
                | status::CONDITION_MET
        ),
        "status {:#x}",
        o.status
    );
    assert_eq!(
        o.status == status::CHECK_CONDITION,
        o.sense.is_some(),
        "status {:#x} with sense {:?}",
        o.status,
        o.sense
    );
    if !matches!(o.status, status::GOOD | status::CONDITION_MET) {
        assert!(o.data_in.is_empty(), "data with status {:#x}", o.status);
    }
    if !decoded {
        assert_eq!(
            o.status,
            status::CHECK_CONDITION,
            "an undecodable CDB: {o:?}"
        );
    }
    if let Some(max) = max_data_in {
        assert!(
            o.data_in.len() <= max as usize,
            "{} bytes of Data-In, planned at most {max}",
            o.data_in.len()
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let initial = pattern();
    let rw = lun_map(Arc::new(MemDevice::from_bytes(initial)), "rw");
    let ro_inner = Arc::new(MemDevice::from_bytes(initial));
    let ro = lun_map(Arc::new(ClaimsReadOnly(Arc::clone(&ro_inner))), "ro");
    let nexuses = [
        Nexus {
            initiator_name: "iqn.2024-01.io.client:a".into(),
            isid: [0x80, 0, 0, 0, 0, 1],
            tpgt: 1,
        },
        Nexus {
            initiator_name: "iqn.2024-01.io.client:b".into(),
            isid: [0x80, 0, 0, 0, 0, 2],
            tpgt: 1,
        },
    ];

    let mut rest = data;
    while let Some((&head, tail)) = rest.split_first() {
        rest = tail;
        let nexus = &nexuses[usize::from(head >> 5 & 1)];
        let lun = u64::from(head >> 6 & 1);
        let n = usize::from(head & 0x1f);
        match n {
            29 | 30 => {
                let (lun, kind) = if n == 29 {
                    (Some(lun), ResetKind::LogicalUnit)
                } else {
                    (None, ResetKind::TargetWarm)
                };
                rw.reset(lun, kind);
                ro.reset(lun, kind);
                continue;
            }
            31 => {
                rw.nexus_lost(nexus);
                ro.nexus_lost(nexus);
                continue;
            }
            _ => {}
        }
        let (cdb, tail) = rest.split_at(n.min(rest.len()));
        rest = tail;
        let (dlen, tail) = if head & 0x80 != 0 && rest.len() >= 2 {
            (
                usize::from(u16::from_be_bytes([rest[0], rest[1]])),
                &rest[2..],
            )
        } else if let Some((&b, t)) = rest.split_first() {
            (usize::from(b), t)
        } else {
            (0, rest)
        };
        let (data_out, tail) = tail.split_at(dlen.min(tail.len()));
        rest = tail;
        let data_out = Bytes::copy_from_slice(data_out);

        let decoded = decode_cdb(cdb);
        for map in [&rw, &ro] {
            let shape = map.shape(lun, cdb);
            assert_eq!(shape.is_ok(), decoded.is_ok(), "shape and decode disagree");
            let o = block_on(map.execute(nexus, lun, cdb, data_out.clone()));
            check_outcome(&o, decoded.is_ok(), shape.ok().map(|s| s.data_in_len));
        }
        let now = block_on(ro_inner.read(0, SIZE)).expect("read back");
        assert!(
            now[..] == *initial,
            "the read-only device changed (CDB {cdb:02x?})"
        );
    }
});
