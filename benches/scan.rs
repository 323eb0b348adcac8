//! Frame scanning, the per-message work on pgmux's hot path: walking a server's result
//! stream (DataRows passed through, ReadyForQuery inspected) and a client's pipelined batch.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use pgmux::protocol::scan::{Scanner, Step};

fn msg(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
}

fn result_stream(rows: usize) -> Vec<u8> {
    let mut v = Vec::new();
    msg(&mut v, b'T', &[0u8; 27]);
    for _ in 0..rows {
        msg(&mut v, b'D', &[0u8; 40]);
    }
    msg(&mut v, b'C', b"SELECT 100\0");
    msg(&mut v, b'Z', b"I");
    v
}

fn scan_all(buf: &[u8], inspect: fn(u8) -> bool) -> usize {
    let mut s = Scanner::default();
    let mut pos = 0;
    let mut n = 0;
    while let Ok(step) = s.step(buf, &mut pos, inspect, usize::MAX) {
        match step {
            Step::NeedMore { .. } => break,
            _ => n += 1,
        }
    }
    n
}

fn bench(c: &mut Criterion) {
    let stream = result_stream(100);
    let mut g = c.benchmark_group("scan");
    g.throughput(Throughput::Bytes(stream.len() as u64));
    g.bench_function("server_result_100_rows", |b| {
        b.iter(|| scan_all(black_box(&stream), |t| t == b'Z' || t == b'S'))
    });
    let mut batch = Vec::new();
    for m in [b'P', b'B', b'D', b'E'] {
        msg(&mut batch, m, &[0u8; 30]);
    }
    msg(&mut batch, b'S', b"");
    g.throughput(Throughput::Elements(1));
    g.bench_function("client_extended_batch", |b| {
        b.iter(|| scan_all(black_box(&batch), |t| t == b'X'))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
