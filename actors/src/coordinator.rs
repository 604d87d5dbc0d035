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

use crate::cluster::{DeviceSummary, GenerateOutput, Progress, RunSummary};
use crate::device::{start_error, DeviceActor, DeviceArgs};
use crate::error::ClusterError;
use crate::handles::{DeviceHandle, RemoteDevice};
use crate::messages::{CoordinatorMessage, StageReport};
use crate::stage::RequestSetup;

pub(crate) struct CoordinatorActor;

/// One stage's device: spawned here, or already running on another node.
pub(crate) enum StageSlot {
    /// Spawn a device actor in this process, linked to the coordinator.
    Local(DeviceArgsFactory),
    /// A device on another node (its device index and proxy).
    Remote(usize, Arc<dyn RemoteDevice>),
}

/// How to start each device (one per stage, in stage order).
pub(crate) struct CoordinatorArgs {
    pub(crate) devices: Vec<StageSlot>,
    /// A deliberate failure (tests): `Fault::SlowBegin` delays a device's Begin.
    pub(crate) fault: Option<crate::compute::Fault>,
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
    /// Devices in stage order.
    devices: Vec<DeviceHandle>,
    /// Device index of each stage.
    device_index: Vec<usize>,
    begin_timeout: std::time::Duration,
    fault: Option<crate::compute::Fault>,
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
        let (mut devices, mut device_index) = (Vec::new(), Vec::new());
        for slot in args.devices {
            let make = match slot {
                StageSlot::Remote(device, proxy) => {
                    devices.push(DeviceHandle::Remote(proxy));
                    device_index.push(device);
                    continue;
                }
                StageSlot::Local(make) => make,
            };
            let dargs = make(myself.clone());
            let (device, failed) = (dargs.index, start_error(&dargs));
            let (d, _) = Actor::spawn_linked(None, DeviceActor, dargs, myself.get_cell())
                .await
                .map_err(failed)?;
            devices.push(DeviceHandle::Local(d));
            device_index.push(device);
        }
        Ok(CoordinatorState {
            devices,
            device_index,
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
                let stage = st.device_index.iter().position(|&d| d == device);
                let Some(r) = st.running.as_mut().filter(|r| r.req.setup.id == request) else {
                    return Ok(());
                };
                match stage.and_then(|s| r.reports.get_mut(s)) {
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
                    let n = req.schedule.stages.max(1);
                    let _ =
                        req.reply
                            .send(finish(started, reports, &st.device_index, &req.setup, n));
                    st.start_next().await;
                }
            }
            CoordinatorMessage::NodeLost { node, reason } => {
                tracing::error!(%node, %reason, "node lost");
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
        let Some(stage) = st
            .devices
            .iter()
            .position(|d| d.local().is_some_and(|d| d.get_id() == cell.get_id()))
        else {
            return Ok(());
        };
        let device = st.device_index[stage];
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
            // Last stage first: stage 0 starts work as soon as it has begun, and its frames must
            // find every later stage already expecting this request. Under CFG parallel every
            // group's later stages begin before any group's stage 0 (ranks are stage + N * group),
            // so a prediction from one group finds the other's last stage ready.
            let (n, sp) = (req.schedule.stages.max(1), req.setup.sp_degree());
            let first = |r: &usize| (r / sp) % n == 0;
            let order: Vec<usize> = (0..self.devices.len())
                .rev()
                .filter(|r| !first(r))
                .chain((0..self.devices.len()).rev().filter(first))
                .collect();
            for stage in order {
                let d = &self.devices[stage];
                let i = self.device_index[stage];
                if let Some(crate::compute::Fault::SlowBegin { device, millis }) = self.fault {
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
            tracing::error!(request = r.req.setup.id, %err, "request failed");
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

/// The request's result from every device's report. `n` is the pipeline length; device position
/// `pos` is sequence-parallel rank `pos % S` of stage `(pos / S) % n` of CFG group `pos / (S n)`
/// (ALGORITHMS.md section 5). Each CFG group's last stages hold the final latent (under sequence
/// parallelism each rank the rows of its shard); every group must arrive at the same latent, bit
/// for bit.
fn finish(
    started: Instant,
    reports: Vec<Option<StageReport>>,
    device_index: &[usize],
    setup: &crate::stage::RequestSetup,
    n: usize,
) -> Result<GenerateOutput, ClusterError> {
    let wall = started.elapsed();
    let shape = setup.prepared.latent_shape();
    let sp = setup.sp_degree();
    let p = shape[2] / setup.token_rows().max(1);
    let mut groups: Vec<Tensor> = Vec::new();
    let mut per_device = Vec::new();
    for (pos, (device, rep)) in device_index.iter().copied().zip(reports).enumerate() {
        let rep = rep.expect("all reported");
        let fail = |message: String| ClusterError::DeviceFailed {
            device,
            step: None,
            message,
        };
        let (rank, stage, group) = (pos % sp, (pos / sp) % n, pos / (sp * n));
        if stage == n - 1 {
            let l = rep
                .latent
                .ok_or_else(|| fail("the last stage finished without a latent".into()))?;
            if l.shape() != shape {
                return Err(fail(format!(
                    "the final latent has shape {:?}, the request's is {shape:?}",
                    l.shape()
                )));
            }
            if rank == 0 {
                groups.push(l);
            } else {
                // The rows rank r updated last go into the group's latent.
                let target = groups
                    .get_mut(group)
                    .ok_or_else(|| fail("no rank 0".into()))?;
                for rows in setup.final_rows(rank) {
                    copy_rows(target, &l, rows.start * p..rows.end * p)
                        .map_err(|e| fail(e.to_string()))?;
                }
            }
        }
        per_device.push(DeviceSummary {
            device,
            busy: rep.busy,
            items: rep.launched,
            bytes_sent: rep.bytes_sent,
        });
    }
    for (g, l) in groups.iter().enumerate().skip(1) {
        let same = groups[0].as_f32().ok() == l.as_f32().ok() && l.as_f32().is_ok();
        if !same {
            return Err(ClusterError::DeviceFailed {
                device: device_index[(g + 1) * sp * n - 1],
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
