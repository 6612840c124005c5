//! `bitdust drill`: one restore drill through the running node; fails when a file failed.

use anyhow::bail;
use bitdust::node::client::Client;
use bitdust::node::home::Home;

pub fn run(home: &Home, json: bool) -> anyhow::Result<()> {
    let drill = Client::connect(home).drill()?;
    let report = &drill.report;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::to_value(&drill)?)?
        );
    } else {
        println!(
            "drill of {} (version {}): {} files, {} bytes checked, {} fragments fetched, {:.1} s",
            super::shown(&report.source),
            report.snapshot,
            report.files,
            report.bytes,
            report.fragments_fetched,
            report.seconds
        );
        for failure in &report.failures {
            println!(
                "  FAILED {}: {}",
                super::shown(&failure.path),
                super::shown(&failure.reason)
            );
        }
    }
    if !report.passed() {
        bail!("the drill failed for {} file(s)", report.failures.len());
    }
    Ok(())
}
