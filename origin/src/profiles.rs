//! Boot profiles kept with a volume, and the push plan made from them.
//!
//! An edge records which chunks the volume's boot read, in order, and
//! hands the profile over (`Message::Profile`); it is kept in
//! `volumes/NAME/profiles/NNNNNNNN` (the newest [`KEEP`]). At its next
//! start an edge asks for the plan (`Message::Plan`): the profiles merged
//! by the `prefetch` crate's consensus, as ranges the session pushes in
//! order behind demand reads and group pushes. A clone with no profiles
//! of its own boots like its parent: the parent's profiles count too.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use link::proto::ErrorCode;
use link::session::Refusal;
use prefetch::{consensus, Plan, PlanConfig, Profile};

use crate::{read_file, refusal, replace_file, Origin, OriginError, Storage, Volume};

/// Profiles kept per volume: enough for a consensus to outvote one odd
/// boot, few enough that an image changed by updates is soon followed.
pub const KEEP: usize = 4;
/// Bytes one plan pushes, at most, whatever the edge asks.
const MAX_PLAN_BYTES: u64 = 1 << 30;

fn dir_of(volume_dir: &Path) -> PathBuf {
    volume_dir.join("profiles")
}

/// The numbers of the profiles in `dir`, oldest first (anything else in
/// it is not ours and left alone).
fn numbers(storage: &dyn Storage, dir: &Path) -> Vec<u64> {
    let mut n: Vec<u64> = storage
        .list(dir)
        .unwrap_or_default()
        .iter()
        .filter(|name| name.len() == 8)
        .filter_map(|name| name.parse().ok())
        .collect();
    n.sort_unstable();
    n
}

fn load(storage: &dyn Storage, volume: &str, dir: &Path) -> Vec<Profile> {
    let mut out = Vec::new();
    for n in numbers(storage, dir) {
        let path = dir.join(format!("{n:08}"));
        match read_file(storage, &path) {
            Ok(Some(bytes)) => match Profile::decode(&bytes) {
                Ok(p) => out.push(p),
                Err(e) => {
                    tracing::warn!(volume, path = %path.display(), error = %e, "a stored boot profile is unreadable; it is left out of the plan");
                }
            },
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(volume, path = %path.display(), error = %e, "reading a stored boot profile failed");
            }
        }
    }
    out
}

/// One stored profile, as `ferry origin profiles` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredProfile {
    /// Its number (the file `profiles/NNNNNNNN`), newest highest.
    pub number: u64,
    pub chunks: u64,
    /// Milliseconds from the attach to the last new chunk.
    pub window_ms: u32,
    /// Guest reads of its chunks within the window.
    pub reads: u64,
}

/// A volume's profiles and the plan an attach would get from them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProfileReport {
    pub chunk_size: u32,
    pub profiles: Vec<StoredProfile>,
    /// Files in the directory that do not decode (left out of the plan).
    pub damaged: u64,
    /// The profiles are the parent's (a clone without its own).
    pub from_parent: Option<String>,
    /// The plan at the largest budget: ranges in push order.
    pub plan: Vec<(u64, u32)>,
    pub plan_bytes: u64,
    /// What the plan was made from.
    pub plan_from: PlanSource,
    /// The files the plan pushes, in the order it reaches them first:
    /// (path, size, bytes of it planned).
    pub files: Vec<(String, u64, u64)>,
    /// What of the volume could not be mapped to files.
    pub file_warnings: Vec<String>,
}

/// Where a volume's plan comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PlanSource {
    /// Its boot profiles (or its parent's).
    Profiles,
    /// No profile of its own: what the boots of other volumes of its
    /// size read where it holds the same bytes (hotspots), then the files
    /// a boot reads.
    Hotspots,
    /// No profile yet: the files a boot reads (`prefetch::layout`).
    BootFiles,
    /// Neither: no profile and no filesystem found.
    #[default]
    Nothing,
}

impl PlanSource {
    pub fn as_str(self) -> &'static str {
        match self {
            PlanSource::Profiles => "profiles",
            PlanSource::Hotspots => "hotspots",
            PlanSource::BootFiles => "boot files",
            PlanSource::Nothing => "nothing",
        }
    }
}

impl Origin {
    /// Keeps a profile an edge recorded for `v` (checked: it must decode
    /// and match the volume's size and the chunk size edges cache in),
    /// dropping the oldest beyond [`KEEP`].
    pub async fn store_profile(&self, v: &Volume, data: bytes::Bytes) -> Result<(), Refusal> {
        let profile = Profile::decode(&data).map_err(|e| {
            refusal(
                ErrorCode::Protocol,
                format!("the boot profile is not usable: {e}"),
            )
        })?;
        let chunk = self.config.session.chunk_size;
        if profile.chunk_size != chunk || profile.volume_size != v.size() {
            return Err(refusal(
                ErrorCode::Protocol,
                format!(
                    "the boot profile was recorded for {} bytes in chunks of {}, the volume has \
                     {} in chunks of {chunk}",
                    profile.volume_size,
                    profile.chunk_size,
                    v.size()
                ),
            ));
        }
        let dir = dir_of(v.state_dir());
        let storage = self.storage.clone();
        let taken = numbers(self.storage.as_ref(), &dir);
        let next = taken.last().map_or(1, |n| n + 1);
        let path = dir.join(format!("{next:08}"));
        let stale: Vec<PathBuf> = taken
            .iter()
            .take((taken.len() + 1).saturating_sub(KEEP))
            .map(|n| dir.join(format!("{n:08}")))
            .collect();
        let written = self
            .config
            .file_io
            .run(move || -> std::io::Result<()> {
                storage.create_dir_all(&dir)?;
                replace_file(storage.as_ref(), &path, &data)?;
                for p in stale {
                    storage.remove(&p)?;
                }
                storage.sync_dir(&dir)
            })
            .await;
        written.map_err(|e| {
            tracing::error!(volume = %v.name(), error = %e, "storing a boot profile failed");
            refusal(
                ErrorCode::Io,
                format!("storing the boot profile failed: {e}"),
            )
        })?;
        tracing::info!(volume = %v.name(), profile = next, chunks = profile.touches.len(), "boot profile stored");
        Ok(())
    }

    /// `name`'s stored profiles and the plan they make (for the CLI).
    pub async fn profiles(&self, name: &str) -> Result<ProfileReport, OriginError> {
        let v = self
            .volume(name)
            .ok_or_else(|| OriginError::NoSuchVolume(name.to_owned()))?;
        let storage = self.storage.clone();
        let own = dir_of(v.state_dir());
        let parent = v.clone_of().map(|c| c.parent.clone()).and_then(|p| {
            let dir = dir_of(&v.state_dir().parent()?.join(&p));
            Some((p, dir))
        });
        let (profiles, damaged, from_parent) = self
            .config
            .file_io
            .run(move || {
                let list = |dir: &Path| {
                    let mut found = Vec::new();
                    let mut damaged = 0;
                    for n in numbers(storage.as_ref(), dir) {
                        let bytes = read_file(storage.as_ref(), &dir.join(format!("{n:08}")));
                        match bytes.ok().flatten().map(|b| Profile::decode(&b)) {
                            Some(Ok(p)) => found.push((n, p)),
                            _ => damaged += 1,
                        }
                    }
                    (found, damaged)
                };
                let (found, damaged) = list(&own);
                match parent {
                    Some((p, dir)) if found.is_empty() => {
                        let (found, damaged) = list(&dir);
                        (found, damaged, Some(p))
                    }
                    _ => (found, damaged, None),
                }
            })
            .await;
        let chunk = self.config.session.chunk_size;
        let decoded: Vec<Profile> = profiles.iter().map(|(_, p)| p.clone()).collect();
        let (plan, plan_from) = self.make_plan(&v, &decoded, MAX_PLAN_BYTES).await;
        let volume_files = self.files(&v).await;
        let mut files: Vec<(String, u64, u64)> = Vec::new();
        let mut at: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
        for &(offset, len) in &plan.ranges {
            for (f, bytes) in volume_files.index.files_in(offset, offset + u64::from(len)) {
                let i = *at.entry(f).or_insert_with(|| {
                    let path = volume_files.index.path(f).unwrap_or_default().to_owned();
                    files.push((path, volume_files.index.size(f).unwrap_or(0), 0));
                    files.len() - 1
                });
                files[i].2 += bytes;
            }
        }
        Ok(ProfileReport {
            chunk_size: chunk,
            profiles: profiles
                .iter()
                .map(|(n, p)| StoredProfile {
                    number: *n,
                    chunks: p.touches.len() as u64,
                    window_ms: p.touches.last().map_or(0, |t| t.at_ms),
                    reads: p.touches.iter().map(|t| u64::from(t.count)).sum(),
                })
                .collect(),
            damaged,
            from_parent,
            plan: plan.ranges,
            plan_bytes: plan.bytes,
            plan_from,
            files,
            file_warnings: volume_files.layout.warnings.clone(),
        })
    }

    /// The plan from `profiles` if any fits the volume, else from the
    /// files a boot reads (see [`PlanSource`]).
    async fn make_plan(&self, v: &Volume, profiles: &[Profile], budget: u64) -> (Plan, PlanSource) {
        let chunk = self.config.session.chunk_size;
        let merged = consensus(chunk, v.size(), profiles);
        if merged.ignored > 0 {
            tracing::warn!(volume = %v.name(), ignored = merged.ignored, "boot profiles recorded for another volume size are left out");
        }
        // No boot recorded yet: what other volumes' boots read (where
        // this one holds the same bytes), then the files a boot reads in
        // the order it reads them (prefetch::layout::boot_order's score).
        let (order, from) = if merged.used > 0 {
            (merged.chunks, PlanSource::Profiles)
        } else {
            let mut order = self.hotspots(v, budget.min(MAX_PLAN_BYTES)).await;
            let from = if order.is_empty() {
                PlanSource::BootFiles
            } else {
                PlanSource::Hotspots
            };
            let files = self.files(v).await;
            let mut seen: std::collections::HashSet<u64> = order.iter().copied().collect();
            order.extend(files.boot.chunks.iter().filter(|c| seen.insert(**c)));
            let from = if order.is_empty() {
                PlanSource::Nothing
            } else {
                from
            };
            (order, from)
        };
        let cfg = PlanConfig {
            budget: budget.min(MAX_PLAN_BYTES),
            max_range: self.config.session.push_piece.max(chunk),
        };
        (Plan::new(chunk, v.size(), &order, cfg), from)
    }

    /// Hotspots (the design's FIG. 22) for a volume with no profile of its
    /// own: the chunks the boots of the other volumes of its size read
    /// (the newest profile of each, one vote per volume: a chunk at least
    /// half of them read, in the order of the median of its first-read
    /// times), kept only where this volume holds the same bytes as a
    /// volume that read it (one family: copies or clones of one
    /// template), until `budget` bytes.
    async fn hotspots(&self, v: &Volume, budget: u64) -> Vec<u64> {
        let chunk = self.config.session.chunk_size;
        let others: Vec<Arc<Volume>> = self
            .volumes()
            .into_iter()
            .filter(|o| o.name() != v.name() && o.size() == v.size())
            .collect();
        if others.is_empty() {
            return Vec::new();
        }
        let storage = self.storage.clone();
        let dirs: Vec<(String, PathBuf)> = others
            .iter()
            .map(|o| (o.name().to_owned(), dir_of(o.state_dir())))
            .collect();
        let newest: Vec<(usize, Profile)> = self
            .config
            .file_io
            .run(move || {
                dirs.iter()
                    .enumerate()
                    .filter_map(|(i, (name, dir))| {
                        Some((i, load(storage.as_ref(), name, dir).pop()?))
                    })
                    .collect()
            })
            .await;
        if newest.is_empty() {
            return Vec::new();
        }
        // Which volume read each chunk first, to compare its bytes with.
        let mut reader: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
        for (i, p) in &newest {
            for t in &p.touches {
                reader.entry(t.chunk).or_insert(*i);
            }
        }
        let profiles: Vec<Profile> = newest.into_iter().map(|(_, p)| p).collect();
        let merged = consensus(chunk, v.size(), &profiles);
        let chunk_bytes = u64::from(chunk);
        let mut out = Vec::new();
        for chunk_index in merged.chunks {
            if (out.len() as u64) * chunk_bytes >= budget {
                break;
            }
            let Some(&i) = reader.get(&chunk_index) else {
                continue;
            };
            let offset = chunk_index * chunk_bytes;
            let len =
                usize::try_from(chunk_bytes.min(v.size() - offset)).expect("a chunk fits usize");
            let (mine, theirs) = tokio::join!(
                v.device().read(offset, len),
                others[i].device().read(offset, len)
            );
            if matches!((mine, theirs), (Ok(a), Ok(b)) if a == b) {
                out.push(chunk_index);
            }
        }
        if !out.is_empty() {
            tracing::info!(volume = %v.name(), volumes = profiles.len(), chunks = out.len(), "hotspots from other volumes' boots");
        }
        out
    }

    /// The push plan for `v`, at most `budget` bytes: its profiles (and,
    /// for a clone without any, its parent's) merged.
    pub async fn plan(&self, v: &Volume, budget: u64) -> Result<Vec<(u64, u32)>, Refusal> {
        let storage = self.storage.clone();
        let (name, dir) = (v.name().to_owned(), dir_of(v.state_dir()));
        let parent = v.clone_of().map(|c| c.parent.clone()).and_then(|p| {
            let dir = dir_of(&v.state_dir().parent()?.join(&p));
            Some((p, dir))
        });
        let profiles = self
            .config
            .file_io
            .run(move || {
                let own = load(storage.as_ref(), &name, &dir);
                match parent {
                    Some((p, dir)) if own.is_empty() => load(storage.as_ref(), &p, &dir),
                    _ => own,
                }
            })
            .await;
        let (plan, from) = self.make_plan(v, &profiles, budget).await;
        tracing::info!(volume = %v.name(), from = from.as_str(), ranges = plan.ranges.len(), bytes = plan.bytes, "prefetch plan");
        Ok(plan.ranges)
    }
}

#[cfg(test)]
mod tests {
    use blockcore::storage::mem::MemStorage;
    use blockcore::storage::Storage;
    use prefetch::Touch;

    use super::*;

    fn profile(size: u64, chunks: &[u64]) -> bytes::Bytes {
        let p = Profile {
            chunk_size: 64 << 10,
            volume_size: size,
            touches: chunks
                .iter()
                .enumerate()
                .map(|(i, &chunk)| Touch {
                    chunk,
                    at_ms: u32::try_from(i).unwrap() * 10,
                    count: 1,
                })
                .collect(),
        };
        p.encode().into()
    }

    #[tokio::test]
    async fn a_volume_without_profiles_is_planned_from_the_others_boots_where_its_bytes_match() {
        let storage = MemStorage::default();
        let origin = crate::tests::open(&storage, &["a", "b", "c"]).await;
        let (a, b, c) = (
            origin.volume("a").unwrap(),
            origin.volume("b").unwrap(),
            origin.volume("c").unwrap(),
        );
        let chunk = u64::from(origin.config.session.chunk_size);
        // c's chunk 7 is not what a and b hold there.
        c.device()
            .write(
                7 * chunk,
                bytes::Bytes::from(vec![9u8; 4096]),
                blockcore::WriteFlags::default(),
            )
            .await
            .unwrap();
        origin
            .store_profile(&a, profile(a.size(), &[3, 5, 7]))
            .await
            .unwrap();
        origin
            .store_profile(&b, profile(b.size(), &[3, 5, 7, 9]))
            .await
            .unwrap();
        let plan = origin.plan(&c, 1 << 30).await.unwrap();
        let chunks: Vec<u64> = plan.iter().map(|r| r.0 / chunk).collect();
        assert_eq!(
            chunks,
            [3, 5, 9],
            "in boot order, without the chunk c holds other bytes in"
        );
        let report = origin.profiles("c").await.unwrap();
        assert_eq!(report.plan_from, PlanSource::Hotspots);
        assert!(report.profiles.is_empty());
        // A volume's own profile wins over the others'.
        origin
            .store_profile(&c, profile(c.size(), &[11]))
            .await
            .unwrap();
        let plan = origin.plan(&c, 1 << 30).await.unwrap();
        assert_eq!(plan, [(11 * chunk, u32::try_from(chunk).unwrap())]);
        let report = origin.profiles("a").await.unwrap();
        assert_eq!(report.plan_from, PlanSource::Profiles);
    }

    #[tokio::test]
    async fn profiles_are_checked_kept_four_deep_and_planned_in_boot_order() {
        let storage = MemStorage::default();
        let origin = crate::tests::open(&storage, &["a"]).await;
        let v = origin.volume("a").unwrap();
        assert_eq!(origin.plan(&v, 1 << 30).await.unwrap(), []);

        for bad in [
            bytes::Bytes::from_static(b"not a profile at all, really"),
            profile(v.size() * 2, &[1]),
        ] {
            let r = origin.store_profile(&v, bad).await.unwrap_err();
            assert_eq!(r.code, ErrorCode::Protocol, "{}", r.message);
        }
        // Five boots: the first (chunk 9 first) is dropped, the other four
        // agree that 3 comes before 2; chunk 7 is one boot's accident.
        origin
            .store_profile(&v, profile(v.size(), &[9, 3]))
            .await
            .unwrap();
        for extra in [7, 0, 0, 0] {
            let mut chunks = vec![3, 2];
            if extra != 0 {
                chunks.push(extra);
            }
            origin
                .store_profile(&v, profile(v.size(), &chunks))
                .await
                .unwrap();
        }
        let dir = Path::new("/state/volumes/a/profiles");
        let kept = numbers(&storage, dir);
        assert_eq!(kept, [2, 3, 4, 5]);
        let chunk = 64 << 10;
        assert_eq!(
            origin.plan(&v, 1 << 30).await.unwrap(),
            [(3 * chunk, 64 << 10), (2 * chunk, 64 << 10)]
        );
        // The budget cuts the tail.
        assert_eq!(
            origin.plan(&v, 100_000).await.unwrap(),
            [(3 * chunk, 64 << 10)]
        );
        // A damaged file is left out, with a warning, not an error.
        storage
            .create(&dir.join("00000006"))
            .unwrap()
            .write_all_at(b"garbage", 0)
            .unwrap();
        assert_eq!(origin.plan(&v, 1 << 30).await.unwrap().len(), 2);
        let r = origin.profiles("a").await.unwrap();
        let listed: Vec<(u64, u64)> = r.profiles.iter().map(|p| (p.number, p.chunks)).collect();
        assert_eq!(listed, [(2, 3), (3, 2), (4, 2), (5, 2)]);
        assert_eq!(
            (r.damaged, r.plan_bytes, r.from_parent),
            (1, 2 * chunk, None)
        );
        assert!(matches!(
            origin.profiles("nope").await,
            Err(OriginError::NoSuchVolume(_))
        ));
    }
}
