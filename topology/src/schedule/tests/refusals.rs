//! Events that do not fit the schedule are errors, and leave the state unchanged.

use std::time::Duration;

use super::cfg;
use crate::schedule::{Part, StageAction, StageSchedule, WorkItem};
use crate::TopologyError;

const T0: Duration = Duration::ZERO;

fn item(step: usize, part: Part) -> WorkItem {
    WorkItem { step, part }
}

fn drain(s: &mut StageSchedule) -> Vec<StageAction> {
    std::iter::from_fn(|| s.poll_action()).collect()
}

/// Asserts a `Schedule` error of `stage` whose message contains every word of `needles`.
fn assert_refused(r: crate::Result<()>, stage: usize, needles: &[&str]) {
    match r {
        Err(TopologyError::Schedule { stage: s, message }) => {
            assert_eq!(s, stage, "{message}");
            for n in needles {
                assert!(message.contains(n), "{message:?} lacks {n:?}");
            }
        }
        other => panic!("expected a Schedule error, got {other:?}"),
    }
}

#[test]
fn duplicate_input_is_refused() {
    let mut s = StageSchedule::new(cfg(2, 2, 0, 2), 1, Duration::MAX).unwrap();
    s.handle_input(T0, 0, Part::Patch(1)).unwrap();
    assert_refused(
        s.handle_input(T0, 0, Part::Patch(1)),
        1,
        &["duplicate", "step 0, patch 1"],
    );
    s.handle_input(T0, 0, Part::Patch(0)).unwrap();
    assert_eq!(
        drain(&mut s),
        vec![StageAction::Launch(item(0, Part::Patch(0)))]
    );
    // Already consumed by the launch.
    assert_refused(
        s.handle_input(T0, 0, Part::Patch(0)),
        1,
        &["duplicate", "step 0, patch 0"],
    );
    assert_eq!(s.poll_action(), None);
}

#[test]
fn whole_and_patch_inputs_for_one_step_conflict_at_stage0() {
    let mut s = StageSchedule::new(cfg(2, 3, 1, 3), 0, Duration::MAX).unwrap();
    s.handle_input(T0, 1, Part::Whole).unwrap();
    assert_refused(
        s.handle_input(T0, 1, Part::Patch(2)),
        0,
        &["duplicate", "step 1, patch 2"],
    );
    assert_refused(
        s.handle_input(T0, 1, Part::Whole),
        0,
        &["duplicate", "step 1"],
    );
    s.handle_input(T0, 2, Part::Patch(1)).unwrap();
    assert_refused(
        s.handle_input(T0, 2, Part::Whole),
        0,
        &["duplicate", "step 2"],
    );
    assert_eq!(
        s.poll_action(),
        None,
        "nothing runs before the step-0 input"
    );
}

#[test]
fn inputs_that_name_no_item_are_refused() {
    let mut s = StageSchedule::new(cfg(2, 2, 1, 3), 1, Duration::MAX).unwrap();
    assert_refused(
        s.handle_input(T0, 3, Part::Patch(0)),
        1,
        &["step 3", "3 steps"],
    );
    assert_refused(
        s.handle_input(T0, 1, Part::Patch(2)),
        1,
        &["step 1, patch 2", "2 patches"],
    );
    assert_refused(
        s.handle_input(T0, 0, Part::Patch(0)),
        1,
        &["step 0", "warmup"],
    );
    assert_refused(
        s.handle_input(T0, 1, Part::Whole),
        1,
        &["step 1", "only stage 0"],
    );
    let mut s0 = StageSchedule::new(cfg(2, 2, 1, 3), 0, Duration::MAX).unwrap();
    assert_refused(s0.handle_input(T0, 3, Part::Whole), 0, &["step 3"]);
    // The refusals changed nothing: the stage still runs normally.
    s.handle_input(T0, 0, Part::Whole).unwrap();
    assert_eq!(
        drain(&mut s),
        vec![StageAction::Launch(item(0, Part::Whole))]
    );
}

#[test]
fn compute_done_for_an_item_not_running_is_refused() {
    let mut s = StageSchedule::new(cfg(1, 2, 0, 1), 0, Duration::MAX).unwrap();
    let (p0, p1) = (item(0, Part::Patch(0)), item(0, Part::Patch(1)));
    assert_refused(
        s.handle_compute_done(T0, p0),
        0,
        &["step 0, patch 0", "no item"],
    );
    s.handle_input(T0, 0, Part::Patch(0)).unwrap();
    drain(&mut s);
    assert_refused(
        s.handle_compute_done(T0, p1),
        0,
        &["step 0, patch 1", "running"],
    );
    s.handle_compute_done(T0, p0).unwrap();
    assert_refused(s.handle_compute_done(T0, p0), 0, &["step 0, patch 0"]);
    assert_eq!(s.next_item(), Some(p1));
}

#[test]
fn new_rejects_a_stage_outside_the_pipeline_or_a_bad_config() {
    let r = StageSchedule::new(cfg(2, 1, 0, 1), 2, Duration::MAX).map(|_| ());
    assert_refused(r, 2, &["2 stages"]);
    let r = StageSchedule::new(cfg(2, 1, 0, 0), 0, Duration::MAX);
    assert!(matches!(r, Err(TopologyError::Invalid { .. })));
}

#[test]
fn actions_after_a_compute_done_come_in_documented_order() {
    // Last stage of two, two patches, two steps; every input arrives early.
    let mut s = StageSchedule::new(cfg(2, 2, 0, 2), 1, Duration::MAX).unwrap();
    let p = |t, i| item(t, Part::Patch(i));
    for t in [1, 0] {
        for i in [1, 0] {
            s.handle_input(T0, t, Part::Patch(i)).unwrap();
        }
    }
    assert_eq!(drain(&mut s), vec![StageAction::Launch(p(0, 0))]);
    let send = |step, i| StageAction::Send {
        to: 0,
        step,
        part: Part::Patch(i),
    };
    s.handle_compute_done(T0, p(0, 0)).unwrap();
    assert_eq!(
        drain(&mut s),
        vec![send(1, 0), StageAction::Launch(p(0, 1))]
    );
    s.handle_compute_done(T0, p(0, 1)).unwrap();
    let step_done = StageAction::StepDone { step: 0 };
    assert_eq!(
        drain(&mut s),
        vec![send(1, 1), step_done, StageAction::Launch(p(1, 0))]
    );
    s.handle_compute_done(T0, p(1, 0)).unwrap();
    s.handle_compute_done(T0, p(1, 1)).unwrap();
    let end = vec![
        StageAction::Launch(p(1, 1)),
        StageAction::StepDone { step: 1 },
        StageAction::Finished,
    ];
    assert_eq!(drain(&mut s), end);
    assert!(s.is_finished() && s.next_item().is_none() && s.poll_timeout().is_none());
    assert_eq!(s.stats().launched, 4);
}
