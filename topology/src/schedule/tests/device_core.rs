//! [`DeviceCore`]: one device's requests on virtual time, payloads as numbers.

use std::time::Duration;

use super::cfg;
use super::sim::ms;
use crate::schedule::{
    CoreFailure, CoreOutput, DeviceCore, Part, ScheduleConfig, ScheduleFailure, WorkItem,
    EARLY_INPUTS_MAX,
};

const STALL: Duration = Duration::from_secs(5);
const COMPUTE: Duration = Duration::from_secs(2);

fn patch(step: usize, p: usize) -> WorkItem {
    WorkItem {
        step,
        part: Part::Patch(p),
    }
}

fn outs(core: &mut DeviceCore<u32>) -> Vec<CoreOutput<u32>> {
    std::iter::from_fn(|| core.poll_output()).collect()
}

/// Device `rank` at `stage`, request 1 begun at `now`.
fn core(rank: usize, stage: usize, shape: ScheduleConfig, now: Duration) -> DeviceCore<u32> {
    let mut c = DeviceCore::new(rank, stage, STALL, COMPUTE);
    c.begin(now, 1, shape).unwrap();
    c
}

/// Completes every launch at once (output = input + 1000) until nothing is launched; returns the
/// launched (item, input) pairs and every other output.
fn run(c: &mut DeviceCore<u32>, now: Duration) -> (Vec<(WorkItem, u32)>, Vec<CoreOutput<u32>>) {
    let (mut launched, mut rest) = (Vec::new(), Vec::new());
    let mut pending = outs(c);
    while !pending.is_empty() {
        let mut next = Vec::new();
        for o in pending {
            match o {
                CoreOutput::Launch {
                    request,
                    item,
                    input,
                    ..
                } => {
                    launched.push((item, input));
                    c.handle_compute_done(now, request, item, Ok(input + 1000), ms(1));
                    next.extend(outs(c));
                }
                other => rest.push(other),
            }
        }
        pending = next;
    }
    (launched, rest)
}

#[test]
fn inputs_in_any_order_run_in_global_order() {
    // The last of 2 stages, M = 3, W = 1, T = 3: items (0, whole), (1, 0..3), (2, 0..3).
    let shape = cfg(2, 3, 1, 3);
    let mut c = core(1, 1, shape, ms(0));
    let mut items = shape.items();
    items.reverse(); // the worst order: the last item's input first
    for (i, item) in items.iter().enumerate() {
        c.handle_input(ms(1), 1, *item, 0, 10 * (items.len() - i) as u32);
    }
    let (launched, rest) = run(&mut c, ms(2));
    let order: Vec<WorkItem> = launched.iter().map(|l| l.0).collect();
    assert_eq!(order, shape.items());
    // Each item ran on the payload that arrived for it.
    let inputs: Vec<u32> = launched.iter().map(|l| l.1).collect();
    assert_eq!(inputs, [10, 20, 30, 40, 50, 60, 70]);
    // Outputs go to stage 0 as the next step's inputs; progress per step; one Finished.
    let sends: Vec<(usize, WorkItem, u32)> = rest
        .iter()
        .filter_map(|o| match o {
            CoreOutput::Send {
                to, item, payload, ..
            } => Some((*to, *item, *payload)),
            _ => None,
        })
        .collect();
    assert_eq!(sends[0], (0, WorkItem::whole(1), 1010));
    assert_eq!(sends[1], (0, patch(2, 0), 1020));
    assert_eq!(sends.len(), 4, "nothing is sent after the final step");
    let steps: Vec<usize> = rest
        .iter()
        .filter_map(|o| match o {
            CoreOutput::StepDone { step, .. } => Some(*step),
            _ => None,
        })
        .collect();
    assert_eq!(steps, [0, 1, 2]);
    match rest.last() {
        Some(CoreOutput::Finished {
            request: 1,
            stats,
            exchange_wait,
        }) => {
            assert_eq!(stats.launched, 7);
            assert_eq!(*exchange_wait, ms(7));
        }
        other => panic!("expected Finished, got {other:?}"),
    }
    assert_eq!(c.request(), None);
    assert_eq!(c.poll_timeout(), None);
}

#[test]
fn one_whole_latent_feeds_every_patch_of_stage_0() {
    // Stage 0 of 2: the request's latent (step 0, whole), then the last warmup step's output comes
    // back whole and stands for each of the 3 patches of step 1.
    let mut c = core(0, 0, cfg(2, 3, 1, 2), ms(0));
    c.handle_input(ms(0), 1, WorkItem::whole(0), 0, 7);
    let (launched, rest) = run(&mut c, ms(1));
    assert_eq!(launched, [(WorkItem::whole(0), 7)]);
    assert!(matches!(
        rest[0],
        CoreOutput::Send {
            to: 1,
            payload: 1007,
            ..
        }
    ));
    c.handle_input(ms(2), 1, WorkItem::whole(1), 1, 9);
    let (launched, _) = run(&mut c, ms(3));
    assert_eq!(
        launched,
        [(patch(1, 0), 9), (patch(1, 1), 9), (patch(1, 2), 9)]
    );
}

#[test]
fn a_one_stage_pipeline_feeds_itself() {
    let shape = cfg(1, 2, 1, 3);
    let mut c = core(4, 0, shape, ms(0));
    c.handle_input(ms(0), 1, WorkItem::whole(0), 4, 1);
    let (launched, rest) = run(&mut c, ms(1));
    let order: Vec<WorkItem> = launched.iter().map(|l| l.0).collect();
    assert_eq!(order, shape.items());
    // Each step runs on the previous step's outputs, never sent anywhere.
    assert_eq!(launched[1].1, 1001);
    assert_eq!(launched[3].1, 2001);
    assert!(!rest.iter().any(|o| matches!(o, CoreOutput::Send { .. })));
    assert!(matches!(rest.last(), Some(CoreOutput::Finished { .. })));
}

#[test]
fn inputs_of_a_later_request_wait_for_it_and_earlier_ones_are_dropped() {
    let shape = cfg(2, 1, 1, 1);
    let mut c = core(1, 1, shape, ms(0));
    // Stage 0 already began request 2 and sent its input; request 1's comes after.
    c.handle_input(ms(1), 2, WorkItem::whole(0), 0, 22);
    assert!(outs(&mut c).is_empty());
    c.handle_input(ms(2), 1, WorkItem::whole(0), 0, 11);
    let (launched, rest) = run(&mut c, ms(3));
    assert_eq!(launched, [(WorkItem::whole(0), 11)]);
    assert!(matches!(
        rest.last(),
        Some(CoreOutput::Finished { request: 1, .. })
    ));
    c.begin(ms(4), 2, shape).unwrap();
    let (launched, _) = run(&mut c, ms(5));
    assert_eq!(launched, [(WorkItem::whole(0), 22)]);
    // A straggler of request 1 is dropped without a failure.
    c.begin(ms(6), 3, shape).unwrap();
    c.handle_input(ms(7), 1, WorkItem::whole(0), 0, 1);
    assert!(outs(&mut c).is_empty());
    assert_eq!(c.request(), Some(3));
    // Request ids only grow.
    assert!(c.begin(ms(8), 2, shape).is_err());
    // The early buffer is bounded.
    for i in 0..EARLY_INPUTS_MAX + 5 {
        c.handle_input(ms(9), 9, patch(0, i), 0, 0);
    }
    c.begin(ms(10), 9, cfg(2, 2, 0, 1)).unwrap();
    let failed = outs(&mut c);
    assert!(
        matches!(
            &failed[..],
            [CoreOutput::Failed {
                request: 9,
                reason: CoreFailure::Refused(_),
                ..
            }]
        ),
        "patches 2.. name no item: {failed:?}"
    );
}

#[test]
fn duplicate_and_foreign_inputs_are_refused() {
    let mut c = core(1, 1, cfg(2, 2, 1, 2), ms(0));
    c.handle_input(ms(1), 1, patch(1, 0), 0, 1);
    c.handle_input(ms(1), 1, patch(1, 0), 0, 1);
    match &outs(&mut c)[..] {
        [CoreOutput::Failed {
            request: 1,
            step: Some(1),
            reason: CoreFailure::Refused(m),
        }] => assert!(m.contains("device 0") && m.contains("duplicate"), "{m}"),
        other => panic!("{other:?}"),
    }
    // Nothing of a failed request comes out afterwards.
    c.handle_input(ms(2), 1, WorkItem::whole(0), 0, 1);
    assert!(outs(&mut c).is_empty());
    assert_eq!(c.poll_timeout(), None);

    // A patch of a warmup step names no item.
    let mut c = core(1, 1, cfg(2, 2, 1, 2), ms(0));
    c.handle_input(ms(1), 1, patch(0, 1), 3, 1);
    match &outs(&mut c)[..] {
        [CoreOutput::Failed {
            reason: CoreFailure::Refused(m),
            ..
        }] => assert!(m.contains("device 3") && m.contains("warmup step"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_compute_deadline_and_the_stall_deadline_are_timers() {
    // Begun at 1000 s: the stall deadline counts from the begin, not from the clock's origin.
    let t0 = Duration::from_secs(1000);
    let mut c = core(0, 0, cfg(2, 1, 1, 2), t0);
    assert_eq!(c.poll_timeout(), Some(t0 + STALL));
    c.handle_input(t0 + ms(10), 1, WorkItem::whole(0), 0, 1);
    assert!(matches!(outs(&mut c)[..], [CoreOutput::Launch { .. }]));
    // Computing: only the compute deadline is armed.
    let deadline = t0 + ms(10) + COMPUTE;
    assert_eq!(c.poll_timeout(), Some(deadline));
    c.handle_timeout(deadline - ms(1));
    assert!(outs(&mut c).is_empty());
    c.handle_timeout(deadline);
    match &outs(&mut c)[..] {
        [CoreOutput::Failed {
            step: Some(0),
            reason: CoreFailure::ComputeTimeout { item, timeout },
            ..
        }] => assert_eq!((*item, *timeout), (WorkItem::whole(0), COMPUTE)),
        other => panic!("{other:?}"),
    }
    // A late compute-done of the failed request is ignored.
    c.handle_compute_done(deadline + ms(1), 1, WorkItem::whole(0), Ok(5), ms(0));
    assert!(outs(&mut c).is_empty());

    // Idle past the stall deadline: the schedule's stall, naming what it waited for.
    let mut c = core(1, 1, cfg(2, 1, 1, 2), t0);
    c.handle_timeout(t0 + STALL);
    match &outs(&mut c)[..] {
        [CoreOutput::Failed {
            step: Some(0),
            reason: CoreFailure::Schedule(ScheduleFailure::Stalled { from: 0, .. }),
            ..
        }] => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_lost_peer_still_needed_fails_the_request() {
    // Stage 1 of 3 waits for stage 0; stage 0's node is lost.
    let mut c = core(1, 1, cfg(3, 2, 1, 3), ms(0));
    c.handle_peer_lost(ms(5), 0);
    match &outs(&mut c)[..] {
        [CoreOutput::Failed {
            reason: CoreFailure::Schedule(f @ ScheduleFailure::PeerLost { peer: 0, .. }),
            ..
        }] => assert!(f.to_string().contains("peer stage 0 was lost")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn compute_errors_driver_failures_and_aborts_end_the_request() {
    let mut c = core(0, 0, cfg(1, 1, 1, 2), ms(0));
    c.handle_input(ms(0), 1, WorkItem::whole(0), 0, 1);
    assert_eq!(outs(&mut c).len(), 1);
    c.handle_compute_done(
        ms(1),
        1,
        WorkItem::whole(0),
        Err("out of memory".into()),
        ms(0),
    );
    assert!(matches!(
        &outs(&mut c)[..],
        [CoreOutput::Failed { step: Some(0), reason: CoreFailure::Reported(m), .. }] if m == "out of memory"
    ));
    // A failure the driver reports takes the running item's step when it names none.
    c.begin(ms(2), 2, cfg(1, 1, 1, 2)).unwrap();
    c.handle_input(ms(2), 2, WorkItem::whole(0), 0, 1);
    assert_eq!(outs(&mut c).len(), 1);
    c.fail(1, None, "not this request".into());
    assert!(outs(&mut c).is_empty());
    c.fail(2, None, "device 5 (its group) was lost".into());
    assert!(matches!(
        &outs(&mut c)[..],
        [CoreOutput::Failed {
            request: 2,
            step: Some(0),
            ..
        }]
    ));
    // An abort ends a request silently.
    c.begin(ms(3), 3, cfg(1, 1, 1, 2)).unwrap();
    assert!(!c.abort(Some(2)));
    assert!(c.abort(None));
    assert!(outs(&mut c).is_empty());
    assert_eq!((c.request(), c.poll_timeout()), (None, None));
}

#[test]
fn an_unusable_input_fails_its_request_now_or_when_it_begins() {
    let shape = cfg(2, 1, 1, 1);
    let mut c = core(1, 1, shape, ms(0));
    // Request 2's input could not be decoded while request 1 runs: request 1 is unaffected.
    c.handle_bad_input(2, Some(0), "device 0 sent bytes that do not decode".into());
    c.handle_bad_input(0, None, "a straggler of an old request".into());
    assert!(outs(&mut c).is_empty());
    c.handle_input(ms(1), 1, WorkItem::whole(0), 0, 1);
    let (_, rest) = run(&mut c, ms(2));
    assert!(matches!(
        rest.last(),
        Some(CoreOutput::Finished { request: 1, .. })
    ));
    // Request 2 fails as soon as it begins.
    c.begin(ms(3), 2, shape).unwrap();
    match &outs(&mut c)[..] {
        [CoreOutput::Failed {
            request: 2,
            step: Some(0),
            reason: CoreFailure::Refused(m),
        }] => assert!(m.contains("do not decode"), "{m}"),
        other => panic!("{other:?}"),
    }
    // An active request fails at once.
    c.begin(ms(4), 3, shape).unwrap();
    c.handle_bad_input(3, None, "wrong kind".into());
    assert!(matches!(
        &outs(&mut c)[..],
        [CoreOutput::Failed { request: 3, .. }]
    ));
}
