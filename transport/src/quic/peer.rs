//! One connected peer node: its connection, its loss state, the readers of its streams (which
//! validate and route frames to local inboxes) and the monitor that turns a closed connection
//! into one [`PeerEvent::Lost`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use quinn::{ConnectionError, VarInt};
use rkyv::util::AlignedVec;
use tokio::sync::mpsc::UnboundedSender;

use super::{close_code, read_frame, LostReason, NodeInner, PeerEvent, PeerStats, ReadFail};
use crate::Frame;

/// Local inboxes by global device index (`None`: the device is not on this node).
pub(crate) type Routes = Arc<Vec<Option<UnboundedSender<Frame>>>>;

/// A connected peer node.
pub(crate) struct Peer {
    pub(crate) name: String,
    pub(crate) addr: SocketAddr,
    /// Global indices of the devices it hosts.
    pub(crate) devices: Vec<usize>,
    pub(crate) conn: quinn::Connection,
    lost: OnceLock<LostReason>,
    bytes_received: AtomicU64,
    messages_received: AtomicU64,
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
    pub(crate) fn new(name: String, devices: Vec<usize>, conn: quinn::Connection) -> Arc<Self> {
        Arc::new(Self {
            name,
            addr: conn.remote_address(),
            devices,
            conn,
            lost: OnceLock::new(),
            bytes_received: AtomicU64::new(0),
            messages_received: AtomicU64::new(0),
        })
    }

    /// Whether the connection is known to be gone.
    pub(crate) fn is_lost(&self) -> bool {
        self.lost.get().is_some()
    }

    /// Records why the connection fails (the first reason wins) and closes it.
    pub(crate) fn fail(&self, reason: LostReason, code: VarInt) {
        let text = match &reason {
            LostReason::Malformed { message } => format!("malformed frame: {message}"),
            other => other.to_string(),
        };
        let _ = self.lost.set(reason);
        close_with(&self.conn, code, &text);
    }

    /// Counters and state.
    pub(crate) fn stats(&self) -> PeerStats {
        PeerStats {
            messages_received: self.messages_received.load(Ordering::Relaxed),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
            lost: self.lost.get().cloned(),
            rtt: self.conn.rtt(),
        }
    }

    /// Starts the monitor (connection closed -> `Lost`) and the stream acceptor.
    pub(crate) fn start(self: &Arc<Self>, node: Arc<NodeInner>, routes: Routes) {
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
            tracing::warn!(node = %inner.name, peer = %peer.name, addr = %peer.addr, %reason, "peer connection lost");
            inner.publish(PeerEvent::Lost {
                node: peer.name.clone(),
                reason,
            });
        });
        let peer = self.clone();
        tokio::spawn(async move {
            while let Ok(stream) = peer.conn.accept_uni().await {
                tokio::spawn(
                    peer.clone()
                        .read_stream(stream, node.clone(), routes.clone()),
                );
            }
        });
    }

    /// Reads frames from one stream until it ends, routing each to its local inbox. A stream
    /// carries one (from, to) pair; anything invalid closes the connection.
    async fn read_stream(
        self: Arc<Self>,
        mut stream: quinn::RecvStream,
        node: Arc<NodeInner>,
        routes: Routes,
    ) {
        let mut hdr = AlignedVec::<16>::new();
        let mut pair: Option<(usize, usize)> = None;
        let max = node.options.max_frame_bytes;
        loop {
            let d = match read_frame(&mut stream, &mut hdr, max).await {
                Ok(Some(d)) => d,
                Ok(None) => return,
                Err(ReadFail::Closed(e)) => {
                    tracing::debug!(node = %node.name, peer = %self.name, error = %e, "stream closed");
                    return;
                }
                Err(ReadFail::Malformed(m)) => return self.malformed(&node, m),
            };
            let (from, to) = (d.frame.header.from, d.to);
            if !self.devices.contains(&from) {
                let m = format!(
                    "frame claims sender device {from}, not on node {}",
                    self.name
                );
                return self.malformed(&node, m);
            }
            let Some(Some(inbox)) = routes.get(to) else {
                let m = format!("frame for device {to}, not on node {}", node.name);
                return self.malformed(&node, m);
            };
            match pair {
                None => pair = Some((from, to)),
                Some(p) if p == (from, to) => {}
                Some(p) => {
                    let m = format!("stream of devices {p:?} carried a frame {from} -> {to}");
                    return self.malformed(&node, m);
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

    fn malformed(&self, node: &NodeInner, message: String) {
        tracing::warn!(node = %node.name, peer = %self.name, addr = %self.addr, %message, "closing connection: malformed frame");
        self.fail(LostReason::Malformed { message }, close_code::MALFORMED);
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
}
