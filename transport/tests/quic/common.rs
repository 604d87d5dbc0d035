//! Helpers: clusters of QUIC nodes on loopback (ephemeral ports), frames with checkable content.

#![allow(unreachable_pub)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::broadcast;
use transport::{
    generate_cluster_pki, ClusterMap, ClusterPki, Endpoint, Frame, FrameHeader, FrameLabel,
    NodeAddr, PeerEvent, QuicNode, QuicOptions, WireDType,
};

/// Loopback, port chosen by the OS.
pub fn local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Short timeouts so failure tests stay fast.
pub fn fast() -> QuicOptions {
    QuicOptions {
        idle_timeout: Duration::from_millis(500),
        keep_alive: Duration::from_millis(100),
        join_timeout: Duration::from_secs(5),
        ..QuicOptions::default()
    }
}

/// A frame from `from` with `n` f32 elements whose bytes encode (from, step, part).
pub fn frame(from: usize, step: u32, part: u32, n: usize) -> Frame {
    let seed = (from as u32) * 1_000_003 + step * 1009 + part;
    Frame {
        header: FrameHeader {
            request: 42,
            from,
            label: FrameLabel::Hidden { step, part },
            dtype: WireDType::F32,
            shape: vec![1, n as u32],
        },
        payload: (0..n * 4)
            .map(|i| (i as u32).wrapping_mul(31).wrapping_add(seed) as u8)
            .collect(),
    }
}

/// The cluster map of bound nodes, with `devices[i]` on `nodes[i]`.
pub fn map(nodes: &[&QuicNode], devices: &[Vec<usize>], fingerprint: [u8; 32]) -> ClusterMap {
    ClusterMap {
        fingerprint,
        nodes: nodes
            .iter()
            .zip(devices)
            .map(|(n, d)| NodeAddr {
                name: n.name().to_string(),
                addr: n.local_addr(),
                devices: d.clone(),
            })
            .collect(),
    }
}

/// Joins every node concurrently; returns each node with its join result.
pub async fn join_all(
    nodes: Vec<QuicNode>,
    maps: Vec<ClusterMap>,
) -> Vec<(QuicNode, Result<Vec<Endpoint>, transport::TransportError>)> {
    let handles: Vec<_> = nodes
        .into_iter()
        .zip(maps)
        .map(|(n, m)| {
            tokio::spawn(async move {
                let r = n.join(&m).await;
                (n, r)
            })
        })
        .collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// A joined cluster.
pub struct Cluster {
    pub nodes: Vec<QuicNode>,
    pub endpoints: Vec<Vec<Endpoint>>,
    pub events: Vec<broadcast::Receiver<PeerEvent>>,
    pub pki: ClusterPki,
}

/// Binds and joins nodes `names` hosting `devices`.
pub async fn cluster(names: &[&str], devices: &[Vec<usize>], options: QuicOptions) -> Cluster {
    let pki = generate_cluster_pki("test", names).unwrap();
    let nodes: Vec<QuicNode> = names
        .iter()
        .map(|n| QuicNode::bind(pki.identity(n).unwrap(), local(), options.clone()).unwrap())
        .collect();
    let events = nodes.iter().map(|n| n.subscribe()).collect();
    let m = map(&nodes.iter().collect::<Vec<_>>(), devices, [7; 32]);
    let joined = join_all(nodes, vec![m; names.len()]).await;
    let (nodes, endpoints) = joined.into_iter().map(|(n, r)| (n, r.unwrap())).unzip();
    Cluster {
        nodes,
        endpoints,
        events,
        pki,
    }
}

/// The next event matching `pred`, within `within`.
pub async fn next_event(
    rx: &mut broadcast::Receiver<PeerEvent>,
    within: Duration,
    pred: impl Fn(&PeerEvent) -> bool,
) -> PeerEvent {
    tokio::time::timeout(within, async {
        loop {
            let e = rx.recv().await.expect("event channel open");
            if pred(&e) {
                return e;
            }
        }
    })
    .await
    .expect("event did not come in time")
}

/// Receives one frame from an inbox within 5 s.
pub async fn recv(ep: &mut Endpoint) -> Frame {
    tokio::time::timeout(Duration::from_secs(5), ep.inbox.recv())
        .await
        .expect("frame did not arrive in time")
        .expect("inbox open")
}
