//! Bandwidth limits (issue 22): the throughput achieved against the configured upload limit,
//! and what the pacing layer costs when no limit is set.
//!
//! Run: `cargo bench --bench bandwidth` (harness = false; prints figures).
//! Env: `BENCH_SECS` (default 6) = seconds per limited run, `BENCH_MIB` (default 512) = bytes
//! per unlimited run.
//!
//! Limited runs: Noise sessions over loopback TCP, each writer wrapped in `PacedWrite` on one
//! shared `Shaper`, sending 60 KiB messages as fast as the limit allows, over 1 and over 4
//! sessions at once (peers sharing the limit). The rate is measured at the receivers after the
//! first second (the bucket's saved-up burst is spent by then): steady state, what a home
//! uplink sees.
//!
//! Unlimited runs: the same session with and without the `PacedWrite`/`PacedRead` wrappers
//! (a shaper with no limit): the cost of counting bytes on every read and write.

mod common;
use common::env_or;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bitdust::crypto::identity::NodeId;
use bitdust::net::bandwidth::{Limits, LocalTime, Rates, Shaper};
use bitdust::net::generate_static_keypair;
use bitdust::net::noise::{NoiseReader, NoiseWriter, handshake_initiator, handshake_responder};
use bitdust::net::paced::{ControlWrites, PacedRead, PacedWrite, Pacing};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

const MIB: u64 = 1 << 20;
const MSG: usize = 1 << 20;

async fn sessions(
    shaper: Option<Arc<Shaper>>,
    peer: u8,
) -> (
    NoiseWriter<Box<dyn AsyncWrite + Unpin + Send>>,
    NoiseReader<Box<dyn AsyncRead + Unpin + Send>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (client, server) = (client.expect("connect"), server.expect("accept").0);
    client.set_nodelay(true).expect("nodelay");
    server.set_nodelay(true).expect("nodelay");
    let (c_priv, _) = generate_static_keypair();
    let (s_priv, _) = generate_static_keypair();
    let t = Duration::from_secs(5);
    let (c, s) = tokio::join!(
        handshake_initiator(client, &c_priv, b"bench", t),
        handshake_responder(server, &s_priv, b"bench", t),
    );
    let pacing = shaper.map(|shaper| Pacing {
        shaper,
        peer: NodeId::from_bytes([peer; 16]),
        lan: false,
    });
    let (_cr, cw) = c.expect("client").split_with(move |io: TcpStream| {
        let (r, w) = io.into_split();
        let w: Box<dyn AsyncWrite + Unpin + Send> = match &pacing {
            Some(p) => Box::new(PacedWrite::new(w, p.clone(), ControlWrites::default())),
            None => Box::new(w),
        };
        let r: Box<dyn AsyncRead + Unpin + Send> = match pacing {
            Some(p) => Box::new(PacedRead::new(r, p, None)),
            None => Box::new(r),
        };
        (r, w)
    });
    let (sr, _sw) = s.expect("server").split_with(|io: TcpStream| {
        let (r, w) = io.into_split();
        let r: Box<dyn AsyncRead + Unpin + Send> = Box::new(r);
        let w: Box<dyn AsyncWrite + Unpin + Send> = Box::new(w);
        (r, w)
    });
    (cw, sr)
}

/// Bytes per second received by `links` sessions sharing an upload limit of `rate`, measured
/// from the first second to the end of `secs`.
async fn limited(rate: u64, links: u8, secs: u64) -> f64 {
    let shaper = Arc::new(Shaper::new(
        Limits {
            usual: Rates {
                upload: rate,
                ..Rates::default()
            },
            ..Limits::default()
        },
        Instant::now(),
        LocalTime {
            weekday: 0,
            minute: 0,
        },
    ));
    let received = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for peer in 0..links {
        let (mut writer, mut reader) = sessions(Some(shaper.clone()), peer).await;
        tasks.push(tokio::spawn(async move {
            // Messages of one chunk: the receivers' count moves smoothly even when each of 4
            // sessions gets a quarter of 1 MiB/s (a 1 MiB message would take 4 s there).
            let msg = vec![0x5a; 60 * 1024];
            while Instant::now() < end {
                if writer.send(&msg).await.is_err() {
                    break;
                }
            }
            let _ = writer.shutdown().await;
        }));
        let received = received.clone();
        tasks.push(tokio::spawn(async move {
            while let Ok(Some(msg)) = reader.recv().await {
                received.fetch_add(msg.len() as u64, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let from = (Instant::now(), received.load(Ordering::Relaxed));
    tokio::time::sleep_until((end - Duration::from_millis(100)).into()).await;
    let to = (Instant::now(), received.load(Ordering::Relaxed));
    for task in tasks {
        task.abort();
    }
    (to.1 - from.1) as f64 / to.0.duration_since(from.0).as_secs_f64()
}

async fn unlimited(paced: bool, total: u64) -> f64 {
    let shaper = paced.then(|| Arc::new(Shaper::unlimited()));
    let (mut writer, mut reader) = sessions(shaper, 1).await;
    let start = Instant::now();
    let reading = tokio::spawn(async move {
        let mut n = 0u64;
        while let Ok(Some(msg)) = reader.recv().await {
            n += msg.len() as u64;
        }
        n
    });
    let msg = vec![0xa5; MSG];
    for _ in 0..total / MSG as u64 {
        writer.send(&msg).await.expect("send");
    }
    writer.shutdown().await.expect("shutdown");
    let n = reading.await.expect("reader");
    assert_eq!(n, total / MSG as u64 * MSG as u64);
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let secs = env_or::<u64>("BENCH_SECS", 6);
    let total = env_or::<u64>("BENCH_MIB", 512) * MIB;
    runtime.block_on(async {
        println!("upload limit | sessions | achieved (steady state) | of the limit");
        for rate in [MIB, 4 * MIB, 16 * MIB] {
            for links in [1u8, 4] {
                let got = limited(rate, links, secs).await;
                println!(
                    "{:>9} MiB/s | {links:>8} | {:>17.2} MiB/s | {:>6.1} %",
                    rate / MIB,
                    got / MIB as f64,
                    100.0 * got / rate as f64
                );
            }
        }
        println!(
            "\nno limit, one session, {} MiB in 1 MiB messages:",
            total / MIB
        );
        for round in 0..2 {
            for paced in [false, true] {
                let got = unlimited(paced, total).await;
                println!(
                    "  round {round}: {:<28} {:>8.1} MiB/s",
                    if paced {
                        "with the pacing wrappers"
                    } else {
                        "bare session"
                    },
                    got / MIB as f64
                );
            }
        }
    });
}
