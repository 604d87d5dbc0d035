//! Complete runs in the simulated cluster: shapes, warmup variants, timing and bubbles.

use std::time::Duration;

use super::cfg;
use super::invariants::assert_completed;
use super::sim::{ms, SimCluster};
use crate::schedule::{Part, ScheduleConfig, WorkItem};

/// Uneven but deterministic compute times, so stages drift relative to each other.
fn uneven(stage: usize, item: WorkItem) -> Duration {
    let p = match item.part {
        Part::Whole => 7,
        Part::Patch(p) => p,
    };
    ms(1 + ((stage * 5 + item.step * 3 + p * 2) % 7) as u64)
}

fn run(c: ScheduleConfig) -> SimCluster {
    let mut sim = SimCluster::new(c)
        .compute(uneven)
        .latency(|from, to| ms(((from + 2 * to) % 3) as u64));
    sim.drive();
    assert_completed(&sim);
    sim
}

#[test]
fn one_to_four_stages_with_fewer_equal_and_more_patches_than_stages() {
    for n in 1..=4 {
        for m in [1, 2, 3, n, 2 * n] {
            for (w, t) in [(0, 3), (1, 3), (2, 4)] {
                run(cfg(n, m, w, t));
            }
        }
    }
}

#[test]
fn single_stage_sends_to_itself() {
    let sim = run(cfg(1, 3, 1, 4));
    assert!(sim
        .sends
        .iter()
        .filter(|m| m.from.is_some())
        .all(|m| m.to == 0));
}

#[test]
fn no_warmup_starts_with_patches_from_the_request() {
    let sim = run(cfg(3, 4, 0, 3));
    let first = sim.launches.first().expect("a launch");
    assert_eq!(
        (first.stage, first.item),
        (
            0,
            WorkItem {
                step: 0,
                part: Part::Patch(0)
            }
        )
    );
}

#[test]
fn last_warmup_step_sends_one_whole_message_to_stage0() {
    let sim = run(cfg(3, 4, 1, 3));
    let to_first_patched: Vec<WorkItem> = sim
        .sends
        .iter()
        .filter(|m| m.from == Some(2) && m.label.step == 1)
        .map(|m| m.label)
        .collect();
    assert_eq!(
        to_first_patched,
        vec![WorkItem {
            step: 1,
            part: Part::Whole
        }]
    );
}

#[test]
fn all_warmup_steps_run_one_stage_at_a_time() {
    let (n, t) = (3, 4);
    let mut sim = SimCluster::new(cfg(n, 5, t, t)).compute(|_, _| ms(2));
    sim.drive();
    assert_completed(&sim);
    assert!(sim.launches.iter().all(|l| l.item.part == Part::Whole));
    assert_eq!(sim.makespan(), ms(2) * (n * t) as u32);
    assert!((sim.bubble_fraction() - (1.0 - 1.0 / n as f64)).abs() < 1e-9);
}

#[test]
fn warmup_longer_than_steps_equals_all_warmup() {
    let a = run(cfg(2, 3, 9, 3));
    let b = run(cfg(2, 3, 3, 3));
    assert_eq!(a.makespan(), b.makespan());
    assert_eq!(a.launches.len(), 2 * 3);
}

#[test]
fn single_step_request_sends_nothing_back() {
    for w in [0, 1] {
        let sim = run(cfg(3, 2, w, 1));
        assert!(sim.sends.iter().all(|m| m.from != Some(2)));
        assert_eq!(sim.step_done.len(), 1);
    }
}

#[test]
fn request_may_hand_stage0_the_whole_latent_of_a_patched_first_step() {
    let mut sim = SimCluster::new(cfg(2, 3, 0, 2)).whole_request_input();
    sim.drive();
    assert_completed(&sim);
}

#[test]
fn straggler_stage_slows_the_pipeline_without_breaking_it() {
    let c = cfg(4, 4, 1, 4);
    let mut fast = SimCluster::new(c);
    fast.drive();
    let mut slow = SimCluster::new(c).straggler(2, 10);
    slow.drive();
    assert_completed(&slow);
    let busy: Vec<Duration> = slow.stages.iter().map(|s| s.stats().busy).collect();
    assert_eq!(busy[2], busy[0] * 10);
    assert!(slow.makespan() >= busy[2] && slow.makespan() > fast.makespan());
}

#[test]
fn jittered_links_reorder_messages_without_harm() {
    let mut sim = SimCluster::new(cfg(3, 6, 1, 4))
        .latency(|_, _| ms(1))
        .jitter(7, 5_000);
    sim.drive();
    assert_completed(&sim);
    let overtaken = sim.sends.iter().enumerate().any(|(i, a)| {
        sim.sends[i + 1..]
            .iter()
            .any(|b| (a.from, a.to) == (b.from, b.to) && b.delivered < a.delivered)
    });
    assert!(
        overtaken,
        "jitter should make some message overtake another"
    );
}

#[test]
fn makespan_matches_the_analytic_pipeline_value() {
    let (n, m, t) = (2, 4, 10);
    let c = ms(10);
    let mut sim = SimCluster::new(cfg(n, m, 0, t)).compute(move |_, _| c);
    sim.drive();
    assert_completed(&sim);
    assert_eq!(sim.makespan(), c * (t * m + n - 1) as u32);
}

#[test]
fn fewer_patches_than_stages_leave_a_larger_bubble() {
    let (n, t) = (4, 10);
    let c = ms(10);
    let bubble = |m: usize| {
        let mut sim = SimCluster::new(cfg(n, m, 0, t)).compute(move |_, _| c);
        sim.drive();
        assert_completed(&sim);
        (sim.makespan(), sim.bubble_fraction())
    };
    let (few_span, few) = bubble(2);
    // M < N: each patch waits for its own trip around the ring.
    assert_eq!(few_span, c * ((t - 1) * n + 2 + n - 1) as u32);
    for m in [n, 2 * n] {
        let (span, enough) = bubble(m);
        assert_eq!(span, c * (t * m + n - 1) as u32);
        assert!(few > enough, "bubble M=2 ({few}) <= M={m} ({enough})");
    }
}
