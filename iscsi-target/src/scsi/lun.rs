//! One logical unit: executes decoded commands against its
//! [`BlockDevice`], and keeps the per-LU state SPC-4 asks for (mode
//! parameters, unit attentions per I_T nexus, reservations).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use blockcore::{BlockDevice, BlockError, DeviceInfo, ExtentKind, Op, WriteFlags, ZeroFlags};
use bytes::{Bytes, BytesMut};

use super::cdb::{ByteCheck, Command, WriteSource};
use super::inquiry::{self, InquiryParams};
use super::mode::{self, ModeParams, ModeRequest, ModeState};
use super::pr::{self, PrError, Reservations};
use super::sense::Sense;
use super::{opcodes, status, Nexus, Outcome, ResetKind};

/// How a LUN names itself in INQUIRY data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LunIdentity {
    /// The volume the LUN exports: the serial number and NAA designator
    /// are derived from it, so they stay stable across restarts.
    pub volume_name: String,
    /// T10 vendor identification (8 characters shown), e.g. "FERRY".
    pub vendor: String,
    /// Product identification (16 characters shown), e.g. "ferry disk".
    pub product: String,
    /// Product revision level (4 characters shown).
    pub revision: String,
}

/// Largest pattern buffer WRITE SAME builds before writing it repeatedly.
const WRITE_SAME_CHUNK: usize = 1024 * 1024;

/// One logical unit over a block device.
#[derive(Debug)]
pub struct Lun {
    device: Arc<dyn BlockDevice>,
    identity: LunIdentity,
    block_size: u32,
    lbppb_exponent: u8,
    serial: String,
    naa: [u8; 8],
    /// Reservation state, shared with nothing else: one per LU.
    pub reservations: Mutex<Reservations>,
    mode: Mutex<ModeState>,
    /// Pending unit attentions of every I_T nexus seen on this LU.
    unit_attentions: Mutex<HashMap<Nexus, VecDeque<Sense>>>,
    /// COMPARE AND WRITE holds it exclusively, every other write shared,
    /// so no write lands between CAW's compare and its write.
    io_lock: tokio::sync::RwLock<()>,
    /// Capacity (blocks) last reported, to raise CAPACITY DATA HAS CHANGED.
    last_blocks: AtomicU64,
    /// Initiators a PREEMPT AND ABORT removed, whose commands in flight
    /// the transport must abort (see [`Lun::take_preempted`]).
    preempted: Mutex<Vec<Nexus>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Maps a device error to sense data: one exhaustive match, so a new
/// `BlockError` variant is a compile error here until it is mapped.
pub fn block_error_sense(err: &BlockError) -> Sense {
    match err {
        BlockError::OutOfRange { .. } => Sense::LBA_OUT_OF_RANGE,
        // The block size is a multiple of the device's minimum and every
        // transfer is checked against its maximum, so these mean a CDB the
        // checks let through: blame the CDB.
        BlockError::Misaligned { .. } | BlockError::TooLarge { .. } => Sense::INVALID_FIELD_IN_CDB,
        BlockError::ReadOnly { .. } => Sense::WRITE_PROTECTED,
        BlockError::Unsupported { op } => match op {
            // The whole command depends on the operation.
            Op::Trim | Op::Flush | Op::Extents | Op::Prefetch => {
                Sense::INVALID_COMMAND_OPERATION_CODE
            }
            Op::Read | Op::Write | Op::WriteZeroes => Sense::INVALID_FIELD_IN_CDB,
        },
        BlockError::NoSpace { .. } => Sense::SPACE_ALLOCATION_FAILED_WRITE_PROTECT,
        BlockError::Io { op, .. } => match op {
            Op::Read | Op::Extents | Op::Prefetch => Sense::UNRECOVERED_READ_ERROR,
            Op::Write | Op::Flush | Op::Trim | Op::WriteZeroes => Sense::WRITE_ERROR,
        },
        BlockError::ShuttingDown { .. } => Sense::NOT_READY_CAUSE_NOT_REPORTABLE,
    }
}

impl Outcome {
    pub fn good(data_in: impl Into<Bytes>) -> Outcome {
        Outcome {
            status: status::GOOD,
            sense: None,
            data_in: data_in.into(),
        }
    }

    pub fn check(sense: Sense) -> Outcome {
        Outcome {
            status: status::CHECK_CONDITION,
            sense: Some(sense),
            data_in: Bytes::new(),
        }
    }

    pub fn conflict() -> Outcome {
        Outcome {
            status: status::RESERVATION_CONFLICT,
            sense: None,
            data_in: Bytes::new(),
        }
    }

    fn from_pr(err: PrError) -> Outcome {
        match err {
            PrError::Sense(s) => Outcome::check(s),
            PrError::Conflict => Outcome::conflict(),
        }
    }
}

impl From<Sense> for Outcome {
    fn from(sense: Sense) -> Outcome {
        Outcome::check(sense)
    }
}

/// Truncates parameter data to the allocation length.
fn truncated(mut data: Vec<u8>, alloc: u32) -> Bytes {
    data.truncate(usize::try_from(alloc).unwrap_or(usize::MAX));
    Bytes::from(data)
}

type Exec = Result<Outcome, Sense>;

impl Lun {
    pub fn new(device: Arc<dyn BlockDevice>, identity: LunIdentity) -> Lun {
        let info = device.info();
        // 512-byte logical blocks unless the device cannot address that
        // finely.
        let block_size = info.block_sizes.min.max(512);
        // One logical block per physical block: image files are
        // byte-addressable, and a larger exponent makes initiators (and
        // libiscsi's GET LBA STATUS tests) expect physical-block-aligned
        // allocation reports that a file's extents do not give.
        let lbppb_exponent = 0;
        let digest = ring::digest::digest(&ring::digest::SHA256, identity.volume_name.as_bytes());
        let hash = digest.as_ref();
        let mut naa = [0u8; 8];
        naa.copy_from_slice(&hash[..8]);
        // NAA 3h: locally assigned, 60 bits of identifier.
        naa[0] = 0x30 | (naa[0] & 0x0f);
        let serial = hash[..8].iter().fold(String::new(), |mut s, b| {
            use std::fmt::Write as _;
            let _ = write!(s, "{b:02x}");
            s
        });
        let mode = ModeState::default_for(&mode_params(&info, block_size));
        let blocks = info.size / u64::from(block_size);
        Lun {
            device,
            identity,
            block_size,
            lbppb_exponent,
            serial,
            naa,
            reservations: Mutex::new(Reservations::default()),
            mode: Mutex::new(mode),
            unit_attentions: Mutex::new(HashMap::new()),
            io_lock: tokio::sync::RwLock::new(()),
            last_blocks: AtomicU64::new(blocks),
            preempted: Mutex::new(Vec::new()),
        }
    }

    /// The logical block length in bytes.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn identity(&self) -> &LunIdentity {
        &self.identity
    }

    /// The device's current capacity in logical blocks.
    fn blocks(&self, info: &DeviceInfo) -> u64 {
        info.size / u64::from(self.block_size)
    }

    fn max_transfer_blocks(&self, info: &DeviceInfo) -> u32 {
        (info.block_sizes.max / self.block_size).max(1)
    }

    fn inquiry_params<'a>(&'a self, info: &DeviceInfo) -> InquiryParams<'a> {
        InquiryParams {
            vendor: &self.identity.vendor,
            product: &self.identity.product,
            revision: &self.identity.revision,
            serial: &self.serial,
            naa: self.naa,
            volume_name: &self.identity.volume_name,
            lbppb_exponent: self.lbppb_exponent,
            max_transfer_blocks: self.max_transfer_blocks(info),
            can_trim: info.caps.trim,
        }
    }

    // ---- unit attentions -------------------------------------------------

    /// Queues a unit attention for one I_T nexus.
    pub fn queue_unit_attention(&self, nexus: &Nexus, sense: Sense) {
        let mut uas = lock(&self.unit_attentions);
        let queue = uas.entry(nexus.clone()).or_default();
        if !queue.contains(&sense) {
            queue.push_back(sense);
        }
    }

    /// Queues a unit attention for every known I_T nexus but `except`.
    fn queue_for_others(&self, except: Option<&Nexus>, sense: Sense) {
        let mut uas = lock(&self.unit_attentions);
        for (nexus, queue) in uas.iter_mut() {
            if Some(nexus) != except && !queue.contains(&sense) {
                queue.push_back(sense);
            }
        }
    }

    /// Registers the nexus and returns its oldest pending unit attention,
    /// removing it when `take`.
    fn pending_unit_attention(&self, nexus: &Nexus, take: bool) -> Option<Sense> {
        let mut uas = lock(&self.unit_attentions);
        let queue = uas.entry(nexus.clone()).or_default();
        if take {
            queue.pop_front()
        } else {
            queue.front().copied()
        }
    }

    /// Queues the unit attentions a reservation change causes, and notes
    /// whose commands PREEMPT AND ABORT aborts (the transport, which knows
    /// the sessions, carries that out).
    fn apply_effects(&self, effects: &pr::Effects) {
        for (nexus, sense) in &effects.unit_attentions {
            self.queue_unit_attention(nexus, *sense);
        }
        if !effects.abort_tasks_of.is_empty() {
            lock(&self.preempted).extend(effects.abort_tasks_of.iter().cloned());
        }
    }

    /// The initiators a PREEMPT AND ABORT removed since the last call:
    /// every command of theirs on this LU must be aborted.
    pub fn take_preempted(&self) -> Vec<Nexus> {
        std::mem::take(&mut *lock(&self.preempted))
    }

    /// An I_T nexus ended: its RESERVE(6) goes, its unit attentions too.
    pub fn nexus_lost(&self, nexus: &Nexus) {
        let effects = lock(&self.reservations).nexus_lost(nexus);
        lock(&self.unit_attentions).remove(nexus);
        self.apply_effects(&effects);
    }

    /// LOGICAL UNIT RESET (or a target reset reaching this LU): RESERVE(6)
    /// released, mode parameters back to defaults, and every I_T nexus gets
    /// POWER ON, RESET, OR BUS DEVICE RESET OCCURRED (29h/00h), which
    /// replaces its other pending unit attentions (SPC-4 §5.14). 29h/00h
    /// rather than the more specific 29h/03h because it is the one
    /// initiators (libiscsi's RESERVE(6) retry among them) treat as the
    /// ordinary after-reset condition.
    pub fn reset(&self, _kind: ResetKind) {
        let effects = lock(&self.reservations).reset();
        let info = self.device.info();
        *lock(&self.mode) = ModeState::default_for(&mode_params(&info, self.block_size));
        {
            let mut uas = lock(&self.unit_attentions);
            for queue in uas.values_mut() {
                queue.clear();
                queue.push_back(Sense::POWER_ON_OR_RESET);
            }
        }
        self.apply_effects(&effects);
    }

    // ---- execution -------------------------------------------------------

    /// Executes one CDB from `nexus` with its Data-Out bytes.
    pub async fn execute(&self, nexus: &Nexus, cdb: &[u8], data_out: Bytes) -> Outcome {
        let info = self.device.info();
        let blocks = self.blocks(&info);
        if self.last_blocks.swap(blocks, Ordering::Relaxed) != blocks {
            self.queue_for_others(None, Sense::CAPACITY_DATA_CHANGED);
        }
        let decoded = super::cdb::decode_cdb(cdb);
        let informational = decoded.as_ref().is_ok_and(Command::is_informational);
        // SPC-4 §5.14: a pending unit attention fails any command but
        // INQUIRY, REPORT LUNS and REQUEST SENSE (which reports it).
        if !informational {
            if let Some(ua) = self.pending_unit_attention(nexus, true) {
                return Outcome::check(ua);
            }
        }
        let command = match decoded {
            Ok(c) => c,
            Err(sense) => return Outcome::check(sense),
        };
        if let Err(e) = lock(&self.reservations).check_access(nexus, cdb) {
            return Outcome::from_pr(e);
        }
        match self.run(nexus, command, cdb, data_out, &info).await {
            Ok(outcome) | Err(outcome) => outcome,
        }
    }

    #[allow(clippy::too_many_lines)]
    async fn run(
        &self,
        nexus: &Nexus,
        command: Command,
        cdb: &[u8],
        data_out: Bytes,
        info: &DeviceInfo,
    ) -> Result<Outcome, Outcome> {
        let result: Exec = match command {
            Command::TestUnitReady => Ok(Outcome::good(Bytes::new())),
            Command::RequestSense { descriptor, alloc } => {
                let sense = self
                    .pending_unit_attention(nexus, true)
                    .unwrap_or(Sense::NO_SENSE);
                let data = if descriptor {
                    sense.to_descriptor()
                } else {
                    sense.to_fixed().to_vec()
                };
                Ok(Outcome::good(truncated(data, alloc)))
            }
            Command::Inquiry { evpd, page, alloc } => {
                let p = self.inquiry_params(info);
                let data = if evpd {
                    inquiry::vpd(&p, page)?
                } else {
                    inquiry::standard(&p)
                };
                Ok(Outcome::good(truncated(data, alloc)))
            }
            Command::ReadCapacity10 => {
                let last = self.blocks(info).saturating_sub(1);
                let mut d = Vec::with_capacity(8);
                d.extend_from_slice(&u32::try_from(last).unwrap_or(u32::MAX).to_be_bytes());
                d.extend_from_slice(&self.block_size.to_be_bytes());
                Ok(Outcome::good(d))
            }
            Command::ReadCapacity16 { alloc } => {
                Ok(Outcome::good(truncated(self.read_capacity16(info), alloc)))
            }
            Command::ModeSense {
                ten,
                dbd,
                llbaa,
                pc,
                page,
                subpage,
                alloc,
            } => {
                let state = *lock(&self.mode);
                let req = ModeRequest {
                    ten,
                    dbd,
                    llbaa,
                    pc,
                    page,
                    subpage,
                };
                let data = mode::sense(&req, &state, &mode_params(info, self.block_size))?;
                Ok(Outcome::good(truncated(data, alloc)))
            }
            Command::ModeSelect {
                ten,
                pf,
                sp,
                param_len,
            } => self.mode_select(nexus, ten, pf, sp, param_len, &data_out, info),
            Command::ReportLuns { .. } | Command::ReportSupportedOpcodes { .. } => {
                // REPORT LUNS is answered by the LunMap, which knows all LUNs.
                match command {
                    Command::ReportSupportedOpcodes {
                        rctd,
                        options,
                        opcode,
                        service_action,
                        alloc,
                    } => {
                        let data =
                            opcodes::report(info.caps.trim, rctd, options, opcode, service_action)?;
                        Ok(Outcome::good(truncated(data, alloc)))
                    }
                    _ => Err(Sense::INTERNAL_TARGET_FAILURE),
                }
            }
            Command::Read { lba, blocks, .. } => self.read(lba, blocks, info).await,
            Command::Write {
                lba,
                blocks,
                fua,
                source,
            } => {
                let or = source == WriteSource::Or;
                self.write(lba, blocks, fua, data_out, or, info).await
            }
            Command::Verify {
                lba,
                blocks,
                bytchk,
            } => self.verify(lba, blocks, bytchk, &data_out, info).await,
            Command::SynchronizeCache { lba, blocks } => {
                self.check_range(lba, u64::from(blocks), info)?;
                if info.caps.flush {
                    self.device
                        .flush()
                        .await
                        .map_err(|e| block_error_sense(&e))?;
                }
                Ok(Outcome::good(Bytes::new()))
            }
            Command::PreFetch { lba, blocks } => {
                self.check_range(lba, u64::from(blocks), info)?;
                if info.caps.prefetch && blocks > 0 {
                    let (offset, len) = self.byte_range(lba, u64::from(blocks));
                    self.device
                        .prefetch(offset, len)
                        .await
                        .map_err(|e| block_error_sense(&e))?;
                }
                // GOOD ("not all of it fits the cache") rather than
                // CONDITION MET: libiscsi expects GOOD from PRE-FETCH.
                Ok(Outcome::good(Bytes::new()))
            }
            Command::Unmap { param_len } => self.unmap(param_len, &data_out, info).await,
            Command::WriteSame {
                lba,
                blocks,
                unmap,
                ndob,
            } => {
                self.write_same(cdb, lba, blocks, unmap, ndob, &data_out, info)
                    .await
            }
            Command::GetLbaStatus { lba, alloc } => self.get_lba_status(lba, alloc, info).await,
            Command::CompareAndWrite { lba, blocks, fua } => {
                self.compare_and_write(lba, blocks, fua, &data_out, info)
                    .await
            }
            Command::StartStopUnit { loej, .. } => {
                // Not removable: there is no medium to load or eject.
                if loej {
                    Err(Sense::INVALID_FIELD_IN_CDB.at_cdb(4, Some(1)))
                } else {
                    Ok(Outcome::good(Bytes::new()))
                }
            }
            Command::PreventAllowMediumRemoval { prevent } => {
                // 00b/01b are accepted (nothing to lock on a fixed medium);
                // the obsolete persistent prevention is not.
                if prevent > 1 {
                    Err(Sense::INVALID_FIELD_IN_CDB.at_cdb(4, Some(1)))
                } else {
                    Ok(Outcome::good(Bytes::new()))
                }
            }
            Command::Reserve6 => {
                let r = lock(&self.reservations).reserve6(nexus);
                return r
                    .map(|()| Outcome::good(Bytes::new()))
                    .map_err(Outcome::from_pr);
            }
            Command::Release6 => {
                let r = lock(&self.reservations).release6(nexus);
                return r
                    .map(|()| Outcome::good(Bytes::new()))
                    .map_err(Outcome::from_pr);
            }
            Command::PersistentReserveIn { alloc } => {
                let r = lock(&self.reservations).persistent_reserve_in(nexus, cdb);
                return r
                    .map(|data| Outcome::good(truncated(data, alloc)))
                    .map_err(Outcome::from_pr);
            }
            Command::PersistentReserveOut { param_len } => {
                let n = data_out
                    .len()
                    .min(usize::try_from(param_len).unwrap_or(usize::MAX));
                let r = lock(&self.reservations).persistent_reserve_out(nexus, cdb, &data_out[..n]);
                return match r {
                    Ok(effects) => {
                        self.apply_effects(&effects);
                        Ok(Outcome::good(Bytes::new()))
                    }
                    Err(e) => Err(Outcome::from_pr(e)),
                };
            }
            Command::ReadDefectData {
                twelve,
                flags,
                alloc,
            } => {
                // No defects: a header with an empty list (SBC-3 §5.19/5.20).
                let data = if twelve {
                    vec![0, flags, 0, 0, 0, 0, 0, 0]
                } else {
                    vec![0, flags, 0, 0]
                };
                Ok(Outcome::good(truncated(data, alloc)))
            }
        };
        result.map_err(Outcome::check)
    }

    /// READ CAPACITY (16) parameter data (SBC-3 table 65), 32 bytes:
    /// 0..8 last LBA, 8..12 block length, 13 LBPPB exponent, 14..16 LBPME,
    /// LBPRZ and the lowest aligned LBA (0).
    fn read_capacity16(&self, info: &DeviceInfo) -> Vec<u8> {
        let mut d = vec![0u8; 32];
        d[..8].copy_from_slice(&self.blocks(info).saturating_sub(1).to_be_bytes());
        d[8..12].copy_from_slice(&self.block_size.to_be_bytes());
        d[13] = self.lbppb_exponent & 0x0f;
        if info.caps.trim {
            d[14] = 0x80 | 0x40;
        }
        d
    }

    fn byte_range(&self, lba: u64, blocks: u64) -> (u64, u64) {
        let bs = u64::from(self.block_size);
        (lba * bs, blocks * bs)
    }

    /// LBA OUT OF RANGE unless `[lba, lba + blocks)` is within capacity.
    fn check_range(&self, lba: u64, blocks: u64, info: &DeviceInfo) -> Result<(), Sense> {
        match lba.checked_add(blocks) {
            Some(end) if end <= self.blocks(info) => Ok(()),
            _ => Err(Sense::LBA_OUT_OF_RANGE),
        }
    }

    fn check_transfer(&self, blocks: u32, info: &DeviceInfo) -> Result<(), Sense> {
        if blocks > self.max_transfer_blocks(info) {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        Ok(())
    }

    fn check_writable(info: &DeviceInfo) -> Result<(), Sense> {
        if info.caps.read_only {
            return Err(Sense::WRITE_PROTECTED);
        }
        Ok(())
    }

    /// FUA, or any write while the write cache is disabled (WCE = 0).
    fn write_flags(&self, fua: bool) -> WriteFlags {
        WriteFlags {
            fua: fua || !lock(&self.mode).wce,
        }
    }

    async fn read(&self, lba: u64, blocks: u32, info: &DeviceInfo) -> Exec {
        self.check_range(lba, u64::from(blocks), info)?;
        self.check_transfer(blocks, info)?;
        if blocks == 0 {
            return Ok(Outcome::good(Bytes::new()));
        }
        let (offset, len) = self.byte_range(lba, u64::from(blocks));
        let data = self
            .device
            .read(offset, usize::try_from(len).unwrap_or(usize::MAX))
            .await
            .map_err(|e| block_error_sense(&e))?;
        Ok(Outcome::good(data))
    }

    /// WRITE, WRITE AND VERIFY and ORWRITE. Only whole blocks actually
    /// received are written: when the initiator sends less than the CDB
    /// asks for (iSCSI Expected Data Transfer Length below the transfer
    /// length), the prefix is written and the transport reports the
    /// residual, as libiscsi's iSCSIResiduals tests expect. ORWRITE (`or`)
    /// stores the old bytes OR the new ones, reading and writing under the
    /// exclusive I/O lock (as COMPARE AND WRITE) so no other write lands
    /// in between.
    async fn write(
        &self,
        lba: u64,
        blocks: u32,
        fua: bool,
        data: Bytes,
        or: bool,
        info: &DeviceInfo,
    ) -> Exec {
        self.check_range(lba, u64::from(blocks), info)?;
        self.check_transfer(blocks, info)?;
        Self::check_writable(info)?;
        let bs = u64::from(self.block_size);
        let wanted = u64::from(blocks) * bs;
        let have = (data.len() as u64).min(wanted) / bs * bs;
        if have == 0 {
            return Ok(Outcome::good(Bytes::new()));
        }
        let data = data.slice(..usize::try_from(have).unwrap_or(usize::MAX));
        let flags = self.write_flags(fua);
        let write = |data: Bytes| async move {
            self.device
                .write(lba * bs, data, flags)
                .await
                .map_err(|e| block_error_sense(&e))
        };
        if or {
            let _exclusive = self.io_lock.write().await;
            let stored = self
                .device
                .read(lba * bs, data.len())
                .await
                .map_err(|e| block_error_sense(&e))?;
            let merged: Vec<u8> = stored.iter().zip(&data[..]).map(|(a, b)| a | b).collect();
            write(Bytes::from(merged)).await?;
        } else {
            let _shared = self.io_lock.read().await;
            write(data).await?;
        }
        Ok(Outcome::good(Bytes::new()))
    }

    async fn verify(
        &self,
        lba: u64,
        blocks: u32,
        bytchk: ByteCheck,
        data: &Bytes,
        info: &DeviceInfo,
    ) -> Exec {
        self.check_range(lba, u64::from(blocks), info)?;
        self.check_transfer(blocks, info)?;
        if blocks == 0 || bytchk == ByteCheck::None {
            // The medium is always readable as far as we can tell cheaply.
            return Ok(Outcome::good(Bytes::new()));
        }
        let (offset, len) = self.byte_range(lba, u64::from(blocks));
        let stored = self
            .device
            .read(offset, usize::try_from(len).unwrap_or(usize::MAX))
            .await
            .map_err(|e| block_error_sense(&e))?;
        let bs = self.block_size as usize;
        let mismatch = if bytchk == ByteCheck::OneBlock {
            if data.len() < bs {
                return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
            }
            let pattern = &data[..bs];
            stored
                .chunks(bs)
                .enumerate()
                .find_map(|(i, block)| first_difference(block, pattern).map(|at| i * bs + at))
        } else {
            let n = data.len().min(stored.len());
            first_difference(&stored[..n], &data[..n])
        };
        match mismatch {
            Some(at) => Err(Sense::MISCOMPARE_DURING_VERIFY
                .with_information(u32::try_from(at).unwrap_or(u32::MAX))),
            None => Ok(Outcome::good(Bytes::new())),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn mode_select(
        &self,
        nexus: &Nexus,
        ten: bool,
        pf: bool,
        sp: bool,
        param_len: u32,
        data: &Bytes,
        info: &DeviceInfo,
    ) -> Exec {
        if sp {
            // No saved pages.
            return Err(Sense::INVALID_FIELD_IN_CDB.at_cdb(1, Some(0)));
        }
        if param_len == 0 {
            return Ok(Outcome::good(Bytes::new()));
        }
        if !pf {
            // Only the standard (page format) parameter layout.
            return Err(Sense::INVALID_FIELD_IN_CDB.at_cdb(1, Some(4)));
        }
        let n = data
            .len()
            .min(usize::try_from(param_len).unwrap_or(usize::MAX));
        let params = mode_params(info, self.block_size);
        let mut state = lock(&self.mode);
        let changed = mode::select(ten, &data[..n], &mut state, &params)?;
        drop(state);
        if changed {
            self.queue_for_others(Some(nexus), Sense::MODE_PARAMETERS_CHANGED);
        }
        Ok(Outcome::good(Bytes::new()))
    }

    /// UNMAP (SBC-3 §5.28). Parameter list: 0..2 UNMAP DATA LENGTH, 2..4
    /// BLOCK DESCRIPTOR DATA LENGTH, 8.. descriptors of 16 bytes (0..8 LBA,
    /// 8..12 number of blocks). Every descriptor is checked before any
    /// block is unmapped.
    async fn unmap(&self, param_len: u32, data: &Bytes, info: &DeviceInfo) -> Exec {
        if !info.caps.trim {
            return Err(Sense::INVALID_COMMAND_OPERATION_CODE);
        }
        if param_len == 0 {
            return Ok(Outcome::good(Bytes::new()));
        }
        if param_len < 8 {
            return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        let n = data
            .len()
            .min(usize::try_from(param_len).unwrap_or(usize::MAX));
        let list = &data[..n];
        if list.len() < 8 {
            return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        Self::check_writable(info)?;
        let bd_len = usize::from(u16::from_be_bytes([list[2], list[3]]));
        let descriptors = &list[8..(8 + bd_len).min(list.len())];
        let count = descriptors.len() / 16;
        if count > inquiry::MAX_UNMAP_DESCRIPTORS as usize {
            return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST.at_parameter(2, None));
        }
        let mut ranges = Vec::with_capacity(count);
        for (i, d) in descriptors.chunks_exact(16).enumerate() {
            let lba = u64::from_be_bytes(d[..8].try_into().unwrap_or([0; 8]));
            let blocks = u32::from_be_bytes(d[8..12].try_into().unwrap_or([0; 4]));
            if blocks > inquiry::MAX_UNMAP_BLOCKS {
                let at = u16::try_from(8 + i * 16 + 8).unwrap_or(u16::MAX);
                return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST.at_parameter(at, None));
            }
            self.check_range(lba, u64::from(blocks), info)?;
            if blocks > 0 {
                ranges.push(self.byte_range(lba, u64::from(blocks)));
            }
        }
        let _shared = self.io_lock.read().await;
        for (offset, len) in ranges {
            self.device
                .trim(offset, len, WriteFlags::default())
                .await
                .map_err(|e| block_error_sense(&e))?;
        }
        Ok(Outcome::good(Bytes::new()))
    }

    /// WRITE SAME (10)/(16), SBC-3 §5.42/5.43. With UNMAP on a device that
    /// can deallocate, the range is deallocated whatever the pattern, as
    /// SBC-3 permits and libiscsi's UnmapUntilEnd expects (LBPRZ makes it
    /// read back as zeroes); otherwise the pattern is written to every
    /// block, as write-zeroes when it is all zeroes.
    #[allow(clippy::too_many_arguments)]
    async fn write_same(
        &self,
        cdb: &[u8],
        lba: u64,
        blocks: u32,
        unmap: bool,
        ndob: bool,
        data: &Bytes,
        info: &DeviceInfo,
    ) -> Exec {
        let count_byte: u16 = if cdb.first() == Some(&0x41) { 7 } else { 10 };
        self.check_range(lba, u64::from(blocks), info)?;
        // A write-protected medium says so before any field is judged.
        Self::check_writable(info)?;
        // WSNZ: zero blocks ("to the end of the medium") is refused.
        if blocks == 0 || blocks > inquiry::MAX_WRITE_SAME_BLOCKS {
            return Err(Sense::INVALID_FIELD_IN_CDB.at_cdb(count_byte, None));
        }
        let bs = self.block_size as usize;
        // Exactly one block of Data-Out, or none with NDOB.
        let pattern: &[u8] = if ndob {
            &[]
        } else if data.len() == bs {
            data
        } else {
            return Err(Sense::INVALID_FIELD_IN_CDB.at_cdb(count_byte, None));
        };
        let (offset, len) = self.byte_range(lba, u64::from(blocks));
        let fua = !lock(&self.mode).wce;
        let _shared = self.io_lock.read().await;
        let zero = pattern.iter().all(|&b| b == 0);
        if (unmap && info.caps.trim) || zero {
            let flags = ZeroFlags {
                fua,
                may_trim: unmap,
                fast_only: false,
            };
            self.device
                .write_zeroes(offset, len, flags)
                .await
                .map_err(|e| block_error_sense(&e))?;
            return Ok(Outcome::good(Bytes::new()));
        }
        // Repeat the pattern into a buffer of whole blocks and write it
        // as many times as needed.
        let per_chunk = (WRITE_SAME_CHUNK / bs)
            .max(1)
            .min(self.max_transfer_blocks(info) as usize);
        let chunk_blocks = per_chunk.min(blocks as usize);
        let mut buf = BytesMut::with_capacity(chunk_blocks * bs);
        for _ in 0..chunk_blocks {
            buf.extend_from_slice(pattern);
        }
        let buf = buf.freeze();
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let take = usize::try_from((end - at).min(buf.len() as u64)).unwrap_or(buf.len());
            self.device
                .write(at, buf.slice(..take), WriteFlags { fua })
                .await
                .map_err(|e| block_error_sense(&e))?;
            at += take as u64;
        }
        Ok(Outcome::good(Bytes::new()))
    }

    /// GET LBA STATUS (SBC-3 §5.7): an 8-byte header (0..4 PARAMETER DATA
    /// LENGTH) and descriptors of 16 bytes (0..8 LBA, 8..12 number of
    /// blocks, 12 provisioning status: 0 mapped, 1 deallocated) from the
    /// device's allocation map, starting at `lba`.
    async fn get_lba_status(&self, lba: u64, alloc: u32, info: &DeviceInfo) -> Exec {
        let capacity = self.blocks(info);
        if lba >= capacity {
            return Err(Sense::LBA_OUT_OF_RANGE);
        }
        let bs = u64::from(self.block_size);
        // Enough descriptors to fill the allocation length (at least one).
        let max_descriptors = (alloc.saturating_sub(8) / 16).max(1) as usize;
        // Look at most this far ahead: the answer may cover a prefix.
        let span = (capacity - lba).min(1 << 24) * bs;
        let extents = self
            .device
            .extents(lba * bs, span)
            .await
            .map_err(|e| block_error_sense(&e))?;
        let mut runs: Vec<(u64, u64, u8)> = Vec::new();
        let mut pos = lba;
        for e in extents {
            let deallocated = match e.kind {
                ExtentKind::Hole => true,
                ExtentKind::Zero => info.caps.trim,
                ExtentKind::Data => false,
            };
            let end_byte = e.offset + e.len;
            // A block counts as deallocated only if wholly inside such an
            // extent; a partly allocated block is mapped.
            let end = if deallocated {
                end_byte / bs
            } else {
                end_byte.div_ceil(bs)
            };
            if end <= pos {
                continue;
            }
            let state = u8::from(deallocated);
            match runs.last_mut() {
                Some(last) if last.2 == state && last.0 + last.1 == pos => last.1 += end - pos,
                _ => {
                    if runs.len() == max_descriptors {
                        break;
                    }
                    runs.push((pos, end - pos, state));
                }
            }
            pos = end;
        }
        if runs.is_empty() {
            runs.push((lba, 1, 0));
        }
        let mut d = vec![0u8; 8];
        for (start, count, state) in &runs {
            d.extend_from_slice(&start.to_be_bytes());
            d.extend_from_slice(&u32::try_from(*count).unwrap_or(u32::MAX).to_be_bytes());
            d.extend_from_slice(&[*state, 0, 0, 0]);
        }
        let len = u32::try_from(d.len() - 4).unwrap_or(u32::MAX);
        d[..4].copy_from_slice(&len.to_be_bytes());
        Ok(Outcome::good(truncated(d, alloc)))
    }

    /// COMPARE AND WRITE (SBC-3 §5.2): Data-Out holds `blocks` blocks to
    /// compare then `blocks` blocks to write. Runs under the exclusive I/O
    /// lock, so no other write on this LUN interleaves.
    async fn compare_and_write(
        &self,
        lba: u64,
        blocks: u32,
        fua: bool,
        data: &Bytes,
        info: &DeviceInfo,
    ) -> Exec {
        self.check_range(lba, u64::from(blocks), info)?;
        let (offset, len) = self.byte_range(lba, u64::from(blocks));
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        // The data must be exactly the compare and the write buffers; a
        // NUMBER OF LOGICAL BLOCKS that disagrees with it (for instance a
        // count of 256 that wrapped to 0 in the one-byte field) is refused
        // rather than half-done.
        if data.len() != 2 * len {
            return Err(Sense::INVALID_FIELD_IN_CDB.at_cdb(13, None));
        }
        if blocks == 0 {
            return Ok(Outcome::good(Bytes::new()));
        }
        Self::check_writable(info)?;
        let flags = self.write_flags(fua);
        let _exclusive = self.io_lock.write().await;
        let stored = self
            .device
            .read(offset, len)
            .await
            .map_err(|e| block_error_sense(&e))?;
        if let Some(at) = first_difference(&stored, &data[..len]) {
            return Err(Sense::MISCOMPARE_DURING_VERIFY
                .with_information(u32::try_from(at).unwrap_or(u32::MAX)));
        }
        self.device
            .write(offset, data.slice(len..), flags)
            .await
            .map_err(|e| block_error_sense(&e))?;
        Ok(Outcome::good(Bytes::new()))
    }
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn mode_params(info: &DeviceInfo, block_size: u32) -> ModeParams {
    ModeParams {
        read_only: info.caps.read_only,
        has_cache: info.caps.flush,
        block_size,
        blocks: info.size / u64::from(block_size),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use blockcore::MemDevice;
    use bytes::Bytes;
    use proptest::prelude::*;

    use super::*;
    use crate::scsi::{LunMap, SenseKey};

    const SIZE: u64 = 4 * 1024 * 1024; // 8192 blocks

    fn identity(name: &str) -> LunIdentity {
        LunIdentity {
            volume_name: name.to_string(),
            vendor: "FERRY".to_string(),
            product: "ferry disk".to_string(),
            revision: "0.1".to_string(),
        }
    }

    fn map_with(dev: MemDevice) -> LunMap {
        LunMap::new(vec![(
            0,
            Arc::new(Lun::new(Arc::new(dev), identity("vol0"))),
        )])
    }

    fn map() -> LunMap {
        map_with(MemDevice::new(SIZE))
    }

    fn nexus(isid: u8) -> Nexus {
        Nexus {
            initiator_name: "iqn.2024-01.test:init".to_string(),
            isid: [0x80, 0, 0, 0, 0, isid],
            tpgt: 1,
        }
    }

    async fn run(m: &LunMap, cdb: &[u8], data: &[u8]) -> Outcome {
        m.execute(&nexus(1), 0, cdb, Bytes::copy_from_slice(data))
            .await
    }

    fn rw10(op: u8, lba: u32, blocks: u16) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[0] = op;
        c[2..6].copy_from_slice(&lba.to_be_bytes());
        c[7..9].copy_from_slice(&blocks.to_be_bytes());
        c
    }

    fn cmd16(op: u8, byte1: u8, lba: u64, count: u32) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = op;
        c[1] = byte1;
        c[2..10].copy_from_slice(&lba.to_be_bytes());
        c[10..14].copy_from_slice(&count.to_be_bytes());
        c
    }

    fn caw(lba: u64, blocks: u8) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = 0x89;
        c[2..10].copy_from_slice(&lba.to_be_bytes());
        c[13] = blocks;
        c
    }

    fn assert_sense(o: &Outcome, key: SenseKey, asc: u8, ascq: u8) {
        assert_eq!(o.status, status::CHECK_CONDITION, "{o:?}");
        let s = o.sense.unwrap();
        assert_eq!((s.key, s.asc, s.ascq), (key, asc, ascq), "{s:?}");
    }

    #[tokio::test]
    async fn standard_inquiry_and_stable_naa() {
        let m = map();
        let o = run(&m, &[0x12, 0, 0, 0, 255, 0], &[]).await;
        assert_eq!(o.status, status::GOOD);
        assert_eq!(o.data_in.len(), 96);
        assert_eq!(&o.data_in[..5], &[0, 0, 6, 0x12, 91]);
        assert_eq!(&o.data_in[8..16], b"FERRY   ");
        // Allocation length cuts the data.
        let o = run(&m, &[0x12, 0, 0, 0, 10, 0], &[]).await;
        assert_eq!(o.data_in.len(), 10);
        // Same volume name, same designator; another name, another one.
        let id = run(&m, &[0x12, 1, 0x83, 0, 255, 0], &[]).await.data_in;
        let again = run(&map(), &[0x12, 1, 0x83, 0, 255, 0], &[]).await.data_in;
        assert_eq!(id, again);
        assert_eq!(id[8] >> 4, 3, "NAA 3h");
        let other = LunMap::new(vec![(
            0,
            Arc::new(Lun::new(Arc::new(MemDevice::new(SIZE)), identity("vol1"))),
        )]);
        let other_id = run(&other, &[0x12, 1, 0x83, 0, 255, 0], &[]).await.data_in;
        assert_ne!(id[8..16], other_id[8..16]);
        // EVPD clear with a page code: INVALID FIELD IN CDB.
        let o = run(&m, &[0x12, 0, 1, 1, 0, 0], &[]).await;
        assert_sense(&o, SenseKey::IllegalRequest, 0x24, 0);
    }

    #[tokio::test]
    async fn read_capacity_10_and_16() {
        let m = map();
        let o = run(&m, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await;
        assert_eq!(&o.data_in[..], &[0, 0, 0x1f, 0xff, 0, 0, 2, 0]);
        let mut cdb = [0u8; 16];
        cdb[0] = 0x9e;
        cdb[1] = 0x10;
        cdb[13] = 32;
        let o = run(&m, &cdb, &[]).await;
        let mut want = [0u8; 32];
        want[..8].copy_from_slice(&8191u64.to_be_bytes());
        want[8..12].copy_from_slice(&512u32.to_be_bytes());
        // want[13] = 0: one logical block per physical block (see Lun::new).
        want[14] = 0xc0; // LBPME, LBPRZ
        assert_eq!(&o.data_in[..], &want[..]);
        // Short allocation length: a prefix, still GOOD.
        cdb[13] = 12;
        let o = run(&m, &cdb, &[]).await;
        assert_eq!(o.status, status::GOOD);
        assert_eq!(&o.data_in[..], &want[..12]);
    }

    #[tokio::test]
    async fn write_read_round_trip_and_fua() {
        let m = map();
        let data: Vec<u8> = (0..1024u32).map(|i| (i % 251) as u8).collect();
        let mut w = rw10(0x2a, 10, 2);
        w[1] = 0x18; // DPO + FUA
        assert_eq!(run(&m, &w, &data).await.status, status::GOOD);
        let o = run(&m, &rw10(0x28, 10, 2), &[]).await;
        assert_eq!(o.status, status::GOOD);
        assert_eq!(&o.data_in[..], &data[..]);
        let o = run(&m, &cmd16(0x88, 0, 10, 1), &[]).await;
        assert_eq!(&o.data_in[..], &data[..512]);
    }

    #[tokio::test]
    async fn short_data_out_writes_only_whole_blocks_received() {
        let m = map();
        run(&m, &rw10(0x2a, 0, 2), &[b'a'; 1024]).await;
        // Two blocks asked for, one sent: only the first is written.
        let o = run(&m, &rw10(0x2a, 0, 2), &[b'b'; 512]).await;
        assert_eq!(o.status, status::GOOD);
        let o = run(&m, &rw10(0x28, 0, 2), &[]).await;
        assert!(o.data_in[..512].iter().all(|&b| b == b'b'));
        assert!(o.data_in[512..].iter().all(|&b| b == b'a'));
    }

    #[tokio::test]
    async fn out_of_range_and_write_protect() {
        let m = map();
        let o = run(&m, &rw10(0x28, 8191, 2), &[]).await;
        assert_sense(&o, SenseKey::IllegalRequest, 0x21, 0);
        let o = run(&m, &cmd16(0x88, 0, u64::MAX, 1), &[]).await;
        assert_sense(&o, SenseKey::IllegalRequest, 0x21, 0);
        // Zero blocks at the capacity is fine, one past it is not.
        assert_eq!(
            run(&m, &rw10(0x28, 8192, 0), &[]).await.status,
            status::GOOD
        );
        let o = run(&m, &rw10(0x28, 8193, 0), &[]).await;
        assert_sense(&o, SenseKey::IllegalRequest, 0x21, 0);

        let ro = map_with(MemDevice::new(SIZE).read_only());
        let o = run(&ro, &rw10(0x2a, 0, 1), &[0; 512]).await;
        assert_sense(&o, SenseKey::DataProtect, 0x27, 0);
        // MODE SENSE reports WP.
        let o = run(&ro, &[0x1a, 0x08, 0x3f, 0, 255, 0], &[]).await;
        assert_eq!(o.data_in[2] & 0x80, 0x80);
    }

    #[tokio::test]
    async fn block_errors_map_to_sense() {
        let e = BlockError::Io {
            op: Op::Read,
            offset: 0,
            source: std::io::Error::other("x"),
        };
        assert_eq!(block_error_sense(&e), Sense::UNRECOVERED_READ_ERROR);
        let e = BlockError::Io {
            op: Op::Write,
            offset: 0,
            source: std::io::Error::other("x"),
        };
        assert_eq!(block_error_sense(&e), Sense::WRITE_ERROR);
        let e = BlockError::NoSpace {
            op: Op::Write,
            offset: 0,
        };
        assert_eq!(
            block_error_sense(&e),
            Sense::SPACE_ALLOCATION_FAILED_WRITE_PROTECT
        );
    }

    #[tokio::test]
    async fn compare_and_write_miscompare_reports_offset() {
        let m = map();
        run(&m, &rw10(0x2a, 4, 2), &[b'A'; 1024]).await;
        let mut data = vec![b'A'; 1024];
        data[1024 - 27] = b'C';
        data.extend(vec![b'B'; 1024]);
        let o = run(&m, &caw(4, 2), &data).await;
        assert_sense(&o, SenseKey::Miscompare, 0x1d, 0);
        assert_eq!(o.sense.unwrap().information, Some(1024 - 27));
        assert_eq!(
            o.sense.unwrap().to_fixed()[..7],
            [0xf0, 0, 0x0e, 0, 0, 0x03, 0xe5]
        );
        // Nothing written.
        let r = run(&m, &rw10(0x28, 4, 2), &[]).await;
        assert!(r.data_in.iter().all(|&b| b == b'A'));
        // Matching compare: written.
        data[1024 - 27] = b'A';
        assert_eq!(run(&m, &caw(4, 2), &data).await.status, status::GOOD);
        let r = run(&m, &rw10(0x28, 4, 2), &[]).await;
        assert!(r.data_in.iter().all(|&b| b == b'B'));
        // Wrong Data-Out size.
        let o = run(&m, &caw(4, 2), &data[..1024]).await;
        assert_sense(&o, SenseKey::IllegalRequest, 0x24, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn compare_and_write_is_atomic_against_writers() {
        // A counter in block 0, incremented by CAW from many tasks while
        // other tasks keep writing the same value back: every successful
        // CAW must have seen the value it replaced, so the final value is
        // exactly the number of successes.
        let m = Arc::new(map());
        run(&m, &rw10(0x2a, 0, 1), &[0; 512]).await;
        let mut tasks = Vec::new();
        for t in 0..4u8 {
            let m = m.clone();
            tasks.push(tokio::spawn(async move {
                let mut wins = 0u32;
                for _ in 0..50 {
                    let cur = run(&m, &rw10(0x28, 0, 1), &[]).await.data_in;
                    let n = u32::from_be_bytes(cur[..4].try_into().unwrap());
                    let mut next = cur.to_vec();
                    next[..4].copy_from_slice(&(n + 1).to_be_bytes());
                    next[4] = t;
                    let mut data = cur.to_vec();
                    data.extend(next);
                    if run(&m, &caw(0, 1), &data).await.status == status::GOOD {
                        wins += 1;
                    }
                }
                wins
            }));
        }
        for _ in 0..2 {
            let m = m.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..100 {
                    // Rewrite block 1 (not the counter) to contend for the lock.
                    run(&m, &rw10(0x2a, 1, 1), &[7; 512]).await;
                }
                0
            }));
        }
        let mut wins = 0;
        for t in tasks {
            wins += t.await.unwrap();
        }
        let cur = run(&m, &rw10(0x28, 0, 1), &[]).await.data_in;
        assert_eq!(u32::from_be_bytes(cur[..4].try_into().unwrap()), wins);
        assert!(wins > 0);
    }

    #[tokio::test]
    async fn write_same_unmap_then_lba_status() {
        let m = map();
        // 256 blocks (two 64 KiB chunks of the MemDevice) of data at 0.
        run(&m, &rw10(0x2a, 0, 256), &vec![0xff; 256 * 512]).await;
        let mut ws = rw10(0x41, 0, 128);
        ws[1] = 0x08; // UNMAP
                      // Even a non-zero pattern: UNMAP deallocates, LBPRZ reads zeroes.
        assert_eq!(run(&m, &ws, &[0x5a; 512]).await.status, status::GOOD);
        let r = run(&m, &rw10(0x28, 0, 256), &[]).await;
        assert!(r.data_in[..128 * 512].iter().all(|&b| b == 0));
        assert!(r.data_in[128 * 512..].iter().all(|&b| b == 0xff));
        let mut gls = cmd16(0x9e, 0x12, 0, 0);
        gls[10..14].copy_from_slice(&64u32.to_be_bytes());
        let o = run(&m, &gls, &[]).await;
        assert_eq!(o.status, status::GOOD);
        let d = &o.data_in;
        assert_eq!(&d[..4], &(4 + 3 * 16u32).to_be_bytes());
        // Deallocated 0..128, mapped 128..256, deallocated after.
        assert_eq!(
            &d[8..24],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 128, 1, 0, 0, 0]
        );
        assert_eq!(
            &d[24..40],
            &[0, 0, 0, 0, 0, 0, 0, 128, 0, 0, 0, 128, 0, 0, 0, 0]
        );
        assert_eq!(&d[40..52], &[0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0x1f, 0]);
        assert_eq!(d[52], 1);
        // Patterned WRITE SAME fills every block.
        let ws = rw10(0x41, 300, 3);
        assert_eq!(run(&m, &ws, &[0x33; 512]).await.status, status::GOOD);
        let r = run(&m, &rw10(0x28, 300, 3), &[]).await;
        assert!(r.data_in.iter().all(|&b| b == 0x33));
        // Zero blocks (WSNZ), a wrong Data-Out size, past the end.
        assert_sense(
            &run(&m, &rw10(0x41, 0, 0), &[0; 512]).await,
            SenseKey::IllegalRequest,
            0x24,
            0,
        );
        assert_sense(
            &run(&m, &rw10(0x41, 0, 1), &[0; 256]).await,
            SenseKey::IllegalRequest,
            0x24,
            0,
        );
        assert_sense(
            &run(&m, &rw10(0x41, 8193, 0), &[0; 512]).await,
            SenseKey::IllegalRequest,
            0x21,
            0,
        );
        // GET LBA STATUS past the end.
        let o = run(&m, &cmd16(0x9e, 0x12, 8192, 0), &[]).await;
        assert_sense(&o, SenseKey::IllegalRequest, 0x21, 0);
    }

    #[tokio::test]
    async fn unmap_validates_then_trims() {
        let m = map();
        run(&m, &rw10(0x2a, 0, 128), &vec![1; 128 * 512]).await;
        let list = |descs: &[(u64, u32)]| {
            let mut d = vec![0u8; 8];
            let bd = u16::try_from(descs.len() * 16).unwrap();
            d[0..2].copy_from_slice(&(bd + 6).to_be_bytes());
            d[2..4].copy_from_slice(&bd.to_be_bytes());
            for (lba, n) in descs {
                d.extend_from_slice(&lba.to_be_bytes());
                d.extend_from_slice(&n.to_be_bytes());
                d.extend_from_slice(&[0; 4]);
            }
            d
        };
        let unmap = |len: usize| {
            let mut c = [0u8; 10];
            c[0] = 0x42;
            c[7..9].copy_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
            c
        };
        // One bad descriptor: nothing is trimmed.
        let l = list(&[(0, 128), (8190, 4)]);
        assert_sense(
            &run(&m, &unmap(l.len()), &l).await,
            SenseKey::IllegalRequest,
            0x21,
            0,
        );
        assert!(run(&m, &rw10(0x28, 0, 1), &[])
            .await
            .data_in
            .iter()
            .all(|&b| b == 1));
        let l = list(&[(0, 128), (8192, 0)]);
        assert_eq!(run(&m, &unmap(l.len()), &l).await.status, status::GOOD);
        assert!(run(&m, &rw10(0x28, 0, 128), &[])
            .await
            .data_in
            .iter()
            .all(|&b| b == 0));
        // Parameter list shorter than its header.
        assert_sense(
            &run(&m, &unmap(4), &[0; 4]).await,
            SenseKey::IllegalRequest,
            0x1a,
            0,
        );
        // Zero length: nothing to do.
        assert_eq!(run(&m, &unmap(0), &[]).await.status, status::GOOD);
    }

    #[tokio::test]
    async fn verify_bytchk_modes() {
        let m = map();
        run(&m, &rw10(0x2a, 0, 2), &[9; 1024]).await;
        let mut v = rw10(0x2f, 0, 2);
        v[1] = 0x02; // BYTCHK 01b
        assert_eq!(run(&m, &v, &[9; 1024]).await.status, status::GOOD);
        let mut bad = vec![9u8; 1024];
        bad[700] = 0;
        let o = run(&m, &v, &bad).await;
        assert_sense(&o, SenseKey::Miscompare, 0x1d, 0);
        assert_eq!(o.sense.unwrap().information, Some(700));
        v[1] = 0x06; // BYTCHK 11b: one block against each
        assert_eq!(run(&m, &v, &[9; 512]).await.status, status::GOOD);
        v[1] = 0x00; // no compare
        assert_eq!(run(&m, &v, &[]).await.status, status::GOOD);
        v[1] = 0x04; // reserved 10b
        assert_sense(&run(&m, &v, &[]).await, SenseKey::IllegalRequest, 0x24, 0);
    }

    #[tokio::test]
    async fn mode_sense_all_pages_and_select() {
        let m = map();
        let o = run(&m, &[0x1a, 0x00, 0x3f, 0, 255, 0], &[]).await;
        assert_eq!(o.status, status::GOOD);
        let d = &o.data_in;
        assert_eq!(usize::from(d[0]) + 1, d.len());
        assert_eq!(&d[1..4], &[0, 0x10, 8]);
        // Block descriptor: 8192 blocks of 512.
        assert_eq!(&d[4..12], &[0, 0, 0x20, 0, 0, 0, 2, 0]);
        assert_eq!(&d[12..15], &[0x08, 0x12, 0x04]);
        assert_eq!(&d[32..34], &[0x0a, 0x0a]);
        assert_eq!(&d[44..46], &[0x1c, 0x0a]);
        // 4-byte allocation: just the header.
        let o = run(&m, &[0x1a, 0x00, 0x3f, 0, 4, 0], &[]).await;
        assert_eq!(o.data_in.len(), 4);
        // Saved values: not supported.
        let o = run(&m, &[0x1a, 0x00, 0xc8, 0, 255, 0], &[]).await;
        assert_sense(&o, SenseKey::IllegalRequest, 0x39, 0);
        // MODE SELECT(10) clearing WCE; another nexus hears about it.
        run(&m, &[0x00, 0, 0, 0, 0, 0], &[]).await;
        m.execute(&nexus(2), 0, &[0, 0, 0, 0, 0, 0], Bytes::new())
            .await;
        let mut list = vec![0u8; 8];
        list.extend_from_slice(&[0x08, 0x12]);
        list.extend_from_slice(&[0; 18]);
        let mut sel = [0u8; 10];
        sel[0] = 0x55;
        sel[1] = 0x10;
        sel[8] = u8::try_from(list.len()).unwrap();
        assert_eq!(run(&m, &sel, &list).await.status, status::GOOD);
        let o = run(&m, &[0x1a, 0x08, 0x08, 0, 255, 0], &[]).await;
        assert_eq!(&o.data_in[4..7], &[0x08, 0x12, 0x00]);
        let o = m
            .execute(&nexus(2), 0, &[0, 0, 0, 0, 0, 0], Bytes::new())
            .await;
        assert_sense(&o, SenseKey::UnitAttention, 0x2a, 0x01);
    }

    #[tokio::test]
    async fn report_supported_opcodes_all_and_one() {
        let m = map();
        let mut c = [0u8; 12];
        c[0] = 0xa3;
        c[1] = 0x0c;
        c[6..10].copy_from_slice(&65535u32.to_be_bytes());
        let o = run(&m, &c, &[]).await;
        assert_eq!(o.status, status::GOOD);
        let len = u32::from_be_bytes(o.data_in[..4].try_into().unwrap()) as usize;
        assert_eq!(len + 4, o.data_in.len());
        assert_eq!(len, opcodes::COMMANDS.len() * 8);
        // One command: WRITE(16), with its usage data.
        c[2] = 0x01;
        c[3] = 0x8a;
        let o = run(&m, &c, &[]).await;
        assert_eq!(&o.data_in[..6], &[0, 3, 0, 16, 0x8a, 0x18]);
        // RCTD + service action form for GET LBA STATUS.
        c[2] = 0x82;
        c[3] = 0x9e;
        c[4..6].copy_from_slice(&0x12u16.to_be_bytes());
        let o = run(&m, &c, &[]).await;
        assert_eq!(&o.data_in[..4], &[0, 0x83, 0, 16]);
        assert_eq!(o.data_in.len(), 4 + 16 + 12);
    }

    #[tokio::test]
    async fn unit_attention_after_reset() {
        let m = map();
        let tur = [0u8; 6];
        assert_eq!(run(&m, &tur, &[]).await.status, status::GOOD);
        m.reset(Some(0), crate::scsi::ResetKind::LogicalUnit);
        // INQUIRY is not blocked and does not clear the UA.
        assert_eq!(
            run(&m, &[0x12, 0, 0, 0, 36, 0], &[]).await.status,
            status::GOOD
        );
        let o = run(&m, &tur, &[]).await;
        assert_sense(&o, SenseKey::UnitAttention, 0x29, 0x00);
        assert_eq!(run(&m, &tur, &[]).await.status, status::GOOD);
        // REQUEST SENSE reports (and clears) a pending one instead.
        m.reset(None, crate::scsi::ResetKind::TargetWarm);
        let o = run(&m, &[0x03, 0, 0, 0, 18, 0], &[]).await;
        assert_eq!(o.status, status::GOOD);
        assert_eq!(&o.data_in[..3], &[0x70, 0, 0x06]);
        assert_eq!(&o.data_in[12..14], &[0x29, 0]);
        assert_eq!(run(&m, &tur, &[]).await.status, status::GOOD);
        let o = run(&m, &[0x03, 1, 0, 0, 18, 0], &[]).await;
        assert_eq!(&o.data_in[..8], &[0x72, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[tokio::test]
    async fn reserve6_conflicts_other_nexus_until_lost() {
        let m = map();
        let a = nexus(1);
        let b = nexus(2);
        let reserve = [0x16, 0, 0, 0, 0, 0];
        assert_eq!(
            m.execute(&a, 0, &reserve, Bytes::new()).await.status,
            status::GOOD
        );
        let o = m.execute(&b, 0, &rw10(0x28, 0, 1), Bytes::new()).await;
        assert_eq!(o.status, status::RESERVATION_CONFLICT);
        assert_eq!(o.sense, None);
        m.nexus_lost(&a);
        let o = m.execute(&b, 0, &rw10(0x28, 0, 1), Bytes::new()).await;
        assert_eq!(o.status, status::GOOD);
    }

    #[tokio::test]
    async fn missing_lun_and_report_luns() {
        let m = map();
        let n = nexus(1);
        let o = m
            .execute(&n, 5, &[0x12, 0, 0, 0, 96, 0], Bytes::new())
            .await;
        assert_eq!(o.status, status::GOOD);
        assert_eq!(o.data_in[0], 0x7f);
        let o = m.execute(&n, 5, &[0, 0, 0, 0, 0, 0], Bytes::new()).await;
        assert_sense(&o, SenseKey::IllegalRequest, 0x25, 0);
        let o = m
            .execute(&n, 5, &[0x03, 0, 0, 0, 18, 0], Bytes::new())
            .await;
        assert_eq!(o.status, status::GOOD);
        assert_eq!(o.data_in[12], 0x25);
        let mut rl = [0u8; 12];
        rl[0] = 0xa0;
        rl[9] = 64;
        let o = m.execute(&n, 5, &rl, Bytes::new()).await;
        assert_eq!(
            &o.data_in[..],
            &[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn shapes() {
        let m = map();
        let s = m.shape(0, &rw10(0x2a, 0, 4)).unwrap();
        assert_eq!((s.data_out_len, s.data_in_len), (2048, 0));
        let s = m.shape(0, &rw10(0x28, 0, 4)).unwrap();
        assert_eq!((s.data_out_len, s.data_in_len), (0, 2048));
        let s = m.shape(0, &caw(0, 3)).unwrap();
        assert_eq!(s.data_out_len, 3072);
        let s = m.shape(0, &[0x12, 0, 0, 1, 4, 0]).unwrap();
        assert_eq!(s.data_in_len, 260);
        assert_eq!(
            m.shape(0, &[0xff; 16]),
            Err(Sense::INVALID_COMMAND_OPERATION_CODE)
        );
    }

    proptest! {
        #[test]
        fn shape_never_panics(lun in 0u64..3, bytes in proptest::collection::vec(any::<u8>(), 0..24)) {
            let m = map();
            let _ = m.shape(lun, &bytes);
        }
    }

    /// PERSISTENT RESERVE OUT with a 24-byte parameter list.
    async fn prout(
        m: &LunMap,
        who: &Nexus,
        action: u8,
        kind: u8,
        key: u64,
        sa_key: u64,
    ) -> Outcome {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x5f;
        cdb[1] = action;
        cdb[2] = kind;
        cdb[8] = 24;
        let mut params = [0u8; 24];
        params[..8].copy_from_slice(&key.to_be_bytes());
        params[8..16].copy_from_slice(&sa_key.to_be_bytes());
        m.execute(who, 0, &cdb, Bytes::copy_from_slice(&params))
            .await
    }

    #[tokio::test]
    async fn preempt_and_abort_names_the_initiators_to_abort() {
        let m = map();
        let (a, b) = (nexus(1), nexus(2));
        // Both register; b reserves (write exclusive); a preempts and aborts.
        assert_eq!(prout(&m, &a, 0x00, 0, 0, 0xa).await.status, status::GOOD);
        assert_eq!(prout(&m, &b, 0x00, 0, 0, 0xb).await.status, status::GOOD);
        assert_eq!(prout(&m, &b, 0x01, 0x01, 0xb, 0).await.status, status::GOOD);
        assert!(m.take_preempted().is_empty());
        // A plain PREEMPT aborts nothing.
        assert_eq!(
            prout(&m, &a, 0x04, 0x01, 0xa, 0xb).await.status,
            status::GOOD
        );
        assert!(m.take_preempted().is_empty());
        // b hears REGISTRATIONS PREEMPTED once, then registers again.
        let tur = m.execute(&b, 0, &[0u8; 6], Bytes::new()).await;
        assert_eq!(tur.sense.map(|s| (s.asc, s.ascq)), Some((0x2a, 0x05)));
        assert_eq!(prout(&m, &b, 0x00, 0, 0, 0xb).await.status, status::GOOD);
        assert_eq!(
            prout(&m, &a, 0x05, 0x01, 0xa, 0xb).await.status,
            status::GOOD
        );
        assert_eq!(m.take_preempted(), vec![(0, b.clone())]);
        assert!(m.take_preempted().is_empty(), "taken once");
    }

    #[tokio::test]
    async fn orwrite_ors_into_the_stored_blocks() {
        let m = map();
        run(&m, &rw10(0x2a, 8, 2), &[0x0f; 1024]).await;
        let mut cdb = [0u8; 16];
        cdb[0] = 0x8b;
        cdb[2..10].copy_from_slice(&8u64.to_be_bytes());
        cdb[10..14].copy_from_slice(&2u32.to_be_bytes());
        let mut data = vec![0xf0u8; 1024];
        data[1000] = 0x01;
        assert_eq!(run(&m, &cdb, &data).await.status, status::GOOD);
        let r = run(&m, &rw10(0x28, 8, 2), &[]).await;
        assert!(r.data_in[..1000].iter().all(|&b| b == 0xff));
        assert_eq!(r.data_in[1000], 0x0f);
        // ORPROTECT is refused; past the end is LBA OUT OF RANGE.
        cdb[1] = 0x20;
        assert_sense(
            &run(&m, &cdb, &data).await,
            SenseKey::IllegalRequest,
            0x24,
            0,
        );
        cdb[1] = 0;
        cdb[2..10].copy_from_slice(&(SIZE / 512 - 1).to_be_bytes());
        assert_sense(
            &run(&m, &cdb, &data).await,
            SenseKey::IllegalRequest,
            0x21,
            0,
        );
    }
}
