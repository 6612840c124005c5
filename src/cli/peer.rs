//! `bitdust peer add|remove|ping` and `bitdust customer drop`.

use bitdust::node::client::Client;
use bitdust::node::home::Home;
use bitdust::node::offline;

#[derive(clap::Subcommand)]
pub enum PeerCommand {
    /// Trust a friend, given their contact card (`bitdust id` on their node); works while the node runs
    Add {
        card: String,
        /// Local label for this friend
        #[arg(long)]
        name: Option<String>,
    },
    /// Stop trusting a friend: forget its card and close its sessions (remove it from
    /// [[peers]] in config.toml too, if it is listed there)
    Remove {
        /// The peer's node id (32 hex characters)
        node_id: String,
    },
    /// Measure the round trip to a connected peer
    Ping {
        /// The peer's node id (32 hex characters)
        node_id: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Subcommand)]
pub enum CustomerCommand {
    /// Stop storing for a customer: it is told, and its data is kept for the grace period
    Drop {
        /// The customer's node id (32 hex characters)
        node_id: String,
    },
}

pub fn run(home: &Home, command: PeerCommand) -> anyhow::Result<()> {
    match command {
        PeerCommand::Add { card, name } => add(home, &card, name.as_deref()),
        PeerCommand::Remove { node_id } => remove(home, &node_id),
        PeerCommand::Ping { node_id, json } => {
            let pong = Client::connect(home).peer_ping(&node_id)?;
            if json {
                println!("{}", serde_json::to_value(&pong)?);
            } else {
                println!("{:.2} ms", pong.rtt_ms);
            }
            Ok(())
        }
    }
}

pub fn customer(home: &Home, command: CustomerCommand) -> anyhow::Result<()> {
    match command {
        CustomerCommand::Drop { node_id } => {
            Client::connect(home).customer_drop(&node_id)?;
            println!("{node_id}");
            Ok(())
        }
    }
}

/// Adds a peer through the running node, or straight into the database when none runs.
fn add(home: &Home, card: &str, name: Option<&str>) -> anyhow::Result<()> {
    let node_id = offline::card_node(card)?;
    if super::if_running(home, |client| client.peer_add(card, name))?.is_none() {
        offline::add_peer(home, card, name)?;
    }
    println!("{node_id}");
    Ok(())
}

/// Removes a peer through the running node, or straight from the database when none runs.
fn remove(home: &Home, node_id: &str) -> anyhow::Result<()> {
    if super::if_running(home, |client| client.peer_remove(node_id))?.is_none() {
        offline::remove_peer(home, node_id)?;
    }
    println!("{node_id}");
    Ok(())
}
