//! Fuzzes the NBD request decoder and request validation.
//!
//! Input layout: bytes 0-1 give the decoder's maximum payload (0..=4095,
//! small so oversized writes are common); byte 2 picks the negotiated
//! state (structured replies, meta context, read-only, minimum block size);
//! byte 3 seeds the chunk sizes; the rest is the client's byte stream, fed
//! in chunks of 1..=128 bytes.
//!
//! Invariants checked:
//! - a decoded write carries exactly `length` payload bytes, anything else
//!   none; oversized writes really are over the maximum;
//! - decoding never consumes more than given, and the buffer never holds a
//!   whole undecoded request (header + max payload) while waiting;
//! - `validate` never panics, and accepts no range beyond the export.
#![no_main]

use blockcore::{BlockSizes, Capabilities, DeviceInfo};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use nbd_server::proto::{
    transmission_flags, validate, Command, Decoded, ExportInfo, Negotiated, RequestDecoder,
    RequestHeader, BASE_ALLOCATION_ID,
};

fn negotiated(config: u8) -> Negotiated {
    let structured = config & 1 != 0;
    let meta = config & 2 != 0;
    let read_only = config & 4 != 0;
    let min = 1u32 << ((config >> 3) % 13);
    let export = ExportInfo {
        name: "fuzz".to_owned(),
        description: String::new(),
        device: DeviceInfo {
            size: 1 << 30,
            block_sizes: BlockSizes {
                min,
                preferred: min.max(4096),
                max: 1 << 20,
            },
            caps: Capabilities {
                read_only,
                flush: true,
                fua: config & 0x80 != 0,
                trim: true,
                write_zeroes: true,
                fast_zero: false,
                extents: true,
                prefetch: false,
                multi_conn: false,
            },
        },
    };
    let transmission_flags = transmission_flags(&export, structured);
    Negotiated {
        export,
        structured_replies: structured,
        base_allocation: (structured && meta).then_some(BASE_ALLOCATION_ID),
        transmission_flags,
    }
}

fn check_validate(header: &RequestHeader, n: &Negotiated) {
    if validate(header, n).is_ok() && !matches!(header.command, Command::Disc | Command::Flush) {
        let end = header.offset.checked_add(u64::from(header.length));
        assert!(end.is_some_and(|e| e <= n.export.device.size));
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let max_payload = u32::from(u16::from_be_bytes([data[0], data[1]])) % 4096;
    let n = negotiated(data[2]);
    let mut rng = u32::from(data[3]) | 0x100;
    let mut stream = &data[4..];

    let mut dec = RequestDecoder::new(max_payload);
    let mut buf = BytesMut::new();
    while !stream.is_empty() {
        rng ^= rng << 13;
        rng ^= rng >> 17;
        rng ^= rng << 5;
        let k = (rng as usize % 128 + 1).min(stream.len());
        let (chunk, tail) = stream.split_at(k);
        stream = tail;
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.len();
            match dec.decode(&mut buf) {
                Ok(Some(Decoded::Request { header, payload })) => {
                    assert!(buf.len() < before);
                    if header.command == Command::Write {
                        assert_eq!(payload.len(), header.length as usize);
                        assert!(header.length <= max_payload);
                    } else {
                        assert!(payload.is_empty());
                    }
                    check_validate(&header, &n);
                }
                Ok(Some(Decoded::Oversized { header })) => {
                    assert!(buf.len() < before);
                    assert_eq!(header.command, Command::Write);
                    assert!(header.length > max_payload);
                    check_validate(&header, &n);
                }
                Ok(None) => {
                    assert!(buf.len() <= before);
                    if dec.is_skipping() {
                        assert!(buf.is_empty());
                    } else {
                        assert!(buf.len() < dec.max_frame_len());
                    }
                    break;
                }
                Err(_) => return,
            }
        }
    }
});
