//! The QUIC transport: one [`QuicNode`] per host, one connection per pair of nodes, one
//! unidirectional stream per (from device, to device) direction, and one control stream per
//! direction per pair of nodes. See the crate documentation for the invariants; this module
//! holds the node handle.
//!
//! Lifecycle: [`QuicNode::bind`] (socket and TLS configuration, nothing accepted yet), then
//! [`QuicNode::join`] on every node of the cluster (concurrently: each waits for all its peers),
//! which returns one [`Endpoint`] per local device. Control messages go out with
//! [`QuicNode::send_control`] (or a [`ControlSender`]) and come in on
//! [`QuicNode::control_inbox`]. Keep the `QuicNode` alive while its endpoints are used: dropping
//! it closes every connection.

mod control;
mod events;
mod handshake;
mod hello;
mod join;
mod link;
mod options;
mod peer;
mod rejoin;
mod tls;
mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use quinn::VarInt;
use tokio::sync::{broadcast, mpsc};

use crate::pki::check_node_name;
#[cfg(feature = "test-hooks")]
use crate::Frame;
use crate::{ControlMessage, Endpoint, NodeIdentity, TransportError};
pub use control::ControlSender;
pub use events::{LostReason, PeerEvent, PeerStats};
pub use options::{
    QuicOptions, ETHERNET_MAX_UDP_PAYLOAD, GSO_MAX_UDP_PAYLOAD, LOOPBACK_MAX_UDP_PAYLOAD,
};
pub(crate) use peer::Peer;
pub(crate) use wire::{encode_header, read_frame, ReadFail};

/// The protocol version announced in the handshake; nodes with another version refuse each other.
/// Version 2: every unidirectional stream starts with a kind byte (frames or control).
/// Version 5: frame headers name their purpose (`FrameLabel`: item input or collective call with
/// its group, operation and sequence number).
/// Version 6: `ControlMessage::Checkpoint` (the state after each step, for resuming a request),
/// `Reconfigure` / `Reconfigured` (devices restarted in new roles after a node is lost or rejoins).
pub const WIRE_VERSION: u32 = 6;

/// What the control inbox yields: the sending node's name and its message.
pub type ControlEnvelope = (String, ControlMessage);

/// Close codes carried by QUIC `CONNECTION_CLOSE` (the reason text says more).
pub(crate) mod close_code {
    use super::VarInt;
    /// The handshake refused the peer.
    pub(crate) const HANDSHAKE: VarInt = VarInt::from_u32(1);
    /// The peer sent a malformed frame or control message.
    pub(crate) const MALFORMED: VarInt = VarInt::from_u32(2);
    /// This node shut down.
    pub(crate) const SHUTDOWN: VarInt = VarInt::from_u32(3);
    /// A stream of this connection failed.
    pub(crate) const STREAM: VarInt = VarInt::from_u32(4);
    /// A connection arrived when none was expected (after join, or a duplicate).
    pub(crate) const UNEXPECTED: VarInt = VarInt::from_u32(5);
}

/// One node of the cluster as every node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddr {
    /// Node name: a DNS name, equal to the SAN of its certificate.
    pub name: String,
    /// Where its [`QuicNode`] listens.
    pub addr: SocketAddr,
    /// The global device indices it hosts.
    pub devices: Vec<usize>,
}

/// The whole cluster: every node, and an opaque fingerprint of the topology that all nodes must
/// share (e.g. a hash of the topology file and model), checked in the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterMap {
    /// Opaque bytes; two nodes with different fingerprints refuse each other.
    pub fingerprint: [u8; 32],
    /// Every node; device indices over all nodes must be exactly `0..N`, each once.
    pub nodes: Vec<NodeAddr>,
}

/// State shared by a node's handle and its tasks.
pub(crate) struct NodeInner {
    pub(crate) name: String,
    pub(crate) endpoint: quinn::Endpoint,
    pub(crate) client: quinn::ClientConfig,
    pub(crate) options: QuicOptions,
    pub(crate) events: broadcast::Sender<PeerEvent>,
    pub(crate) peers: Mutex<Option<HashMap<String, Arc<Peer>>>>,
    /// Where the control streams' readers deliver.
    pub(crate) control_tx: mpsc::Sender<ControlEnvelope>,
    /// The control inbox until [`QuicNode::control_inbox`] takes it.
    control_rx: Mutex<Option<mpsc::Receiver<ControlEnvelope>>>,
    /// What [`QuicNode::join`] settled: the map, the hello, the local inboxes.
    pub(crate) joined: OnceLock<rejoin::Joined>,
    /// Set when the node closes: no more dialing.
    pub(crate) closing: AtomicBool,
}

impl NodeInner {
    /// Publishes an event (nobody listening is fine).
    pub(crate) fn publish(&self, e: PeerEvent) {
        tracing::debug!(node = %self.name, event = %e, "peer event");
        let _ = self.events.send(e);
    }
}

/// One host of a QUIC cluster. See the module documentation for the lifecycle.
pub struct QuicNode {
    inner: Arc<NodeInner>,
    addr: SocketAddr,
}

impl std::fmt::Debug for QuicNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicNode")
            .field("name", &self.inner.name)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl QuicNode {
    /// Binds the node's UDP socket at `addr` (port 0 picks one) with its TLS identity. Must be
    /// called inside a tokio runtime; accepts nothing until [`QuicNode::join`].
    pub fn bind(
        identity: NodeIdentity,
        addr: SocketAddr,
        options: QuicOptions,
    ) -> Result<Self, TransportError> {
        check_node_name(&identity.name)?;
        options.validate()?;
        let max_udp_payload = options.max_udp_payload_for(addr.ip());
        let (server, client) = tls::configs(&identity, &options, max_udp_payload)?;
        let endpoint = bind_endpoint(server, addr, max_udp_payload, &options)?;
        let addr = endpoint.local_addr().map_err(|source| TransportError::Io {
            op: "read local address of",
            addr,
            source,
        })?;
        let (events, _) = broadcast::channel(256);
        let (control_tx, control_rx) = mpsc::channel(options.control_inbox_capacity);
        Ok(Self {
            inner: Arc::new(NodeInner {
                name: identity.name,
                endpoint,
                client,
                options,
                events,
                peers: Mutex::new(None),
                control_tx,
                control_rx: Mutex::new(Some(control_rx)),
                joined: OnceLock::new(),
                closing: AtomicBool::new(false),
            }),
            addr,
        })
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The bound address (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Peer events from now on. Subscribe before [`QuicNode::join`] to see every event; the
    /// current state is also in [`QuicNode::peer_stats`].
    pub fn subscribe(&self) -> broadcast::Receiver<PeerEvent> {
        self.inner.events.subscribe()
    }

    /// Connects to every other node of `cluster` (this node must be in it, under its name) and
    /// returns one [`Endpoint`] per local device, in the order of this node's `devices`: links
    /// to local devices are in-process, links to remote devices go over QUIC. Waits until every
    /// peer has completed the handshake; fails on the first refused handshake or after
    /// [`QuicOptions::join_timeout`]. Can be called once.
    pub async fn join(&self, cluster: &ClusterMap) -> Result<Vec<Endpoint>, TransportError> {
        join::join(&self.inner, cluster).await
    }

    /// New endpoints for every local device (same order as [`QuicNode::join`]'s), replacing the
    /// earlier ones: frames that arrive from now on go to the new inboxes (the old inboxes get
    /// nothing more), and the links reach each peer over its current connection (a node that
    /// rejoined is reached again; a lost one gives
    /// [`TransportError::PeerGone`]). For a runtime that restarts its devices with new roles
    /// (after a node is lost or rejoins). Fails before [`QuicNode::join`] completed.
    pub fn endpoints(&self) -> Result<Vec<Endpoint>, TransportError> {
        rejoin::endpoints(&self.inner)
    }

    /// Counters and state of peer node `node`, or `None` for a node it is not connected to.
    pub fn peer_stats(&self, node: &str) -> Option<PeerStats> {
        let peers = self.inner.peers.lock().expect("peers lock");
        peers.as_ref()?.get(node).map(|p| p.stats())
    }

    /// Closes every connection (peers see [`LostReason::ClosedByPeer`]) and the socket. Also
    /// done on drop.
    pub fn close(&self) {
        self.inner.closing.store(true, Ordering::SeqCst);
        self.inner.endpoint.close(
            close_code::SHUTDOWN,
            format!("node {} shut down", self.inner.name).as_bytes(),
        );
    }

    /// Closes every connection telling the peers `reason` (e.g. why this node cannot serve).
    pub fn close_with(&self, reason: &str) {
        self.inner.closing.store(true, Ordering::SeqCst);
        self.inner.endpoint.close(
            close_code::SHUTDOWN,
            format!("node {}: {reason}", self.inner.name).as_bytes(),
        );
    }

    /// Closes every connection and waits (at most `limit`) until the peers were told, so a
    /// process that exits right after still ends its connections cleanly instead of letting the
    /// peers time out.
    pub async fn close_and_wait(&self, limit: std::time::Duration) {
        self.close();
        let _ = tokio::time::timeout(limit, self.inner.endpoint.wait_idle()).await;
    }

    /// Validates, encodes and queues `msg` for peer node `node` without blocking; messages to
    /// one node arrive in the order queued, on a control stream separate from (and sent ahead
    /// of) the activation streams. Errors name the node: [`TransportError::Node`] before
    /// [`QuicNode::join`] completed or for a node this one is not connected to,
    /// [`TransportError::NodeGone`] once its connection is lost, and those of
    /// [`ControlSender::send`].
    pub fn send_control(&self, node: &str, msg: &ControlMessage) -> Result<(), TransportError> {
        self.control_sender(node)?.send(msg)
    }

    /// A cloneable handle that sends control messages to peer node `node` (for a remote device
    /// proxy); same errors as [`QuicNode::send_control`]. The handle keeps working while this
    /// `QuicNode` lives; after it is closed, sends fail with [`TransportError::NodeGone`].
    pub fn control_sender(&self, node: &str) -> Result<ControlSender, TransportError> {
        Ok(ControlSender::new(self.peer(node)?, self.inner.clone()))
    }

    /// The control messages received from every peer node, each with the sender's name, in
    /// order per sender. Take-once: the first call returns the receiver, later calls `None`.
    /// Messages that arrive before it is taken are kept (up to
    /// [`QuicOptions::control_inbox_capacity`]; beyond that the control streams' readers wait,
    /// which never delays activation frames). Every message was validated (size, bytecheck,
    /// tensor shapes, the devices it names are on the sending or this node as the protocol
    /// says); an invalid one closes that peer's connection ([`LostReason::Malformed`]) instead.
    pub fn control_inbox(&self) -> Option<mpsc::Receiver<ControlEnvelope>> {
        self.inner.control_rx.lock().expect("control lock").take()
    }

    /// The connected peer named `node`.
    fn peer(&self, node: &str) -> Result<Arc<Peer>, TransportError> {
        let peers = self.inner.peers.lock().expect("peers lock");
        peers
            .as_ref()
            .and_then(|p| p.get(node).cloned())
            .ok_or_else(|| TransportError::Node {
                node: self.inner.name.clone(),
                message: format!("not connected to node {node} (not a peer, or not joined yet)"),
            })
    }

    /// Test hook: opens a new stream to `node` and writes `bytes` on it as they are.
    #[cfg(feature = "test-hooks")]
    pub async fn send_raw_stream(&self, node: &str, bytes: &[u8]) -> Result<(), TransportError> {
        self.peer(node)?.send_raw(bytes).await
    }

    /// Test hook: queues `bytes` as they are on the control stream to `node` (after any control
    /// message queued before).
    #[cfg(feature = "test-hooks")]
    pub fn send_raw_control(&self, node: &str, bytes: &[u8]) -> Result<(), TransportError> {
        self.peer(node)?.send_raw_control(bytes)
    }
}

/// Fuzzing hook: reads `bytes` as an activation stream (frames until the end) as a node's stream
/// reader does; `Ok(frames)` or the reason the stream is malformed.
#[cfg(feature = "test-hooks")]
pub fn fuzz_frame_stream(bytes: &[u8], max_frame_bytes: usize) -> Result<usize, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let mut r = bytes;
        let mut hdr = rkyv::util::AlignedVec::<16>::new();
        let mut frames = 0;
        loop {
            match read_frame(&mut r, &mut hdr, max_frame_bytes).await {
                Ok(Some(_)) => frames += 1,
                Ok(None) => return Ok(frames),
                Err(ReadFail::Malformed(m)) => return Err(m),
                Err(ReadFail::Closed(m)) => return Err(m),
            }
        }
    })
}

/// Fuzzing hook: `frames` (each with its destination device) as an activation stream carries
/// them (a seed for [`fuzz_frame_stream`]).
#[cfg(feature = "test-hooks")]
pub fn fuzz_encode_frames(frames: &[(Frame, usize)]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for (f, to) in frames {
        out.extend_from_slice(&encode_header(f, *to)?);
        out.extend_from_slice(&f.payload);
    }
    Ok(out)
}

/// Fuzzing hook: the hello of node `name` (a seed for [`fuzz_hello`]).
#[cfg(feature = "test-hooks")]
pub fn fuzz_encode_hello(name: &str, fingerprint: [u8; 32]) -> Vec<u8> {
    hello::Hello {
        version: WIRE_VERSION,
        fingerprint,
        name: name.to_string(),
    }
    .encode()
}

/// Fuzzing hook: reads `bytes` as a handshake hello; `Ok` with the name, or why it is refused.
#[cfg(feature = "test-hooks")]
pub fn fuzz_hello(bytes: &[u8]) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let mut r = bytes;
        match hello::Hello::read(&mut r).await {
            Ok(h) => Ok(h.name),
            Err(Ok(m)) => Err(m),
            Err(Err(e)) => Err(e.to_string()),
        }
    })
}

impl Drop for QuicNode {
    fn drop(&mut self) {
        self.close();
    }
}

/// The node's UDP endpoint. The endpoint's `max_udp_payload_size` is what this node announces it
/// can receive; quinn's default (1472) would cap the peers' path-MTU discovery at Ethernet size
/// whatever the transport config says, so it is set to `max_udp_payload`. The socket buffers are
/// enlarged so that a burst of large datagrams is not dropped by the kernel.
fn bind_endpoint(
    server: quinn::ServerConfig,
    addr: SocketAddr,
    max_udp_payload: u16,
    options: &QuicOptions,
) -> Result<quinn::Endpoint, TransportError> {
    let io = |op| move |source| TransportError::Io { op, addr, source };
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(max_udp_payload)
        .map_err(|e| TransportError::Config {
            message: format!("max_udp_payload {max_udp_payload}: {e}"),
        })?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .map_err(io("open UDP socket for"))?;
    if addr.is_ipv6() {
        // Same behaviour as std's bind: an IPv6 address means IPv6 only is not forced.
        let _ = socket.set_only_v6(false);
    }
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = socket.set_recv_buffer_size(options.socket_buffer_bytes);
    let _ = socket.set_send_buffer_size(options.socket_buffer_bytes);
    socket
        .bind(&addr.into())
        .map_err(io("bind QUIC endpoint"))?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| io("bind QUIC endpoint")(std::io::Error::other("no tokio runtime")))?;
    quinn::Endpoint::new(config, Some(server), socket.into(), runtime)
        .map_err(io("bind QUIC endpoint"))
}
