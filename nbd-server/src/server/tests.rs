//! In-process tests of the socket shell: a minimal client over an
//! in-memory duplex stream, against devices that delay or record.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use blockcore::{
    BlockDevice, DeviceInfo, Extent, MemDevice, Result as BlockResult, WriteFlags, ZeroFlags,
};
use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::{Export, Server, ServerConfig, ServerError};
use crate::proto::consts::{
    CMD_FLUSH, CMD_READ, CMD_WRITE, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, IHAVEOPT, OPT_GO,
    OPT_LIST, REP_ACK, REP_ERR_UNKNOWN, REP_SERVER, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
};

/// Reads at offsets below `slow_below` take `delay`; flush clears `dirty`.
#[derive(Debug)]
struct Instrumented {
    inner: MemDevice,
    slow_below: u64,
    delay: Duration,
    dirty: AtomicU64,
    flushed_after_write: AtomicBool,
    reads_started: AtomicU64,
}

impl Instrumented {
    fn new(size: u64, slow_below: u64, delay: Duration) -> Self {
        Self {
            inner: MemDevice::new(size),
            slow_below,
            delay,
            dirty: AtomicU64::new(0),
            flushed_after_write: AtomicBool::new(false),
            reads_started: AtomicU64::new(0),
        }
    }
}

#[async_trait]
impl BlockDevice for Instrumented {
    fn info(&self) -> DeviceInfo {
        self.inner.info()
    }
    async fn read(&self, offset: u64, len: usize) -> BlockResult<Bytes> {
        self.reads_started.fetch_add(1, Ordering::SeqCst);
        if offset < self.slow_below {
            tokio::time::sleep(self.delay).await;
        }
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> BlockResult<()> {
        self.inner.write(offset, data, flags).await?;
        self.dirty.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn flush(&self) -> BlockResult<()> {
        if self.dirty.swap(0, Ordering::SeqCst) > 0 {
            self.flushed_after_write.store(true, Ordering::SeqCst);
        }
        Ok(())
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

/// A client that negotiates with `OPT_GO` and then uses simple replies.
struct Client {
    stream: DuplexStream,
}

impl Client {
    /// Connects to the default export.
    async fn connect(server: &Server) -> Client {
        Self::connect_to(server, "").await
    }

    async fn connect_to(server: &Server, export: &str) -> Client {
        match Self::try_connect(server, export).await {
            Ok(c) => c,
            Err(reply) => panic!("option error {reply:#x}"),
        }
    }

    /// Greets the server; the stream is then ready for options.
    async fn greet(server: &Server) -> DuplexStream {
        let (mut mine, theirs) = tokio::io::duplex(1 << 20);
        server.spawn_connection(theirs, "test".into());
        // Greeting: NBDMAGIC, IHAVEOPT, handshake flags.
        let mut greeting = [0u8; 18];
        mine.read_exact(&mut greeting).await.unwrap();
        mine.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            .await
            .unwrap();
        mine
    }

    async fn send_option(stream: &mut DuplexStream, option: u32, data: &[u8]) {
        let mut out = BytesMut::new();
        out.put_u64(IHAVEOPT);
        out.put_u32(option);
        out.put_u32(u32::try_from(data.len()).unwrap());
        out.put_slice(data);
        stream.write_all(&out).await.unwrap();
    }

    /// One option reply: (reply type, data).
    async fn option_reply(stream: &mut DuplexStream) -> (u32, Vec<u8>) {
        let mut header = [0u8; 20];
        stream.read_exact(&mut header).await.unwrap();
        let reply = u32::from_be_bytes(header[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(header[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        stream.read_exact(&mut data).await.unwrap();
        (reply, data)
    }

    /// `OPT_GO` for `export` (no info requests), then simple replies; the
    /// error reply type if the server refuses.
    async fn try_connect(server: &Server, export: &str) -> Result<Client, u32> {
        let mut stream = Self::greet(server).await;
        let mut go = BytesMut::new();
        go.put_u32(u32::try_from(export.len()).unwrap());
        go.put_slice(export.as_bytes());
        go.put_u16(0);
        Self::send_option(&mut stream, OPT_GO, &go).await;
        loop {
            let (reply, _) = Self::option_reply(&mut stream).await;
            if reply == REP_ACK {
                return Ok(Client { stream });
            }
            if reply & (1 << 31) != 0 {
                return Err(reply);
            }
        }
    }

    /// The names `OPT_LIST` reports.
    async fn list(server: &Server) -> Vec<String> {
        let mut stream = Self::greet(server).await;
        Self::send_option(&mut stream, OPT_LIST, &[]).await;
        let mut names = Vec::new();
        loop {
            let (reply, data) = Self::option_reply(&mut stream).await;
            if reply == REP_ACK {
                return names;
            }
            assert_eq!(reply, REP_SERVER);
            let len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
            names.push(String::from_utf8(data[4..4 + len].to_vec()).unwrap());
        }
    }

    async fn send(&mut self, command: u16, cookie: u64, offset: u64, length: u32, data: &[u8]) {
        let mut out = BytesMut::new();
        out.put_u32(REQUEST_MAGIC);
        out.put_u16(0);
        out.put_u16(command);
        out.put_u64(cookie);
        out.put_u64(offset);
        out.put_u32(length);
        out.put_slice(data);
        self.stream.write_all(&out).await.unwrap();
    }

    /// Reads one simple reply; `read_len` is the data length if it answers
    /// a successful read.
    async fn reply(&mut self, read_len: impl Fn(u64) -> usize) -> (u64, u32, Vec<u8>) {
        let mut header = [0u8; 16];
        self.stream.read_exact(&mut header).await.unwrap();
        assert_eq!(
            u32::from_be_bytes(header[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        let error = u32::from_be_bytes(header[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(header[8..16].try_into().unwrap());
        let mut data = vec![0u8; if error == 0 { read_len(cookie) } else { 0 }];
        self.stream.read_exact(&mut data).await.unwrap();
        (cookie, error, data)
    }
}

fn server(device: Arc<dyn BlockDevice>) -> Server {
    Server::new(
        vec![Export {
            name: "disk".into(),
            description: String::new(),
            device,
        }],
        ServerConfig::default(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_come_back_as_requests_complete() {
    let dev = Arc::new(Instrumented::new(1 << 20, 4096, Duration::from_millis(300)));
    let server = server(dev);
    let mut c = Client::connect(&server).await;
    c.send(CMD_READ, 1, 0, 512, &[]).await; // slow
    c.send(CMD_READ, 2, 8192, 512, &[]).await; // fast
    let first = c.reply(|_| 512).await;
    let second = c.reply(|_| 512).await;
    assert_eq!(
        (first.0, second.0),
        (2, 1),
        "the fast read must not wait behind the slow one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_on_one_connection_covers_writes_completed_on_another() {
    let dev = Arc::new(Instrumented::new(1 << 20, 0, Duration::ZERO));
    let server = server(Arc::clone(&dev) as Arc<dyn BlockDevice>);
    let mut writer = Client::connect(&server).await;
    let mut flusher = Client::connect(&server).await;
    writer.send(CMD_WRITE, 7, 4096, 4, b"data").await;
    assert_eq!(writer.reply(|_| 0).await.1, 0);
    flusher.send(CMD_FLUSH, 8, 0, 0, &[]).await;
    assert_eq!(flusher.reply(|_| 0).await.1, 0);
    assert!(
        dev.flushed_after_write.load(Ordering::SeqCst),
        "the flush did not reach the device that holds the other connection's write"
    );
    writer.send(CMD_READ, 9, 4096, 4, &[]).await;
    assert_eq!(writer.reply(|_| 4).await.2, b"data");
    flusher.send(CMD_READ, 10, 4096, 4, &[]).await;
    assert_eq!(flusher.reply(|_| 4).await.2, b"data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_in_flight_requests_finish_then_flushes() {
    let dev = Arc::new(Instrumented::new(1 << 20, 4096, Duration::from_millis(300)));
    let server = server(Arc::clone(&dev) as Arc<dyn BlockDevice>);
    let mut c = Client::connect(&server).await;
    c.send(CMD_WRITE, 1, 8192, 3, b"abc").await;
    assert_eq!(c.reply(|_| 0).await.1, 0);
    c.send(CMD_READ, 2, 0, 16, &[]).await; // slow: still running at shutdown
                                           // Shut down only once the device is working on it (a request read but
                                           // not started would rightly be refused with ESHUTDOWN instead).
    let started = tokio::time::timeout(Duration::from_secs(10), async {
        while dev.reads_started.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    started.await.expect("the read never reached the device");
    server.shutdown();
    let (cookie, error, data) = c.reply(|_| 16).await;
    assert_eq!((cookie, error, data.len()), (2, 0, 16));
    // After the in-flight request, the server closes the connection.
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), c.stream.read_to_end(&mut rest))
        .await
        .expect("connection not closed after shutdown")
        .unwrap();
    assert_eq!(n, 0);
    server.drain(Duration::from_secs(5)).await.unwrap();
    assert!(
        dev.flushed_after_write.load(Ordering::SeqCst),
        "drain did not flush the export"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_floods_and_never_reads_is_paused_then_answered() {
    let server = server(Arc::new(MemDevice::new(1 << 20)));
    let c = Client::connect(&server).await;
    // Reads past the end: each is refused with EINVAL and costs the server
    // a queued reply. The server must stop reading rather than queue
    // replies without bound, and still answer every request.
    let requests: u64 = 200_000;
    let mut batch = BytesMut::new();
    for cookie in 0..requests {
        batch.put_u32(REQUEST_MAGIC);
        batch.put_u16(0);
        batch.put_u16(CMD_READ);
        batch.put_u64(cookie);
        batch.put_u64(2 << 20);
        batch.put_u32(512);
    }
    let (mut rd, mut wr) = tokio::io::split(c.stream);
    let flood = tokio::spawn(async move {
        wr.write_all(&batch).await.unwrap();
        wr
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !flood.is_finished(),
        "the server read 200000 requests without anyone reading its replies"
    );
    let mut header = [0u8; 16];
    for expected in 0..requests {
        rd.read_exact(&mut header).await.unwrap();
        let error = u32::from_be_bytes(header[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(header[8..16].try_into().unwrap());
        assert_eq!(
            (cookie, error),
            (expected, 22),
            "EINVAL for every request, in order"
        );
    }
    flood.await.unwrap();
}

fn export(name: &str, device: Arc<dyn BlockDevice>) -> Export {
    Export {
        name: name.into(),
        description: String::new(),
        device,
    }
}

/// Waits until `dev` is working on a read: a request read but not yet
/// started would rightly be refused with ESHUTDOWN instead of answered.
async fn wait_for_read(dev: &Instrumented) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while dev.reads_started.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the read never reached the device");
}

/// Reads until the server closes the connection; fails if it does not.
async fn assert_closed(c: &mut Client) {
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), c.stream.read_to_end(&mut rest))
        .await
        .expect("connection not closed")
        .unwrap();
    assert_eq!(n, 0, "unexpected bytes after the last reply");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_added_at_run_time_is_listed_and_served() {
    let server = Server::new(Vec::new(), ServerConfig::default()).unwrap();
    assert!(server.export_names().is_empty());
    assert_eq!(
        Client::try_connect(&server, "").await.err(),
        Some(REP_ERR_UNKNOWN),
        "no default export yet"
    );
    let a = Arc::new(MemDevice::from_bytes(&[1; 4096]));
    let b = Arc::new(MemDevice::from_bytes(&[2; 4096]));
    server.add_export(export("a", a)).unwrap();
    server.add_export(export("b", b)).unwrap();
    assert!(matches!(
        server.add_export(export("a", Arc::new(MemDevice::new(4096)))),
        Err(ServerError::DuplicateExport(name)) if name == "a"
    ));
    assert_eq!(server.export_names(), ["a", "b"]);
    assert_eq!(Client::list(&server).await, ["a", "b"]);
    let mut on_b = Client::connect_to(&server, "b").await;
    on_b.send(CMD_READ, 1, 0, 4, &[]).await;
    assert_eq!(on_b.reply(|_| 4).await, (1, 0, vec![2; 4]));
    // The empty name selects the first export added.
    let mut default = Client::connect(&server).await;
    default.send(CMD_READ, 2, 0, 4, &[]).await;
    assert_eq!(default.reply(|_| 4).await, (2, 0, vec![1; 4]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_an_export_leaves_connections_to_others_alone() {
    let server = Server::new(
        vec![
            export("a", Arc::new(MemDevice::new(1 << 20))),
            export("b", Arc::new(MemDevice::new(1 << 20))),
        ],
        ServerConfig::default(),
    )
    .unwrap();
    let mut on_a = Client::connect_to(&server, "a").await;
    let mut on_b = Client::connect_to(&server, "b").await;
    let removed = Arc::new(AtomicBool::new(false));
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let busy = tokio::spawn({
        let removed = Arc::clone(&removed);
        async move {
            let mut started = Some(started_tx);
            let mut after_removal = 0;
            for cookie in 0u64.. {
                let data = cookie.to_be_bytes();
                let offset = (cookie % 256) * 4096;
                on_b.send(CMD_WRITE, 2 * cookie, offset, 8, &data).await;
                assert_eq!(on_b.reply(|_| 0).await, (2 * cookie, 0, Vec::new()));
                on_b.send(CMD_READ, 2 * cookie + 1, offset, 8, &[]).await;
                assert_eq!(on_b.reply(|_| 8).await, (2 * cookie + 1, 0, data.to_vec()));
                if let Some(tx) = started.take() {
                    let _ = tx.send(());
                }
                if removed.load(Ordering::SeqCst) {
                    after_removal += 1;
                    if after_removal == 100 {
                        break;
                    }
                }
            }
        }
    });
    started_rx.await.unwrap();
    let export = server
        .remove_export("a", Duration::from_secs(5))
        .await
        .unwrap();
    removed.store(true, Ordering::SeqCst);
    assert_eq!(export.name, "a");
    assert_closed(&mut on_a).await;
    busy.await.expect("I/O on the other export failed");
    assert_eq!(server.export_names(), ["b"]);
    assert_eq!(Client::list(&server).await, ["b"]);
    assert_eq!(
        Client::try_connect(&server, "a").await.err(),
        Some(REP_ERR_UNKNOWN)
    );
    // The default is now the first export still present.
    let mut default = Client::connect(&server).await;
    default.send(CMD_READ, 1, 0, 8, &[]).await;
    assert_eq!(
        default.reply(|_| 8).await,
        (1, 0, 0u64.to_be_bytes().to_vec())
    );
    assert!(matches!(
        server.remove_export("a", Duration::from_secs(1)).await,
        Err(ServerError::UnknownExport(name)) if name == "a"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_answers_in_flight_requests_closes_then_flushes() {
    let dev = Arc::new(Instrumented::new(1 << 20, 4096, Duration::from_millis(300)));
    let server = Server::new(
        vec![
            export("a", Arc::clone(&dev) as Arc<dyn BlockDevice>),
            export("b", Arc::new(MemDevice::new(1 << 20))),
        ],
        ServerConfig::default(),
    )
    .unwrap();
    let mut c = Client::connect_to(&server, "a").await;
    c.send(CMD_WRITE, 1, 8192, 3, b"abc").await;
    assert_eq!(c.reply(|_| 0).await.1, 0);
    c.send(CMD_READ, 2, 0, 16, &[]).await; // slow: still running at removal
    wait_for_read(&dev).await;
    let removal = tokio::spawn({
        let server = server.clone();
        async move { server.remove_export("a", Duration::from_secs(10)).await }
    });
    let (cookie, error, data) = c.reply(|_| 16).await;
    assert_eq!((cookie, error, data.len()), (2, 0, 16));
    assert_closed(&mut c).await;
    let export = removal.await.unwrap().unwrap();
    assert_eq!(export.name, "a");
    assert!(
        dev.flushed_after_write.load(Ordering::SeqCst),
        "removal did not flush the acknowledged write"
    );
    assert_eq!(
        Client::try_connect(&server, "a").await.err(),
        Some(REP_ERR_UNKNOWN)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_waits_no_longer_than_its_timeout() {
    let dev = Arc::new(Instrumented::new(1 << 20, 4096, Duration::from_secs(2)));
    let server = server(Arc::clone(&dev) as Arc<dyn BlockDevice>);
    let mut c = Client::connect(&server).await;
    c.send(CMD_READ, 1, 0, 16, &[]).await;
    wait_for_read(&dev).await;
    let start = std::time::Instant::now();
    server
        .remove_export("disk", Duration::from_millis(50))
        .await
        .unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    // The request still completes and is answered.
    assert_eq!(c.reply(|_| 16).await.1, 0);
    assert_closed(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_flushes_exports_added_later() {
    let server = Server::new(Vec::new(), ServerConfig::default()).unwrap();
    let dev = Arc::new(Instrumented::new(1 << 20, 0, Duration::ZERO));
    server
        .add_export(export("late", Arc::clone(&dev) as Arc<dyn BlockDevice>))
        .unwrap();
    let mut c = Client::connect(&server).await;
    c.send(CMD_WRITE, 1, 0, 4, b"data").await;
    assert_eq!(c.reply(|_| 0).await.1, 0);
    server.shutdown();
    assert_closed(&mut c).await;
    server.drain(Duration::from_secs(5)).await.unwrap();
    assert!(
        dev.flushed_after_write.load(Ordering::SeqCst),
        "drain did not flush the export added later"
    );
}
