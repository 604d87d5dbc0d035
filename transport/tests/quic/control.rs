//! The node-level control channel: order beside activation traffic, priority over queued frames,
//! lost nodes (malformed control data: `control_faults`).

use std::time::{Duration, Instant};

use tokio::sync::mpsc::Receiver;
use transport::{
    encode_control, ControlEnvelope, ControlMessage, PeerEvent, QuicOptions, TransportError,
};

use crate::common::{cluster, fast, frame, next_event, recv};

/// A `Begin` for `device` whose (opaque) request carries `noise` f32 elements' worth of bytes.
pub(crate) fn begin(request: u64, device: u32, noise: u32) -> ControlMessage {
    let spec = (0..noise as usize * 4 + 200)
        .map(|i| (i as u8).wrapping_mul(7))
        .collect();
    ControlMessage::Begin {
        request,
        device,
        spec,
    }
}

/// Coordinator "a" (device 0) -> node "b" (devices 1, 2): every variant that direction allows.
fn to_b(round: u64) -> Vec<ControlMessage> {
    let noise = if round == 0 { 1 << 18 } else { 16 }; // 1 MiB once
    vec![
        begin(round, 1, noise),
        begin(round, 2, 8),
        ControlMessage::Abort { request: round },
    ]
}

/// Node "b" -> coordinator "a": every variant that direction allows.
fn to_a(round: u64) -> Vec<ControlMessage> {
    vec![
        ControlMessage::NodeReady {
            node: "b".into(),
            devices: vec![1, 2],
        },
        ControlMessage::BeginAck {
            request: round,
            device: 1,
            error: (round % 2 == 1).then(|| "no memory".into()),
        },
        ControlMessage::StepDone {
            request: round,
            step: round as u32,
        },
        ControlMessage::StageFinished {
            request: round,
            device: 2,
            busy_ns: 1_000 * round,
            exchange_wait_ns: 0,
            items: 7,
            bytes_sent: 1 << 30,
            sent_to: vec![(0, 1 << 29), (1, 1 << 29)],
            latent: Some(vec![round as u8; 16]),
        },
        ControlMessage::DeviceFailed {
            request: round,
            device: 1,
            step: Some(3),
            message: format!("round {round}"),
            lost_peer: None,
        },
    ]
}

/// Receives `n` control messages within 10 s.
pub(crate) async fn take(inbox: &mut Receiver<ControlEnvelope>, n: usize) -> Vec<ControlEnvelope> {
    let mut out = Vec::new();
    for _ in 0..n {
        let m = tokio::time::timeout(Duration::from_secs(10), inbox.recv())
            .await
            .expect("control message did not arrive in time")
            .expect("control inbox open");
        out.push(m);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_messages_round_trip_in_order_beside_activation_frames() {
    let opts = QuicOptions {
        link_queue_frames: 64,
        ..fast()
    };
    let mut c = cluster(&["a", "b"], &[vec![0], vec![1, 2]], opts).await;
    let mut inbox_a = c.nodes[0].control_inbox().unwrap();
    let mut inbox_b = c.nodes[1].control_inbox().unwrap();
    assert!(c.nodes[0].control_inbox().is_none(), "take-once");
    // Activation frames both ways (1 MiB each) while the control messages are sent.
    let (n_frames, elems) = (8u32, 1 << 18);
    let (ab, ba) = (
        c.endpoints[0][0].links[1].clone(),
        c.endpoints[1][1].links[0].clone(),
    );
    let frames = tokio::spawn(async move {
        for s in 0..n_frames {
            ab.send_async(frame(0, s, 0, elems)).await.unwrap();
            ba.send_async(frame(2, s, 0, elems)).await.unwrap();
        }
    });
    let (mut want_b, mut want_a) = (Vec::new(), Vec::new());
    let to_node_a = c.nodes[1].control_sender("a").unwrap();
    for round in 0..10 {
        for m in to_b(round) {
            c.nodes[0].send_control("b", &m).unwrap();
            want_b.push(m);
        }
        for m in to_a(round) {
            to_node_a.send(&m).unwrap();
            want_a.push(m);
        }
    }
    let got_b = take(&mut inbox_b, want_b.len()).await;
    let got_a = take(&mut inbox_a, want_a.len()).await;
    assert!(got_b.iter().all(|(from, _)| from == "a"));
    assert!(got_a.iter().all(|(from, _)| from == "b"));
    assert!(got_b.into_iter().map(|g| g.1).eq(want_b.iter().cloned()));
    assert!(got_a.into_iter().map(|g| g.1).eq(want_a.iter().cloned()));
    frames.await.unwrap();
    for s in 0..n_frames {
        assert_eq!(recv(&mut c.endpoints[1][0]).await, frame(0, s, 0, elems));
        assert_eq!(recv(&mut c.endpoints[0][0]).await, frame(2, s, 0, elems));
    }
    // Counters: every message counted once on each side, with the same bytes (the sender counts
    // after its write returns, so give it a moment).
    let wire: u64 = want_b
        .iter()
        .map(|m| 4 + encode_control(m).unwrap().len() as u64)
        .sum();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let (sa, sb) = (
            c.nodes[0].peer_stats("b").unwrap(),
            c.nodes[1].peer_stats("a").unwrap(),
        );
        let sent = (sa.control_messages_sent, sa.control_bytes_sent);
        if sent == (want_b.len() as u64, wire) || Instant::now() > deadline {
            assert_eq!(sent, (want_b.len() as u64, wire));
            assert_eq!(
                (sb.control_messages_received, sb.control_bytes_received),
                sent
            );
            assert_eq!(sa.control_messages_received, want_a.len() as u64);
            assert_eq!(sb.control_bytes_sent, sa.control_bytes_received);
            assert_eq!(
                sb.messages_received, n_frames as u64,
                "frames counted apart"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Frames of 4 MiB queued first; a control message sent after them arrives before most of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_overtakes_queued_activation_frames() {
    // 96 MiB queued: at loopback speed (~1.5 GB/s) the frames take ~65 ms, several times what
    // a control message needs, so the check does not depend on the machine's speed.
    let opts = QuicOptions {
        link_queue_frames: 32,
        link_queue_bytes: 128 << 20,
        ..fast()
    };
    let mut c = cluster(&["a", "b"], &[vec![0], vec![1]], opts).await;
    let mut inbox = c.nodes[1].control_inbox().unwrap();
    let (n, elems) = (24u32, 1 << 20);
    let frames: Vec<_> = (0..n).map(|s| frame(0, s, 0, elems)).collect();
    let link = c.endpoints[0][0].links[1].clone();
    for f in frames.iter().cloned() {
        link.send(f).unwrap(); // within the queue limits above
    }
    let t0 = Instant::now();
    c.nodes[0]
        .send_control(
            "b",
            &ControlMessage::StepDone {
                request: 1,
                step: 0,
            },
        )
        .unwrap();
    let got = take(&mut inbox, 1).await;
    let latency = t0.elapsed();
    let mut before = 0;
    while c.endpoints[1][0].inbox.try_recv().is_ok() {
        before += 1;
    }
    eprintln!("control message after {latency:?}, {before} of {n} frames (4 MiB) arrived first");
    assert_eq!(
        got[0].1,
        ControlMessage::StepDone {
            request: 1,
            step: 0
        }
    );
    assert!(
        before < n as usize,
        "the control message waited for every frame"
    );
    for f in &frames[before..] {
        assert_eq!(&recv(&mut c.endpoints[1][0]).await, f);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_to_a_lost_node_fails_with_node_gone() {
    let opts = QuicOptions {
        max_control_bytes: 64 << 10,
        ..fast()
    };
    let mut c = cluster(&["a", "b"], &[vec![0], vec![1]], opts).await;
    let a = &c.nodes[0];
    // Caller errors, refused before queueing and naming the node.
    let e = a.send_control("zz", &ControlMessage::Abort { request: 1 });
    assert!(
        matches!(&e, Err(TransportError::Node { message, .. }) if message.contains("zz")),
        "{e:?}"
    );
    let e = a.send_control("b", &begin(1, 0, 4)).unwrap_err();
    assert!(
        matches!(&e, TransportError::InvalidControl { node: Some(n), .. } if n == "b"),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("device 0, which is not on node b"),
        "{e}"
    );
    let e = a.send_control("b", &begin(1, 1, 1 << 16)).unwrap_err();
    assert!(
        matches!(&e, TransportError::ControlTooLarge { node, max, .. } if node == "b" && *max == 64 << 10),
        "{e:?}"
    );
    let sender = a.control_sender("b").unwrap();
    assert_eq!(sender.node(), "b");
    sender.send(&ControlMessage::Abort { request: 1 }).unwrap();

    let b = c.nodes.pop().unwrap();
    drop(c.endpoints.pop());
    drop(b);
    next_event(&mut c.events[0], Duration::from_secs(2), |e| {
        matches!(e, PeerEvent::Lost { .. })
    })
    .await;
    assert!(sender.is_lost());
    for r in [
        c.nodes[0].send_control("b", &ControlMessage::Abort { request: 2 }),
        sender.send(&ControlMessage::StepDone {
            request: 2,
            step: 0,
        }),
    ] {
        match r {
            Err(e @ TransportError::NodeGone { .. }) => {
                let text = e.to_string();
                eprintln!("{text}");
                assert!(text.contains("node b is unreachable"), "{text}");
            }
            other => panic!("expected NodeGone, got {other:?}"),
        }
    }
}
