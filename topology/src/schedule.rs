//! The PipeFusion patch pipeline of one request, as a pure per-stage state machine.
//!
//! A request has `T` steps. Steps `0..W` are warmup steps with one work item each (the whole
//! image, [`Part::Whole`]); steps `W..T` are PipeFusion steps with `M` items
//! ([`Part::Patch`]`(0..M)`). `N` stages form a chain `0 -> 1 -> ... -> N-1`, and the last stage
//! feeds the next step's latent back to stage 0 (ALGORITHMS.md §2). Every stage runs every item,
//! one at a time, strictly in global order (step, then patch): that order is what keeps each
//! layer's KV buffer consistent.
//!
//! [`StageSchedule`] is the state machine of one stage. It performs no I/O and reads no clock:
//! the driver (an actor) feeds it events through `handle_*` with an explicit `now` and carries
//! out what it returns from [`StageSchedule::poll_action`] and [`StageSchedule::poll_timeout`].
//! The same driver loop serves every stage; the tests drive `N` of them in a simulated cluster
//! with a virtual clock.

use std::fmt;
use std::time::Duration;

pub use device::{CoreFailure, CoreOutput, DeviceCore, EARLY_INPUTS_MAX};

mod config;
mod device;
mod inputs;
mod stage;
#[cfg(test)]
mod tests;

/// Which part of the latent a work item covers.
///
/// Ordered `Whole < Patch(0) < Patch(1) < ...`; a step has either one `Whole` item (warmup) or
/// `M` patches, never both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Part {
    /// The whole image: the one item of a warmup step.
    Whole,
    /// One horizontal strip of token rows (`0..M`) of a PipeFusion step.
    Patch(usize),
}

/// One unit of work: a part of one denoising step. Ordered by step, then part (global order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkItem {
    /// The denoising step, `0..T`.
    pub step: usize,
    /// The part of the latent.
    pub part: Part,
}

/// The shape of one request's pipeline: stages, patches, warmup steps and steps.
///
/// `warmup` may exceed `steps`: it is clamped (every step is then a warmup step).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduleConfig {
    /// Pipeline stages `N` (>= 1).
    pub stages: usize,
    /// Patches `M` per PipeFusion step (>= 1).
    pub patches: usize,
    /// Warmup steps `W` (full-image, synchronous); clamped to `steps`.
    pub warmup: usize,
    /// Denoising steps `T` (>= 1).
    pub steps: usize,
}

/// What the driver of a stage must do next, from [`StageSchedule::poll_action`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageAction {
    /// Run this stage's layers on `item` (its input is present). At most one item runs at a time.
    Launch(WorkItem),
    /// Send the output of the item that just completed to stage `to`, labelled as the input
    /// (`step`, `part`) of the receiver.
    Send {
        /// The receiving stage (`0` from the last stage, including the last stage itself when
        /// `N = 1`: the driver loops the message back).
        to: usize,
        /// The step the receiver uses this input for.
        step: usize,
        /// The part the receiver uses this input for ([`Part::Whole`] from the last warmup step
        /// to the first PipeFusion step: stage 0 uses it for all `M` patches).
        part: Part,
    },
    /// Last stage only: every part of `step` is done (the driver advances the sampler, reports
    /// progress).
    StepDone {
        /// The step that completed.
        step: usize,
    },
    /// The stage's final item is done and its sends have been emitted. Every stage reports this
    /// exactly once.
    Finished,
    /// The stage gave up (see the failure). After this, `poll_action` returns `None` forever.
    Failed(ScheduleFailure),
}

/// Why a stage gave up on a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScheduleFailure {
    /// Waited longer than the stall timeout for the input of `waiting_for` (from stage `from`).
    Stalled {
        /// The stage that waited.
        stage: usize,
        /// The item whose input never came.
        waiting_for: WorkItem,
        /// The stage that should have sent it (stage 0 itself for the request's step-0 input).
        from: usize,
    },
    /// A peer stage was reported lost (driver calls `handle_peer_lost`) while this stage still
    /// needed it.
    PeerLost {
        /// The stage that gave up.
        stage: usize,
        /// The lost stage.
        peer: usize,
        /// The item being computed, or else the next item the stage was waiting for.
        during: Option<WorkItem>,
    },
}

/// Counters of one stage, for benchmarks and bubble measurements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StageStats {
    /// Total time between each launch and its compute-done.
    pub busy: Duration,
    /// Items launched so far.
    pub launched: usize,
    /// When the first item was launched.
    pub first_launch: Option<Duration>,
    /// When the final item's compute completed ([`StageAction::Finished`]).
    pub finished_at: Option<Duration>,
}

/// The PipeFusion schedule of one pipeline stage for one request (sans-IO, like `quinn-proto`'s
/// `Connection`).
///
/// # Invariant
///
/// The stage launches every item of [`ScheduleConfig::items`] exactly once, in that global
/// order (step, then patch), one at a time, and only once the item's input is present. Inputs
/// may arrive early and in any order; they are buffered. The input of item `(t, p)` comes from
/// stage `s - 1` (its output of `(t, p)`) for `s > 0`; for stage 0 it comes from the last stage
/// (its output of step `t - 1`), or from the request at step 0. A duplicate input, an input
/// that names no item of this stage, or a compute-done for an item that is not running is
/// refused with [`crate::TopologyError::Schedule`] and leaves the state unchanged.
///
/// # Calling order
///
/// * Events in: [`handle_input`](Self::handle_input), [`handle_compute_done`](
///   Self::handle_compute_done), [`handle_peer_lost`](Self::handle_peer_lost),
///   [`handle_timeout`](Self::handle_timeout) (when `now >= poll_timeout()`), each with `now`,
///   the time since the request started.
/// * After every `handle_*` call, drain [`poll_action`](Self::poll_action) until `None`, then
///   re-arm the timer from [`poll_timeout`](Self::poll_timeout).
/// * After a compute-done, actions come in this order: [`StageAction::Send`] (unless the item
///   was the last stage's item of the final step), [`StageAction::StepDone`] (last stage, last
///   part of a step), [`StageAction::Finished`] (final item), then [`StageAction::Launch`] of
///   the next item if its input is already present. After an input, at most one `Launch`.
/// * The stall timer is armed while the stage sits idle waiting for its next item's input:
///   deadline = idle since + stall timeout (idle since 0 before the first launch). Choose a
///   timeout longer than one full trip around the ring (a warmup step on every stage).
/// * Once [`StageAction::Failed`] is returned, the stage ignores every later event (`Ok`) and
///   returns nothing more.
#[derive(Debug)]
pub struct StageSchedule {
    cfg: ScheduleConfig,
    stage: usize,
    stall_timeout: Duration,
    /// Index in global order of the next item to launch.
    cursor: usize,
    /// Inputs received for items not launched yet.
    pending: std::collections::BTreeSet<WorkItem>,
    phase: Phase,
    actions: std::collections::VecDeque<StageAction>,
    stats: StageStats,
}

/// Where a stage is in its run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the input of the next item since the given time.
    Idle { since: Duration },
    /// Computing `item` since `since`; its input was the one received as `input`, whose last
    /// user it is when `releases` (see [`StageSchedule::launched_input`]).
    Running {
        item: WorkItem,
        since: Duration,
        input: WorkItem,
        releases: bool,
    },
    /// Every item has completed.
    Finished,
    /// Gave up; see the `Failed` action.
    Failed,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Part::Whole => f.write_str("whole"),
            Part::Patch(p) => write!(f, "{p}"),
        }
    }
}

impl fmt::Display for WorkItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.part {
            Part::Whole => write!(f, "step {}, whole image", self.step),
            Part::Patch(p) => write!(f, "step {}, patch {p}", self.step),
        }
    }
}

impl fmt::Display for ScheduleFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScheduleFailure::Stalled {
                stage,
                waiting_for,
                from,
            } => {
                write!(
                    f,
                    "stage {stage} stalled: no input for {waiting_for} within the stall timeout"
                )?;
                if *stage == 0 && waiting_for.step == 0 {
                    f.write_str(" (expected from the request)")
                } else {
                    write!(f, " (expected from stage {from})")
                }
            }
            ScheduleFailure::PeerLost {
                stage,
                peer,
                during: Some(item),
            } => write!(f, "stage {stage}: peer stage {peer} was lost at {item}"),
            ScheduleFailure::PeerLost {
                stage,
                peer,
                during: None,
            } => write!(
                f,
                "stage {stage}: peer stage {peer} was lost while still needed"
            ),
        }
    }
}

impl std::error::Error for ScheduleFailure {}
