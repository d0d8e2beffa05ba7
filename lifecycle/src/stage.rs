//! One lifecycle per volume: which stage it is in and which commands may
//! move it on. Pure: the daemon asks [`Stage::check`] before doing
//! anything and persists the stage it returns; a refusal says why.
//!
//! ```text
//!   streaming ──migrate start──> migrating ──copy complete──> mirrored
//!       │                           │                            │
//!       │                           └──cutover --force: finish the copy first
//!       │                                                        │
//!       │                                   cutting over <──cutover
//!       │                                        │ journal drained, origin released
//!       │                                        v
//!       └──────────── moveback ─────────────  cut over
//!                        │ (from any of streaming, migrating, mirrored, cut over)
//!                        v
//!                    moving back ──shipped, verified, released──> on premises
//! ```
//!
//! `cutting over` and `moving back` are the transitions that talk to the
//! origin. Each is persisted *before* its first step, and every
//! step is idempotent (draining an empty journal, releasing a volume
//! already released to this edge), so a crash in the middle resumes the
//! transition on restart instead of leaving the volume half-owned.

use std::fmt;

/// Where a volume is in its life. Codes are persisted; never reuse one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Reads stream from the origin, writes ship to it; no local copy.
    Streaming,
    /// The local copy is being filled in the background.
    Migrating,
    /// The local copy holds every chunk; writes still ship to the origin.
    Mirrored,
    /// Draining the journal and releasing the volume at the origin.
    CuttingOver,
    /// Served from the local copy alone; the origin no longer serves it.
    CutOver,
    /// Shipping the edge's writes home and verifying the origin's image.
    MovingBack,
    /// Home: the origin's image is the volume again.
    OnPremises,
}

impl Stage {
    pub const ALL: [Stage; 7] = [
        Stage::Streaming,
        Stage::Migrating,
        Stage::Mirrored,
        Stage::CuttingOver,
        Stage::CutOver,
        Stage::MovingBack,
        Stage::OnPremises,
    ];

    pub fn code(self) -> u8 {
        match self {
            Stage::Streaming => 1,
            Stage::Migrating => 2,
            Stage::Mirrored => 3,
            Stage::CuttingOver => 4,
            Stage::CutOver => 5,
            Stage::MovingBack => 6,
            Stage::OnPremises => 7,
        }
    }

    pub fn from_code(code: u8) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| s.code() == code)
    }

    /// The name shown by `ferry edge status` and the API.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Streaming => "streaming",
            Stage::Migrating => "migrating",
            Stage::Mirrored => "mirrored",
            Stage::CuttingOver => "cutting-over",
            Stage::CutOver => "cut-over",
            Stage::MovingBack => "moving-back",
            Stage::OnPremises => "on-premises",
        }
    }

    /// Whether the origin still takes this volume's reads and writes.
    pub fn uses_origin(self) -> bool {
        matches!(
            self,
            Stage::Streaming | Stage::Migrating | Stage::Mirrored | Stage::MovingBack
        )
    }

    /// Whether guest writes go to the journal (and so to the origin).
    /// From cut-over on they go to the local copy alone, tracked in the
    /// dirty map.
    pub fn journals_writes(self) -> bool {
        matches!(self, Stage::Streaming | Stage::Migrating | Stage::Mirrored)
    }

    /// The stage `command` leads to from this one, or why it may not run.
    pub fn check(self, command: Command) -> Result<Stage, Refusal> {
        use Command as C;
        use Stage as S;
        match (self, command) {
            (S::Streaming, C::StartMigration) => Ok(S::Migrating),
            (S::Migrating | S::Mirrored, C::StartMigration) => Err(Refusal::new(
                self,
                command,
                "a migration is already running; see `ferry migrate status`",
            )),
            // Commands that leave the stage as it is. A forced cut-over from
            // `migrating` is one: the copy finishes first (paused and rate
            // limit ignored) and the cut-over starts from `mirrored`. So is
            // one that finds nothing left to copy: the copy task is only
            // recording its completion, which the cut-over waits for.
            (S::Migrating | S::Mirrored, C::Pause | C::Resume | C::SetRate)
            | (S::Mirrored, C::CopyComplete)
            | (S::Migrating, C::CutOver { force: true, .. } | C::CutOver { remaining: 0, .. })
            | (S::CuttingOver, C::CutOver { .. })
            | (S::MovingBack, C::MoveBack) => Ok(self),
            (S::Migrating, C::CopyComplete) => Ok(S::Mirrored),
            (S::Mirrored, C::CutOver { .. }) => Ok(S::CuttingOver),
            (
                S::Migrating,
                C::CutOver {
                    remaining,
                    force: false,
                },
            ) => Err(Refusal::new(
                self,
                command,
                format!(
                    "the local copy still lacks {remaining} bytes; wait for it (`ferry migrate \
                     status --wait`) or pass --force to finish the copy now at full rate and \
                     cut over when it is done"
                ),
            )),
            (S::CuttingOver, C::CutOverDone) => Ok(S::CutOver),
            (S::Streaming | S::Migrating | S::Mirrored | S::CutOver, C::MoveBack) => {
                Ok(S::MovingBack)
            }
            (S::MovingBack, C::MoveBackDone) => Ok(S::OnPremises),
            (S::Streaming, _) => Err(Refusal::new(
                self,
                command,
                "the volume is not migrating: start with `ferry migrate start`",
            )),
            (S::CuttingOver, _) => Err(Refusal::new(
                self,
                command,
                "a cut-over is in progress: it goes on in the background and resumes after a \
                 restart (`ferry migrate cutover` again waits for it)",
            )),
            (S::CutOver, _) => Err(Refusal::new(
                self,
                command,
                "the volume is cut over: it is served from its local copy and the origin no \
                 longer holds it; only moving it back applies (`ferry moveback`)",
            )),
            (S::MovingBack, _) => Err(Refusal::new(
                self,
                command,
                "a move back is in progress; it completes by itself (also after a restart)",
            )),
            (S::OnPremises, _) => Err(Refusal::new(
                self,
                command,
                "the volume was moved back on premises; add it again to stream it",
            )),
            (S::Migrating | S::Mirrored, _) => Err(Refusal::new(
                self,
                command,
                "that step belongs to another stage of the volume's life",
            )),
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What an operator (or the copy) asks of a volume's lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    StartMigration,
    Pause,
    Resume,
    SetRate,
    /// The copy found every chunk local.
    CopyComplete,
    CutOver {
        remaining: u64,
        force: bool,
    },
    CutOverDone,
    MoveBack,
    MoveBackDone,
}

impl Command {
    pub fn name(self) -> &'static str {
        match self {
            Command::StartMigration => "migrate start",
            Command::Pause => "migrate pause",
            Command::Resume => "migrate resume",
            Command::SetRate => "migrate rate",
            Command::CopyComplete => "copy complete",
            Command::CutOver { .. } => "migrate cutover",
            Command::CutOverDone => "cut-over done",
            Command::MoveBack => "moveback",
            Command::MoveBackDone => "move back done",
        }
    }
}

/// A command refused in a stage, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub stage: Stage,
    pub command: &'static str,
    pub reason: String,
}

impl Refusal {
    fn new(stage: Stage, command: Command, reason: impl Into<String>) -> Refusal {
        Refusal {
            stage,
            command: command.name(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` is not possible while the volume is {}: {}",
            self.command, self.stage, self.reason
        )
    }
}

impl std::error::Error for Refusal {}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMANDS: [Command; 10] = [
        Command::StartMigration,
        Command::Pause,
        Command::Resume,
        Command::SetRate,
        Command::CopyComplete,
        Command::CutOver {
            remaining: 5,
            force: false,
        },
        Command::CutOver {
            remaining: 5,
            force: true,
        },
        Command::CutOverDone,
        Command::MoveBack,
        Command::MoveBackDone,
    ];

    #[test]
    fn codes_are_distinct_and_round_trip() {
        for s in Stage::ALL {
            assert_eq!(Stage::from_code(s.code()), Some(s));
        }
        assert_eq!(Stage::from_code(0), None);
        assert_eq!(Stage::from_code(8), None);
    }

    #[test]
    fn the_happy_paths() {
        let s = Stage::Streaming.check(Command::StartMigration).unwrap();
        assert_eq!(s, Stage::Migrating);
        let s = s.check(Command::CopyComplete).unwrap();
        assert_eq!(s, Stage::Mirrored);
        let s = s
            .check(Command::CutOver {
                remaining: 0,
                force: false,
            })
            .unwrap();
        assert_eq!(s, Stage::CuttingOver);
        let s = s.check(Command::CutOverDone).unwrap();
        assert_eq!(s, Stage::CutOver);
        let s = s.check(Command::MoveBack).unwrap();
        assert_eq!(s, Stage::MovingBack);
        assert_eq!(s.check(Command::MoveBackDone).unwrap(), Stage::OnPremises);
    }

    #[test]
    fn an_early_cutover_names_the_remaining_bytes() {
        let e = Stage::Migrating
            .check(Command::CutOver {
                remaining: 1234,
                force: false,
            })
            .unwrap_err();
        assert!(e.to_string().contains("1234 bytes"), "{e}");
        assert_eq!(
            Stage::Migrating.check(Command::CutOver {
                remaining: 1234,
                force: true
            }),
            Ok(Stage::Migrating),
            "forced: the copy finishes first"
        );
        assert_eq!(
            Stage::Migrating.check(Command::CutOver {
                remaining: 0,
                force: false
            }),
            Ok(Stage::Migrating),
            "every byte is local: the cut-over waits for the copy to say so"
        );
    }

    #[test]
    fn the_origin_is_used_exactly_before_cut_over_and_while_moving_back() {
        for s in Stage::ALL {
            let expected = !matches!(s, Stage::CuttingOver | Stage::CutOver | Stage::OnPremises);
            assert_eq!(s.uses_origin(), expected, "{s}");
            if s.journals_writes() {
                assert!(s.uses_origin(), "{s}: journaled writes need the origin");
            }
        }
    }

    #[test]
    fn every_pair_is_decided_and_refusals_explain() {
        for s in Stage::ALL {
            for c in COMMANDS {
                match s.check(c) {
                    Ok(next) => {
                        // A transition's in-progress stage accepts its own
                        // command again (a retry after a crash).
                        if matches!(next, Stage::CuttingOver | Stage::MovingBack) {
                            assert!(
                                next.check(c).is_ok(),
                                "{s} --{}--> {next} not idempotent",
                                c.name()
                            );
                        }
                    }
                    Err(r) => {
                        assert_eq!(r.stage, s);
                        assert!(r.reason.len() > 30, "{s}/{}: {}", c.name(), r.reason);
                    }
                }
            }
        }
        // No way back into streaming or out of on-premises.
        for s in Stage::ALL {
            for c in COMMANDS {
                if let Ok(next) = s.check(c) {
                    assert_ne!(next, Stage::Streaming);
                    assert!(s != Stage::OnPremises, "on-premises accepted {}", c.name());
                }
            }
        }
    }
}
