//! The full-feature phase of one connection (RFC 7143 §4.2, §11), sans-IO.
//!
//! [`Connection`] is fed parsed initiator PDUs ([`Connection::receive`]),
//! command completions ([`Connection::complete`]) and the time
//! ([`Connection::tick`]); it queues [`Action`]s for the shell to carry out:
//! PDUs to send, commands to execute, resets to apply, the connection to
//! close. It never blocks and never does I/O.
//!
//! What it enforces:
//! - the CmdSN window: commands outside `ExpCmdSN..=MaxCmdSN` are dropped
//!   silently (§4.2.2.1); commands inside it but ahead of ExpCmdSN wait for
//!   the gap to fill, so the SCSI layer sees them in order;
//! - write data: immediate data and unsolicited Data-Out within
//!   FirstBurstLength, then R2Ts of at most MaxBurstLength, at most
//!   MaxOutstandingR2T at once; DataSN and buffer offsets must arrive in
//!   order (we negotiate DataPDUInOrder/DataSequenceInOrder=Yes and error
//!   recovery level 0, so any violation ends the connection);
//! - read data: Data-In PDUs of at most the initiator's
//!   MaxRecvDataSegmentLength, sequences of at most MaxBurstLength, status
//!   in the last Data-In when there is no sense (phase collapse);
//! - residuals against the Expected Data Transfer Length (§11.4.5);
//! - task management: an aborted task that is already executing is
//!   answered only after it completes, and its own response is dropped.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::pdu::{
    reject_reason, tmf, DataOut, InitiatorPdu, LogoutRequest, NopOut, Residual, ScsiCommand,
    SeqNums, TargetPdu, TaskManagement, TextRequest, BHS_LEN, RESERVED_TAG,
};
use crate::scsi::{status, CommandShape, Outcome, ResetKind, Sense};

/// Commands one connection may have outstanding (the CmdSN window).
pub const QUEUE_DEPTH: u32 = 128;

/// Idle time before the target pings the initiator with a NOP-In.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
/// How long a ping may go unanswered before the connection is dropped.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(30);

/// The operational parameters the connection runs with (from login).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The initiator's MaxRecvDataSegmentLength: our largest Data-In.
    pub max_send_data_segment: u32,
    /// Ours: the largest data segment we accept.
    pub max_recv_data_segment: u32,
    pub first_burst_length: u32,
    pub max_burst_length: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub max_outstanding_r2t: u32,
}

impl Default for Limits {
    /// RFC 7143 defaults.
    fn default() -> Self {
        Limits {
            max_send_data_segment: 8192,
            max_recv_data_segment: 8192,
            first_burst_length: 65536,
            max_burst_length: 262_144,
            immediate_data: true,
            initial_r2t: true,
            max_outstanding_r2t: 1,
        }
    }
}

/// What the shell must do next.
#[derive(Debug)]
pub enum Action {
    /// Send this PDU (sequence numbers already filled in).
    Send(TargetPdu),
    /// Execute a SCSI command and report back with [`Connection::complete`].
    Execute {
        itt: u32,
        lun: u64,
        cdb: Bytes,
        data_out: Bytes,
    },
    /// Apply a task-management reset to the logical units.
    Reset { lun: Option<u64>, kind: ResetKind },
    /// Send what is queued, then close the connection.
    Close(CloseReason),
}

/// Why the connection ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    Logout,
    /// A protocol violation (at error recovery level 0 the connection, and
    /// with it the session, ends: §7.1.5).
    ProtocolError(String),
    KeepaliveTimeout,
    ColdReset,
}

/// A command being carried through its data phase and execution.
#[derive(Debug)]
struct Task {
    lun: u64,
    cdb: Bytes,
    read: bool,
    expected_length: u32,
    shape: CommandShape,
    /// Write data received so far, in order, as received: a write whose
    /// data came in one PDU is executed on that buffer, without a copy.
    data: Vec<Bytes>,
    /// Bytes in `data`.
    received: u32,
    /// Bytes of Data-Out still expected in total.
    write_length: u32,
    /// The unsolicited sequence: where it ends, next DataSN and whether it
    /// is still open.
    unsolicited_end: u32,
    unsolicited_open: bool,
    unsolicited_data_sn: u32,
    /// Solicited sequences in flight, by target transfer tag.
    r2ts: HashMap<u32, R2tState>,
    /// Offset of the next byte to solicit.
    next_r2t_offset: u32,
    next_r2t_sn: u32,
    executing: bool,
    aborted: bool,
    /// TMF requests waiting for this task to finish (ITTs).
    abort_waiters: Vec<u32>,
}

#[derive(Debug)]
struct R2tState {
    offset: u32,
    length: u32,
    received: u32,
    next_data_sn: u32,
}

/// A task-management request waiting for aborted tasks to finish.
#[derive(Debug)]
struct PendingTmf {
    itt: u32,
    waiting_for: usize,
    response: u8,
    then_close: bool,
}

/// A PDU held until the CmdSN gap before it fills.
#[derive(Debug)]
enum Held {
    Command(ScsiCommand),
    TaskManagement(TaskManagement),
    Text(TextRequest),
    Logout(LogoutRequest),
    NopOut(NopOut),
}

/// A Text response too long for one PDU, handed out piece by piece.
#[derive(Debug)]
struct PendingText {
    ttt: u32,
    rest: Bytes,
}

/// Answers Text Requests (`SendTargets` and friends); supplied by the
/// shell, which knows the portal's configuration.
pub type TextResponder = Box<dyn FnMut(&[u8]) -> TextAnswer + Send>;

/// What a [`TextResponder`] makes of a Text Request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextAnswer {
    /// The response text, and the initiator's MaxRecvDataSegmentLength if
    /// the request declared a new one (it bounds our Data-In from now on).
    Reply {
        data: Vec<u8>,
        max_send_data_segment: Option<u32>,
    },
    /// Not key=value text: the request is rejected.
    Malformed,
}

/// One connection in full-feature phase.
pub struct Connection {
    limits: Limits,
    discovery: bool,
    stat_sn: u32,
    exp_cmd_sn: u32,
    max_cmd_sn: u32,
    held: BTreeMap<u32, Held>,
    tasks: HashMap<u32, Task>,
    tmfs: Vec<PendingTmf>,
    next_ttt: u32,
    text_request: BytesMut,
    text_pending: Option<PendingText>,
    text_responder: TextResponder,
    logout: Option<LogoutRequest>,
    last_heard: Instant,
    ping_sent: Option<(u32, Instant)>,
    actions: VecDeque<Action>,
    closed: bool,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("stat_sn", &self.stat_sn)
            .field("exp_cmd_sn", &self.exp_cmd_sn)
            .field("tasks", &self.tasks.len())
            .finish_non_exhaustive()
    }
}

/// Serial number arithmetic (RFC 1982) on 32-bit sequence numbers.
fn sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 0x8000_0000
}

fn sn_le(a: u32, b: u32) -> bool {
    a == b || sn_lt(a, b)
}

/// Plans a command from its CDB: what the transport needs before data
/// moves. Implemented by the SCSI layer; a trait so tests can stub it.
pub trait Planner {
    fn shape(&self, lun: u64, cdb: &[u8]) -> Result<CommandShape, Sense>;
}

impl Planner for crate::scsi::LunMap {
    fn shape(&self, lun: u64, cdb: &[u8]) -> Result<CommandShape, Sense> {
        crate::scsi::LunMap::shape(self, lun, cdb)
    }
}

impl Connection {
    /// A connection that has just completed login: `stat_sn` is the next
    /// StatSN to use, `exp_cmd_sn` the CmdSN the login carried.
    pub fn new(
        limits: Limits,
        discovery: bool,
        stat_sn: u32,
        exp_cmd_sn: u32,
        text_responder: TextResponder,
        now: Instant,
    ) -> Connection {
        Connection {
            limits,
            discovery,
            stat_sn,
            exp_cmd_sn,
            max_cmd_sn: exp_cmd_sn.wrapping_add(QUEUE_DEPTH - 1),
            held: BTreeMap::new(),
            tasks: HashMap::new(),
            tmfs: Vec::new(),
            next_ttt: 1,
            text_request: BytesMut::new(),
            text_pending: None,
            text_responder,
            logout: None,
            last_heard: now,
            ping_sent: None,
            actions: VecDeque::new(),
            closed: false,
        }
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Commands received and not yet answered.
    pub fn tasks_in_flight(&self) -> usize {
        self.tasks.len()
    }

    /// The current window, as every target PDU reports it. MaxCmdSN never
    /// moves backwards (initiators ignore a smaller one, §4.2.2.1); it
    /// grows as commands complete.
    fn seq(&mut self) -> SeqNums {
        let in_flight = u32::try_from(self.tasks.len()).unwrap_or(u32::MAX);
        let open = QUEUE_DEPTH.saturating_sub(in_flight).max(1);
        let max = self.exp_cmd_sn.wrapping_add(open - 1);
        if sn_lt(self.max_cmd_sn, max) {
            self.max_cmd_sn = max;
        }
        SeqNums {
            stat_sn: self.stat_sn,
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn,
        }
    }

    /// Queues a PDU, stamping the sequence numbers it carries.
    fn send(&mut self, make: impl FnOnce(SeqNums) -> TargetPdu) {
        let seq = self.seq();
        let pdu = make(seq);
        if pdu.advances_stat_sn() {
            self.stat_sn = self.stat_sn.wrapping_add(1);
        }
        self.actions.push_back(Action::Send(pdu));
    }

    fn close(&mut self, reason: CloseReason) {
        if !self.closed {
            self.closed = true;
            self.actions.push_back(Action::Close(reason));
        }
    }

    fn protocol_error(&mut self, bhs: Option<[u8; BHS_LEN]>, why: String) {
        if let Some(bhs) = bhs {
            self.reject(reject_reason::PROTOCOL_ERROR, bhs);
        }
        self.close(CloseReason::ProtocolError(why));
    }

    /// Sends a Reject for the PDU whose header is `bhs`.
    pub fn reject(&mut self, reason: u8, bhs: [u8; BHS_LEN]) {
        self.send(|seq| TargetPdu::Reject {
            reason,
            seq,
            data_sn: 0,
            bhs: Box::new(bhs),
        });
    }

    /// Feeds one PDU. `bhs` is its raw header, kept for Reject PDUs.
    pub fn receive(
        &mut self,
        pdu: InitiatorPdu,
        bhs: &[u8; BHS_LEN],
        planner: &dyn Planner,
        now: Instant,
    ) {
        if self.closed {
            return;
        }
        self.last_heard = now;
        match pdu {
            InitiatorPdu::DataOut(d) => self.data_out(&d),
            InitiatorPdu::Snack { .. } => self.reject(reject_reason::SNACK_REJECT, *bhs),
            InitiatorPdu::Login(_) => {
                self.protocol_error(Some(*bhs), "Login Request in full-feature phase".into());
            }
            InitiatorPdu::NopOut(n) if n.itt == RESERVED_TAG => {
                // The answer to our ping; it carries no CmdSN to order.
                if self.ping_sent.is_some_and(|(ttt, _)| ttt == n.ttt) {
                    self.ping_sent = None;
                }
            }
            InitiatorPdu::ScsiCommand(_) if self.discovery => {
                self.reject(reject_reason::PROTOCOL_ERROR, *bhs);
            }
            InitiatorPdu::ScsiCommand(c) => {
                self.sequenced(c.immediate, c.cmdsn, Held::Command(c), planner);
            }
            InitiatorPdu::TaskManagement(t) => {
                self.sequenced(t.immediate, t.cmdsn, Held::TaskManagement(t), planner);
            }
            InitiatorPdu::Text(t) => self.sequenced(t.immediate, t.cmdsn, Held::Text(t), planner),
            InitiatorPdu::Logout(l) => {
                self.sequenced(l.immediate, l.cmdsn, Held::Logout(l), planner);
            }
            InitiatorPdu::NopOut(n) => {
                self.sequenced(n.immediate, n.cmdsn, Held::NopOut(n), planner);
            }
        }
    }

    /// Applies CmdSN ordering: immediate PDUs go at once; others only
    /// inside the window, in CmdSN order.
    fn sequenced(&mut self, immediate: bool, cmdsn: u32, held: Held, planner: &dyn Planner) {
        if immediate {
            // Immediate PDUs are delivered at once and do not advance the
            // window (§3.2.2.1). They escape the window's bound on commands
            // in flight, so past twice the window they are refused
            // (§11.17.1, "immediate command reject").
            if matches!(held, Held::Command(_)) && self.tasks.len() >= 2 * QUEUE_DEPTH as usize {
                if let Held::Command(c) = &held {
                    let mut bhs = [0u8; BHS_LEN];
                    bhs[0] = crate::pdu::opcode::SCSI_COMMAND | 0x40;
                    bhs[16..20].copy_from_slice(&c.itt.to_be_bytes());
                    self.reject(reject_reason::IMMEDIATE_COMMAND_REJECT, bhs);
                }
                return;
            }
            self.deliver(held, planner);
            return;
        }
        if !(sn_le(self.exp_cmd_sn, cmdsn) && sn_le(cmdsn, self.max_cmd_sn)) {
            tracing::debug!(
                cmdsn,
                exp = self.exp_cmd_sn,
                max = self.max_cmd_sn,
                "dropping PDU outside the CmdSN window"
            );
            return;
        }
        if cmdsn != self.exp_cmd_sn {
            self.held.insert(cmdsn, held);
            return;
        }
        self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
        self.deliver(held, planner);
        while let Some(next) = self.held.remove(&self.exp_cmd_sn) {
            self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
            self.deliver(next, planner);
        }
    }

    fn deliver(&mut self, held: Held, planner: &dyn Planner) {
        match held {
            Held::Command(c) => self.command(c, planner),
            Held::TaskManagement(t) => self.task_management(&t),
            Held::Text(t) => self.text(&t),
            Held::Logout(l) => self.logout(l),
            Held::NopOut(n) => {
                // The echo may not exceed what the initiator accepts; RFC
                // 7143 §11.18 lets the target truncate the ping data.
                let max = self.limits.max_send_data_segment as usize;
                let (lun, itt) = (n.lun, n.itt);
                let data = n.data.slice(..n.data.len().min(max));
                self.send(|seq| TargetPdu::NopIn {
                    lun,
                    itt,
                    ttt: RESERVED_TAG,
                    seq,
                    data,
                });
            }
        }
    }

    fn command(&mut self, c: ScsiCommand, planner: &dyn Planner) {
        if self.tasks.contains_key(&c.itt) {
            // A reused tag of a live task (§11.3.4): reject the newcomer.
            let mut bhs = [0u8; BHS_LEN];
            bhs[0] = crate::pdu::opcode::SCSI_COMMAND;
            bhs[16..20].copy_from_slice(&c.itt.to_be_bytes());
            self.reject(reject_reason::TASK_IN_PROGRESS, bhs);
            return;
        }
        let shape = match planner.shape(c.lun, &c.cdb) {
            Ok(shape) => shape,
            Err(sense) => {
                // Unsolicited data for it, if any, is dropped on arrival:
                // the task is unknown by then.
                self.respond(
                    c.itt,
                    status::CHECK_CONDITION,
                    Some(sense),
                    residual_none(c.read, c.expected_data_length),
                );
                return;
            }
        };
        let write_length = if c.write { c.expected_data_length } else { 0 };
        let immediate_len = u32::try_from(c.data.len()).unwrap_or(u32::MAX);
        if immediate_len > 0
            && (!self.limits.immediate_data
                || immediate_len > self.limits.first_burst_length.min(write_length))
        {
            self.protocol_error(
                None,
                format!("{immediate_len} bytes of immediate data not allowed"),
            );
            return;
        }
        // Without InitialR2T the initiator may follow up with Data-Out up to
        // FirstBurstLength, unless the command's F bit says it will not.
        let unsolicited_end = if self.limits.initial_r2t || c.final_ {
            immediate_len
        } else {
            self.limits.first_burst_length.min(write_length)
        };
        let mut task = Task {
            lun: c.lun,
            cdb: c.cdb,
            read: c.read,
            expected_length: c.expected_data_length,
            shape,
            // Grows as data arrives: nothing is reserved on the strength of
            // the EDTL, which is the initiator's word (up to 4 GiB).
            data: Vec::new(),
            received: 0,
            write_length,
            unsolicited_end,
            unsolicited_open: unsolicited_end > immediate_len,
            unsolicited_data_sn: 0,
            r2ts: HashMap::new(),
            next_r2t_offset: unsolicited_end,
            next_r2t_sn: 0,
            executing: false,
            aborted: false,
            abort_waiters: Vec::new(),
        };
        if !c.data.is_empty() {
            task.received = immediate_len;
            task.data.push(c.data);
        }
        let itt = c.itt;
        self.tasks.insert(itt, task);
        self.solicit(itt);
        self.maybe_execute(itt);
    }

    /// Issues R2Ts for the task up to MaxOutstandingR2T.
    fn solicit(&mut self, itt: u32) {
        loop {
            let Some(task) = self.tasks.get_mut(&itt) else {
                return;
            };
            let outstanding = u32::try_from(task.r2ts.len()).unwrap_or(u32::MAX);
            if task.aborted
                || task.next_r2t_offset >= task.write_length
                || outstanding >= self.limits.max_outstanding_r2t
            {
                return;
            }
            let offset = task.next_r2t_offset;
            let length = (task.write_length - offset).min(self.limits.max_burst_length);
            let ttt = self.next_ttt;
            self.next_ttt = self.next_ttt.wrapping_add(1).max(1);
            if self.next_ttt == RESERVED_TAG {
                self.next_ttt = 1;
            }
            task.r2ts.insert(
                ttt,
                R2tState {
                    offset,
                    length,
                    received: 0,
                    next_data_sn: 0,
                },
            );
            task.next_r2t_offset += length;
            let r2t_sn = task.next_r2t_sn;
            task.next_r2t_sn += 1;
            let lun = task.lun;
            self.send(|seq| TargetPdu::R2T {
                lun,
                itt,
                ttt,
                seq,
                r2t_sn,
                buffer_offset: offset,
                desired_length: length,
            });
        }
    }

    fn data_out(&mut self, d: &DataOut) {
        match self.accept_data_out(d) {
            Ok(()) => {
                self.solicit(d.itt);
                self.maybe_execute(d.itt);
            }
            Err(None) => {}
            Err(Some((sense, why))) => {
                // The write cannot be trusted: fail it before any data
                // reaches the device and keep the connection (the
                // initiator's later Data-Out for it is dropped on arrival).
                tracing::info!(itt = d.itt, %why, "failing a command for its Data-Out");
                self.tasks.remove(&d.itt);
                self.respond(d.itt, status::CHECK_CONDITION, Some(sense), Residual::None);
            }
        }
    }

    /// Checks a Data-Out against its task and takes its data. `Err(None)`:
    /// ignore it; `Err(Some(..))`: fail the task with this sense.
    fn accept_data_out(&mut self, d: &DataOut) -> Result<(), Option<(Sense, String)>> {
        let Some(task) = self.tasks.get_mut(&d.itt) else {
            // Data for a task already answered (bad CDB, failed) or aborted.
            return Err(None);
        };
        if task.executing {
            // All the data it asked for already arrived.
            return Err(None);
        }
        let len = u32::try_from(d.data.len()).unwrap_or(u32::MAX);
        let at = task.received;
        if at.saturating_add(len) > task.write_length {
            let why = format!(
                "{len} bytes at offset {at} exceed the expected {}",
                task.write_length
            );
            return Err(Some((Sense::TOO_MUCH_WRITE_DATA, why)));
        }
        if d.buffer_offset != at {
            // DataPDUInOrder and DataSequenceInOrder are Yes.
            let why = format!("Data-Out at offset {}, expected {at}", d.buffer_offset);
            return Err(Some((Sense::DATA_PHASE_ERROR, why)));
        }
        if d.ttt == RESERVED_TAG {
            if !task.unsolicited_open || at.saturating_add(len) > task.unsolicited_end {
                let why = format!("unsolicited Data-Out beyond {}", task.unsolicited_end);
                return Err(Some((Sense::UNEXPECTED_UNSOLICITED_DATA, why)));
            }
            if d.data_sn != task.unsolicited_data_sn {
                let why = format!(
                    "DataSN {}, expected {}",
                    d.data_sn, task.unsolicited_data_sn
                );
                return Err(Some((Sense::DATA_PHASE_ERROR, why)));
            }
            task.unsolicited_data_sn += 1;
            if d.final_ {
                task.unsolicited_open = false;
            }
        } else {
            let Some(r2t) = task.r2ts.get_mut(&d.ttt) else {
                let why = format!("unknown target transfer tag {:#x}", d.ttt);
                return Err(Some((Sense::INVALID_TARGET_PORT_TRANSFER_TAG, why)));
            };
            if d.data_sn != r2t.next_data_sn
                || d.buffer_offset != r2t.offset + r2t.received
                || r2t.received + len > r2t.length
            {
                let why = format!(
                    "DataSN {} ({len} bytes) for R2T {:#x}: expected DataSN {} within {} bytes",
                    d.data_sn,
                    d.ttt,
                    r2t.next_data_sn,
                    r2t.length - r2t.received
                );
                return Err(Some((Sense::DATA_PHASE_ERROR, why)));
            }
            r2t.next_data_sn += 1;
            r2t.received += len;
            if r2t.received == r2t.length {
                task.r2ts.remove(&d.ttt);
            } else if d.final_ {
                let why = format!(
                    "R2T {:#x} answered with {} of {} bytes",
                    d.ttt, r2t.received, r2t.length
                );
                return Err(Some((Sense::DATA_PHASE_ERROR, why)));
            }
        }
        task.received += len;
        task.data.push(d.data.clone());
        Ok(())
    }

    /// Starts execution once all write data is in.
    fn maybe_execute(&mut self, itt: u32) {
        let Some(task) = self.tasks.get_mut(&itt) else {
            return;
        };
        if task.executing || task.aborted || task.received < task.write_length {
            return;
        }
        // When the Expected Data Transfer Length and the CDB disagree, the
        // SCSI layer gets what arrived and decides (FCP-4 §9.4.2 a): a WRITE
        // writes the whole blocks both cover, COMPARE AND WRITE refuses; the
        // residual reports the gap either way.
        task.executing = true;
        let data_out = match std::mem::take(&mut task.data).as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            parts => {
                let mut all = BytesMut::with_capacity(task.received as usize);
                for p in parts {
                    all.extend_from_slice(p);
                }
                all.freeze()
            }
        };
        self.actions.push_back(Action::Execute {
            itt,
            lun: task.lun,
            cdb: task.cdb.clone(),
            data_out,
        });
    }

    /// Reports a command's outcome: Data-In and status.
    pub fn complete(&mut self, itt: u32, outcome: Outcome) {
        let Some(task) = self.tasks.remove(&itt) else {
            return;
        };
        if task.aborted {
            self.aborted_task_done(&task);
            self.after_completion();
            return;
        }
        let Outcome {
            status: st,
            sense,
            data_in,
        } = outcome;
        let produced = u32::try_from(data_in.len()).unwrap_or(u32::MAX);
        let (data, residual) = if task.read {
            let send = produced.min(task.expected_length);
            (
                data_in.slice(..send as usize),
                Residual::between(produced, task.expected_length),
            )
        } else if task.write_length > 0 || task.shape.data_out_len > 0 {
            (
                Bytes::new(),
                Residual::between(task.shape.data_out_len, task.write_length),
            )
        } else {
            (
                Bytes::new(),
                Residual::between(produced, task.expected_length),
            )
        };
        let good = sense.is_none() && st == status::GOOD;
        let data_sn = self.send_data_in(itt, task.lun, &data, good.then_some((st, residual)));
        if !good || data.is_empty() {
            self.send(|seq| TargetPdu::ScsiResponse {
                itt,
                response: 0,
                status: st,
                residual,
                exp_data_sn: data_sn,
                seq,
                sense: sense
                    .map(|s| Bytes::copy_from_slice(&s.to_fixed()))
                    .unwrap_or_default(),
            });
        }
        self.after_completion();
    }

    /// Sends `data` as Data-In PDUs; with `status`, the last one carries it.
    /// Returns the number of PDUs sent (the next DataSN).
    fn send_data_in(
        &mut self,
        itt: u32,
        lun: u64,
        data: &Bytes,
        status: Option<(u8, Residual)>,
    ) -> u32 {
        let seg = self.limits.max_send_data_segment.max(512) as usize;
        let burst = self.limits.max_burst_length.max(512) as usize;
        let mut data_sn = 0u32;
        let mut offset = 0usize;
        while offset < data.len() {
            // A sequence ends at each MaxBurstLength boundary.
            let burst_end = (offset / burst + 1) * burst;
            let end = (offset + seg).min(data.len()).min(burst_end);
            let last = end == data.len();
            let chunk = data.slice(offset..end);
            let final_ = last || end == burst_end;
            let st = if last { status } else { None };
            let sn = data_sn;
            let off = u32::try_from(offset).unwrap_or(u32::MAX);
            self.send(|seq| TargetPdu::DataIn {
                final_,
                status: st.map(|(s, _)| s),
                residual: st.map_or(Residual::None, |(_, r)| r),
                lun,
                itt,
                data_sn: sn,
                buffer_offset: off,
                seq,
                data: chunk,
            });
            data_sn += 1;
            offset = end;
        }
        data_sn
    }

    fn respond(&mut self, itt: u32, st: u8, sense: Option<Sense>, residual: Residual) {
        self.send(|seq| TargetPdu::ScsiResponse {
            itt,
            response: 0,
            status: st,
            residual,
            exp_data_sn: 0,
            seq,
            sense: sense
                .map(|s| Bytes::copy_from_slice(&s.to_fixed()))
                .unwrap_or_default(),
        });
        self.after_completion();
    }

    fn aborted_task_done(&mut self, task: &Task) {
        for waiter in &task.abort_waiters {
            if let Some(t) = self.tmfs.iter_mut().find(|t| t.itt == *waiter) {
                t.waiting_for = t.waiting_for.saturating_sub(1);
            }
        }
        self.flush_tmfs();
    }

    fn flush_tmfs(&mut self) {
        let mut i = 0;
        while i < self.tmfs.len() {
            if self.tmfs[i].waiting_for == 0 {
                let t = self.tmfs.remove(i);
                let (itt, response) = (t.itt, t.response);
                self.send(|seq| TargetPdu::TaskManagementResponse { itt, response, seq });
                if t.then_close {
                    self.close(CloseReason::ColdReset);
                }
            } else {
                i += 1;
            }
        }
    }

    /// Once the last task finishes, a pending logout can be answered.
    fn after_completion(&mut self) {
        if self.tasks.is_empty() {
            if let Some(l) = self.logout.take() {
                self.finish_logout(&l);
            }
        }
    }

    /// Aborts the tasks `which` selects; returns how many are executing
    /// (their completion is awaited by TMF `tmf_itt`).
    fn abort_where(&mut self, tmf_itt: u32, which: impl Fn(u32, &Task) -> bool) -> usize {
        let chosen: Vec<u32> = self
            .tasks
            .iter()
            .filter(|(itt, t)| !t.aborted && which(**itt, t))
            .map(|(itt, _)| *itt)
            .collect();
        let mut executing = 0;
        for itt in chosen {
            let task = self.tasks.get_mut(&itt).expect("chosen from tasks");
            if task.executing {
                task.aborted = true;
                task.abort_waiters.push(tmf_itt);
                executing += 1;
            } else {
                self.tasks.remove(&itt);
            }
        }
        executing
    }

    /// Aborts, without answering them, the commands on LUNs `on` selects
    /// (by their raw LUN field): what another session's LOGICAL UNIT RESET
    /// or PREEMPT AND ABORT does to this one (SAM-5: the task set is
    /// cleared for every I_T nexus; with TAS=0 the aborted commands get no
    /// status, and the logical unit reports a unit attention instead).
    pub fn abort_tasks(&mut self, on: impl Fn(u64) -> bool) {
        let chosen: Vec<u32> = self
            .tasks
            .iter()
            .filter(|(_, t)| !t.aborted && on(t.lun))
            .map(|(itt, _)| *itt)
            .collect();
        for itt in chosen {
            let task = self.tasks.get_mut(&itt).expect("chosen from tasks");
            if task.executing {
                // Its completion is dropped when it comes.
                task.aborted = true;
            } else {
                self.tasks.remove(&itt);
            }
        }
        self.after_completion();
    }

    fn task_management(&mut self, t: &TaskManagement) {
        let (response, reset, then_close, waiting_for) = match t.function {
            tmf::ABORT_TASK => {
                let target = t.referenced_task_tag;
                if self.tasks.get(&target).is_some_and(|task| !task.aborted) {
                    let n = self.abort_where(t.itt, |itt, _| itt == target);
                    (tmf::FUNCTION_COMPLETE, None, false, n)
                } else if self.tasks.contains_key(&target) {
                    (tmf::FUNCTION_COMPLETE, None, false, 0)
                } else {
                    (tmf::TASK_DOES_NOT_EXIST, None, false, 0)
                }
            }
            tmf::ABORT_TASK_SET | tmf::CLEAR_TASK_SET => {
                let lun = t.lun;
                let n = self.abort_where(t.itt, |_, task| task.lun == lun);
                (tmf::FUNCTION_COMPLETE, None, false, n)
            }
            tmf::LOGICAL_UNIT_RESET => {
                let lun = t.lun;
                let n = self.abort_where(t.itt, |_, task| task.lun == lun);
                (
                    tmf::FUNCTION_COMPLETE,
                    Some((Some(lun), ResetKind::LogicalUnit)),
                    false,
                    n,
                )
            }
            tmf::TARGET_WARM_RESET => {
                let n = self.abort_where(t.itt, |_, _| true);
                (
                    tmf::FUNCTION_COMPLETE,
                    Some((None, ResetKind::TargetWarm)),
                    false,
                    n,
                )
            }
            tmf::TARGET_COLD_RESET => {
                let n = self.abort_where(t.itt, |_, _| true);
                (
                    tmf::FUNCTION_COMPLETE,
                    Some((None, ResetKind::TargetCold)),
                    true,
                    n,
                )
            }
            tmf::TASK_REASSIGN => (tmf::REASSIGNMENT_NOT_SUPPORTED, None, false, 0),
            _ => (tmf::FUNCTION_NOT_SUPPORTED, None, false, 0),
        };
        if let Some((lun, kind)) = reset {
            self.actions.push_back(Action::Reset { lun, kind });
        }
        self.tmfs.push(PendingTmf {
            itt: t.itt,
            waiting_for,
            response,
            then_close,
        });
        self.flush_tmfs();
        self.after_completion();
    }

    fn text(&mut self, t: &TextRequest) {
        if t.ttt != RESERVED_TAG {
            // The initiator asks for the next piece of a long answer.
            match self.text_pending.take() {
                Some(p) if p.ttt == t.ttt => {
                    self.send_text_piece(t.itt, t.lun, p.ttt, p.rest);
                }
                _ => {
                    let mut bhs = [0u8; BHS_LEN];
                    bhs[0] = crate::pdu::opcode::TEXT;
                    bhs[16..20].copy_from_slice(&t.itt.to_be_bytes());
                    bhs[20..24].copy_from_slice(&t.ttt.to_be_bytes());
                    self.reject(reject_reason::INVALID_PDU_FIELD, bhs);
                }
            }
            return;
        }
        self.text_pending = None;
        self.text_request.extend_from_slice(&t.data);
        if self.text_request.len() > 64 * 1024 {
            self.protocol_error(None, "Text Request longer than 64 KiB".into());
            return;
        }
        if t.cont {
            // More request text follows: acknowledge with an empty response.
            let ttt = self.take_ttt();
            let (itt, lun) = (t.itt, t.lun);
            self.send(|seq| TargetPdu::TextResponse {
                final_: false,
                cont: false,
                lun,
                itt,
                ttt,
                seq,
                data: Bytes::new(),
            });
            return;
        }
        let request = std::mem::take(&mut self.text_request);
        match (self.text_responder)(&request) {
            TextAnswer::Reply {
                data,
                max_send_data_segment,
            } => {
                if let Some(max) = max_send_data_segment {
                    self.limits.max_send_data_segment = max;
                }
                let ttt = self.take_ttt();
                self.send_text_piece(t.itt, t.lun, ttt, Bytes::from(data));
            }
            TextAnswer::Malformed => {
                let mut bhs = [0u8; BHS_LEN];
                bhs[0] = crate::pdu::opcode::TEXT;
                bhs[16..20].copy_from_slice(&t.itt.to_be_bytes());
                self.reject(reject_reason::INVALID_PDU_FIELD, bhs);
            }
        }
    }

    fn take_ttt(&mut self) -> u32 {
        let ttt = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1);
        if self.next_ttt == RESERVED_TAG || self.next_ttt == 0 {
            self.next_ttt = 1;
        }
        ttt
    }

    fn send_text_piece(&mut self, itt: u32, lun: u64, ttt: u32, mut rest: Bytes) {
        let seg = self.limits.max_send_data_segment as usize;
        let piece = rest.split_to(rest.len().min(seg));
        let last = rest.is_empty();
        if !last {
            self.text_pending = Some(PendingText { ttt, rest });
        }
        self.send(|seq| TargetPdu::TextResponse {
            final_: last,
            cont: !last,
            lun,
            itt,
            ttt: if last { RESERVED_TAG } else { ttt },
            seq,
            data: piece,
        });
    }

    fn logout(&mut self, l: LogoutRequest) {
        if self.tasks.is_empty() {
            self.finish_logout(&l);
        } else {
            self.logout = Some(l);
        }
    }

    fn finish_logout(&mut self, l: &LogoutRequest) {
        // Reason 2 (remove the connection for recovery) needs error
        // recovery level 2: "connection recovery is not supported".
        let response = if l.reason == 2 { 2 } else { 0 };
        let itt = l.itt;
        self.send(|seq| TargetPdu::LogoutResponse {
            itt,
            response,
            seq,
            time2wait: 0,
            time2retain: 0,
        });
        self.close(CloseReason::Logout);
    }

    /// Time passes: pings an idle initiator, drops a silent one.
    pub fn tick(&mut self, now: Instant) {
        if self.closed {
            return;
        }
        if let Some((_, sent)) = self.ping_sent {
            if now.duration_since(sent) >= KEEPALIVE_TIMEOUT {
                self.close(CloseReason::KeepaliveTimeout);
            }
            return;
        }
        if now.duration_since(self.last_heard) >= KEEPALIVE_INTERVAL {
            let ttt = self.take_ttt();
            self.ping_sent = Some((ttt, now));
            self.send(|seq| TargetPdu::NopIn {
                lun: 0,
                itt: RESERVED_TAG,
                ttt,
                seq,
                data: Bytes::new(),
            });
        }
    }
}

/// The residual of a command refused before any data moved.
fn residual_none(read: bool, expected: u32) -> Residual {
    if read && expected > 0 {
        Residual::Underflow(expected)
    } else {
        Residual::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdu::{DataOut, ScsiCommand, TaskManagement, TextRequest};

    /// Plans READ(10) / WRITE(10) with 512-byte blocks; anything else is an
    /// invalid opcode.
    struct Stub;

    impl Planner for Stub {
        fn shape(&self, _lun: u64, cdb: &[u8]) -> Result<CommandShape, Sense> {
            let blocks = u32::from(u16::from_be_bytes([cdb[7], cdb[8]]));
            match cdb[0] {
                0x28 => Ok(CommandShape {
                    data_out_len: 0,
                    data_in_len: blocks * 512,
                }),
                0x2a => Ok(CommandShape {
                    data_out_len: blocks * 512,
                    data_in_len: 0,
                }),
                _ => Err(Sense::INVALID_COMMAND_OPERATION_CODE),
            }
        }
    }

    fn limits() -> Limits {
        Limits {
            max_send_data_segment: 4096,
            max_recv_data_segment: 8192,
            first_burst_length: 8192,
            max_burst_length: 16384,
            immediate_data: true,
            initial_r2t: true,
            max_outstanding_r2t: 2,
        }
    }

    fn conn(limits: Limits) -> Connection {
        Connection::new(
            limits,
            false,
            100,
            1,
            Box::new(|req: &[u8]| {
                assert_eq!(req, b"SendTargets=All\0");
                TextAnswer::Reply {
                    data: b"TargetName=iqn.x:y\0TargetAddress=1.2.3.4:3260,1\0".repeat(200),
                    max_send_data_segment: None,
                }
            }),
            Instant::now(),
        )
    }

    fn cdb(op: u8, blocks: u16) -> Bytes {
        let mut c = [0u8; 16];
        c[0] = op;
        c[7..9].copy_from_slice(&blocks.to_be_bytes());
        Bytes::copy_from_slice(&c)
    }

    fn command(itt: u32, cmdsn: u32, op: u8, blocks: u16, edtl: u32, data: &[u8]) -> InitiatorPdu {
        InitiatorPdu::ScsiCommand(ScsiCommand {
            immediate: false,
            final_: true,
            read: op == 0x28,
            write: op == 0x2a,
            lun: 0,
            itt,
            expected_data_length: edtl,
            cmdsn,
            exp_statsn: 0,
            cdb: cdb(op, blocks),
            data: Bytes::copy_from_slice(data),
        })
    }

    fn feed(c: &mut Connection, pdu: InitiatorPdu) {
        c.receive(pdu, &[0; BHS_LEN], &Stub, Instant::now());
    }

    fn drain(c: &mut Connection) -> Vec<Action> {
        std::iter::from_fn(|| c.poll_action()).collect()
    }

    fn ok(data: Bytes) -> Outcome {
        Outcome {
            status: status::GOOD,
            sense: None,
            data_in: data,
        }
    }

    #[test]
    fn write_collects_immediate_data_then_solicits_the_rest() {
        let mut c = conn(limits());
        // 40 KiB: 8 KiB immediate (FirstBurstLength), then R2Ts of at
        // most 16 KiB, two outstanding.
        feed(&mut c, command(7, 1, 0x2a, 80, 40960, &[1; 8192]));
        let r2ts: Vec<(u32, u32, u32, u32)> = drain(&mut c)
            .into_iter()
            .map(|a| match a {
                Action::Send(TargetPdu::R2T {
                    ttt,
                    r2t_sn,
                    buffer_offset,
                    desired_length,
                    ..
                }) => (ttt, r2t_sn, buffer_offset, desired_length),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(r2ts.len(), 2);
        assert_eq!((r2ts[0].1, r2ts[0].2, r2ts[0].3), (0, 8192, 16384));
        assert_eq!((r2ts[1].1, r2ts[1].2, r2ts[1].3), (1, 24576, 16384));
        let data_out = |ttt, sn, offset, len: usize, final_| {
            InitiatorPdu::DataOut(DataOut {
                final_,
                lun: 0,
                itt: 7,
                ttt,
                exp_statsn: 0,
                data_sn: sn,
                buffer_offset: offset,
                data: Bytes::from(vec![2u8; len]),
            })
        };
        feed(&mut c, data_out(r2ts[0].0, 0, 8192, 8192, false));
        feed(&mut c, data_out(r2ts[0].0, 1, 16384, 8192, true));
        // The first R2T is done: a third goes out for the last 0 bytes?
        // No: 8 + 16 + 16 = 40 KiB, all solicited already.
        assert!(drain(&mut c).is_empty());
        feed(&mut c, data_out(r2ts[1].0, 0, 24576, 16384, true));
        let actions = drain(&mut c);
        let [Action::Execute {
            itt: 7, data_out, ..
        }] = &actions[..]
        else {
            panic!("{actions:?}")
        };
        assert_eq!(data_out.len(), 40960);
        assert!(data_out[..8192].iter().all(|b| *b == 1));
        assert!(data_out[8192..].iter().all(|b| *b == 2));
        c.complete(7, ok(Bytes::new()));
        let actions = drain(&mut c);
        let [Action::Send(TargetPdu::ScsiResponse {
            status: 0,
            residual: Residual::None,
            seq,
            ..
        })] = &actions[..]
        else {
            panic!("{actions:?}")
        };
        assert_eq!(seq.stat_sn, 100);
        assert_eq!(seq.exp_cmd_sn, 2);
    }

    #[test]
    fn out_of_order_data_fails_the_command() {
        let mut c = conn(limits());
        feed(&mut c, command(1, 1, 0x2a, 40, 20480, &[]));
        let ttt = match drain(&mut c).remove(0) {
            Action::Send(TargetPdu::R2T { ttt, .. }) => ttt,
            other => panic!("{other:?}"),
        };
        feed(
            &mut c,
            InitiatorPdu::DataOut(DataOut {
                final_: false,
                lun: 0,
                itt: 1,
                ttt,
                exp_statsn: 0,
                data_sn: 1, // should be 0
                buffer_offset: 0,
                data: Bytes::from(vec![0; 512]),
            }),
        );
        // The command fails with ABORTED COMMAND / DATA PHASE ERROR; the
        // connection stays.
        let a = drain(&mut c);
        let [Action::Send(TargetPdu::ScsiResponse {
            itt: 1,
            status: 2,
            sense,
            ..
        })] = &a[..]
        else {
            panic!("{a:?}")
        };
        assert_eq!((sense[2], sense[12], sense[13]), (0x0b, 0x4b, 0x00));
        assert_eq!(c.tasks_in_flight(), 0);
    }

    #[test]
    fn reads_are_split_by_segment_and_burst_with_status_in_the_last() {
        let mut c = conn(limits());
        feed(&mut c, command(3, 1, 0x28, 72, 36864, &[]));
        assert!(matches!(
            &drain(&mut c)[..],
            [Action::Execute { itt: 3, .. }]
        ));
        c.complete(3, ok(Bytes::from(vec![9u8; 36864])));
        let pdus: Vec<TargetPdu> = drain(&mut c)
            .into_iter()
            .map(|a| match a {
                Action::Send(p) => p,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(pdus.len(), 9);
        let mut expect_offset = 0;
        for (i, p) in pdus.iter().enumerate() {
            let TargetPdu::DataIn {
                final_,
                status,
                data_sn,
                buffer_offset,
                data,
                ..
            } = p
            else {
                panic!("{p:?}")
            };
            assert_eq!(*data_sn, u32::try_from(i).unwrap());
            assert_eq!(*buffer_offset, expect_offset);
            assert_eq!(data.len(), 4096);
            expect_offset += 4096;
            // Sequences end every 16 KiB (MaxBurstLength) and at the end.
            assert_eq!(*final_, i == 3 || i == 7 || i == 8, "pdu {i}");
            assert_eq!(status.is_some(), i == 8);
        }
        // Only the PDU with status consumed a StatSN.
        let TargetPdu::DataIn { seq, .. } = &pdus[8] else {
            unreachable!()
        };
        assert_eq!(seq.stat_sn, 100);
    }

    #[test]
    fn residuals_follow_the_expected_length() {
        let mut c = conn(limits());
        // READ of 2 blocks with room for one: overflow, data truncated.
        feed(&mut c, command(1, 1, 0x28, 2, 512, &[]));
        drain(&mut c);
        c.complete(1, ok(Bytes::from(vec![1u8; 1024])));
        let a = drain(&mut c);
        let [Action::Send(TargetPdu::DataIn { residual, data, .. })] = &a[..] else {
            panic!("{a:?}")
        };
        assert_eq!((*residual, data.len()), (Residual::Overflow(512), 512));
        // WRITE of one block with EDTL 1000: the SCSI layer gets all of it,
        // the response reports the underflow.
        feed(&mut c, command(2, 2, 0x2a, 1, 1000, &[7; 1000]));
        let a = drain(&mut c);
        let [Action::Execute {
            itt: 2, data_out, ..
        }] = &a[..]
        else {
            panic!("{a:?}")
        };
        assert_eq!(data_out.len(), 1000);
        c.complete(2, ok(Bytes::new()));
        let a = drain(&mut c);
        let [Action::Send(TargetPdu::ScsiResponse {
            status: 0,
            residual,
            ..
        })] = &a[..]
        else {
            panic!("{a:?}")
        };
        assert_eq!(*residual, Residual::Underflow(488));
        // An unknown opcode: CHECK CONDITION, INVALID COMMAND OPERATION CODE.
        feed(&mut c, command(3, 3, 0xee, 0, 0, &[]));
        let a = drain(&mut c);
        let [Action::Send(TargetPdu::ScsiResponse {
            status: 2, sense, ..
        })] = &a[..]
        else {
            panic!("{a:?}")
        };
        assert_eq!((sense[2], sense[12]), (5, 0x20));
    }

    #[test]
    fn cmdsn_window_drops_outsiders_and_orders_gaps() {
        let mut c = conn(limits());
        // Too high (beyond MaxCmdSN = 128) and too low: dropped silently.
        feed(&mut c, command(1, 1 + QUEUE_DEPTH, 0x28, 1, 512, &[]));
        feed(&mut c, command(2, 0, 0x28, 1, 512, &[]));
        assert!(drain(&mut c).is_empty());
        // CmdSN 2 arrives before 1: held, then both delivered in order.
        feed(&mut c, command(4, 2, 0x28, 1, 512, &[]));
        assert!(drain(&mut c).is_empty());
        feed(&mut c, command(3, 1, 0x28, 1, 512, &[]));
        let itts: Vec<u32> = drain(&mut c)
            .into_iter()
            .map(|a| match a {
                Action::Execute { itt, .. } => itt,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(itts, [3, 4]);
    }

    #[test]
    fn abort_of_a_running_task_answers_after_it_finishes() {
        let mut c = conn(limits());
        feed(&mut c, command(5, 1, 0x28, 1, 512, &[]));
        drain(&mut c);
        let tmf = |itt, function, referenced_task_tag| {
            InitiatorPdu::TaskManagement(TaskManagement {
                immediate: true,
                function,
                lun: 0,
                itt,
                referenced_task_tag,
                cmdsn: 2,
                exp_statsn: 0,
                ref_cmdsn: 1,
                exp_data_sn: 0,
            })
        };
        feed(&mut c, tmf(50, tmf::ABORT_TASK, 5));
        assert!(drain(&mut c).is_empty(), "waits for the running read");
        c.complete(5, ok(Bytes::from(vec![0u8; 512])));
        let a = drain(&mut c);
        let [Action::Send(TargetPdu::TaskManagementResponse {
            itt: 50, response, ..
        })] = &a[..]
        else {
            panic!("{a:?}")
        };
        assert_eq!(*response, tmf::FUNCTION_COMPLETE);
        // A task that no longer exists.
        feed(&mut c, tmf(51, tmf::ABORT_TASK, 5));
        let a = drain(&mut c);
        let [Action::Send(TargetPdu::TaskManagementResponse { response, .. })] = &a[..] else {
            panic!("{a:?}")
        };
        assert_eq!(*response, tmf::TASK_DOES_NOT_EXIST);
        // LUN reset: reset action, then the answer.
        feed(&mut c, tmf(52, tmf::LOGICAL_UNIT_RESET, 0));
        let a = drain(&mut c);
        assert!(matches!(
            &a[..],
            [
                Action::Reset {
                    lun: Some(0),
                    kind: ResetKind::LogicalUnit
                },
                Action::Send(TargetPdu::TaskManagementResponse {
                    itt: 52,
                    response: 0,
                    ..
                })
            ]
        ));
    }

    #[test]
    fn long_text_answers_continue_across_pdus() {
        let mut c = conn(limits());
        let text = |ttt, data: &'static [u8]| {
            InitiatorPdu::Text(TextRequest {
                immediate: true,
                final_: true,
                cont: false,
                lun: 0,
                itt: 9,
                ttt,
                cmdsn: 1,
                exp_statsn: 0,
                data: Bytes::from_static(data),
            })
        };
        feed(&mut c, text(RESERVED_TAG, b"SendTargets=All\0"));
        let mut got = Vec::new();
        for round in 0.. {
            let a = drain(&mut c);
            let [Action::Send(TargetPdu::TextResponse {
                final_,
                cont,
                ttt,
                data,
                ..
            })] = &a[..]
            else {
                panic!("{a:?}")
            };
            assert!(data.len() <= 4096);
            got.extend_from_slice(data);
            if *final_ {
                assert!(!cont && *ttt == RESERVED_TAG);
                break;
            }
            assert!(*cont && *ttt != RESERVED_TAG && round < 10);
            feed(&mut c, text(*ttt, b""));
        }
        assert_eq!(
            got,
            b"TargetName=iqn.x:y\0TargetAddress=1.2.3.4:3260,1\0".repeat(200)
        );
    }

    #[test]
    fn logout_waits_for_commands_in_flight() {
        let mut c = conn(limits());
        feed(&mut c, command(1, 1, 0x28, 1, 512, &[]));
        drain(&mut c);
        feed(
            &mut c,
            InitiatorPdu::Logout(LogoutRequest {
                immediate: false,
                reason: 0,
                itt: 2,
                cid: 0,
                cmdsn: 2,
                exp_statsn: 0,
            }),
        );
        assert!(drain(&mut c).is_empty());
        c.complete(1, ok(Bytes::from(vec![0u8; 512])));
        let a = drain(&mut c);
        assert!(matches!(
            &a[..],
            [
                Action::Send(TargetPdu::DataIn { .. }),
                Action::Send(TargetPdu::LogoutResponse {
                    itt: 2,
                    response: 0,
                    ..
                }),
                Action::Close(CloseReason::Logout)
            ]
        ));
    }

    #[test]
    fn keepalive_pings_then_gives_up() {
        let mut c = conn(limits());
        let start = Instant::now();
        c.tick(start + Duration::from_secs(1));
        assert!(drain(&mut c).is_empty());
        c.tick(start + KEEPALIVE_INTERVAL);
        let a = drain(&mut c);
        let [Action::Send(TargetPdu::NopIn {
            itt: RESERVED_TAG,
            ttt,
            ..
        })] = &a[..]
        else {
            panic!("{a:?}")
        };
        let ttt = *ttt;
        // Answered: no timeout.
        c.receive(
            InitiatorPdu::NopOut(NopOut {
                immediate: true,
                lun: 0,
                itt: RESERVED_TAG,
                ttt,
                cmdsn: 1,
                exp_statsn: 0,
                data: Bytes::new(),
            }),
            &[0; BHS_LEN],
            &Stub,
            start + KEEPALIVE_INTERVAL + Duration::from_secs(1),
        );
        // Answered: no timeout, only the next ping once idle again.
        let answered = start + KEEPALIVE_INTERVAL + Duration::from_secs(1);
        c.tick(answered + Duration::from_secs(1));
        assert!(drain(&mut c).is_empty());
        let next = answered + KEEPALIVE_INTERVAL;
        c.tick(next);
        assert!(matches!(
            &drain(&mut c)[..],
            [Action::Send(TargetPdu::NopIn { .. })]
        ));
        // Unanswered: the connection is dropped.
        c.tick(next + KEEPALIVE_TIMEOUT.saturating_sub(Duration::from_secs(1)));
        assert!(drain(&mut c).is_empty());
        c.tick(next + KEEPALIVE_TIMEOUT);
        assert!(matches!(
            &drain(&mut c)[..],
            [Action::Close(CloseReason::KeepaliveTimeout)]
        ));
    }

    #[test]
    fn another_sessions_reset_aborts_silently() {
        let mut c = conn(limits());
        // One read executing, one write still waiting for its data.
        feed(&mut c, command(1, 1, 0x28, 1, 512, &[]));
        feed(&mut c, command(2, 2, 0x2a, 40, 20480, &[]));
        drain(&mut c);
        assert_eq!(c.tasks_in_flight(), 2);
        c.abort_tasks(|lun| lun == 0);
        assert_eq!(
            c.tasks_in_flight(),
            1,
            "the running read stays until it ends"
        );
        assert!(drain(&mut c).is_empty(), "no answers for aborted commands");
        c.complete(1, ok(Bytes::from(vec![0u8; 512])));
        assert!(
            drain(&mut c).is_empty(),
            "the aborted read's data is dropped"
        );
        assert_eq!(c.tasks_in_flight(), 0);
        // Other LUNs are left alone.
        feed(&mut c, command(3, 3, 0x28, 1, 512, &[]));
        drain(&mut c);
        c.abort_tasks(|lun| lun == 7);
        c.complete(3, ok(Bytes::from(vec![0u8; 512])));
        assert!(matches!(
            &drain(&mut c)[..],
            [Action::Send(TargetPdu::DataIn { .. })]
        ));
    }
}
