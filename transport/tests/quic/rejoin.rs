//! A node that comes back after it was lost: a process restarted with the same certificate
//! joins the running cluster again (the survivor whose name sorts first dials it again, the
//! others accept it), every survivor reports it `Rejoined`, and new endpoints reach it.

use std::net::SocketAddr;
use std::time::Duration;

use transport::{ClusterMap, Endpoint, PeerEvent, QuicNode};

use crate::common::{cluster, fast, frame, next_event, recv};

/// Binds node `name` at `addr` again (the old socket may take a moment to go).
async fn rebind(pki: &transport::ClusterPki, name: &str, addr: SocketAddr) -> QuicNode {
    for _ in 0..50 {
        if let Ok(n) = QuicNode::bind(pki.identity(name).unwrap(), addr, fast()) {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("could not bind {addr} again");
}

/// Frames around the ring 0 -> 1 -> 2 -> 0 over `eps[i]` (device i's endpoint), each received
/// by the next device with the content sent.
async fn ring(eps: &mut [&mut Endpoint; 3], step: u32) {
    for i in 0..3 {
        let to = (i + 1) % 3;
        eps[i].links[to]
            .send_async(frame(i, step, 0, 64))
            .await
            .unwrap();
        let got = recv(eps[to]).await;
        assert_eq!(got, frame(i, step, 0, 64), "{i} -> {to}");
    }
}

fn map_of(c: &crate::common::Cluster) -> ClusterMap {
    crate::common::map(
        &c.nodes.iter().collect::<Vec<_>>(),
        &[vec![0], vec![1], vec![2]],
        [7; 32],
    )
}

/// b (the middle name: a dials it, it dials c) shuts down and starts again on its address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_rejoins_and_is_reached_through_new_endpoints() {
    let mut c = cluster(&["a", "b", "c"], &[vec![0], vec![1], vec![2]], fast()).await;
    let m = map_of(&c);
    let b_addr = c.nodes[1].local_addr();
    drop(std::mem::take(&mut c.endpoints[1]));
    c.nodes
        .remove(1)
        .close_and_wait(Duration::from_secs(1))
        .await;
    for i in [0, 2] {
        next_event(
            &mut c.events[i],
            Duration::from_secs(3),
            |e| matches!(e, PeerEvent::Lost { node, .. } if node == "b"),
        )
        .await;
    }
    let b = rebind(&c.pki, "b", b_addr).await;
    let mut eb = tokio::time::timeout(Duration::from_secs(10), b.join(&m))
        .await
        .expect("b joined again in time")
        .expect("b was admitted");
    for i in [0, 2] {
        next_event(
            &mut c.events[i],
            Duration::from_secs(3),
            |e| matches!(e, PeerEvent::Rejoined { node, .. } if node == "b"),
        )
        .await;
    }
    let mut ea = c.nodes[0].endpoints().unwrap();
    let mut ec = c.nodes[1].endpoints().unwrap();
    ring(&mut [&mut ea[0], &mut eb[0], &mut ec[0]], 5).await;
    // The old endpoints' inboxes get nothing any more; their links to b stay dead.
    assert!(c.endpoints[0][0].inbox.try_recv().is_err());
    assert!(c.endpoints[0][0].links[1].send(frame(0, 6, 0, 4)).is_err());
    assert!(c.nodes[0].peer_stats("b").unwrap().lost.is_none());
}

/// b goes silent (its runtime stops, like a crashed host) and a new b starts at once: c, which
/// b dials, still believes the old connection alive; the new one supersedes it (reported Lost,
/// then Rejoined). a finds b lost by its idle timeout and dials the new b.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_before_its_loss_was_noticed_supersedes_its_old_connection() {
    let pki = transport::generate_cluster_pki("t", &["a", "b", "c"]).unwrap();
    let mut opts = fast();
    opts.idle_timeout = Duration::from_secs(2);
    let bind = |n: &str| {
        QuicNode::bind(
            pki.identity(n).unwrap(),
            crate::common::local(),
            opts.clone(),
        )
        .unwrap()
    };
    let (a, cn) = (bind("a"), bind("c"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (b_id, o) = (pki.identity("b").unwrap(), opts.clone());
    let bn = rt
        .spawn(async move { QuicNode::bind(b_id, crate::common::local(), o).unwrap() })
        .await
        .unwrap();
    let b_addr = bn.local_addr();
    let m = crate::common::map(&[&a, &bn, &cn], &[vec![0], vec![1], vec![2]], [7; 32]);
    let (mut ev_a, mut ev_c) = (a.subscribe(), cn.subscribe());
    let mb = m.clone();
    let b_join = rt.spawn(async move {
        let e = bn.join(&mb).await;
        (bn, e)
    });
    let (ea, ec) = tokio::join!(a.join(&m), cn.join(&m));
    let (_ea, _ec) = (ea.unwrap(), ec.unwrap());
    let (old_b, eb) = b_join.await.unwrap();
    drop(eb.unwrap());
    // b is silent now: its runtime stops without closing anything, then its socket goes.
    tokio::task::spawn_blocking(move || drop(rt)).await.unwrap();
    drop(old_b);
    let b = rebind(&pki, "b", b_addr).await;
    let mut eb = tokio::time::timeout(Duration::from_secs(10), b.join(&m))
        .await
        .expect("b joined again in time")
        .expect("b was admitted");
    let lost = next_event(
        &mut ev_c,
        Duration::from_secs(3),
        |e| matches!(e, PeerEvent::Lost { node, .. } if node == "b"),
    )
    .await;
    assert!(lost.to_string().contains("superseded"), "{lost}");
    next_event(
        &mut ev_c,
        Duration::from_secs(3),
        |e| matches!(e, PeerEvent::Rejoined { node, .. } if node == "b"),
    )
    .await;
    next_event(
        &mut ev_a,
        Duration::from_secs(5),
        |e| matches!(e, PeerEvent::Rejoined { node, .. } if node == "b"),
    )
    .await;
    let (mut ea, mut ec) = (a.endpoints().unwrap(), cn.endpoints().unwrap());
    ring(&mut [&mut ea[0], &mut eb[0], &mut ec[0]], 9).await;
}
