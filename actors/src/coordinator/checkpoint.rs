//! The running request's checkpoint: every last stage of CFG group 0 sends its latent and sampler
//! history after each step ([`crate::messages::CoordinatorMessage::Checkpoint`]); once every
//! sequence-parallel rank of that stage has sent step `s`, their up-to-date rows make the
//! checkpoint after step `s` (in the original request's step numbering). Only the newest complete
//! one is kept: a latent and a history.

use std::collections::BTreeMap;

use kernels::Tensor;
use topology::DeviceRole;

use super::finish::copy_rows;
use crate::stage::{Checkpoint, RequestSetup};

/// One rank's state after a step.
struct Part {
    latent: Tensor,
    history: Option<Tensor>,
}

/// Collects one run's checkpoint parts.
pub(super) struct Checkpoints {
    /// The devices that send parts: (device rank, sequence-parallel rank).
    senders: Vec<(usize, usize)>,
    /// Parts of steps not yet complete (the run's step numbering), by sender.
    pending: BTreeMap<usize, Vec<Option<Part>>>,
    /// The newest complete checkpoint (original numbering).
    pub(super) latest: Option<Checkpoint>,
}

impl Checkpoints {
    /// For a run under `roles`, keeping `latest` from earlier runs of the request until a newer
    /// one is complete.
    pub(super) fn new(roles: &[DeviceRole], latest: Option<Checkpoint>) -> Checkpoints {
        let senders = roles
            .iter()
            .filter(|r| r.is_last_stage() && r.cfg.group == 0)
            .map(|r| (r.rank, r.sp.rank))
            .collect();
        Checkpoints {
            senders,
            pending: BTreeMap::new(),
            latest,
        }
    }

    /// Device `device` sent its state after step `step` of the run of `setup`. Parts from a
    /// device that sends none, or of a step older than the newest checkpoint, are ignored.
    pub(super) fn add(
        &mut self,
        setup: &RequestSetup,
        device: usize,
        step: usize,
        latent: Tensor,
        history: Option<Tensor>,
    ) {
        let Some(slot) = self.senders.iter().position(|&(d, _)| d == device) else {
            tracing::warn!(device, step, "a checkpoint from a device that sends none");
            return;
        };
        let shape = setup.prepared.latent_shape();
        let fits = |t: &Tensor| t.shape() == shape;
        if step >= setup.steps() || !fits(&latent) || history.as_ref().is_some_and(|h| !fits(h)) {
            tracing::warn!(
                device,
                step,
                "a checkpoint that does not fit the run; ignored"
            );
            return;
        }
        let done = setup.resumed_from + step + 1;
        if self.latest.as_ref().is_some_and(|c| c.steps_done >= done) {
            return;
        }
        let n = self.senders.len();
        let parts = self
            .pending
            .entry(step)
            .or_insert_with(|| (0..n).map(|_| None).collect());
        parts[slot] = Some(Part { latent, history });
        if parts.iter().any(Option::is_none) {
            return;
        }
        let parts = self.pending.remove(&step).expect("present");
        self.pending.retain(|&s, _| s > step);
        match self.assemble(setup, step, parts) {
            Ok(c) => self.latest = Some(c),
            Err(e) => {
                tracing::warn!(step, %e, "checkpoint parts do not fit together; kept the previous one")
            }
        }
    }

    /// Rank 0's state with every other rank's up-to-date rows copied in.
    fn assemble(
        &self,
        setup: &RequestSetup,
        step: usize,
        parts: Vec<Option<Part>>,
    ) -> kernels::Result<Checkpoint> {
        let mut parts: Vec<(usize, Part)> = self
            .senders
            .iter()
            .zip(parts)
            .map(|(&(_, sp), p)| (sp, p.expect("complete")))
            .collect();
        parts.sort_by_key(|(sp, _)| *sp);
        let mut it = parts.into_iter();
        let (_, mut base) = it.next().expect("one sender at least");
        let shape = setup.prepared.latent_shape();
        let p = shape[2] / setup.token_rows().max(1);
        for (rank, part) in it {
            for rows in setup.rows_after_step(step, rank) {
                let rows = rows.start * p..rows.end * p;
                copy_rows(&mut base.latent, &part.latent, rows.clone())?;
                if let (Some(h), Some(src)) = (base.history.as_mut(), part.history.as_ref()) {
                    copy_rows(h, src, rows)?;
                }
            }
        }
        Ok(Checkpoint {
            steps_done: setup.resumed_from + step + 1,
            latent: base.latent,
            history: base.history,
        })
    }
}
