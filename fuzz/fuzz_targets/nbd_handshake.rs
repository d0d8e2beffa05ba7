//! Fuzzes the NBD handshake state machine.
//!
//! Input layout: byte 0 picks the TLS mode (bits 0-1) and whether valid
//! client flags are prepended (bit 2, so the fuzzer reaches option parsing
//! without having to guess them); byte 1 seeds the chunk sizes; the rest is
//! the client's byte stream, fed in chunks of 1..=64 bytes.
//!
//! Invariants checked:
//! - `advance` never consumes more than it was given;
//! - the server's output is the 18-byte greeting followed only by
//!   well-formed option replies (magic 0x3e889045565a9, consistent length),
//!   except for the 10- or 134-byte answer to a successful EXPORT_NAME;
//! - transmission is only ever entered for an export of the catalog.
#![no_main]

use blockcore::{BlockSizes, Capabilities, DeviceInfo};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use nbd_server::proto::consts::{GREETING_LEN, OPTION_REPLY_MAGIC};
use nbd_server::proto::{ExportCatalog, ExportInfo, Handshake, Step, TlsMode};

struct Catalog(Vec<ExportInfo>);

impl ExportCatalog for Catalog {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        if name.is_empty() {
            return self.0.first().cloned();
        }
        self.0.iter().find(|e| e.name == name).cloned()
    }
    fn list(&self) -> Vec<ExportInfo> {
        self.0.clone()
    }
}

fn catalog() -> Catalog {
    let caps = Capabilities {
        read_only: false,
        flush: true,
        fua: false,
        trim: true,
        write_zeroes: true,
        fast_zero: false,
        extents: true,
        prefetch: false,
        multi_conn: true,
    };
    let export = |name: &str, min: u32, read_only: bool| ExportInfo {
        name: name.to_owned(),
        description: format!("fuzz export {name}"),
        device: DeviceInfo {
            size: 1 << 30,
            block_sizes: BlockSizes {
                min,
                ..BlockSizes::DEFAULT
            },
            caps: Capabilities { read_only, ..caps },
        },
    };
    Catalog(vec![
        export("a", 1, false),
        export("b", 512, false),
        export("ro", 1, true),
    ])
}

/// Checks that `out` is a run of complete option replies, optionally
/// followed by an EXPORT_NAME answer (only allowed when `export_name_ok`).
fn check_replies(mut out: &[u8], export_name_ok: bool) {
    while !out.is_empty() {
        if out.len() >= 20 && out[..8] == OPTION_REPLY_MAGIC.to_be_bytes() {
            let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
            assert!(out.len() >= 20 + len, "truncated option reply");
            out = &out[20 + len..];
        } else {
            assert!(
                export_name_ok && (out.len() == 10 || out.len() == 134),
                "output is not an option reply: {out:02x?}"
            );
            return;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&config, rest)) = data.split_first() else {
        return;
    };
    let Some((&seed, stream)) = rest.split_first() else {
        return;
    };
    let tls = match config & 3 {
        0 => TlsMode::Off,
        1 => TlsMode::On,
        _ => TlsMode::Require,
    };
    let catalog = catalog();
    let mut out = BytesMut::new();
    let mut hs = Handshake::new(tls, &mut out);
    assert_eq!(out.len(), GREETING_LEN);
    out.clear();

    let mut input = BytesMut::new();
    if config & 4 != 0 {
        input.extend_from_slice(&3u32.to_be_bytes());
    }
    let mut rng = u32::from(seed) | 0x100;
    let mut stream = stream;
    loop {
        // xorshift: cheap, deterministic chunk sizes.
        rng ^= rng << 13;
        rng ^= rng >> 17;
        rng ^= rng << 5;
        let n = (rng as usize % 64 + 1).min(stream.len());
        let (chunk, tail) = stream.split_at(n);
        stream = tail;
        input.extend_from_slice(chunk);
        let before = input.len();
        let step = hs.advance(&mut input, &catalog, &mut out);
        assert!(input.len() <= before, "consumed more than given");
        match step {
            Ok(Step::NeedInput) => check_replies(&out, false),
            Ok(Step::StartTls) => {
                check_replies(&out, false);
                hs.tls_started();
            }
            Ok(Step::Transmission(n)) => {
                check_replies(&out, true);
                let found = catalog
                    .lookup(&n.export.name)
                    .expect("export not in catalog");
                assert_eq!(found.device, n.export.device);
                assert!(n.base_allocation.is_none() || n.structured_replies);
                return;
            }
            Ok(Step::Closed) | Err(_) => {
                check_replies(&out, false);
                return;
            }
        }
        out.clear();
        if stream.is_empty() {
            return;
        }
    }
});
