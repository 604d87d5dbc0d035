//! The invariants of a completed run, checked against a `SimCluster`'s records.

use std::collections::HashMap;
use std::time::Duration;

use super::sim::{Launch, SimCluster};
use crate::schedule::{Part, WorkItem};

/// Panics (with the broken invariant) unless the run completed and obeyed every rule.
pub(super) fn assert_completed(sim: &SimCluster) {
    let cfg = sim.cfg;
    let n = cfg.stages;
    let last = n - 1;
    let items = cfg.items();
    assert!(sim.failures.is_empty(), "failures: {:?}", sim.failures);
    assert!(
        sim.all_done(),
        "run did not finish (deadlock?) after {} events",
        sim.events
    );

    // Every stage launched every item exactly once, in global order, never overlapping.
    let mut end_of: HashMap<(usize, WorkItem), Duration> = HashMap::new();
    let mut start_of: HashMap<(usize, WorkItem), Duration> = HashMap::new();
    for s in 0..n {
        let mine: Vec<&Launch> = sim.launches.iter().filter(|l| l.stage == s).collect();
        let order: Vec<WorkItem> = mine.iter().map(|l| l.item).collect();
        assert_eq!(
            order, items,
            "stage {s} launches are not the items in global order"
        );
        for pair in mine.windows(2) {
            let prev_end = pair[0].end.expect("completed");
            assert!(
                pair[1].start >= prev_end,
                "stage {s}: {} overlaps",
                pair[1].item
            );
        }
        let mut busy = Duration::ZERO;
        for l in &mine {
            let end = l.end.expect("every launch completes");
            busy += end - l.start;
            end_of.insert((s, l.item), end);
            start_of.insert((s, l.item), l.start);
        }
        let stats = sim.stages[s].stats();
        assert_eq!(stats.launched, items.len(), "stage {s} launched count");
        assert_eq!(stats.busy, busy, "stage {s} busy time");
        assert_eq!(
            stats.first_launch,
            mine.first().map(|l| l.start),
            "stage {s} first launch"
        );
        let done = mine.last().and_then(|l| l.end);
        assert_eq!(stats.finished_at, done, "stage {s} finished_at");
        assert!(sim.stages[s].is_finished(), "stage {s} not finished");
        let fins = sim.finished.iter().filter(|f| f.0 == s).count();
        assert_eq!(fins, 1, "stage {s} reported Finished {fins} times");
    }

    // Data dependencies, including link latency.
    for &item in &items {
        for s in 0..n {
            let start = start_of[&(s, item)];
            let ready = if s > 0 {
                Some(end_of[&(s - 1, item)] + sim.link_latency(s - 1, s))
            } else if item.step > 0 {
                let prev = WorkItem {
                    step: item.step - 1,
                    part: if cfg.is_warmup(item.step - 1) {
                        Part::Whole
                    } else {
                        item.part
                    },
                };
                Some(end_of[&(last, prev)] + sim.link_latency(last, 0))
            } else {
                None
            };
            if let Some(ready) = ready {
                assert!(
                    start >= ready,
                    "stage {s} launched {item} before its input was ready"
                );
            }
            let delivered = sim.sends.iter().filter(|m| m.to == s).any(|m| {
                let covers = m.label == item
                    || (s == 0 && m.label.step == item.step && m.label.part == Part::Whole);
                covers && m.delivered.is_some_and(|d| d <= start)
            });
            assert!(
                delivered,
                "stage {s} launched {item} before its input was delivered"
            );
        }
    }

    // Sends: each at its item's end, to the right stage, with the right label.
    for s in 0..n {
        let expected: Vec<(usize, WorkItem, Duration)> = items
            .iter()
            .filter(|it| s != last || it.step + 1 < cfg.steps)
            .map(|&it| {
                let at = end_of[&(s, it)];
                if s == last {
                    (
                        0,
                        WorkItem {
                            step: it.step + 1,
                            part: it.part,
                        },
                        at,
                    )
                } else {
                    (s + 1, it, at)
                }
            })
            .collect();
        let actual: Vec<(usize, WorkItem, Duration)> = sim
            .sends
            .iter()
            .filter(|m| m.from == Some(s))
            .map(|m| (m.to, m.label, m.at))
            .collect();
        assert_eq!(actual, expected, "stage {s} sends");
    }
    assert!(
        sim.sends.iter().all(|m| !m.dropped),
        "a message was dropped"
    );

    // StepDone once per step, in order, when the last stage completes the step's last part.
    let steps: Vec<usize> = sim.step_done.iter().map(|d| d.0).collect();
    assert_eq!(steps, (0..cfg.steps).collect::<Vec<_>>(), "StepDone order");
    for &(step, at) in &sim.step_done {
        let last_part = *cfg.parts(step).last().expect("a step has parts");
        let end = end_of[&(
            last,
            WorkItem {
                step,
                part: last_part,
            },
        )];
        assert_eq!(at, end, "StepDone {step} time");
    }
    assert_eq!(
        sim.makespan(),
        end_of[&(last, *items.last().expect("items"))]
    );
}
