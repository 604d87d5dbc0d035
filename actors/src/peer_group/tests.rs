//! Peer groups over in-process links, driven step by step on one thread (sends never block on
//! memory links, and a test "router" moves frames from each device's inbox to its group), or with
//! members on threads for the blocking cases.

use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kernels::Tensor;
use model::sp::{Collective, CollectiveOp};
use transport::{
    Endpoint, Frame, FrameHeader, FrameLabel, MemoryNetwork, PeerGroupKind, WireDType,
};

use super::{ExchangeClock, GroupMsg, GroupSpec, PeerGroup};

struct Member {
    group: PeerGroup,
    tx: Sender<GroupMsg>,
    clock: Arc<ExchangeClock>,
    inbox: tokio::sync::mpsc::UnboundedReceiver<Frame>,
}

impl Member {
    /// Moves every frame in the device's inbox to its group (what the device's router does).
    fn pump(&mut self) {
        while let Ok(f) = self.inbox.try_recv() {
            self.tx.send(GroupMsg::Frame(f)).unwrap();
        }
    }
}

/// `devices` in-process devices; devices `0..members` form one group. Returns the members and
/// the endpoints of the others.
fn group(
    rt: &tokio::runtime::Runtime,
    devices: usize,
    members: usize,
) -> (Vec<Member>, Vec<Endpoint>) {
    let mut eps = MemoryNetwork::build(devices);
    let others = eps.split_off(members);
    let out = eps
        .into_iter()
        .map(|ep| {
            let clock = Arc::new(ExchangeClock::default());
            clock.start_item(1);
            let spec = GroupSpec {
                kind: PeerGroupKind::SequenceParallel,
                me: ep.me,
                members: (0..members).collect(),
            };
            let (group, tx) =
                PeerGroup::new(spec, ep.links, rt.handle().clone(), clock.clone()).unwrap();
            Member {
                group,
                tx,
                clock,
                inbox: ep.inbox,
            }
        })
        .collect();
    (out, others)
}

fn t(v: f32) -> Tensor {
    Tensor::from_vec(vec![v, v + 0.5], &[1, 2]).unwrap()
}

fn val(t: &Tensor) -> f32 {
    t.as_f32().unwrap()[0]
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap()
}

#[test]
fn collectives_over_links_give_every_member_its_parts() {
    let rt = runtime();
    let (members, _) = group(&rt, 3, 3);
    let handles: Vec<_> = members
        .into_iter()
        .map(|mut m| {
            std::thread::spawn(move || {
                let r = m.group.rank() as f32;
                let router = std::thread::spawn(move || {
                    while let Some(f) = m.inbox.blocking_recv() {
                        if m.tx.send(GroupMsg::Frame(f)).is_err() {
                            break;
                        }
                    }
                });
                let parts = (0..3).map(|j| t(10.0 * r + j as f32)).collect();
                let a2a: Vec<f32> = m.group.all_to_all(parts).unwrap().iter().map(val).collect();
                let shifted = val(&m.group.ring_shift(t(r)).unwrap());
                let gathered: Vec<f32> =
                    m.group.all_gather(t(r)).unwrap().iter().map(val).collect();
                drop(router); // ends with the links
                (r, a2a, shifted, gathered)
            })
        })
        .collect();
    for h in handles {
        let (r, a2a, shifted, gathered) = h.join().unwrap();
        // Member j sent 10 j + r to this one.
        assert_eq!(a2a, [r, 10.0 + r, 20.0 + r]);
        assert_eq!(shifted, (r + 2.0) % 3.0);
        assert_eq!(gathered, [0.0, 1.0, 2.0]);
    }
}

#[test]
fn parts_of_a_later_request_wait_for_it() {
    let rt = runtime();
    let (mut m, _) = group(&rt, 3, 3);
    // Member 1 finishes request 1's call, moves on to request 2 and sends its part of that.
    m[1].group.next_call(CollectiveOp::AllGather);
    m[1].group.send_to(0, t(1.0)).unwrap();
    m[1].clock.start_item(2);
    m[1].group.next_call(CollectiveOp::AllGather);
    m[1].group.send_to(0, t(21.0)).unwrap();
    // Member 2 is slower: its request-1 part arrives after member 1's request-2 part.
    m[2].group.next_call(CollectiveOp::AllGather);
    m[2].group.send_to(0, t(2.0)).unwrap();
    m[0].pump();
    let g = &mut m[0].group;
    g.next_call(CollectiveOp::AllGather);
    assert_eq!(val(&g.receive_from(1).unwrap()), 1.0);
    assert_eq!(val(&g.receive_from(2).unwrap()), 2.0);
    m[0].clock.start_item(2);
    let g = &mut m[0].group;
    g.next_call(CollectiveOp::AllGather);
    assert_eq!(val(&g.receive_from(1).unwrap()), 21.0);
}

#[test]
fn a_member_making_another_call_is_named() {
    let rt = runtime();
    let (mut m, _) = group(&rt, 2, 2);
    m[1].group.next_call(CollectiveOp::RingShift);
    m[1].group.send_to(0, t(1.0)).unwrap();
    m[0].pump();
    let g = &mut m[0].group;
    g.next_call(CollectiveOp::AllGather);
    let e = g.receive_from(1).unwrap_err().to_string();
    assert!(
        e.contains("diverged") && e.contains("RingShift") && e.contains("AllGather"),
        "{e}"
    );
}

#[test]
fn strangers_and_duplicates_are_refused() {
    let rt = runtime();
    let (mut m, others) = group(&rt, 3, 2);
    // Device 2 is not a member of the group {0, 1}.
    let stranger = Frame {
        header: FrameHeader {
            request: 1,
            from: 2,
            label: FrameLabel::Collective {
                group: PeerGroupKind::SequenceParallel,
                op: transport::CollectiveOp::AllGather,
                seq: 1,
            },
            dtype: WireDType::F32,
            shape: vec![1, 2],
        },
        payload: vec![0; 8],
    };
    others[0].links[0].send(stranger).unwrap();
    m[0].pump();
    m[0].group.next_call(CollectiveOp::AllGather);
    let e = m[0].group.receive_from(1).unwrap_err().to_string();
    assert!(e.contains("device 2, which is not a member"), "{e}");

    // Member 1 sends call 1 twice: the second copy is refused when it turns up.
    let (mut m, _) = group(&rt, 2, 2);
    m[1].group.next_call(CollectiveOp::AllGather);
    m[1].group.send_to(0, t(1.0)).unwrap();
    m[1].group.send_to(0, t(1.0)).unwrap();
    m[0].pump();
    m[0].group.next_call(CollectiveOp::AllGather);
    assert_eq!(val(&m[0].group.receive_from(1).unwrap()), 1.0);
    m[0].group.next_call(CollectiveOp::AllGather);
    let e = m[0].group.receive_from(1).unwrap_err().to_string();
    assert!(e.contains("sent call 1 twice"), "{e}");
}

#[test]
fn a_cancel_releases_a_waiting_member_and_the_wait_is_counted() {
    let rt = runtime();
    let (mut m, _) = group(&rt, 2, 2);
    let mut waiter = m.remove(0);
    let (tx, clock) = (waiter.tx.clone(), waiter.clock.clone());
    let h = std::thread::spawn(move || {
        waiter.group.next_call(CollectiveOp::AllGather);
        waiter.group.receive_from(1)
    });
    let t0 = Instant::now();
    while clock.waiting_for() != Some(1) {
        assert!(t0.elapsed() < Duration::from_secs(10), "never waited");
        std::thread::yield_now();
    }
    std::thread::sleep(Duration::from_millis(50));
    // A cancel of an earlier request is not this wait's.
    tx.send(GroupMsg::Cancel { request: 0 }).unwrap();
    tx.send(GroupMsg::Cancel { request: 1 }).unwrap();
    let e = h.join().unwrap().unwrap_err().to_string();
    assert!(
        e.contains("the request ended while waiting for device 1"),
        "{e}"
    );
    assert_eq!(clock.waiting_for(), None);
    assert!(clock.take_waited() >= Duration::from_millis(50));
    assert_eq!(clock.take_waited(), Duration::ZERO);
}

#[test]
fn a_device_outside_the_group_cannot_make_one() {
    let rt = runtime();
    let eps = MemoryNetwork::build(2);
    let ep = eps.into_iter().next().unwrap();
    let spec = GroupSpec {
        kind: PeerGroupKind::Cfg,
        me: 0,
        members: vec![1, 2],
    };
    let clock = Arc::new(ExchangeClock::default());
    let e = PeerGroup::new(spec, ep.links, rt.handle().clone(), clock)
        .err()
        .unwrap();
    assert!(e.contains("not a member"), "{e}");
}
