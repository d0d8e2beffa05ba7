//! `ferry snapshot create|list|rollback|delete VOLUME[@SNAPSHOT]`: a running
//! origin's snapshots, through its management API (`--api`, or
//! `FERRY_ORIGIN_API`). Each prints a sentence or a table, or the API's
//! JSON with `--json`.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;

use crate::api::client::ApiClient;
use crate::ctl::{human, render_table};
use crate::origin::api::{RolledBack, SnapshotDeleted, SnapshotEntry, SnapshotListing};

/// `ferry snapshot ...`.
#[derive(clap::Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Take a snapshot of VOLUME now (named SNAPSHOT, default
    /// auto-YYYYMMDDTHHMMSSZ): O(1), on a write-batch boundary.
    Create(SnapshotArgs),
    /// VOLUME's snapshots, oldest first: time, the batch each holds up
    /// to, the bytes each layer holds.
    List(SnapshotArgs),
    /// Make VOLUME's content exactly SNAPSHOT's (refused while an edge
    /// holds the volume; edges' caches of it become void).
    Rollback(SnapshotArgs),
    /// Delete SNAPSHOT of VOLUME, merging its layer away.
    Delete(SnapshotArgs),
}

#[derive(clap::Args, Debug)]
pub struct SnapshotArgs {
    /// VOLUME, or VOLUME@SNAPSHOT.
    #[arg(value_name = "VOLUME[@SNAPSHOT]")]
    pub target: String,
    /// The origin's API socket (default in the origin: STATE_DIR/api.sock).
    #[arg(long, value_name = "PATH", env = "FERRY_ORIGIN_API")]
    pub api: Option<PathBuf>,
    /// Print the API's JSON reply.
    #[arg(long)]
    pub json: bool,
}

/// `VOLUME[@SNAPSHOT]` split; an empty part is an error.
pub fn parse_target(target: &str) -> anyhow::Result<(String, Option<String>)> {
    let (volume, snapshot) = match target.split_once('@') {
        Some((v, s)) => (v, Some(s)),
        None => (target, None),
    };
    if volume.is_empty() || snapshot.is_some_and(str::is_empty) {
        anyhow::bail!("{target:?} is not VOLUME or VOLUME@SNAPSHOT");
    }
    Ok((volume.to_owned(), snapshot.map(str::to_owned)))
}

/// `VOLUME@SNAPSHOT`, required.
fn both(target: &str, what: &str) -> anyhow::Result<(String, String)> {
    match parse_target(target)? {
        (v, Some(s)) => Ok((v, s)),
        (v, None) => anyhow::bail!(
            "which snapshot of {v} to {what}? give VOLUME@SNAPSHOT (`ferry snapshot list {v}` \
             shows them)"
        ),
    }
}

/// The volume and snapshot names go into the API's paths as they are:
/// refuse what would change the path.
pub(crate) fn path_part(s: &str) -> anyhow::Result<&str> {
    if s.contains(['/', '?', '#', '%', ' ']) {
        anyhow::bail!("{s:?} cannot be a volume or snapshot name");
    }
    Ok(s)
}

pub(crate) fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Runs one `ferry snapshot` command.
pub async fn run(cmd: SnapshotCommand) -> anyhow::Result<()> {
    let (SnapshotCommand::Create(a)
    | SnapshotCommand::List(a)
    | SnapshotCommand::Rollback(a)
    | SnapshotCommand::Delete(a)) = &cmd;
    let api = a.api.clone().map(ApiClient::new).context(
        "which origin? give --api PATH (its API socket: STATE_DIR/api.sock) or set FERRY_ORIGIN_API",
    )?;
    let json = a.json;
    match &cmd {
        SnapshotCommand::Create(a) => {
            let (volume, snapshot) = parse_target(&a.target)?;
            let body = json!({ "name": snapshot });
            let s: SnapshotEntry = api
                .call(
                    "POST",
                    &format!("/v1/volumes/{}/snapshots", path_part(&volume)?),
                    Some(&body),
                )
                .await?
                .json()?;
            if json {
                return print_json(&s);
            }
            println!(
                "snapshot {volume}@{} taken: holds every write batch up to {}",
                s.name, s.applied_seq
            );
        }
        SnapshotCommand::List(a) => {
            let (volume, snapshot) = parse_target(&a.target)?;
            if snapshot.is_some() {
                anyhow::bail!("`ferry snapshot list` takes a VOLUME, not VOLUME@SNAPSHOT");
            }
            let l: SnapshotListing = api
                .call(
                    "GET",
                    &format!("/v1/volumes/{}/snapshots", path_part(&volume)?),
                    None,
                )
                .await?
                .json()?;
            if json {
                return print_json(&l);
            }
            print!("{}", snapshot_table(&l));
        }
        SnapshotCommand::Rollback(a) => {
            let (volume, snapshot) = both(&a.target, "roll back to")?;
            let r: RolledBack = api
                .call(
                    "POST",
                    &format!(
                        "/v1/volumes/{}/snapshots/{}/rollback",
                        path_part(&volume)?,
                        path_part(&snapshot)?
                    ),
                    None,
                )
                .await?
                .json()?;
            if json {
                return print_json(&r);
            }
            println!(
                "{volume} rolled back to {} (write batch {}); new epoch {}: edges' caches of it \
                 are void",
                r.snapshot.name, r.snapshot.applied_seq, r.epoch
            );
        }
        SnapshotCommand::Delete(a) => {
            let (volume, snapshot) = both(&a.target, "delete")?;
            let d: SnapshotDeleted = api
                .call(
                    "DELETE",
                    &format!(
                        "/v1/volumes/{}/snapshots/{}",
                        path_part(&volume)?,
                        path_part(&snapshot)?
                    ),
                    None,
                )
                .await?
                .json()?;
            if json {
                return print_json(&d);
            }
            println!("deleted {}@{}", d.volume, d.snapshot);
        }
    }
    Ok(())
}

/// The listing as a table.
pub fn snapshot_table(l: &SnapshotListing) -> String {
    let mut rows = vec![[
        "SNAPSHOT".to_owned(),
        "CREATED (UTC)".into(),
        "APPLIED SEQ".into(),
        "SIZE".into(),
        "LAYER".into(),
        "HELD".into(),
    ]];
    for s in &l.snapshots {
        rows.push([
            if s.deleting {
                format!("{} (deleting)", s.name)
            } else {
                s.name.clone()
            },
            utc(s.created_unix_ms),
            s.applied_seq.to_string(),
            human(s.size),
            s.layer.clone(),
            human(s.held_bytes),
        ]);
    }
    rows.push([
        "(current)".to_owned(),
        "-".into(),
        "-".into(),
        "-".into(),
        l.head.clone(),
        human(l.head_bytes),
    ]);
    let mut out = render_table(&rows);
    if l.snapshots.is_empty() {
        let _ = writeln!(
            out,
            "(no snapshots: take one with `ferry snapshot create {}`)",
            l.volume
        );
    }
    out
}

/// `YYYY-MM-DD HH:MM:SS` from the auto name's stamp.
pub(crate) fn utc(unix_ms: u64) -> String {
    let stamp = origin::auto_snapshot_name(unix_ms);
    let s = stamp.trim_start_matches("auto-");
    // YYYYMMDDTHHMMSSZ
    format!(
        "{}-{}-{} {}:{}:{}",
        &s[0..4],
        &s[4..6],
        &s[6..8],
        &s[9..11],
        &s[11..13],
        &s[13..15]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_split_at_the_at_sign() {
        assert_eq!(parse_target("vol").unwrap(), ("vol".into(), None));
        assert_eq!(
            parse_target("vol@nightly").unwrap(),
            ("vol".into(), Some("nightly".into()))
        );
        for bad in ["", "@x", "vol@"] {
            assert!(parse_target(bad).is_err(), "{bad:?}");
        }
        let err = both("vol", "delete").unwrap_err().to_string();
        assert!(err.contains("ferry snapshot list vol"), "{err}");
        assert!(path_part("a/b").is_err());
    }

    #[test]
    fn the_table_shows_every_snapshot_and_the_head() {
        let l = SnapshotListing {
            volume: "vol".into(),
            snapshots: vec![SnapshotEntry {
                name: "nightly".into(),
                created_unix_ms: 1_709_210_096_000,
                applied_seq: 17,
                size: 1 << 30,
                layer: "image".into(),
                held_bytes: 3 << 20,
                deleting: false,
            }],
            head: "layer-1".into(),
            head_bytes: 4096,
        };
        let t = snapshot_table(&l);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("SNAPSHOT"), "{t}");
        assert!(
            lines[1].starts_with("nightly") && lines[1].contains("2024-02-29 12:34:56"),
            "{t}"
        );
        assert!(
            lines[1].contains(" 17 ") && lines[1].contains("3.0MiB"),
            "{t}"
        );
        assert!(
            lines[2].starts_with("(current)") && lines[2].contains("layer-1"),
            "{t}"
        );
        let empty = SnapshotListing {
            snapshots: vec![],
            head: "image".into(),
            ..l
        };
        assert!(snapshot_table(&empty).contains("ferry snapshot create vol"));
    }
}
