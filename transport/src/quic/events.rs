//! What a node reports about its peers: [`PeerEvent`]s, [`LostReason`] and [`PeerStats`].

use std::net::SocketAddr;
use std::time::Duration;

/// Why a connection to a peer node is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LostReason {
    /// No packet within the idle timeout (the peer crashed, hangs or is unreachable).
    IdleTimeout,
    /// The peer sent a malformed, truncated or oversized frame or control message (or a stream
    /// of an unknown kind); this node closed the connection. The message says which stream.
    Malformed {
        /// What was wrong with the bytes.
        message: String,
    },
    /// The peer closed the connection (it shut down, or refused something this node sent).
    ClosedByPeer {
        /// The peer's reason.
        reason: String,
    },
    /// This node closed the connection (shutdown).
    Closed,
    /// The node connected again (a restarted process, or the same one after a pause) and the new
    /// connection replaced this one: a [`PeerEvent::Rejoined`] for the node follows.
    Superseded,
    /// Any other failure (transport error, reset, a stream that failed).
    Failed {
        /// The error.
        message: String,
    },
}

impl std::fmt::Display for LostReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LostReason::IdleTimeout => write!(f, "no packet within the idle timeout"),
            LostReason::Malformed { message } => write!(f, "malformed data: {message}"),
            LostReason::ClosedByPeer { reason } => write!(f, "closed by the peer: {reason}"),
            LostReason::Closed => write!(f, "closed by this node"),
            LostReason::Superseded => {
                write!(f, "superseded by a new connection from the same node")
            }
            LostReason::Failed { message } => write!(f, "{message}"),
        }
    }
}

/// Something that happened to a peer node; see [`QuicNode::subscribe`](super::QuicNode::subscribe).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerEvent {
    /// The handshake with `node` succeeded.
    Connected {
        /// The peer node.
        node: String,
        /// Its address.
        addr: SocketAddr,
    },
    /// The connection to `node` is gone; sends to its devices now return
    /// [`TransportError::PeerGone`](crate::TransportError::PeerGone) (control messages:
    /// [`TransportError::NodeGone`](crate::TransportError::NodeGone)). Published once per
    /// connection (a node that rejoins and is lost again is reported again).
    Lost {
        /// The peer node.
        node: String,
        /// Why.
        reason: LostReason,
    },
    /// Node `node`, lost earlier (or still believed connected), connected again after the
    /// cluster was formed (the same certificate, wire version and topology): it is a peer again,
    /// reached over the new connection. A connection it supersedes is reported `Lost` first.
    /// Devices reach it through new endpoints ([`QuicNode::endpoints`](super::QuicNode::endpoints)).
    Rejoined {
        /// The peer node.
        node: String,
        /// Its address.
        addr: SocketAddr,
    },
    /// An incoming connection was refused before it could join: no or an invalid certificate,
    /// a failed handshake, or a connection after the cluster was formed.
    Refused {
        /// Where it came from.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
}

impl std::fmt::Display for PeerEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerEvent::Connected { node, addr } => write!(f, "node {node} at {addr} connected"),
            PeerEvent::Rejoined { node, addr } => write!(f, "node {node} at {addr} rejoined"),
            PeerEvent::Lost { node, reason } => {
                write!(f, "connection to node {node} lost: {reason}")
            }
            PeerEvent::Refused { addr, reason } => {
                write!(f, "refused a connection from {addr}: {reason}")
            }
        }
    }
}

/// Counters and state of one peer node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStats {
    /// Activation frames received from the node's devices.
    pub messages_received: u64,
    /// Bytes of those frames on the wire (length prefix + header + payload).
    pub bytes_received: u64,
    /// Why the connection is gone, or `None` while it is up.
    pub lost: Option<LostReason>,
    /// The current round-trip estimate.
    pub rtt: Duration,
    /// The UDP payload size the connection currently uses (path-MTU discovery raises it from
    /// 1200 up to [`QuicOptions::max_udp_payload`](super::QuicOptions::max_udp_payload)).
    pub path_mtu: u16,
    /// Packets declared lost on the path so far.
    pub lost_packets: u64,
    /// The current congestion window in bytes.
    pub congestion_window: u64,
    /// Control messages written to the node's control stream.
    pub control_messages_sent: u64,
    /// Bytes of those messages (length prefix + archive).
    pub control_bytes_sent: u64,
    /// Control messages received from the node.
    pub control_messages_received: u64,
    /// Bytes of those messages (length prefix + archive).
    pub control_bytes_received: u64,
}
