//! The device actor: a thin driver around one stage's [`StageSchedule`]. Each handler turns a
//! message into one `handle_*` call, then [`DeviceState::drain`] turns the schedule's outputs into
//! compute jobs, frames to peers, progress events and the stall timer.

mod actor;
mod exchange;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kernels::Tensor;
use ractor::ActorRef;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use topology::schedule::{Part, ScheduleFailure, StageAction, StageSchedule, WorkItem};
use transport::{Endpoint, FrameKind, Link};

use crate::codec::{decode, encode, part_of};
use crate::compute::{ComputeJob, ComputeThread, Fault, PartnerMsg};
use crate::handles::CoordinatorHandle;
use crate::messages::{CoordinatorMessage, DeviceMessage, StageReport};
use crate::sp_link::SpMsg;
use crate::stage::{RequestSetup, StageExecutor, StageJob};

/// The error of a device actor that failed to start (its `pre_start`: device open, layer load).
pub(crate) fn start_error(
    args: &DeviceArgs,
) -> impl FnOnce(ractor::SpawnErr) -> crate::ClusterError {
    let (device, what) = (args.index, args.describe.clone());
    move |e| crate::ClusterError::DeviceStart {
        device,
        what,
        message: match e {
            ractor::SpawnErr::StartupFailed(inner) => inner.to_string(),
            other => other.to_string(),
        },
    }
}

/// A device's place in a CFG-parallel plan.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CfgPeer {
    /// Its CFG group.
    pub(crate) group: usize,
    /// The other group's last stage, when this device is a last stage.
    pub(crate) partner: Option<usize>,
}

/// A device's place in a sequence-parallel group.
#[derive(Debug, Clone)]
pub(crate) struct SpPeer {
    /// Its rank.
    pub(crate) rank: usize,
    /// Device index of every rank of its group.
    pub(crate) devices: Vec<usize>,
    /// Ulysses degree U (1: none).
    pub(crate) ulysses: usize,
    /// Ring degree R (1: none); the group has U x R ranks.
    pub(crate) ring: usize,
    /// Ulysses inside PipeFusion (several stages or patches): ranks keep K/V buffers.
    pub(crate) buffered: bool,
}

/// The device actor (its configuration arrives as [`DeviceArgs`]; all mutable state is built in
/// `pre_start`, so a device that cannot load its layers fails the spawn, not a request).
pub(crate) struct DeviceActor;

pub(crate) struct DeviceArgs {
    pub(crate) index: usize,
    /// The device in words, e.g. `#1 cpu(threads=1) on local`.
    pub(crate) describe: String,
    pub(crate) stage: usize,
    /// Device index of every stage of this device's pipeline (its CFG group's).
    pub(crate) stage_devices: Vec<usize>,
    /// Under CFG parallel: this device's group and, for a last stage, the device index of the
    /// other group's last stage (the prediction exchange partner).
    pub(crate) cfg: Option<CfgPeer>,
    /// Under sequence parallelism: this device's rank and group.
    pub(crate) sp: Option<SpPeer>,
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
    /// CFG last stage: the running item whose own prediction is done (the compute thread now
    /// waits for the partner's).
    awaiting_partner: Option<WorkItem>,
}

/// Frames of a request this device has not begun yet that it keeps until the `Begin` arrives
/// (a peer can start before this device's `Begin` is processed, e.g. two CFG groups' stage 0s).
const EARLY_FRAMES_MAX: usize = 1024;

pub(crate) struct DeviceState {
    index: usize,
    stage: usize,
    stage_devices: Vec<usize>,
    cfg: Option<CfgPeer>,
    /// To the compute thread: the partner's predictions (CFG-parallel last stage).
    partner_tx: Option<std::sync::mpsc::Sender<PartnerMsg>>,
    sp: Option<SpPeer>,
    /// To the compute thread: the other ranks' collective parts (sequence parallelism).
    sp_tx: Option<std::sync::mpsc::Sender<SpMsg>>,
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
                    device = self.index,
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
                device = self.index,
                from = frame.header.from,
                "frame outside a request dropped"
            );
            return;
        };
        if frame.header.request != a.setup.id {
            tracing::warn!(
                device = self.index,
                request = frame.header.request,
                "frame of another request dropped"
            );
            return;
        }
        let (step, part) = (frame.header.step as usize, part_of(frame.header.part));
        if frame.header.kind == FrameKind::SpPart {
            // (its header's step is the collective's sequence number, not a denoising step)
            if let Err(e) = self.on_sp_part(frame) {
                let step = self.active.as_ref().and_then(|a| a.running).map(|i| i.step);
                self.fail(step, e);
            }
            return;
        }
        if frame.header.kind == FrameKind::CfgPrediction {
            let r = self.on_prediction(frame);
            if let Err(e) = r {
                self.fail(Some(step), e);
            }
            return;
        }
        let now = a.started.elapsed();
        let group = self.cfg.map_or(0, |c| c.group);
        let rank = self.sp.as_ref().map_or(0, |sp| sp.rank);
        // Ulysses inside PipeFusion: after a whole-image step the last stage sends stage 0 the
        // whole latent (the ranks shared their rows).
        let gathered = part == Part::Whole
            && self.stage == 0
            && a.setup.patches.len() > 1
            && self.sp.as_ref().is_some_and(|sp| sp.buffered);
        let want = match gathered {
            true => Some(0..a.setup.token_rows()),
            false => a.setup.rank_rows(part, rank),
        }
        .and_then(|r| a.setup.frame_shape_rows(r.len(), self.stage == 0, group));
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
    ) {
        let Some(a) = self.active.as_mut().filter(|a| a.setup.id == request) else {
            return;
        };
        let now = a.started.elapsed();
        a.running = None;
        a.awaiting_partner = None;
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
        let ranks = self.sp.as_ref().map_or(0, |sp| sp.devices.len());
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
            StageSchedule::new(cfg, self.stage, self.stall_timeout).map_err(|e| e.to_string())?;
        let mut pending = HashMap::new();
        if self.stage == 0 {
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
            awaiting_partner: None,
        });
        Ok(())
    }

    /// Reports a failure of the current request to the coordinator and drops the request.
    fn fail(&mut self, step: Option<usize>, message: String) {
        if let Some(a) = self.active.take() {
            self.cancel_partner(a.setup.id);
            tracing::error!(device = self.index, ?step, %message, "request failed on this device");
            self.coordinator.report(CoordinatorMessage::DeviceFailed {
                request: a.setup.id,
                device: self.index,
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
                    if self.cfg.is_none_or(|c| c.group == 0)
                        && self.sp.as_ref().is_none_or(|s| s.rank == 0)
                    {
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
            if device == self.index && step == item.step && a_id(&self.active) == 1 {
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
        let rank = self.sp.as_ref().map_or(0, |sp| sp.rank);
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
        let to_device = self.stage_devices[to];
        if to_device == self.index {
            a.pending.insert((step, part), out);
            return a
                .schedule
                .handle_input(now, step, part)
                .map_err(|e| (Some(step), e.to_string()));
        }
        let kind = if to == 0 {
            FrameKind::Latent
        } else {
            FrameKind::Hidden
        };
        let frame = encode(a.setup.id, self.index, step, part, kind, &out)
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
            launched: stats.launched,
            bytes_sent: self.bytes_sent() - a.bytes_at_start,
            latent,
        };
        self.coordinator.report(CoordinatorMessage::StageFinished {
            request: a.setup.id,
            device: self.index,
            report,
        });
    }
}

/// The id of the active request (0 when none).
fn a_id(active: &Option<Active>) -> u64 {
    active.as_ref().map_or(0, |a| a.setup.id)
}
