//! Transport throughput over loopback TCP: plain TCP vs one Noise session,
//! plus the raw single-core ChaCha20-Poly1305 speed for reference.
//!
//! Run: `cargo bench --bench transport` (harness = false; prints figures).
//! Env: `BENCH_MIB` (default 512) = bytes per run, `BENCH_RUNS` (default 3),
//! `BENCH_ONLY` = `plain`, `noise`, `cipher` or `layer` (one part only);
//! each figure is the best of the runs. MB = 10^6 bytes.

mod common;
use common::env_or;
use std::time::{Duration, Instant};

use bitdust::net::frame::NOISE_MAX_MSG;
use bitdust::net::generate_static_keypair;
use bitdust::net::noise::{TAG_LEN, handshake_initiator, handshake_responder, noise_params};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MSG: usize = 1 << 20;

fn mb_per_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (client, server) = (client.unwrap(), server.unwrap().0);
    client.set_nodelay(true).unwrap();
    server.set_nodelay(true).unwrap();
    (client, server)
}

// Writer and reader run as two tasks on the 2-worker runtime (the calling
// thread only waits), so each side can have a core.

/// (a) Plain TCP: `total` bytes in 1 MiB writes, reader with a 1 MiB buffer.
async fn plain_tcp(total: usize) -> Duration {
    let (mut client, mut server) = tcp_pair().await;
    let start = Instant::now();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; MSG];
        let mut n = 0usize;
        loop {
            match server.read(&mut buf).await.unwrap() {
                0 => break n,
                k => n += k,
            }
        }
    });
    let writer = tokio::spawn(async move {
        let block = vec![0xA5u8; MSG];
        for _ in 0..total / MSG {
            client.write_all(&block).await.unwrap();
        }
        client.shutdown().await.unwrap();
    });
    writer.await.unwrap();
    assert_eq!(reader.await.unwrap(), total);
    start.elapsed()
}

/// (b) One Noise session: `total` bytes as 1 MiB messages, sender and
/// receiver in separate tasks (halves split with `TcpStream::into_split`).
async fn noise_tcp(total: usize) -> Duration {
    let (client, server) = tcp_pair().await;
    let (c_priv, _) = generate_static_keypair();
    let (s_priv, _) = generate_static_keypair();
    let t = Duration::from_secs(5);
    let (c, s) = tokio::join!(
        handshake_initiator(client, &c_priv, b"bench", t),
        handshake_responder(server, &s_priv, b"bench", t),
    );
    let (_cr, mut cw) = c.unwrap().split_with(TcpStream::into_split);
    let (mut sr, _sw) = s.unwrap().split_with(TcpStream::into_split);

    let start = Instant::now();
    let reader = tokio::spawn(async move {
        let mut n = 0usize;
        while let Some(m) = sr.recv().await.unwrap() {
            n += m.len();
        }
        n
    });
    let writer = tokio::spawn(async move {
        let block = vec![0xA5u8; MSG];
        for _ in 0..total / MSG {
            cw.send(&block).await.unwrap();
        }
        cw.shutdown().await.unwrap();
    });
    writer.await.unwrap();
    assert_eq!(reader.await.unwrap(), total);
    start.elapsed()
}

/// (d) The Noise layer alone on one core (no socket): `send` of 1 MiB
/// messages into `tokio::io::sink()`, then `recv` of `total.min(256 MiB)`
/// of that traffic from memory. Shows the framing/copy overhead over (c).
fn noise_layer_1core(total: usize) -> (Duration, Duration, usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (a_io, b_io) = tokio::io::duplex(4096);
        let (a_priv, _) = generate_static_keypair();
        let (b_priv, _) = generate_static_keypair();
        let t = Duration::from_secs(5);
        let (a, b) = tokio::join!(
            handshake_initiator(a_io, &a_priv, b"bench", t),
            handshake_responder(b_io, &b_priv, b"bench", t),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        let block = vec![0xA5u8; MSG];

        let (_ar, mut to_sink) = a.split_with(|io| (io, tokio::io::sink()));
        let start = Instant::now();
        for _ in 0..total / MSG {
            to_sink.send(&block).await.unwrap();
        }
        let send = start.elapsed();

        // Fresh keys/nonces: capture the traffic of a second session.
        let (c_io, d_io) = tokio::io::duplex(4096);
        let (c, d) = tokio::join!(
            handshake_initiator(c_io, &a_priv, b"bench", t),
            handshake_responder(d_io, &b_priv, b"bench", t),
        );
        let recv_total = total.min(256 * MSG);
        let (_cr, mut to_vec) = c.unwrap().split_with(|io| (io, Vec::new()));
        for _ in 0..recv_total / MSG {
            to_vec.send(&block).await.unwrap();
        }
        let wire = to_vec.get_ref().clone();
        drop(to_vec);
        let (mut from_mem, _dw) = d.unwrap().split_with(|io| (std::io::Cursor::new(wire), io));
        let start = Instant::now();
        let mut n = 0;
        while let Some(m) = from_mem.recv().await.unwrap() {
            n += m.len();
        }
        let recv = start.elapsed();
        assert_eq!(n, recv_total);
        drop(b);
        (send, recv, recv_total)
    })
}

/// A completed in-memory XX handshake, in stateless transport mode.
fn transport_pair() -> (snow::StatelessTransportState, snow::StatelessTransportState) {
    let (a_priv, _) = generate_static_keypair();
    let (b_priv, _) = generate_static_keypair();
    let mut a = snow::Builder::new(noise_params())
        .local_private_key(&a_priv)
        .unwrap()
        .build_initiator()
        .unwrap();
    let mut b = snow::Builder::new(noise_params())
        .local_private_key(&b_priv)
        .unwrap()
        .build_responder()
        .unwrap();
    let (mut m, mut p) = (vec![0u8; NOISE_MAX_MSG], vec![0u8; NOISE_MAX_MSG]);
    let n = a.write_message(&[], &mut m).unwrap();
    b.read_message(&m[..n], &mut p).unwrap();
    let n = b.write_message(&[], &mut m).unwrap();
    a.read_message(&m[..n], &mut p).unwrap();
    let n = a.write_message(&[], &mut m).unwrap();
    b.read_message(&m[..n], &mut p).unwrap();
    (
        a.into_stateless_transport_mode().unwrap(),
        b.into_stateless_transport_mode().unwrap(),
    )
}

/// (c) Raw cipher on one core: seal (and separately open) 65519-byte
/// plaintexts (the largest a Noise message carries) through snow.
fn cipher_raw(total: usize) -> (Duration, Duration) {
    const PT: usize = NOISE_MAX_MSG - TAG_LEN;
    let (a, b) = transport_pair();
    let pt = vec![0x5Au8; PT];
    let mut ct = vec![0u8; NOISE_MAX_MSG];
    let mut out = vec![0u8; NOISE_MAX_MSG];
    let count = total / PT;

    let start = Instant::now();
    for nonce in 0..count as u64 {
        a.write_message(nonce, &pt, &mut ct).unwrap();
    }
    let seal = start.elapsed();

    let mut cts = Vec::with_capacity(16);
    for nonce in 0..16u64 {
        let mut c = vec![0u8; NOISE_MAX_MSG];
        a.write_message(nonce, &pt, &mut c).unwrap();
        cts.push(c);
    }
    let start = Instant::now();
    for nonce in 0..count as u64 {
        let c = &cts[(nonce % 16) as usize];
        b.read_message(nonce % 16, c, &mut out).unwrap();
    }
    let open = start.elapsed();
    std::hint::black_box((&ct, &out));
    (seal, open)
}

fn main() {
    let total = env_or::<usize>("BENCH_MIB", 512) * MSG;
    let runs = env_or::<usize>("BENCH_RUNS", 3).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let best = |ds: Vec<Duration>| ds.into_iter().min().unwrap();

    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let want = |part: &str| only.is_empty() || only == part;

    println!(
        "transport bench: {} MiB per run, best of {runs}",
        total / MSG
    );
    if want("plain") {
        let plain = best((0..runs).map(|_| rt.block_on(plain_tcp(total))).collect());
        println!("plain_tcp_loopback: {:.1} MB/s", mb_per_s(total, plain));
    }
    let mut noise = None;
    if want("noise") {
        let d = best((0..runs).map(|_| rt.block_on(noise_tcp(total))).collect());
        noise = Some(mb_per_s(total, d));
        println!("noise_tcp_loopback: {:.1} MB/s", mb_per_s(total, d));
    }
    if want("cipher") {
        let (mut seal, mut open) = (Duration::MAX, Duration::MAX);
        for _ in 0..runs {
            let (s, o) = cipher_raw(total);
            seal = seal.min(s);
            open = open.min(o);
        }
        let (seal, open) = (mb_per_s(total, seal), mb_per_s(total, open));
        println!("chacha20poly1305_seal_1core: {seal:.1} MB/s");
        println!("chacha20poly1305_open_1core: {open:.1} MB/s");
        if let Some(noise) = noise {
            println!("noise_vs_seal_ratio: {:.2}", noise / seal);
        }
    }
    if want("layer") {
        let (mut send, mut recv, mut recv_total) = (Duration::MAX, Duration::MAX, 0);
        for _ in 0..runs {
            let (s, r, n) = noise_layer_1core(total);
            send = send.min(s);
            recv = recv.min(r);
            recv_total = n;
        }
        println!("noise_send_path_1core: {:.1} MB/s", mb_per_s(total, send));
        println!(
            "noise_recv_path_1core: {:.1} MB/s",
            mb_per_s(recv_total, recv)
        );
    }
}
