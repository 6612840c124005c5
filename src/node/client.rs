//! A typed client of a running node's control socket, for the CLI, the demo and the tests: one
//! method per request, each answering the type the node sends (`status() -> NodeStatus`,
//! `backup(paths) -> Runs`, …). Blocking: each call runs on a small runtime of its own.

use std::path::PathBuf;

use serde::de::DeserializeOwned;

use super::control::{self, ControlError, Done, PeerAdded, Pong, Request, Runs, Versions};
use super::home::Home;
use crate::actors::status::{DrillStatus, NodeStatus};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The node answered with an error (its message).
    #[error("{0}")]
    Refused(String),
    #[error("the node answered with {what} this version cannot read: {cause}")]
    Unreadable {
        what: &'static str,
        cause: serde_json::Error,
    },
    #[error("cannot start the client's runtime: {0}")]
    Runtime(std::io::Error),
}

impl ClientError {
    /// No node runs on this home (no socket, or nothing listening on it).
    pub fn not_running(&self) -> bool {
        matches!(self, ClientError::Control(ControlError::NotRunning { .. }))
    }
}

/// What to restore, and where (see `Request::Restore`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreRequest {
    pub source: Option<String>,
    pub version: Option<u64>,
    /// Absolute directory to restore into.
    pub to: String,
    pub path: Option<String>,
    pub overwrite: bool,
}

/// A client of one home's control socket.
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// The client of the node running on `home` (nothing is opened until a request).
    pub fn connect(home: &Home) -> Client {
        Client {
            socket: home.control_socket(),
        }
    }

    /// Whether a node seems to run: its socket exists.
    pub fn socket_exists(&self) -> bool {
        self.socket.exists()
    }

    /// Sends one request; the node's data as sent, or its error as ours.
    pub fn request_json(&self, request: &Request) -> Result<serde_json::Value, ClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ClientError::Runtime)?;
        let response = runtime.block_on(control::call(&self.socket, request))?;
        if !response.ok {
            return Err(ClientError::Refused(
                response
                    .error
                    .unwrap_or_else(|| "the node refused the request".into()),
            ));
        }
        Ok(response.data.unwrap_or_default())
    }

    fn request<T: DeserializeOwned>(
        &self,
        request: &Request,
        what: &'static str,
    ) -> Result<T, ClientError> {
        let data = self.request_json(request)?;
        serde_json::from_value(data).map_err(|cause| ClientError::Unreadable { what, cause })
    }

    pub fn status(&self) -> Result<NodeStatus, ClientError> {
        self.request(&Request::Status, "a status")
    }

    /// Backs up these absolute directories (none: the configured sources).
    pub fn backup(&self, paths: Vec<String>) -> Result<Runs, ClientError> {
        self.request(&Request::Backup { paths }, "run numbers")
    }

    pub fn restore(&self, asked: RestoreRequest) -> Result<Runs, ClientError> {
        let request = Request::Restore {
            source: asked.source,
            version: asked.version,
            to: asked.to,
            path: asked.path,
            overwrite: asked.overwrite,
        };
        self.request(&request, "run numbers")
    }

    pub fn list(&self) -> Result<Versions, ClientError> {
        self.request(&Request::List, "a version list")
    }

    /// One restore drill now; its report (a failed file is not an error here).
    pub fn drill(&self) -> Result<DrillStatus, ClientError> {
        self.request(&Request::Drill, "a drill report")
    }

    pub fn peer_add(&self, card: &str, name: Option<&str>) -> Result<PeerAdded, ClientError> {
        let request = Request::PeerAdd {
            card: card.to_string(),
            name: name.map(str::to_string),
        };
        self.request(&request, "a peer")
    }

    pub fn peer_remove(&self, node_id: &str) -> Result<Done, ClientError> {
        let request = Request::PeerRemove {
            node_id: node_id.to_string(),
        };
        self.request(&request, "a node id")
    }

    pub fn peer_ping(&self, node_id: &str) -> Result<Pong, ClientError> {
        let request = Request::PeerPing {
            node_id: node_id.to_string(),
        };
        self.request(&request, "a round trip")
    }

    pub fn customer_drop(&self, node_id: &str) -> Result<Done, ClientError> {
        let request = Request::CustomerDrop {
            node_id: node_id.to_string(),
        };
        self.request(&request, "a node id")
    }
}
