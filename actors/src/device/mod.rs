//! The device actor: a thin driver around one stage's [`StageSchedule`]. Each handler turns a
//! message into one `handle_*` call, then [`DeviceState::drain`] turns the schedule's outputs into
//! compute jobs, frames to peers, progress events and the stall timer.

mod actor;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kernels::Tensor;
use ractor::ActorRef;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use topology::schedule::{Part, ScheduleFailure, StageAction, StageSchedule, WorkItem};
use topology::DeviceRole;
use transport::{Endpoint, Link};

use crate::codec::{decode, encode, item_label, item_of};
use crate::compute::{ComputeJob, ComputeThread, Fault};
use crate::handles::CoordinatorHandle;
use crate::messages::{CoordinatorMessage, DeviceMessage, StageReport};
use crate::peer_group::{ExchangeClock, GroupMsg};
use crate::stage::{RequestSetup, StageExecutor, StageJob};

/// The error of a device actor that failed to start (its `pre_start`: device open, layer load).
pub(crate) fn start_error(
    args: &DeviceArgs,
) -> impl FnOnce(ractor::SpawnErr) -> crate::ClusterError {
    let (device, what) = (args.role.rank, args.role.device.to_string());
    move |e| crate::ClusterError::DeviceStart {
        device,
        what,
        message: match e {
            ractor::SpawnErr::StartupFailed(inner) => inner.to_string(),
            other => other.to_string(),
        },
    }
}

/// The device actor (its configuration arrives as [`DeviceArgs`]; all mutable state is built in
/// `pre_start`, so a device that cannot load its layers fails the spawn, not a request).
pub(crate) struct DeviceActor;

pub(crate) struct DeviceArgs {
    /// What the device does in the plan (its rank, stage, pipeline, groups).
    pub(crate) role: DeviceRole,
    pub(crate) load: Box<dyn FnOnce() -> crate::Result<StageExecutor> + Send>,
    pub(crate) endpoint: Endpoint,
    pub(crate) coordinator: CoordinatorHandle,
    pub(crate) stall_timeout: Duration,
    pub(crate) compute_timeout: Duration,
    pub(crate) fault: Option<Fault>,
}

struct Active {
    setup: Arc<RequestSetup>,
    schedule: StageSchedule,
    started: Instant,
    pending: HashMap<(usize, Part), Tensor>,
    last_output: Option<Tensor>,
    bytes_at_start: u64,
    timer_for: Option<Duration>,
    /// The item on the compute thread.
    running: Option<WorkItem>,
    /// Time the compute thread waited in exchanges during this request.
    exchange_wait: Duration,
}

/// Frames of a request this device has not begun yet that it keeps until the `Begin` arrives
/// (a peer can start before this device's `Begin` is processed, e.g. two CFG groups' stage 0s).
const EARLY_FRAMES_MAX: usize = 1024;

pub(crate) struct DeviceState {
    role: DeviceRole,
    /// The compute thread's peer groups (to end their waits when a request ends).
    groups: Vec<std::sync::mpsc::Sender<GroupMsg>>,
    /// Shared with the compute thread: whom it waits for in an exchange.
    clock: Arc<ExchangeClock>,
    links: Vec<Arc<dyn Link>>,
    compute: ComputeThread,
    coordinator: CoordinatorHandle,
    stall_timeout: Duration,
    compute_timeout: Duration,
    inbox_task: JoinHandle<()>,
    fault: Option<Fault>,
    active: Option<Active>,
    /// The newest request this device has begun (ids only grow).
    last_request: u64,
    /// Frames of a newer request than `last_request`, replayed when it begins.
    early: Vec<transport::Frame>,
}

impl DeviceState {
    /// A frame from a peer: check it against the plan, hand it to the schedule, drain.
    async fn on_frame(&mut self, myself: &ActorRef<DeviceMessage>, frame: transport::Frame) {
        if frame.header.request > self.last_request {
            // A request this device has not begun yet: keep the frame for its Begin.
            if self.early.len() >= EARLY_FRAMES_MAX {
                tracing::warn!(
                    device = self.role.rank,
                    request = frame.header.request,
                    "too many frames ahead of their request's Begin; dropped one"
                );
                return;
            }
            self.early.push(frame);
            return;
        }
        let Some(a) = self.active.as_mut() else {
            tracing::warn!(
                device = self.role.rank,
                from = frame.header.from,
                "frame outside a request dropped"
            );
            return;
        };
        if frame.header.request != a.setup.id {
            tracing::warn!(
                device = self.role.rank,
                request = frame.header.request,
                "frame of another request dropped"
            );
            return;
        }
        let Some((step, part)) = item_of(frame.header.label) else {
            // The inbox router hands collective parts to this device's peer groups; one that
            // gets here names a group this device is not in.
            let step = a.running.map(|i| i.step);
            let message = format!(
                "device {} sent {}, but this device is in no such group",
                frame.header.from, frame.header.label
            );
            self.fail(step, message);
            return;
        };
        let latent = matches!(frame.header.label, transport::FrameLabel::Latent { .. });
        if latent != self.role.is_first_stage() {
            let message = format!(
                "device {} sent {} to stage {} (stage 0 takes latents, the others hidden states)",
                frame.header.from, frame.header.label, self.role.stage
            );
            self.fail(Some(step), message);
            return;
        }
        let now = a.started.elapsed();
        let (role, group) = (&self.role, self.role.cfg.group);
        let rank = role.sp.rank;
        // Ulysses inside PipeFusion: after a whole-image step the last stage sends stage 0 the
        // whole latent (the ranks shared their rows).
        let gathered = part == Part::Whole
            && role.is_first_stage()
            && a.setup.patches.len() > 1
            && role.sp.degree() > 1
            && role.sp.inside_pipefusion;
        let want = match gathered {
            true => Some(0..a.setup.token_rows()),
            false => a.setup.rank_rows(part, rank),
        }
        .and_then(|r| a.setup.frame_shape_rows(r.len(), role.is_first_stage(), group));
        let r = decode(&frame).map_err(|e| e.to_string()).and_then(|t| {
            if want.as_deref() != Some(t.shape()) {
                return Err(format!(
                    "frame from device {} for step {step} {part:?} has shape {:?}, the plan says {want:?}",
                    frame.header.from,
                    t.shape()
                ));
            }
            a.pending.insert((step, part), t);
            a.schedule.handle_input(now, step, part).map_err(|e| e.to_string())
        });
        match r {
            Ok(()) => self.drain(myself).await,
            Err(e) => self.fail(Some(step), e),
        }
    }

    /// The compute thread finished `item` of `request` (ignored if that request was aborted).
    async fn on_compute_done(
        &mut self,
        myself: &ActorRef<DeviceMessage>,
        request: u64,
        item: WorkItem,
        output: Result<Tensor, String>,
        waited: Duration,
    ) {
        let Some(a) = self.active.as_mut().filter(|a| a.setup.id == request) else {
            return;
        };
        let now = a.started.elapsed();
        a.running = None;
        a.exchange_wait += waited;
        let r = output.and_then(|t| {
            a.last_output = Some(t);
            a.schedule
                .handle_compute_done(now, item)
                .map_err(|e| e.to_string())
        });
        match r {
            Ok(()) => self.drain(myself).await,
            Err(e) => self.fail(Some(item.step), e),
        }
    }

    /// Hands the frames that arrived before this request's Begin to [`Self::on_frame`]; frames of
    /// older requests are dropped.
    async fn replay_early(&mut self, myself: &ActorRef<DeviceMessage>) {
        let id = self.last_request;
        let early = std::mem::take(&mut self.early);
        let (now, later): (Vec<_>, Vec<_>) =
            early.into_iter().partition(|f| f.header.request <= id);
        self.early = later;
        for f in now.into_iter().filter(|f| f.header.request == id) {
            Box::pin(self.on_frame(myself, f)).await;
        }
    }

    fn bytes_sent(&self) -> u64 {
        self.links.iter().map(|l| l.bytes_sent()).sum()
    }

    async fn begin(
        &mut self,
        setup: Arc<RequestSetup>,
        cfg: topology::schedule::ScheduleConfig,
    ) -> Result<(), String> {
        let id = setup.id;
        // From now on frames of this request are handled (or dropped with it), not kept.
        self.last_request = self.last_request.max(id);
        let ranks = match self.role.sp.degree() {
            1 => 0,
            n => n,
        };
        if setup.sp_rows.len() != ranks {
            return Err(format!(
                "the request splits the tokens over {} sequence-parallel rank(s), this device's \
                 group has {}",
                setup.sp_rows.len().max(1),
                ranks.max(1)
            ));
        }
        let (tx, rx) = oneshot::channel();
        if !self.compute.submit(ComputeJob::Begin(setup.clone(), tx)) {
            return Err("the compute thread has stopped".into());
        }
        rx.await
            .map_err(|_| "the compute thread has stopped".to_string())??;
        let mut schedule =
            StageSchedule::new(cfg, self.role.stage, self.stall_timeout)
                .map_err(|e| e.to_string())?;
        let mut pending = HashMap::new();
        if self.role.is_first_stage() {
            pending.insert((0, Part::Whole), setup.initial_latent.clone());
            schedule
                .handle_input(Duration::ZERO, 0, Part::Whole)
                .map_err(|e| e.to_string())?;
        }
        self.active = Some(Active {
            setup,
            schedule,
            started: Instant::now(),
            pending,
            last_output: None,
            bytes_at_start: self.bytes_sent(),
            timer_for: None,
            running: None,
            exchange_wait: Duration::ZERO,
        });
        Ok(())
    }

    /// Ends the compute thread's exchange waits of `request` (its peer groups fail the wait).
    fn cancel_exchanges(&self, request: u64) {
        for tx in &self.groups {
            let _ = tx.send(GroupMsg::Cancel { request });
        }
    }

    /// Reports a failure of the current request to the coordinator and drops the request.
    fn fail(&mut self, step: Option<usize>, message: String) {
        if let Some(a) = self.active.take() {
            self.cancel_exchanges(a.setup.id);
            tracing::error!(device = self.role.rank, ?step, %message, "request failed on this device");
            self.coordinator.report(CoordinatorMessage::DeviceFailed {
                request: a.setup.id,
                device: self.role.rank,
                step,
                message,
            });
        }
    }

    /// Turns every pending schedule output into its effect, then re-arms the stall timer.
    async fn drain(&mut self, myself: &ActorRef<DeviceMessage>) {
        loop {
            let Some(a) = self.active.as_mut() else {
                return;
            };
            let now = a.started.elapsed();
            let Some(action) = a.schedule.poll_action() else {
                break;
            };
            let r: Result<(), (Option<usize>, String)> = match action {
                StageAction::Launch(item) => self.launch(item).map(|()| {
                    let request = a_id(&self.active);
                    myself.send_after(self.compute_timeout, move || {
                        DeviceMessage::ComputeWatchdog { request, item }
                    });
                }),
                StageAction::Send { to, step, part } => self.send(now, to, step, part).await,
                StageAction::StepDone { step } => {
                    // Under CFG or sequence parallelism several devices finish every step;
                    // group 0's rank 0 reports.
                    if self.role.reports_steps() {
                        self.coordinator.report(CoordinatorMessage::StepDone {
                            request: a.setup.id,
                            step,
                        });
                    }
                    Ok(())
                }
                StageAction::Finished => {
                    self.finish().await;
                    return;
                }
                StageAction::Failed(f) => {
                    let step = match &f {
                        ScheduleFailure::Stalled { waiting_for, .. } => Some(waiting_for.step),
                        ScheduleFailure::PeerLost { during, .. } => during.map(|i| i.step),
                    };
                    Err((step, f.to_string()))
                }
            };
            if let Err((step, msg)) = r {
                self.fail(step, msg);
                return;
            }
        }
        let Some(a) = self.active.as_mut() else {
            return;
        };
        if let Some(deadline) = a.schedule.poll_timeout() {
            if a.timer_for != Some(deadline) {
                a.timer_for = Some(deadline);
                let wait = deadline.saturating_sub(a.started.elapsed());
                let request = a.setup.id;
                myself.send_after(wait, move || DeviceMessage::Tick { request });
            }
        }
    }

    fn launch(&mut self, item: WorkItem) -> Result<(), (Option<usize>, String)> {
        if let Some(Fault::ActorPanicAt { device, step }) = self.fault {
            if device == self.role.rank && step == item.step && a_id(&self.active) == 1 {
                panic!("injected actor panic at step {step}");
            }
        }
        let a = self.active.as_mut().expect("active");
        let fail = |m: String| (Some(item.step), m);
        let input = match a.pending.remove(&(item.step, item.part)) {
            Some(t) => t,
            None => {
                // Stage 0 at the first PipeFusion step: the whole latent stands for every patch.
                let last = matches!(item.part, Part::Patch(p) if p + 1 == a.setup.patches.len());
                let whole = if last {
                    a.pending.remove(&(item.step, Part::Whole))
                } else {
                    a.pending.get(&(item.step, Part::Whole)).cloned()
                };
                whole.ok_or_else(|| {
                    fail(format!("no input for step {} {:?}", item.step, item.part))
                })?
            }
        };
        let rank = self.role.sp.rank;
        let job = StageJob {
            step: item.step,
            rows: a
                .setup
                .rank_rows(item.part, rank)
                .ok_or_else(|| fail(format!("no rows for {item} on rank {rank}")))?,
            patch: a.setup.rows(item.part).unwrap_or(0..a.setup.token_rows()),
            ends_step: match item.part {
                Part::Whole => true,
                Part::Patch(p) => p + 1 == a.setup.patches.len(),
            },
        };
        let request = a.setup.id;
        a.running = Some(item);
        if !self.compute.submit(ComputeJob::Run {
            request,
            item,
            job,
            input,
        }) {
            return Err(fail("the compute thread has stopped".into()));
        }
        Ok(())
    }

    /// Sends the completed item's output; over QUIC this waits while the link's bounded queue is
    /// full (back-pressure), so a slow link slows the producer instead of piling up frames.
    async fn send(
        &mut self,
        now: Duration,
        to: usize,
        step: usize,
        part: Part,
    ) -> Result<(), (Option<usize>, String)> {
        let a = self.active.as_mut().expect("active");
        let out = a
            .last_output
            .take()
            .ok_or((Some(step), "nothing to send".to_string()))?;
        let to_device = self.role.pipeline[to];
        if to_device == self.role.rank {
            a.pending.insert((step, part), out);
            return a
                .schedule
                .handle_input(now, step, part)
                .map_err(|e| (Some(step), e.to_string()));
        }
        let label = item_label(to == 0, step, part);
        let frame = encode(a.setup.id, self.role.rank, label, &out)
            .map_err(|e| (Some(step), e.to_string()))?;
        let link = self.links[to_device].clone();
        link.send_async(frame)
            .await
            .map_err(|e| (Some(step), e.to_string()))
    }

    async fn finish(&mut self) {
        let Some(a) = self.active.take() else { return };
        let latent = if a.schedule.is_last() {
            let (tx, rx) = oneshot::channel();
            if self.compute.submit(ComputeJob::Finish(tx)) {
                rx.await.ok().flatten()
            } else {
                None
            }
        } else {
            None
        };
        let stats = a.schedule.stats();
        let report = StageReport {
            busy: stats.busy,
            exchange_wait: a.exchange_wait,
            launched: stats.launched,
            bytes_sent: self.bytes_sent() - a.bytes_at_start,
            latent,
        };
        self.coordinator.report(CoordinatorMessage::StageFinished {
            request: a.setup.id,
            device: self.role.rank,
            report,
        });
    }
}

/// The id of the active request (0 when none).
fn a_id(active: &Option<Active>) -> u64 {
    active.as_ref().map_or(0, |a| a.setup.id)
}
