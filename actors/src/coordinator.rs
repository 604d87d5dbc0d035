//! The coordinator actor: starts one linked device actor per stage, runs requests one at a time
//! (later ones queue), relays progress, collects the stages' reports into the result, and turns
//! any device failure into a failed request that names the device and the step.
//!
//! Supervision policy (`handle_supervisor_evt`): a device actor that fails or stops while the
//! cluster is up marks the cluster broken: the running request and every queued one fail with
//! the device's index, its last known step and the reason; later submissions are refused. There
//! is no silent restart: a restarted device would have lost its K/V buffers mid-request.

use kernels::Tensor;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::sync::mpsc::UnboundedSender;
use topology::schedule::ScheduleConfig;
use topology::DeviceRole;

use crate::device::{start_error, DeviceActor, DeviceArgs};
use crate::error::ClusterError;
use crate::handles::{DeviceHandle, RemoteDevice};
use crate::messages::{CoordinatorMessage, DeviceMessage, StageReport};
use crate::request::{DeviceSummary, GenerateOutput, Progress, RunSummary};
use crate::stage::RequestSetup;

pub(crate) struct CoordinatorActor;

/// One device: spawned here, or already running on another node.
pub(crate) enum StageSlot {
    /// Spawn a device actor in this process, linked to the coordinator.
    Local(DeviceArgsFactory),
    /// A device on another node (its proxy).
    Remote(Arc<dyn RemoteDevice>),
}

/// How to start each device, and what each does.
pub(crate) struct CoordinatorArgs {
    /// Every device's role, in rank order.
    pub(crate) roles: Vec<DeviceRole>,
    /// The order in which devices begin a request ([`topology::Plan::begin_order`]).
    pub(crate) begin_order: Vec<usize>,
    /// Every device, in rank order.
    pub(crate) devices: Vec<StageSlot>,
    /// A deliberate failure (tests): `Fault::SlowBegin` delays a device's Begin.
    pub(crate) fault: Option<crate::fault::Fault>,
    /// How long a device may take to accept `Begin` (it waits for its compute thread).
    pub(crate) begin_timeout: std::time::Duration,
}

/// Builds a device's arguments once the coordinator's own reference exists.
pub(crate) type DeviceArgsFactory =
    Box<dyn FnOnce(ActorRef<CoordinatorMessage>) -> DeviceArgs + Send>;

struct Queued {
    setup: Arc<RequestSetup>,
    schedule: ScheduleConfig,
    progress: Option<UnboundedSender<Progress>>,
    reply: RpcReplyPort<Result<GenerateOutput, ClusterError>>,
}

struct Running {
    req: Queued,
    started: Instant,
    reports: Vec<Option<StageReport>>,
    last_step: Option<usize>,
}

pub(crate) struct CoordinatorState {
    /// Devices in rank order.
    devices: Vec<DeviceHandle>,
    /// Their roles, in rank order.
    roles: Vec<DeviceRole>,
    begin_order: Vec<usize>,
    begin_timeout: std::time::Duration,
    fault: Option<crate::fault::Fault>,
    queue: VecDeque<Queued>,
    running: Option<Running>,
    broken: Option<String>,
}

impl Actor for CoordinatorActor {
    type Msg = CoordinatorMessage;
    type State = CoordinatorState;
    type Arguments = CoordinatorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<CoordinatorMessage>,
        args: CoordinatorArgs,
    ) -> Result<CoordinatorState, ActorProcessingErr> {
        let mut devices = Vec::new();
        for slot in args.devices {
            let make = match slot {
                StageSlot::Remote(proxy) => {
                    devices.push(DeviceHandle::Remote(proxy));
                    continue;
                }
                StageSlot::Local(make) => make,
            };
            let dargs = make(myself.clone());
            let failed = start_error(&dargs);
            let (d, _) = Actor::spawn_linked(None, DeviceActor, dargs, myself.get_cell())
                .await
                .map_err(failed)?;
            devices.push(DeviceHandle::Local(d));
        }
        Ok(CoordinatorState {
            devices,
            roles: args.roles,
            begin_order: args.begin_order,
            begin_timeout: args.begin_timeout,
            fault: args.fault,
            queue: VecDeque::new(),
            running: None,
            broken: None,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<CoordinatorMessage>,
        st: &mut CoordinatorState,
    ) -> Result<(), ActorProcessingErr> {
        st.fail_all("the cluster was shut down".into(), None);
        for d in st.devices.iter().filter_map(DeviceHandle::local) {
            d.stop(None);
        }
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<CoordinatorMessage>,
        msg: CoordinatorMessage,
        st: &mut CoordinatorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            CoordinatorMessage::Submit {
                setup,
                schedule,
                progress,
                reply,
            } => {
                if let Some(why) = &st.broken {
                    let _ = reply.send(Err(ClusterError::NotRunning(why.clone())));
                    return Ok(());
                }
                st.queue.push_back(Queued {
                    setup,
                    schedule,
                    progress,
                    reply,
                });
                st.start_next().await;
            }
            CoordinatorMessage::Cancel { request, reason } => {
                let running = st.running.as_ref().map(|r| r.req.setup.id);
                match request.or(running) {
                    Some(id) if Some(id) == running => {
                        st.fail_running(ClusterError::Cancelled {
                            request: id,
                            reason,
                        });
                        st.start_next().await;
                    }
                    Some(id) => {
                        if let Some(i) = st.queue.iter().position(|q| q.setup.id == id) {
                            let q = st.queue.remove(i).expect("found");
                            let _ = q.reply.send(Err(ClusterError::Cancelled {
                                request: id,
                                reason,
                            }));
                        }
                    }
                    None => {}
                }
            }
            CoordinatorMessage::StepDone { request, step } => {
                if let Some(r) = st.running.as_mut().filter(|r| r.req.setup.id == request) {
                    r.last_step = Some(step);
                    if let Some(p) = &r.req.progress {
                        let _ = p.send(Progress::Step {
                            step,
                            steps: r.req.schedule.steps,
                            elapsed: r.started.elapsed(),
                        });
                    }
                }
            }
            CoordinatorMessage::StageFinished {
                request,
                device,
                report,
            } => {
                let Some(r) = st.running.as_mut().filter(|r| r.req.setup.id == request) else {
                    return Ok(());
                };
                match r.reports.get_mut(device) {
                    Some(slot) => *slot = Some(report),
                    None => {
                        st.fail_running(ClusterError::DeviceFailed {
                            device,
                            step: None,
                            message: "a report from a device that is not a stage of this cluster"
                                .into(),
                        });
                        st.start_next().await;
                        return Ok(());
                    }
                }
                if r.reports.iter().all(Option::is_some) {
                    let Running {
                        req,
                        started,
                        reports,
                        ..
                    } = st.running.take().expect("running");
                    let _ = req
                        .reply
                        .send(finish(started, reports, &st.roles, &req.setup));
                    st.start_next().await;
                }
            }
            CoordinatorMessage::Health { reply } => {
                let _ = reply.send(st.broken.clone());
            }
            CoordinatorMessage::NodeLost {
                node,
                reason,
                devices,
            } => {
                tracing::error!(%node, %reason, "node lost");
                // The devices here hear of it first (a wait on a lost peer ends now, naming it).
                for d in st.devices.iter().filter_map(DeviceHandle::local) {
                    for &device in &devices {
                        let why = format!("node {node} was lost: {reason}");
                        let _ = d.cast(DeviceMessage::PeerLost { device, why });
                    }
                }
                st.broken = Some(format!("node {node} was lost: {reason}"));
                st.fail_running(ClusterError::NodeLost {
                    node: node.clone(),
                    reason: reason.clone(),
                });
                for q in st.queue.drain(..) {
                    let _ = q.reply.send(Err(ClusterError::NodeLost {
                        node: node.clone(),
                        reason: reason.clone(),
                    }));
                }
            }
            CoordinatorMessage::DeviceFailed {
                request,
                device,
                step,
                message,
            } => {
                if st
                    .running
                    .as_ref()
                    .is_some_and(|r| r.req.setup.id == request)
                {
                    st.fail_running(ClusterError::DeviceFailed {
                        device,
                        step,
                        message,
                    });
                    st.start_next().await;
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<CoordinatorMessage>,
        evt: SupervisionEvent,
        st: &mut CoordinatorState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, why) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell, format!("failed: {err}")),
            SupervisionEvent::ActorTerminated(cell, _, reason) => (
                cell,
                format!(
                    "stopped ({})",
                    reason.unwrap_or_else(|| "no reason given".into())
                ),
            ),
            _ => return Ok(()),
        };
        let Some(device) = st
            .devices
            .iter()
            .position(|d| d.local().is_some_and(|d| d.get_id() == cell.get_id()))
        else {
            return Ok(());
        };
        let step = st.running.as_ref().and_then(|r| r.last_step.map(|s| s + 1));
        tracing::error!(device, ?step, %why, "device actor down");
        st.broken = Some(format!("device {device} {why}"));
        st.fail_all(format!("device actor {why}"), Some((device, step)));
        Ok(())
    }
}

impl CoordinatorState {
    async fn start_next(&mut self) {
        while self.running.is_none() {
            let Some(req) = self.queue.pop_front() else {
                return;
            };
            let mut failed = None;
            // Every later stage before any first stage (the plan's begin order): a first stage
            // starts work as soon as it has begun, and its frames must find the later stages
            // already expecting this request.
            for &i in &self.begin_order {
                let d = &self.devices[i];
                if let Some(crate::fault::Fault::SlowBegin { device, millis }) = self.fault {
                    if device == i && req.setup.id == 1 {
                        tokio::time::sleep(std::time::Duration::from_millis(millis)).await;
                    }
                }
                if let Err(m) = d
                    .begin(req.setup.clone(), req.schedule, self.begin_timeout)
                    .await
                {
                    failed = Some((i, m));
                }
                if failed.is_some() {
                    break;
                }
            }
            if let Some((device, message)) = failed {
                for d in &self.devices {
                    d.abort(req.setup.id);
                }
                let _ = req.reply.send(Err(ClusterError::DeviceFailed {
                    device,
                    step: None,
                    message: format!("could not begin the request: {message}"),
                }));
                continue;
            }
            tracing::info!(
                request = req.setup.id,
                steps = req.schedule.steps,
                "request started"
            );
            self.running = Some(Running {
                reports: vec![None; self.devices.len()],
                req,
                started: Instant::now(),
                last_step: None,
            });
        }
    }

    fn fail_running(&mut self, err: ClusterError) {
        if let Some(r) = self.running.take() {
            for d in &self.devices {
                d.abort(r.req.setup.id);
            }
            match err {
                // Asked for: not a failure of the cluster.
                ClusterError::Cancelled { .. } => {
                    tracing::info!(request = r.req.setup.id, %err, "request cancelled")
                }
                _ => tracing::error!(request = r.req.setup.id, %err, "request failed"),
            }
            let _ = r.req.reply.send(Err(err));
        }
    }

    fn fail_all(&mut self, why: String, device: Option<(usize, Option<usize>)>) {
        let err = |why: &str| match device {
            Some((device, step)) => ClusterError::DeviceFailed {
                device,
                step,
                message: why.to_string(),
            },
            None => ClusterError::NotRunning(why.to_string()),
        };
        self.fail_running(err(&why));
        for q in self.queue.drain(..) {
            let _ = q.reply.send(Err(err(&why)));
        }
    }
}

/// The request's result from every device's report (`roles` in rank order). Each CFG group's
/// last stages hold the final latent (under sequence parallelism each rank the rows it updated
/// last, over the latent of its group's rank 0); every group must arrive at the same latent, bit
/// for bit.
fn finish(
    started: Instant,
    reports: Vec<Option<StageReport>>,
    roles: &[DeviceRole],
    setup: &crate::stage::RequestSetup,
) -> Result<GenerateOutput, ClusterError> {
    let wall = started.elapsed();
    let shape = setup.prepared.latent_shape();
    let p = shape[2] / setup.token_rows().max(1);
    let mut groups: Vec<Tensor> = Vec::new();
    let mut per_device = Vec::new();
    for (role, rep) in roles.iter().zip(reports) {
        let rep = rep.expect("all reported");
        let device = role.rank;
        let fail = |message: String| ClusterError::DeviceFailed {
            device,
            step: None,
            message,
        };
        if role.is_last_stage() {
            let l = rep
                .latent
                .ok_or_else(|| fail("the last stage finished without a latent".into()))?;
            if l.shape() != shape {
                return Err(fail(format!(
                    "the final latent has shape {:?}, the request's is {shape:?}",
                    l.shape()
                )));
            }
            if role.sp.rank == 0 {
                groups.push(l);
            } else {
                // The rows rank r updated last go into the group's latent.
                let target = groups
                    .get_mut(role.cfg.group)
                    .ok_or_else(|| fail("no rank 0".into()))?;
                for rows in setup.final_rows(role.sp.rank) {
                    copy_rows(target, &l, rows.start * p..rows.end * p)
                        .map_err(|e| fail(e.to_string()))?;
                }
            }
        }
        per_device.push(DeviceSummary {
            device,
            busy: rep.busy.saturating_sub(rep.exchange_wait),
            exchange_wait: rep.exchange_wait,
            items: rep.launched,
            bytes_sent: rep.bytes_sent,
            sent_to: rep.sent_to.clone(),
        });
    }
    for (g, l) in groups.iter().enumerate().skip(1) {
        let same = groups[0].as_f32().ok() == l.as_f32().ok() && l.as_f32().is_ok();
        if !same {
            let last = roles
                .iter()
                .rfind(|r| r.cfg.group == g && r.is_last_stage())
                .map_or(0, |r| r.rank);
            return Err(ClusterError::DeviceFailed {
                device: last,
                step: None,
                message: "the CFG groups' final latents differ".into(),
            });
        }
    }
    let latent = groups.into_iter().next();
    let latent = latent.ok_or_else(|| ClusterError::NotRunning("no devices".into()))?;
    Ok(GenerateOutput {
        latent,
        summary: RunSummary::new(wall, per_device),
    })
}

/// `dst[:, :, rows, :] = src[:, :, rows, :]` for two `[B, C, H, W]` tensors of one shape.
fn copy_rows(dst: &mut Tensor, src: &Tensor, rows: std::ops::Range<usize>) -> kernels::Result<()> {
    let &[b, c, h, w] = dst.shape() else {
        return Ok(());
    };
    let s = src.as_f32()?.to_vec();
    let d = dst.as_f32_mut()?;
    for plane in 0..b * c {
        let at = plane * h * w;
        d[at + rows.start * w..at + rows.end * w]
            .copy_from_slice(&s[at + rows.start * w..at + rows.end * w]);
    }
    Ok(())
}
