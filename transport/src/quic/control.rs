//! The control channel between two nodes: one long-lived unidirectional stream per direction,
//! opened with the first message, at a higher send priority than the activation streams (so a
//! control message overtakes queued multi-MiB frames). Each message is
//! `[u32 LE length][rkyv ControlMessage]`, the length at most
//! [`QuicOptions::max_control_bytes`](crate::QuicOptions::max_control_bytes). The sender queues
//! into an unbounded channel drained by one writer task per peer; the reader validates every
//! message (size, bytecheck, tensors, which node each named device is on) and hands it to the
//! node's control inbox.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use rkyv::util::AlignedVec;
use tokio::io::AsyncRead;
use tokio::sync::mpsc;

use super::wire::{io_fail, read_prefix, STREAM_CONTROL};
use super::{NodeInner, Peer, ReadFail};
use crate::control::{decode_aligned, encode_control};
use crate::{ControlMessage, TransportError};

/// quinn sends data of higher-priority streams first; activation streams have priority 0.
const CONTROL_PRIORITY: i32 = 1;

/// Control traffic of one peer (bytes: length prefix + archive).
#[derive(Debug, Default)]
pub(crate) struct ControlCounters {
    pub(crate) sent_messages: AtomicU64,
    pub(crate) sent_bytes: AtomicU64,
    pub(crate) received_messages: AtomicU64,
    pub(crate) received_bytes: AtomicU64,
}

/// What the writer puts on the control stream.
pub(crate) enum Outgoing {
    /// One encoded message (the writer adds the length prefix).
    Message(Bytes),
    /// Bytes as they are (test hook).
    #[cfg(feature = "test-hooks")]
    Raw(Bytes),
}

/// Sends control messages to one peer node; cheap to clone (a remote device proxy can hold one).
/// Obtained from [`QuicNode::control_sender`](crate::QuicNode::control_sender) after
/// [`QuicNode::join`](crate::QuicNode::join). Messages sent through any sender of this node to
/// the same peer arrive in the order they were queued.
#[derive(Clone)]
pub struct ControlSender {
    peer: Arc<Peer>,
    node: Arc<NodeInner>,
}

impl std::fmt::Debug for ControlSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlSender")
            .field("from", &self.node.name)
            .field("to", &self.peer.name)
            .finish_non_exhaustive()
    }
}

impl ControlSender {
    pub(crate) fn new(peer: Arc<Peer>, node: Arc<NodeInner>) -> Self {
        Self { peer, node }
    }

    /// The peer node's name.
    pub fn node(&self) -> &str {
        &self.peer.name
    }

    /// Whether the connection to the peer is known to be lost.
    pub fn is_lost(&self) -> bool {
        self.peer.is_lost()
    }

    /// Validates, encodes and queues `msg` without blocking (the queue is unbounded: control
    /// traffic is a few messages per step). Errors, all naming the node:
    /// [`TransportError::NodeGone`] once the connection is lost,
    /// [`TransportError::InvalidControl`] for a message the peer would refuse (a tensor whose
    /// shape does not match its data; a `Begin` for a device not on the peer; a `BeginAck`,
    /// `StageFinished`, `DeviceFailed` or `NodeReady` naming a device or node other than this
    /// one's), [`TransportError::ControlTooLarge`] above the size limit. `Ok` means queued: a
    /// connection lost before the write completes drops the message, and the loss is reported
    /// as [`PeerEvent::Lost`](crate::PeerEvent::Lost).
    pub fn send(&self, msg: &ControlMessage) -> Result<(), TransportError> {
        let name = &self.peer.name;
        if self.peer.is_lost() {
            return Err(self.gone());
        }
        let invalid = |message: String| TransportError::InvalidControl {
            node: Some(name.clone()),
            message,
        };
        check_route(
            msg,
            (&self.node.name, &|d| self.peer.is_local(d)),
            (name, &|d| self.peer.devices.contains(&d)),
        )
        .map_err(invalid)?;
        let body = encode_control(msg).map_err(|e| match e {
            TransportError::InvalidControl { message, .. } => invalid(message),
            other => other,
        })?;
        let max = self.node.options.max_control_bytes;
        if body.len() > max {
            return Err(TransportError::ControlTooLarge {
                node: name.clone(),
                bytes: body.len(),
                max,
            });
        }
        self.peer
            .control_tx
            .send(Outgoing::Message(Bytes::from(body)))
            .map_err(|_| self.gone())
    }

    fn gone(&self) -> TransportError {
        TransportError::NodeGone {
            node: self.peer.name.clone(),
            reason: self.peer.lost_text(),
        }
    }
}

/// A node and a test for "this device is on it".
type Side<'a> = (&'a str, &'a dyn Fn(usize) -> bool);

/// Checks that the devices a message names are where the protocol says: a `Begin` names a device
/// of the receiving node; a `BeginAck`, `StageFinished`, `DeviceFailed` or `Checkpoint` one of the sending
/// node; a `NodeReady` the sending node and some of its devices.
pub(crate) fn check_route(
    msg: &ControlMessage,
    sender: Side<'_>,
    receiver: Side<'_>,
) -> Result<(), String> {
    let on = |d: u32, (node, has): Side<'_>| {
        if has(d as usize) {
            Ok(())
        } else {
            Err(format!(
                "{} names device {d}, which is not on node {node}",
                msg.name()
            ))
        }
    };
    match msg {
        ControlMessage::Begin { device, .. } => on(*device, receiver),
        ControlMessage::BeginAck { device, .. }
        | ControlMessage::StageFinished { device, .. }
        | ControlMessage::DeviceFailed { device, .. }
        | ControlMessage::Checkpoint { device, .. } => on(*device, sender),
        ControlMessage::NodeReady { node, devices } => {
            if node != sender.0 {
                return Err(format!(
                    "NodeReady names node {node} but comes from node {}",
                    sender.0
                ));
            }
            devices.iter().try_for_each(|&d| on(d, sender))
        }
        ControlMessage::Abort { .. }
        | ControlMessage::StepDone { .. }
        | ControlMessage::Reconfigure { .. }
        | ControlMessage::Reconfigured { .. } => Ok(()),
    }
}

/// Drains `rx` onto the peer's control stream until the connection closes or a write fails
/// (which fails the connection). On exit the queue closes, so senders get `NodeGone`.
pub(crate) async fn write_loop(peer: Arc<Peer>, mut rx: mpsc::UnboundedReceiver<Outgoing>) {
    let mut stream: Option<quinn::SendStream> = None;
    loop {
        let out = tokio::select! {
            biased;
            _ = peer.conn.closed() => break,
            o = rx.recv() => match o { Some(o) => o, None => break },
        };
        if stream.is_none() {
            match open(&peer).await {
                Ok(s) => stream = Some(s),
                Err(e) => {
                    peer.stream_failed(format!("opening the control stream: {e}"));
                    break;
                }
            }
        }
        let s = stream.as_mut().expect("opened above");
        let (mut chunks, message) = match out {
            Outgoing::Message(body) => {
                let prefix = (body.len() as u32).to_le_bytes(); // checked against the limit
                (vec![Bytes::copy_from_slice(&prefix), body], true)
            }
            #[cfg(feature = "test-hooks")]
            Outgoing::Raw(bytes) => (vec![bytes], false),
        };
        let n: usize = chunks.iter().map(Bytes::len).sum();
        if let Err(e) = s.write_all_chunks(&mut chunks).await {
            peer.stream_failed(format!("writing to the control stream: {e}"));
            break;
        }
        if message {
            peer.control.sent_messages.fetch_add(1, Ordering::Relaxed);
            peer.control
                .sent_bytes
                .fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    rx.close();
}

async fn open(peer: &Peer) -> Result<quinn::SendStream, String> {
    let mut s = peer.conn.open_uni().await.map_err(|e| e.to_string())?;
    s.set_priority(CONTROL_PRIORITY)
        .map_err(|e| e.to_string())?;
    s.write_all(&[STREAM_CONTROL])
        .await
        .map_err(|e| e.to_string())?;
    Ok(s)
}

/// Reads the peer's control stream (its kind byte already read) until it ends, handing each
/// message to the node's control inbox. `Err` is a malformed message: the caller closes the
/// connection.
pub(crate) async fn read_loop(
    peer: &Peer,
    mut stream: quinn::RecvStream,
    node: &NodeInner,
) -> Result<(), String> {
    let mut buf = AlignedVec::<16>::new();
    let max = node.options.max_control_bytes;
    for index in 0u64.. {
        let (msg, n) = match read_message(&mut stream, &mut buf, max).await {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(()),
            Err(ReadFail::Closed(e)) => {
                tracing::debug!(node = %node.name, peer = %peer.name, error = %e, "control stream closed");
                return Ok(());
            }
            Err(ReadFail::Malformed(m)) => return Err(format!("message {index}: {m}")),
        };
        check_route(
            &msg,
            (&peer.name, &|d| peer.devices.contains(&d)),
            (&node.name, &|d| peer.is_local(d)),
        )
        .map_err(|m| format!("message {index}: {m}"))?;
        peer.control
            .received_messages
            .fetch_add(1, Ordering::Relaxed);
        peer.control
            .received_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
        tokio::select! {
            biased;
            r = node.control_tx.send((peer.name.clone(), msg)) => if r.is_err() {
                tracing::debug!(node = %node.name, "control inbox closed; message dropped");
            },
            _ = peer.conn.closed() => return Ok(()),
        }
    }
    Ok(())
}

/// Reads one `[u32 LE length][archive]` message: `Ok(None)` at a clean end of stream, the
/// message and its bytes on the wire otherwise. `buf` is a reusable aligned buffer.
pub(crate) async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut AlignedVec<16>,
    max: usize,
) -> Result<Option<(ControlMessage, usize)>, ReadFail> {
    let Some(len) = read_prefix(r, "a control message (length)").await? else {
        return Ok(None);
    };
    let len = len as usize;
    if len == 0 || len > max {
        return Err(ReadFail::Malformed(format!(
            "control message length {len} outside 1..={max}"
        )));
    }
    buf.clear();
    buf.resize(len, 0);
    tokio::io::AsyncReadExt::read_exact(r, &mut buf[..])
        .await
        .map_err(|e| io_fail(e, "a control message"))?;
    let msg = decode_aligned(buf).map_err(ReadFail::Malformed)?;
    Ok(Some((msg, 4 + len)))
}

#[cfg(test)]
mod tests;
