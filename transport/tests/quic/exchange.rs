//! Frames between devices on different nodes: content, order, counters, back-pressure.

use std::time::Duration;

use transport::{Link, QuicOptions, TransportError};

use crate::common::{cluster, fast, frame, recv};

/// Envelope bytes per frame on the wire beyond the payload (length prefix + rkyv header).
const MAX_OVERHEAD: u64 = 128;

fn check_counters(link: &dyn Link, frames: u64, payload: u64) {
    assert_eq!(link.messages_sent(), frames);
    let overhead = link.bytes_sent() - payload;
    assert!(
        overhead > 0 && overhead <= frames * MAX_OVERHEAD,
        "{overhead} envelope bytes for {frames} frames"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_exchange_frames_in_order() {
    // Node a hosts devices 0 and 1, node b device 2. Queues large enough for `send` never to
    // meet back-pressure here.
    let opts = QuicOptions {
        link_queue_frames: 64,
        ..fast()
    };
    let mut c = cluster(&["a", "b"], &[vec![0, 1], vec![2]], opts).await;
    let (ea, eb) = c.endpoints.split_at_mut(1);
    let (a, b) = (&mut ea[0], &mut eb[0]);
    assert_eq!((a[0].me, a[1].me, b[0].me), (0, 1, 2));
    let n = 12u32;
    // Interleave two senders on node a towards device 2, with varying sizes.
    for s in 0..n {
        a[0].links[2]
            .send(frame(0, s, 0, 100 + s as usize))
            .unwrap();
        a[1].links[2]
            .send_async(frame(1, s, 1, 3000))
            .await
            .unwrap();
    }
    let mut next = [0u32; 2];
    for _ in 0..2 * n {
        let f = recv(&mut b[0]).await;
        let from = f.header.from;
        let s = next[from];
        let want = if from == 0 {
            frame(0, s, 0, 100 + s as usize)
        } else {
            frame(1, s, 1, 3000)
        };
        assert_eq!(f, want, "frame {s} from device {from}");
        next[from] += 1;
    }
    assert_eq!(next, [n, n]);
    // Replies 2 -> 0 and the in-process link 0 -> 1.
    for s in 0..n {
        b[0].links[0].send(frame(2, s, 0, 8)).unwrap();
    }
    a[0].links[1].send(frame(0, 99, 0, 4)).unwrap();
    for s in 0..n {
        assert_eq!(recv(&mut a[0]).await, frame(2, s, 0, 8));
    }
    assert_eq!(recv(&mut a[1]).await, frame(0, 99, 0, 4));

    let payload0: u64 = (0..n as u64).map(|s| 4 * (100 + s)).sum();
    check_counters(&*a[0].links[2], n as u64, payload0);
    check_counters(&*a[1].links[2], n as u64, n as u64 * 4 * 3000);
    check_counters(&*b[0].links[0], n as u64, n as u64 * 32);
    let at_b = c.nodes[1].peer_stats("a").unwrap();
    assert_eq!(at_b.messages_received, 2 * n as u64);
    assert_eq!(
        at_b.bytes_received,
        a[0].links[2].bytes_sent() + a[1].links[2].bytes_sent()
    );
    assert_eq!(at_b.lost, None);
    assert_eq!(
        c.nodes[0].peer_stats("b").unwrap().messages_received,
        n as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_pass_frames_around_a_ring() {
    let mut c = cluster(&["n0", "n1", "n2"], &[vec![0], vec![1], vec![2]], fast()).await;
    let rounds = 20u32;
    for s in 0..rounds {
        for d in 0..3 {
            let to = (d + 1) % 3;
            let f = frame(d, s, d as u32, 1 + (s as usize * 37) % 5000);
            c.endpoints[d][0].links[to].send_async(f).await.unwrap();
        }
    }
    for d in 0..3 {
        let from = (d + 2) % 3;
        for s in 0..rounds {
            let f = recv(&mut c.endpoints[d][0]).await;
            assert_eq!(f, frame(from, s, from as u32, 1 + (s as usize * 37) % 5000));
        }
    }
    for d in 0..3 {
        let to = (d + 1) % 3;
        let payload: u64 = (0..rounds as u64).map(|s| 4 * (1 + (s * 37) % 5000)).sum();
        check_counters(&*c.endpoints[d][0].links[to], rounds as u64, payload);
        let name = c.nodes[d].name().to_string();
        let stats = c.nodes[to].peer_stats(&name).unwrap();
        assert_eq!(stats.messages_received, rounds as u64);
        assert_eq!(
            stats.bytes_received,
            c.endpoints[d][0].links[to].bytes_sent()
        );
    }
}

/// Current-thread runtime: the link's writer cannot run between two `send` calls, so the queue
/// limits are hit deterministically.
#[tokio::test]
async fn full_queue_returns_backpressure_and_send_async_waits() {
    let f = frame(0, 0, 0, 100);
    let opts = QuicOptions {
        link_queue_frames: 2,
        ..fast()
    };
    let mut c = cluster(&["a", "b"], &[vec![0], vec![1]], opts).await;
    let link = c.endpoints[0][0].links[1].clone();
    link.send(frame(0, 0, 0, 100)).unwrap();
    link.send(frame(0, 1, 0, 100)).unwrap();
    let back = match link.send(frame(0, 2, 0, 100)) {
        Err(TransportError::Backpressure { peer: 1, frame }) => *frame,
        other => panic!("expected Backpressure, got {other:?}"),
    };
    assert_eq!(back, frame(0, 2, 0, 100));
    tokio::time::timeout(Duration::from_secs(5), link.send_async(back))
        .await
        .expect("send_async waits for room, not forever")
        .unwrap();
    for s in 0..3 {
        assert_eq!(recv(&mut c.endpoints[1][0]).await, frame(0, s, 0, 100));
    }

    // The byte limit: two frames fit, the third does not.
    let opts = QuicOptions {
        link_queue_bytes: 2 * f.wire_len() + 10,
        ..fast()
    };
    let mut c = cluster(&["a", "b"], &[vec![0], vec![1]], opts).await;
    let link = c.endpoints[0][0].links[1].clone();
    link.send(frame(0, 0, 0, 100)).unwrap();
    link.send(frame(0, 1, 0, 100)).unwrap();
    let back = match link.send(frame(0, 2, 0, 100)) {
        Err(TransportError::Backpressure { frame, .. }) => *frame,
        other => panic!("expected Backpressure, got {other:?}"),
    };
    link.send_async(back).await.unwrap();
    for s in 0..3 {
        assert_eq!(recv(&mut c.endpoints[1][0]).await, frame(0, s, 0, 100));
    }
    assert_eq!(link.messages_sent(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_errors_are_refused_before_queueing() {
    let opts = QuicOptions {
        max_frame_bytes: 1000,
        ..fast()
    };
    let c = cluster(&["a", "b"], &[vec![0], vec![1]], opts).await;
    let link = &c.endpoints[0][0].links[1];
    assert!(matches!(
        link.send(frame(0, 0, 0, 1000)),
        Err(TransportError::FrameTooLarge {
            peer: 1,
            bytes: 4000,
            max: 1000
        })
    ));
    let mut f = frame(0, 0, 0, 10);
    f.payload.pop();
    assert!(matches!(
        link.send(f),
        Err(TransportError::Malformed { .. })
    ));
    let wrong_sender = frame(1, 0, 0, 10);
    assert!(link
        .send(wrong_sender)
        .unwrap_err()
        .to_string()
        .contains("device 0's link"));
    assert_eq!(link.messages_sent(), 0);
}

/// `pipefuse launch` starts processes at different times: a node that joins before its peer is
/// even bound keeps dialing until the peer answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_node_waits_for_a_peer_that_starts_later() {
    let pki = transport::generate_cluster_pki("t", &["a", "b"]).unwrap();
    let a = transport::QuicNode::bind(pki.identity("a").unwrap(), crate::common::local(), fast())
        .unwrap();
    // Reserve a port for b, free it, and bind b there only after a has started dialing.
    let b_addr = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let m = transport::ClusterMap {
        fingerprint: [0; 32],
        nodes: vec![
            transport::NodeAddr {
                name: "a".into(),
                addr: a.local_addr(),
                devices: vec![0],
            },
            transport::NodeAddr {
                name: "b".into(),
                addr: b_addr,
                devices: vec![1],
            },
        ],
    };
    let ma = m.clone();
    let a_join = tokio::spawn(async move {
        let r = a.join(&ma).await;
        (a, r)
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    let b = transport::QuicNode::bind(pki.identity("b").unwrap(), b_addr, fast()).unwrap();
    let mut eb = b.join(&m).await.unwrap();
    let (_a, ea) = a_join.await.unwrap();
    let ea = ea.unwrap();
    ea[0].links[1].send(frame(0, 1, 2, 16)).unwrap();
    assert_eq!(recv(&mut eb[0]).await, frame(0, 1, 2, 16));
}

/// A node whose peers never come names every one of them when its join times out (the dial of
/// each missing peer gives up at the same deadline as the join).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_timeout_names_every_missing_node() {
    let pki = transport::generate_cluster_pki("t", &["a", "b", "c"]).unwrap();
    let opts = QuicOptions {
        join_timeout: Duration::from_millis(600),
        ..fast()
    };
    let a = transport::QuicNode::bind(pki.identity("a").unwrap(), crate::common::local(), opts)
        .unwrap();
    // b and c are given addresses nobody listens on.
    let silent: Vec<std::net::UdpSocket> = (0..2)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    let mut map = crate::common::map(&[&a], &[vec![0]], [1; 32]);
    for (i, name) in ["b", "c"].iter().enumerate() {
        map.nodes.push(transport::NodeAddr {
            name: (*name).into(),
            addr: silent[i].local_addr().unwrap(),
            devices: vec![i + 1],
        });
    }
    let e = a.join(&map).await.unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, TransportError::JoinTimeout { .. }), "{text}");
    assert!(
        text.contains("node b at") && text.contains("c at"),
        "both missing nodes must be named: {text}"
    );
}
