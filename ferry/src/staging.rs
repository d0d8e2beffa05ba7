//! `ferry staging-image`: a small boot disk that starts a VM with no disk
//! of its own and hands it to an edge's iSCSI target (the design's staging
//! image, 2.7).
//!
//! The disk is SYSLINUX on a FAT partition, loading iPXE (Debian's prebuilt
//! `ipxe.lkrn`) as a kernel with our script as its initrd, which iPXE runs:
//! DHCP on the VM's NIC, then `sanboot` of the volume's target. iPXE reads
//! the volume through INT 13h for the boot loader, and leaves an iBFT (the
//! firmware's iSCSI table) from which the guest's initramfs logs in to the
//! same target for its root filesystem (Debian: open-iscsi, `ISCSI_AUTO`).
//! Nothing of the volume is on the staging disk, so one disk boots any
//! number of VMs, each from its own volume given at build time.
//!
//! The script is built here (pure, checked); the disk is assembled with
//! `mkfs.vfat`, `mcopy` and `syslinux` (dosfstools, mtools, syslinux),
//! which write into files without mounting anything.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use crate::config::{IscsiSettings, IQN_PREFIX};

/// `ferry staging-image VOLUME --portal ADDR --out FILE`.
#[derive(clap::Args, Debug)]
pub struct StagingArgs {
    /// The edge's volume to boot (its target is
    /// `iqn.2026-11.dev.ferry:VOLUME`, as the edge names it).
    pub volume: String,
    /// The edge's iSCSI portal as the VM reaches it, HOST:PORT (with qemu's
    /// user-mode network, 10.0.2.2 is the host's loopback).
    #[arg(long, value_name = "HOST:PORT")]
    pub portal: String,
    /// Where to write the disk image (raw, 8 MiB; replaced if it exists).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// The target name, if not the edge's default for VOLUME.
    #[arg(long, value_name = "IQN")]
    pub iqn: Option<String>,
    /// The LUN to boot.
    #[arg(long, default_value_t = 0)]
    pub lun: u32,
    /// The initiator name iPXE and the guest log in with (the edge's
    /// `allowed_initiators` may ask for one); default
    /// `iqn.2026-11.dev.ferry.staging:VOLUME`.
    #[arg(long, value_name = "IQN")]
    pub initiator: Option<String>,
    /// One-way CHAP: the name the initiator presents, with
    /// --chap-secret-file. The secret is written into the image, which is
    /// then created readable by its owner only.
    #[arg(long, value_name = "NAME", requires = "chap_secret_file")]
    pub chap_user: Option<String>,
    #[arg(long, value_name = "FILE", requires = "chap_user")]
    pub chap_secret_file: Option<PathBuf>,
    /// Mutual CHAP: the name and secret the target must answer with.
    #[arg(long, value_name = "NAME", requires_all = ["mutual_secret_file", "chap_user"])]
    pub mutual_user: Option<String>,
    #[arg(long, value_name = "FILE", requires = "mutual_user")]
    pub mutual_secret_file: Option<PathBuf>,
    /// iPXE as a Linux kernel image (default: Debian's, from the `ipxe`
    /// package).
    #[arg(long, value_name = "FILE")]
    pub ipxe: Option<PathBuf>,
}

/// What the staging disk boots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Staging {
    /// HOST:PORT.
    pub portal: String,
    pub iqn: String,
    pub lun: u32,
    pub initiator: String,
    /// (name, secret), one-way then mutual.
    pub chap: Option<(String, String)>,
    pub mutual: Option<(String, String)>,
}

/// A word iPXE's script parser takes as it is: no whitespace, no settings
/// expansion (`$`), no quoting or comment characters, printable ASCII.
fn check_word(what: &str, s: &str) -> anyhow::Result<()> {
    if s.is_empty() {
        bail!("{what} is empty");
    }
    if let Some(c) = s
        .chars()
        .find(|c| !c.is_ascii_graphic() || matches!(c, '$' | '"' | '\'' | '\\' | '#' | '|' | '&'))
    {
        bail!("{what} {s:?} holds {c:?}, which an iPXE script cannot carry as it is");
    }
    Ok(())
}

impl Staging {
    /// The iPXE script: DHCP, then sanboot, retried every 5 s (the edge
    /// may not be up yet, or the volume not added: a boot stage waits for
    /// its disk rather than falling through to nothing).
    pub fn ipxe_script(&self) -> anyhow::Result<String> {
        let (host, port) = split_portal(&self.portal)?;
        check_word("the target name", &self.iqn)?;
        check_word("the initiator name", &self.initiator)?;
        // iscsi:<server>:<protocol>:<port>:<lun>:<target> (IPv6 in brackets).
        let server = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        let mut auth = String::new();
        for (which, names) in [("", &self.chap), ("reverse-", &self.mutual)] {
            if let Some((user, secret)) = names {
                check_word("a CHAP name", user)?;
                check_word("a CHAP secret", secret)?;
                // Writing to a String cannot fail.
                let _ = write!(
                    auth,
                    "set {which}username {user}\nset {which}password {secret}\n"
                );
            }
        }
        let s = format!(
            "#!ipxe\n\
             echo ferry staging: booting {iqn} LUN {lun} from {portal}\n\
             set initiator-iqn {initiator}\n\
             {auth}\
             :retry\n\
             dhcp || goto wait\n\
             sanboot iscsi:{server}::{port}:{lun}:{iqn} || goto wait\n\
             :wait\n\
             echo ferry staging: no boot from {portal} yet, retrying in 5 s\n\
             sleep 5\n\
             goto retry\n",
            iqn = self.iqn,
            lun = self.lun,
            portal = self.portal,
            initiator = self.initiator,
        );
        Ok(s)
    }
}

fn split_portal(portal: &str) -> anyhow::Result<(&str, u16)> {
    let (host, port) = portal
        .rsplit_once(':')
        .with_context(|| format!("portal {portal:?}: expected HOST:PORT"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port
        .parse()
        .with_context(|| format!("portal {portal:?}: bad port"))?;
    check_word("the portal's host", host)?;
    if port == 0 {
        bail!("portal {portal:?}: port 0");
    }
    Ok((host, port))
}

fn secret(path: &Path) -> anyhow::Result<String> {
    let raw = IscsiSettings::read_secret(path)?;
    String::from_utf8(raw).with_context(|| {
        format!(
            "CHAP secret {}: an iPXE script carries text only",
            path.display()
        )
    })
}

/// Where Debian's `ipxe` package puts iPXE as a Linux kernel.
const IPXE_PATHS: &[&str] = &["/usr/lib/ipxe/ipxe.lkrn", "/boot/ipxe.lkrn"];
/// SYSLINUX's MBR boot code (`syslinux-common`).
const MBR_BIN: &str = "/usr/lib/syslinux/mbr/mbr.bin";

const SECTOR: u64 = 512;
/// The FAT partition: from 1 MiB, 7 MiB long (iPXE is about 350 KiB).
const PART_START: u64 = 1 << 20;
const PART_LEN: u64 = 7 << 20;

/// An MBR partition table with one bootable FAT partition of `len`
/// bytes at `start` (LBA addressing; CHS fields saturated, as for any
/// disk past the CHS limit).
fn partition_table(start: u64, len: u64) -> [u8; 66] {
    let mut t = [0u8; 66];
    let entry = &mut t[..16];
    entry[0] = 0x80;
    entry[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
    // FAT12 (type 1): what mkfs.vfat writes for a partition this small.
    entry[4] = 0x01;
    entry[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    let lba = u32::try_from(start / SECTOR).expect("a small disk");
    let sectors = u32::try_from(len / SECTOR).expect("a small disk");
    entry[8..12].copy_from_slice(&lba.to_le_bytes());
    entry[12..16].copy_from_slice(&sectors.to_le_bytes());
    t[64] = 0x55;
    t[65] = 0xaa;
    t
}

fn tool(cmd: &mut Command) -> anyhow::Result<()> {
    let name = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.output().with_context(|| {
        format!("running {name} (install dosfstools, mtools, syslinux and ipxe)")
    })?;
    if !out.status.success() {
        bail!(
            "{name} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Writes the staging disk for `staging` to `out`, with iPXE from `ipxe`.
pub fn write_image(staging: &Staging, ipxe: &Path, out: &Path) -> anyhow::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let script = staging.ipxe_script()?;
    let mbr = std::fs::read(MBR_BIN)
        .with_context(|| format!("reading {MBR_BIN} (install syslinux-common)"))?;
    if mbr.len() < 440 {
        bail!("{MBR_BIN}: {} bytes, not a boot sector", mbr.len());
    }
    let dir = tempfile::tempdir().context("a temporary directory")?;
    let part = dir.path().join("boot.part");
    let cfg = dir.path().join("syslinux.cfg");
    let script_file = dir.path().join("ferry.ipxe");
    std::fs::write(
        &cfg,
        "SERIAL 0 115200\nDEFAULT ipxe\nPROMPT 0\nTIMEOUT 0\n\
         LABEL ipxe\n  KERNEL /ipxe.lkrn\n  INITRD /ferry.ipxe\n",
    )?;
    std::fs::write(&script_file, script)?;
    tool(
        Command::new("mkfs.vfat")
            .args(["-F", "12", "-n", "FERRYSTAGE", "-C"])
            .arg(&part)
            .arg((PART_LEN / 1024).to_string()),
    )?;
    let lkrn = dir.path().join("ipxe.lkrn");
    std::fs::copy(ipxe, &lkrn).with_context(|| format!("reading {}", ipxe.display()))?;
    tool(
        Command::new("mcopy")
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(&part)
            .args([&lkrn, &script_file, &cfg])
            .arg("::/"),
    )?;
    tool(Command::new("syslinux").arg("--install").arg(&part))?;

    let tmp = out.with_extension("tmp");
    let mut disk = {
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create(true).truncate(true);
        #[cfg(unix)]
        if staging.chap.is_some() {
            use std::os::unix::fs::OpenOptionsExt;
            o.mode(0o600);
        }
        o.open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?
    };
    disk.set_len(PART_START + PART_LEN)?;
    disk.write_all(&mbr[..440])?;
    disk.seek(SeekFrom::Start(446))?;
    disk.write_all(&partition_table(PART_START, PART_LEN))?;
    disk.seek(SeekFrom::Start(PART_START))?;
    disk.write_all(&std::fs::read(&part)?)?;
    disk.sync_all()?;
    drop(disk);
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// `ferry staging-image`.
pub fn run(a: &StagingArgs) -> anyhow::Result<()> {
    let staging = Staging {
        portal: a.portal.clone(),
        iqn: a
            .iqn
            .clone()
            .unwrap_or_else(|| format!("{IQN_PREFIX}:{}", a.volume)),
        lun: a.lun,
        initiator: a
            .initiator
            .clone()
            .unwrap_or_else(|| format!("{IQN_PREFIX}.staging:{}", a.volume)),
        chap: match (&a.chap_user, &a.chap_secret_file) {
            (Some(u), Some(f)) => Some((u.clone(), secret(f)?)),
            _ => None,
        },
        mutual: match (&a.mutual_user, &a.mutual_secret_file) {
            (Some(u), Some(f)) => Some((u.clone(), secret(f)?)),
            _ => None,
        },
    };
    let ipxe = match &a.ipxe {
        Some(p) => p.clone(),
        None => IPXE_PATHS
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .context("no iPXE kernel image: install the ipxe package or give --ipxe FILE")?,
    };
    write_image(&staging, &ipxe, &a.out)?;
    println!(
        "wrote {}: boots {} LUN {} from {} (a VM with only a NIC and this disk)",
        a.out.display(),
        staging.iqn,
        staging.lun,
        staging.portal
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staging() -> Staging {
        Staging {
            portal: "10.0.2.2:3260".into(),
            iqn: "iqn.2026-11.dev.ferry:debian".into(),
            lun: 0,
            initiator: "iqn.2026-11.dev.ferry.staging:debian".into(),
            chap: None,
            mutual: None,
        }
    }

    #[test]
    fn the_script_sanboots_the_target_and_retries() {
        let s = staging().ipxe_script().unwrap();
        assert!(s.starts_with("#!ipxe\n"), "{s}");
        assert!(
            s.contains(
                "sanboot iscsi:10.0.2.2::3260:0:iqn.2026-11.dev.ferry:debian || goto wait\n"
            ),
            "{s}"
        );
        assert!(s.contains("set initiator-iqn iqn.2026-11.dev.ferry.staging:debian\n"));
        assert!(s.contains("goto retry\n"));
        assert!(!s.contains("username"), "no CHAP unless asked: {s}");
    }

    #[test]
    fn chap_goes_into_the_script_and_bad_words_are_refused() {
        let mut st = staging();
        st.chap = Some(("web".into(), "s3cret-s3cret".into()));
        st.mutual = Some(("ferry".into(), "an0ther-secret".into()));
        let s = st.ipxe_script().unwrap();
        assert!(
            s.contains("set username web\nset password s3cret-s3cret\n"),
            "{s}"
        );
        assert!(s.contains("set reverse-username ferry\nset reverse-password an0ther-secret\n"));

        st.chap = Some(("web".into(), "with space".into()));
        assert!(st.ipxe_script().is_err());
        st.chap = Some(("web".into(), "${net0/ip}".into()));
        assert!(st.ipxe_script().is_err());
        let mut st = staging();
        st.iqn = "iqn.x\nshell".into();
        assert!(st.ipxe_script().is_err());
        st = staging();
        st.portal = "10.0.2.2".into();
        assert!(st.ipxe_script().is_err());
        st.portal = "10.0.2.2:0".into();
        assert!(st.ipxe_script().is_err());
        st.portal = "[fd00::2]:3260".into();
        assert!(st
            .ipxe_script()
            .unwrap()
            .contains("sanboot iscsi:[fd00::2]::3260:0:"));
    }

    #[test]
    fn the_partition_table_has_one_bootable_partition() {
        let t = partition_table(PART_START, PART_LEN);
        assert_eq!(t[0], 0x80);
        assert_eq!(t[4], 0x01);
        assert_eq!(u32::from_le_bytes(t[8..12].try_into().unwrap()), 2048);
        assert_eq!(
            u32::from_le_bytes(t[12..16].try_into().unwrap()),
            u32::try_from(PART_LEN / 512).unwrap()
        );
        assert!(t[16..64].iter().all(|&b| b == 0));
        assert_eq!(t[64..], [0x55, 0xaa]);
    }
}
