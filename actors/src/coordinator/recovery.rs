//! What the coordinator does when the cluster changes under it: a node lost (re-plan over the
//! nodes that remain, then resume the running request from its checkpoint), a node back (re-plan
//! over all of them once no request runs), and the resume itself.

use std::sync::Arc;

use topology::schedule::ScheduleConfig;

use super::checkpoint::Checkpoints;
use super::{spawn_slots, CoordinatorState, Running};
use crate::error::ClusterError;
use crate::handles::DeviceHandle;
use crate::messages::DeviceMessage;
use crate::replan::Layout;
use crate::request::{Progress, Resume};
use crate::stage::Checkpoint;

impl CoordinatorState {
    /// Node `node` was lost. In one process (no reconfigurer) the cluster is broken: the running
    /// and queued requests fail naming it. In a multi-node cluster the remaining nodes take over
    /// (a new layout) and the running request resumes from its checkpoint (or fails naming the
    /// node, without `resume`); when they cannot host the model, requests fail saying why and
    /// the cluster waits for the node to return.
    pub(super) async fn node_lost(&mut self, node: String, reason: String, devices: Vec<usize>) {
        let why = format!("node {node} was lost: {reason}");
        // The devices here hear of it first (a wait on a lost peer ends now, naming it).
        for d in self.devices.iter().filter_map(DeviceHandle::local) {
            for &device in &devices {
                let _ = d.cast(DeviceMessage::PeerLost {
                    device,
                    why: why.clone(),
                });
            }
        }
        if !self.members.contains(&node) {
            return; // already acted on (a repeated report)
        }
        tracing::error!(%node, %reason, "node lost");
        self.members.retain(|m| *m != node);
        if self.reconfigurer.is_some() && !self.layout.members.contains(&node) {
            return; // back but not yet running anything (it rejoined during a request)
        }
        if self.reconfigurer.is_none() {
            self.break_for_lost(node, reason);
            return;
        }
        if !self.resume_requests {
            self.fail_running(ClusterError::NodeLost {
                node: node.clone(),
                reason: reason.clone(),
            });
        }
        if let Some(r) = &self.running {
            for d in &self.devices {
                d.abort(r.run.id);
            }
        }
        match self.replan().await {
            Ok(()) => {
                self.resume(why).await;
                self.start_next().await;
            }
            Err(e) => {
                let reason = format!("{reason}; the remaining nodes cannot take over: {e}");
                self.break_for_lost(node, reason);
            }
        }
    }

    /// The cluster takes no requests since node `node` was lost: the running and queued ones
    /// fail naming it.
    fn break_for_lost(&mut self, node: String, reason: String) {
        self.broken = Some(format!("node {node} was lost: {reason}"));
        let err = || ClusterError::NodeLost {
            node: node.clone(),
            reason: reason.clone(),
        };
        self.fail_running(err());
        for q in self.queue.drain(..) {
            let _ = q.reply.send(Err(err()));
        }
    }

    /// Node `node` reported its devices ready: a member again. The layout grows once no request
    /// runs (now, or when the running one ends).
    pub(super) async fn node_joined(&mut self, node: String) {
        if self.members.contains(&node) || self.reconfigurer.is_none() {
            return;
        }
        tracing::info!(%node, "node rejoined");
        let order: Vec<String> = self.layout_spec_nodes();
        self.members.push(node);
        self.members
            .sort_by_key(|m| order.iter().position(|n| n == m).unwrap_or(usize::MAX));
        self.start_next().await; // re-plans now, or when the running request ends
    }

    /// The node of `lost` if `reporter`'s report of losing it can be believed: `lost` is one of
    /// the devices `reporter` exchanges with in the current layout (pipeline, sequence-parallel
    /// group, CFG partner), on a node of the layout other than the coordinator's.
    pub(super) fn believable_loss(&self, reporter: usize, lost: Option<usize>) -> Option<String> {
        let lost = lost?;
        let role = self.roles.iter().find(|r| r.rank == reporter)?;
        let neighbour = role.pipeline.contains(&lost)
            || role.sp.members.contains(&lost)
            || role.cfg.partner == Some(lost);
        let node = self.node_of(lost)?;
        (neighbour && lost != reporter && node != self.spec.coordinator).then_some(node)
    }

    /// The node of device `device` (a global index).
    pub(super) fn node_of(&self, device: usize) -> Option<String> {
        let mut first = 0;
        for n in &self.spec.nodes {
            if (first..first + n.devices.len()).contains(&device) {
                return Some(n.name.clone());
            }
            first += n.devices.len();
        }
        None
    }

    /// The devices (global indices) of node `node`.
    pub(super) fn devices_of(&self, node: &str) -> Vec<usize> {
        let mut first = 0;
        for n in &self.spec.nodes {
            if n.name == node {
                return (first..first + n.devices.len()).collect();
            }
            first += n.devices.len();
        }
        Vec::new()
    }

    /// Every node of the topology, in order.
    fn layout_spec_nodes(&self) -> Vec<String> {
        self.spec.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// Moves the devices to the layout over the current members, unless they run it already:
    /// the old local devices stop (and are waited for: their memory), the members restart
    /// theirs in their new roles, the new ones start here. On success the cluster takes requests
    /// again; on a failure it takes none (`broken` says why), runs no devices, and the next
    /// change of members (a node back) tries again.
    pub(super) async fn replan(&mut self) -> Result<(), String> {
        if self.layout.members == self.members {
            return Ok(());
        }
        let r = self.try_replan().await;
        match &r {
            Ok(()) => self.broken = None,
            Err(e) => {
                tracing::error!(%e, "the cluster could not change its layout");
                self.broken = Some(format!(
                    "the nodes {} cannot run the model: {e}",
                    self.members.join(", ")
                ));
                // No layout: the next replan starts from nothing.
                self.layout.members.clear();
                self.begin_order.clear();
                self.roles.clear();
                stop_local(std::mem::take(&mut self.devices)).await;
            }
        }
        r
    }

    async fn try_replan(&mut self) -> Result<(), String> {
        let Some(reconfigurer) = self.reconfigurer.clone() else {
            return Err("this cluster cannot change its layout".into());
        };
        let layout =
            Layout::over(&self.spec, &self.model, &self.members).map_err(|e| e.to_string())?;
        tracing::warn!(members = ?layout.members, stages = layout.plan.pipeline_len(), "new layout");
        // The old devices here go first (their memory), then every member restarts its own.
        self.roles.clear();
        self.begin_order.clear();
        stop_local(std::mem::take(&mut self.devices)).await;
        let floor = self.next_run.saturating_sub(1);
        let slots = reconfigurer.reconfigure(layout.clone(), floor).await?;
        self.devices = spawn_slots(&self.me, slots)
            .await
            .map_err(|e| e.to_string())?;
        self.roles = layout.roles.clone();
        self.begin_order = layout.begin_order.clone();
        self.layout = layout;
        Ok(())
    }

    /// Continues the running request from its newest checkpoint (or its start) in a new run on
    /// the devices there are now: the current run is dropped everywhere, the continuation
    /// ([`RequestSetup::continued`]) begins, progress and the summary say where it resumed.
    /// If it cannot begin, the request fails naming why.
    pub(super) async fn resume(&mut self, reason: String) {
        let Some(mut r) = self.running.take() else {
            return;
        };
        for d in &self.devices {
            d.abort(r.run.id);
        }
        let origin = &r.origin;
        let checkpoint = match r.checkpoints.latest.clone() {
            Some(c) => c,
            None => Checkpoint {
                steps_done: 0,
                latent: origin.initial_latent.clone(),
                history: origin
                    .sampling
                    .multistep
                    .then(|| kernels::Tensor::zeros(origin.initial_latent.shape())),
            },
        };
        let done = checkpoint.steps_done;
        if done >= origin.steps() {
            // Every step was done before the loss: the checkpoint is the result.
            tracing::warn!(request = r.id, %reason, "all steps were done: the last checkpoint is the result");
            let why = format!("{reason} (after the last step: its checkpoint is the result)");
            r.note_resume(done, reason, why, 0);
            let mut summary = crate::request::RunSummary::new(r.started.elapsed(), Vec::new());
            summary.resumes = r.resumes;
            let _ = r.reply.send(Ok(crate::request::GenerateOutput {
                latent: checkpoint.latent,
                summary,
            }));
            return;
        }
        let id = self.take_run_id();
        // The request's plan on the devices there are now (the layout may have changed).
        let plan = crate::cluster::plan_of(&self.layout.spec, &self.model, &origin.request);
        let next = plan.and_then(|plan| {
            r.stages = plan.pipeline_len();
            origin.continued(
                id,
                &self.model,
                &checkpoint,
                plan.patches.clone(),
                plan.cfg_degree,
                plan.sp.degree(),
            )
        });
        let fail = |r: Running, e: ClusterError| {
            tracing::error!(request = r.id, %e, "request could not be resumed");
            let _ = r.reply.send(Err(e));
        };
        let next = match next {
            Ok(s) => Arc::new(s),
            Err(e) => return fail(r, e),
        };
        let schedule = ScheduleConfig {
            stages: r.stages,
            patches: next.patches.len(),
            warmup: next.warmup,
            steps: next.steps(),
        };
        if let Err((device, message)) = self.begin_run(&next, schedule, r.id).await {
            let e = ClusterError::DeviceFailed {
                device,
                step: Some(done),
                message: format!("could not resume the request ({reason}): {message}"),
            };
            return fail(r, e);
        }
        tracing::warn!(request = r.id, run = id, steps_done = done, %reason, "request resumed");
        let stages = r.stages;
        r.note_resume(done, reason.clone(), reason, stages);
        r.checkpoints = Checkpoints::new(&self.roles, r.checkpoints.latest.take());
        r.reports = vec![None; self.devices.len()];
        r.run = next;
        self.running = Some(r);
    }
}

/// How long a replaced device may take to stop (its current item finishes first).
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Stops the local device actors among `devices` and waits for them (remote ones are their
/// nodes' to stop).
pub(super) async fn stop_local(devices: Vec<DeviceHandle>) {
    for d in devices {
        if let DeviceHandle::Local(a) = d {
            let why = Some("replaced in a new layout".to_string());
            if let Err(e) = a.stop_and_wait(why, Some(STOP_WAIT)).await {
                tracing::warn!(%e, "a replaced device did not stop in time");
            }
        }
    }
}

impl Running {
    /// Tells the client (`Progress::Resumed` with `reason`) and the summary (`Resume` with
    /// `note`) that the request continues after `steps_done` steps on `stages` stages (0: none
    /// ran again).
    fn note_resume(&mut self, steps_done: usize, reason: String, note: String, stages: usize) {
        if let Some(p) = &self.progress {
            let _ = p.send(Progress::Resumed { steps_done, reason });
        }
        self.resumes.push(Resume {
            steps_done,
            reason: note,
            stages,
        });
    }
}
