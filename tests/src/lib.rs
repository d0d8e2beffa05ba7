//! Test support: start `ferry` and the peers, find tools.
//!
//! Every integration test starts its own `ferry serve` on port 0 (or a Unix
//! socket in its own temp dir) with its own image, so tests can run in
//! parallel processes (cargo-nextest) without sharing paths or ports.
//!
//! A missing external tool is a failure, never a skip: see [`tool`].

use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub use tempfile::TempDir;

pub mod disk;

/// How long to wait for ferry to print its `listening nbd ...` lines.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long ferry may take to exit after SIGTERM.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------
// Locating binaries
// ---------------------------------------------------------------------------

/// The ferry binary: `$FERRY_BIN`, else `<target>/<profile>/ferry` next to the
/// test executable (`target/debug/deps/foo-123` -> `target/debug/ferry`).
pub fn ferry_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FERRY_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "FERRY_BIN={} does not exist", p.display());
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.file_name() == Some(OsStr::new("deps")) {
        dir.pop();
    }
    let p = dir.join("ferry");
    assert!(
        p.is_file(),
        "ferry binary not found at {} (build it with `cargo build -p ferry` or set FERRY_BIN)",
        p.display()
    );
    p
}

/// Find `name` on PATH. A missing tool is a test failure, never a skip.
pub fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(name);
        if let Ok(md) = fs::metadata(&p) {
            if md.is_file() && md.mode() & 0o111 != 0 {
                return p;
            }
        }
    }
    panic!("missing tool {name}: run scripts/install-deps.sh");
}

/// A `Command` for an external tool, checked to exist.
pub fn cmd(name: &str) -> Command {
    Command::new(tool(name))
}

/// `nbdsh` is `python3 -m nbd` with python3 from PATH; the libnbd bindings are
/// installed for the distribution's python (/usr/bin/python3), which a pyenv or
/// venv python earlier on PATH would shadow. Put /usr/bin first for it.
pub fn nbdsh() -> Command {
    let nbdsh = tool("nbdsh");
    let mut c = Command::new(&nbdsh);
    let old = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![PathBuf::from("/usr/bin")];
    if let Some(d) = nbdsh.parent() {
        dirs.push(d.to_path_buf());
    }
    dirs.extend(std::env::split_paths(&old));
    c.env("PATH", std::env::join_paths(dirs).expect("join PATH"));
    c
}

// ---------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------

fn describe(c: &Command) -> String {
    let mut s = c.get_program().to_string_lossy().into_owned();
    for a in c.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Run a command, capturing its output; never asserts.
pub fn run_output(c: &mut Command) -> Output {
    c.stdin(Stdio::null());
    c.output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", describe(c)))
}

/// Run a command, assert it succeeded and return its stdout. On failure the
/// panic message carries the command line, exit status, stdout and stderr.
pub fn run(c: &mut Command) -> String {
    let out = run_output(c);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "command failed: {}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        describe(c),
        out.status,
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Run a command, assert it FAILED, and return stdout+stderr combined.
pub fn run_fail(c: &mut Command) -> (ExitStatus, String) {
    let out = run_output(c);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "command unexpectedly succeeded: {}\n{}",
        describe(c),
        text
    );
    (out.status, text)
}

/// stdout+stderr of a finished command as one string.
pub fn combined(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Parse JSON or panic showing the text.
pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{text}"))
}

// ---------------------------------------------------------------------------
// Images and files
// ---------------------------------------------------------------------------

/// A fresh temp dir under the system temp dir (/tmp: a filesystem that keeps
/// holes).
pub fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("ferry-test-")
        .tempdir()
        .expect("tempdir")
}

/// A sparse (all-hole) image of `size` bytes.
pub fn sparse_image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    let f = File::create(&p).expect("create image");
    f.set_len(size).expect("truncate image");
    p
}

/// Deterministic pseudo-random bytes (xorshift64*), different per `seed`.
pub fn pattern_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A fully allocated image of `size` bytes filled with `pattern_bytes(seed)`.
pub fn pattern_image(dir: &Path, name: &str, size: u64, seed: u64) -> PathBuf {
    let p = dir.join(name);
    let mut f = File::create(&p).expect("create image");
    let chunk = 4 * MIB;
    let mut off = 0;
    while off < size {
        let n = chunk.min(size - off);
        f.write_all(&pattern_bytes(usize::try_from(n).unwrap(), seed ^ off))
            .expect("write image");
        off += n;
    }
    f.sync_all().ok();
    p
}

/// A fully allocated image of `size` bytes of /dev/urandom data.
pub fn random_image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    let mut src = File::open("/dev/urandom").expect("open /dev/urandom");
    let mut f = File::create(&p).expect("create image");
    let n = std::io::copy(&mut (&mut src).take(size), &mut f).expect("copy random");
    assert_eq!(n, size);
    p
}

/// Write `data` at `offset` without truncating (like `dd conv=notrunc`).
pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for write");
    f.write_all_at(data, offset).expect("write_at");
    f.sync_all().ok();
}

/// Read `len` bytes at `offset`.
pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = File::open(path).expect("open for read");
    f.seek(SeekFrom::Start(offset)).expect("seek");
    let mut buf = vec![0; len];
    f.read_exact(&mut buf).expect("read_at");
    buf
}

/// Assert every byte of `path[offset..offset+len]` equals `byte`.
pub fn assert_range_filled(path: &Path, offset: u64, len: u64, byte: u8) {
    let data = read_at(path, offset, usize::try_from(len).unwrap());
    if let Some(i) = data.iter().position(|&b| b != byte) {
        panic!(
            "{}: byte at offset {} is {:#04x}, expected {:#04x} for range [{offset}, {})",
            path.display(),
            offset + i as u64,
            data[i],
            byte,
            offset + len
        );
    }
}

/// Panic unless the filesystem under `path` stores it sparsely (so that
/// hole/data layout tests mean something).
pub fn assert_sparse(path: &Path) {
    let md = fs::metadata(path).expect("metadata");
    assert!(
        md.blocks() * 512 < md.len(),
        "{} is not sparse ({} blocks for {} bytes): the temp dir's filesystem does not keep holes",
        path.display(),
        md.blocks(),
        md.len()
    );
}

/// Allocated bytes of a file (st_blocks * 512).
pub fn allocated_bytes(path: &Path) -> u64 {
    fs::metadata(path).expect("metadata").blocks() * 512
}

/// Hex sha256 of a file (sha256sum).
pub fn sha256(path: &Path) -> String {
    let out = run(cmd("sha256sum").arg(path));
    out.split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string()
}

/// Assert two files have identical contents, reporting the first difference.
pub fn assert_files_equal(a: &Path, b: &Path) {
    let ma = fs::metadata(a).expect("metadata a").len();
    let mb = fs::metadata(b).expect("metadata b").len();
    assert_eq!(
        ma,
        mb,
        "sizes differ: {} ({ma}) vs {} ({mb})",
        a.display(),
        b.display()
    );
    let mut fa = BufReader::with_capacity(1 << 20, File::open(a).expect("open a"));
    let mut fb = BufReader::with_capacity(1 << 20, File::open(b).expect("open b"));
    let mut off = 0u64;
    let mut ba = vec![0u8; 256 * 1024];
    let mut bb = vec![0u8; 256 * 1024];
    while off < ma {
        let n = usize::try_from((ma - off).min(ba.len() as u64)).unwrap();
        fa.read_exact(&mut ba[..n]).expect("read a");
        fb.read_exact(&mut bb[..n]).expect("read b");
        if ba[..n] != bb[..n] {
            let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap();
            panic!(
                "{} and {} differ at offset {}: {:#04x} vs {:#04x}",
                a.display(),
                b.display(),
                off + i as u64,
                ba[i],
                bb[i]
            );
        }
        off += n as u64;
    }
}

/// A self-signed certificate for `localhost`/127.0.0.1. Returns
/// `(cert.pem, key.pem, ca_dir)` where `ca_dir/ca-cert.pem` is the cert (what
/// qemu's tls-creds-x509 and libnbd's tls-certificates want).
pub fn self_signed_cert(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    run(cmd("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert));
    let ca_dir = dir.join("ca");
    fs::create_dir_all(&ca_dir).unwrap();
    fs::copy(&cert, ca_dir.join("ca-cert.pem")).unwrap();
    (cert, key, ca_dir)
}

/// Poll `f` every 10 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Send a signal to a process with kill(1) (no libc dependency needed).
pub fn send_signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

// ---------------------------------------------------------------------------
// The ferry server guard
// ---------------------------------------------------------------------------

/// A running `ferry serve`. Kills the process on drop (SIGTERM, then SIGKILL
/// after a bounded wait) and prints ferry's stderr if the test is panicking.
#[derive(Debug)]
pub struct Ferry {
    child: Option<Child>,
    listeners: Vec<String>,
    announced: Vec<(String, String)>,
    log_path: PathBuf,
    _log_dir: TempDir,
}

impl Ferry {
    /// `ferry serve ARGS...`; adds `--nbd 127.0.0.1:0` when ARGS has no
    /// `--nbd`. Waits for one `listening nbd ...` line per listener.
    pub fn start<I, S>(args: I) -> Ferry
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let mut n_listeners = args.iter().filter(|a| *a == "--nbd").count();
        if n_listeners == 0 {
            args.push("--nbd".into());
            args.push("127.0.0.1:0".into());
            n_listeners = 1;
        }
        let mut full = vec![OsString::from("serve")];
        full.extend(args);
        Ferry::spawn(full, &vec!["nbd"; n_listeners])
    }

    /// `ferry ARGS...` (any subcommand); waits until it has printed one
    /// `listening KIND ADDR` line for each entry of `kinds`, in any order
    /// (lines of other kinds are kept too).
    /// `nbd` listeners go to [`Ferry::listeners`], all to [`Ferry::announced`].
    pub fn spawn<I, S>(args: I, kinds: &[&str]) -> Ferry
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let log_dir = tempfile::Builder::new()
            .prefix("ferry-log-")
            .tempdir()
            .expect("log dir");
        let log_path = log_dir.path().join("ferry.stderr");
        let log = File::create(&log_path).expect("create log");

        let bin = ferry_bin();
        let mut c = Command::new(&bin);
        c.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        if std::env::var_os("RUST_LOG").is_none() {
            c.env("RUST_LOG", "info");
        }
        let cmdline = describe(&c);
        let mut child = c
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmdline}: {e}"));

        // Read stdout on a thread: forward `listening` lines, then keep
        // draining so ferry never blocks on a full pipe.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel::<(String, String)>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("listening ") {
                    if let Some((kind, addr)) = rest.trim().split_once(' ') {
                        let _ = tx.send((kind.to_string(), addr.trim().to_string()));
                    }
                }
            }
        });

        let mut ferry = Ferry {
            child: Some(child),
            listeners: Vec::new(),
            announced: Vec::new(),
            log_path,
            _log_dir: log_dir,
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        // Every kind asked for, as often as asked (other lines may come too).
        let missing = |announced: &[(String, String)]| {
            kinds.iter().any(|k| {
                let want = kinds.iter().filter(|x| *x == k).count();
                announced.iter().filter(|(a, _)| a == k).count() < want
            })
        };
        while missing(&ferry.announced) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((kind, addr)) => {
                    if kind == "nbd" {
                        ferry.listeners.push(addr.clone());
                    }
                    ferry.announced.push((kind, addr));
                }
                Err(e) => {
                    let status = ferry.child.as_mut().unwrap().try_wait().ok().flatten();
                    panic!(
                        "ferry did not print `listening` lines for {kinds:?} ({e:?}; got {:?}; exit status {status:?})\ncommand: {cmdline}\n--- ferry stderr ---\n{}",
                        ferry.announced,
                        ferry.stderr()
                    );
                }
            }
        }
        ferry
    }

    /// The address of the first `listening KIND ADDR` line of this kind.
    pub fn announced(&self, kind: &str) -> &str {
        self.announced.iter().find(|(k, _)| k == kind).map_or_else(
            || panic!("no `listening {kind}` line in {:?}", self.announced),
            |(_, a)| a.as_str(),
        )
    }

    /// Everything ferry wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The listener strings as printed: `127.0.0.1:40123` or `unix:/path`.
    pub fn listeners(&self) -> &[String] {
        &self.listeners
    }

    /// The first TCP listener.
    pub fn addr(&self) -> SocketAddr {
        self.listeners
            .iter()
            .find_map(|l| l.parse().ok())
            .unwrap_or_else(|| panic!("no TCP listener in {:?}", self.listeners))
    }

    pub fn port(&self) -> u16 {
        self.addr().port()
    }

    /// `nbd://127.0.0.1:PORT/NAME` (NAME may be empty: the first export).
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.addr(), export)
    }

    /// The first Unix socket listener's path.
    pub fn unix_socket(&self) -> PathBuf {
        self.listeners
            .iter()
            .find_map(|l| l.strip_prefix("unix:"))
            .map_or_else(
                || panic!("no unix listener in {:?}", self.listeners),
                PathBuf::from,
            )
    }

    /// `nbd+unix:///NAME?socket=PATH`.
    pub fn unix_uri(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            export,
            self.unix_socket().display()
        )
    }

    /// Connect a raw TCP stream to the first TCP listener.
    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr()).expect("connect to ferry");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// Send a signal (`"TERM"`, `"INT"`, ...).
    pub fn signal(&self, sig: &str) {
        send_signal(self.pid(), sig);
    }

    fn wait_bounded(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let mut status = None;
        wait_until(timeout, || {
            status = child.try_wait().expect("try_wait");
            status.is_some()
        });
        status
    }

    /// SIGTERM and wait (bounded). Panics (after SIGKILL) when ferry does not
    /// exit in time.
    pub fn stop(self) -> ExitStatus {
        self.stop_with("TERM")
    }

    /// Send `sig` and wait (bounded) for exit.
    pub fn stop_with(mut self, sig: &str) -> ExitStatus {
        self.signal(sig);
        if let Some(st) = self.wait_bounded(SHUTDOWN_TIMEOUT) {
            self.child = None;
            return st;
        }
        let log = self.stderr();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        panic!(
            "ferry did not exit within {SHUTDOWN_TIMEOUT:?} after SIG{sig}\n--- ferry stderr ---\n{log}"
        );
    }

    /// [`Ferry::stop`] and assert a clean exit (code 0), showing stderr if not.
    pub fn stop_ok(self) {
        let _ = self.stop_ok_log();
    }

    /// [`Ferry::stop_ok`], returning everything ferry wrote to stderr
    /// (including what it logged while shutting down).
    pub fn stop_ok_log(self) -> String {
        // The log lives in a temp dir that `stop` removes; a hard link in
        // another temp dir keeps the file (which ferry is still writing).
        let keep = tempfile::Builder::new()
            .prefix("ferry-log-keep-")
            .tempdir()
            .expect("log dir");
        let copy = keep.path().join("stderr");
        fs::hard_link(&self.log_path, &copy).expect("link the log");
        let st = self.stop();
        let log = fs::read_to_string(&copy).unwrap_or_default();
        assert!(
            st.success(),
            "ferry exited with {st} after SIGTERM (expected 0)\n--- ferry stderr ---\n{log}",
        );
        log
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        if self.child.is_none() {
            return;
        }
        self.signal("TERM");
        if self.wait_bounded(Duration::from_secs(10)).is_none() {
            if let Some(c) = self.child.as_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        self.child = None;
        if std::thread::panicking() {
            eprintln!(
                "--- ferry stderr ({}) ---\n{}--- end ferry stderr ---",
                self.log_path.display(),
                self.stderr()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// A minimal hand-written NBD client for protocol-abuse tests
// ---------------------------------------------------------------------------

/// Just enough of the NBD protocol (fixed newstyle, NBD_OPT_GO, simple
/// replies) to send well-formed and malformed requests by hand, blocking.
/// The constants and the request encoding are the server crate's own
/// (`nbd_server::proto`); what is here is only the driving.
pub mod nbd {
    use std::io::{self, Read, Write};
    use std::net::TcpStream;

    use bytes::BytesMut;
    use nbd_server::proto::transmission::{Command, CommandFlags, RequestHeader};
    use nbd_server::proto::Errno;

    pub use nbd_server::proto::consts::{
        CMD_CACHE, CMD_DISC, CMD_FLUSH, CMD_READ, CMD_WRITE, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES,
        IHAVEOPT, INFO_EXPORT, NBDMAGIC, OPTION_REPLY_MAGIC, OPT_GO, REP_ACK, REP_INFO,
        REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
    };
    use nbd_server::proto::consts::{FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES};

    pub const EINVAL: u32 = Errno::Inval.code();
    pub const ENOSPC: u32 = Errno::NoSpc.code();
    pub const EOVERFLOW: u32 = Errno::Overflow.code();

    /// A connected, negotiated client (transmission phase).
    #[derive(Debug)]
    pub struct Client {
        pub stream: TcpStream,
        pub size: u64,
        pub transmission_flags: u16,
        next_cookie: u64,
    }

    /// A simple reply.
    #[derive(Debug)]
    pub struct Reply {
        pub error: u32,
        pub cookie: u64,
        pub data: Vec<u8>,
    }

    pub fn read_u16(s: &mut impl Read) -> io::Result<u16> {
        let mut b = [0; 2];
        s.read_exact(&mut b)?;
        Ok(u16::from_be_bytes(b))
    }
    pub fn read_u32(s: &mut impl Read) -> io::Result<u32> {
        let mut b = [0; 4];
        s.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }
    pub fn read_u64(s: &mut impl Read) -> io::Result<u64> {
        let mut b = [0; 8];
        s.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    /// Read the server's greeting; returns the handshake flags.
    pub fn read_greeting(s: &mut TcpStream) -> io::Result<u16> {
        let magic = read_u64(s)?;
        assert_eq!(magic, NBDMAGIC, "bad server magic");
        let opt = read_u64(s)?;
        assert_eq!(opt, IHAVEOPT, "server is not newstyle");
        let flags = read_u16(s)?;
        assert!(
            flags & FLAG_FIXED_NEWSTYLE != 0,
            "server does not offer fixed newstyle: {flags:#x}"
        );
        Ok(flags)
    }

    /// Encodes a request header; `typ` may be a command the server does
    /// not know.
    pub fn request(flags: u16, typ: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut b = BytesMut::with_capacity(28);
        RequestHeader {
            flags: CommandFlags(flags),
            command: Command::from_code(typ),
            cookie,
            offset,
            length: len,
        }
        .encode(&mut b);
        b.to_vec()
    }

    impl Client {
        /// Full handshake: greeting, client flags FIXED_NEWSTYLE|NO_ZEROES,
        /// NBD_OPT_GO for `export` with no info requests.
        pub fn handshake(mut stream: TcpStream, export: &str) -> io::Result<Client> {
            let hflags = read_greeting(&mut stream)?;
            let mut cflags = FLAG_C_FIXED_NEWSTYLE;
            if hflags & FLAG_NO_ZEROES != 0 {
                cflags |= FLAG_C_NO_ZEROES;
            }
            stream.write_all(&cflags.to_be_bytes())?;
            let mut opt = Vec::new();
            opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
            opt.extend_from_slice(&OPT_GO.to_be_bytes());
            let name = export.as_bytes();
            let len = 4 + name.len() + 2;
            opt.extend_from_slice(&u32::try_from(len).unwrap().to_be_bytes());
            opt.extend_from_slice(&u32::try_from(name.len()).unwrap().to_be_bytes());
            opt.extend_from_slice(name);
            opt.extend_from_slice(&0u16.to_be_bytes());
            stream.write_all(&opt)?;

            let mut size = None;
            let mut tflags = 0;
            loop {
                let magic = read_u64(&mut stream)?;
                assert_eq!(magic, OPTION_REPLY_MAGIC, "bad option reply magic");
                let option = read_u32(&mut stream)?;
                assert_eq!(option, OPT_GO, "reply for wrong option");
                let typ = read_u32(&mut stream)?;
                let len = read_u32(&mut stream)? as usize;
                let mut data = vec![0; len];
                stream.read_exact(&mut data)?;
                if typ & 0x8000_0000 != 0 {
                    return Err(io::Error::other(format!(
                        "NBD_OPT_GO failed: reply type {typ:#x}: {}",
                        String::from_utf8_lossy(&data)
                    )));
                }
                match typ {
                    REP_INFO => {
                        let itype = u16::from_be_bytes([data[0], data[1]]);
                        if itype == INFO_EXPORT {
                            size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
                            tflags = u16::from_be_bytes([data[10], data[11]]);
                        }
                    }
                    REP_ACK => break,
                    other => panic!("unexpected option reply type {other:#x}"),
                }
            }
            Ok(Client {
                stream,
                size: size.expect("NBD_OPT_GO: no NBD_INFO_EXPORT before ACK"),
                transmission_flags: tflags,
                next_cookie: 1,
            })
        }

        /// Send a request (plus optional payload) and return its cookie.
        pub fn send(
            &mut self,
            flags: u16,
            typ: u16,
            offset: u64,
            len: u32,
            payload: &[u8],
        ) -> io::Result<u64> {
            let cookie = self.next_cookie;
            self.next_cookie += 1;
            let mut b = request(flags, typ, cookie, offset, len);
            b.extend_from_slice(payload);
            self.stream.write_all(&b)?;
            Ok(cookie)
        }

        /// Read one simple reply; `read_len` bytes of data follow when the
        /// reply carries no error.
        pub fn reply(&mut self, read_len: usize) -> io::Result<Reply> {
            let magic = read_u32(&mut self.stream)?;
            assert_eq!(
                magic, SIMPLE_REPLY_MAGIC,
                "expected a simple reply (structured replies were not negotiated)"
            );
            let error = read_u32(&mut self.stream)?;
            let cookie = read_u64(&mut self.stream)?;
            let mut data = Vec::new();
            if error == 0 && read_len > 0 {
                data.resize(read_len, 0);
                self.stream.read_exact(&mut data)?;
            }
            Ok(Reply {
                error,
                cookie,
                data,
            })
        }

        /// READ and return the reply.
        pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Reply> {
            let cookie = self.send(0, CMD_READ, offset, len, &[])?;
            let r = self.reply(len as usize)?;
            assert_eq!(r.cookie, cookie, "reply cookie mismatch");
            Ok(r)
        }

        /// WRITE and return the reply.
        pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<Reply> {
            let len = u32::try_from(data.len()).unwrap();
            let cookie = self.send(0, CMD_WRITE, offset, len, data)?;
            let r = self.reply(0)?;
            assert_eq!(r.cookie, cookie, "reply cookie mismatch");
            Ok(r)
        }

        /// CACHE (prefetch the range) and return the reply.
        pub fn cache(&mut self, offset: u64, len: u32) -> io::Result<Reply> {
            let cookie = self.send(0, CMD_CACHE, offset, len, &[])?;
            let r = self.reply(0)?;
            assert_eq!(r.cookie, cookie, "reply cookie mismatch");
            Ok(r)
        }

        /// FLUSH and return the reply.
        pub fn flush(&mut self) -> io::Result<Reply> {
            let cookie = self.send(0, CMD_FLUSH, 0, 0, &[])?;
            let r = self.reply(0)?;
            assert_eq!(r.cookie, cookie, "reply cookie mismatch");
            Ok(r)
        }

        /// NBD_CMD_DISC (no reply), then close.
        pub fn disconnect(mut self) {
            let _ = self.send(0, CMD_DISC, 0, 0, &[]);
            let _ = self.stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Whether the peer closed the stream (EOF or reset) within the stream's
    /// read timeout; any bytes read before that are returned too.
    pub fn wait_closed(s: &mut TcpStream) -> (bool, Vec<u8>) {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return (true, got),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::BrokenPipe
                    ) =>
                {
                    return (true, got)
                }
                Err(_) => return (false, got), // timeout
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Cross-process locks
// ---------------------------------------------------------------------------

/// An exclusive lock on a file, shared with other test processes (nextest
/// runs each test in its own process), held by a `flock(1)` child until
/// dropped; released by the kernel if the test process dies.
#[derive(Debug)]
pub struct FileLock {
    child: Option<Child>,
}

impl FileLock {
    /// Take the lock on `path` (created if missing), waiting up to
    /// `timeout`; panics if it cannot be taken in time.
    pub fn acquire(path: &Path, timeout: Duration) -> FileLock {
        let mut c = cmd("flock");
        c.arg("-w")
            .arg(timeout.as_secs().max(1).to_string())
            .arg(path)
            .args(["-c", "echo locked; exec cat >/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = c
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", describe(&c)));
        let mut line = String::new();
        let _ = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
        if line.trim() != "locked" {
            let _ = child.kill();
            let _ = child.wait();
            panic!("could not lock {} within {timeout:?}", path.display());
        }
        FileLock { child: Some(child) }
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            drop(c.stdin.take()); // cat sees EOF, flock exits, the lock goes
            let mut done = false;
            wait_until(Duration::from_secs(5), || {
                done = !matches!(c.try_wait(), Ok(None));
                done
            });
            if !done {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The emulated WAN between an origin and an edge
// ---------------------------------------------------------------------------

/// ferry's link emulator in front of an origin, on its own runtime: 25 ms
/// each way, 100 Mbit/s (the figures the streaming issue names).
pub struct Wan {
    rt: tokio::runtime::Runtime,
    /// The relay, for cutting or restoring the link and its byte counts.
    pub link: linkemu::LinkEmulator,
}

impl Wan {
    /// A relay in front of `origin` (`IP:PORT`).
    pub fn start(origin: &str) -> Wan {
        use linkemu::{LinkConfig, LinkEmulator};
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let link = rt
            .block_on(LinkEmulator::start(
                "127.0.0.1:0".parse().expect("address"),
                origin.parse().expect("origin address"),
                LinkConfig::new(Duration::from_millis(25)).with_bandwidth(100_000_000 / 8),
            ))
            .expect("link emulator");
        Wan { rt, link }
    }

    /// Where edges connect.
    pub fn addr(&self) -> String {
        self.link.local_addr().to_string()
    }
}

impl std::fmt::Debug for Wan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wan").field("addr", &self.addr()).finish()
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        // The relay's tasks are dropped with the runtime, inside it.
        let _guard = self.rt.enter();
    }
}

// ---------------------------------------------------------------------------
// The management API, spoken by hand (HTTP/1.1 over the Unix socket)
// ---------------------------------------------------------------------------

/// One HTTP reply: status, headers (lower-cased names), body.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpReply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("reply is not JSON ({e}): {} {}", self.status, self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request over `socket` (`Connection: close`) and reads the
/// reply. `body` goes with `content_type` (default JSON).
pub fn http_unix(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    content_type: Option<&str>,
) -> HttpReply {
    use std::fmt::Write as _;
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    s.set_read_timeout(Some(Duration::from_secs(180))).unwrap();
    let body = body.unwrap_or("");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: ferry\r\nConnection: close\r\n");
    if !body.is_empty() {
        let _ = write!(
            req,
            "Content-Type: {}\r\nContent-Length: {}\r\n",
            content_type.unwrap_or("application/json"),
            body.len()
        );
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    // A server may answer (413) and close before taking the whole body.
    let _ = s.write_all(body.as_bytes());
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_http_reply(&raw)
}

/// Parses a whole HTTP/1.1 reply (Content-Length or chunked body).
pub fn parse_http_reply(raw: &[u8]) -> HttpReply {
    let text = String::from_utf8_lossy(raw);
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP reply: {text:?}"));
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        let mut out = String::new();
        let mut rest = rest;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&after[..n.min(after.len())]);
            rest = after.get(n + 2..).unwrap_or("");
        }
        out
    } else {
        rest.to_owned()
    };
    HttpReply {
        status,
        headers,
        body,
    }
}

/// `http_unix` with a JSON body (or none), asserting the status.
pub fn api(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    want: u16,
) -> serde_json::Value {
    let r = http_unix(socket, method, path, body, None);
    assert_eq!(
        r.status, want,
        "{method} {path} answered {} (wanted {want}): {}",
        r.status, r.body
    );
    if r.body.trim().is_empty() {
        serde_json::Value::Null
    } else if r
        .header("content-type")
        .is_some_and(|t| t.starts_with("application/json"))
    {
        r.json()
    } else {
        serde_json::Value::String(r.body)
    }
}
