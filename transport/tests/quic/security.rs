//! Admission: strangers, handshake mismatches, malformed frames from authenticated peers.

use std::time::Duration;

use transport::{
    generate_cluster_pki, LostReason, NodeIdentity, PeerEvent, QuicNode, QuicOptions,
    TransportError,
};

use crate::common::{cluster, fast, frame, join_all, local, map, next_event, recv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stranger_with_a_foreign_certificate_is_refused() {
    let mut c = cluster(&["b", "c"], &[vec![0], vec![1]], fast()).await;
    let b_addr = c.nodes[0].local_addr();
    let foreign = generate_cluster_pki("evil", &["a"]).unwrap();
    // Two strangers named "a" (sorts before "b", so it dials b): one trusts the real CA but has
    // a certificate from another CA, one lives entirely in another PKI.
    let half = NodeIdentity {
        ca_cert_pem: c.pki.ca_cert_pem.clone(),
        ..foreign.identity("a").unwrap()
    };
    for id in [half, foreign.identity("a").unwrap()] {
        let stranger = QuicNode::bind(id, local(), fast()).unwrap();
        let s_addr = stranger.local_addr();
        let mut m = map(&[&stranger], &[vec![0]], [7; 32]);
        m.nodes.push(transport::NodeAddr {
            name: "b".into(),
            addr: b_addr,
            devices: vec![1],
        });
        let err = stranger.join(&m).await.unwrap_err();
        let text = err.to_string();
        eprintln!("stranger: {text}");
        assert!(text.contains(&b_addr.to_string()), "{text}");
        assert!(matches!(err, TransportError::Connect { .. }), "{err:?}");
        let e = next_event(&mut c.events[0], Duration::from_secs(5), |e| {
            matches!(e, PeerEvent::Refused { .. })
        })
        .await;
        eprintln!("member: {e}");
        let PeerEvent::Refused { addr, reason } = e else {
            unreachable!()
        };
        assert_eq!(addr, s_addr, "{reason}");
    }
    // The members still talk.
    c.endpoints[1][0].links[0].send(frame(1, 5, 0, 64)).unwrap();
    assert_eq!(recv(&mut c.endpoints[0][0]).await, frame(1, 5, 0, 64));
    assert_eq!(c.nodes[0].peer_stats("c").unwrap().lost, None);
}

/// Binds "a" and "b" from one PKI with per-node options and fingerprints, joins both, and
/// returns both join errors.
async fn refused_pair(
    opts: [QuicOptions; 2],
    fingerprints: [[u8; 32]; 2],
    b_expects_name: Option<&str>,
) -> [String; 2] {
    let pki = generate_cluster_pki("t", &["a", "b"]).unwrap();
    let [oa, ob] = opts;
    let a = QuicNode::bind(pki.identity("a").unwrap(), local(), oa).unwrap();
    let b = QuicNode::bind(pki.identity("b").unwrap(), local(), ob).unwrap();
    let devices = [vec![0], vec![1]];
    let ma = map(&[&a, &b], &devices, fingerprints[0]);
    let mut mb = map(&[&a, &b], &devices, fingerprints[1]);
    if let Some(n) = b_expects_name {
        mb.nodes[0].name = n.into();
    }
    let joined = join_all(vec![a, b], vec![ma, mb]).await;
    let mut errs = joined.into_iter().map(|(_, r)| match r {
        Err(e) => e.to_string(),
        Ok(_) => panic!("join should fail"),
    });
    [errs.next().unwrap(), errs.next().unwrap()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_wire_version_is_refused_on_both_sides() {
    let newer = QuicOptions {
        wire_version: transport::WIRE_VERSION + 1,
        ..fast()
    };
    for e in refused_pair([fast(), newer], [[1; 32]; 2], None).await {
        eprintln!("{e}");
        assert!(e.contains("other wire version"), "{e}");
        assert!(e.contains("handshake with node"), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_topology_fingerprint_is_refused_on_both_sides() {
    for e in refused_pair([fast(), fast()], [[1; 32], [2; 32]], None).await {
        eprintln!("{e}");
        assert!(e.contains("other topology"), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unexpected_node_name_is_refused_on_both_sides() {
    // b's map calls its lower peer "a0", so the real "a" is not expected there.
    for e in refused_pair([fast(), fast()], [[1; 32]; 2], Some("a0")).await {
        eprintln!("{e}");
        assert!(e.contains("unexpected node name \"a\""), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frame_closes_only_that_connection() {
    let mut c = cluster(&["a", "b", "c"], &[vec![0], vec![1], vec![2]], fast()).await;
    c.nodes[0]
        .send_raw_stream("b", b"\x00\x10\x00\x00\x00this is not an rkyv header")
        .await
        .unwrap();
    // b closes its connection to a, naming a and what was wrong.
    let e = next_event(&mut c.events[1], Duration::from_secs(5), |e| {
        matches!(e, PeerEvent::Lost { .. })
    })
    .await;
    match &e {
        PeerEvent::Lost {
            node,
            reason: LostReason::Malformed { message },
        } => {
            eprintln!("b: {e}");
            assert_eq!(node, "a", "{message}");
            assert!(message.starts_with("activation stream: "), "{message}");
        }
        other => panic!("expected Lost(a, Malformed), got {other:?}"),
    }
    // a learns why.
    let e = next_event(&mut c.events[0], Duration::from_secs(5), |e| {
        matches!(e, PeerEvent::Lost { .. })
    })
    .await;
    match &e {
        PeerEvent::Lost {
            node,
            reason: LostReason::ClosedByPeer { reason },
        } => {
            eprintln!("a: {e}");
            assert!(node == "b" && reason.contains("malformed"), "{e}")
        }
        other => panic!("expected Lost(b, ClosedByPeer), got {other:?}"),
    }
    assert!(matches!(
        c.endpoints[0][0].links[1].send(frame(0, 0, 0, 4)),
        Err(TransportError::PeerGone { peer: 1, .. })
    ));
    // a <-> c and b <-> c still work.
    c.endpoints[0][0].links[2].send(frame(0, 1, 0, 4)).unwrap();
    c.endpoints[1][0].links[2].send(frame(1, 1, 0, 4)).unwrap();
    let mut got = vec![
        recv(&mut c.endpoints[2][0]).await,
        recv(&mut c.endpoints[2][0]).await,
    ];
    got.sort_by_key(|f| f.header.from);
    assert_eq!(got, vec![frame(0, 1, 0, 4), frame(1, 1, 0, 4)]);
    assert_eq!(c.nodes[2].peer_stats("a").unwrap().lost, None);
}

/// A QUIC client with a valid cluster certificate for `name` that completes TLS and then says
/// nothing: it holds one of the acceptor's handshake slots until the acceptor gives up.
async fn silent_member(
    pki: &transport::ClusterPki,
    name: &str,
    to: std::net::SocketAddr,
) -> Result<(quinn::Endpoint, quinn::Connection), quinn::ConnectionError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let id = pki.identity(name).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(id.ca_cert_pem.as_bytes()).unwrap())
        .unwrap();
    let cert = CertificateDer::from_pem_slice(id.cert_pem.as_bytes()).unwrap();
    let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![cert], key)
        .unwrap();
    tls.alpn_protocols = vec![b"pipefuse".to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let ep = quinn::Endpoint::client(local()).unwrap();
    let conn = ep
        .connect_with(quinn::ClientConfig::new(std::sync::Arc::new(quic)), to, "b")
        .unwrap()
        .await?;
    Ok((ep, conn))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_beyond_the_limit_are_refused_without_tls() {
    let pki = generate_cluster_pki("t", &["b", "z"]).unwrap();
    let opts = QuicOptions {
        max_pending_handshakes: 1,
        idle_timeout: Duration::from_secs(3),
        keep_alive: Duration::from_millis(500),
        ..fast()
    };
    let b = QuicNode::bind(pki.identity("b").unwrap(), local(), opts).unwrap();
    let mut events = b.subscribe();
    b.join(&map(&[&b], &[vec![0]], [1; 32])).await.unwrap();
    // The first one holds the only slot (it never sends its hello)...
    let first = silent_member(&pki, "z", b.local_addr()).await;
    assert!(first.is_ok(), "{:?}", first.err());
    // ...so the second is refused before any TLS work.
    let second = silent_member(&pki, "z", b.local_addr()).await;
    let Err(err) = second else {
        panic!("the second connection must be refused");
    };
    eprintln!("second: {err}");
    assert!(
        matches!(err, quinn::ConnectionError::ConnectionClosed(_)),
        "{err:?}"
    );
    let e = next_event(&mut events, Duration::from_secs(5), |e| {
        matches!(e, PeerEvent::Refused { .. })
    })
    .await;
    assert!(e.to_string().contains("max_pending_handshakes"), "{e}");
}
