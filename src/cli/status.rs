//! `bitdust status`: the running node, one table per concern, then the monitor's view.

use std::fmt::Write as _;

use bitdust::actors::status::{BandwidthStatus, MonitorStatus, NodeStatus};
use bitdust::node::client::Client;
use bitdust::node::control::Request;
use bitdust::node::home::Home;
use bitdust::node::units::ByteSize;

pub fn run(home: &Home, json: bool) -> anyhow::Result<()> {
    let client = Client::connect(home);
    if json {
        // As the node sent it, so that a newer node's fields show too.
        let data = client.request_json(&Request::Status)?;
        println!("{}", serde_json::to_string_pretty(&data)?);
        return Ok(());
    }
    let status = client.status()?;
    print!("{}", super::shown_lines(&render_status(&status)));
    if let Some(health) = &status.health {
        print!("{}", super::shown_lines(&render_health(health)));
    }
    Ok(())
}

fn text(v: Option<&str>) -> String {
    v.unwrap_or("-").to_string()
}

fn size(b: u64) -> String {
    ByteSize(b).to_string()
}

/// The human form of `status`: one table per concern.
pub fn render_status(status: &NodeStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "node      {} ({})",
        status.node_id,
        text(status.name.as_deref())
    );
    let revision = status.revision.map_or("-".into(), |r| r.to_string());
    let _ = writeln!(out, "revision  {revision}");
    let _ = writeln!(out, "uptime    {}s", status.uptime_secs);
    if let Some(disk) = &status.disk {
        let _ = writeln!(out, "disk      {}", disk.line);
    }
    if let Some(bandwidth) = &status.bandwidth {
        let _ = writeln!(out, "bandwidth {}", bandwidth_line(bandwidth));
    }
    machines(&mut out, status);
    peers(&mut out, status);
    suppliers(&mut out, status);
    customers(&mut out, status);
    backups(&mut out, status);
    restores(&mut out, status);
    let counters = &status.network.counters;
    if !counters.is_empty() {
        let parts: Vec<String> = counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(out, "\ncounters: {}", parts.join(" "));
    }
    out
}

/// "up 1.2 MiB/s of 2 MiB/s (1 MiB/s per peer), down 40 KiB/s, unlimited; LAN unlimited".
pub fn bandwidth_line(b: &BandwidthStatus) -> String {
    let direction = |name: &str, now: u64, total: u64, per_peer: u64| {
        let limit = match (total, per_peer) {
            (0, 0) => ", unlimited".to_string(),
            (0, p) => format!(" ({}/s per peer)", size(p)),
            (t, 0) => format!(" of {}/s", size(t)),
            (t, p) => format!(" of {}/s ({}/s per peer)", size(t), size(p)),
        };
        format!("{name} {}/s{limit}", size(now))
    };
    let mut line = format!(
        "{}, {}",
        direction("up", b.upload_rate, b.upload_limit, b.per_peer_upload_limit),
        direction(
            "down",
            b.download_rate,
            b.download_limit,
            b.per_peer_download_limit
        )
    );
    let limited = [
        b.upload_limit,
        b.download_limit,
        b.per_peer_upload_limit,
        b.per_peer_download_limit,
    ]
    .iter()
    .any(|&limit| limit > 0);
    if limited && b.lan_unlimited {
        line.push_str("; LAN unlimited");
    }
    line
}

fn machines(out: &mut String, status: &NodeStatus) {
    let _ = writeln!(
        out,
        "\n{:<20} {:<8} {:<14} {:>8}",
        "MACHINE", "ID", "STATE", "FOR"
    );
    for m in &status.machines {
        let _ = writeln!(
            out,
            "{:<20} {:<8} {:<14} {:>7}s",
            m.actor, m.id, m.state, m.for_secs
        );
    }
}

fn peers(out: &mut String, status: &NodeStatus) {
    let network = &status.network;
    let _ = writeln!(out, "\nlistening on {}", text(network.listen.as_deref()));
    let _ = writeln!(
        out,
        "{:<32}  {:<14} {:<22} {:<13} {:>10} {:>10}",
        "PEER", "NAME", "ADDRESS", "SESSION", "IN", "OUT"
    );
    for p in &network.peers {
        let _ = writeln!(
            out,
            "{:<32}  {:<14} {:<22} {:<13} {:>10} {:>10}",
            p.node_id,
            p.name,
            text(p.address.as_deref()),
            p.session,
            size(p.bytes_in),
            size(p.bytes_out)
        );
    }
}

fn suppliers(out: &mut String, status: &NodeStatus) {
    let customer = &status.customer;
    let _ = writeln!(
        out,
        "\nsuppliers ({} data + {} parity)",
        customer.data_shards, customer.parity_shards
    );
    let _ = writeln!(
        out,
        "{:<9} {:<32}  {:<14}",
        "POSITION", "SUPPLIER", "CONTRACT"
    );
    for p in &customer.positions {
        let _ = writeln!(
            out,
            "{:<9} {:<32}  {:<14}",
            p.position,
            text(p.supplier.as_deref()),
            p.contract.to_string()
        );
    }
}

fn customers(out: &mut String, status: &NodeStatus) {
    let supplier = &status.supplier;
    let _ = writeln!(out, "\ncustomers (donating {})", size(supplier.donated));
    let _ = writeln!(
        out,
        "{:<32}  {:>10} {:>10} {:<10}",
        "CUSTOMER", "QUOTA", "USED", "STATE"
    );
    for c in &supplier.customers {
        let _ = writeln!(
            out,
            "{:<32}  {:>10} {:>10} {:<10}",
            c.node_id,
            size(c.quota),
            size(c.used),
            c.state
        );
    }
}

fn backups(out: &mut String, status: &NodeStatus) {
    let backup = &status.backup;
    if let Some(job) = &backup.running {
        let _ = writeln!(
            out,
            "\nbackup running: {} (snapshot {}) {}: {} files, {} read, {} new, {}/{} blocks placed, {} fragments waiting, redundancy {:+}",
            job.source,
            job.snapshot,
            job.state,
            job.files,
            size(job.bytes_read),
            size(job.new_bytes),
            job.blocks_complete,
            job.blocks,
            job.queued_fragments,
            job.worst_redundancy
        );
    }
    if !backup.queued.is_empty() {
        let _ = writeln!(out, "backups waiting: {}", backup.queued.join(", "));
    }
    if let Some(last) = backup.finished.last() {
        let _ = writeln!(
            out,
            "last backup: {} (snapshot {}) {}{}: {} files, {} new, {:.1} s, {} not backed up",
            last.source,
            last.snapshot,
            last.outcome,
            last.error
                .as_deref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default(),
            last.files,
            size(last.new_bytes),
            last.seconds,
            last.skipped.len()
        );
    }
}

fn restores(out: &mut String, status: &NodeStatus) {
    let restore = &status.restore;
    if let Some(job) = &restore.running {
        let _ = writeln!(
            out,
            "\nrestore running: {} (version {}) -> {} {}: {}/{} files, {} of {}, {}/{} blocks, {} fetched",
            job.source,
            job.snapshot,
            job.to,
            job.state,
            job.files_done,
            job.files_total,
            size(job.bytes_written),
            size(job.bytes_total),
            job.blocks_decoded,
            job.blocks,
            size(job.fetched_bytes)
        );
    }
    if let Some(last) = restore.finished.last() {
        let _ = writeln!(
            out,
            "last restore: {} (version {}) -> {}: {}: {} files, {} not restored",
            last.source,
            last.snapshot,
            last.to,
            last.outcome,
            last.files,
            last.failed.len()
        );
    }
}

/// The monitor's part of `status`: sources by health, each with its worst redundancy and
/// durability estimate, audits, the rebuild, firings and the last restore drill.
pub fn render_health(h: &MonitorStatus) -> String {
    let mut out = String::new();
    let count = |what: &str| h.sources.iter().filter(|s| s.health == what).count();
    let _ = writeln!(
        out,
        "
health: {} sources at full health, {} degraded, {} at risk, {} lost ({} rounds, {} audits passed, {} failed)",
        count("full"),
        count("degraded"),
        count("at risk"),
        count("lost"),
        h.rounds,
        h.audits_passed,
        h.audits_failed,
    );
    if !h.sources.is_empty() {
        let _ = writeln!(
            out,
            "{:<40} {:<9} {:>7} {:>10}  LOSS WITHIN A YEAR",
            "SOURCE", "HEALTH", "BLOCKS", "REDUNDANCY"
        );
    }
    for s in &h.sources {
        let _ = writeln!(
            out,
            "{:<40} {:<9} {:>7} {:>+10}  {}",
            s.source,
            s.health,
            s.blocks,
            s.worst_redundancy,
            text(s.loss_within_a_year_text.as_deref()),
        );
    }
    let r = &h.rebuild;
    let queued = h.rebuild_queued + r.in_flight;
    if queued > 0 || r.fragments_placed > 0 {
        let _ = writeln!(
            out,
            "rebuild: {} blocks waiting, {} rebuilt, {} fragments placed, {} failed",
            queued, r.blocks_rebuilt, r.fragments_placed, r.blocks_failed,
        );
    }
    for (position, reason) in &h.fired {
        let _ = writeln!(out, "fired: position {position} ({reason})");
    }
    for p in h.positions.iter().filter(|p| p.slow) {
        let _ = writeln!(
            out,
            "slow: position {} ({}) answers audits in {} ms, much slower than the others",
            p.position,
            text(p.supplier.as_deref()),
            p.latency_ms.unwrap_or(0),
        );
    }
    match &h.last_drill {
        Some(d) => {
            let _ = writeln!(
                out,
                "last restore drill: {} at {} (unix), {} files, {} verified byte for byte from {}",
                if d.passed { "passed" } else { "FAILED" },
                d.report.at,
                d.report.files,
                ByteSize(d.report.bytes),
                d.report.source,
            );
        }
        None => {
            let _ = writeln!(out, "last restore drill: none yet");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bandwidth_line_says_rates_limits_and_the_lan_exemption() {
        let mut b = BandwidthStatus {
            upload_rate: 3 << 19,
            upload_limit: 2 << 20,
            per_peer_download_limit: 1 << 20,
            lan_unlimited: true,
            ..BandwidthStatus::default()
        };
        assert_eq!(
            bandwidth_line(&b),
            "up 1536 KiB/s of 2 MiB/s, down 0 B/s (1 MiB/s per peer); LAN unlimited"
        );
        b = BandwidthStatus {
            download_rate: 2048,
            lan_unlimited: true,
            ..BandwidthStatus::default()
        };
        assert_eq!(
            bandwidth_line(&b),
            "up 0 B/s, unlimited, down 2 KiB/s, unlimited"
        );
    }
}
