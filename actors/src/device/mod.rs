//! The device actor: a thin driver around its sans-IO [`DeviceCore`] (the stage schedule, the
//! inputs it holds, early inputs, the compute deadline). Each handler turns a message into one
//! core event, then [`DeviceState::drain`] carries out the core's outputs: compute jobs, frames
//! to peers, reports to the coordinator, and one timer at the core's next deadline.

mod actor;
mod effects;

use std::sync::Arc;
use std::time::Duration;

use kernels::Tensor;
use ractor::ActorRef;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use topology::schedule::{CoreFailure, CoreOutput, DeviceCore, ScheduleConfig, WorkItem};
use topology::DeviceRole;
use transport::{Endpoint, Link};

use crate::codec::{decode, item_of};
use crate::compute::{ComputeJob, ComputeThread};
use crate::fault::Fault;
use crate::handles::CoordinatorHandle;
use crate::messages::{CoordinatorMessage, DeviceMessage};
use crate::peer_group::{ExchangeClock, GroupMsg};
use crate::stage::{RequestSetup, StageExecutor};

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
    /// Runs up to this id belong to an earlier device in this place (see
    /// [`DeviceCore::with_floor`]); 0 for a device of a cluster's first layout.
    pub(crate) floor: u64,
}

pub(crate) struct DeviceState {
    role: DeviceRole,
    /// Everything the device decides about its requests.
    core: DeviceCore<Tensor>,
    /// The core's clock starts here.
    epoch: Instant,
    /// The active request's setup (jobs and input shapes).
    setup: Option<Arc<RequestSetup>>,
    /// Bytes sent before the active request began.
    bytes_at_start: u64,
    /// Each link's byte count when the request began (same order as `links`).
    link_bytes_at_start: Vec<u64>,
    /// The deadline the armed timer is for.
    timer_for: Option<Duration>,
    /// Why each lost pipeline stage was lost (named when the schedule fails on it).
    lost_stages: Vec<(usize, String)>,
    /// The first peer this device depends on (pipeline neighbour, exchange partner) that was
    /// lost: named in its failure reports, so that the coordinator can resume around its node.
    lost_peer: Option<usize>,
    /// The compute thread's peer groups (to end their waits when a request ends).
    groups: Vec<std::sync::mpsc::Sender<GroupMsg>>,
    /// Shared with the compute thread: whom it waits for in an exchange.
    clock: Arc<ExchangeClock>,
    links: Vec<Arc<dyn Link>>,
    compute: ComputeThread,
    coordinator: CoordinatorHandle,
    inbox_task: JoinHandle<()>,
    fault: Option<Fault>,
}

impl DeviceState {
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// A work item's input from a peer: checked for its kind, decoded, handed to the core.
    async fn on_frame(&mut self, myself: &ActorRef<DeviceMessage>, frame: transport::Frame) {
        let (request, from) = (frame.header.request, frame.header.from);
        let Some((step, part)) = item_of(frame.header.label) else {
            // The inbox router hands collective parts to this device's peer groups; one that
            // gets here names a group this device is not in.
            let m = format!(
                "device {from} sent {}, but this device is in no such group",
                frame.header.label
            );
            return self.refuse(myself, request, None, m).await;
        };
        let latent = matches!(frame.header.label, transport::FrameLabel::Latent { .. });
        if latent != self.role.is_first_stage() {
            let m = format!(
                "device {from} sent {} to stage {} (stage 0 takes latents, the others hidden states)",
                frame.header.label, self.role.stage
            );
            return self.refuse(myself, request, Some(step), m).await;
        }
        match decode(&frame) {
            Ok(t) => {
                let now = self.now();
                self.core
                    .handle_input(now, request, WorkItem { step, part }, from, t)
            }
            Err(e) => {
                return self
                    .refuse(myself, request, Some(step), e.to_string())
                    .await
            }
        }
        self.drain(myself).await;
    }

    /// A frame of `request` that cannot be used fails that request (now, or when it begins).
    async fn refuse(
        &mut self,
        myself: &ActorRef<DeviceMessage>,
        request: u64,
        step: Option<usize>,
        message: String,
    ) {
        tracing::warn!(device = self.role.rank, request, %message, "unusable frame");
        self.core.handle_bad_input(request, step, message);
        self.drain(myself).await;
    }

    /// The compute thread finished `item` of `request`.
    async fn on_compute_done(
        &mut self,
        myself: &ActorRef<DeviceMessage>,
        request: u64,
        item: WorkItem,
        output: Result<Tensor, String>,
        waited: Duration,
    ) {
        let now = self.now();
        self.core
            .handle_compute_done(now, request, item, output, waited);
        self.drain(myself).await;
    }

    fn bytes_sent(&self) -> u64 {
        self.links.iter().map(|l| l.bytes_sent()).sum()
    }

    /// Bytes sent on each link since the request began: (peer rank, bytes), nonzero only.
    fn sent_to(&self) -> Vec<(usize, u64)> {
        self.links
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let start = self.link_bytes_at_start.get(i).copied().unwrap_or(0);
                (l.peer(), l.bytes_sent().saturating_sub(start))
            })
            .filter(|&(_, b)| b > 0)
            .collect()
    }

    /// Begins a request: the compute thread's buffers, then the core (stage 0 takes the
    /// request's latent as its step-0 input).
    async fn begin(&mut self, setup: Arc<RequestSetup>, cfg: ScheduleConfig) -> Result<(), String> {
        let id = setup.id;
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
        if cfg.stages != self.role.pipeline.len() {
            return Err(format!(
                "the request runs a pipeline of {} stages, this device's has {}",
                cfg.stages,
                self.role.pipeline.len()
            ));
        }
        // A request still active here is over (its Abort may be behind this Begin): its exchange
        // waits end, so the compute thread is free to begin the new one.
        if let Some(old) = self.core.request() {
            self.core.abort(Some(old));
            self.cancel_exchanges(old);
        }
        let (tx, rx) = oneshot::channel();
        if !self.compute.submit(ComputeJob::Begin(setup.clone(), tx)) {
            return Err("the compute thread has stopped".into());
        }
        rx.await
            .map_err(|_| "the compute thread has stopped".to_string())??;
        let now = self.now();
        self.core.begin(now, id, cfg).map_err(|e| e.to_string())?;
        self.bytes_at_start = self.bytes_sent();
        self.link_bytes_at_start = self.links.iter().map(|l| l.bytes_sent()).collect();
        if self.role.is_first_stage() {
            let latent = setup.initial_latent.clone();
            self.core
                .handle_input(now, id, WorkItem::whole(0), self.role.rank, latent);
        }
        self.setup = Some(setup);
        Ok(())
    }

    /// Drops request `request` if it is the active one (another device failed, or it was
    /// cancelled); an abort that arrives after the next request began leaves that one alone.
    fn abort(&mut self, request: u64) {
        if self.core.abort(Some(request)) {
            self.cancel_exchanges(request);
        }
    }

    /// A device of the cluster is gone (its node was lost): a pipeline neighbour goes to the
    /// schedule's peer-loss rule; a member of one of this device's peer groups fails the request.
    async fn on_peer_lost(&mut self, myself: &ActorRef<DeviceMessage>, device: usize, why: String) {
        let now = self.now();
        if let Some(stage) = self.role.pipeline.iter().position(|&d| d == device) {
            if stage != self.role.stage {
                if !self.lost_stages.iter().any(|(s, _)| *s == stage) {
                    self.lost_stages
                        .push((stage, format!("device {device}: {why}")));
                }
                self.core.handle_peer_lost(now, stage);
            }
        }
        let in_group =
            self.role.sp.members.contains(&device) || self.role.cfg.partner == Some(device);
        if device != self.role.rank && (in_group || self.role.pipeline.contains(&device)) {
            self.lost_peer.get_or_insert(device);
        }
        if let (true, Some(id)) = (in_group && device != self.role.rank, self.core.request()) {
            let m = format!(
                "device {device}, a member of this device's exchange group, was lost: {why}"
            );
            self.core.fail(id, None, m);
        }
        self.drain(myself).await;
    }

    /// Ends the compute thread's exchange waits of `request` (its peer groups fail the wait).
    fn cancel_exchanges(&self, request: u64) {
        for tx in &self.groups {
            let _ = tx.send(GroupMsg::Cancel { request });
        }
    }

    /// Carries out every output of the core, then arms the timer at its next deadline.
    async fn drain(&mut self, myself: &ActorRef<DeviceMessage>) {
        // A request whose final sends failed after the core had already finished it: its
        // remaining outputs (the Finished) are dropped, its failure reported here.
        let mut failed_late: Option<u64> = None;
        while let Some(out) = self.core.poll_output() {
            let (request, step) = (out.request(), step_of(&out));
            if failed_late == Some(request) {
                continue;
            }
            let r = match out {
                CoreOutput::Launch {
                    item,
                    input,
                    label,
                    from,
                    ..
                } => self.launch(request, item, (label, from), input),
                CoreOutput::Send {
                    to, item, payload, ..
                } => self.send(request, to, item, &payload).await,
                CoreOutput::StepDone { step, .. } => {
                    if self.role.reports_steps() {
                        self.coordinator
                            .report(CoordinatorMessage::StepDone { request, step });
                    }
                    Ok(())
                }
                CoreOutput::Finished {
                    stats,
                    exchange_wait,
                    ..
                } => {
                    self.finish(request, stats, exchange_wait).await;
                    Ok(())
                }
                CoreOutput::Failed { reason, .. } => {
                    self.report_failure(request, step, &reason);
                    Ok(())
                }
            };
            if let Err(m) = r {
                match self.core.request() == Some(request) {
                    true => self.core.fail(request, step, m),
                    false => {
                        self.report_failure(request, step, &CoreFailure::Reported(m));
                        failed_late = Some(request);
                    }
                }
            }
        }
        if let Some(deadline) = self.core.poll_timeout() {
            if self.timer_for != Some(deadline) {
                self.timer_for = Some(deadline);
                let wait = deadline.saturating_sub(self.now());
                myself.send_after(wait, || DeviceMessage::Tick);
            }
        }
    }
}

/// The step an output is about, when it names one.
fn step_of(out: &CoreOutput<Tensor>) -> Option<usize> {
    match out {
        CoreOutput::Launch { item, .. } | CoreOutput::Send { item, .. } => Some(item.step),
        CoreOutput::StepDone { step, .. } => Some(*step),
        CoreOutput::Failed { step, .. } => *step,
        CoreOutput::Finished { .. } => None,
    }
}
