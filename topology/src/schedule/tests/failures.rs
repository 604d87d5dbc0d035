//! Stalls (dropped messages, via the stall timer) and lost peers.

use std::time::Duration;

use super::cfg;
use super::sim::{ms, SimCluster};
use crate::schedule::{Part, ScheduleFailure, StageAction, StageSchedule, WorkItem};

fn item(step: usize, p: usize) -> WorkItem {
    WorkItem {
        step,
        part: Part::Patch(p),
    }
}

fn drain(s: &mut StageSchedule) -> Vec<StageAction> {
    std::iter::from_fn(|| s.poll_action()).collect()
}

#[test]
fn dropped_message_to_a_middle_hop_is_reported_as_a_stall() {
    let mut sim =
        SimCluster::with_timeout(cfg(3, 2, 1, 3), ms(50)).drop_message(2, 1, Part::Patch(0));
    assert!(
        sim.drive_bounded(1_000),
        "a dropped message must not hang the run"
    );
    let (stage, failure, at) = sim.failures[0].clone();
    let stalled = ScheduleFailure::Stalled {
        stage: 2,
        waiting_for: item(1, 0),
        from: 1,
    };
    // Stage 2 went idle at 3 ms (end of the warmup step) and waited 50 ms.
    assert_eq!((stage, &failure, at), (2, &stalled, ms(53)));
    let text = failure.to_string();
    assert!(
        text.contains("stage 2") && text.contains("step 1, patch 0") && text.contains("stage 1")
    );
    assert_eq!(
        sim.failures.len(),
        3,
        "the others stall too: {:?}",
        sim.failures
    );
    assert!(sim
        .stages
        .iter()
        .all(|s| s.is_failed() && s.poll_timeout().is_none()));
    assert!(!sim
        .launches
        .iter()
        .any(|l| l.stage == 2 && l.item.step >= 1));
}

#[test]
fn dropped_feedback_to_stage0_names_the_last_stage() {
    let mut sim =
        SimCluster::with_timeout(cfg(2, 2, 0, 3), ms(20)).drop_message(0, 2, Part::Patch(1));
    assert!(sim.drive_bounded(1_000));
    let first = &sim.failures[0];
    let stalled = ScheduleFailure::Stalled {
        stage: 0,
        waiting_for: item(2, 1),
        from: 1,
    };
    assert_eq!((first.0, &first.1, first.2), (0, &stalled, ms(5 + 20)));
}

#[test]
fn stall_timer_is_armed_only_while_idle_and_fires_at_the_deadline() {
    let timeout = ms(100);
    let mut s = StageSchedule::new(cfg(2, 2, 0, 1), 1, timeout).unwrap();
    assert_eq!(
        s.poll_timeout(),
        Some(timeout),
        "idle since the request started"
    );
    s.handle_timeout(ms(99));
    assert_eq!(s.poll_action(), None);
    s.handle_input(ms(10), 0, Part::Patch(0)).unwrap();
    assert_eq!(drain(&mut s), vec![StageAction::Launch(item(0, 0))]);
    assert_eq!(s.poll_timeout(), None, "no timer while computing");
    s.handle_compute_done(ms(20), item(0, 0)).unwrap();
    assert_eq!(drain(&mut s), vec![]);
    assert_eq!(s.poll_timeout(), Some(ms(120)));
    s.handle_timeout(ms(119));
    assert_eq!(s.poll_action(), None);
    s.handle_timeout(ms(120));
    let stalled = ScheduleFailure::Stalled {
        stage: 1,
        waiting_for: item(0, 1),
        from: 0,
    };
    assert_eq!(drain(&mut s), vec![StageAction::Failed(stalled)]);
    assert_eq!(s.poll_timeout(), None);
    s.handle_input(ms(130), 0, Part::Patch(1)).unwrap();
    s.handle_timeout(ms(500));
    assert_eq!(s.poll_action(), None, "nothing after Failed");
    assert!(s.is_failed() && !s.is_finished() && s.next_item().is_none());
}

#[test]
fn stage0_stall_on_the_request_input_says_so() {
    let mut s = StageSchedule::new(cfg(2, 2, 1, 2), 0, ms(5)).unwrap();
    s.handle_timeout(ms(5));
    let failure = ScheduleFailure::Stalled {
        stage: 0,
        waiting_for: WorkItem {
            step: 0,
            part: Part::Whole,
        },
        from: 0,
    };
    assert_eq!(drain(&mut s), vec![StageAction::Failed(failure.clone())]);
    assert!(
        failure.to_string().contains("from the request"),
        "{failure}"
    );
}

#[test]
fn lost_stage_fails_every_stage_that_still_needs_it() {
    let mut sim = SimCluster::new(cfg(3, 3, 1, 4)).kill_at(ms(7), 1);
    assert!(sim.drive_bounded(1_000));
    let mut lost: Vec<(usize, usize)> = sim
        .failures
        .iter()
        .map(|(s, f, at)| match f {
            ScheduleFailure::PeerLost {
                stage,
                peer,
                during,
            } => {
                assert_eq!((*stage, *at), (*s, ms(7)));
                assert!(during.is_some());
                (*stage, *peer)
            }
            other => panic!("expected PeerLost, got {other}"),
        })
        .collect();
    lost.sort();
    assert_eq!(lost, vec![(0, 1), (2, 1)]);
}

#[test]
fn peer_lost_is_ignored_once_the_peer_is_not_needed() {
    // A finished stage needs nobody.
    let mut sim = SimCluster::new(cfg(2, 2, 1, 2));
    sim.drive();
    for s in &mut sim.stages {
        s.handle_peer_lost(sim.now, 1 - s.stage());
        assert_eq!(s.poll_action(), None);
    }
    // Stage 0 holding every input (T = 1) needs only its downstream.
    let mut s0 = StageSchedule::new(cfg(3, 2, 0, 1), 0, ms(100)).unwrap();
    s0.handle_input(ms(0), 0, Part::Patch(0)).unwrap();
    s0.handle_input(ms(0), 0, Part::Patch(1)).unwrap();
    drain(&mut s0);
    for peer in [0, 2, 9] {
        s0.handle_peer_lost(ms(1), peer);
        assert_eq!(s0.poll_action(), None, "peer {peer}");
    }
    s0.handle_peer_lost(ms(1), 1);
    let failure = ScheduleFailure::PeerLost {
        stage: 0,
        peer: 1,
        during: Some(item(0, 0)),
    };
    assert_eq!(drain(&mut s0), vec![StageAction::Failed(failure.clone())]);
    assert!(failure.to_string().contains("step 0, patch 0"));
    // The last stage running the final item sends nothing more: losing stage 0 is harmless.
    let mut last = StageSchedule::new(cfg(2, 1, 0, 2), 1, ms(100)).unwrap();
    for step in 0..2 {
        last.handle_input(ms(step as u64), step, Part::Patch(0))
            .unwrap();
        drain(&mut last);
        if step == 0 {
            last.handle_compute_done(ms(1), item(0, 0)).unwrap();
            drain(&mut last);
        }
    }
    last.handle_peer_lost(ms(2), 0);
    assert_eq!(last.poll_action(), None);
    last.handle_compute_done(ms(3), item(1, 0)).unwrap();
    let done = vec![StageAction::StepDone { step: 1 }, StageAction::Finished];
    assert_eq!(drain(&mut last), done);
    assert_eq!(last.stats().busy, ms(1) + Duration::from_millis(2));
}
