//! Losing a peer: closed on purpose (seen at once) or silent (seen by the idle timeout).

use std::time::{Duration, Instant};

use transport::{generate_cluster_pki, LostReason, PeerEvent, QuicNode, TransportError};

use crate::common::{cluster, fast, frame, local, map, next_event};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_node_is_lost_and_sends_fail_with_peer_gone() {
    let mut c = cluster(&["a", "b"], &[vec![0], vec![1]], fast()).await;
    let b = c.nodes.pop().unwrap();
    drop(c.endpoints.pop());
    drop(b);
    let e = next_event(&mut c.events[0], Duration::from_secs(2), |e| {
        matches!(e, PeerEvent::Lost { .. })
    })
    .await;
    assert!(
        matches!(&e, PeerEvent::Lost { node, reason: LostReason::ClosedByPeer { .. } } if node == "b"),
        "{e:?}"
    );
    match c.endpoints[0][0].links[1].send(frame(0, 3, 0, 4)) {
        Err(TransportError::PeerGone { peer: 1, frame }) => assert_eq!(
            frame.header.label,
            transport::FrameLabel::Hidden { step: 3, part: 0 }
        ),
        other => panic!("expected PeerGone, got {other:?}"),
    }
    let r = c.endpoints[0][0].links[1]
        .send_async(frame(0, 4, 0, 4))
        .await;
    assert!(matches!(r, Err(TransportError::PeerGone { .. })), "{r:?}");
}

/// Node c runs on its own runtime, which is then shut down without closing anything: c goes
/// silent like a crashed host, and only the idle timeout (500 ms here) can notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_node_is_lost_within_the_idle_timeout() {
    let pki = generate_cluster_pki("t", &["a", "b", "c"]).unwrap();
    let bind = |n: &str| QuicNode::bind(pki.identity(n).unwrap(), local(), fast()).unwrap();
    let (a, b) = (bind("a"), bind("b"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let c_id = pki.identity("c").unwrap();
    let cn = rt
        .spawn(async move { QuicNode::bind(c_id, local(), fast()).unwrap() })
        .await
        .unwrap();
    let m = map(&[&a, &b, &cn], &[vec![0], vec![1], vec![2]], [0; 32]);
    let mut events = a.subscribe();
    let (mc, mab) = (m.clone(), m.clone());
    let c_join = rt.spawn(async move {
        let e = cn.join(&mc).await;
        (cn, e)
    });
    let (ea, eb) = tokio::join!(a.join(&mab), b.join(&m));
    let (ea, _eb) = (ea.unwrap(), eb.unwrap());
    let (cn, ec) = c_join.await.unwrap();
    let _ec = ec.unwrap();
    ea[0].links[2].send(frame(0, 0, 0, 4)).unwrap();

    let t0 = Instant::now();
    rt.shutdown_background();
    let e = next_event(&mut events, Duration::from_secs(10), |e| {
        matches!(e, PeerEvent::Lost { .. })
    })
    .await;
    let waited = t0.elapsed();
    // The reason says which mechanism noticed: the idle timeout. The 10 s wait above only rules
    // out another, much longer timer (quinn's default idle timeout is 30 s); it is loose because
    // a loaded machine delays timers and the event's delivery (1.54 s was seen for 500 ms under
    // three builds on 2 cores), and this test must not depend on the machine's speed.
    assert!(
        matches!(&e, PeerEvent::Lost { node, reason: LostReason::IdleTimeout } if node == "c"),
        "{e:?}"
    );
    eprintln!("silent peer detected after {waited:?} (idle timeout 500 ms)");
    assert!(matches!(
        ea[0].links[2].send(frame(0, 1, 0, 4)),
        Err(TransportError::PeerGone { peer: 2, .. })
    ));
    assert_eq!(
        a.peer_stats("c").unwrap().lost,
        Some(LostReason::IdleTimeout)
    );
    // a and b are unaffected.
    assert_eq!(a.peer_stats("b").unwrap().lost, None);
    drop(cn);
}
