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

use super::{Export, Server, ServerConfig};
use crate::proto::consts::{
    CMD_FLUSH, CMD_READ, CMD_WRITE, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, IHAVEOPT, OPT_GO,
    REP_ACK, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
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
    async fn connect(server: &Server) -> Client {
        let (mine, theirs) = tokio::io::duplex(1 << 20);
        server.spawn_connection(theirs, "test".into());
        let mut stream = mine;
        // Greeting: NBDMAGIC, IHAVEOPT, handshake flags.
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting).await.unwrap();
        let mut out = BytesMut::new();
        out.put_u32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        // OPT_GO for the default export, no info requests.
        out.put_u64(IHAVEOPT);
        out.put_u32(OPT_GO);
        out.put_u32(6);
        out.put_u32(0);
        out.put_u16(0);
        stream.write_all(&out).await.unwrap();
        loop {
            let mut header = [0u8; 20];
            stream.read_exact(&mut header).await.unwrap();
            let reply = u32::from_be_bytes(header[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(header[16..20].try_into().unwrap());
            let mut data = vec![0u8; len as usize];
            stream.read_exact(&mut data).await.unwrap();
            if reply == REP_ACK {
                break;
            }
            assert!(reply & (1 << 31) == 0, "option error {reply:#x}");
        }
        Client { stream }
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
