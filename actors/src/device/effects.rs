//! Carrying out the device core's outputs: a launch (its input checked against the plan, then
//! the compute job), a send (an item's output as frames, with back-pressure), a failure report
//! and a finished report.

use std::time::Duration;

use kernels::Tensor;
use tokio::sync::oneshot;
use topology::schedule::{CoreFailure, Part, ScheduleFailure, WorkItem};

use super::DeviceState;
use crate::codec::{encode, item_label};
use crate::compute::ComputeJob;
use crate::fault::Fault;
use crate::messages::{CoordinatorMessage, StageReport};
use crate::stage::StageJob;

impl DeviceState {
    /// Hands `item` to the compute thread, after checking its input (which arrived as `label`
    /// from device `from`) against the plan.
    pub(super) fn launch(
        &mut self,
        request: u64,
        item: WorkItem,
        (label, from): (WorkItem, usize),
        input: Tensor,
    ) -> Result<(), String> {
        if let Some(Fault::ActorPanicAt { device, step }) = self.fault {
            if device == self.role.rank && step == item.step && request == 1 {
                panic!("injected actor panic at step {step}");
            }
        }
        let setup = self.setup.clone().ok_or("no request set up")?;
        let (role, rank) = (&self.role, self.role.sp.rank);
        // An input from another device must be the rank's rows of its part (its own inputs, the
        // request's latent and a one-stage pipeline's loop, are what it made itself).
        let want = setup.rank_rows(label.part, rank).and_then(|r| {
            let part = setup.rows(label.part)?;
            let prompt = setup.prompt_rows(&r, &part);
            setup.frame_shape_rows(r.len(), prompt, role.is_first_stage(), role.cfg.group)
        });
        if from != role.rank && want.as_deref() != Some(input.shape()) {
            return Err(format!(
                "the input of {item} from device {from} has shape {:?}, the plan says {want:?}",
                input.shape()
            ));
        }
        let job = StageJob {
            step: item.step,
            rows: setup
                .rank_rows(item.part, rank)
                .ok_or_else(|| format!("no rows for {item} on rank {rank}"))?,
            patch: setup.rows(item.part).unwrap_or(0..setup.token_rows()),
            ends_step: match item.part {
                Part::Whole => true,
                Part::Patch(p) => p + 1 == setup.patches.len(),
            },
        };
        let job = ComputeJob::Run {
            request,
            item,
            job,
            input,
        };
        match self.compute.submit(job) {
            true => Ok(()),
            false => Err("the compute thread has stopped".into()),
        }
    }

    /// Sends an item's output to stage `to` of this device's pipeline; over QUIC this waits
    /// while the link's bounded queue is full (back-pressure).
    pub(super) async fn send(
        &mut self,
        request: u64,
        to: usize,
        item: WorkItem,
        out: &Tensor,
    ) -> Result<(), String> {
        let to_device = self.role.pipeline[to];
        let link = self.links[to_device].clone();
        for (item, t) in self.parts_to_send(to, item, out)? {
            let label = item_label(to == 0, item.step, item.part);
            let frame = encode(request, self.role.rank, label, &t).map_err(|e| e.to_string())?;
            if let Err(e) = link.send_async(frame).await {
                // The next stage's node is gone (its connection lost): the failure names it, so
                // the coordinator resumes around that node even before it hears of the loss.
                if matches!(e, transport::TransportError::PeerGone { .. }) {
                    self.lost_peer.get_or_insert(to_device);
                }
                return Err(e.to_string());
            }
        }
        Ok(())
    }

    /// What an item's output becomes on the wire: itself, except for the whole latent a
    /// sequence-parallel last stage inside PipeFusion holds after a whole-image step (its ranks
    /// shared their rows): stage 0's rank needs only its own rows of it, its shard for a
    /// whole-image step, its sub-strip of each patch (as that patch's input) for a patch step.
    pub(super) fn parts_to_send(
        &self,
        to: usize,
        item: WorkItem,
        out: &Tensor,
    ) -> Result<Vec<(WorkItem, Tensor)>, String> {
        let setup = self.setup.as_ref().ok_or("no request set up")?;
        let [_, _, h, _] = setup.prepared.latent_shape();
        let sp = &self.role.sp;
        let gathered = to == 0
            && item.part == Part::Whole
            && sp.degree() > 1
            && sp.inside_pipefusion
            && setup.patches.len() > 1
            && out.dim(2) == h;
        if !gathered {
            return Ok(vec![(item, out.clone())]);
        }
        let p = h / setup.token_rows().max(1);
        let parts = match item.step < setup.warmup {
            true => vec![item.part],
            false => (0..setup.patches.len()).map(Part::Patch).collect(),
        };
        parts
            .into_iter()
            .map(|part| {
                let rows = setup
                    .rank_rows(part, sp.rank)
                    .ok_or_else(|| format!("no rows of {part:?} for rank {}", sp.rank))?;
                let t = out
                    .narrow(2, rows.start * p, rows.len() * p)
                    .map_err(|e| e.to_string())?;
                Ok((WorkItem { part, ..item }, t))
            })
            .collect()
    }

    /// Reports a failure of `request` to the coordinator and releases the exchange waits.
    pub(super) fn report_failure(
        &mut self,
        request: u64,
        step: Option<usize>,
        reason: &CoreFailure,
    ) {
        self.cancel_exchanges(request);
        let message = match (reason, self.clock.waiting_for()) {
            (CoreFailure::ComputeTimeout { item, timeout }, Some(peer)) => format!(
                "waited longer than the compute timeout ({:.1} s) in {item} for device {peer}'s \
                 part of an exchange: device {peer} is wedged or far too slow",
                timeout.as_secs_f64()
            ),
            (CoreFailure::ComputeTimeout { .. }, None) => {
                format!("{reason}: the device is wedged or far too slow")
            }
            (CoreFailure::Schedule(ScheduleFailure::PeerLost { peer, .. }), _) => {
                match self.lost_stages.iter().find(|(s, _)| s == peer) {
                    Some((_, why)) => format!("{reason} ({why})"),
                    None => reason.to_string(),
                }
            }
            _ => reason.to_string(),
        };
        tracing::error!(device = self.role.rank, ?step, %message, "request failed on this device");
        self.coordinator.report(CoordinatorMessage::DeviceFailed {
            request,
            device: self.role.rank,
            step,
            message,
            lost_peer: self.lost_peer,
        });
    }

    /// Reports a finished request (the last stage's final latent with it).
    pub(super) async fn finish(
        &mut self,
        request: u64,
        stats: topology::schedule::StageStats,
        exchange_wait: Duration,
    ) {
        let latent = if self.role.is_last_stage() {
            let (tx, rx) = oneshot::channel();
            if self.compute.submit(ComputeJob::Finish(tx)) {
                rx.await.ok().flatten()
            } else {
                None
            }
        } else {
            None
        };
        let report = StageReport {
            busy: stats.busy,
            exchange_wait,
            launched: stats.launched,
            bytes_sent: self.bytes_sent() - self.bytes_at_start,
            sent_to: self.sent_to(),
            latent,
        };
        self.coordinator.report(CoordinatorMessage::StageFinished {
            request,
            device: self.role.rank,
            report,
        });
    }
}
