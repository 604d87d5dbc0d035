//! Admission at scale (issue 15): a thousand connection attempts of each kind a running cluster
//! must refuse: an expired certificate of a member's name from the cluster's CA, a certificate
//! from another CA, a certificate from the cluster's CA for a name not in the topology, and a
//! member's valid certificate with another topology's fingerprint. None is admitted (the
//! members' own connections stay up and carry frames), and the cluster is not disturbed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use transport::{generate_cluster_pki, NodeAddr, NodeIdentity, QuicNode, QuicOptions};

use crate::common::{cluster, frame, local, recv};

/// Attempts of each kind (PIPEFUSE_STRANGERS overrides, e.g. for a longer drill).
fn attempts() -> usize {
    std::env::var("PIPEFUSE_STRANGERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_strangers_of_each_kind_are_refused_and_the_cluster_runs_on() {
    let opts = QuicOptions {
        idle_timeout: Duration::from_secs(5),
        keep_alive: Duration::from_millis(500),
        join_timeout: Duration::from_secs(5),
        ..QuicOptions::default()
    };
    let mut c = cluster(&["a", "b", "c"], &[vec![0], vec![1], vec![2]], opts.clone()).await;
    let b_addr = c.nodes[1].local_addr();
    let foreign = generate_cluster_pki("evil", &["a"]).unwrap();
    let real = |name: &str, cert: transport::NodeCert| NodeIdentity {
        name: name.into(),
        ca_cert_pem: c.pki.ca_cert_pem.clone(),
        cert_pem: cert.cert_pem,
        key_pem: cert.key_pem,
    };
    // Every stranger claims a name that sorts before b, so it dials b; b refuses it.
    // (kind, identity, fingerprint, what the refusal must say)
    let kinds: Vec<(&str, NodeIdentity, [u8; 32], &str)> = vec![
        (
            "expired certificate",
            real("a", c.pki.issue_expired("a").unwrap()),
            [7; 32],
            "certificate expired",
        ),
        (
            "another CA",
            NodeIdentity {
                ca_cert_pem: c.pki.ca_cert_pem.clone(),
                ..foreign.identity("a").unwrap()
            },
            [7; 32],
            "UnknownIssuer",
        ),
        (
            "a name not in the topology",
            real("aa", c.pki.issue("aa").unwrap()),
            [7; 32],
            "unexpected node name",
        ),
        (
            "another topology",
            c.pki.identity("a").unwrap(),
            [8; 32],
            "other topology",
        ),
    ];
    let n = attempts();
    let refused = Arc::new(AtomicUsize::new(0));
    let slots = Arc::new(tokio::sync::Semaphore::new(8));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (kind, id, fingerprint, why) in kinds {
        for _ in 0..n {
            let (id, refused, slots) = (id.clone(), refused.clone(), slots.clone());
            let o = QuicOptions {
                join_timeout: Duration::from_secs(10),
                ..opts.clone()
            };
            tasks.push(tokio::spawn(async move {
                let _slot = slots.acquire_owned().await.unwrap();
                let name = id.name.clone();
                let stranger = QuicNode::bind(id, local(), o).unwrap();
                let map = transport::ClusterMap {
                    fingerprint,
                    nodes: vec![
                        NodeAddr {
                            name,
                            addr: stranger.local_addr(),
                            devices: vec![0],
                        },
                        NodeAddr {
                            name: "b".into(),
                            addr: b_addr,
                            devices: vec![1],
                        },
                    ],
                };
                match stranger.join(&map).await {
                    Ok(_) => panic!("a stranger ({kind}) was admitted"),
                    Err(e) => {
                        let e = e.to_string();
                        assert!(e.contains(why), "{kind}: refused, but not for that: {e}");
                        if refused.fetch_add(1, Ordering::Relaxed) % 1000 == 0 {
                            eprintln!("{kind}: {e}");
                        }
                    }
                };
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = t0.elapsed().as_secs_f64();
    let total = refused.load(Ordering::Relaxed);
    eprintln!(
        "{total} strangers refused ({n} of each of 4 kinds) in {secs:.1} s: {:.0} attempts/s",
        total as f64 / secs
    );
    assert_eq!(total, 4 * n);
    // Nobody superseded a member: the members' first connections are up and carry frames.
    for (i, node) in c.nodes.iter().enumerate() {
        for peer in ["a", "b", "c"].iter().filter(|p| **p != node.name()) {
            let stats = node.peer_stats(peer).unwrap();
            assert!(
                stats.lost.is_none(),
                "node {i} lost {peer}: {:?}",
                stats.lost
            );
        }
    }
    for (from, to) in [(0, 1), (1, 2), (2, 0)] {
        c.endpoints[from][0].links[to]
            .send_async(frame(from, 3, 0, 32))
            .await
            .unwrap();
        assert_eq!(recv(&mut c.endpoints[to][0]).await, frame(from, 3, 0, 32));
    }
}
