//! Ping round trip and single-customer store throughput against the real node binary, over
//! loopback TCP, through a small client of its own (snow for Noise, the chunk layer by hand),
//! so the same file measures any revision of the node.
//!
//! Run: `cargo bench --bench protocol` (harness = false; prints figures).
//! Env: `BENCH_PINGS` (default 500) pings, one at a time; `BENCH_FRAGMENTS` (default 32)
//! fragments of 4 MiB stored one at a time (each waits for its ack); `BENCH_RUNS` (default 3)
//! store runs, the best reported. MB = 10^6 bytes.

mod common;
use common::env_or;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bitdust::crypto::identity::Identity;
use bitdust::crypto::keys::NodeKeys;
use bitdust::net::envelope;
use bitdust::proto::envelope::Body;
use bitdust::proto::{
    DeleteFragment, Envelope, FragmentId, IdentityExchange, Ping, ServiceRequest, StoreFragment,
};

const BIN: &str = env!("CARGO_BIN_EXE_bitdust");
const FRAGMENT: usize = 4 << 20;
const MAX_CHUNK: usize = 65535 - 16 - 1;

fn bitdust(home: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("--home")
        .arg(home)
        .args(args)
        .output()
        .expect("bitdust runs");
    assert!(
        out.status.success(),
        "bitdust {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

struct Client {
    stream: TcpStream,
    transport: snow::TransportState,
    next_id: u64,
    /// Bytes written and read on the TCP stream since the handshake (frames, Noise included).
    sent: usize,
    received: usize,
}

impl Client {
    fn connect(addr: &str, keys: &NodeKeys, me: &Identity) -> Client {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let mut hs = snow::Builder::new("Noise_XX_25519_ChaChaPoly_BLAKE2s".parse().expect("p"))
            .local_private_key(&keys.noise_secret_bytes())
            .expect("key")
            .prologue(b"bitdust.v1")
            .expect("prologue")
            .build_initiator()
            .expect("initiator");
        let mut buf = vec![0u8; 65535];
        let n = hs.write_message(&[], &mut buf).expect("msg1");
        write_frame(&mut stream, &buf[..n]);
        let msg2 = read_frame(&mut stream);
        hs.read_message(&msg2, &mut buf).expect("msg2");
        let n = hs.write_message(&[], &mut buf).expect("msg3");
        write_frame(&mut stream, &buf[..n]);
        let mut client = Client {
            stream,
            transport: hs.into_transport_mode().expect("transport"),
            next_id: 2,
            sent: 0,
            received: 0,
        };
        let hello = envelope::envelope(
            1,
            0,
            Body::Identity(IdentityExchange {
                identity: Some(me.signed().clone()),
                ..Default::default()
            }),
        );
        client.send(&envelope::encode(&hello));
        let theirs = envelope::decode(&client.recv()).expect("envelope");
        assert!(matches!(theirs.body, Some(Body::Identity(_))), "{theirs:?}");
        client
    }

    /// One message as chunks (flag byte + up to MAX_CHUNK bytes), written with one syscall.
    fn send(&mut self, msg: &[u8]) {
        let mut wire = Vec::with_capacity(msg.len() + msg.len() / MAX_CHUNK * 21 + 64);
        let mut plain = Vec::with_capacity(MAX_CHUNK + 1);
        let mut cipher = vec![0u8; 65535];
        // An empty message is one final chunk with no data.
        let chunks: Vec<&[u8]> = if msg.is_empty() {
            vec![&[]]
        } else {
            msg.chunks(MAX_CHUNK).collect()
        };
        for (i, chunk) in chunks.iter().enumerate() {
            plain.clear();
            plain.push(u8::from(i + 1 == chunks.len()));
            plain.extend_from_slice(chunk);
            let n = self
                .transport
                .write_message(&plain, &mut cipher)
                .expect("seal");
            wire.extend_from_slice(&(n as u32).to_be_bytes());
            wire.extend_from_slice(&cipher[..n]);
        }
        self.stream.write_all(&wire).expect("write");
        self.sent += wire.len();
    }

    fn recv(&mut self) -> Vec<u8> {
        let mut msg = Vec::new();
        let mut plain = vec![0u8; 65535];
        loop {
            let frame = read_frame(&mut self.stream);
            self.received += 4 + frame.len();
            let n = self
                .transport
                .read_message(&frame, &mut plain)
                .expect("open");
            msg.extend_from_slice(&plain[1..n]);
            if plain[0] == 1 {
                return msg;
            }
        }
    }

    /// Sends a request and returns its reply; pings from the node are answered meanwhile.
    fn request(&mut self, body: Body) -> Envelope {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&envelope::encode(&envelope::envelope(id, 0, body)));
        loop {
            let env = envelope::decode(&self.recv()).expect("envelope");
            if env.reply_to == id {
                return env;
            }
            if let Some(Body::Ping(p)) = env.body {
                let pong_id = self.next_id;
                self.next_id += 1;
                let pong = envelope::envelope(
                    pong_id,
                    env.request_id,
                    Body::Pong(bitdust::proto::Pong { nonce: p.nonce }),
                );
                self.send(&envelope::encode(&pong));
            }
        }
    }
}

fn write_frame(s: &mut TcpStream, bytes: &[u8]) {
    let mut wire = (bytes.len() as u32).to_be_bytes().to_vec();
    wire.extend_from_slice(bytes);
    s.write_all(&wire).expect("write");
}

fn read_frame(s: &mut TcpStream) -> Vec<u8> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).expect("frame length");
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).expect("frame");
    buf
}

struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    let pings = env_or::<usize>("BENCH_PINGS", 500);
    let fragments = env_or::<usize>("BENCH_FRAGMENTS", 32);
    let runs = env_or::<usize>("BENCH_RUNS", 3);
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("supplier");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
        l.local_addr().expect("addr").port()
    };
    let listen = format!("127.0.0.1:{port}");
    bitdust(
        &home,
        &[
            "init", "--listen", &listen, "--name", "bench", "--donate", "8 GiB",
        ],
    );
    let keys = NodeKeys::generate(&mut rand::rngs::OsRng);
    // Contacts name a closed port: the node's own dials to us fail fast and stay out of the way.
    let me = Identity::create(&keys, "customer", vec!["tcp://127.0.0.1:9".into()], 1, 0)
        .expect("identity");
    bitdust(&home, &["peer", "add", &me.card()]);
    let _node = Node(
        Command::new(BIN)
            .arg("--home")
            .arg(&home)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("node starts"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut client = loop {
        if TcpStream::connect(&listen).is_ok() {
            std::thread::sleep(Duration::from_millis(200));
            break Client::connect(&listen, &keys, &me);
        }
        assert!(Instant::now() < deadline, "node did not start");
        std::thread::sleep(Duration::from_millis(50));
    };

    let mut rtts = Vec::with_capacity(pings);
    for nonce in 0..pings as u64 {
        let start = Instant::now();
        let reply = client.request(Body::Ping(Ping { nonce }));
        rtts.push(start.elapsed());
        assert!(matches!(reply.body, Some(Body::Pong(_))), "{reply:?}");
    }
    rtts.sort_unstable();
    let mean = rtts.iter().sum::<Duration>() / pings.max(1) as u32;
    println!(
        "ping rtt: median {:.1} us, p99 {:.1} us, mean {:.1} us ({pings} pings)",
        rtts[pings / 2].as_secs_f64() * 1e6,
        rtts[pings * 99 / 100].as_secs_f64() * 1e6,
        mean.as_secs_f64() * 1e6,
    );

    let space = (fragments * FRAGMENT) as u64 + (1 << 20);
    let hired = client.request(Body::ServiceRequest(ServiceRequest {
        space,
        position: 0,
        data_shards: 1,
        parity_shards: 1,
    }));
    assert!(
        matches!(hired.body, Some(Body::ServiceAccept(_))),
        "{hired:?}"
    );
    let mut best = f64::MAX;
    for run in 0..runs {
        let mut data = vec![0u8; FRAGMENT];
        let ids: Vec<FragmentId> = (0..fragments)
            .map(|i| FragmentId {
                block: blake3::hash(&(run * 1000 + i).to_le_bytes())
                    .as_bytes()
                    .to_vec(),
                position: 0,
            })
            .collect();
        let start = Instant::now();
        for (i, id) in ids.iter().enumerate() {
            data[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let hash = blake3::hash(&data).as_bytes().to_vec();
            let reply = client.request(Body::StoreFragment(StoreFragment {
                id: Some(id.clone()),
                data: data.clone(),
                hash,
            }));
            assert!(matches!(reply.body, Some(Body::Ack(_))), "{reply:?}");
        }
        let took = start.elapsed();
        best = best.min(took.as_secs_f64());
        println!(
            "store run {run}: {fragments} x 4 MiB in {:.2} s = {:.1} MB/s",
            took.as_secs_f64(),
            (fragments * FRAGMENT) as f64 / took.as_secs_f64() / 1e6
        );
        for id in ids {
            let reply = client.request(Body::DeleteFragment(DeleteFragment { id: Some(id) }));
            assert!(matches!(reply.body, Some(Body::Ack(_))), "{reply:?}");
        }
    }
    println!(
        "store throughput (best of {runs}): {:.1} MB/s of 4 MiB fragments",
        (fragments * FRAGMENT) as f64 / best / 1e6
    );
    audit_costs(&mut client);
}

/// What one storage audit costs on the wire (both directions, frames and Noise included) for a
/// fragment of the mean size a 1 GiB backup stores at the defaults (4 MiB blocks, 4 + 2: ~0.9
/// MB), by kind, and what that makes a day at the defaults once a fragment's precomputed pairs
/// are used up: before, one whole fetch per 25 audits (24 pairs made from it); now, slices.
fn audit_costs(client: &mut Client) {
    const MEAN_FRAGMENT: usize = 900_000;
    // At the defaults: 2 audits per supplier a round, 6 suppliers, a round every 10 minutes.
    const AUDITS_A_DAY: f64 = 2.0 * 6.0 * 144.0;
    // What a 1 GiB backup stores on the suppliers (benches/README.md: 1632.5 MB).
    const STORED: f64 = 1632.5e6;
    let data: Vec<u8> = (0..MEAN_FRAGMENT).map(|i| (i % 251) as u8).collect();
    let id = FragmentId {
        block: blake3::hash(b"audit cost").as_bytes().to_vec(),
        position: 0,
    };
    let stored = client.request(Body::StoreFragment(StoreFragment {
        id: Some(id.clone()),
        data: data.clone(),
        hash: blake3::hash(&data).as_bytes().to_vec(),
    }));
    assert!(matches!(stored.body, Some(Body::Ack(_))), "{stored:?}");
    let cost = |client: &mut Client, body: Body| {
        let before = client.sent + client.received;
        let reply = client.request(body);
        assert!(!matches!(reply.body, Some(Body::Fail(_))), "{reply:?}");
        client.sent + client.received - before
    };
    let pair = cost(
        client,
        Body::AuditChallenge(bitdust::proto::AuditChallenge {
            id: Some(id.clone()),
            nonce: vec![7; 32],
            offset: 4096,
            length: 65536,
        }),
    );
    let slice = cost(
        client,
        Body::SliceChallenge(bitdust::proto::SliceChallenge {
            id: Some(id.clone()),
            offset: 450 * 1024,
            length: bitdust::data::audit::SLICE_LEN,
        }),
    );
    let whole = cost(
        client,
        Body::RetrieveFragment(bitdust::proto::RetrieveFragment { id: Some(id) }),
    );
    println!(
        "audit on the wire, {MEAN_FRAGMENT}-byte fragment: pair {pair} B, slice {slice} B, whole fetch {whole} B"
    );
    let pairs = bitdust::data::audit::AUDIT_PAIRS as f64;
    let day = |bytes_per_audit: f64| AUDITS_A_DAY * bytes_per_audit;
    let before = day((pairs * pair as f64 + whole as f64) / (pairs + 1.0));
    let now = day(slice as f64);
    let while_pairs = day(pair as f64);
    println!(
        "audits a day at the defaults, 1 GiB backed up ({:.0} MB stored, {AUDITS_A_DAY} audits): \
         with pairs {:.2} MB = {:.3} %; once they are used up, before (+1 whole fetch / {} audits) \
         {:.1} MB = {:.2} %, now (slices) {:.2} MB = {:.3} %",
        STORED / 1e6,
        while_pairs / 1e6,
        100.0 * while_pairs / STORED,
        pairs + 1.0,
        before / 1e6,
        100.0 * before / STORED,
        now / 1e6,
        100.0 * now / STORED,
    );
}
