//! The SIGKILL crash harness.
//!
//! A crash test is one `#[test]` function that plays both parts:
//!
//! ```text
//! #[test]
//! fn survives_sigkill() {
//!     if let Some(child) = testkit::crash::child() {
//!         // the child: work on child.dir(), child.report(...) progress,
//!         // until killed
//!         return;
//!     }
//!     let t = CrashTest::new(testkit::crash::name(module_path!(), "survives_sigkill"));
//!     for round in 0..N {
//!         let lines = t.run(round, |line| ...decide when to kill...);
//!         // reopen t.dir() and check against what the child reported
//!     }
//! }
//! ```
//!
//! The parent re-executes the test binary filtered to exactly this test,
//! with the scratch directory and round in the environment; the child's
//! progress lines carry a marker, so libtest's own output never mixes in.
//! In a normal run the function is the parent: no test passes by doing
//! nothing.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const DIR_ENV: &str = "FERRY_CRASH_CHILD_DIR";
const ROUND_ENV: &str = "FERRY_CRASH_CHILD_ROUND";
const MARK: &str = "FERRY-CRASH: ";

/// How long the parent waits for the child's first line.
const FIRST_LINE: Duration = Duration::from_secs(120);

/// A test's path inside its test binary, from `module_path!()` (which
/// starts with the crate's name) and the function's name.
pub fn name(module_path: &str, function: &str) -> String {
    match module_path.split_once("::") {
        Some((_crate, rest)) => format!("{rest}::{function}"),
        // An integration test's functions sit at its crate root.
        None => function.to_owned(),
    }
}

/// This process's part when it is a crash test's child.
#[derive(Debug)]
pub struct Child {
    dir: PathBuf,
    round: u64,
}

/// `Some` when this process is a child started by [`CrashTest::run`].
pub fn child() -> Option<Child> {
    let dir = PathBuf::from(std::env::var_os(DIR_ENV)?);
    let round = std::env::var(ROUND_ENV)
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    Some(Child { dir, round })
}

impl Child {
    /// The scratch directory, the same in every round.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Which run this is (from 0).
    pub fn round(&self) -> u64 {
        self.round
    }

    /// Tells the parent something happened (after it happened: the parent
    /// may kill at once).
    pub fn report(&self, line: impl std::fmt::Display) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{MARK}{line}");
        let _ = out.flush();
    }
}

/// What the parent does after a line from the child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    /// SIGKILL now.
    Kill,
    /// SIGKILL after this long, whatever the child prints meanwhile.
    KillAfter(Duration),
}

/// The parent's side. See the module docs.
#[derive(Debug)]
pub struct CrashTest {
    test: String,
    dir: tempfile::TempDir,
}

impl CrashTest {
    pub fn new(test: impl Into<String>) -> Self {
        CrashTest {
            test: test.into(),
            dir: tempfile::tempdir().expect("a scratch directory"),
        }
    }

    /// The scratch directory the children work in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs the child once (as round `round`), killing it with SIGKILL when
    /// `decide` says so. Returns every whole line it reported, in order.
    /// Fails the test if the child stops by itself (it must work until
    /// killed) or reports nothing within two minutes.
    pub fn run(&self, round: u64, mut decide: impl FnMut(&str) -> Verdict) -> Vec<String> {
        let exe = std::env::current_exe().expect("the test binary");
        let mut child = Command::new(exe)
            .args([&self.test, "--exact", "--nocapture", "--test-threads=1"])
            .env(DIR_ENV, self.dir.path())
            .env(ROUND_ENV, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("re-executing the test binary");
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest may have printed on the same line first.
                if let Some((_, ours)) = line.split_once(MARK) {
                    if tx.send(ours.to_owned()).is_err() {
                        break;
                    }
                }
            }
        });
        let mut lines = Vec::new();
        let mut deadline: Option<Instant> = None;
        let mut first = true;
        loop {
            let wait = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None if first => FIRST_LINE,
                None => Duration::from_secs(600),
            };
            match rx.recv_timeout(wait) {
                Ok(line) => {
                    first = false;
                    let verdict = if deadline.is_some() {
                        Verdict::Continue
                    } else {
                        decide(&line)
                    };
                    lines.push(line);
                    match verdict {
                        Verdict::Continue => {}
                        Verdict::Kill => break,
                        Verdict::KillAfter(d) => deadline = Some(Instant::now() + d),
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    assert!(
                        deadline.is_some() || !first,
                        "round {round}: the child of {} reported nothing within {FIRST_LINE:?}",
                        self.test
                    );
                    break;
                }
                // Its output ended: it exited (or closed stdout) by itself,
                // which a crash test's child never does.
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().ok();
                    panic!(
                        "round {round}: the child of {} stopped by itself ({status:?}) \
                         before it was killed; its last lines: {:?}",
                        self.test,
                        &lines[lines.len().saturating_sub(5)..]
                    );
                }
            }
        }
        // SIGKILL: nothing the child does after this point happens.
        let _ = child.kill();
        let _ = child.wait();
        let _ = reader.join();
        // Lines that arrived before the kill took effect happened too.
        lines.extend(rx.try_iter());
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_drop_the_crate() {
        assert_eq!(name("cache::store::tests", "f"), "store::tests::f");
        assert_eq!(name("edge_bench", "f"), "f");
    }

    #[test]
    fn a_child_is_killed_where_the_parent_says() {
        if let Some(c) = child() {
            for i in 0.. {
                c.report(i);
                std::thread::sleep(Duration::from_millis(2));
            }
            return;
        }
        let t = CrashTest::new(name(
            module_path!(),
            "a_child_is_killed_where_the_parent_says",
        ));
        for round in 0..3 {
            let lines = t.run(round, |l| {
                if l.parse::<u64>().unwrap() >= 5 + round {
                    Verdict::Kill
                } else {
                    Verdict::Continue
                }
            });
            let n: Vec<u64> = lines.iter().map(|l| l.parse().unwrap()).collect();
            assert!(n.len() as u64 > 5 + round, "{n:?}");
            assert!(n.windows(2).all(|w| w[1] == w[0] + 1), "{n:?}");
        }
    }
}
