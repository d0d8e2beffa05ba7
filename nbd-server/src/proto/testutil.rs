//! Client-side helpers for the protocol tests: build what a client sends,
//! parse what the server answers.

use blockcore::{BlockSizes, Capabilities, DeviceInfo};
use bytes::{BufMut, BytesMut};

use super::consts::{IHAVEOPT, OPTION_REPLY_MAGIC};
use super::handshake::{ExportCatalog, ExportInfo};

pub(crate) const ALL_CAPS: Capabilities = Capabilities::ALL;

pub(crate) fn device(size: u64, min: u32, caps: Capabilities) -> DeviceInfo {
    DeviceInfo {
        size,
        block_sizes: BlockSizes {
            min,
            preferred: 4096,
            max: 32 * 1024 * 1024,
        },
        caps,
    }
}

pub(crate) fn export(name: &str, device: DeviceInfo) -> ExportInfo {
    ExportInfo {
        name: name.to_owned(),
        description: format!("the {name} export"),
        device,
    }
}

/// Exports: "disk" (default, 1 MiB, byte-addressable), "ro" (read-only),
/// "aligned" (512-byte minimum block).
#[derive(Debug, Clone)]
pub(crate) struct TestCatalog(pub Vec<ExportInfo>);

impl TestCatalog {
    pub(crate) fn standard() -> Self {
        TestCatalog(vec![
            export("disk", device(1 << 20, 1, ALL_CAPS)),
            export(
                "ro",
                device(
                    1 << 20,
                    1,
                    Capabilities {
                        read_only: true,
                        ..ALL_CAPS
                    },
                ),
            ),
            export("aligned", device(1 << 20, 512, ALL_CAPS)),
        ])
    }
}

impl ExportCatalog for TestCatalog {
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

/// The client's 4-byte flags.
pub(crate) fn client_flags(flags: u32) -> Vec<u8> {
    flags.to_be_bytes().to_vec()
}

/// One option frame: IHAVEOPT, option, length, data.
pub(crate) fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = BytesMut::new();
    v.put_u64(IHAVEOPT);
    v.put_u32(option);
    v.put_u32(u32::try_from(data.len()).unwrap());
    v.put_slice(data);
    v.to_vec()
}

/// INFO / GO data.
pub(crate) fn info_data(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut v = BytesMut::new();
    v.put_u32(u32::try_from(name.len()).unwrap());
    v.put_slice(name.as_bytes());
    v.put_u16(u16::try_from(requests.len()).unwrap());
    for r in requests {
        v.put_u16(*r);
    }
    v.to_vec()
}

/// LIST_META_CONTEXT / SET_META_CONTEXT data.
pub(crate) fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = BytesMut::new();
    v.put_u32(u32::try_from(name.len()).unwrap());
    v.put_slice(name.as_bytes());
    v.put_u32(u32::try_from(queries.len()).unwrap());
    for q in queries {
        v.put_u32(u32::try_from(q.len()).unwrap());
        v.put_slice(q.as_bytes());
    }
    v.to_vec()
}

/// One option reply as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reply {
    pub option: u32,
    pub ty: u32,
    pub data: Vec<u8>,
}

/// Splits `bytes` into option replies; panics (failing the test) on
/// anything that is not a well-formed reply. Returns the replies and the
/// bytes that were left (e.g. an EXPORT_NAME answer).
pub(crate) fn parse_replies(mut bytes: &[u8]) -> (Vec<Reply>, Vec<u8>) {
    let mut out = Vec::new();
    while bytes.len() >= 20 && bytes[..8] == OPTION_REPLY_MAGIC.to_be_bytes() {
        let option = u32::from_be_bytes(bytes[8..12].try_into().unwrap());
        let ty = u32::from_be_bytes(bytes[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(bytes[16..20].try_into().unwrap()) as usize;
        assert!(bytes.len() >= 20 + len, "truncated reply");
        out.push(Reply {
            option,
            ty,
            data: bytes[20..20 + len].to_vec(),
        });
        bytes = &bytes[20 + len..];
    }
    (out, bytes.to_vec())
}
