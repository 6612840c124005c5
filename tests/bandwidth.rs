//! Bandwidth limits (issue 22), end to end on loopback: a limited backup takes the time its
//! limit implies, pings stay fast while the uplink is saturated, `status` shows the limits and
//! rates, and a lower limit sent by SIGHUP slows a running transfer within a second without
//! dropping a session.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::tree::noise;
use common::*;

const MIB: u64 = 1024 * 1024;
const KIB: u64 = 1024;

/// Sets `[bandwidth] upload` in the node's config file, and turns the LAN exemption off (the
/// test's peers are all on loopback).
fn set_upload(home: &Path, upload: &str) {
    set_bandwidth(home, "upload", upload);
}

/// Sets one rate of `[bandwidth]` (`upload`, `download`, ...), the LAN exemption off.
fn set_bandwidth(home: &Path, key: &str, rate: &str) {
    let path = home.join("config.toml");
    let text = std::fs::read_to_string(&path).expect("config");
    let mut section = String::new();
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with('[') {
            section = line.trim().to_string();
        }
        let line = match (section.as_str(), line) {
            ("[bandwidth]", l) if l.starts_with(&format!("{key} = ")) => {
                format!("{key} = \"{rate}\"")
            }
            ("[bandwidth]", l) if l.starts_with("lan_unlimited = ") => {
                "lan_unlimited = false".to_string()
            }
            (_, l) => l.to_string(),
        };
        out.push_str(&line);
        out.push('\n');
    }
    assert!(out.contains(&format!("{key} = \"{rate}\"")), "{out}");
    std::fs::write(&path, out).expect("write config");
}

/// Bytes the node has written to all its peers (its sessions' counters).
fn bytes_out(home: &Path) -> u64 {
    let status = node_status(home).expect("status");
    status.network.peers.iter().map(|p| p.bytes_out).sum()
}

fn source_of(seed: u64, files: usize, each: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for i in 0..files {
        std::fs::write(
            dir.path().join(format!("f{i}.bin")),
            noise(seed + i as u64, each),
        )
        .expect("write");
    }
    dir
}

fn start_backup(home: &Path, source: &Path) {
    let out = bitdust(home, &["backup", source.to_str().expect("utf-8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn finished(home: &Path, count: usize) -> Option<String> {
    let status = node_status(home)?;
    (status.backup.finished.len() >= count)
        .then(|| {
            status
                .backup
                .finished
                .last()
                .map(|r| r.outcome.as_str().to_string())
        })
        .flatten()
}

#[test]
fn an_upload_limit_paces_a_backup_keeps_pings_fast_and_follows_sighup() {
    let c = star(6);
    let owner = &c.homes[0];
    set_upload(owner, "2 MiB/s");
    let nodes: Vec<Node> = c.homes.iter().map(|h| Node::start(h)).collect();
    let suppliers = wait_all_connected(owner, 60);

    // 1. A backup of 24 MiB (36 MiB of fragments with 4 + 2 shards) at 2 MiB/s.
    let first = source_of(1, 6, 4 * MIB as usize);
    let before = bytes_out(owner);
    let started = Instant::now();
    start_backup(owner, first.path());
    std::thread::sleep(Duration::from_secs(3));
    let mut rtts = Vec::new();
    for supplier in suppliers.iter().take(3) {
        rtts.push(ping(owner, supplier));
    }
    let shown = node_status(owner)
        .expect("status")
        .bandwidth
        .expect("bandwidth");
    assert_eq!(shown.upload_limit, 2 * MIB);
    assert!(!shown.lan_unlimited);
    assert!(
        shown.upload_rate > MIB && shown.upload_rate < 2 * MIB + 400 * KIB,
        "the rate of the last second: {shown:?}"
    );
    let outcome = wait_for("the limited backup", 120, || finished(owner, 1));
    let took = started.elapsed().as_secs_f64();
    assert_eq!(outcome, "committed");
    let sent = (bytes_out(owner) - before) as f64;
    assert!(sent > 36.0 * MIB as f64, "{sent}");
    // The bucket starts with half a MiB saved; the rest goes at 2 MiB/s at most.
    let implied = (sent - 512.0 * KIB as f64) / (2 * MIB) as f64;
    assert!(
        took >= implied,
        "{took:.1} s for {sent} bytes: faster than the limit"
    );
    assert!(
        took <= 1.25 * sent / (2 * MIB) as f64,
        "{took:.1} s for {sent} bytes: more than 25 % over the limit's time"
    );
    eprintln!(
        "limited backup: {sent} bytes in {took:.1} s ({:.2} MiB/s, limit 2 MiB/s, implied {implied:.1} s); pings {rtts:?} ms",
        sent / took / MIB as f64
    );
    for rtt in &rtts {
        assert!(
            *rtt < 1000.0,
            "ping round trips while saturated: {rtts:?} ms"
        );
    }

    // 2. A lower limit by SIGHUP during a transfer bites within a second.
    set_upload(owner, "8 MiB/s");
    nodes[0].signal(libc::SIGHUP);
    let second = source_of(100, 6, 4 * MIB as usize);
    start_backup(owner, second.path());
    // The node measures what it writes, once a second, over the last second.
    let upload_rate = || {
        node_status(owner)
            .expect("status")
            .bandwidth
            .expect("bw")
            .upload_rate
    };
    std::thread::sleep(Duration::from_millis(2500));
    let fast = upload_rate();
    set_upload(owner, "256 KiB/s");
    nodes[0].signal(libc::SIGHUP);
    // The rate of the last second, sampled when that second began at least 0.1 s after the
    // SIGHUP, and again a second later.
    std::thread::sleep(Duration::from_millis(2100));
    let slow = [upload_rate(), {
        std::thread::sleep(Duration::from_secs(1));
        upload_rate()
    }];
    eprintln!("SIGHUP 8 MiB/s -> 256 KiB/s: {fast} B/s before, {slow:?} B/s after");
    assert!(fast > 2 * MIB, "before the SIGHUP: {fast} B/s");
    for rate in slow {
        assert!(
            rate < 256 * KIB * 6 / 5,
            "a second after the SIGHUP: {slow:?} B/s (was {fast})"
        );
    }
    // Unlimited again: the backup finishes, and no session was dropped on the way.
    set_upload(owner, "0");
    nodes[0].signal(libc::SIGHUP);
    let outcome = wait_for("the second backup", 120, || finished(owner, 2));
    assert_eq!(outcome, "committed");
    let status = node_status(owner).expect("status");
    assert_eq!(counter(&status, "PeerSilent"), 0, "{:?}", status.network);
    assert_eq!(status.bandwidth.expect("bandwidth").upload_limit, 0);
    drop(nodes);
}

/// A restore under `download = "1 MiB/s"` takes the time its fetched bytes imply at that rate,
/// and comes out whole; meanwhile the suppliers' pongs wait behind fragments in flight, and no
/// session is closed for silence (pings go at least twice per pong deadline, bytes arriving
/// count as a pong).
#[test]
fn a_download_limit_paces_a_restore_and_no_peer_is_taken_for_dead() {
    let c = star(6);
    let owner = &c.homes[0];
    let nodes: Vec<Node> = c.homes.iter().map(|h| Node::start(h)).collect();
    wait_all_connected(owner, 60);
    let source = source_of(7, 3, 4 * MIB as usize);
    common::tree::backup(owner, source.path());
    set_bandwidth(owner, "download", "1 MiB/s");
    nodes[0].signal(libc::SIGHUP);
    wait_for("the download limit in force", 20, || {
        let limit = node_status(owner)?.bandwidth?.download_limit;
        (limit == MIB).then_some(())
    });
    let out = tempfile::tempdir().expect("tempdir");
    let target = out.path().join("restored");
    let started = Instant::now();
    let (ok, result) = common::tree::restore(owner, &["--to", target.to_str().expect("utf-8")]);
    let took = started.elapsed().as_secs_f64();
    assert!(ok, "{result:#}");
    assert_eq!(result["outcome"], "complete", "{result:#}");
    common::tree::assert_same_tree(source.path(), &target);
    let fetched = result["fetched_bytes"].as_u64().expect("fetched_bytes") as f64;
    let implied = (fetched - 512.0 * KIB as f64) / MIB as f64;
    eprintln!(
        "limited restore: {fetched} bytes fetched in {took:.1} s ({:.2} MiB/s, limit 1 MiB/s, implied {implied:.1} s)",
        fetched / took / MIB as f64
    );
    assert!(took >= implied, "{took:.1} s: faster than the limit");
    assert!(
        took <= 1.5 * implied + 5.0,
        "{took:.1} s: far slower than the limit"
    );
    let status = node_status(owner).expect("status");
    assert_eq!(counter(&status, "PeerSilent"), 0, "{:?}", status.network);
    for home in &c.homes[1..] {
        let status = node_status(home).expect("status");
        assert_eq!(
            counter(&status, "PeerSilent"),
            0,
            "a supplier: {:?}",
            status.network
        );
    }
    drop(nodes);
}
