//! `ferry clone create|list|delete`: a running origin's clones, through
//! its management API (`--api`, or `FERRY_ORIGIN_API`). A clone is a new
//! volume that starts as a snapshot of another and shares its blocks; an
//! edge serves it like any volume (`ferry volume add NAME`, with
//! `--isolated` for cloud persistence).

use std::path::PathBuf;

use anyhow::Context;

use crate::api::client::ApiClient;
use crate::ctl::render_table;
use crate::origin::api::{CloneEntry, CloneListing, ClonePersistence, CreateClone};
use crate::snapshot::{parse_target, path_part, print_json, utc};

/// `ferry clone ...`.
#[derive(clap::Subcommand, Debug)]
pub enum CloneCommand {
    /// Create NAME from VOLUME@SNAPSHOT: O(1), sharing the snapshot's
    /// blocks; the snapshot cannot be deleted while the clone exists.
    Create(CreateArgs),
    /// Every clone: its base, where its writes are kept, whether served.
    List(ApiArgs),
    /// Delete clone NAME and every write it holds at the origin (refused
    /// while an edge holds it, or while it has clones of its own).
    Delete(DeleteArgs),
}

#[derive(clap::Args, Debug)]
pub struct ApiArgs {
    /// The origin's API socket (default in the origin: STATE_DIR/api.sock).
    #[arg(long, value_name = "PATH", env = "FERRY_ORIGIN_API")]
    pub api: Option<PathBuf>,
    /// Print the API's JSON reply.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// The snapshot to start from.
    #[arg(value_name = "VOLUME@SNAPSHOT")]
    pub base: String,
    /// The new volume's name.
    pub name: String,
    /// `origin`: the clone's writes are shipped to the origin and kept in
    /// its own delta there. `cloud`: they stay on the edge that serves it
    /// (which must serve it `--isolated`) and the origin never gets one.
    #[arg(long, value_enum, default_value = "origin")]
    pub persistence: PersistenceArg,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(clap::Args, Debug)]
pub struct DeleteArgs {
    pub name: String,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PersistenceArg {
    Origin,
    Cloud,
}

impl From<PersistenceArg> for ClonePersistence {
    fn from(p: PersistenceArg) -> Self {
        match p {
            PersistenceArg::Origin => ClonePersistence::Origin,
            PersistenceArg::Cloud => ClonePersistence::Cloud,
        }
    }
}

fn client(a: &ApiArgs) -> anyhow::Result<ApiClient> {
    a.api.clone().map(ApiClient::new).context(
        "which origin? give --api PATH (its API socket: STATE_DIR/api.sock) or set FERRY_ORIGIN_API",
    )
}

fn persistence_name(p: ClonePersistence) -> &'static str {
    match p {
        ClonePersistence::Origin => "origin",
        ClonePersistence::Cloud => "cloud",
    }
}

/// Runs one `ferry clone` command.
pub async fn run(cmd: CloneCommand) -> anyhow::Result<()> {
    match cmd {
        CloneCommand::Create(a) => {
            let (volume, snapshot) = match parse_target(&a.base)? {
                (v, Some(s)) => (v, s),
                (v, None) => anyhow::bail!(
                    "clone which snapshot of {v}? give VOLUME@SNAPSHOT (`ferry snapshot list \
                     {v}` shows them; `ferry snapshot create {v}` takes one)"
                ),
            };
            let body = CreateClone {
                name: a.name.clone(),
                volume,
                snapshot,
                persistence: a.persistence.into(),
            };
            let c: CloneEntry = client(&a.api)?
                .call("POST", "/v1/clones", Some(&serde_json::to_value(&body)?))
                .await?
                .json()?;
            if a.api.json {
                return print_json(&c);
            }
            println!(
                "clone {} of {}@{} created ({} persistence)",
                c.name,
                c.base.volume,
                c.base.snapshot,
                persistence_name(c.base.persistence)
            );
            match c.base.persistence {
                ClonePersistence::Origin => println!(
                    "serve it from an edge: ferry volume add {} --origin HOST:PORT",
                    c.name
                ),
                ClonePersistence::Cloud => println!(
                    "serve it from an edge, which keeps its writes: ferry volume add {} --origin \
                     HOST:PORT --isolated",
                    c.name
                ),
            }
        }
        CloneCommand::List(a) => {
            let l: CloneListing = client(&a)?.call("GET", "/v1/clones", None).await?.json()?;
            if a.json {
                return print_json(&l);
            }
            print!("{}", clone_table(&l));
        }
        CloneCommand::Delete(a) => {
            let c: CloneEntry = client(&a.api)?
                .call(
                    "DELETE",
                    &format!("/v1/clones/{}", path_part(&a.name)?),
                    None,
                )
                .await?
                .json()?;
            if a.api.json {
                return print_json(&c);
            }
            println!(
                "deleted clone {} (of {}@{}) and its writes",
                c.name, c.base.volume, c.base.snapshot
            );
        }
    }
    Ok(())
}

/// The listing as a table.
pub fn clone_table(l: &CloneListing) -> String {
    if l.clones.is_empty() {
        return "(no clones: make one with `ferry clone create VOLUME@SNAPSHOT NAME`)\n".into();
    }
    let mut rows = vec![[
        "CLONE".to_owned(),
        "BASE".into(),
        "PERSISTENCE".into(),
        "CREATED (UTC)".into(),
        "SERVED".into(),
    ]];
    for c in &l.clones {
        rows.push([
            c.name.clone(),
            format!("{}@{}", c.base.volume, c.base.snapshot),
            persistence_name(c.base.persistence).into(),
            utc(c.created_unix_ms),
            if c.served {
                "yes".into()
            } else {
                "no (its parent is not served)".into()
            },
        ]);
    }
    render_table(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::origin::api::CloneBase;

    #[test]
    fn the_table_shows_each_clone_and_its_base() {
        let entry = |name: &str, p, served| CloneEntry {
            name: name.into(),
            base: CloneBase {
                volume: "web".into(),
                snapshot: "golden".into(),
                persistence: p,
            },
            created_unix_ms: 1_709_210_096_000,
            served,
        };
        let t = clone_table(&CloneListing {
            clones: vec![
                entry("web-2", ClonePersistence::Origin, true),
                entry("test-1", ClonePersistence::Cloud, false),
            ],
        });
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("CLONE"), "{t}");
        assert!(
            lines[1].starts_with("web-2") && lines[1].contains("web@golden"),
            "{t}"
        );
        assert!(lines[1].contains("origin") && lines[1].contains("2024-02-29 12:34:56"));
        assert!(
            lines[2].contains("cloud") && lines[2].contains("no (its parent"),
            "{t}"
        );
        assert!(clone_table(&CloneListing { clones: vec![] }).contains("ferry clone create"));
    }
}
