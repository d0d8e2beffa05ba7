//! Fuzzes the edge-origin link's frame decoder and the scheduler's cutting.
//!
//! Input layout: byte 0 picks the decoder's payload limit (bit 7 set: the
//! default 16 MiB + 4 KiB; clear: `byte << 6`, 0..=8128, so oversized
//! frames are common); byte 1 seeds the chunk sizes; the rest is the peer's
//! byte stream, fed in chunks of 1..=128 bytes.
//!
//! Invariants checked:
//! - `decode` consumes exactly one whole frame (`wire_len` bytes, within
//!   the limit) or nothing, and never holds a whole frame undecoded;
//! - a decoded message passes `validate`, and only data kinds come
//!   compressed;
//! - the encoding is canonical: re-encoding a raw frame gives the same
//!   bytes, and any decoded message re-encodes (raw or compressed) to a
//!   frame that decodes to the same message, never larger when compressed;
//! - queued as background through a scheduler with the smallest cut, every
//!   frame stays under the background frame limit, and the pieces decode
//!   and reassemble to the original message.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use link::proto::{
    Class, CompressOptions, Decoder, Encoder, FrameHeader, Kind, Message, ProtoError, Scheduler,
    SchedulerConfig, WriteEntry, MAX_PAYLOAD_LEN,
};

/// Adjacent data entries whose ranges touch, glued: the scheduler cuts
/// entries, so originals and reassembled pieces compare in this form.
fn glue(entries: impl IntoIterator<Item = WriteEntry>) -> Vec<WriteEntry> {
    let mut out: Vec<WriteEntry> = Vec::new();
    for e in entries {
        if let (
            Some(WriteEntry::Data {
                offset: po,
                data: pd,
            }),
            WriteEntry::Data { offset, data },
        ) = (out.last_mut(), &e)
        {
            if po.checked_add(pd.len() as u64) == Some(*offset) {
                let mut v = pd.to_vec();
                v.extend_from_slice(data);
                *pd = Bytes::from(v);
                continue;
            }
        }
        out.push(e);
    }
    out
}

fn decode_exact(frame: &[u8]) -> (FrameHeader, Message) {
    let mut buf = BytesMut::from(frame);
    let got = Decoder::new()
        .decode(&mut buf)
        .expect("our own frame decodes")
        .expect("our own frame is whole");
    assert!(buf.is_empty(), "frame left {} bytes", buf.len());
    assert_eq!(got.0.wire_len, frame.len());
    got
}

fn check_reencode(h: &FrameHeader, m: &Message, original: &[u8]) {
    let mut raw = BytesMut::new();
    let rh = Encoder::new(CompressOptions::disabled())
        .encode(h.id, h.class, m, &mut raw)
        .expect("a decoded message encodes");
    assert!(!rh.compressed);
    if !h.compressed {
        assert_eq!(&raw[..], original, "raw encoding is not canonical");
    }
    let (h2, m2) = decode_exact(&raw);
    assert_eq!((h2.kind, h2.class, h2.id), (h.kind, h.class, h.id));
    assert_eq!(&m2, m);

    let mut z = BytesMut::new();
    let zh = Encoder::default()
        .encode(h.id, h.class, m, &mut z)
        .expect("a decoded message encodes compressed");
    assert!(z.len() <= raw.len(), "compressed frame larger than raw");
    assert!(!zh.compressed || h.kind.compressible());
    assert_eq!(&decode_exact(&z).1, m);
}

/// Queues `m` as background with the smallest cut and checks the pieces.
fn check_split(id: u64, m: &Message) {
    let mut s = Scheduler::new(SchedulerConfig {
        max_background_data: 0, // clamped up to the minimum
        compress: CompressOptions::disabled(),
    });
    match s.queue(id, Class::Background, m.clone()) {
        Ok(()) => {}
        Err(ProtoError::UnsplittableBatch { .. } | ProtoError::BackgroundFrameTooLarge { .. }) => {
            return;
        }
        Err(e) => panic!("a decoded message failed to queue: {e}"),
    }
    // Credit always goes as demand; anything else must wait for credit.
    let class = if m.kind() == Kind::Credit {
        Class::Demand
    } else {
        assert_eq!(s.poll_transmit(), None, "background sent without credit");
        assert!(s.is_blocked_on_credit());
        Class::Background
    };
    s.on_credit(u64::MAX);
    let max = s.max_background_frame_len();
    let pieces: Vec<Message> = std::iter::from_fn(|| s.poll_transmit())
        .map(|t| {
            assert!(t.frame.len() <= max, "background frame over the cut");
            let (h, piece) = decode_exact(&t.frame);
            assert_eq!((h.id, h.class), (id, class));
            piece
        })
        .collect();
    assert!(s.is_empty());
    match m {
        Message::Push { offset, data, .. } | Message::ReadData { offset, data, .. } => {
            let mut at = *offset;
            let mut all = Vec::new();
            for p in &pieces {
                let (Message::Push { offset, data, .. } | Message::ReadData { offset, data, .. }) = p
                else {
                    panic!("piece of another kind: {p:?}");
                };
                assert_eq!(p.kind(), m.kind());
                assert_eq!(*offset, at);
                at += data.len() as u64;
                all.extend_from_slice(data);
            }
            assert_eq!(&all[..], &data[..]);
        }
        Message::WriteBatch {
            seq,
            part,
            last,
            entries,
        } if pieces.len() > 1 => {
            assert_eq!((*part, *last), (0, true));
            let mut all = Vec::new();
            for (i, p) in pieces.iter().enumerate() {
                let Message::WriteBatch {
                    seq: ps,
                    part: pp,
                    last: pl,
                    entries: pe,
                } = p
                else {
                    panic!("piece of another kind: {p:?}");
                };
                assert_eq!((*ps, *pp as usize, *pl), (*seq, i, i + 1 == pieces.len()));
                all.extend(pe.iter().cloned());
            }
            assert_eq!(glue(all), glue(entries.iter().cloned()));
        }
        other => assert_eq!(pieces, [other.clone()]),
    }
}

fuzz_target!(|data: &[u8]| {
    let [limit, seed, stream @ ..] = data else {
        return;
    };
    let max_payload = if limit & 0x80 != 0 {
        MAX_PAYLOAD_LEN
    } else {
        usize::from(*limit) << 6
    };
    let mut dec = Decoder::with_max_payload(max_payload);
    let mut rng = u32::from(*seed) | 0x100;
    let mut stream = stream;
    let mut buf = BytesMut::new();
    while !stream.is_empty() {
        rng ^= rng << 13;
        rng ^= rng >> 17;
        rng ^= rng << 5;
        let n = (rng as usize % 128 + 1).min(stream.len());
        let (chunk, tail) = stream.split_at(n);
        stream = tail;
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.clone();
            match dec.decode(&mut buf) {
                Ok(Some((h, m))) => {
                    assert!(h.wire_len <= dec.max_frame_len());
                    assert_eq!(buf.len() + h.wire_len, before.len());
                    assert_eq!(&buf[..], &before[h.wire_len..]);
                    assert_eq!(h.kind, m.kind());
                    assert!(!h.compressed || h.kind.compressible());
                    m.validate().expect("decoded messages are valid");
                    check_reencode(&h, &m, &before[..h.wire_len]);
                    check_split(h.id, &m);
                }
                Ok(None) => {
                    assert_eq!(buf, before, "incomplete input was changed");
                    assert!(buf.len() < dec.max_frame_len());
                    break;
                }
                Err(_) => return,
            }
        }
    }
});
