//! Pool checkout and return, the work every transaction does twice in transaction mode:
//! lending an idle server connection (with its liveness check) and taking it back. The
//! servers are real sockets to a minimal in-process server that answers a login and then
//! stays idle, so the figure is pgmux's own cost, not PostgreSQL's.
//!
//! `cargo bench --bench pool`

use criterion::{criterion_group, criterion_main, Criterion};
use pgmux::config::PoolMode;
use pgmux::pool::{Pool, PoolSettings};
use pgmux::server::ServerTarget;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Accepts logins: reads the startup packet, answers AuthenticationOk, BackendKeyData and
/// ReadyForQuery, then any simple query with CommandComplete and ReadyForQuery.
async fn fake_server(listener: TcpListener) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(serve(sock));
    }
}

async fn serve(mut sock: TcpStream) -> std::io::Result<()> {
    let len = sock.read_u32().await? as usize;
    let mut startup = vec![0u8; len.saturating_sub(4)];
    sock.read_exact(&mut startup).await?;
    let mut out = Vec::new();
    out.extend_from_slice(&[b'R', 0, 0, 0, 8, 0, 0, 0, 0]);
    out.extend_from_slice(&[b'K', 0, 0, 0, 12, 0, 0, 0, 1, 0, 0, 0, 2]);
    out.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
    sock.write_all(&out).await?;
    loop {
        let tag = sock.read_u8().await?;
        let len = sock.read_u32().await? as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        sock.read_exact(&mut body).await?;
        match tag {
            b'X' => return Ok(()),
            b'Q' => {
                let mut reply = vec![b'C', 0, 0, 0, 8];
                reply.extend_from_slice(b"SET\0");
                reply.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
                sock.write_all(&reply).await?;
            }
            _ => {}
        }
    }
}

fn settings(size: u32) -> PoolSettings {
    PoolSettings {
        mode: PoolMode::Transaction,
        size,
        min_size: 0,
        reserve_size: 0,
        reserve_timeout: None,
        query_wait_timeout: Some(Duration::from_secs(10)),
        connect_timeout: Duration::from_secs(10),
        login_retry: None,
        idle_timeout: None,
        lifetime: None,
        check: None,
        batch_size: 0,
        gather: None,
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (pool, many) = rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(fake_server(listener));
        let target = ServerTarget {
            host: "127.0.0.1".into(),
            port,
            dbname: "bench".into(),
            user: "bench".into(),
            secret: None,
        };
        let one = Pool::new(
            "bench".into(),
            "bench".into(),
            target.clone(),
            settings(1),
            None,
        );
        let four = Pool::new("bench4".into(), "bench".into(), target, settings(4), None);
        // open the connections once; the loops below only lend and return them
        one.checkout().await.unwrap().release();
        let held: Vec<_> = futures_join(&four, 4).await;
        held.into_iter().for_each(|c| c.release());
        (one, four)
    });

    let mut g = c.benchmark_group("pool");
    g.bench_function("checkout_release_idle", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    pool.checkout().await.unwrap().release();
                }
                start.elapsed()
            })
        })
    });
    // 16 tasks sharing 4 connections: checkouts that wait in line and are handed a
    // connection by a release, per checkout+release
    g.bench_function("checkout_release_16_tasks_4_conns", |b| {
        b.iter_custom(|iters| {
            let per_task = iters.div_ceil(16);
            rt.block_on(async {
                let start = Instant::now();
                let tasks: Vec<_> = (0..16)
                    .map(|_| {
                        let p = Arc::clone(&many);
                        tokio::spawn(async move {
                            for _ in 0..per_task {
                                let c = p.checkout().await.unwrap();
                                tokio::task::yield_now().await;
                                c.release();
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
                start
                    .elapsed()
                    .mul_f64(iters as f64 / (per_task * 16) as f64)
            })
        })
    });
    g.finish();
}

async fn futures_join(pool: &Arc<Pool>, n: usize) -> Vec<pgmux::pool::PooledConn> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(pool.checkout().await.unwrap());
    }
    v
}

criterion_group!(benches, bench);
criterion_main!(benches);
