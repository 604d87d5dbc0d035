//! Which input labels a stage accepts: every item's input once, nothing else.

use super::{Part, StageSchedule, WorkItem};
use crate::Result;

impl StageSchedule {
    /// Refuses a duplicate input or one that names no item of this stage.
    pub(super) fn check_input(&self, label: WorkItem) -> Result<()> {
        let cfg = &self.cfg;
        let WorkItem { step, part } = label;
        // Stage 0 takes one whole-latent input for a PipeFusion step (after the last warmup
        // step, or from the request at step 0): it is the input of all M patches.
        if self.stage == 0 && part == Part::Whole && step < cfg.steps && !cfg.is_warmup(step) {
            let patch = |p| WorkItem {
                step,
                part: Part::Patch(p),
            };
            let first = cfg.index_of(patch(0)).unwrap_or(usize::MAX);
            let any_patch = self.pending.range(patch(0)..=patch(usize::MAX)).next();
            if first < self.cursor || any_patch.is_some() || self.pending.contains(&label) {
                return Err(self.refuse(format!(
                    "duplicate input for step {step}, whole image: an input for a patch of \
                     this step already arrived"
                )));
            }
            return Ok(());
        }
        let Some(index) = cfg.index_of(label) else {
            return Err(self.refuse(self.unknown(label)));
        };
        let whole = WorkItem {
            step,
            part: Part::Whole,
        };
        let covered_by_whole = matches!(part, Part::Patch(_)) && self.pending.contains(&whole);
        if index < self.cursor || self.pending.contains(&label) || covered_by_whole {
            return Err(self.refuse(format!("duplicate input for {label}")));
        }
        Ok(())
    }

    /// Why `label` names no item of this stage.
    fn unknown(&self, label: WorkItem) -> String {
        let cfg = &self.cfg;
        let why = if label.step >= cfg.steps {
            format!("the request has {} steps", cfg.steps)
        } else {
            match label.part {
                Part::Patch(p) if cfg.is_warmup(label.step) => {
                    format!(
                        "step {} is a warmup step (whole image), it has no patch {p}",
                        label.step
                    )
                }
                Part::Patch(p) => format!("patch {p} out of range ({} patches)", cfg.patches),
                Part::Whole => format!(
                    "step {} is a PipeFusion step: only stage 0 takes a whole-image input",
                    label.step
                ),
            }
        };
        format!("input for {label} names no item: {why}")
    }
}
