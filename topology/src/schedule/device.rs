//! [`DeviceCore`]: everything a device decides about its requests, sans-IO, around its
//! [`StageSchedule`]: the inputs it holds (keyed by the schedule's labels), inputs of a request it
//! has not begun yet, the item on its compute thread and that item's deadline. A driver (the
//! device actor) feeds it events with an explicit `now` and carries out its outputs; the core is
//! generic over the payload `T` (a tensor in the runtime, a number in the tests), so this crate
//! stays free of tensors, clocks and I/O.
//!
//! # Calling order
//!
//! * Events in, each with `now` (time since any fixed origin, the same for every call):
//!   [`begin`](DeviceCore::begin), [`handle_input`](DeviceCore::handle_input),
//!   [`handle_compute_done`](DeviceCore::handle_compute_done),
//!   [`handle_peer_lost`](DeviceCore::handle_peer_lost),
//!   [`handle_timeout`](DeviceCore::handle_timeout) (once `now >= poll_timeout()`),
//!   [`fail`](DeviceCore::fail), [`abort`](DeviceCore::abort).
//! * After every event, drain [`poll_output`](DeviceCore::poll_output) until `None`, then re-arm
//!   one timer at [`poll_timeout`](DeviceCore::poll_timeout): the earlier of the schedule's stall
//!   deadline and the running item's compute deadline.
//!
//! # Invariant
//!
//! At most one request is active. Its schedule's rules hold (every item once, in global order,
//! one at a time); each output carries the request's id. An input is accepted once, for an item of
//! this stage; an input of a later request is kept (at most [`EARLY_INPUTS_MAX`]) and handed to
//! the schedule when that request begins; an input of an earlier request is dropped. A refused
//! input, a compute error, a compute past its deadline or a lost peer still needed ends the
//! request with one [`CoreOutput::Failed`]; nothing of it is output afterwards.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use tracing::{debug, warn};

use super::{
    Part, ScheduleConfig, ScheduleFailure, StageAction, StageSchedule, StageStats, WorkItem,
};

/// Inputs of not-yet-begun requests a core keeps at most (more are dropped, with a warning: a
/// peer cannot be that far ahead of a device that is still in the previous request).
pub const EARLY_INPUTS_MAX: usize = 1024;

/// What the driver must do, from [`DeviceCore::poll_output`].
#[derive(Debug, Clone, PartialEq)]
pub enum CoreOutput<T> {
    /// Run `item` of `request` on `input` (the payload received from `from`, the device rank the
    /// driver named when it handed the input in).
    Launch {
        /// Request id.
        request: u64,
        /// The work item.
        item: WorkItem,
        /// Its input.
        input: T,
        /// The label the input arrived under: `item`'s own, or on stage 0 the step's whole
        /// latent standing for each patch ([`StageSchedule::launched_input`]).
        label: WorkItem,
        /// Who sent the input.
        from: usize,
    },
    /// Send `payload` (the output of the item that just completed) to stage `to`, as its input
    /// for `item`. Never addressed to this stage itself: a one-stage pipeline's loop is closed
    /// inside the core.
    Send {
        /// Request id.
        request: u64,
        /// Receiving stage.
        to: usize,
        /// The receiver's item.
        item: WorkItem,
        /// The payload.
        payload: T,
    },
    /// Every part of `step` is done on this stage (the last stage reports progress).
    StepDone {
        /// Request id.
        request: u64,
        /// The step.
        step: usize,
    },
    /// The stage ran its last item.
    Finished {
        /// Request id.
        request: u64,
        /// Busy time and counts of the schedule.
        stats: StageStats,
        /// Of the busy time, what the compute thread spent waiting in exchanges.
        exchange_wait: Duration,
    },
    /// The request failed on this device.
    Failed {
        /// Request id.
        request: u64,
        /// The step it failed at, when known.
        step: Option<usize>,
        /// Why.
        reason: CoreFailure,
    },
}

impl<T> CoreOutput<T> {
    /// The request the output belongs to.
    pub fn request(&self) -> u64 {
        match self {
            CoreOutput::Launch { request, .. }
            | CoreOutput::Send { request, .. }
            | CoreOutput::StepDone { request, .. }
            | CoreOutput::Finished { request, .. }
            | CoreOutput::Failed { request, .. } => *request,
        }
    }
}

/// Why a request failed on a device.
#[derive(Debug, Clone, PartialEq)]
pub enum CoreFailure {
    /// The schedule gave up: a stall, or a peer stage lost while still needed.
    Schedule(ScheduleFailure),
    /// The running item computed past the compute timeout.
    ComputeTimeout {
        /// The item.
        item: WorkItem,
        /// The timeout.
        timeout: Duration,
    },
    /// An input the schedule refused (a duplicate, or one that names no item of this stage).
    Refused(String),
    /// The driver reported a failure (a compute error, a failed exchange, a lost group member).
    Reported(String),
}

impl std::fmt::Display for CoreFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CoreFailure::Schedule(s) => write!(f, "{s}"),
            CoreFailure::ComputeTimeout { item, timeout } => write!(
                f,
                "computing {item} took longer than the compute timeout ({:.1} s)",
                timeout.as_secs_f64()
            ),
            CoreFailure::Refused(m) | CoreFailure::Reported(m) => f.write_str(m),
        }
    }
}

/// The active request.
#[derive(Debug)]
struct Active<T> {
    id: u64,
    /// `now` when it began: the schedule's clock starts there.
    begun: Duration,
    schedule: StageSchedule,
    /// Inputs received and not yet used up, with their senders.
    inputs: BTreeMap<WorkItem, (usize, T)>,
    /// The running item and since when.
    running: Option<(WorkItem, Duration)>,
    /// The output of the item that just completed, until the schedule says where it goes.
    output: Option<T>,
    /// Time the compute thread waited in exchanges so far.
    exchange_wait: Duration,
}

/// One device's requests, sans-IO (see the module documentation).
#[derive(Debug)]
pub struct DeviceCore<T> {
    /// This device's rank (the sender of what it loops back to itself).
    me: usize,
    stage: usize,
    stall_timeout: Duration,
    compute_timeout: Duration,
    active: Option<Active<T>>,
    /// The newest request begun (ids only grow).
    newest: u64,
    /// Inputs of requests not begun yet: (request, item, sender, payload).
    early: Vec<(u64, WorkItem, usize, T)>,
    /// Inputs of requests not begun yet that could not be used: (request, step, why).
    early_refused: Vec<(u64, Option<usize>, String)>,
    outputs: VecDeque<CoreOutput<T>>,
}

impl<T: Clone> DeviceCore<T> {
    /// The core of device `me` (its rank) at pipeline stage `stage`.
    pub fn new(
        me: usize,
        stage: usize,
        stall_timeout: Duration,
        compute_timeout: Duration,
    ) -> Self {
        DeviceCore {
            me,
            stage,
            stall_timeout,
            compute_timeout,
            active: None,
            newest: 0,
            early: Vec::new(),
            early_refused: Vec::new(),
            outputs: VecDeque::new(),
        }
    }

    /// A core that treats every request up to `floor` as already begun: a device restarted in a
    /// new role (after a node was lost or came back) drops whatever still arrives for the runs
    /// of its predecessor instead of keeping it for later.
    pub fn with_floor(mut self, floor: u64) -> Self {
        self.newest = self.newest.max(floor);
        self
    }

    /// The active request's id.
    pub fn request(&self) -> Option<u64> {
        self.active.as_ref().map(|a| a.id)
    }

    /// The item on the compute thread.
    pub fn running(&self) -> Option<WorkItem> {
        self.active.as_ref().and_then(|a| a.running.map(|r| r.0))
    }

    /// Begins request `request` shaped by `cfg` (replacing any active one, whose outputs stop),
    /// then hands it the inputs that arrived early. Errors on an invalid shape or an id that is
    /// not newer than the last one begun.
    pub fn begin(&mut self, now: Duration, request: u64, cfg: ScheduleConfig) -> crate::Result<()> {
        if request <= self.newest && self.newest != 0 {
            return Err(crate::TopologyError::Schedule {
                stage: self.stage,
                message: format!(
                    "request {request} begins after request {}: ids only grow",
                    self.newest
                ),
            });
        }
        let schedule = StageSchedule::new(cfg, self.stage, self.stall_timeout)?;
        self.newest = request;
        self.active = Some(Active {
            id: request,
            begun: now,
            schedule,
            inputs: BTreeMap::new(),
            running: None,
            output: None,
            exchange_wait: Duration::ZERO,
        });
        let (now_due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.early)
            .into_iter()
            .partition(|e| e.0 <= request);
        self.early = later;
        let refused = std::mem::take(&mut self.early_refused);
        self.early_refused = refused.iter().filter(|e| e.0 > request).cloned().collect();
        if let Some((_, step, why)) = refused.into_iter().find(|e| e.0 == request) {
            self.end_failed(step, CoreFailure::Refused(why));
            return Ok(());
        }
        for (r, item, from, payload) in now_due.into_iter().filter(|e| e.0 == request) {
            self.handle_input(now, r, item, from, payload);
        }
        self.drain(now);
        Ok(())
    }

    /// The input of `item` of `request`, from device `from`. An input of a request not begun yet
    /// is kept until it begins; one of an earlier request is dropped; one the schedule refuses
    /// fails the request.
    pub fn handle_input(
        &mut self,
        now: Duration,
        request: u64,
        item: WorkItem,
        from: usize,
        payload: T,
    ) {
        if request > self.newest {
            if self.early.len() >= EARLY_INPUTS_MAX {
                warn!(
                    stage = self.stage,
                    request, "too many inputs ahead of their request; dropped one"
                );
                return;
            }
            self.early.push((request, item, from, payload));
            return;
        }
        let Some(a) = self.active.as_mut().filter(|a| a.id == request) else {
            debug!(stage = self.stage, request, %item, "input of an ended request dropped");
            return;
        };
        let at = now.saturating_sub(a.begun);
        match a.schedule.handle_input(at, item.step, item.part) {
            Ok(()) => {
                a.inputs.insert(item, (from, payload));
            }
            Err(e) => {
                let reason = CoreFailure::Refused(format!("input from device {from}: {e}"));
                self.end_failed(Some(item.step), reason);
                return;
            }
        }
        self.drain(now);
    }

    /// An input of `request` arrived that cannot be used (it did not decode, or is of the wrong
    /// kind): the request fails, now if it is active, when it begins if it is not yet (an earlier
    /// request's is ignored).
    pub fn handle_bad_input(&mut self, request: u64, step: Option<usize>, message: String) {
        if request > self.newest {
            if self.early_refused.len() < EARLY_INPUTS_MAX {
                self.early_refused.push((request, step, message));
            }
        } else if self.request() == Some(request) {
            self.end_failed(step, CoreFailure::Refused(message));
        }
    }

    /// The compute thread finished `item` of `request` with `output` (`Err`: the compute failed,
    /// the request fails with that message), having waited `waited` of it in exchanges. Ignored
    /// for a request that is no longer active.
    pub fn handle_compute_done(
        &mut self,
        now: Duration,
        request: u64,
        item: WorkItem,
        output: Result<T, String>,
        waited: Duration,
    ) {
        let Some(a) = self.active.as_mut().filter(|a| a.id == request) else {
            return;
        };
        a.exchange_wait += waited;
        let output = match output {
            Ok(t) => t,
            Err(m) => return self.end_failed(Some(item.step), CoreFailure::Reported(m)),
        };
        a.running = None;
        a.output = Some(output);
        let at = now.saturating_sub(a.begun);
        if let Err(e) = a.schedule.handle_compute_done(at, item) {
            return self.end_failed(Some(item.step), CoreFailure::Refused(e.to_string()));
        }
        self.drain(now);
    }

    /// Stage `stage` of this device's pipeline is gone (its node was lost): the request fails if
    /// the schedule still needs it.
    pub fn handle_peer_lost(&mut self, now: Duration, stage: usize) {
        if let Some(a) = self.active.as_mut() {
            a.schedule
                .handle_peer_lost(now.saturating_sub(a.begun), stage);
        }
        self.drain(now);
    }

    /// Call once `now >= poll_timeout()`: fails the request when the running item is past its
    /// compute deadline, or the schedule has stalled.
    pub fn handle_timeout(&mut self, now: Duration) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        if let Some((item, since)) = a.running {
            if now >= since.saturating_add(self.compute_timeout) {
                let reason = CoreFailure::ComputeTimeout {
                    item,
                    timeout: self.compute_timeout,
                };
                return self.end_failed(Some(item.step), reason);
            }
        }
        a.schedule.handle_timeout(now.saturating_sub(a.begun));
        self.drain(now);
    }

    /// The driver reports a failure of `request` (a failed exchange, a lost group member, an
    /// input it could not use): the request fails with `message`.
    pub fn fail(&mut self, request: u64, step: Option<usize>, message: String) {
        if self.request() == Some(request) {
            let step = step.or_else(|| self.running().map(|i| i.step));
            self.end_failed(step, CoreFailure::Reported(message));
        }
    }

    /// Drops `request` without output (another device failed, or it was cancelled); `true` if it
    /// was the active one.
    pub fn abort(&mut self, request: Option<u64>) -> bool {
        let hit = self
            .active
            .as_ref()
            .is_some_and(|a| request.is_none_or(|r| r == a.id));
        if hit {
            self.active = None;
        }
        hit
    }

    /// Next output; call until `None` after every event.
    pub fn poll_output(&mut self) -> Option<CoreOutput<T>> {
        self.outputs.pop_front()
    }

    /// When to call [`handle_timeout`](Self::handle_timeout): the earlier of the schedule's stall
    /// deadline and the running item's compute deadline (`None` without an active request).
    pub fn poll_timeout(&self) -> Option<Duration> {
        let a = self.active.as_ref()?;
        let stall = a.schedule.poll_timeout().map(|d| a.begun.saturating_add(d));
        let compute = a
            .running
            .map(|(_, since)| since.saturating_add(self.compute_timeout));
        stall.into_iter().chain(compute).min()
    }

    /// Ends the active request with a failure output (replacing its outputs not polled yet: they
    /// are moot now).
    fn end_failed(&mut self, step: Option<usize>, reason: CoreFailure) {
        if let Some(a) = self.active.take() {
            warn!(stage = self.stage, request = a.id, ?step, %reason, "request failed on this device");
            self.outputs.retain(|o| o.request() != a.id);
            self.outputs.push_back(CoreOutput::Failed {
                request: a.id,
                step,
                reason,
            });
        }
    }

    /// Turns the schedule's actions into outputs (loops a one-stage pipeline's sends back).
    fn drain(&mut self, now: Duration) {
        loop {
            let Some(a) = self.active.as_mut() else {
                return;
            };
            let Some(action) = a.schedule.poll_action() else {
                return;
            };
            let request = a.id;
            match action {
                StageAction::Launch(item) => {
                    let (label, releases) = a.schedule.launched_input().expect("launched");
                    let input = match releases {
                        true => a.inputs.remove(&label),
                        false => a.inputs.get(&label).cloned(),
                    };
                    let Some((from, input)) = input else {
                        let m = format!("no input held for {item} (the schedule had {label})");
                        return self.end_failed(Some(item.step), CoreFailure::Refused(m));
                    };
                    a.running = Some((item, now));
                    self.outputs.push_back(CoreOutput::Launch {
                        request,
                        item,
                        input,
                        label,
                        from,
                    });
                }
                StageAction::Send { to, step, part } => {
                    let Some(payload) = a.output.take() else {
                        let m = format!("nothing to send for step {step}, {part}");
                        return self.end_failed(Some(step), CoreFailure::Refused(m));
                    };
                    let item = WorkItem { step, part };
                    if to == self.stage {
                        // A one-stage pipeline feeds itself.
                        let at = now.saturating_sub(a.begun);
                        if let Err(e) = a.schedule.handle_input(at, step, part) {
                            return self
                                .end_failed(Some(step), CoreFailure::Refused(e.to_string()));
                        }
                        a.inputs.insert(item, (self.me, payload));
                    } else {
                        self.outputs.push_back(CoreOutput::Send {
                            request,
                            to,
                            item,
                            payload,
                        });
                    }
                }
                StageAction::StepDone { step } => self
                    .outputs
                    .push_back(CoreOutput::StepDone { request, step }),
                StageAction::Finished => {
                    let (stats, exchange_wait) = (a.schedule.stats(), a.exchange_wait);
                    self.active = None;
                    self.outputs.push_back(CoreOutput::Finished {
                        request,
                        stats,
                        exchange_wait,
                    });
                    return;
                }
                StageAction::Failed(f) => {
                    let step = match &f {
                        ScheduleFailure::Stalled { waiting_for, .. } => Some(waiting_for.step),
                        ScheduleFailure::PeerLost { during, .. } => during.map(|i| i.step),
                    };
                    return self.end_failed(step, CoreFailure::Schedule(f));
                }
            }
        }
    }
}

impl WorkItem {
    /// The whole-image item of `step`.
    pub fn whole(step: usize) -> WorkItem {
        WorkItem {
            step,
            part: Part::Whole,
        }
    }
}
