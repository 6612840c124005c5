//! `bitdust list`: the versions in the catalog, from the running node or the database.

use bitdust::node::home::Home;
use bitdust::node::offline;
use bitdust::node::units::ByteSize;

pub fn run(home: &Home, json: bool) -> anyhow::Result<()> {
    let list = match super::if_running(home, |client| client.list())? {
        Some(list) => list,
        None => offline::list(home)?,
    };
    if json {
        // As a JSON value: keys in the order they always had.
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::to_value(&list)?)?
        );
        return Ok(());
    }
    if list.versions.is_empty() {
        println!("no backups yet");
        return Ok(());
    }
    println!(
        "{:<40} {:>8}  {:<20} {:>8} {:>10} {:>10}",
        "SOURCE", "VERSION", "DATE (UTC)", "FILES", "SIZE", "NEW"
    );
    for v in &list.versions {
        let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(v.finished_at);
        println!(
            "{:<40} {:>8}  {:<20} {:>8} {:>10} {:>10}",
            super::shown(&v.source),
            v.snapshot,
            humantime::format_rfc3339_seconds(when).to_string(),
            v.files,
            ByteSize(v.bytes).to_string(),
            ByteSize(v.new_bytes).to_string(),
        );
    }
    Ok(())
}
