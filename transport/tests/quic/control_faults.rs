//! Malformed control data from an authenticated peer closes that connection, naming the peer.

use std::time::Duration;

use transport::{encode_control, ControlMessage, LostReason, PeerEvent, TransportError};

use crate::common::{cluster, fast, next_event, Cluster};
use crate::control::{begin, take};

/// Node a sends `bad` to b, then: b closes the connection naming a (the message must contain
/// `want`), a learns why, and control messages to b fail with `NodeGone`.
async fn expect_malformed(c: &mut Cluster, want: &str) {
    let e = next_event(&mut c.events[1], Duration::from_secs(5), |e| {
        matches!(e, PeerEvent::Lost { .. })
    })
    .await;
    eprintln!("b: {e}");
    match &e {
        PeerEvent::Lost {
            node,
            reason: LostReason::Malformed { message },
        } => assert!(node == "a" && message.contains(want), "{e}"),
        other => panic!("expected Lost(a, Malformed), got {other:?}"),
    }
    let e = next_event(&mut c.events[0], Duration::from_secs(5), |e| {
        matches!(e, PeerEvent::Lost { .. })
    })
    .await;
    assert!(
        matches!(&e, PeerEvent::Lost { node, reason: LostReason::ClosedByPeer { reason } }
            if node == "b" && reason.contains("malformed") && reason.contains(want)),
        "{e:?}"
    );
    let r = c.nodes[0].send_control("b", &ControlMessage::Abort { request: 3 });
    assert!(matches!(r, Err(TransportError::NodeGone { .. })), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_control_stream_closes_that_connection() {
    let mut c = cluster(&["a", "b", "c"], &[vec![0], vec![1], vec![2]], fast()).await;
    let mut inbox_b = c.nodes[1].control_inbox().unwrap();
    let mut inbox_c = c.nodes[2].control_inbox().unwrap();
    let abort = ControlMessage::Abort { request: 1 };
    c.nodes[0].send_control("b", &abort).unwrap();
    let mut garbage = vec![16, 0, 0, 0];
    garbage.extend([0xee; 16]);
    c.nodes[0].send_raw_control("b", &garbage).unwrap();
    expect_malformed(&mut c, "control stream: message 1").await;
    // The valid message before the garbage was delivered; a <-> c and b <-> c still work.
    assert_eq!(take(&mut inbox_b, 1).await[0], ("a".into(), abort.clone()));
    c.nodes[0].send_control("c", &abort).unwrap();
    c.nodes[1].send_control("c", &abort).unwrap();
    let mut got: Vec<String> = take(&mut inbox_c, 2)
        .await
        .into_iter()
        .map(|g| g.0)
        .collect();
    got.sort();
    assert_eq!(got, ["a", "b"]);
    assert_eq!(c.nodes[2].peer_stats("a").unwrap().lost, None);
}

/// Framed bytes of a message that skipped the sender's checks.
fn framed(msg: &ControlMessage) -> Vec<u8> {
    let body = encode_control(msg).unwrap();
    let mut out = (body.len() as u32).to_le_bytes().to_vec();
    out.extend(body);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_misrouted_or_duplicate_control_streams_close_the_connection() {
    let abort = ControlMessage::Abort { request: 1 };
    let misrouted = framed(&begin(1, 0, 4)); // device 0 is on a, not b
    let cases: [(&[u8], bool, &str); 3] = [
        (
            &[0xff, 0xff, 0xff, 0xff],
            false,
            "control message length 4294967295 outside",
        ),
        (
            &misrouted,
            false,
            "Begin names device 0, which is not on node b",
        ),
        (&[1, 4, 0, 0, 0], true, "second control stream"),
    ];
    for (bytes, new_stream, want) in cases {
        let mut c = cluster(&["a", "b"], &[vec![0], vec![1]], fast()).await;
        c.nodes[0].send_control("b", &abort).unwrap();
        if new_stream {
            // Let the first message open the control stream, then open another one.
            let mut inbox = c.nodes[1].control_inbox().unwrap();
            take(&mut inbox, 1).await;
            c.nodes[0].send_raw_stream("b", bytes).await.unwrap();
        } else {
            c.nodes[0].send_raw_control("b", bytes).unwrap();
        }
        expect_malformed(&mut c, want).await;
    }
}
