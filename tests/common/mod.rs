//! Shared helpers for tests that run the real binary.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use bitdust::actors::status::{NodeStatus, PeerStatus};
use bitdust::crypto::identity::Identity;
use bitdust::crypto::keys::NodeKeys;
use bitdust::net::envelope;
use bitdust::node::client::Client;
use bitdust::node::control::Pong;
use bitdust::node::home::Home;
use bitdust::node::offline::IdCard;
use bitdust::proto::IdentityExchange;
use bitdust::proto::envelope::Body;

pub mod hostile;
pub mod tree;

pub const BIN: &str = env!("CARGO_BIN_EXE_bitdust");

pub fn bitdust(home: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("bitdust runs")
}

/// A port for a node to listen on: below the kernel's ephemeral range (so no outgoing
/// connection can take it before the node binds it), free now, and never handed out twice in
/// this process.
pub fn free_port() -> u16 {
    use std::sync::Mutex;
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let start = 20_000 + (std::process::id() % 10_000) as u16;
    for offset in 0..12_000u16 {
        let port = 20_000 + (start - 20_000 + offset) % 12_000;
        if given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free port between 20000 and 32000");
}

pub fn init(home: &Path, name: &str) -> String {
    let listen = format!("127.0.0.1:{}", free_port());
    let out = bitdust(
        home,
        &[
            "init", "--listen", &listen, "--name", name, "--donate", "1 GiB",
        ],
    );
    assert!(
        out.status.success(),
        "init failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let node_id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(node_id.len(), 32, "node id: {node_id}");
    assert!(node_id.chars().all(|c| c.is_ascii_hexdigit()));
    node_id
}

/// A running node whose JSON log lines arrive on a channel.
pub struct Node {
    child: Child,
    logs: Receiver<serde_json::Value>,
    seen: Vec<serde_json::Value>,
}

impl Node {
    pub fn start(home: &Path) -> Node {
        Node::start_with(home, &[])
    }

    /// Starts the node with extra environment variables (config overrides such as
    /// `BITDUST_NETWORK__KEEPALIVE`).
    pub fn start_with(home: &Path, env: &[(&str, &str)]) -> Node {
        let mut child = Command::new(BIN)
            .arg("--home")
            .arg(home)
            .args(["run", "--log-format", "json"])
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run starts");
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, logs) = mpsc::channel();
        // BITDUST_TEST_LOGS=DIR keeps every node's log in DIR/<home name>.log, for debugging.
        let mut keep = std::env::var_os("BITDUST_TEST_LOGS").and_then(|dir| {
            let name = home.file_name()?.to_string_lossy().to_string();
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(Path::new(&dir).join(format!("{name}.log")))
                .ok()
        });
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(file) = keep.as_mut() {
                    use std::io::Write as _;
                    let _ = writeln!(file, "{line}");
                }
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "raw": line }));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        Node {
            child,
            logs,
            seen: Vec::new(),
        }
    }

    /// Waits (with a deadline) for a log line matching `pred`; returns it.
    pub fn wait_log(
        &mut self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        if let Some(v) = self.seen.iter().find(|v| pred(v)) {
            return v.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.logs.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if pred(&v) {
                        return v;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("no log line for {what}; saw:\n{:#?}", self.seen);
    }

    /// Waits until the node serves its control socket (everything started).
    pub fn wait_running(&mut self) {
        self.wait_log("node running", |v| v["message"] == "node running");
    }

    /// Every log line so far (without waiting for more).
    pub fn logs_so_far(&mut self) -> &[serde_json::Value] {
        while let Ok(v) = self.logs.try_recv() {
            self.seen.push(v);
        }
        &self.seen
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to our own child process.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "kill failed");
    }

    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "node did not exit in time");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn transition(v: &serde_json::Value, actor: &str, from: &str, to: &str) -> bool {
    v["message"] == "transition" && v["actor"] == actor && v["from"] == from && v["to"] == to
}

pub fn status_json(home: &Path) -> serde_json::Value {
    let out = bitdust(home, &["status", "--json"]);
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status prints JSON")
}

/// The node's status through `bitdust status --json`, typed (panics when the CLI fails): what
/// the CLI prints reads back into the node's own types.
pub fn status(home: &Path) -> NodeStatus {
    serde_json::from_value(status_json(home)).expect("status --json reads as NodeStatus")
}

/// The node's status through the control socket's typed client, or None while it does not
/// answer.
pub fn node_status(home: &Path) -> Option<NodeStatus> {
    Client::connect(&Home::new(home)).status().ok()
}

/// `bitdust id --json`, typed.
pub fn id_card(home: &Path) -> IdCard {
    serde_json::from_value(id_json(home)).expect("id --json reads as IdCard")
}

pub fn id_json(home: &Path) -> serde_json::Value {
    let out = bitdust(home, &["id", "--json"]);
    assert!(
        out.status.success(),
        "id failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("id prints JSON")
}

pub fn temp_home() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("n1");
    (dir, home)
}

/// Polls `check` until it returns `Some`, or panics after `secs` seconds naming `what`.
pub fn wait_for<T>(what: &str, secs: u64, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The node's status, or None while it is not answering.
pub fn try_status(home: &Path) -> Option<serde_json::Value> {
    let out = bitdust(home, &["status", "--json"]);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// The entry for `peer` in the node's status.
pub fn peer_status(status: &serde_json::Value, peer: &str) -> Option<serde_json::Value> {
    status["network"]["peers"]
        .as_array()?
        .iter()
        .find(|p| p["node_id"] == peer)
        .cloned()
}

/// The counter for `reason` (a session close reason, or an identity event).
pub fn closed_count(status: &serde_json::Value, reason: &str) -> u64 {
    status["network"]["counters"][reason].as_u64().unwrap_or(0)
}

/// The entry for `peer` in a typed status.
pub fn peer_of(status: &NodeStatus, peer: &str) -> Option<PeerStatus> {
    status
        .network
        .peers
        .iter()
        .find(|p| p.node_id == peer)
        .cloned()
}

/// The counter for `reason` in a typed status (0 when never counted).
pub fn counter(status: &NodeStatus, reason: &str) -> u64 {
    status.network.counters.get(reason).copied().unwrap_or(0)
}

pub fn card(home: &Path) -> String {
    let out = bitdust(home, &["id"]);
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub fn add_peer(home: &Path, peer_card: &str) {
    let out = bitdust(home, &["peer", "add", peer_card]);
    assert!(
        out.status.success(),
        "peer add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn listen_addr(home: &Path) -> String {
    id_card(home)
        .contacts
        .first()
        .expect("contact")
        .trim_start_matches("tcp://")
        .to_string()
}

/// Waits until `home`'s session with `peer` is in `state`.
pub fn wait_session(home: &Path, peer: &str, state: &str) {
    wait_for(&format!("{peer} {state}"), 30, || {
        let status = node_status(home)?;
        (peer_of(&status, peer)?.session == state).then_some(())
    });
}

pub fn ping(home: &Path, peer: &str) -> f64 {
    let out = bitdust(home, &["peer", "ping", peer, "--json"]);
    assert!(
        out.status.success(),
        "ping failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pong: Pong = serde_json::from_slice(&out.stdout).expect("ping --json reads as Pong");
    pong.rtt_ms
}

pub struct Cluster {
    pub _dir: tempfile::TempDir,
    pub homes: Vec<PathBuf>,
    pub ids: Vec<String>,
}

/// `n` nodes that all trust each other (added while stopped, through the database).
pub fn cluster(n: usize) -> Cluster {
    let dir = tempfile::tempdir().expect("tempdir");
    let homes: Vec<PathBuf> = (0..n).map(|i| dir.path().join(format!("n{i}"))).collect();
    let ids: Vec<String> = homes
        .iter()
        .enumerate()
        .map(|(i, h)| init(h, &format!("node{i}")))
        .collect();
    let cards: Vec<String> = homes.iter().map(|h| card(h)).collect();
    for (i, home) in homes.iter().enumerate() {
        for (j, c) in cards.iter().enumerate() {
            if i != j {
                add_peer(home, c);
            }
        }
    }
    Cluster {
        _dir: dir,
        homes,
        ids,
    }
}

// ------------------------------------------------------------ customer and suppliers

/// Positions on the customer: (supplier, contract state).
pub fn positions(home: &Path) -> Option<Vec<(Option<String>, String)>> {
    let status = node_status(home)?;
    Some(
        status
            .customer
            .positions
            .into_iter()
            .map(|p| (p.supplier, p.contract.to_string()))
            .collect(),
    )
}

/// Waits until every position is held, Connected, by distinct suppliers; returns them.
pub fn wait_all_connected(home: &Path, secs: u64) -> Vec<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let mut last = None;
    while std::time::Instant::now() < deadline {
        if let Some(p) = positions(home) {
            let suppliers: Vec<String> = p
                .iter()
                .filter_map(|(s, c)| (c == "Connected").then_some(s.clone()).flatten())
                .collect();
            if suppliers.len() == p.len() {
                return suppliers;
            }
            last = Some(p);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!(
        "positions not all connected after {secs}s: {last:?}\n{:#}",
        try_status(home).unwrap_or_default()
    );
}

/// A customer (node 0) and `friends` friends who trust it and whom it trusts.
pub fn star(friends: usize) -> Cluster {
    let dir = tempfile::tempdir().expect("tempdir");
    let homes: Vec<_> = (0..=friends)
        .map(|i| dir.path().join(format!("n{i}")))
        .collect();
    let ids: Vec<String> = homes
        .iter()
        .enumerate()
        .map(|(i, h)| init(h, &format!("node{i}")))
        .collect();
    let customer_card = card(&homes[0]);
    for home in &homes[1..] {
        add_peer(&homes[0], &card(home));
        add_peer(home, &customer_card);
    }
    Cluster {
        _dir: dir,
        homes,
        ids,
    }
}

// ------------------------------------------------------------ a raw Noise client

pub const PROLOGUE: &[u8] = b"bitdust.v1";

pub fn write_frame(s: &mut TcpStream, bytes: &[u8]) {
    s.write_all(&(bytes.len() as u32).to_be_bytes())
        .expect("write len");
    s.write_all(bytes).expect("write frame");
}

pub fn read_frame(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).ok()?;
    Some(buf)
}

/// A client that speaks the transport by hand, so it can misbehave on purpose.
pub struct RawClient {
    pub stream: TcpStream,
    pub transport: snow::TransportState,
}

impl RawClient {
    pub fn connect(addr: &str, noise_private: &[u8]) -> RawClient {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let params = "Noise_XX_25519_ChaChaPoly_BLAKE2s".parse().expect("params");
        let mut hs = snow::Builder::new(params)
            .local_private_key(noise_private)
            .expect("key")
            .prologue(PROLOGUE)
            .expect("prologue")
            .build_initiator()
            .expect("initiator");
        let mut buf = vec![0u8; 65535];
        let n = hs.write_message(&[], &mut buf).expect("msg1");
        write_frame(&mut stream, &buf[..n]);
        let msg2 = read_frame(&mut stream).expect("msg2");
        hs.read_message(&msg2, &mut buf).expect("read msg2");
        let n = hs.write_message(&[], &mut buf).expect("msg3");
        write_frame(&mut stream, &buf[..n]);
        RawClient {
            stream,
            transport: hs.into_transport_mode().expect("transport"),
        }
    }

    /// Sends `payload` as one final chunk.
    pub fn send(&mut self, payload: &[u8]) {
        let mut plain = vec![1u8];
        plain.extend_from_slice(payload);
        let mut buf = vec![0u8; plain.len() + 16];
        let n = self
            .transport
            .write_message(&plain, &mut buf)
            .expect("encrypt");
        write_frame(&mut self.stream, &buf[..n]);
    }

    /// Sends `payload` in as many chunks as it needs; false once the node has closed.
    pub fn send_message(&mut self, payload: &[u8]) -> bool {
        const CHUNK: usize = 65_518;
        let mut buf = vec![0u8; 65_535];
        let mut pieces = payload.chunks(CHUNK).peekable();
        if pieces.peek().is_none() {
            self.send(payload);
            return true;
        }
        while let Some(piece) = pieces.next() {
            let mut plain = vec![u8::from(pieces.peek().is_none())];
            plain.extend_from_slice(piece);
            let n = self
                .transport
                .write_message(&plain, &mut buf)
                .expect("encrypt");
            let frame = [&(n as u32).to_be_bytes()[..], &buf[..n]].concat();
            if self.stream.write_all(&frame).is_err() {
                return false;
            }
        }
        true
    }

    /// Receives one whole message, however many chunks it spans.
    pub fn recv_message(&mut self) -> Option<Vec<u8>> {
        let mut msg = Vec::new();
        let mut buf = vec![0u8; 65_535];
        loop {
            let frame = read_frame(&mut self.stream)?;
            let n = self.transport.read_message(&frame, &mut buf).ok()?;
            let (&flag, data) = buf[..n].split_first()?;
            msg.extend_from_slice(data);
            if flag == 1 {
                return Some(msg);
            }
        }
    }

    pub fn recv(&mut self) -> Option<Vec<u8>> {
        let frame = read_frame(&mut self.stream)?;
        let mut buf = vec![0u8; frame.len()];
        let n = self.transport.read_message(&frame, &mut buf).ok()?;
        Some(buf[1..n].to_vec())
    }

    /// True once the node has closed the connection.
    pub fn closed_by_peer(&mut self) -> bool {
        let mut byte = [0u8; 1];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

pub fn identity_envelope(identity: &Identity) -> Vec<u8> {
    envelope::encode(&envelope::envelope(
        1,
        0,
        Body::Identity(IdentityExchange {
            identity: Some(identity.signed().clone()),
            ..Default::default()
        }),
    ))
}

/// A stranger's keys and identity, made in the test.
pub fn stranger() -> (NodeKeys, Identity) {
    let keys = NodeKeys::generate(&mut rand::rngs::OsRng);
    let identity = Identity::create(&keys, "mallory", vec!["tcp://127.0.0.1:9".into()], 1, 0)
        .expect("identity");
    (keys, identity)
}

impl RawClient {
    /// Connects, completes the handshake and the identity exchange as `identity`.
    pub fn login(addr: &str, keys: &NodeKeys, identity: &Identity) -> RawClient {
        let mut client = RawClient::connect(addr, &keys.noise_secret_bytes());
        client.send(&identity_envelope(identity));
        let hello = client.recv().expect("the node's identity");
        let hello = envelope::decode(&hello).expect("an envelope");
        assert!(
            matches!(hello.body, Some(Body::Identity(_))),
            "identity first"
        );
        client
    }

    /// Sends a request and returns the reply to it, skipping anything else (pings, pushes).
    pub fn request(&mut self, id: u64, body: Body) -> bitdust::proto::Envelope {
        self.send(&envelope::encode(&envelope::envelope(id, 0, body)));
        loop {
            let bytes = self.recv().expect("a reply");
            let env = envelope::decode(&bytes).expect("an envelope");
            if env.reply_to == id {
                return env;
            }
        }
    }
}

impl Node {
    /// The node's process id (to inspect it in /proc while it cannot be reaped).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// A field of `/proc/<pid>/status` in bytes (`VmRSS`, `VmHWM`).
pub fn proc_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Starts measuring the peak RSS of `pid` anew (`VmHWM` is reset to the present RSS).
pub fn reset_peak_rss(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset VmHWM");
}
