//! Forming the cluster: validate the map, dial the peers whose names sort after ours, accept the
//! ones before, wait for all handshakes, then build the peers, links and endpoints.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::sync::Semaphore;
use tokio::time::{timeout_at, Instant};

use super::handshake::{self, Accepted};
use super::hello::Hello;
use super::peer::{close_with, Routes};
use super::rejoin::{self, Joined};
use super::{close_code, ClusterMap, NodeAddr, NodeInner, Peer, PeerEvent};
use crate::pki::check_node_name;
use crate::{Endpoint, TransportError};

/// Result of one dial or accept, for the join collector.
type Handshaken = Result<(String, quinn::Connection), TransportError>;

/// Checks the map and returns this node's entry and the device count.
fn validate<'a>(
    cluster: &'a ClusterMap,
    me: &str,
) -> Result<(&'a NodeAddr, usize), TransportError> {
    let bad = |m: String| TransportError::Config { message: m };
    let mut names = Vec::new();
    let mut seen = Vec::new();
    for n in &cluster.nodes {
        check_node_name(&n.name)?;
        if names.contains(&n.name.as_str()) {
            return Err(bad(format!(
                "node {} appears twice in the cluster map",
                n.name
            )));
        }
        names.push(n.name.as_str());
        seen.extend(n.devices.iter().map(|&d| (d, n.name.as_str())));
    }
    let count = seen.len();
    seen.sort();
    for w in seen.windows(2) {
        if w[0].0 == w[1].0 {
            return Err(bad(format!(
                "device {} is on nodes {} and {}",
                w[0].0, w[0].1, w[1].1
            )));
        }
    }
    if let Some(&(d, n)) = seen.iter().find(|(d, _)| *d >= count) {
        return Err(bad(format!(
            "device {d} on node {n}: devices must be numbered 0..{count}"
        )));
    }
    if count > u32::MAX as usize {
        return Err(bad(format!("{count} devices do not fit the wire format")));
    }
    let mine = cluster
        .nodes
        .iter()
        .find(|n| n.name == me)
        .ok_or_else(|| bad(format!("this node ({me}) is not in the cluster map")))?;
    Ok((mine, count))
}

/// See [`super::QuicNode::join`].
pub(crate) async fn join(
    inner: &Arc<NodeInner>,
    cluster: &ClusterMap,
) -> Result<Vec<Endpoint>, TransportError> {
    let (mine, devices) = validate(cluster, &inner.name)?;
    {
        let mut peers = inner.peers.lock().expect("peers lock");
        if peers.is_some() {
            return Err(TransportError::Node {
                node: inner.name.clone(),
                message: "join was already called".into(),
            });
        }
        *peers = Some(HashMap::new());
    }
    let hello = Hello {
        version: inner.options.wire_version,
        fingerprint: cluster.fingerprint,
        name: inner.name.clone(),
    };
    let waited = inner.options.join_timeout;
    let deadline = Instant::now() + waited;
    let others: Vec<&NodeAddr> = cluster
        .nodes
        .iter()
        .filter(|n| n.name != inner.name)
        .collect();
    let (tx, mut rx) = mpsc::channel::<Handshaken>(others.len().max(1));

    let dialers: Vec<String> = others
        .iter()
        .filter(|n| n.name < inner.name)
        .map(|n| n.name.clone())
        .collect();
    tokio::spawn(accept_loop(
        inner.clone(),
        hello.clone(),
        dialers,
        tx.clone(),
        deadline,
    ));
    for peer in others.iter().filter(|n| n.name > inner.name) {
        let (inner, peer, hello, tx) = (inner.clone(), (*peer).clone(), hello.clone(), tx.clone());
        tokio::spawn(async move {
            let r = handshake::dial(&inner, &peer, &hello, deadline, waited).await;
            let _ = tx.send(r.map(|c| (peer.name.clone(), c))).await;
        });
    }
    drop(tx);

    let mut conns: HashMap<String, quinn::Connection> = HashMap::new();
    // Every node still missing, not only the one whose dial gave up first.
    let all_missing = |conns: &HashMap<String, quinn::Connection>| {
        let mut missing = others.iter().filter(|n| !conns.contains_key(&n.name));
        let first = missing.next().expect("a peer is missing");
        TransportError::JoinTimeout {
            node: first.name.clone(),
            addr: first.addr,
            others: missing
                .map(|n| format!("{} at {}", n.name, n.addr))
                .collect(),
            waited,
        }
    };
    while conns.len() < others.len() {
        let failure = match timeout_at(deadline, rx.recv()).await {
            Ok(Some(Ok((name, conn)))) => {
                match conns.entry(name) {
                    Entry::Occupied(_) => {
                        close_with(&conn, close_code::UNEXPECTED, "duplicate connection")
                    }
                    Entry::Vacant(v) => {
                        v.insert(conn);
                    }
                }
                continue;
            }
            Ok(Some(Err(TransportError::JoinTimeout { .. }))) => all_missing(&conns),
            Ok(Some(Err(e))) => e,
            Ok(None) => TransportError::Node {
                node: inner.name.clone(),
                message: "the endpoint closed while joining".into(),
            },
            Err(_) => all_missing(&conns),
        };
        for c in conns.values() {
            close_with(
                c,
                close_code::HANDSHAKE,
                &format!("node {} failed to join", inner.name),
            );
        }
        return Err(failure);
    }
    drop(rx); // from now on the accept loop admits members that come back (rejoin::admit)

    // The local devices' inboxes (filled by `endpoints`), then the peers (whose readers route
    // into them).
    let routes: Routes = Arc::new(std::sync::RwLock::new(vec![None; devices]));
    let mut peers = HashMap::new();
    for n in &others {
        let conn = conns.remove(&n.name).expect("every peer connected");
        let peer = Peer::new(n.name.clone(), n.devices.clone(), conn, routes.clone());
        peers.insert(n.name.clone(), peer);
    }
    let joined = Joined {
        cluster: cluster.clone(),
        mine: mine.devices.clone(),
        devices,
        routes,
        hello,
    };
    if inner.joined.set(joined).is_err() {
        unreachable!("join runs once (checked above)");
    }
    *inner.peers.lock().expect("peers lock") = Some(peers.clone());
    let endpoints = rejoin::endpoints(inner)?;
    for p in peers.values() {
        p.start(inner.clone());
        tracing::info!(node = %inner.name, peer = %p.name, addr = %p.addr, "peer joined");
        inner.publish(PeerEvent::Connected {
            node: p.name.clone(),
            addr: p.addr,
        });
    }
    Ok(endpoints)
}

/// Accepts connections for the node's lifetime. While joining, members that dial us are handed
/// to the collector; afterwards (the collector gone) a member that comes back is admitted again
/// ([`rejoin::admit`]). Strangers are always
/// refused and reported as [`PeerEvent::Refused`].
async fn accept_loop(
    inner: Arc<NodeInner>,
    hello: Hello,
    dialers: Vec<String>,
    tx: mpsc::Sender<Handshaken>,
    join_deadline: Instant,
) {
    let hello = Arc::new(hello);
    let dialers = Arc::new(dialers);
    let slots = Arc::new(Semaphore::new(inner.options.max_pending_handshakes));
    while let Some(incoming) = inner.endpoint.accept().await {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            let addr = incoming.remote_address();
            incoming.refuse();
            let reason = format!(
                "{} handshakes already in progress (max_pending_handshakes)",
                inner.options.max_pending_handshakes
            );
            tracing::debug!(node = %inner.name, %addr, %reason, "refused a connection");
            inner.publish(PeerEvent::Refused { addr, reason });
            continue;
        };
        let (inner, hello, dialers, tx) =
            (inner.clone(), hello.clone(), dialers.clone(), tx.clone());
        tokio::spawn(async move {
            let _slot = slot; // held until this connection is admitted or refused
            let deadline = join_deadline.max(Instant::now() + inner.options.idle_timeout);
            let expected: Vec<&str> = dialers.iter().map(String::as_str).collect();
            let refused = match handshake::accept(incoming, &hello, &expected, deadline).await {
                Accepted::Joined { name, conn } => match tx.send(Ok((name.clone(), conn))).await {
                    Ok(()) => return,
                    // The cluster is formed: a member that comes back.
                    Err(e) => {
                        if let Ok((name, conn)) = e.0 {
                            rejoin::admit(&inner, name, conn);
                        }
                        return;
                    }
                },
                Accepted::Refused { addr, reason } => (addr, reason),
                Accepted::Failed(e) => {
                    let addr = match &e {
                        TransportError::Handshake { addr, .. }
                        | TransportError::Connect { addr, .. } => *addr,
                        _ => return,
                    };
                    let reason = e.to_string();
                    let _ = tx.send(Err(e)).await;
                    (addr, reason)
                }
            };
            tracing::warn!(node = %inner.name, addr = %refused.0, reason = %refused.1, "refused a connection");
            inner.publish(PeerEvent::Refused {
                addr: refused.0,
                reason: refused.1,
            });
        });
    }
}
