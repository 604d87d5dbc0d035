//! The device actor's exchanges beyond the pipeline: the CFG prediction swap between the two
//! groups' last stages and the parts of sequence-parallel collectives, checked and handed to
//! the compute thread (or sent for it).

use kernels::Tensor;
use topology::schedule::{Part, WorkItem};
use transport::FrameKind;

use super::DeviceState;
use crate::codec::{decode, encode, part_of};
use crate::compute::PartnerMsg;
use crate::sp_link::SpMsg;
use crate::stage::RequestSetup;

impl DeviceState {
    /// The other CFG group's prediction: checked, then handed to the waiting compute thread.
    pub(super) fn on_prediction(&mut self, frame: transport::Frame) -> Result<(), String> {
        let (a, tx) = match (self.active.as_ref(), self.partner_tx.as_ref()) {
            (Some(a), Some(tx)) => (a, tx),
            _ => {
                return Err(format!(
                    "a CFG prediction from device {} reached a device that exchanges none",
                    frame.header.from
                ))
            }
        };
        let partner = self.cfg.and_then(|c| c.partner);
        if partner != Some(frame.header.from as usize) {
            return Err(format!(
                "a CFG prediction from device {}, but this stage's partner is {partner:?}",
                frame.header.from
            ));
        }
        let (step, part) = (frame.header.step as usize, part_of(frame.header.part));
        let mut want = a.setup.frame_shape(part, true, 0);
        if let (Some(w), false) = (want.as_mut(), a.setup.sp_rows.is_empty()) {
            let p = w[2] / a.setup.rows(part).map_or(1, |r| r.len().max(1));
            w[2] = self.rows_of(&a.setup, part).len() * p;
        }
        let t = decode(&frame).map_err(|e| e.to_string())?;
        if want.as_deref() != Some(t.shape()) {
            return Err(format!(
                "CFG prediction from device {} for step {step} {part:?} has shape {:?}, the plan says {want:?}",
                frame.header.from,
                t.shape()
            ));
        }
        tx.send(PartnerMsg::Prediction {
            request: a.setup.id,
            item: WorkItem { step, part },
            prediction: t,
        })
        .map_err(|_| "the compute thread has stopped".to_string())
    }

    /// Sends this stage's prediction for `item` to the other group's last stage.
    pub(super) async fn send_prediction(
        &mut self,
        request: u64,
        item: WorkItem,
        prediction: Tensor,
    ) {
        match self.active.as_mut() {
            Some(a) if a.setup.id == request => a.awaiting_partner = Some(item),
            _ => return, // the request ended meanwhile
        }
        let Some(partner) = self.cfg.and_then(|c| c.partner) else {
            return;
        };
        let (step, part, kind) = (item.step, item.part, FrameKind::CfgPrediction);
        let r = self
            .send_tensor(request, partner, step, part, kind, &prediction)
            .await;
        if let Err(e) = r {
            self.fail(Some(item.step), format!("sending the CFG prediction: {e}"));
        }
    }

    /// Encodes `t` as a frame of `kind` and sends it to device `to` (waiting under back-pressure).
    pub(super) async fn send_tensor(
        &self,
        request: u64,
        to: usize,
        step: usize,
        part: Part,
        kind: FrameKind,
        t: &Tensor,
    ) -> Result<(), String> {
        let frame = encode(request, self.index, step, part, kind, t).map_err(|e| e.to_string())?;
        self.links[to]
            .clone()
            .send_async(frame)
            .await
            .map_err(|e| e.to_string())
    }

    /// Unblocks a compute thread waiting for the partner's prediction or the sequence-parallel
    /// group's parts of `request`.
    pub(super) fn cancel_partner(&self, request: u64) {
        if let Some(tx) = &self.partner_tx {
            let _ = tx.send(PartnerMsg::Cancel { request });
        }
        if let Some(tx) = &self.sp_tx {
            let _ = tx.send(SpMsg::Cancel { request });
        }
    }

    /// Sends the compute thread's part of a sequence-parallel collective to device `to`.
    pub(super) async fn send_sp_part(&mut self, request: u64, op: u64, to: usize, tensor: Tensor) {
        if !self.active.as_ref().is_some_and(|a| a.setup.id == request) {
            return; // the request ended meanwhile
        }
        let kind = FrameKind::SpPart;
        let r = self
            .send_tensor(request, to, op as usize, Part::Whole, kind, &tensor)
            .await;
        if let Err(e) = r {
            self.fail(
                None,
                format!("sending a sequence-parallel part to device {to}: {e}"),
            );
        }
    }

    /// A part from another rank of this device's sequence-parallel group: checked, then handed
    /// to the compute thread.
    pub(super) fn on_sp_part(&mut self, frame: transport::Frame) -> Result<(), String> {
        let from = frame.header.from as usize;
        let (Some(a), Some(sp), Some(tx)) = (self.active.as_ref(), &self.sp, &self.sp_tx) else {
            return Err(format!(
                "a sequence-parallel part from device {from} reached a device outside any group"
            ));
        };
        let rank = sp.devices.iter().position(|&d| d == from).ok_or_else(|| {
            format!("a sequence-parallel part from device {from}, which is not in this group")
        })?;
        let t = decode(&frame).map_err(|e| e.to_string())?;
        let group = self.cfg.map_or(0, |c| c.group);
        let batch = a
            .setup
            .forward_of(group)
            .map_err(|e| e.to_string())?
            .forward_batch();
        // Attention parts [B', tokens, width], or latent rows [B, C, rows, W] (the all-gather
        // after a whole-image step).
        let latent = a.setup.prepared.latent_shape();
        let fits = match t.shape() {
            [b, _, _] => *b == batch,
            [b, c, _, w] => [*b, *c, *w] == [latent[0], latent[1], latent[3]],
            _ => false,
        };
        if !fits {
            return Err(format!(
                "sequence-parallel part from device {from} has shape {:?}, expected [{batch}, tokens, width] or latent rows",
                t.shape()
            ));
        }
        tx.send(SpMsg::Part {
            request: a.setup.id,
            op: u64::from(frame.header.step),
            from: rank,
            tensor: t,
        })
        .map_err(|_| "the compute thread has stopped".to_string())
    }

    /// The token rows this device computes for `part`: the part's rows, or under sequence
    /// parallelism the rank's shard.
    pub(super) fn rows_of(&self, setup: &RequestSetup, part: Part) -> std::ops::Range<usize> {
        let rank = self.sp.as_ref().map_or(0, |sp| sp.rank);
        setup.rank_rows(part, rank).unwrap_or(0..setup.token_rows())
    }
}
