//! Tests of [`StageSchedule`](super::StageSchedule): scenarios in a deterministic simulated
//! cluster (`sim::SimCluster`), unit tests of single events, and one proptest.

mod config;
mod device_core;
mod failures;
mod invariants;
mod prop;
mod refusals;
mod rng;
mod scenarios;
mod sim;

use super::ScheduleConfig;

/// `N` stages, `M` patches, `W` warmup steps, `T` steps.
fn cfg(stages: usize, patches: usize, warmup: usize, steps: usize) -> ScheduleConfig {
    ScheduleConfig {
        stages,
        patches,
        warmup,
        steps,
    }
}
