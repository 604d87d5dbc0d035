//! After the cluster is formed: endpoints built again for the local devices, and nodes that
//! come back. A node that was lost (a crash, a restart) connects again like at join time: the
//! node whose name sorts first dials (here: [`redial`], started when the peer was lost), the
//! other accepts ([`admit`], from the accept loop). Both paths run the full handshake (the
//! cluster CA, the certificate naming the node, wire version, topology fingerprint) before
//! anything else. An admitted connection supersedes the earlier one of that name.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::unbounded_channel;
use tokio::time::Instant;

use super::hello::Hello;
use super::link::QuicLink;
use super::peer::{close_with, Routes};
use super::{close_code, handshake, ClusterMap, LostReason, NodeInner, Peer, PeerEvent};
use crate::memory::MemoryLink;
use crate::{Endpoint, Link, TransportError};

/// What [`super::QuicNode::join`] settled.
pub(crate) struct Joined {
    pub(crate) cluster: ClusterMap,
    /// This node's devices (global indices), in endpoint order.
    pub(crate) mine: Vec<usize>,
    /// Devices in the cluster.
    pub(crate) devices: usize,
    pub(crate) routes: Routes,
    pub(crate) hello: Hello,
}

/// How long a redial waits between attempts.
const REDIAL_PAUSE: Duration = Duration::from_millis(500);

/// New endpoints for every local device (see [`super::QuicNode::endpoints`]).
pub(crate) fn endpoints(inner: &Arc<NodeInner>) -> Result<Vec<Endpoint>, TransportError> {
    let joined = inner.joined.get().ok_or_else(|| TransportError::Node {
        node: inner.name.clone(),
        message: "endpoints before join completed".into(),
    })?;
    let mut inboxes = HashMap::new();
    let mut txs = vec![None; joined.devices];
    for &d in &joined.mine {
        let (t, r) = unbounded_channel();
        txs[d] = Some(t);
        inboxes.insert(d, r);
    }
    // The peers that host each remote device, as connected now.
    let mut by_device: Vec<Option<Arc<Peer>>> = vec![None; joined.devices];
    {
        let peers = inner.peers.lock().expect("peers lock");
        for p in peers.iter().flat_map(|p| p.values()) {
            for &d in &p.devices {
                by_device[d] = Some(p.clone());
            }
        }
    }
    *joined.routes.write().unwrap_or_else(|e| e.into_inner()) = txs.clone();
    let o = &inner.options;
    Ok(joined
        .mine
        .iter()
        .map(|&me| {
            let links = (0..joined.devices)
                .map(|d| match (&txs[d], &by_device[d]) {
                    (Some(tx), _) => Arc::new(MemoryLink::new(d, tx.clone())) as Arc<dyn Link>,
                    (None, Some(peer)) => QuicLink::spawn(
                        me,
                        d,
                        peer.clone(),
                        o.link_queue_frames,
                        o.link_queue_bytes,
                        o.max_frame_bytes,
                    ) as Arc<dyn Link>,
                    (None, None) => unreachable!("validated: every device is on one node"),
                })
                .collect();
            Endpoint {
                me,
                links,
                inbox: inboxes.remove(&me).expect("one inbox per local device"),
            }
        })
        .collect())
}

/// Makes `conn` (a completed handshake with node `name` after join) the node's connection to
/// `name`: an earlier connection of that name is failed and reported lost first, then
/// [`PeerEvent::Rejoined`].
pub(crate) fn admit(inner: &Arc<NodeInner>, name: String, conn: quinn::Connection) {
    let devices = inner.joined.get().and_then(|j| {
        let n = j.cluster.nodes.iter().find(|n| n.name == name)?;
        Some((n.devices.clone(), j.routes.clone()))
    });
    let Some((devices, routes)) = devices else {
        close_with(
            &conn,
            close_code::UNEXPECTED,
            "not a member of this cluster",
        );
        return;
    };
    let addr = conn.remote_address();
    let peer = Peer::new(name.clone(), devices, conn, routes);
    let old = {
        let mut peers = inner.peers.lock().expect("peers lock");
        match peers.as_mut() {
            Some(p) => p.insert(name.clone(), peer.clone()),
            None => None,
        }
    };
    if let Some(old) = old {
        if !old.is_lost() {
            old.fail(LostReason::Superseded, close_code::UNEXPECTED);
        }
        let reason = old.stats().lost.unwrap_or(LostReason::Superseded);
        old.publish_lost(inner, reason);
    }
    peer.start(inner.clone());
    tracing::info!(node = %inner.name, peer = %name, %addr, "peer rejoined");
    inner.publish(PeerEvent::Rejoined { node: name, addr });
}

/// Dials node `name` (lost; it sorts after this node, so this node dials) until a handshake
/// succeeds or this node closes; a refused or failed attempt is retried after a pause.
pub(crate) fn redial(inner: Arc<NodeInner>, name: String) {
    let Some(addr) = inner
        .joined
        .get()
        .and_then(|j| j.cluster.nodes.iter().find(|n| n.name == name).cloned())
    else {
        return;
    };
    tokio::spawn(async move {
        let Some(hello) = inner.joined.get().map(|j| j.hello.clone()) else {
            return;
        };
        loop {
            if inner.closing.load(Ordering::SeqCst) {
                return;
            }
            let current = inner
                .peers
                .lock()
                .expect("peers lock")
                .as_ref()
                .and_then(|p| p.get(&name).cloned());
            if current.is_some_and(|p| !p.is_lost()) {
                return; // connected again meanwhile
            }
            let waited = inner.options.join_timeout;
            let deadline = Instant::now() + waited.min(Duration::from_secs(10));
            match handshake::dial(&inner, &addr, &hello, deadline, waited).await {
                Ok(conn) if !inner.closing.load(Ordering::SeqCst) => {
                    return admit(&inner, name, conn);
                }
                Ok(conn) => return close_with(&conn, close_code::SHUTDOWN, "node shutting down"),
                Err(e) => {
                    tracing::debug!(node = %inner.name, peer = %name, error = %e, "redial failed; trying again");
                }
            }
            tokio::time::sleep(REDIAL_PAUSE).await;
        }
    });
}
