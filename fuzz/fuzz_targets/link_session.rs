//! Fuzzes both ends of the link's session with a hostile peer: the input
//! is the peer's byte stream, cut into chunks, interleaved with time
//! passing and with the origin's storage completing (or failing) what the
//! session asked for.
//!
//! Input layout: byte 0 picks the end (bit 0: origin or edge) and whether
//! a pre-shared key is set (bit 1); byte 1 seeds chunk sizes; the rest is
//! the peer's stream. Well-formed frames are likely only by luck, so the
//! target also prepends, half of the time, a valid handshake from the
//! peer (Hello, then Attach or Attached) so the fuzzer reaches the
//! attached states.
//!
//! Invariants checked:
//! - nothing panics, and every frame the session writes decodes;
//! - the origin asks for at most one apply at a time, only for batches it
//!   received whole, and only reads and allocation queries inside the
//!   volume it granted (queries never empty);
//! - the edge completes only requests it was given, each once, a
//!   completed read has exactly the length asked for, and an allocation
//!   map is contiguous from the asked offset, non-empty and within the
//!   asked range;
//! - once closed, the origin asks for nothing more.
#![no_main]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use blockcore::{Extent, ExtentKind};
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use link::proto::{Class, Decoder, Disposition, Encoder, Message, Role, PROTOCOL_VERSION};
use link::session::{
    AttachGrant, EdgeEvent, EdgeSession, EdgeSessionConfig, OriginOp, OriginSession,
    OriginSessionConfig, ReadAnswer, ReadReply, Refusal,
};

const SIZE: u64 = 1 << 20;

fn frame(id: u64, msg: &Message) -> Vec<u8> {
    let mut out = BytesMut::new();
    Encoder::default()
        .encode(id, Class::Demand, msg, &mut out)
        .expect("a valid message");
    out.to_vec()
}

/// Checks that `bytes` (all the session wrote) is a sequence of frames.
fn check_output(dec: &mut Decoder, buf: &mut BytesMut, bytes: &[u8]) {
    buf.extend_from_slice(bytes);
    while let Some((_, msg)) = dec.decode(buf).expect("the session writes valid frames") {
        msg.validate().expect("and valid messages");
    }
}

fn origin(data: &[u8], chunk_seed: u8, psk: Option<[u8; 32]>) {
    let t0 = Instant::now();
    let mut now = t0;
    let cfg = OriginSessionConfig {
        psk,
        ..OriginSessionConfig::default()
    };
    let mut s = OriginSession::new(cfg, now, [1; 32]);
    let (mut dec, mut out) = (Decoder::new(), BytesMut::new());
    let mut granted = false;
    let mut applying: Option<u64> = None;
    let mut reads: Vec<(u64, u32)> = Vec::new();
    let mut queries: Vec<(u64, u64, u64)> = Vec::new();
    let mut releasing = false;
    let mut closed = false;
    let mut pos = 0;
    let mut step = u64::from(chunk_seed);
    while pos < data.len() {
        step = step.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let n = 1 + (step >> 33) as usize % 128;
        let end = (pos + n).min(data.len());
        s.handle_input(&data[pos..end], now);
        pos = end;
        now += Duration::from_millis((step >> 40) % 50);
        s.handle_timeout(now);
        while let Some(op) = s.poll_op() {
            assert!(!closed, "an operation after Close: {op:?}");
            match op {
                OriginOp::Attach { .. } => {
                    granted = step & 1 == 0;
                    s.attach_done(if granted {
                        Ok(AttachGrant {
                            size: SIZE,
                            cache_key: [2; 32],
                            dedup_key: [3; 32],
                            volume_epoch: 9,
                            next_seq: 1,
                            resume: None,
                            local_writes: step & 2 == 0,
                        })
                    } else {
                        Err(Refusal::new(link::proto::ErrorCode::VolumeBusy, "busy"))
                    });
                }
                OriginOp::Read { tag, offset, len, .. } => {
                    assert!(granted, "a read before the volume was granted");
                    assert!(offset + u64::from(len) <= SIZE, "read outside the volume");
                    reads.push((tag, len));
                }
                OriginOp::Apply { seq, .. } => {
                    assert!(applying.is_none(), "two applies at once");
                    applying = Some(seq);
                }
                OriginOp::Extents { tag, offset, len } => {
                    assert!(granted, "an allocation query before the volume was granted");
                    assert!(len > 0, "an empty allocation query");
                    assert!(offset + len <= SIZE, "allocation query outside the volume");
                    queries.push((tag, offset, len));
                }
                OriginOp::Sign { tag, offset, len, block } => {
                    assert!(granted, "a signature query before the volume was granted");
                    assert!(len > 0 && block >= 512, "a degenerate signature query");
                    assert!(offset + u64::from(len) <= SIZE, "signature query outside the volume");
                    // Sometimes the wrong count: answered as a storage failure.
                    let n = u64::from(len).div_ceil(u64::from(block)) + (step >> 50) % 2;
                    s.sign_done(tag, Ok(vec![[9; 32]; n as usize]));
                }
                OriginOp::StoreProfile { tag, data } => {
                    assert!(granted, "a profile before the volume was granted");
                    assert!(!data.is_empty(), "an empty profile");
                    s.profile_done(tag, Ok(()));
                }
                OriginOp::Plan { tag, .. } => {
                    assert!(granted, "a plan before the volume was granted");
                    // Sometimes ranges past the end: the session clips them.
                    s.plan_done(tag, Ok(vec![(0, 4096), (SIZE - 100, 4096)]));
                }
                OriginOp::Detach => s.detach_done(),
                OriginOp::Release { .. } => releasing = true,
                OriginOp::Close { .. } => closed = true,
            }
        }
        // Answer allocation queries as a device might, sometimes badly
        // (a gap, an extent past the range, nothing at all).
        if step & 16 != 0 {
            if let Some((tag, offset, len)) = queries.pop() {
                let half = (len / 2).max(1);
                let kinds = [ExtentKind::Data, ExtentKind::Hole, ExtentKind::Zero];
                let kind = kinds[(step >> 8) as usize % 3];
                let extents = match (step >> 12) % 5 {
                    0 => Vec::new(),
                    1 => vec![Extent { offset: offset + 1, len, kind }],
                    2 => vec![Extent { offset, len: len + 4096, kind }],
                    _ => vec![
                        Extent { offset, len: half, kind },
                        Extent { offset: offset + half, len: len - half, kind: ExtentKind::Data },
                    ],
                };
                s.extents_done(tag, Ok(extents));
            }
        }
        if releasing && step & 32 != 0 {
            releasing = false;
            s.release_done(if step & 64 != 0 {
                Ok(())
            } else {
                Err(Refusal::new(link::proto::ErrorCode::Migrated, "migrated"))
            });
        }
        // Complete some storage work, in a data-dependent order.
        if step & 2 != 0 {
            if let Some((tag, len)) = reads.pop() {
                let data = Bytes::from(vec![0x5a; len as usize]);
                s.read_done(tag, Ok(ReadAnswer::Data { as_of: 0, data }));
            }
        }
        if step & 4 != 0 {
            if let Some(seq) = applying.take() {
                let r = if step & 8 != 0 {
                    Ok(())
                } else {
                    Err(Refusal::new(link::proto::ErrorCode::Io, "disk"))
                };
                s.apply_done(seq, r);
            }
        }
        while let Some(f) = s.poll_transmit(now) {
            check_output(&mut dec, &mut out, &f);
        }
    }
}

fn edge(data: &[u8], chunk_seed: u8, psk: Option<[u8; 32]>) {
    let mut now = Instant::now();
    let mut cfg = EdgeSessionConfig::new("vol", "edge-1");
    cfg.psk = psk;
    let mut s = EdgeSession::new(cfg, now);
    let (mut dec, mut out) = (Decoder::new(), BytesMut::new());
    let mut asked: BTreeSet<u64> = BTreeSet::new();
    let mut lens = std::collections::BTreeMap::new();
    let mut ranges = std::collections::BTreeMap::new();
    let mut signs = std::collections::BTreeMap::new();
    let mut step = u64::from(chunk_seed);
    let mut pos = 0;
    let mut seq = 0;
    while pos < data.len() {
        while let Some(e) = s.poll_event() {
            match e {
                EdgeEvent::Connect => {
                    s.connected(now, [4; 32]);
                }
                EdgeEvent::ReadDone { id, result } => {
                    assert!(asked.remove(&id), "completion of unknown read {id}");
                    if let Ok(ReadReply::Data { data, .. }) = result {
                        assert_eq!(data.len() as u32, lens[&id], "read of the wrong length");
                    }
                }
                EdgeEvent::PrefetchDone { id, .. } => {
                    assert!(asked.remove(&id), "completion of unknown prefetch {id}");
                }
                EdgeEvent::ExtentsDone { id, result } => {
                    assert!(asked.remove(&id), "completion of unknown query {id}");
                    let (offset, len): (u64, u64) = ranges[&id];
                    if let Ok(extents) = result {
                        let mut at = offset;
                        for e in &extents {
                            assert_eq!(e.offset, at, "allocation map not contiguous");
                            assert!(e.len > 0, "an empty extent");
                            at += e.len;
                        }
                        assert!(at > offset, "an empty allocation map");
                        assert!(at <= offset + len, "allocation map past the range");
                    }
                }
                EdgeEvent::SignDone { id, result } => {
                    assert!(asked.remove(&id), "completion of unknown signature query {id}");
                    let (len, block): (u32, u32) = signs[&id];
                    if let Ok(sigs) = result {
                        assert_eq!(sigs.len() as u64, u64::from(len).div_ceil(u64::from(block)));
                    }
                }
                _ => {}
            }
        }
        step = step.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        if step % 7 == 0 {
            let len = 1 + ((step >> 20) % 70_000) as u32;
            let id = s.read((step >> 30) % SIZE, len, step & 16 != 0, now);
            asked.insert(id);
            lens.insert(id, len);
        }
        if step % 13 == 0 {
            let offset = (step >> 24) % SIZE;
            let len = ((step >> 44) % SIZE).min(SIZE - offset);
            let id = s.extents(offset, len, now);
            asked.insert(id);
            ranges.insert(id, (offset, len));
        }
        if step % 17 == 0 {
            let offset = (step >> 24) % SIZE;
            let len = 1 + ((step >> 40) % (1 << 20)) as u32;
            let block = 256 << ((step >> 8) % 8);
            let id = s.sign(offset, len, block, now);
            asked.insert(id);
            signs.insert(id, (len, block));
        }
        if step % 97 == 0 {
            let d = if step & 32 != 0 { Disposition::CutOver } else { Disposition::Home };
            let _ = s.release(d);
        }
        if step % 11 == 0 {
            seq += 1;
            s.ship(seq, vec![link::proto::WriteEntry::Zero { offset: 0, len: 4096 }], now);
        }
        let n = 1 + (step >> 33) as usize % 128;
        let end = (pos + n).min(data.len());
        s.handle_input(&data[pos..end], now);
        pos = end;
        now += Duration::from_millis((step >> 40) % 200);
        s.handle_timeout(now);
        while let Some(f) = s.poll_transmit(now) {
            check_output(&mut dec, &mut out, &f);
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let [mode, seed, rest @ ..] = input else {
        return;
    };
    let psk = (mode & 2 != 0).then_some([7u8; 32]);
    let origin_end = mode & 1 == 0;
    let mut stream = Vec::new();
    if mode & 4 != 0 && psk.is_none() {
        // A valid start, so the fuzzer explores the attached states.
        let role = if origin_end { Role::Edge } else { Role::Origin };
        stream.extend(frame(
            0,
            &Message::Hello {
                version: PROTOCOL_VERSION,
                role,
                nonce: [5; 32],
            },
        ));
        stream.extend(frame(
            1,
            &if origin_end {
                Message::Attach {
                    volume: "vol".into(),
                    edge_id: "e".into(),
                    resume_seq: 0,
                }
            } else {
                Message::Attached {
                    size: SIZE,
                    chunk_size: 65536,
                    group_size: 1 << 20,
                    cache_key: [0; 32],
                    dedup_key: [0; 32],
                    volume_epoch: 1,
                    next_seq: 1,
                    resume_part: 0,
                    local_writes: false,
                }
            },
        ));
    }
    stream.extend_from_slice(rest);
    if origin_end {
        origin(&stream, *seed, psk);
    } else {
        edge(&stream, *seed, psk);
    }
});
