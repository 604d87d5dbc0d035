//! The coordinator actor: starts one linked device actor per stage, runs requests one at a time
//! (later ones queue), relays progress, collects the stages' reports into the result, and turns
//! any device failure into a failed request that names the device and the step.
//!
//! Supervision policy (`handle_supervisor_evt`): a device actor that fails or stops while the
//! cluster is up marks the cluster broken: the running request and every queued one fail with
//! the device's index, its last known step and the reason; later submissions are refused. There
//! is no silent restart: a restarted device would have lost its K/V buffers mid-request.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::sync::mpsc::UnboundedSender;
use topology::schedule::ScheduleConfig;
use topology::DeviceRole;

use crate::device::{start_error, DeviceActor, DeviceArgs};
use crate::error::ClusterError;
use crate::handles::{DeviceHandle, Reconfigurer, RemoteDevice};
use crate::messages::{CoordinatorMessage, StageReport};
use crate::replan::Layout;
use crate::request::{GenerateOutput, Progress, Resume};
use crate::stage::RequestSetup;

mod checkpoint;
mod finish;
mod recovery;

use checkpoint::Checkpoints;

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
    /// The topology.
    pub(crate) spec: topology::ClusterSpec,
    /// The devices' roles and begin order.
    pub(crate) layout: Layout,
    /// See [`CoordinatorState::reconfigurer`].
    pub(crate) reconfigurer: Option<Arc<dyn Reconfigurer>>,
    /// Every device, in the layout's order.
    pub(crate) devices: Vec<StageSlot>,
    /// A deliberate failure (tests): `Fault::SlowBegin` delays a device's Begin.
    pub(crate) fault: Option<crate::fault::Fault>,
    /// How long a device may take to accept `Begin` (it waits for its compute thread).
    pub(crate) begin_timeout: std::time::Duration,
    /// See [`crate::ClusterOptions::resume`].
    pub(crate) resume: bool,
    /// The model the devices run.
    pub(crate) model: model::ModelConfig,
}

/// Builds a device's arguments once the coordinator's own reference exists.
pub(crate) type DeviceArgsFactory =
    Box<dyn FnOnce(ActorRef<CoordinatorMessage>) -> DeviceArgs + Send>;

struct Queued {
    /// The request's id (what callers cancel by; runs get their own ids).
    id: u64,
    setup: Box<RequestSetup>,
    schedule: ScheduleConfig,
    progress: Option<UnboundedSender<Progress>>,
    reply: RpcReplyPort<Result<GenerateOutput, ClusterError>>,
}

/// The request being run, and its current run (the first, or a continuation after a resume).
struct Running {
    id: u64,
    progress: Option<UnboundedSender<Progress>>,
    reply: RpcReplyPort<Result<GenerateOutput, ClusterError>>,
    /// The request's steps T.
    steps: usize,
    /// Pipeline stages of the current run.
    stages: usize,
    /// The first run (what continuations are made from).
    origin: Arc<RequestSetup>,
    /// The current run (its id is on the devices and the wire).
    run: Arc<RequestSetup>,
    started: Instant,
    reports: Vec<Option<StageReport>>,
    /// The last step done, in the request's numbering.
    last_step: Option<usize>,
    checkpoints: Checkpoints,
    resumes: Vec<Resume>,
}

pub(crate) struct CoordinatorState {
    /// Devices in the layout's order (their ids are `roles[i].rank`).
    devices: Vec<DeviceHandle>,
    /// Their roles.
    roles: Vec<DeviceRole>,
    begin_order: Vec<usize>,
    begin_timeout: std::time::Duration,
    /// Resume a request whose node is lost (see [`crate::ClusterOptions::resume`]).
    resume_requests: bool,
    fault: Option<crate::fault::Fault>,
    /// The model (a continuation rebuilds the request's inputs from it).
    model: model::ModelConfig,
    /// The topology (every layout is planned over a part of it).
    spec: topology::ClusterSpec,
    /// The layout the devices run (roles and begin order come from it).
    layout: Layout,
    /// The nodes up now (the layout's, until a loss or a rejoin is acted on).
    members: Vec<String>,
    /// Restarts the members' devices in a new layout (multi-node clusters; `None` in one
    /// process, where a lost device ends the cluster).
    reconfigurer: Option<Arc<dyn Reconfigurer>>,
    me: ActorRef<CoordinatorMessage>,
    queue: VecDeque<Queued>,
    running: Option<Running>,
    /// The next run's id (runs begin in this order, so devices see ids only grow).
    next_run: u64,
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
        let devices = spawn_slots(&myself, args.devices).await?;
        Ok(CoordinatorState {
            devices,
            roles: args.layout.roles.clone(),
            begin_order: args.layout.begin_order.clone(),
            members: args.layout.members.clone(),
            layout: args.layout,
            spec: args.spec,
            reconfigurer: args.reconfigurer,
            me: myself,
            begin_timeout: args.begin_timeout,
            resume_requests: args.resume,
            fault: args.fault,
            model: args.model,
            queue: VecDeque::new(),
            running: None,
            next_run: 1,
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
                id,
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
                    id,
                    setup,
                    schedule,
                    progress,
                    reply,
                });
                st.start_next().await;
            }
            CoordinatorMessage::Cancel { request, reason } => {
                let running = st.running.as_ref().map(|r| r.id);
                match request.or(running) {
                    Some(id) if Some(id) == running => {
                        st.fail_running(ClusterError::Cancelled {
                            request: id,
                            reason,
                        });
                        st.start_next().await;
                    }
                    Some(id) => {
                        if let Some(i) = st.queue.iter().position(|q| q.id == id) {
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
                let Some(r) = st.running.as_mut().filter(|r| r.run.id == request) else {
                    return Ok(());
                };
                let step = r.run.resumed_from + step;
                r.last_step = Some(step);
                if let Some(p) = &r.progress {
                    let _ = p.send(Progress::Step {
                        step,
                        steps: r.steps,
                        elapsed: r.started.elapsed(),
                    });
                }
                if let Some(crate::fault::Fault::ResumeAfter { step: at }) = st.fault {
                    if at == step && r.id == 1 && r.resumes.is_empty() {
                        st.resume("an injected interruption (Fault::ResumeAfter)".into())
                            .await;
                    }
                }
            }
            CoordinatorMessage::Checkpoint {
                request,
                device,
                step,
                latent,
                history,
            } => {
                if let Some(r) = st.running.as_mut().filter(|r| r.run.id == request) {
                    r.checkpoints.add(&r.run, device, step, latent, history);
                }
            }
            CoordinatorMessage::StageFinished {
                request,
                device,
                report,
            } => {
                let Some(r) = st.running.as_mut().filter(|r| r.run.id == request) else {
                    return Ok(());
                };
                let at = st.roles.iter().position(|role| role.rank == device);
                match at.and_then(|i| r.reports.get_mut(i)) {
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
                    let r = st.running.take().expect("running");
                    let out = finish::finish(r.started.elapsed(), r.reports, &st.roles, &r.run)
                        .map(|mut out| {
                            out.summary.resumes = r.resumes;
                            out
                        });
                    let _ = r.reply.send(out);
                    st.start_next().await;
                }
            }
            CoordinatorMessage::Health { reply } => {
                let _ = reply.send(crate::request::ClusterHealth {
                    broken: st.broken.clone(),
                    nodes: st.layout.members.clone(),
                    missing: st
                        .spec
                        .nodes
                        .iter()
                        .map(|n| n.name.clone())
                        .filter(|n| !st.members.contains(n))
                        .collect(),
                });
            }
            CoordinatorMessage::NodeLost {
                node,
                reason,
                devices,
            } => st.node_lost(node, reason, devices).await,
            CoordinatorMessage::NodeJoined { node } => st.node_joined(node).await,
            CoordinatorMessage::DeviceFailed {
                request,
                device,
                step,
                message,
                lost_peer,
            } => {
                // A device that failed because a node it depends on is gone: the node is lost
                // (its devices' node saw it first); the request resumes around it.
                if let Some(node) = st.believable_loss(device, lost_peer) {
                    let running = st.running.as_ref().is_some_and(|r| r.run.id == request);
                    if running && st.reconfigurer.is_some() && st.members.contains(&node) {
                        let devices = st.devices_of(&node);
                        st.node_lost(node, message, devices).await;
                        return Ok(());
                    }
                }
                if st.running.as_ref().is_some_and(|r| r.run.id == request) {
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
            .map(|i| st.roles[i].rank)
        else {
            return Ok(()); // not a current device (one replaced in a new layout stops so)
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
        // A layout change waiting for the running request to end (a node that came back).
        if self.running.is_none()
            && self.reconfigurer.is_some()
            && self.layout.members != self.members
        {
            let _ = self.replan().await; // a failure sets `broken`
        }
        if let Some(why) = self.broken.clone() {
            for q in self.queue.drain(..) {
                let _ = q.reply.send(Err(ClusterError::NotRunning(why.clone())));
            }
            return;
        }
        while self.running.is_none() {
            let Some(mut q) = self.queue.pop_front() else {
                return;
            };
            // The layout may have changed since the request was made (a node lost or back).
            if let Err(e) = self.fit_to_layout(&mut q) {
                let _ = q.reply.send(Err(e));
                continue;
            }
            let mut setup = q.setup;
            setup.id = self.take_run_id();
            let setup: Arc<RequestSetup> = Arc::from(setup);
            if let Err((device, message)) = self.begin_run(&setup, q.schedule, q.id).await {
                let _ = q.reply.send(Err(ClusterError::DeviceFailed {
                    device,
                    step: None,
                    message: format!("could not begin the request: {message}"),
                }));
                continue;
            }
            tracing::info!(
                request = q.id,
                run = setup.id,
                steps = q.schedule.steps,
                "request started"
            );
            self.running = Some(Running {
                id: q.id,
                progress: q.progress,
                reply: q.reply,
                steps: q.schedule.steps,
                stages: q.schedule.stages,
                origin: setup.clone(),
                run: setup,
                started: Instant::now(),
                reports: vec![None; self.devices.len()],
                last_step: None,
                checkpoints: Checkpoints::new(&self.roles, None),
                resumes: Vec::new(),
            });
        }
    }

    /// Re-plans a queued request for the current layout when its plan differs.
    fn fit_to_layout(&self, q: &mut Queued) -> Result<(), ClusterError> {
        let plan = crate::cluster::plan_of(&self.layout.spec, &self.model, &q.setup.request)?;
        let (stages, sp) = (plan.pipeline_len(), plan.sp.degree());
        let same = q.setup.patches == plan.patches
            && q.setup.cfg_degree() == plan.cfg_degree
            && q.setup.sp_degree() == sp
            && q.schedule.stages == stages;
        if !same {
            let s = q
                .setup
                .replanned(&self.model, plan.patches.clone(), plan.cfg_degree, sp)?;
            q.schedule.stages = stages;
            q.schedule.patches = s.patches.len();
            *q.setup = s;
        }
        Ok(())
    }

    fn take_run_id(&mut self) -> u64 {
        let id = self.next_run;
        self.next_run += 1;
        id
    }

    /// Begins run `setup` on every device, in the plan's begin order: every later stage before
    /// any first stage (a first stage starts work as soon as it has begun, and its frames must
    /// find the later stages already expecting this run). On a refusal the devices that began
    /// drop it, and the error names the device.
    async fn begin_run(
        &self,
        setup: &Arc<RequestSetup>,
        schedule: ScheduleConfig,
        request: u64,
    ) -> Result<(), (usize, String)> {
        if self.devices.is_empty() || self.begin_order.len() != self.devices.len() {
            return Err((0, "the cluster runs no devices now".into()));
        }
        for &i in &self.begin_order {
            let Some(d) = self.devices.get(i) else {
                return Err((i, "no such device in the layout".into()));
            };
            if let Some(crate::fault::Fault::SlowBegin { device, millis }) = self.fault {
                if device == i && request == 1 {
                    tokio::time::sleep(std::time::Duration::from_millis(millis)).await;
                }
            }
            if let Err(m) = d.begin(setup.clone(), schedule, self.begin_timeout).await {
                for d in &self.devices {
                    d.abort(setup.id);
                }
                return Err((i, m));
            }
        }
        Ok(())
    }

    fn fail_running(&mut self, err: ClusterError) {
        if let Some(r) = self.running.take() {
            for d in &self.devices {
                d.abort(r.run.id);
            }
            match err {
                // Asked for: not a failure of the cluster.
                ClusterError::Cancelled { .. } => {
                    tracing::info!(request = r.id, %err, "request cancelled")
                }
                _ => tracing::error!(request = r.id, %err, "request failed"),
            }
            let _ = r.reply.send(Err(err));
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

/// Spawns the local slots as device actors linked to the coordinator (`me`); remote slots become
/// their proxies. Fails naming the device that could not start.
async fn spawn_slots(
    me: &ActorRef<CoordinatorMessage>,
    slots: Vec<StageSlot>,
) -> Result<Vec<DeviceHandle>, ClusterError> {
    let mut devices = Vec::new();
    for slot in slots {
        let make = match slot {
            StageSlot::Remote(proxy) => {
                devices.push(DeviceHandle::Remote(proxy));
                continue;
            }
            StageSlot::Local(make) => make,
        };
        let dargs = make(me.clone());
        let failed = start_error(&dargs);
        match Actor::spawn_linked(None, DeviceActor, dargs, me.get_cell()).await {
            Ok((d, _)) => devices.push(DeviceHandle::Local(d)),
            Err(e) => {
                recovery::stop_local(devices).await; // those started already
                return Err(failed(e));
            }
        }
    }
    Ok(devices)
}
