//! The event handlers and polls of [`StageSchedule`] (invariant and calling order: its type doc).

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use tracing::{debug, trace, warn};

use super::{
    Part, Phase, ScheduleConfig, ScheduleFailure, StageAction, StageSchedule, StageStats, WorkItem,
};
use crate::{Result, TopologyError};

impl StageSchedule {
    /// The schedule of stage `stage` of a pipeline shaped by `cfg`. `stall_timeout` bounds how
    /// long the stage waits idle for its next input before it reports [`ScheduleFailure::Stalled`].
    pub fn new(cfg: ScheduleConfig, stage: usize, stall_timeout: Duration) -> Result<Self> {
        cfg.validate()?;
        if stage >= cfg.stages {
            return Err(TopologyError::Schedule {
                stage,
                message: format!("no such stage: the pipeline has {} stages", cfg.stages),
            });
        }
        Ok(Self {
            cfg,
            stage,
            stall_timeout,
            cursor: 0,
            pending: BTreeSet::new(),
            phase: Phase::Idle {
                since: Duration::ZERO,
            },
            actions: VecDeque::new(),
            stats: StageStats::default(),
        })
    }

    /// The pipeline's shape.
    pub fn config(&self) -> &ScheduleConfig {
        &self.cfg
    }

    /// This stage's index, `0..N`.
    pub fn stage(&self) -> usize {
        self.stage
    }

    /// Whether this is the last stage (it applies the head and feeds stage 0).
    pub fn is_last(&self) -> bool {
        self.stage + 1 == self.cfg.stages
    }

    /// The input for (`step`, `part`) arrived. Stage 0 also accepts `(step, Part::Whole)` for a
    /// PipeFusion step: the input of all its patches. Errors on a duplicate or an input that
    /// names no item of this stage (the state is unchanged); ignored once failed.
    pub fn handle_input(&mut self, now: Duration, step: usize, part: Part) -> Result<()> {
        if self.phase == Phase::Failed {
            return Ok(());
        }
        let label = WorkItem { step, part };
        self.check_input(label)?;
        trace!(stage = self.stage, step, patch = %part, "input arrived");
        self.pending.insert(label);
        if let Phase::Idle { .. } = self.phase {
            self.try_launch(now);
        }
        Ok(())
    }

    /// The launched item finished computing. Errors if `item` is not the running item;
    /// ignored once failed.
    pub fn handle_compute_done(&mut self, now: Duration, item: WorkItem) -> Result<()> {
        let since = match self.phase {
            Phase::Failed => return Ok(()),
            Phase::Running {
                item: running,
                since,
                ..
            } if running == item => since,
            Phase::Running { item: running, .. } => {
                return Err(self.refuse(format!(
                    "compute done for {item}, but {running} is the running item"
                )))
            }
            _ => {
                return Err(self.refuse(format!("compute done for {item}, but no item is running")))
            }
        };
        let elapsed = now.saturating_sub(since);
        self.stats.busy += elapsed;
        debug!(stage = self.stage, step = item.step, patch = %item.part, ?elapsed, "compute done");
        if let Some((to, label)) = self.send_target(item) {
            trace!(stage = self.stage, to, step = label.step, patch = %label.part, "send");
            self.actions.push_back(StageAction::Send {
                to,
                step: label.step,
                part: label.part,
            });
        }
        if self.is_last() && self.is_last_part(item) {
            self.actions
                .push_back(StageAction::StepDone { step: item.step });
        }
        if self.cursor == self.cfg.item_count() {
            self.phase = Phase::Finished;
            self.stats.finished_at = Some(now);
            debug!(stage = self.stage, "finished");
            self.actions.push_back(StageAction::Finished);
        } else {
            self.phase = Phase::Idle { since: now };
            self.try_launch(now);
        }
        Ok(())
    }

    /// Stage `peer` is gone. The stage fails with [`ScheduleFailure::PeerLost`] if it still
    /// needed the peer: `peer` is its downstream and sends remain, or the stage still awaits an
    /// input that has to come around the ring (which every other stage may be on).
    pub fn handle_peer_lost(&mut self, _now: Duration, peer: usize) {
        if matches!(self.phase, Phase::Finished | Phase::Failed) {
            return;
        }
        if peer == self.stage || peer >= self.cfg.stages {
            warn!(
                stage = self.stage,
                peer, "peer lost: not a peer of this stage, ignored"
            );
            return;
        }
        let downstream = if self.is_last() { 0 } else { self.stage + 1 };
        let first_open = self.running().or_else(|| self.cfg.item_at(self.cursor));
        let sends_remain =
            !self.is_last() || first_open.is_some_and(|item| item.step + 1 < self.cfg.steps);
        let awaits_ring_input = (self.cursor..self.cfg.item_count())
            .filter_map(|i| self.cfg.item_at(i))
            .any(|item| !self.input_present(item) && (self.stage != 0 || item.step > 0));
        if (peer == downstream && sends_remain) || awaits_ring_input {
            self.fail(ScheduleFailure::PeerLost {
                stage: self.stage,
                peer,
                during: first_open,
            });
        } else {
            debug!(stage = self.stage, peer, "peer lost: no longer needed");
        }
    }

    /// Call when `now >= poll_timeout()`: emits [`StageAction::Failed`] with
    /// [`ScheduleFailure::Stalled`] if the stage is still waiting past the deadline.
    pub fn handle_timeout(&mut self, now: Duration) {
        let Some(deadline) = self.poll_timeout() else {
            return;
        };
        if now < deadline {
            return;
        }
        let Some(waiting_for) = self.cfg.item_at(self.cursor) else {
            return;
        };
        let from = match (self.stage, waiting_for.step) {
            (0, 0) => 0,
            (0, _) => self.cfg.stages - 1,
            (s, _) => s - 1,
        };
        self.fail(ScheduleFailure::Stalled {
            stage: self.stage,
            waiting_for,
            from,
        });
    }

    /// Next output; call until `None` after every `handle_*` call. Order after a compute-done:
    /// `Send` (if any), `StepDone` (if any), `Finished` (if final), then `Launch` of the next
    /// item if its input is present.
    pub fn poll_action(&mut self) -> Option<StageAction> {
        self.actions.pop_front()
    }

    /// Deadline of the stall timer: set while the stage is idle waiting for the next item's
    /// input (idle since + stall timeout); `None` while computing, finished or failed.
    pub fn poll_timeout(&self) -> Option<Duration> {
        match self.phase {
            Phase::Idle { since } => Some(since.saturating_add(self.stall_timeout)),
            _ => None,
        }
    }

    /// The next item to launch, in global order; `None` once every item has been launched.
    pub fn next_item(&self) -> Option<WorkItem> {
        match self.phase {
            Phase::Failed => None,
            _ => self.cfg.item_at(self.cursor),
        }
    }

    /// Whether every item has completed (the stage returned or will return `Finished`).
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Finished
    }

    /// Whether the stage gave up (it returned or will return `Failed`).
    pub fn is_failed(&self) -> bool {
        self.phase == Phase::Failed
    }

    /// Busy time, launches and timestamps so far.
    pub fn stats(&self) -> StageStats {
        self.stats
    }

    fn running(&self) -> Option<WorkItem> {
        match self.phase {
            Phase::Running { item, .. } => Some(item),
            _ => None,
        }
    }

    /// The running item's input, as the label it arrived under, and whether the item is its last
    /// user. An item's input is its own label's, except on stage 0 in a PipeFusion step whose
    /// input came as one whole latent (after the last warmup step, or the request's at step 0):
    /// that whole latent stands for every patch of the step and is released after the last one.
    /// `None` while no item runs.
    pub fn launched_input(&self) -> Option<(WorkItem, bool)> {
        match self.phase {
            Phase::Running {
                input, releases, ..
            } => Some((input, releases)),
            _ => None,
        }
    }

    fn is_last_part(&self, item: WorkItem) -> bool {
        match item.part {
            Part::Whole => true,
            Part::Patch(p) => p + 1 == self.cfg.patches,
        }
    }

    /// Where the output of `item` goes and what the receiver calls it. Warmup items are `Whole`,
    /// so the last warmup step's output is one `(W, Whole)` message to stage 0.
    fn send_target(&self, item: WorkItem) -> Option<(usize, WorkItem)> {
        if !self.is_last() {
            return Some((self.stage + 1, item));
        }
        let step = item.step + 1;
        (step < self.cfg.steps).then_some((
            0,
            WorkItem {
                step,
                part: item.part,
            },
        ))
    }

    /// Where the input of `item` (not yet launched) is, if it has arrived: the label it arrived
    /// under and whether `item` is its last user (the rule of [`Self::launched_input`]).
    fn input_source(&self, item: WorkItem) -> Option<(WorkItem, bool)> {
        if self.pending.contains(&item) {
            return Some((item, true));
        }
        let whole = WorkItem {
            step: item.step,
            part: Part::Whole,
        };
        let stands_for_patch = self.stage == 0 && matches!(item.part, Part::Patch(_));
        (stands_for_patch && self.pending.contains(&whole))
            .then_some((whole, item.part == Part::Patch(self.cfg.patches - 1)))
    }

    /// Whether the input of `item` (not yet launched) has arrived.
    fn input_present(&self, item: WorkItem) -> bool {
        self.input_source(item).is_some()
    }

    /// Launches the next item if the stage is idle and its input is present.
    fn try_launch(&mut self, now: Duration) {
        let Some(item) = self.cfg.item_at(self.cursor) else {
            return;
        };
        if !matches!(self.phase, Phase::Idle { .. }) {
            return;
        }
        let Some((input, releases)) = self.input_source(item) else {
            return;
        };
        if releases {
            self.pending.remove(&input);
        }
        self.cursor += 1;
        self.phase = Phase::Running {
            item,
            since: now,
            input,
            releases,
        };
        self.stats.launched += 1;
        self.stats.first_launch.get_or_insert(now);
        debug!(stage = self.stage, step = item.step, patch = %item.part, "launch");
        self.actions.push_back(StageAction::Launch(item));
    }

    fn fail(&mut self, failure: ScheduleFailure) {
        warn!(stage = self.stage, %failure, "schedule failed");
        self.phase = Phase::Failed;
        self.pending.clear();
        self.actions.clear();
        self.actions.push_back(StageAction::Failed(failure));
    }

    pub(super) fn refuse(&self, message: String) -> TopologyError {
        debug!(stage = self.stage, %message, "event refused");
        TopologyError::Schedule {
            stage: self.stage,
            message,
        }
    }
}
