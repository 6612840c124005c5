//! `bitdust init` and `bitdust id`.

use std::net::SocketAddr;

use bitdust::node::home::Home;
use bitdust::node::offline;
use bitdust::node::units::ByteSize;

#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on for peers
    #[arg(long, default_value = "0.0.0.0:7771")]
    listen: SocketAddr,
    /// Name shown to friends [default: the host name]
    #[arg(long)]
    name: Option<String>,
    /// Disk space offered to friends, e.g. "8 GiB"
    #[arg(long, default_value = "8 GiB")]
    donate: String,
}

pub fn run(home: &Home, args: Args) -> anyhow::Result<()> {
    let donated = ByteSize::parse(&args.donate).map_err(|e| anyhow::anyhow!("--donate: {e}"))?;
    let name = args.name.unwrap_or_else(default_name);
    let (id, warning) = offline::init(home, &name, args.listen, donated)?;
    if let Some(warning) = warning {
        eprintln!("bitdust: warning: {warning}");
    }
    println!("{}", id.node_id);
    eprintln!(
        "bitdust: new node `{}` in {}; start it with `bitdust run --home {}`",
        id.name,
        home.root().display(),
        home.root().display()
    );
    Ok(())
}

/// `bitdust id`: the contact card (one line), or the whole identity as JSON.
pub fn id(home: &Home, json: bool) -> anyhow::Result<()> {
    let id = offline::id_card(home)?;
    if json {
        println!("{}", serde_json::to_value(&id)?);
    } else {
        println!("{}", id.card);
    }
    Ok(())
}

fn default_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "bitdust-node".into())
}
