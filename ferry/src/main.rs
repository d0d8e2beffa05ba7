//! The `ferry` command.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

// Request buffers are large and short-lived (up to 32 MiB each); glibc's
// malloc hands such blocks back to the kernel and page-faults them in again
// on every request. mimalloc keeps and reuses them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use ferry::config::{
    parse_export_arg, read_key_file, ByteSize, CacheSettings, CacheWriteMode, Engine, ExportConfig,
    ListenAddr, ServeConfig, TlsConfig, TlsPolicy,
};

#[derive(Parser, Debug)]
#[command(
    name = "ferry",
    version,
    about = "Serve, stream and move block devices"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Export raw images over NBD.
    Serve(Box<ServeArgs>),
    /// Serve a generated demo disk and print how to connect to it.
    Demo(DemoArgs),
    /// Work with a cache directory.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Serve images to edges over the replication link; `volume`,
    /// `release`, `unfence` and `status` talk to a running origin.
    Origin(OriginCmd),
    /// Run an edge: serve volumes of origins over NBD and iSCSI through a
    /// local cache and write-behind journals (`--config FILE` for many
    /// volumes, or one from flags); `flush` and `status` talk to a running
    /// edge.
    Edge(EdgeCmd),
    /// Add, list, change and remove a running edge's volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// A running edge's volumes as a table: state, link, hit ratio, bytes
    /// each way, journal.
    Status(CtlArgs),
    /// Ship every journaled write of a running edge (or of VOLUME) to the
    /// origin and wait until it is applied.
    Flush(FlushArgs),
    /// Migrate a running edge's volume into local storage in the
    /// background, then cut it over to that copy.
    #[command(subcommand)]
    Migrate(MigrateCommand),
    /// Bring a running edge's volume home: stop serving it, ship every
    /// write the origin lacks (for a cut-over volume only the pieces of
    /// changed chunks that differ), verify the origin's image against the
    /// edge's copy by signature, and hand the volume back to the origin.
    Moveback(MovebackArgs),
    /// A running origin's snapshots of a volume: create, list, roll back
    /// to, delete (VOLUME@SNAPSHOT).
    #[command(subcommand)]
    Snapshot(ferry::snapshot::SnapshotCommand),
    /// A running origin's clones: new volumes made from a snapshot of
    /// another, sharing its blocks (create VOLUME@SNAPSHOT NAME, list,
    /// delete).
    #[command(subcommand)]
    Clone(ferry::clone::CloneCommand),
    /// Write a staging disk: a VM with only a NIC and this disk boots
    /// VOLUME from an edge's iSCSI target (iPXE sanboot; the guest's
    /// initramfs logs in from the iBFT for its root).
    StagingImage(ferry::staging::StagingArgs),
    /// Relay TCP connections to TARGET like a WAN link (one-way delay,
    /// bandwidth cap), for tests and benchmarks on one machine.
    LinkEmulator(LinkEmuArgs),
}

#[derive(Args, Debug)]
struct LinkEmuArgs {
    /// Where to listen, HOST:PORT (port 0 picks one; printed as
    /// `listening link ADDR`).
    #[arg(long, value_name = "ADDR")]
    listen: String,
    /// Where to relay to, HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    target: String,
    /// One-way delay in milliseconds.
    #[arg(long, default_value_t = 25.0)]
    delay_ms: f64,
    /// Bandwidth cap in Mbit/s each way (0: none).
    #[arg(long, default_value_t = 100.0)]
    mbit: f64,
    /// KiB the path buffers per direction of a connection before it stops
    /// taking more (default: twice the bandwidth-delay product, at least
    /// 4 MiB), as socket buffers and a router queue do.
    #[arg(long, value_name = "KIB")]
    queue_kib: Option<usize>,
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
struct OriginCmd {
    #[command(subcommand)]
    action: Option<OriginAction>,
    #[command(flatten)]
    run: OriginCliArgs,
}

#[derive(Subcommand, Debug)]
enum OriginAction {
    /// Add, list and remove a running origin's volumes.
    #[command(subcommand)]
    Volume(OriginVolumeCommand),
    /// Take a volume from an edge that is gone for good, and fence that
    /// edge off it: it can never attach or write it again.
    Release(OriginReleaseArgs),
    /// Let a fenced edge (rebuilt, its journal emptied) attach again.
    Unfence(OriginUnfenceArgs),
    /// The origin's volumes: size, holder, fenced edges, traffic.
    Status(OriginCtlArgs),
    /// A volume's boot profiles (recorded by edges) and the prefetch plan
    /// they make, in push order.
    Profiles(OriginProfilesArgs),
}

#[derive(Args, Debug)]
struct OriginProfilesArgs {
    volume: String,
    /// Ranges of the plan to print (all with --json).
    #[arg(long, value_name = "N", default_value_t = 20)]
    ranges: usize,
    #[command(flatten)]
    ctl: OriginCtlArgs,
}

#[derive(Args, Debug)]
struct OriginCtlArgs {
    /// The origin's API socket (default in the origin: STATE_DIR/api.sock).
    #[arg(long, value_name = "PATH", env = "FERRY_ORIGIN_API")]
    api: Option<PathBuf>,
    /// Print the API's JSON reply.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum OriginVolumeCommand {
    /// Serve another volume from now on (kept in STATE_DIR/exports.toml).
    Add {
        name: String,
        /// A raw image, or an NBD URI.
        source: String,
        #[command(flatten)]
        ctl: OriginCtlArgs,
    },
    List(OriginCtlArgs),
    /// Stop serving a volume (refused while an edge holds it).
    Rm {
        name: String,
        #[command(flatten)]
        ctl: OriginCtlArgs,
    },
}

#[derive(Args, Debug)]
struct OriginReleaseArgs {
    volume: String,
    /// Required: the edge loses what it has not shipped.
    #[arg(long, required = true)]
    force: bool,
    /// The edge to fence (default: the one holding the volume, else the
    /// last one that held it).
    #[arg(long, value_name = "ID")]
    edge: Option<String>,
    #[command(flatten)]
    ctl: OriginCtlArgs,
}

#[derive(Args, Debug)]
struct OriginUnfenceArgs {
    volume: String,
    edge: String,
    #[command(flatten)]
    ctl: OriginCtlArgs,
}

#[derive(Args, Debug)]
struct OriginCliArgs {
    /// Address to listen on for edges, HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// A volume to serve, as NAME=PATH (repeatable). PATH may also be an
    /// existing NBD export: nbd://HOST[:PORT]/EXPORT or
    /// nbd+unix:///EXPORT?socket=SOCKET (e.g. qemu-nbd serving a qcow2).
    /// More can be added at run time (`ferry origin volume add`).
    #[arg(long = "export", value_name = "NAME=PATH|URI", value_parser = parse_export_arg)]
    exports: Vec<(String, PathBuf)>,
    /// Directory for the origin's state (apply journals, volume epochs, the
    /// deployment key handed to edges, the exports the API added).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The management API's Unix socket (default: STATE_DIR/api.sock).
    #[arg(long, value_name = "PATH")]
    api: Option<PathBuf>,
    /// Also serve GET /metrics (Prometheus) over plain TCP on HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Pre-shared key (32 bytes, raw or hex) edges must prove they hold.
    #[arg(long, value_name = "FILE")]
    psk_file: Option<PathBuf>,
    /// Run the link without TLS, on a trusted network.
    #[arg(long)]
    no_tls: bool,
    /// The origin's certificate chain (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The origin's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require edge certificates signed by this CA (mutual TLS).
    #[arg(long, value_name = "FILE")]
    tls_client_ca: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Engine::Auto)]
    engine: Engine,
    /// Automatic snapshots kept per volume: one is taken before the first
    /// write batch of an edge that did not hold the volume last (and of
    /// every move back), named `pre-write-YYYYMMDDTHHMMSSZ`; older ones
    /// are merged away. Off by default: while a volume has a snapshot,
    /// its image file holds the oldest snapshot, not the current content
    /// (the origin serves the chain), so a user of the raw file must opt
    /// in.
    #[arg(long, value_name = "N", default_value_t = 0)]
    auto_snapshots: usize,
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
struct EdgeCmd {
    #[command(subcommand)]
    action: Option<EdgeAction>,
    #[command(flatten)]
    run: EdgeRunArgs,
}

#[derive(Subcommand, Debug)]
enum EdgeAction {
    /// Ship every journaled write to the origin and wait until applied.
    Flush(CtlArgs),
    /// Print each volume's link, cache and journal state as key: value lines.
    Status(CtlArgs),
    /// The boot profile being recorded.
    #[command(subcommand)]
    Profile(ProfileAction),
}

#[derive(Subcommand, Debug)]
enum ProfileAction {
    /// End VOLUME's boot window now (the boot is over): the profile goes
    /// to the origin, which plans the next boots from it.
    Stop(ProfileStopArgs),
}

#[derive(Args, Debug)]
struct ProfileStopArgs {
    volume: String,
    #[command(flatten)]
    ctl: CtlArgs,
}

/// How a CLI command reaches a running edge.
#[derive(Args, Debug)]
struct CtlArgs {
    /// The edge's API socket (default in the edge: CACHE_DIR/api.sock).
    #[arg(long, alias = "control", value_name = "PATH", env = "FERRY_API")]
    api: Option<PathBuf>,
    /// Print the API's JSON reply instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct FlushArgs {
    /// Only this volume.
    volume: Option<String>,
    /// How long to wait for the origin, in seconds (default 120).
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
    #[command(flatten)]
    ctl: CtlArgs,
}

#[derive(Subcommand, Debug)]
enum MigrateCommand {
    /// Start copying VOLUME into TARGET (a new sparse raw image, or a
    /// block device) while it runs: demand reads first, then in order;
    /// holes and what the cache holds never cross the link. Resumes after
    /// restarts of the edge or the origin.
    Start(MigrateStartArgs),
    /// Progress: bytes local and total, rate, ETA (`--wait`: a progress
    /// bar until done).
    Status(MigrateStatusArgs),
    /// Pause the copy (reads and writes go on).
    Pause(MigrateNameArgs),
    /// Resume a paused copy.
    Resume(MigrateNameArgs),
    /// Limit the copy to MBIT Mbit/s (0: no limit).
    Rate(MigrateRateArgs),
    /// Once the copy is complete: drain the journal, release the volume at
    /// the origin and serve it from the local copy alone.
    Cutover(MigrateCutoverArgs),
}

#[derive(Args, Debug)]
struct MigrateStartArgs {
    volume: String,
    /// The local storage: a path that does not exist yet (a sparse raw
    /// image is created there), an empty file, or a block device.
    #[arg(long, value_name = "PATH")]
    target: PathBuf,
    /// Limit the copy's use of the link, Mbit/s.
    #[arg(long, value_name = "MBIT")]
    rate: Option<f64>,
    /// Show a progress bar until the copy is complete.
    #[arg(long)]
    wait: bool,
    #[command(flatten)]
    ctl: CtlArgs,
}

#[derive(Args, Debug)]
struct MigrateStatusArgs {
    /// Only this volume (default: every migrating volume).
    volume: Option<String>,
    /// Refresh a progress bar until every copy is complete.
    #[arg(long)]
    wait: bool,
    #[command(flatten)]
    ctl: CtlArgs,
}

#[derive(Args, Debug)]
struct MigrateNameArgs {
    volume: String,
    #[command(flatten)]
    ctl: CtlArgs,
}

#[derive(Args, Debug)]
struct MigrateRateArgs {
    volume: String,
    /// Mbit/s; 0 removes the limit.
    mbit: f64,
    #[command(flatten)]
    ctl: CtlArgs,
}

#[derive(Args, Debug)]
struct MigrateCutoverArgs {
    volume: String,
    /// Cut over even if the copy is not complete: it is finished first, at
    /// full rate (the pause and the rate limit are ignored).
    #[arg(long)]
    force: bool,
    /// How long to wait, in seconds (default 120); the cut-over goes on in
    /// the background after.
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
    #[command(flatten)]
    ctl: CtlArgs,
}

#[derive(Args, Debug)]
struct MovebackArgs {
    volume: String,
    /// How long to wait, in seconds (default 120); the move back goes on
    /// in the background after.
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
    #[command(flatten)]
    ctl: CtlArgs,
}

async fn migrate(cmd: MigrateCommand) -> anyhow::Result<()> {
    use ferry::ctl;
    match cmd {
        MigrateCommand::Start(a) => {
            let api = ctl::client(a.ctl.api)?;
            ctl::migrate_start(&api, &a.volume, &a.target, a.rate, a.ctl.json).await?;
            if a.wait {
                ctl::migrate_status(&api, Some(&a.volume), true, a.ctl.json).await?;
            }
            Ok(())
        }
        MigrateCommand::Status(a) => {
            ctl::migrate_status(
                &ctl::client(a.ctl.api)?,
                a.volume.as_deref(),
                a.wait,
                a.ctl.json,
            )
            .await
        }
        MigrateCommand::Pause(a) => {
            ctl::migrate_change(
                &ctl::client(a.ctl.api)?,
                &a.volume,
                Some(true),
                None,
                a.ctl.json,
            )
            .await
        }
        MigrateCommand::Resume(a) => {
            ctl::migrate_change(
                &ctl::client(a.ctl.api)?,
                &a.volume,
                Some(false),
                None,
                a.ctl.json,
            )
            .await
        }
        MigrateCommand::Rate(a) => {
            ctl::migrate_change(
                &ctl::client(a.ctl.api)?,
                &a.volume,
                None,
                Some(a.mbit),
                a.ctl.json,
            )
            .await
        }
        MigrateCommand::Cutover(a) => {
            let timeout = a.timeout.map(|t| secs(t, "timeout")).transpose()?;
            ctl::migrate_cutover(
                &ctl::client(a.ctl.api)?,
                &a.volume,
                a.force,
                timeout,
                a.ctl.json,
            )
            .await
        }
    }
}

#[derive(Subcommand, Debug)]
enum VolumeCommand {
    /// Attach a volume of an origin and serve it (NBD export NAME, iSCSI
    /// target iqn.2026-11.dev.ferry:NAME); saved in the edge's file.
    Add(VolumeAddArgs),
    /// The volumes with their state.
    List(CtlArgs),
    /// Change a running volume.
    Set(VolumeSetArgs),
    /// Stop serving a volume: its clients finish, its journal is drained to
    /// the origin, the origin releases it.
    Rm(VolumeRmArgs),
}

#[derive(Args, Debug)]
struct VolumeAddArgs {
    name: String,
    /// The origin, HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    origin: String,
    /// Write journal capacity.
    #[arg(long, value_name = "SIZE", default_value = "1G")]
    journal_size: ByteSize,
    /// Recovery point objective in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    rpo: f64,
    /// Keep writes to START:LEN on this edge, never shipped (repeatable).
    #[arg(long, value_name = "START:LEN")]
    local_only: Vec<String>,
    /// The whole volume is local-only.
    #[arg(long, conflicts_with = "local_only")]
    isolated: bool,
    #[command(flatten)]
    ctl: CtlArgs,
}

#[derive(Args, Debug)]
struct VolumeSetArgs {
    name: String,
    /// A new recovery point objective, in seconds.
    #[arg(long, value_name = "SECS")]
    rpo: f64,
    #[command(flatten)]
    ctl: CtlArgs,
}

#[derive(Args, Debug)]
struct VolumeRmArgs {
    name: String,
    /// How long to wait for the origin to apply the journal, in seconds
    /// (default 120). On timeout the volume stays, its journal intact.
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
    #[command(flatten)]
    ctl: CtlArgs,
}

#[derive(Args, Debug)]
struct EdgeRunArgs {
    /// The edge's configuration file (TOML: cache, listeners, link,
    /// [[volume]]s); API changes are saved back to it. Without it, one
    /// volume comes from --origin, --volume and --cache-dir.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["origin", "volume"])]
    config: Option<PathBuf>,
    /// The origin, HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    origin: Option<String>,
    /// The volume to attach.
    #[arg(long)]
    volume: Option<String>,
    /// Directory for the cache and the journal.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Cache capacity.
    #[arg(long, value_name = "SIZE", default_value = "1G")]
    cache_size: ByteSize,
    /// Decrypted chunks kept in memory (hot data served without decrypting).
    #[arg(long, value_name = "SIZE", default_value = "256M")]
    cache_memory: ByteSize,
    /// Write journal capacity; writes wait when it is full.
    #[arg(long, value_name = "SIZE", default_value = "1G")]
    journal_size: ByteSize,
    /// Recovery point objective in seconds: writes older than this are
    /// shipped even without a FLUSH.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    rpo: f64,
    /// How long a read of uncached data waits for an unreachable origin
    /// before failing with EIO, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    request_timeout: f64,
    /// Bytes of the volume's prefetch plan (what its recorded boots read,
    /// in order) the origin pushes at attach; 0: none.
    #[arg(long, value_name = "SIZE", default_value = "256M")]
    prefetch_budget: ByteSize,
    /// Record the reads from the attach as the volume's boot profile for
    /// at most this long, in seconds (0: never)...
    #[arg(long, value_name = "SECS", default_value_t = 180.0)]
    profile_window: f64,
    /// ...or until no new chunk is read for this long.
    #[arg(long, value_name = "SECS", default_value_t = 20.0)]
    profile_quiet: f64,
    /// NBD listen address (repeatable; default 127.0.0.1:10809 unless
    /// --iscsi is given).
    #[arg(long, value_name = "ADDR")]
    nbd: Vec<ListenAddr>,
    /// iSCSI portal, HOST:PORT (repeatable): the volume is LUN 0 of target
    /// iqn.2026-11.dev.ferry:VOLUME.
    #[arg(long, value_name = "ADDR")]
    iscsi: Vec<String>,
    /// Pre-shared key file (as given to the origin).
    #[arg(long, value_name = "FILE")]
    psk_file: Option<PathBuf>,
    /// Run the link without TLS, on a trusted network.
    #[arg(long)]
    no_tls: bool,
    /// CA certificate (PEM) the origin's certificate must chain to.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// This edge's certificate chain, for origins that require one.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// This edge's private key.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The name to expect in the origin's certificate (default: the host
    /// part of --origin).
    #[arg(long, value_name = "NAME")]
    tls_server_name: Option<String>,
    /// The management API's Unix socket (default: DIR/api.sock).
    #[arg(long, alias = "control", value_name = "PATH")]
    api: Option<PathBuf>,
    /// Also serve GET /metrics (Prometheus) over plain TCP on HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Keep writes to this byte range on this machine, never shipped to
    /// the origin (swap, scratch space): START:LEN with K/M/G suffixes,
    /// e.g. 1G:512M (repeatable). Kept in DIR/overlay-VOLUME.img; restart
    /// with the same ranges.
    #[arg(long, value_name = "START:LEN", value_parser = check_local_range)]
    local_only: Vec<String>,
    /// Isolation mode: the whole volume is local-only, nothing is shipped;
    /// blocks never written here are still read from the cache and origin.
    #[arg(long, conflicts_with = "local_only")]
    isolated: bool,
}

/// Checks `--local-only START:LEN`.
fn check_local_range(s: &str) -> Result<String, String> {
    ferry::edge::config::parse_local_range(s).map(|_| s.to_owned())
}

#[derive(Subcommand, Debug)]
enum CacheCommand {
    /// Print a cache's size, occupancy, volumes and dedup ratio, and check
    /// every stored chunk. Exits 1 if anything is damaged.
    Inspect(InspectArgs),
    /// A running edge's cache: size, occupancy, hits.
    Status(CtlArgs),
    /// Resize a running edge's cache while in use (shrinking evicts).
    Resize(CacheResizeArgs),
}

#[derive(Args, Debug)]
struct CacheResizeArgs {
    /// The new capacity, e.g. 64G.
    size: ByteSize,
    #[command(flatten)]
    ctl: CtlArgs,
}

#[derive(Args, Debug)]
struct InspectArgs {
    /// The cache directory (as given to --cache-dir).
    dir: PathBuf,
    /// Also decrypt every chunk and check it against its signature (needs
    /// the key).
    #[arg(long, requires = "key_file")]
    verify: bool,
    /// The cache's master key file (32 raw bytes or 64 hex digits).
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Raw image to export (more with --export).
    image: Option<PathBuf>,
    /// Export name of IMAGE (default: the file's stem).
    #[arg(long)]
    name: Option<String>,
    /// Description of IMAGE's export, shown by `nbdinfo`.
    #[arg(long)]
    description: Option<String>,
    /// Another export, as NAME=PATH (repeatable).
    #[arg(long = "export", value_name = "NAME=PATH", value_parser = parse_export_arg)]
    exports: Vec<(String, PathBuf)>,
    /// NBD listen address: HOST:PORT or unix:PATH (repeatable; default 127.0.0.1:10809).
    #[arg(long, value_name = "ADDR")]
    nbd: Vec<ListenAddr>,
    /// Export every image read-only.
    #[arg(long)]
    read_only: bool,
    /// PEM certificate chain for STARTTLS.
    #[arg(long, requires = "tls_key", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for STARTTLS.
    #[arg(long, requires = "tls_cert", value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// With a certificate: require TLS (default) or merely offer it.
    #[arg(long, value_enum, requires = "tls_cert")]
    tls: Option<TlsPolicy>,
    /// Put an adaptive read-ahead layer in front of every image.
    #[arg(long)]
    readahead: bool,
    /// File I/O engine (env FERRY_FILE_ENGINE also works).
    #[arg(long, value_enum, default_value_t = Engine::Auto)]
    engine: Engine,
    /// TOML configuration file; flags add exports and listeners to it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Read every export through an encrypted cache in this directory.
    #[arg(long, value_name = "DIR", requires_all = ["cache_size", "cache_key_file"])]
    cache_dir: Option<PathBuf>,
    /// Cache capacity (e.g. 8G).
    #[arg(long, value_name = "SIZE", requires = "cache_dir")]
    cache_size: Option<ByteSize>,
    /// The cache's 32-byte master key (raw or 64 hex digits).
    #[arg(long, value_name = "FILE", requires = "cache_dir")]
    cache_key_file: Option<PathBuf>,
    /// Cache chunk size, fixed when the cache is created.
    #[arg(long, value_name = "SIZE", default_value = "64K")]
    cache_chunk_size: ByteSize,
    /// Whether writes store whole chunks in the cache or only drop them.
    #[arg(long, value_enum, default_value_t = CacheWriteMode::Through)]
    cache_write_mode: CacheWriteMode,
    /// Also serve every export over iSCSI on this portal, HOST:PORT
    /// (repeatable), as LUN 0 of target iqn.2026-11.dev.ferry:NAME. With
    /// --iscsi and no --nbd, NBD is not served.
    #[arg(long, value_name = "ADDR")]
    iscsi: Vec<String>,
    /// Only these initiator names may log in (repeatable; default: all).
    #[arg(long, value_name = "IQN", requires = "iscsi")]
    iscsi_allow: Vec<String>,
    /// Require CHAP with this user name (secret in --iscsi-chap-secret-file).
    #[arg(long, value_name = "NAME", requires_all = ["iscsi", "iscsi_chap_secret_file"])]
    iscsi_chap_user: Option<String>,
    /// The CHAP secret (at least 12 bytes; a trailing newline is ignored).
    #[arg(long, value_name = "FILE", requires = "iscsi_chap_user")]
    iscsi_chap_secret_file: Option<PathBuf>,
    /// Mutual CHAP: the name the target answers with.
    #[arg(long, value_name = "NAME", requires_all = ["iscsi_chap_user", "iscsi_mutual_secret_file"])]
    iscsi_mutual_user: Option<String>,
    /// Mutual CHAP: the target's secret.
    #[arg(long, value_name = "FILE", requires = "iscsi_mutual_user")]
    iscsi_mutual_secret_file: Option<PathBuf>,
    /// Ask discovery sessions for CHAP too.
    #[arg(long, requires = "iscsi_chap_user")]
    iscsi_discovery_chap: bool,
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Directory for the demo image (default: $TMPDIR/ferry-demo).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Size of the demo disk in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// NBD listen address (repeatable; default 127.0.0.1:10809).
    #[arg(long, value_name = "ADDR")]
    nbd: Vec<ListenAddr>,
}

impl ServeArgs {
    fn into_config(self) -> anyhow::Result<ServeConfig> {
        let mut cfg = match &self.config {
            Some(path) => ServeConfig::load(path)?,
            None => ServeConfig::default(),
        };
        let mut add = |name: String, path: PathBuf, description: String| {
            cfg.exports.push(ExportConfig {
                name,
                path,
                description,
                read_only: self.read_only,
                readahead: self.readahead,
                engine: self.engine,
            });
        };
        if let Some(image) = &self.image {
            let name = self.name.clone().unwrap_or_else(|| {
                image
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
            add(
                name,
                image.clone(),
                self.description.clone().unwrap_or_default(),
            );
        }
        for (name, path) in &self.exports {
            add(name.clone(), path.clone(), String::new());
        }
        if self.read_only {
            for e in &mut cfg.exports {
                e.read_only = true;
            }
        }
        cfg.listen.extend(self.nbd);
        if !self.iscsi.is_empty() {
            let iscsi = cfg.iscsi.get_or_insert_with(Default::default);
            iscsi.listen.extend(self.iscsi);
            iscsi.allowed_initiators.extend(self.iscsi_allow);
            if self.iscsi_chap_user.is_some() {
                iscsi.chap_user = self.iscsi_chap_user;
                iscsi.chap_secret_file = self.iscsi_chap_secret_file;
            }
            if self.iscsi_mutual_user.is_some() {
                iscsi.mutual_user = self.iscsi_mutual_user;
                iscsi.mutual_secret_file = self.iscsi_mutual_secret_file;
            }
            iscsi.discovery_chap |= self.iscsi_discovery_chap;
        }
        if let (Some(dir), Some(size), Some(key_file)) =
            (self.cache_dir, self.cache_size, self.cache_key_file)
        {
            cfg.cache = Some(CacheSettings {
                dir,
                size,
                key_file,
                chunk_size: self.cache_chunk_size,
                write_mode: self.cache_write_mode,
            });
        }
        if let (Some(cert), Some(key)) = (self.tls_cert, self.tls_key) {
            cfg.tls = Some(TlsConfig {
                cert,
                key,
                mode: self.tls.unwrap_or_default(),
            });
        }
        Ok(cfg)
    }
}

fn print_listening(addr: &str) {
    // Scripts and tests read this line to learn the bound port.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "listening nbd {addr}");
    let _ = out.flush();
}

async fn link_emulator(a: LinkEmuArgs) -> anyhow::Result<()> {
    use linkemu::{LinkConfig, LinkEmulator};
    let listen = tokio::net::lookup_host(&a.listen)
        .await?
        .next()
        .ok_or_else(|| anyhow::anyhow!("cannot resolve {}", a.listen))?;
    let target = tokio::net::lookup_host(&a.target)
        .await?
        .next()
        .ok_or_else(|| anyhow::anyhow!("cannot resolve {}", a.target))?;
    let delay = std::time::Duration::try_from_secs_f64(a.delay_ms / 1000.0)
        .map_err(|_| anyhow::anyhow!("--delay-ms must be a non-negative number"))?;
    let mut cfg = LinkConfig::new(delay);
    if a.mbit > 0.0 {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let bytes = (a.mbit * 1e6 / 8.0) as u64;
        cfg = cfg.with_bandwidth(bytes);
    }
    if let Some(kib) = a.queue_kib {
        anyhow::ensure!(kib > 0, "--queue-kib must be at least 1");
        cfg.max_queue_bytes = Some(kib.saturating_mul(1024));
    }
    tracing::info!(
        queue_bytes = cfg.queue_limit(linkemu::Direction::ToTarget),
        "link emulator shape"
    );
    let emu = LinkEmulator::start(listen, target, cfg).await?;
    print_listening_as("link", &emu.local_addr().to_string());
    // SIGUSR1 logs the byte counts so far: a benchmark measures one phase
    // of a longer run without restarting the link under it.
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
    let stopped = ferry::serve::shutdown_signal();
    tokio::pin!(stopped);
    let signal = loop {
        tokio::select! {
            s = &mut stopped => break s?,
            _ = usr1.recv() => {
                let st = emu.stats();
                tracing::info!(
                    bytes_to_target = st.bytes_to_target,
                    bytes_to_client = st.bytes_to_client,
                    connections = st.connections_accepted,
                    "link emulator counts"
                );
            }
        }
    };
    let st = emu.stats();
    tracing::info!(
        signal,
        bytes_to_target = st.bytes_to_target,
        bytes_to_client = st.bytes_to_client,
        connections = st.connections_accepted,
        "link emulator stopped"
    );
    Ok(())
}

fn secs(v: f64, what: &str) -> anyhow::Result<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(v)
        .map_err(|_| anyhow::anyhow!("--{what} must be a non-negative number of seconds"))
}

async fn edge(cmd: EdgeCmd) -> anyhow::Result<()> {
    use ferry::edge::config::{EdgeFile, VolumeSpec};
    match cmd.action {
        Some(EdgeAction::Flush(c)) => {
            ferry::ctl::flush(&ferry::ctl::client(c.api)?, None, None, c.json).await
        }
        Some(EdgeAction::Profile(ProfileAction::Stop(a))) => {
            ferry::ctl::stop_profile(&ferry::ctl::client(a.ctl.api)?, &a.volume, a.ctl.json).await
        }
        Some(EdgeAction::Status(c)) => {
            let api = ferry::ctl::client(c.api)?;
            if c.json {
                return ferry::ctl::edge_status_json(&api).await;
            }
            print!("{}", ferry::ctl::edge_status_lines(&api).await?);
            Ok(())
        }
        None => {
            let r = cmd.run;
            let (mut file, file_path, attach_first) = if let Some(path) = r.config {
                // Absolute, so saving it does not depend on the directory.
                let path = std::fs::canonicalize(&path)
                    .with_context(|| format!("finding {}", path.display()))?;
                (EdgeFile::load(&path)?, Some(path), false)
            } else {
                let (Some(origin), Some(volume), Some(cache_dir)) =
                    (r.origin, r.volume, r.cache_dir)
                else {
                    anyhow::bail!(
                        "ferry edge needs --config FILE, or --origin, --volume and --cache-dir"
                    );
                };
                let mut file = EdgeFile::new(cache_dir);
                file.cache_size = r.cache_size;
                file.cache_memory = r.cache_memory;
                file.nbd = r.nbd;
                if !r.iscsi.is_empty() {
                    file.iscsi = Some(ferry::config::IscsiSettings {
                        listen: r.iscsi,
                        ..Default::default()
                    });
                }
                file.link.psk_file = r.psk_file;
                file.link.no_tls = r.no_tls;
                file.link.tls_ca = r.tls_ca;
                file.link.tls_cert = r.tls_cert;
                file.link.tls_key = r.tls_key;
                file.link.tls_server_name = r.tls_server_name;
                secs(r.request_timeout, "request-timeout")?;
                file.link.request_timeout_secs = r.request_timeout;
                file.prefetch = ferry::edge::config::PrefetchSettings {
                    budget: r.prefetch_budget,
                    profile_window_secs: r.profile_window,
                    profile_quiet_secs: r.profile_quiet,
                };
                secs(r.rpo, "rpo")?;
                file.volumes.push(VolumeSpec {
                    journal_size: r.journal_size,
                    rpo_secs: r.rpo,
                    local_only: r.local_only,
                    isolated: r.isolated,
                    ..VolumeSpec::new(volume, origin)
                });
                (file, None, true)
            };
            if r.api.is_some() {
                file.api = r.api;
            }
            if r.metrics.is_some() {
                file.metrics = r.metrics;
            }
            let running = ferry::edge::start(ferry::edge::EdgeStart {
                file,
                file_path,
                attach_first,
            })
            .await?;
            for l in &running.listeners {
                print_listening(l);
            }
            for l in &running.iscsi_listeners {
                print_listening_as("iscsi", l);
            }
            if let Some(m) = &running.metrics {
                print_listening_as("metrics", m);
            }
            if let Some(a) = &running.api_tcp {
                print_listening_as("api-tcp", a);
            }
            print_listening_as("api", &running.api.display().to_string());
            // The name scripts written for earlier versions wait for.
            print_listening_as("control", &running.api.display().to_string());
            running.run_until_signal().await
        }
    }
}

async fn origin(cmd: OriginCmd) -> anyhow::Result<()> {
    use ferry::ctl;
    let client = |c: OriginCtlArgs| {
        c.api.map(ferry::api::client::ApiClient::new).context(
            "which origin? give --api PATH (its API socket: STATE_DIR/api.sock) or set FERRY_ORIGIN_API",
        )
    };
    match cmd.action {
        Some(OriginAction::Volume(OriginVolumeCommand::Add { name, source, ctl })) => {
            let json = ctl.json;
            ctl::origin_volume_add(&client(ctl)?, &name, &source, json).await
        }
        Some(OriginAction::Volume(OriginVolumeCommand::List(c)) | OriginAction::Status(c)) => {
            let json = c.json;
            ctl::origin_status(&client(c)?, json).await
        }
        Some(OriginAction::Volume(OriginVolumeCommand::Rm { name, ctl })) => {
            let json = ctl.json;
            ctl::origin_volume_rm(&client(ctl)?, &name, json).await
        }
        Some(OriginAction::Release(a)) => {
            let json = a.ctl.json;
            ctl::origin_release(&client(a.ctl)?, &a.volume, a.edge.as_deref(), json).await
        }
        Some(OriginAction::Unfence(a)) => {
            let json = a.ctl.json;
            ctl::origin_unfence(&client(a.ctl)?, &a.volume, &a.edge, json).await
        }
        Some(OriginAction::Profiles(a)) => {
            let json = a.ctl.json;
            ctl::origin_profiles(&client(a.ctl)?, &a.volume, a.ranges, json).await
        }
        None => {
            let a = cmd.run;
            let (Some(listen), Some(state_dir)) = (a.listen, a.state_dir) else {
                anyhow::bail!("ferry origin needs --listen and --state-dir");
            };
            let args = ferry::origin::OriginArgs {
                listen,
                exports: a.exports,
                state_dir,
                api: a.api,
                metrics: a.metrics,
                psk_file: a.psk_file,
                no_tls: a.no_tls,
                tls_cert: a.tls_cert,
                tls_key: a.tls_key,
                tls_client_ca: a.tls_client_ca,
                engine: a.engine,
                auto_snapshots: a.auto_snapshots,
            };
            ferry::origin::run(args, print_listening_as).await
        }
    }
}

async fn volume(cmd: VolumeCommand) -> anyhow::Result<()> {
    use ferry::ctl;
    match cmd {
        VolumeCommand::Add(a) => {
            let spec = ferry::edge::config::VolumeSpec {
                journal_size: a.journal_size,
                rpo_secs: a.rpo,
                local_only: a.local_only,
                isolated: a.isolated,
                ..ferry::edge::config::VolumeSpec::new(a.name, a.origin)
            };
            spec.validate()?;
            ctl::volume_add(&ctl::client(a.ctl.api)?, &spec, a.ctl.json).await
        }
        VolumeCommand::List(c) => ctl::volume_list(&ctl::client(c.api)?, c.json).await,
        VolumeCommand::Set(a) => {
            ctl::volume_set(&ctl::client(a.ctl.api)?, &a.name, Some(a.rpo), a.ctl.json).await
        }
        VolumeCommand::Rm(a) => {
            let timeout = a.timeout.map(|t| secs(t, "timeout")).transpose()?;
            ctl::volume_rm(&ctl::client(a.ctl.api)?, &a.name, timeout, a.ctl.json).await
        }
    }
}

fn print_listening_as(what: &str, addr: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "listening {what} {addr}");
    let _ = out.flush();
}

async fn inspect(args: &InspectArgs) -> anyhow::Result<()> {
    let key = args.key_file.as_deref().map(read_key_file).transpose()?;
    let dir = args.dir.clone();
    let verify = args.verify;
    let inspection = tokio::task::spawn_blocking(move || {
        cache::inspect::inspect(&dir, key.as_deref().filter(|_| verify))
    })
    .await??;
    print!("{inspection}");
    if !inspection.is_clean() {
        anyhow::bail!("the cache in {} has damaged chunks", args.dir.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        // Before any command binds and announces a listener: a SIGTERM
        // right after the announcement must stop it cleanly.
        ferry::serve::install_shutdown_signals()?;
        match cli.command {
            Command::Serve(args) => {
                ferry::serve::run((*args).into_config()?, print_listening_as).await
            }
            Command::Demo(args) => ferry::demo::run(args.dir, args.size_mib, args.nbd).await,
            Command::Cache(CacheCommand::Inspect(args)) => inspect(&args).await,
            Command::Cache(CacheCommand::Status(c)) => {
                ferry::ctl::cache_status(&ferry::ctl::client(c.api)?, c.json).await
            }
            Command::Cache(CacheCommand::Resize(a)) => {
                ferry::ctl::cache_resize(&ferry::ctl::client(a.ctl.api)?, a.size.0, a.ctl.json)
                    .await
            }
            Command::Volume(cmd) => volume(cmd).await,
            Command::Migrate(cmd) => migrate(cmd).await,
            Command::Moveback(a) => {
                let timeout = a.timeout.map(|t| secs(t, "timeout")).transpose()?;
                ferry::ctl::moveback(
                    &ferry::ctl::client(a.ctl.api)?,
                    &a.volume,
                    timeout,
                    a.ctl.json,
                )
                .await
            }
            Command::Status(c) => ferry::ctl::status(&ferry::ctl::client(c.api)?, c.json).await,
            Command::Flush(a) => {
                let timeout = a.timeout.map(|t| secs(t, "timeout")).transpose()?;
                ferry::ctl::flush(
                    &ferry::ctl::client(a.ctl.api)?,
                    a.volume.as_deref(),
                    timeout,
                    a.ctl.json,
                )
                .await
            }
            Command::Origin(cmd) => origin(cmd).await,
            Command::Snapshot(cmd) => ferry::snapshot::run(cmd).await,
            Command::Clone(cmd) => ferry::clone::run(cmd).await,
            Command::Edge(cmd) => edge(cmd).await,
            Command::LinkEmulator(a) => link_emulator(a).await,
            Command::StagingImage(a) => ferry::staging::run(&a),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: {e:#}");
            ExitCode::FAILURE
        }
    }
}
