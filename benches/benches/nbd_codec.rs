//! Micro-benchmarks of the sans-IO NBD codec: the per-request CPU cost the
//! server pays before any I/O happens.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nbd_server::proto::{
    encode_block_status, encode_simple_reply, encode_structured_none, Command, CommandFlags,
    Decoded, RequestDecoder, RequestHeader,
};

const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

fn header(command: Command, cookie: u64, length: u32) -> RequestHeader {
    RequestHeader {
        flags: CommandFlags::default(),
        command,
        cookie,
        offset: cookie * 4096,
        length,
    }
}

fn decode_write_4k(c: &mut Criterion) {
    let mut frame = BytesMut::new();
    header(Command::Write, 1, 4096).encode(&mut frame);
    frame.extend_from_slice(&[0x5a; 4096]);
    let frame = frame.freeze();

    let mut g = c.benchmark_group("nbd_decode");
    g.throughput(Throughput::Bytes(frame.len() as u64));
    g.bench_function("write_4k", |b| {
        let mut dec = RequestDecoder::new(MAX_PAYLOAD);
        b.iter(|| {
            // Copying the frame in stands for the socket read the decoder
            // would follow in the server.
            let mut buf = BytesMut::from(&frame[..]);
            let Ok(Some(Decoded::Request { payload, .. })) = dec.decode(&mut buf) else {
                unreachable!()
            };
            black_box(payload);
        });
    });
    g.finish();
}

fn decode_1000_reads(c: &mut Criterion) {
    let mut stream = BytesMut::new();
    for i in 0..1000 {
        header(Command::Read, i, 4096).encode(&mut stream);
    }
    let stream = stream.freeze();

    let mut g = c.benchmark_group("nbd_decode");
    g.throughput(Throughput::Elements(1000));
    g.bench_function("1000_reads", |b| {
        let mut dec = RequestDecoder::new(MAX_PAYLOAD);
        b.iter(|| {
            let mut buf = BytesMut::from(&stream[..]);
            let mut n = 0u32;
            while let Ok(Some(d)) = dec.decode(&mut buf) {
                black_box(&d);
                n += 1;
            }
            assert_eq!(n, 1000);
        });
    });
    g.finish();
}

fn encode_replies(c: &mut Criterion) {
    let mut g = c.benchmark_group("nbd_encode");
    g.throughput(Throughput::Elements(1000));
    g.bench_function("1000_simple_replies", |b| {
        let mut out = BytesMut::with_capacity(16 * 1000);
        b.iter(|| {
            out.clear();
            for cookie in 0..1000u64 {
                encode_simple_reply(&mut out, black_box(cookie), None);
            }
            black_box(&out);
        });
    });
    g.bench_function("1000_structured_none", |b| {
        let mut out = BytesMut::with_capacity(20 * 1000);
        b.iter(|| {
            out.clear();
            for cookie in 0..1000u64 {
                encode_structured_none(&mut out, black_box(cookie));
            }
            black_box(&out);
        });
    });
    g.finish();

    let extents: Vec<(u32, u32)> = (0..64u32).map(|i| (65536, i % 4)).collect();
    let mut g = c.benchmark_group("nbd_encode");
    g.throughput(Throughput::Elements(64));
    g.bench_function("block_status_64_extents", |b| {
        let mut out = BytesMut::with_capacity(1024);
        b.iter(|| {
            out.clear();
            encode_block_status(&mut out, 7, 1, black_box(&extents), true);
            black_box(&out);
        });
    });
    g.finish();
}

criterion_group!(benches, decode_write_4k, decode_1000_reads, encode_replies);
criterion_main!(benches);
