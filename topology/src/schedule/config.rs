//! Item enumeration of a [`ScheduleConfig`]: which parts a step has, global order, indices.

use super::{Part, ScheduleConfig, WorkItem};
use crate::{Result, TopologyError};

impl ScheduleConfig {
    /// Warmup steps after clamping to `steps`.
    pub fn warmup_steps(&self) -> usize {
        self.warmup.min(self.steps)
    }

    /// Whether `step` is a warmup (whole-image) step.
    pub fn is_warmup(&self, step: usize) -> bool {
        step < self.warmup_steps()
    }

    /// The parts of `step` in order: `[Whole]` for a warmup step, `Patch(0..M)` otherwise, and
    /// nothing for a step `>= steps`.
    pub fn parts(&self, step: usize) -> Vec<Part> {
        if step >= self.steps {
            Vec::new()
        } else if self.is_warmup(step) {
            vec![Part::Whole]
        } else {
            (0..self.patches).map(Part::Patch).collect()
        }
    }

    /// All items of the request, in global order (step, then part).
    pub fn items(&self) -> Vec<WorkItem> {
        (0..self.item_count())
            .filter_map(|i| self.item_at(i))
            .collect()
    }

    /// Number of items every stage runs: `W + (T - W) * M` (with `W` clamped).
    pub fn item_count(&self) -> usize {
        let w = self.warmup_steps();
        w + (self.steps - w) * self.patches
    }

    /// Checks `stages >= 1`, `patches >= 1` and `steps >= 1`.
    pub fn validate(&self) -> Result<()> {
        let check = |ok: bool, field: &str, what: &str| -> Result<()> {
            if ok {
                return Ok(());
            }
            Err(TopologyError::Invalid {
                file: "<struct>".into(),
                line: None,
                field: format!("schedule.{field}"),
                message: format!("must be at least 1, got 0 ({what})"),
                hint: None,
            })
        };
        check(self.stages >= 1, "stages", "pipeline stages")?;
        check(self.patches >= 1, "patches", "patches per PipeFusion step")?;
        check(self.steps >= 1, "steps", "denoising steps")
    }

    /// The item at `index` in global order, if any.
    pub(super) fn item_at(&self, index: usize) -> Option<WorkItem> {
        let w = self.warmup_steps();
        if index < w {
            return Some(WorkItem {
                step: index,
                part: Part::Whole,
            });
        }
        let rest = index - w;
        let step = w + rest / self.patches;
        (step < self.steps).then_some(WorkItem {
            step,
            part: Part::Patch(rest % self.patches),
        })
    }

    /// The global index of `item`, or `None` if the request has no such item.
    pub(super) fn index_of(&self, item: WorkItem) -> Option<usize> {
        if item.step >= self.steps {
            return None;
        }
        let w = self.warmup_steps();
        match item.part {
            Part::Whole if item.step < w => Some(item.step),
            Part::Patch(p) if item.step >= w && p < self.patches => {
                Some(w + (item.step - w) * self.patches + p)
            }
            _ => None,
        }
    }
}
