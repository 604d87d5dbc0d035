//! One property test: random shapes, compute times, link latencies, jitter and a straggler;
//! every run finishes and obeys every invariant.

use std::time::Duration;

use proptest::prelude::*;

use super::cfg;
use super::invariants::assert_completed;
use super::rng::XorShift;
use super::sim::SimCluster;
use crate::schedule::{Part, WorkItem};

/// A deterministic value in `1..=max_us` microseconds for (seed, a, b, c).
fn draw(seed: u64, a: usize, b: usize, c: usize, max_us: u64) -> Duration {
    let mix = seed ^ ((a as u64) << 40) ^ ((b as u64) << 20) ^ (c as u64);
    let mut rng = XorShift::new(mix);
    rng.next_u64();
    Duration::from_micros(1 + rng.below(max_us))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn random_pipelines_finish_with_every_invariant(
        n in 1usize..5,
        m in 1usize..9,
        t in 1usize..7,
        w_pick in 0usize..64,
        seed in any::<u64>(),
        jitter_us in 0u64..3_000,
        straggler in proptest::option::of((0usize..4, 2u32..8)),
        whole_request in any::<bool>(),
    ) {
        let w = w_pick % (t + 2); // 0..=T+1
        let compute = move |stage: usize, item: WorkItem| {
            let part = match item.part {
                Part::Whole => usize::MAX >> 44,
                Part::Patch(p) => p,
            };
            draw(seed, stage, item.step, part, 5_000)
        };
        let latency = move |from: usize, to: usize| draw(!seed, from, to, 7, 2_000);
        let mut sim = SimCluster::new(cfg(n, m, w, t))
            .compute(compute)
            .latency(latency)
            .jitter(seed, jitter_us);
        if let Some((stage, factor)) = straggler {
            sim = sim.straggler(stage % n, factor);
        }
        if whole_request {
            sim = sim.whole_request_input();
        }
        let items = cfg(n, m, w, t).item_count();
        // Each item costs at most launch + done + send + delivery + a timer per stage.
        prop_assert!(sim.drive_bounded(6 * n * items + 16), "did not finish: deadlock");
        assert_completed(&sim);
    }
}
