//! Targets added to and removed from a running portal, over TCP, with a
//! minimal initiator: one-PDU logins, SendTargets, READ(10)/WRITE(10)
//! with immediate data.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use blockcore::{
    BlockDevice, DeviceInfo, Extent, MemDevice, Result as BlockResult, WriteFlags, ZeroFlags,
};
use bytes::{Bytes, BytesMut};
use iscsi_target::login::{status, LoginConfig, TargetConfig};
use iscsi_target::pdu::{self, opcode, Framing, BHS_LEN};
use iscsi_target::scsi::{Lun, LunIdentity, LunMap};
use iscsi_target::server::{Server, ServerConfig, TargetError};
use iscsi_target::text::{encode_pairs, parse_pairs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const INITIATOR: &str = "iqn.2026-11.test:initiator";
const ALPHA: &str = "iqn.2026-11.test:alpha";
const BETA: &str = "iqn.2026-11.test:beta";
const BLOCK: usize = 512;

/// Writes take `delay` once `slow` is set; counts writes started.
#[derive(Debug)]
struct SlowWrites {
    inner: MemDevice,
    delay: Duration,
    slow: AtomicBool,
    writes_started: AtomicU64,
}

#[async_trait]
impl BlockDevice for SlowWrites {
    fn info(&self) -> DeviceInfo {
        self.inner.info()
    }
    async fn read(&self, offset: u64, len: usize) -> BlockResult<Bytes> {
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> BlockResult<()> {
        self.writes_started.fetch_add(1, Ordering::SeqCst);
        if self.slow.load(Ordering::SeqCst) {
            tokio::time::sleep(self.delay).await;
        }
        self.inner.write(offset, data, flags).await
    }
    async fn flush(&self) -> BlockResult<()> {
        self.inner.flush().await
    }
    async fn trim(&self, offset: u64, len: u64, flags: WriteFlags) -> BlockResult<()> {
        self.inner.trim(offset, len, flags).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BlockResult<()> {
        self.inner.write_zeroes(offset, len, flags).await
    }
    async fn extents(&self, offset: u64, len: u64) -> BlockResult<Vec<Extent>> {
        self.inner.extents(offset, len).await
    }
}

fn target(name: &str) -> TargetConfig {
    TargetConfig {
        name: name.into(),
        alias: None,
        allowed_initiators: Vec::new(),
        chap: None,
    }
}

fn luns(device: Arc<dyn BlockDevice>) -> Arc<LunMap> {
    let lun = Lun::new(
        device,
        LunIdentity {
            volume_name: "test".into(),
            vendor: "FERRY".into(),
            product: "test disk".into(),
            revision: "0".into(),
        },
    );
    Arc::new(LunMap::new(vec![(0, Arc::new(lun))]))
}

fn mem() -> Arc<dyn BlockDevice> {
    Arc::new(MemDevice::new(1 << 20))
}

/// A portal serving `targets` on a loopback port.
async fn portal(targets: Vec<(&str, Arc<dyn BlockDevice>)>) -> (Server, SocketAddr) {
    let mut login = LoginConfig::default();
    let mut map = HashMap::new();
    for (name, device) in targets {
        login.targets.push(target(name));
        map.insert(name.to_owned(), luns(device));
    }
    let server = Server::new(ServerConfig { login, luns: map });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn({
        let server = server.clone();
        async move { server.serve(listener).await }
    });
    (server, addr)
}

/// What the initiator side decodes with: no digests, any segment length.
const FRAMING: Framing = Framing {
    header_digest: false,
    data_digest: false,
    max_recv_data_segment: 1 << 24,
};

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

/// One connection of the initiator.
struct Initiator {
    stream: TcpStream,
    buf: BytesMut,
    isid: [u8; 6],
    cmd_sn: u32,
    exp_stat_sn: u32,
    itt: u32,
}

impl Initiator {
    async fn connect(addr: SocketAddr, isid: u8) -> Initiator {
        Initiator {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: BytesMut::new(),
            isid: [0x80, 0, 0, 0, 0, isid],
            cmd_sn: 1,
            exp_stat_sn: 0,
            itt: 0,
        }
    }

    /// Logs in to `target` (`None`: a discovery session), straight from
    /// the operational stage to full feature phase with default
    /// parameters; the login status if refused.
    async fn login(addr: SocketAddr, isid: u8, target: Option<&str>) -> Result<Initiator, u16> {
        let mut i = Initiator::connect(addr, isid).await;
        match i.login_pdu(1, 3, &Self::identity(target)).await {
            status::SUCCESS => Ok(i),
            refused => Err(refused),
        }
    }

    fn identity(target: Option<&str>) -> Vec<u8> {
        match target {
            Some(name) => encode_pairs(&[
                ("InitiatorName", INITIATOR),
                ("TargetName", name),
                ("SessionType", "Normal"),
            ]),
            None => encode_pairs(&[("InitiatorName", INITIATOR), ("SessionType", "Discovery")]),
        }
    }

    /// Sends one Login Request moving from stage `csg` to `nsg` (transit
    /// set) and returns the response's status.
    async fn login_pdu(&mut self, csg: u8, nsg: u8, data: &[u8]) -> u16 {
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = opcode::LOGIN | 0x40;
        bhs[1] = 0x80 | (csg << 2) | nsg;
        bhs[8..14].copy_from_slice(&self.isid);
        bhs[16..20].copy_from_slice(&self.itt.to_be_bytes());
        bhs[24..28].copy_from_slice(&self.cmd_sn.to_be_bytes());
        bhs[28..32].copy_from_slice(&self.exp_stat_sn.to_be_bytes());
        self.send(&bhs, data).await;
        let (bhs, _) = self.receive().await.expect("no login response");
        assert_eq!(bhs[0] & 0x3f, opcode::LOGIN_RESPONSE);
        u16::from(bhs[36]) << 8 | u16::from(bhs[37])
    }

    async fn send(&mut self, bhs: &[u8; BHS_LEN], data: &[u8]) {
        let wire = pdu::encode_initiator(bhs, data, &FRAMING);
        self.stream.write_all(&wire).await.unwrap();
    }

    /// The next target PDU, skipping NOP-Ins; `None` once the target
    /// closed the connection.
    async fn receive(&mut self) -> Option<([u8; BHS_LEN], Bytes)> {
        loop {
            if let Some(raw) = pdu::decode(&mut self.buf, &FRAMING).unwrap() {
                let stat_sn = be32(&raw.bhs, 24);
                let op = raw.bhs[0] & 0x3f;
                // Data-In without status carries no StatSN.
                if op != opcode::DATA_IN || raw.bhs[1] & 0x01 != 0 {
                    self.exp_stat_sn = stat_sn.wrapping_add(1);
                }
                if op == opcode::NOP_IN {
                    continue;
                }
                return Some((raw.bhs, raw.data));
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    fn next_itt(&mut self) -> u32 {
        self.itt = self.itt.wrapping_add(1);
        self.itt
    }

    /// Sends a SCSI command for LUN 0 without waiting for its answer;
    /// returns its ITT.
    async fn start_command(&mut self, cdb: &[u8], read_len: u32, data_out: &[u8]) -> u32 {
        let itt = self.next_itt();
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = opcode::SCSI_COMMAND;
        bhs[1] = 0x80 | 1 | if data_out.is_empty() { 0x40 } else { 0x20 };
        bhs[16..20].copy_from_slice(&itt.to_be_bytes());
        let expected = if data_out.is_empty() {
            read_len
        } else {
            u32::try_from(data_out.len()).unwrap()
        };
        bhs[20..24].copy_from_slice(&expected.to_be_bytes());
        bhs[24..28].copy_from_slice(&self.cmd_sn.to_be_bytes());
        bhs[28..32].copy_from_slice(&self.exp_stat_sn.to_be_bytes());
        bhs[32..32 + cdb.len()].copy_from_slice(cdb);
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        self.send(&bhs, data_out).await;
        itt
    }

    /// Waits for the status of the command `itt`: (SCSI status, data in).
    async fn finish_command(&mut self, itt: u32) -> (u8, Vec<u8>) {
        let mut data = Vec::new();
        loop {
            let (bhs, segment) = self.receive().await.expect("connection closed");
            assert_eq!(be32(&bhs, 16), itt, "answer to another command");
            match bhs[0] & 0x3f {
                opcode::DATA_IN => {
                    data.extend_from_slice(&segment);
                    if bhs[1] & 0x01 != 0 {
                        return (bhs[3], data);
                    }
                }
                opcode::SCSI_RESPONSE => {
                    assert_eq!(bhs[2], 0, "iSCSI response code");
                    return (bhs[3], data);
                }
                other => panic!("unexpected PDU {other:#04x}"),
            }
        }
    }

    fn cdb10(op: u8, lba: u32, blocks: u16) -> [u8; 10] {
        let mut cdb = [0u8; 10];
        cdb[0] = op;
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
        cdb
    }

    async fn start_write(&mut self, lba: u32, data: &[u8]) -> u32 {
        let blocks = u16::try_from(data.len() / BLOCK).unwrap();
        self.start_command(&Self::cdb10(0x2a, lba, blocks), 0, data)
            .await
    }

    async fn write(&mut self, lba: u32, data: &[u8]) {
        let itt = self.start_write(lba, data).await;
        assert_eq!(self.finish_command(itt).await, (0, Vec::new()));
    }

    async fn read(&mut self, lba: u32, blocks: u16) -> Vec<u8> {
        let len = u32::from(blocks) * 512;
        let itt = self
            .start_command(&Self::cdb10(0x28, lba, blocks), len, &[])
            .await;
        let (status, data) = self.finish_command(itt).await;
        assert_eq!(status, 0, "READ(10) status");
        data
    }

    /// SendTargets=All in a discovery session: the target names listed.
    async fn send_targets(&mut self) -> Vec<String> {
        let itt = self.next_itt();
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = opcode::TEXT | 0x40;
        bhs[1] = 0x80;
        bhs[16..20].copy_from_slice(&itt.to_be_bytes());
        bhs[20..24].copy_from_slice(&pdu::RESERVED_TAG.to_be_bytes());
        bhs[24..28].copy_from_slice(&self.cmd_sn.to_be_bytes());
        bhs[28..32].copy_from_slice(&self.exp_stat_sn.to_be_bytes());
        self.send(&bhs, b"SendTargets=All\0").await;
        let (bhs, data) = self.receive().await.expect("no text response");
        assert_eq!(bhs[0] & 0x3f, opcode::TEXT_RESPONSE);
        parse_pairs(&data)
            .unwrap()
            .into_iter()
            .filter(|(k, _)| k == "TargetName")
            .map(|(_, v)| v)
            .collect()
    }

    /// Fails unless the target closes the connection soon.
    async fn assert_closed(&mut self) {
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            while self.receive().await.is_some() {}
        })
        .await;
        assert!(closed.is_ok(), "the connection was not closed");
    }
}

/// Discovery's answer on a fresh session.
async fn discover(addr: SocketAddr) -> Vec<String> {
    let mut d = Initiator::login(addr, 99, None).await.unwrap();
    d.send_targets().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_added_at_run_time_is_discovered_and_served() {
    let (server, addr) = portal(vec![(ALPHA, mem())]).await;
    assert_eq!(server.target_names(), [ALPHA]);
    // A discovery session and a connection opened before the target exists.
    let mut discovery = Initiator::login(addr, 1, None).await.unwrap();
    assert_eq!(discovery.send_targets().await, [ALPHA]);
    let mut early = Initiator::connect(addr, 2).await;

    let beta = Arc::new(MemDevice::new(1 << 20));
    server.add_target(target(BETA), luns(beta.clone())).unwrap();
    assert!(matches!(
        server.add_target(target(&BETA.to_uppercase()), luns(mem())),
        Err(TargetError::DuplicateTarget(_))
    ));
    assert_eq!(server.target_names(), [ALPHA, BETA]);
    assert_eq!(discover(addr).await, [ALPHA, BETA]);
    // The older discovery session sees the new target too.
    assert_eq!(discovery.send_targets().await, [ALPHA, BETA]);

    // The login snapshot is taken at the first Login Request, not at accept.
    let answer = early
        .login_pdu(1, 3, &Initiator::identity(Some(BETA)))
        .await;
    assert_eq!(answer, status::SUCCESS);
    early.write(4, &[0xab; BLOCK]).await;
    assert_eq!(early.read(4, 1).await, [0xab; BLOCK]);
    assert_eq!(
        beta.read(4 * 512, BLOCK).await.unwrap(),
        Bytes::from(vec![0xab; BLOCK]),
        "the write went to the added target's device"
    );
    let mut other = Initiator::login(addr, 3, Some(ALPHA)).await.unwrap();
    assert_eq!(other.read(4, 1).await, [0; BLOCK]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_target_ends_its_sessions_and_leaves_others_alone() {
    let slow = Arc::new(SlowWrites {
        inner: MemDevice::new(1 << 20),
        delay: Duration::from_millis(300),
        slow: AtomicBool::new(false),
        writes_started: AtomicU64::new(0),
    });
    let (server, addr) = portal(vec![
        (ALPHA, slow.clone() as Arc<dyn BlockDevice>),
        (BETA, mem()),
    ])
    .await;
    let mut on_alpha = Initiator::login(addr, 1, Some(ALPHA)).await.unwrap();
    let mut on_beta = Initiator::login(addr, 2, Some(BETA)).await.unwrap();
    on_alpha.write(0, &[1; BLOCK]).await;

    // Beta keeps doing I/O through the removal and after it.
    let removed = Arc::new(AtomicBool::new(false));
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let busy = tokio::spawn({
        let removed = Arc::clone(&removed);
        async move {
            let mut started = Some(started_tx);
            let mut after_removal = 0;
            for n in 0u32.. {
                let block = [u8::try_from(n % 251).unwrap(); BLOCK];
                on_beta.write(n % 64, &block).await;
                assert_eq!(on_beta.read(n % 64, 1).await, block);
                if let Some(tx) = started.take() {
                    let _ = tx.send(());
                }
                if removed.load(Ordering::SeqCst) {
                    after_removal += 1;
                    if after_removal == 50 {
                        break;
                    }
                }
            }
            on_beta
        }
    });
    started_rx.await.unwrap();

    // A write in flight on alpha when it is removed still reaches the device.
    slow.slow.store(true, Ordering::SeqCst);
    let before = slow.writes_started.load(Ordering::SeqCst);
    on_alpha.start_write(8, &[2; BLOCK]).await;
    tokio::time::timeout(Duration::from_secs(10), async {
        while slow.writes_started.load(Ordering::SeqCst) == before {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the write never reached the device");
    server
        .remove_target(ALPHA, Duration::from_secs(10))
        .await
        .unwrap();
    removed.store(true, Ordering::SeqCst);
    assert_eq!(
        slow.inner.read(8 * 512, BLOCK).await.unwrap(),
        Bytes::from(vec![2; BLOCK]),
        "removal returned before the write in flight finished"
    );
    on_alpha.assert_closed().await;

    let mut on_beta = busy.await.expect("I/O on the other target failed");
    assert_eq!(on_beta.read(100, 1).await, [0; BLOCK]);
    assert_eq!(server.target_names(), [BETA]);
    assert_eq!(discover(addr).await, [BETA]);
    assert_eq!(
        Initiator::login(addr, 3, Some(ALPHA)).await.err(),
        Some(status::TARGET_NOT_FOUND)
    );
    assert!(matches!(
        server.remove_target(ALPHA, Duration::from_secs(1)).await,
        Err(TargetError::UnknownTarget(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_under_way_when_its_target_is_removed_is_refused() {
    let (server, addr) = portal(vec![(ALPHA, mem())]).await;
    let mut i = Initiator::connect(addr, 1).await;
    let mut first = Initiator::identity(Some(ALPHA));
    first.extend(encode_pairs(&[("AuthMethod", "None")]));
    // Security stage to operational: the target is looked up here.
    assert_eq!(i.login_pdu(0, 1, &first).await, status::SUCCESS);
    server
        .remove_target(ALPHA, Duration::from_secs(1))
        .await
        .unwrap();
    // Even a same-named target added meanwhile is not the one this login
    // was checked against.
    server.add_target(target(ALPHA), luns(mem())).unwrap();
    assert_eq!(i.login_pdu(1, 3, &[]).await, status::TARGET_NOT_FOUND);
    i.assert_closed().await;
    // A new login finds the new target.
    let mut fresh = Initiator::login(addr, 2, Some(ALPHA)).await.unwrap();
    assert_eq!(fresh.read(0, 1).await, [0; BLOCK]);
}
