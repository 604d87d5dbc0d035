//! One connected peer node: its connection, its loss state, the readers of its streams (which
//! validate and route frames to local inboxes, and control messages to the node's control
//! inbox), its control writer, and the monitor that turns a closed connection into one
//! [`PeerEvent::Lost`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use quinn::{ConnectionError, VarInt};
use rkyv::util::AlignedVec;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::control::{self, ControlCounters, Outgoing};
use super::wire::{STREAM_CONTROL, STREAM_FRAMES};
use super::{close_code, read_frame, LostReason, NodeInner, PeerEvent, PeerStats, ReadFail};
use crate::Frame;

/// Local inboxes by global device index (`None`: the device is not on this node). Replaced as a
/// whole when the node's devices get new endpoints ([`super::QuicNode::endpoints`]); readers
/// look a frame's inbox up when it arrives.
pub(crate) type Routes = Arc<RwLock<Vec<Option<UnboundedSender<Frame>>>>>;

/// A connected peer node.
pub(crate) struct Peer {
    pub(crate) name: String,
    pub(crate) addr: SocketAddr,
    /// Global indices of the devices it hosts.
    pub(crate) devices: Vec<usize>,
    pub(crate) conn: quinn::Connection,
    /// This node's inboxes (also says which devices are local).
    routes: Routes,
    lost: OnceLock<LostReason>,
    /// Whether its [`PeerEvent::Lost`] was published (once per peer: by its monitor, or by a
    /// new connection of the same node that supersedes it).
    lost_published: AtomicBool,
    bytes_received: AtomicU64,
    messages_received: AtomicU64,
    /// Control messages to the peer, drained by the control writer.
    pub(crate) control_tx: UnboundedSender<Outgoing>,
    control_rx: Mutex<Option<UnboundedReceiver<Outgoing>>>,
    /// Whether the peer opened its control stream (a second one is malformed).
    control_seen: AtomicBool,
    pub(crate) control: ControlCounters,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .field("lost", &self.lost.get())
            .finish_non_exhaustive()
    }
}

/// Longest close reason sent (a `CONNECTION_CLOSE` frame must fit in one packet).
const MAX_REASON: usize = 512;

/// Closes `conn` with `code` and `reason` (cut to fit a packet).
pub(crate) fn close_with(conn: &quinn::Connection, code: VarInt, reason: &str) {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    conn.close(code, &reason.as_bytes()[..end]);
}

/// The reason text of an application close, if `e` is one.
pub(crate) fn peer_close_reason(e: &ConnectionError) -> Option<String> {
    match e {
        ConnectionError::ApplicationClosed(c) => Some(String::from_utf8_lossy(&c.reason).into()),
        _ => None,
    }
}

impl Peer {
    /// A peer whose handshake succeeded; [`Peer::start`] runs its tasks.
    pub(crate) fn new(
        name: String,
        devices: Vec<usize>,
        conn: quinn::Connection,
        routes: Routes,
    ) -> Arc<Self> {
        let (control_tx, control_rx) = unbounded_channel();
        Arc::new(Self {
            name,
            addr: conn.remote_address(),
            devices,
            conn,
            routes,
            lost: OnceLock::new(),
            lost_published: AtomicBool::new(false),
            bytes_received: AtomicU64::new(0),
            messages_received: AtomicU64::new(0),
            control_tx,
            control_rx: Mutex::new(Some(control_rx)),
            control_seen: AtomicBool::new(false),
            control: ControlCounters::default(),
        })
    }

    /// Whether the connection is known to be gone.
    pub(crate) fn is_lost(&self) -> bool {
        self.lost.get().is_some()
    }

    /// Why the connection is gone, as text (also while the monitor has not recorded it yet).
    pub(crate) fn lost_text(&self) -> String {
        match (self.lost.get(), self.conn.close_reason()) {
            (Some(r), _) => r.to_string(),
            (None, Some(e)) => e.to_string(),
            (None, None) => "its connection is closing".into(),
        }
    }

    /// Whether global device `d` is on this node.
    pub(crate) fn is_local(&self, d: usize) -> bool {
        let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
        matches!(routes.get(d), Some(Some(_)))
    }

    /// Publishes this peer's [`PeerEvent::Lost`] unless it was already (first caller wins).
    pub(crate) fn publish_lost(&self, inner: &NodeInner, reason: LostReason) {
        if !self.lost_published.swap(true, Ordering::SeqCst) {
            inner.publish(PeerEvent::Lost {
                node: self.name.clone(),
                reason,
            });
        }
    }

    /// Fails the connection for a stream error, unless it is already closed (then the monitor
    /// reports the real cause, e.g. the idle timeout).
    pub(crate) fn stream_failed(&self, message: String) {
        if self.conn.close_reason().is_none() {
            self.fail(LostReason::Failed { message }, close_code::STREAM);
        }
    }

    /// Records why the connection fails (the first reason wins) and closes it.
    pub(crate) fn fail(&self, reason: LostReason, code: VarInt) {
        let text = reason.to_string();
        let _ = self.lost.set(reason);
        close_with(&self.conn, code, &text);
    }

    /// Counters and state.
    pub(crate) fn stats(&self) -> PeerStats {
        let path = self.conn.stats().path;
        PeerStats {
            path_mtu: path.current_mtu,
            lost_packets: path.lost_packets,
            congestion_window: path.cwnd,
            messages_received: self.messages_received.load(Ordering::Relaxed),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
            lost: self.lost.get().cloned(),
            rtt: self.conn.rtt(),
            control_messages_sent: self.control.sent_messages.load(Ordering::Relaxed),
            control_bytes_sent: self.control.sent_bytes.load(Ordering::Relaxed),
            control_messages_received: self.control.received_messages.load(Ordering::Relaxed),
            control_bytes_received: self.control.received_bytes.load(Ordering::Relaxed),
        }
    }

    /// Starts the monitor (connection closed -> `Lost`), the control writer and the stream
    /// acceptor.
    pub(crate) fn start(self: &Arc<Self>, node: Arc<NodeInner>) {
        let peer = self.clone();
        let inner = node.clone();
        tokio::spawn(async move {
            let err = peer.conn.closed().await;
            let reason = peer
                .lost
                .get_or_init(|| match err {
                    ConnectionError::TimedOut => LostReason::IdleTimeout,
                    ConnectionError::LocallyClosed => LostReason::Closed,
                    ConnectionError::ApplicationClosed(c) => LostReason::ClosedByPeer {
                        reason: String::from_utf8_lossy(&c.reason).into(),
                    },
                    other => LostReason::Failed {
                        message: other.to_string(),
                    },
                })
                .clone();
            let orderly = match &reason {
                LostReason::Closed => true,
                LostReason::ClosedByPeer { reason } => reason.ends_with("shut down"),
                _ => false,
            };
            if orderly {
                // An orderly close by either side: reported as an event, not warned about.
                tracing::info!(node = %inner.name, peer = %peer.name, addr = %peer.addr, %reason, "peer connection closed");
            } else {
                tracing::warn!(node = %inner.name, peer = %peer.name, addr = %peer.addr, %reason, "peer connection lost");
            }
            let closed_here = reason == LostReason::Closed;
            peer.publish_lost(&inner, reason);
            // The node whose name sorts first dials: when this one does, it dials the peer again
            // until it is back (a restarted node rejoins), unless this node closed it.
            if !closed_here && peer.name > inner.name {
                super::rejoin::redial(inner.clone(), peer.name.clone());
            }
        });
        let rx = self.control_rx.lock().expect("control lock").take();
        if let Some(rx) = rx {
            tokio::spawn(control::write_loop(self.clone(), rx));
        }
        let peer = self.clone();
        tokio::spawn(async move {
            while let Ok(stream) = peer.conn.accept_uni().await {
                tokio::spawn(peer.clone().read_any(stream, node.clone()));
            }
        });
    }

    /// Reads a stream's kind byte and then the stream; anything invalid closes the connection.
    async fn read_any(self: Arc<Self>, mut stream: quinn::RecvStream, node: Arc<NodeInner>) {
        let mut kind = [0u8; 1];
        if let Err(e) = stream.read_exact(&mut kind).await {
            // An empty stream carries nothing; a reset one is reported by the connection.
            tracing::debug!(node = %node.name, peer = %self.name, error = %e, "stream without a kind byte");
            return;
        }
        let r = match kind[0] {
            STREAM_FRAMES => self
                .read_frames(stream, &node)
                .await
                .map_err(|m| format!("activation stream: {m}")),
            STREAM_CONTROL if self.control_seen.swap(true, Ordering::Relaxed) => {
                Err("the peer opened a second control stream".into())
            }
            STREAM_CONTROL => control::read_loop(&self, stream, &node)
                .await
                .map_err(|m| format!("control stream: {m}")),
            k => Err(format!("unknown stream kind {k}")),
        };
        if let Err(message) = r {
            tracing::warn!(node = %node.name, peer = %self.name, addr = %self.addr, %message, "closing connection: malformed data");
            self.fail(LostReason::Malformed { message }, close_code::MALFORMED);
        }
    }

    /// Reads frames from one stream until it ends, routing each to its local inbox. A stream
    /// carries one (from, to) pair; `Err` says what was malformed.
    async fn read_frames(
        &self,
        mut stream: quinn::RecvStream,
        node: &NodeInner,
    ) -> Result<(), String> {
        let mut hdr = AlignedVec::<16>::new();
        let mut pair: Option<(usize, usize)> = None;
        let max = node.options.max_frame_bytes;
        loop {
            let d = match read_frame(&mut stream, &mut hdr, max).await {
                Ok(Some(d)) => d,
                Ok(None) => return Ok(()),
                Err(ReadFail::Closed(e)) => {
                    tracing::debug!(node = %node.name, peer = %self.name, error = %e, "stream closed");
                    return Ok(());
                }
                Err(ReadFail::Malformed(m)) => return Err(m),
            };
            let (from, to) = (d.frame.header.from, d.to);
            if !self.devices.contains(&from) {
                return Err(format!(
                    "frame claims sender device {from}, not on node {}",
                    self.name
                ));
            }
            let inbox = {
                let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
                routes.get(to).cloned().flatten()
            };
            let Some(inbox) = inbox else {
                return Err(format!("frame for device {to}, not on node {}", node.name));
            };
            match pair {
                None => pair = Some((from, to)),
                Some(p) if p == (from, to) => {}
                Some(p) => {
                    return Err(format!(
                        "stream of devices {p:?} carried a frame {from} -> {to}"
                    ))
                }
            }
            self.bytes_received
                .fetch_add(d.wire_bytes as u64, Ordering::Relaxed);
            self.messages_received.fetch_add(1, Ordering::Relaxed);
            if inbox.send(d.frame).is_err() {
                tracing::debug!(device = to, "inbox closed; frame dropped");
            }
        }
    }

    /// Writes `bytes` as they are on a new stream (test hook).
    #[cfg(feature = "test-hooks")]
    pub(crate) async fn send_raw(&self, bytes: &[u8]) -> Result<(), crate::TransportError> {
        let err = |e: String| crate::TransportError::Connect {
            node: self.name.clone(),
            addr: self.addr,
            message: e,
        };
        let mut s = self.conn.open_uni().await.map_err(|e| err(e.to_string()))?;
        s.write_all(bytes).await.map_err(|e| err(e.to_string()))?;
        s.finish().map_err(|e| err(e.to_string()))?;
        Ok(())
    }

    /// Queues `bytes` as they are on the control stream (test hook).
    #[cfg(feature = "test-hooks")]
    pub(crate) fn send_raw_control(&self, bytes: &[u8]) -> Result<(), crate::TransportError> {
        self.control_tx
            .send(Outgoing::Raw(bytes::Bytes::copy_from_slice(bytes)))
            .map_err(|_| crate::TransportError::NodeGone {
                node: self.name.clone(),
                reason: self.lost_text(),
            })
    }
}
