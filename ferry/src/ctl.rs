//! The CLI commands that talk to a running edge through its management API
//! (`ferry volume`, `ferry status`, `ferry flush`, `ferry cache resize`,
//! and the older `ferry edge status|flush`). Each prints a readable table
//! or, with `--json`, the API's reply as is.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;

use crate::api::client::ApiClient;
use crate::edge::api::{
    CacheInfo, EdgeSummary, Flushed, MigrationInfo, Removed, VolumeInfo, VolumeList, VolumeState,
};
use crate::edge::config::VolumeSpec;

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn timeout_query(timeout: Option<Duration>) -> String {
    timeout.map_or_else(String::new, |t| {
        format!("?timeout_secs={}", t.as_secs_f64())
    })
}

/// `ferry volume add`.
pub async fn volume_add(api: &ApiClient, spec: &VolumeSpec, json: bool) -> anyhow::Result<()> {
    let body = serde_json::to_value(spec)?;
    let info: VolumeInfo = api.call("POST", "/v1/volumes", Some(&body)).await?.json()?;
    if json {
        return print_json(&info);
    }
    println!(
        "added {}: {} bytes from {}, NBD export {:?}{}",
        info.name,
        info.size,
        info.spec.origin,
        info.nbd_export,
        info.iscsi_target
            .as_deref()
            .map(|t| format!(", iSCSI target {t}"))
            .unwrap_or_default()
    );
    Ok(())
}

/// `ferry volume rm`.
pub async fn volume_rm(
    api: &ApiClient,
    name: &str,
    timeout: Option<Duration>,
    json: bool,
) -> anyhow::Result<()> {
    let path = format!("/v1/volumes/{name}{}", timeout_query(timeout));
    let r: Removed = api.call("DELETE", &path, None).await?.json()?;
    if json {
        return print_json(&r);
    }
    println!(
        "removed {}: every write was applied at its origin, and the origin released it",
        r.name
    );
    Ok(())
}

/// `ferry volume set`.
pub async fn volume_set(
    api: &ApiClient,
    name: &str,
    rpo_secs: Option<f64>,
    json: bool,
) -> anyhow::Result<()> {
    let body = json!({ "rpo_secs": rpo_secs });
    let info: VolumeInfo = api
        .call("PATCH", &format!("/v1/volumes/{name}"), Some(&body))
        .await?
        .json()?;
    if json {
        return print_json(&info);
    }
    println!("{}: rpo {} s", info.name, info.spec.rpo_secs);
    Ok(())
}

/// `ferry volume list`.
pub async fn volume_list(api: &ApiClient, json: bool) -> anyhow::Result<()> {
    let list: VolumeList = api.call("GET", "/v1/volumes", None).await?.json()?;
    if json {
        return print_json(&list);
    }
    print!("{}", volume_table(&list.volumes));
    Ok(())
}

/// `ferry status`.
pub async fn status(api: &ApiClient, json: bool) -> anyhow::Result<()> {
    let s: EdgeSummary = api.call("GET", "/v1/status", None).await?.json()?;
    if json {
        return print_json(&s);
    }
    let c = &s.cache;
    println!(
        "edge {} up {:.0} s; cache {} of {} used ({:.1}% hits, {} evictions){}",
        s.version,
        s.uptime_secs,
        human(c.used_bytes),
        human(c.capacity_bytes),
        c.hit_ratio * 100.0,
        c.evictions,
        if c.open {
            ""
        } else {
            " (opens with the first volume)"
        }
    );
    print!("{}", volume_table(&s.volumes));
    for v in &s.volumes {
        if let Some(e) = &v.error {
            println!("{}: {e}", v.name);
        }
    }
    Ok(())
}

/// `ferry edge profile stop VOLUME`.
pub async fn stop_profile(api: &ApiClient, volume: &str, json: bool) -> anyhow::Result<()> {
    let path = format!("/v1/volumes/{volume}/profile/stop");
    let s: crate::edge::api::ProfileStopped = api.call("POST", &path, None).await?.json()?;
    if json {
        return print_json(&s);
    }
    println!(
        "{}: boot window closed with {} chunks; {}",
        s.volume,
        s.chunks,
        if s.stored {
            "the origin stored the profile"
        } else {
            "the profile is not stored at the origin yet (see ferry edge status)"
        }
    );
    Ok(())
}

/// `ferry flush [VOLUME]`.
pub async fn flush(
    api: &ApiClient,
    volume: Option<&str>,
    timeout: Option<Duration>,
    json: bool,
) -> anyhow::Result<()> {
    let path = match volume {
        Some(v) => format!("/v1/volumes/{v}/flush{}", timeout_query(timeout)),
        None => format!("/v1/flush{}", timeout_query(timeout)),
    };
    let f: Flushed = api.call("POST", &path, None).await?.json()?;
    if json {
        return print_json(&f);
    }
    println!(
        "flushed {} in {:.1} s: every journaled write is applied at the origin",
        if f.volumes.is_empty() {
            "nothing (no volume is attached)".to_owned()
        } else {
            f.volumes.join(", ")
        },
        f.seconds
    );
    Ok(())
}

/// `ferry cache resize SIZE`.
pub async fn cache_resize(api: &ApiClient, bytes: u64, json: bool) -> anyhow::Result<()> {
    let body = json!({ "size": bytes });
    let c: CacheInfo = api
        .call("PUT", "/v1/cache/size", Some(&body))
        .await?
        .json()?;
    if json {
        return print_json(&c);
    }
    println!(
        "cache resized to {} ({} in use)",
        human(c.capacity_bytes),
        human(c.used_bytes)
    );
    Ok(())
}

/// `ferry cache status`.
pub async fn cache_status(api: &ApiClient, json: bool) -> anyhow::Result<()> {
    let c: CacheInfo = api.call("GET", "/v1/cache", None).await?.json()?;
    if json {
        return print_json(&c);
    }
    println!(
        "cache {}: {} of {} used, chunk {}, {:.1}% hits ({} from memory), {} misses, {} evictions, {} dedup hits",
        c.dir,
        human(c.used_bytes),
        human(c.capacity_bytes),
        human(c.chunk_size),
        c.hit_ratio * 100.0,
        c.memory_hits,
        c.misses,
        c.evictions,
        c.dedup_hits
    );
    Ok(())
}

/// `ferry edge status`: the older `key: value` lines, one block per volume.
/// `ferry edge status --json`: the volumes as the API lists them.
pub async fn edge_status_json(api: &ApiClient) -> anyhow::Result<()> {
    let list: VolumeList = api.call("GET", "/v1/volumes", None).await?.json()?;
    print_json(&list)
}

pub async fn edge_status_lines(api: &ApiClient) -> anyhow::Result<String> {
    let list: VolumeList = api.call("GET", "/v1/volumes", None).await?.json()?;
    let c: CacheInfo = api.call("GET", "/v1/cache", None).await?.json()?;
    let mut out = String::new();
    let several = list.volumes.len() > 1;
    for v in &list.volumes {
        if several {
            let _ = writeln!(out, "volume: {}", v.name);
        }
        out.push_str(&status_lines(v, &c));
    }
    Ok(out)
}

fn status_lines(v: &VolumeInfo, cache: &CacheInfo) -> String {
    let mut head = String::new();
    let _ = writeln!(head, "stage: {}", stage_name(v));
    if let Some(m) = &v.migration {
        let _ = writeln!(head, "migration_target: {}", m.target);
        let _ = writeln!(head, "migration_bytes_local: {}", m.bytes_local);
        let _ = writeln!(head, "migration_bytes_remaining: {}", m.bytes_remaining);
        let _ = writeln!(head, "migration_bytes_from_link: {}", m.bytes_from_link);
        let _ = writeln!(head, "migration_bytes_dirty: {}", m.bytes_dirty);
        if matches!(v.state, VolumeState::MovingBack | VolumeState::OnPremises) {
            let _ = writeln!(head, "moveback_bytes_shipped: {}", m.moveback_bytes_shipped);
            let _ = writeln!(
                head,
                "moveback_bytes_verified: {}",
                m.moveback_bytes_verified
            );
            let _ = writeln!(
                head,
                "moveback_bytes_repaired: {}",
                m.moveback_bytes_repaired
            );
        }
    }
    if v.link.is_none() {
        match v.state {
            VolumeState::CutOver => {
                head.push_str("link: none (cut over: served from the local copy alone)\n");
                return head;
            }
            VolumeState::OnPremises => {
                head.push_str(
                    "link: none (moved back: the origin serves it, this edge does not)\n",
                );
                return head;
            }
            _ => {}
        }
    }
    head + &status_lines_linked(v, cache)
}

fn stage_name(v: &VolumeInfo) -> String {
    serde_json::to_value(v.stage)
        .ok()
        .and_then(|s| s.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn status_lines_linked(v: &VolumeInfo, cache: &CacheInfo) -> String {
    let (Some(l), Some(vc), Some(j)) = (&v.link, &v.cache, &v.journal) else {
        return format!(
            "link: down\nstate: attaching\nlink_last_error: {}\n",
            v.error.as_deref().unwrap_or("none")
        );
    };
    let mut out = String::new();
    let mut kv = |k: &str, val: String| {
        let _ = writeln!(out, "{k}: {val}");
    };
    kv("link", if l.up { "up" } else { "down" }.into());
    kv("link_connects", l.connects.to_string());
    kv("link_deaths", l.deaths.to_string());
    kv(
        "link_last_error",
        l.last_error.clone().unwrap_or_else(|| "none".into()),
    );
    kv("link_rtt_ms", format!("{:.1}", l.rtt_ms));
    kv("link_queue_delay_ms", format!("{:.1}", l.queue_delay_ms));
    kv("link_window_bytes", l.window_bytes.to_string());
    kv(
        "link_delivery_rate_bytes_per_sec",
        l.delivery_rate_bytes_per_sec.to_string(),
    );
    kv("bytes_fetched", l.demand_bytes.to_string());
    kv("bytes_pushed", l.push_bytes.to_string());
    kv("signature_hits", l.signature_hits.to_string());
    kv("signature_misses", l.signature_misses.to_string());
    kv("cache_hits", cache.hits.to_string());
    kv("cache_memory_hits", cache.memory_hits.to_string());
    kv("cache_misses", cache.misses.to_string());
    kv("cache_hit_ratio", format!("{:.3}", cache.hit_ratio));
    kv("volume_hit_ratio", format!("{:.3}", vc.hit_ratio));
    #[allow(clippy::cast_precision_loss)]
    let fill = if cache.capacity_bytes == 0 {
        0.0
    } else {
        cache.used_bytes as f64 / cache.capacity_bytes as f64
    };
    kv("cache_fill_rate", format!("{fill:.3}"));
    kv("journal_unshipped_bytes", j.unshipped_bytes.to_string());
    kv("journal_unshipped_records", j.unshipped_records.to_string());
    kv("journal_batches_in_flight", j.batches_in_flight.to_string());
    kv(
        "journal_oldest_unshipped_age",
        j.oldest_unshipped_age_secs
            .map_or_else(|| "none".into(), |a| format!("{a:.1}s")),
    );
    kv("journal_used_bytes", j.used_bytes.to_string());
    kv("journal_appends_waiting", j.appends_waiting.to_string());
    kv("batches_shipped", j.batches_shipped.to_string());
    kv("bytes_shipped", j.bytes_shipped.to_string());
    kv("batch_bytes_sent", l.write_bytes.to_string());
    kv("pushes_kept", vc.pushes_kept.to_string());
    kv("pushes_dropped", vc.pushes_dropped.to_string());
    if let Some(p) = &v.prefetch {
        kv(
            "prefetch_profile",
            format!("{} ({} chunks)", p.profile, p.profile_chunks),
        );
        kv("prefetch_plan", p.plan.clone());
        kv("prefetch_pushed_bytes", p.pushed_bytes.to_string());
        kv("prefetch_used_bytes", p.used_bytes.to_string());
        kv("prefetch_unread_bytes", p.unread_bytes.to_string());
    }
    if let Some(o) = &v.local_only {
        kv("local_only_bytes", o.local_only_bytes.to_string());
        kv("overlay_allocated_bytes", o.allocated_bytes.to_string());
    }
    out
}

/// A per-volume table: state, link, hit ratio, bytes each way, journal.
pub fn volume_table(volumes: &[VolumeInfo]) -> String {
    let mut rows = vec![[
        "VOLUME".to_owned(),
        "STATE".into(),
        "STAGE".into(),
        "SIZE".into(),
        "LINK".into(),
        "RTT".into(),
        "HIT%".into(),
        "IN".into(),
        "OUT".into(),
        "UNSHIPPED".into(),
        "OLDEST".into(),
        "RPO".into(),
    ]];
    for v in volumes {
        let state = match v.state {
            VolumeState::Attaching => "attaching",
            VolumeState::Up => "up",
            VolumeState::LinkDown => "link-down",
            VolumeState::Removing => "removing",
            VolumeState::CutOver => "cut-over",
            VolumeState::MovingBack => "moving-back",
            VolumeState::OnPremises => "on-premises",
        };
        let dash = || "-".to_owned();
        let stage = match &v.migration {
            Some(m) if m.bytes_remaining > 0 => format!("{} {:.1}%", stage_name(v), m.percent),
            _ => stage_name(v),
        };
        rows.push([
            v.name.clone(),
            state.into(),
            stage,
            if v.size == 0 { dash() } else { human(v.size) },
            v.link
                .as_ref()
                .map_or_else(dash, |l| if l.up { "up" } else { "down" }.into()),
            v.link
                .as_ref()
                .map_or_else(dash, |l| format!("{:.1}ms", l.rtt_ms)),
            v.cache
                .as_ref()
                .map_or_else(dash, |c| format!("{:.1}", c.hit_ratio * 100.0)),
            v.link
                .as_ref()
                .map_or_else(dash, |l| human(l.wire_bytes_in)),
            v.link
                .as_ref()
                .map_or_else(dash, |l| human(l.wire_bytes_out)),
            v.journal
                .as_ref()
                .map_or_else(dash, |j| human(j.unshipped_bytes)),
            v.journal.as_ref().map_or_else(dash, |j| {
                j.oldest_unshipped_age_secs
                    .map_or_else(dash, |a| format!("{a:.1}s"))
            }),
            format!("{}s", v.spec.rpo_secs),
        ]);
    }
    let mut out = render_table(&rows);
    if volumes.is_empty() {
        out.push_str("(no volumes: add one with `ferry volume add NAME --origin HOST:PORT`)\n");
    }
    out
}

/// Rows as left-aligned columns, two spaces apart.
pub(crate) fn render_table<const N: usize>(rows: &[[String; N]]) -> String {
    let widths: Vec<usize> = (0..N)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

/// Bytes with a binary suffix.
#[allow(clippy::cast_precision_loss)]
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes}B")
    } else {
        format!("{v:.1}{}", UNITS[i])
    }
}

// --- migration ------------------------------------------------------------

fn migration_line(m: &MigrationInfo) -> String {
    let eta = m
        .eta_secs
        .map_or_else(|| "-".to_owned(), |e| format!("{e:.0}s"));
    format!(
        "{}: {} {} of {} ({:.1}%), {}/s, eta {eta}; from link {}, cache {}, holes {}, own writes {}{}{}",
        m.volume,
        serde_json::to_value(m.stage)
            .ok()
            .and_then(|s| s.as_str().map(str::to_owned))
            .unwrap_or_default(),
        human(m.bytes_local),
        human(m.bytes_total),
        m.percent,
        human(whole_bytes(m.rate_bytes_per_sec)),
        human(m.bytes_from_link),
        human(m.bytes_from_cache),
        human(m.bytes_zero),
        human(m.bytes_from_journal),
        if m.paused { ", paused" } else { "" },
        m.rate_limit_mbit
            .map(|r| format!(", limited to {r} Mbit/s"))
            .unwrap_or_default(),
    )
}

/// `ferry migrate start`.
pub async fn migrate_start(
    api: &ApiClient,
    name: &str,
    target: &std::path::Path,
    rate_mbit: Option<f64>,
    json: bool,
) -> anyhow::Result<()> {
    let target = std::path::absolute(target).context("resolving the target path")?;
    let body = json!({ "target": target, "rate_mbit": rate_mbit });
    let m: MigrationInfo = api
        .call(
            "POST",
            &format!("/v1/volumes/{name}/migration"),
            Some(&body),
        )
        .await?
        .json()?;
    if json {
        return print_json(&m);
    }
    println!("migrating {name} into {}", m.target);
    println!("{}", migration_line(&m));
    Ok(())
}

/// `ferry migrate status`: once, or with `wait` a progress bar until the
/// copy is complete.
pub async fn migrate_status(
    api: &ApiClient,
    name: Option<&str>,
    wait: bool,
    json: bool,
) -> anyhow::Result<()> {
    let names: Vec<String> = if let Some(n) = name {
        vec![n.to_owned()]
    } else {
        let list: VolumeList = api.call("GET", "/v1/volumes", None).await?.json()?;
        list.volumes
            .into_iter()
            .filter(|v| v.migration.is_some())
            .map(|v| v.name)
            .collect()
    };
    if names.is_empty() {
        println!("(no volume is migrating: start with `ferry migrate start VOLUME --target PATH`)");
        return Ok(());
    }
    loop {
        let mut all: Vec<MigrationInfo> = Vec::new();
        for n in &names {
            all.push(
                api.call("GET", &format!("/v1/volumes/{n}/migration"), None)
                    .await?
                    .json()?,
            );
        }
        let done = all.iter().all(|m| m.bytes_remaining == 0);
        if json {
            print_json(&all)?;
        } else if wait {
            for m in &all {
                eprint!("\r{} {}\x1b[K", progress_bar(m.percent), migration_line(m));
                if all.len() > 1 {
                    eprintln!();
                }
            }
        } else {
            for m in &all {
                println!("{}", migration_line(m));
            }
        }
        if !wait || done {
            if wait && !json {
                eprintln!();
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // clamped to 0..=WIDTH
fn progress_bar(percent: f64) -> String {
    const WIDTH: u8 = 30;
    let width = usize::from(WIDTH);
    let full = ((percent / 100.0) * f64::from(WIDTH))
        .round()
        .clamp(0.0, f64::from(WIDTH)) as usize;
    format!("[{}{}]", "#".repeat(full), "-".repeat(width - full))
}

/// `ferry migrate pause|resume|rate`.
pub async fn migrate_change(
    api: &ApiClient,
    name: &str,
    paused: Option<bool>,
    rate_mbit: Option<f64>,
    json: bool,
) -> anyhow::Result<()> {
    let body = json!({ "paused": paused, "rate_mbit": rate_mbit });
    let m: MigrationInfo = api
        .call(
            "PATCH",
            &format!("/v1/volumes/{name}/migration"),
            Some(&body),
        )
        .await?
        .json()?;
    if json {
        return print_json(&m);
    }
    println!("{}", migration_line(&m));
    Ok(())
}

/// `ferry migrate cutover`.
pub async fn migrate_cutover(
    api: &ApiClient,
    name: &str,
    force: bool,
    timeout: Option<Duration>,
    json: bool,
) -> anyhow::Result<()> {
    let mut path = format!("/v1/volumes/{name}/cutover{}", timeout_query(timeout));
    if force {
        path.push(if path.contains('?') { '&' } else { '?' });
        path.push_str("force=true");
    }
    let m: MigrationInfo = api.call("POST", &path, None).await?.json()?;
    if json {
        return print_json(&m);
    }
    println!(
        "{name} is cut over: served from {} alone; the origin released it to this edge \
         (it may be stopped)",
        m.target
    );
    Ok(())
}

/// `ferry moveback`.
pub async fn moveback(
    api: &ApiClient,
    name: &str,
    timeout: Option<Duration>,
    json: bool,
) -> anyhow::Result<()> {
    let path = format!("/v1/volumes/{name}/moveback{}", timeout_query(timeout));
    let m: crate::edge::MovedBack = api.call("POST", &path, None).await?.json()?;
    if json {
        return print_json(&m);
    }
    println!(
        "{name} is home: the origin has every write ({} shipped) and its image matches the \
         edge's copy ({} verified by {} of signatures, {} repaired) after {:.1} s; serve it \
         on premises (`ferry serve` / `ferry origin`) or use the image directly",
        human(m.bytes_shipped),
        human(m.bytes_verified),
        human(m.signature_bytes),
        human(m.bytes_repaired),
        m.seconds
    );
    Ok(())
}

/// The socket a CLI command talks to.
pub fn client(api: Option<std::path::PathBuf>) -> anyhow::Result<ApiClient> {
    api.map(ApiClient::new).context(
        "which edge? give --api PATH (its API socket: <cache-dir>/api.sock unless configured) or set FERRY_API",
    )
}

// --- the origin's commands ----------------------------------------------

use crate::origin::api::{ExportRemoved, Fencing, OriginSummary, OriginVolumeInfo};

/// `ferry origin volume add`.
pub async fn origin_volume_add(
    api: &ApiClient,
    name: &str,
    source: &str,
    json: bool,
) -> anyhow::Result<()> {
    let body = json!({ "name": name, "source": source });
    let v: OriginVolumeInfo = api.call("POST", "/v1/volumes", Some(&body)).await?.json()?;
    if json {
        return print_json(&v);
    }
    println!("serving {} ({}, epoch {})", v.name, human(v.size), v.epoch);
    Ok(())
}

/// `ferry origin volume rm`.
pub async fn origin_volume_rm(api: &ApiClient, name: &str, json: bool) -> anyhow::Result<()> {
    let r: ExportRemoved = api
        .call("DELETE", &format!("/v1/volumes/{name}"), None)
        .await?
        .json()?;
    if json {
        return print_json(&r);
    }
    println!("no longer serving {}", r.name);
    Ok(())
}

/// `ferry origin release --force`.
pub async fn origin_release(
    api: &ApiClient,
    name: &str,
    edge: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let body = json!({ "force": true, "edge": edge });
    let f: Fencing = api
        .call("POST", &format!("/v1/volumes/{name}/release"), Some(&body))
        .await?
        .json()?;
    if json {
        return print_json(&f);
    }
    println!(
        "{} released; edge {} is fenced off it (`ferry origin unfence {} {}` lets it back)",
        f.name, f.edge, f.name, f.edge
    );
    Ok(())
}

/// `ferry origin unfence`.
pub async fn origin_unfence(
    api: &ApiClient,
    name: &str,
    edge: &str,
    json: bool,
) -> anyhow::Result<()> {
    let body = json!({ "edge": edge });
    let f: Fencing = api
        .call("POST", &format!("/v1/volumes/{name}/unfence"), Some(&body))
        .await?
        .json()?;
    if json {
        return print_json(&f);
    }
    println!("edge {} may attach {} again", f.edge, f.name);
    Ok(())
}

/// `ferry origin profiles VOLUME`.
pub async fn origin_profiles(
    api: &ApiClient,
    name: &str,
    ranges: usize,
    json: bool,
) -> anyhow::Result<()> {
    let l: crate::origin::api::ProfileListing = api
        .call("GET", &format!("/v1/volumes/{name}/profiles"), None)
        .await?
        .json()?;
    if json {
        return print_json(&l);
    }
    let from = l
        .from_parent
        .as_deref()
        .map_or(String::new(), |p| format!(" (its parent {p}'s)"));
    println!(
        "{}: {} boot profiles{from}, {} damaged; chunks of {}",
        l.volume,
        l.profiles.len(),
        l.damaged,
        human(u64::from(l.chunk_size))
    );
    let mut rows = vec![[
        "PROFILE".to_owned(),
        "CHUNKS".into(),
        "BYTES".into(),
        "WINDOW".into(),
        "READS".into(),
    ]];
    for p in &l.profiles {
        rows.push([
            p.number.to_string(),
            p.chunks.to_string(),
            human(p.chunks * u64::from(l.chunk_size)),
            format!("{:.1} s", f64::from(p.window_ms) / 1000.0),
            p.reads.to_string(),
        ]);
    }
    print!("{}", render_table(&rows));
    println!(
        "plan from {}: {} in {} ranges, first needed first{}",
        l.plan_from,
        human(l.plan_bytes),
        l.plan.len(),
        if l.plan.len() > ranges {
            format!(" (the first {ranges}; --ranges N for more)")
        } else {
            String::new()
        }
    );
    let mut rows = vec![["OFFSET".to_owned(), "LENGTH".into()]];
    for r in l.plan.iter().take(ranges) {
        rows.push([r.offset.to_string(), human(u64::from(r.len))]);
    }
    print!("{}", render_table(&rows));
    println!(
        "files in boot order: {}{}",
        l.files.len(),
        if l.files.len() > ranges {
            format!(" (the first {ranges})")
        } else {
            String::new()
        }
    );
    let mut rows = vec![["FILE".to_owned(), "SIZE".into(), "PLANNED".into()]];
    for f in l.files.iter().take(ranges) {
        rows.push([f.path.clone(), human(f.size), human(f.planned_bytes)]);
    }
    print!("{}", render_table(&rows));
    for w in &l.file_warnings {
        println!("warning: {w}");
    }
    Ok(())
}

/// `ferry origin status` and `ferry origin volume list`.
pub async fn origin_status(api: &ApiClient, json: bool) -> anyhow::Result<()> {
    let s: OriginSummary = api.call("GET", "/v1/status", None).await?.json()?;
    if json {
        return print_json(&s);
    }
    println!(
        "origin {} up {:.0} s; {} edge connections ({} accepted, {} attaches refused)",
        s.version, s.uptime_secs, s.connections_active, s.connections_accepted, s.attach_refusals
    );
    let mut rows = vec![[
        "VOLUME".to_owned(),
        "SIZE".into(),
        "ATTACHED BY".into(),
        "FENCED".into(),
        "READ".into(),
        "PUSHED".into(),
        "APPLIED".into(),
        "SOURCE".into(),
    ]];
    for v in &s.volumes {
        rows.push([
            v.name.clone(),
            human(v.size),
            v.attached_by.clone().unwrap_or_else(|| "-".into()),
            if v.fenced.is_empty() {
                "-".into()
            } else {
                v.fenced.join(",")
            },
            human(v.bytes_read),
            human(v.bytes_pushed),
            format!("{} ({})", v.batches_applied, human(v.batch_bytes_applied)),
            v.source.clone().unwrap_or_default(),
        ]);
    }
    print!("{}", render_table(&rows));
    Ok(())
}

/// A byte rate for display: rounded, negative and NaN as 0.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // saturating, for display
fn whole_bytes(rate: f64) -> u64 {
    rate.round().max(0.0) as u64
}
