//! [`RequestSetup`]: everything every stage (and the coordinator) knows about one request:
//! the prepared forwards per CFG group, the sampling plan, the initial latent, the patch table and
//! the sequence-parallel rows.

use std::ops::Range;

use kernels::Tensor;
use model::sampler::SamplingPlan;
use model::PreparedRequest;

use super::StageJob;
use crate::error::{ClusterError, Result};

/// Everything every stage needs to know about one request.
#[derive(Debug)]
pub struct RequestSetup {
    /// Request id (in frame headers and logs).
    pub id: u64,
    /// Inputs of each forward and the guidance.
    pub prepared: PreparedRequest,
    /// Timesteps and step rules.
    pub sampling: SamplingPlan,
    /// The initial latent `[B, C, H, W]` (already scaled by the initial noise sigma).
    pub initial_latent: Tensor,
    /// Token rows of each PipeFusion patch.
    pub patches: Vec<Range<usize>>,
    /// Warmup steps W (whole-image steps).
    pub warmup: usize,
    /// Hidden size d of the model (shape of the activations between stages).
    pub hidden: usize,
    /// The request as asked (what another node needs to rebuild `prepared`).
    pub request: model::Request,
    /// What each CFG group forwards: `[prepared]` without CFG parallel, else its two branches
    /// (see [`RequestSetup::with_cfg_degree`]).
    pub forward: Vec<PreparedRequest>,
    /// Token rows of each sequence-parallel rank (empty without; see
    /// [`RequestSetup::with_sp_degree`]).
    pub sp_rows: Vec<Range<usize>>,
    /// A continuation ([`RequestSetup::continued`]): the steps of the original request done
    /// before this one's step 0 (0 for a request run from its start).
    pub resumed_from: usize,
    /// A continuation of a multistep sampler: its history after the last step done
    /// (`[B, C, H, W]` like the latent); `None` otherwise.
    pub history: Option<Tensor>,
}

/// A request's state at a step boundary, kept by the coordinator while the request runs: what
/// a continuation needs to finish it elsewhere ([`RequestSetup::continued`]).
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Steps of the original request completed (the latent is x after step `steps_done - 1`).
    pub steps_done: usize,
    /// The latent `[B, C, H, W]`.
    pub latent: Tensor,
    /// The multistep sampler's history (same shape), `None` for single-step samplers.
    pub history: Option<Tensor>,
}

impl RequestSetup {
    /// Validates a request for `cfg` and prepares it: the forward inputs, the sampling plan, the
    /// initial latent (`noise [B, C, H, W]` scaled by the scheduler's initial sigma).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        cfg: &model::ModelConfig,
        request: &model::Request,
        scheduler: &model::sampler::Scheduler,
        steps: usize,
        noise: &Tensor,
        patches: Vec<Range<usize>>,
        warmup: usize,
    ) -> Result<RequestSetup> {
        let prepared = PreparedRequest::new(cfg, request)?;
        let [_, _, h, w] = prepared.latent_shape();
        let sampling = scheduler.plan_for_model(steps, cfg, [h, w])?;
        if noise.shape() != prepared.latent_shape() {
            return Err(ClusterError::BadRequest(format!(
                "initial noise {:?} does not match the request's latent {:?}",
                noise.shape(),
                prepared.latent_shape()
            )));
        }
        let mut initial_latent = noise.clone();
        if sampling.init_noise_sigma != 1.0 {
            let sigma = sampling.init_noise_sigma;
            initial_latent
                .as_f32_mut()?
                .iter_mut()
                .for_each(|v| *v *= sigma);
        }
        Self::from_plan(id, cfg, request, sampling, initial_latent, patches, warmup)
    }

    /// The same from an already made sampling plan and an already scaled initial latent (what a
    /// node receives from the coordinator's node): identical numbers on every node.
    pub fn from_plan(
        id: u64,
        cfg: &model::ModelConfig,
        request: &model::Request,
        sampling: SamplingPlan,
        initial_latent: Tensor,
        patches: Vec<Range<usize>>,
        warmup: usize,
    ) -> Result<RequestSetup> {
        let prepared = PreparedRequest::new(cfg, request)?;
        if initial_latent.shape() != prepared.latent_shape() {
            return Err(ClusterError::BadRequest(format!(
                "initial latent {:?} does not match the request's latent {:?}",
                initial_latent.shape(),
                prepared.latent_shape()
            )));
        }
        if patches.last().map(|r| r.end * cfg.patch_size) != Some(prepared.latent_shape()[2]) {
            return Err(ClusterError::BadRequest(format!(
                "patch table {patches:?} does not cover the latent's {} token rows",
                prepared.latent_shape()[2] / cfg.patch_size
            )));
        }
        Ok(RequestSetup {
            id,
            sp_rows: Vec::new(),
            forward: vec![prepared.clone()],
            prepared,
            sampling,
            initial_latent,
            patches,
            warmup,
            hidden: cfg.hidden(),
            request: request.clone(),
            resumed_from: 0,
            history: None,
        })
    }

    /// The continuation of `self` (a request run from its start) from `checkpoint`, as request
    /// `id` under another plan (`patches`, CFG and sequence-parallel degrees): the remaining
    /// steps of the same sampling plan from the checkpoint's latent and sampler history. Its
    /// first step is a whole-image (synchronous) step, so every stage's K/V buffers are filled
    /// fresh before any patch reads them; after that the original warmup rule applies (steps
    /// before the original `W` stay synchronous). So a run whose steps are all synchronous
    /// (`W = T`) continues exactly; a stale PipeFusion run has one more synchronous step than
    /// it would have had.
    pub fn continued(
        &self,
        id: u64,
        cfg: &model::ModelConfig,
        checkpoint: &Checkpoint,
        patches: Vec<Range<usize>>,
        cfg_degree: usize,
        sp_degree: usize,
    ) -> Result<RequestSetup> {
        let done = checkpoint.steps_done;
        let sampling = self.sampling.from_step(done).ok_or_else(|| {
            ClusterError::BadRequest(format!(
                "a checkpoint after {done} steps leaves none of the request's {} to run",
                self.steps()
            ))
        })?;
        if self.sampling.multistep != checkpoint.history.is_some() {
            return Err(ClusterError::BadRequest(format!(
                "the checkpoint {} a sampler history, the request's sampler {} one",
                if checkpoint.history.is_some() {
                    "has"
                } else {
                    "has no"
                },
                if self.sampling.multistep {
                    "keeps"
                } else {
                    "keeps no"
                }
            )));
        }
        if let Some(h) = &checkpoint.history {
            if h.shape() != checkpoint.latent.shape() {
                return Err(ClusterError::BadRequest(format!(
                    "the checkpoint's history {:?} does not match its latent {:?}",
                    h.shape(),
                    checkpoint.latent.shape()
                )));
            }
        }
        // Nothing run yet (no checkpoint): the request as asked.
        let warmup = match done {
            0 => self.warmup,
            _ => self.warmup.saturating_sub(done).max(1),
        };
        let mut next = Self::from_plan(
            id,
            cfg,
            &self.request,
            sampling,
            checkpoint.latent.clone(),
            patches,
            warmup,
        )?
        .with_cfg_degree(cfg_degree)?
        .with_sp_degree(sp_degree)?;
        next.resumed_from = self.resumed_from + done;
        next.history = checkpoint.history.clone();
        Ok(next)
    }

    /// The last stage's sampler for this request: fresh, or for a continuation with the
    /// checkpoint's history.
    pub fn sampler_state(&self) -> Result<model::sampler::SamplerState> {
        let (plan, len) = (self.sampling.clone(), self.initial_latent.elem_count());
        match &self.history {
            None if self.resumed_from == 0 => Ok(model::sampler::SamplerState::new(plan, len)),
            None => Ok(model::sampler::SamplerState::resumed(
                plan,
                len,
                Vec::new(),
            )?),
            Some(h) => Ok(model::sampler::SamplerState::resumed(
                plan,
                len,
                h.as_f32()?.to_vec(),
            )?),
        }
    }

    /// The same request under another plan (`patches`, CFG and sequence-parallel degrees): what
    /// the coordinator runs when the cluster's layout changed after the request was made.
    pub fn replanned(
        &self,
        cfg: &model::ModelConfig,
        patches: Vec<Range<usize>>,
        cfg_degree: usize,
        sp_degree: usize,
    ) -> Result<RequestSetup> {
        let mut next = Self::from_plan(
            self.id,
            cfg,
            &self.request,
            self.sampling.clone(),
            self.initial_latent.clone(),
            patches,
            self.warmup,
        )?
        .with_cfg_degree(cfg_degree)?
        .with_sp_degree(sp_degree)?;
        next.resumed_from = self.resumed_from;
        next.history = self.history.clone();
        Ok(next)
    }

    /// The token rows sequence-parallel rank `rank` has up to date after step `step` (its
    /// sub-strips of every patch after a patch step, its shard after a whole-image one): what
    /// it contributes to a checkpoint, and at the end to the final latent.
    pub fn rows_after_step(&self, step: usize, rank: usize) -> Vec<Range<usize>> {
        use topology::schedule::Part;
        if step >= self.warmup {
            (0..self.patches.len())
                .filter_map(|p| self.rank_rows(Part::Patch(p), rank))
                .collect()
        } else {
            self.rank_rows(Part::Whole, rank).into_iter().collect()
        }
    }

    /// Splits the forwards over `degree` CFG groups (1 or 2; ALGORITHMS.md section 3): group g
    /// runs branch g of the guided batch. Fails for an unguided request.
    pub fn with_cfg_degree(mut self, degree: usize) -> Result<RequestSetup> {
        self.forward = match degree {
            1 => vec![self.prepared.clone()],
            2 => vec![self.prepared.cfg_branch(0)?, self.prepared.cfg_branch(1)?],
            d => {
                return Err(ClusterError::BadRequest(format!(
                    "cfg_degree {d}: must be 1 or 2"
                )))
            }
        };
        Ok(self)
    }

    /// Cuts the token rows over `degree` sequence-parallel ranks (ALGORITHMS.md section 4; the
    /// same rule as the plan's, `topology::patch_rows`); 1 means none.
    pub fn with_sp_degree(mut self, degree: usize) -> Result<RequestSetup> {
        self.sp_rows = match degree {
            1 => Vec::new(),
            d => topology::patch_rows(self.token_rows(), d).ok_or_else(|| {
                ClusterError::BadRequest(format!(
                    "{} token rows cannot be cut into {d} sequence-parallel shards",
                    self.token_rows()
                ))
            })?,
        };
        Ok(self)
    }

    /// The token rows sequence-parallel rank `rank` computes for `part`: its shard of the image
    /// in whole-image steps, its sub-strip of the patch otherwise (the patch rule applied to the
    /// patch's rows; ALGORITHMS.md section 4 "With PipeFusion").
    pub fn rank_rows(&self, part: topology::schedule::Part, rank: usize) -> Option<Range<usize>> {
        let rows = self.rows(part)?;
        if self.sp_rows.is_empty() {
            return Some(rows);
        }
        match part {
            topology::schedule::Part::Whole => self.sp_rows.get(rank).cloned(),
            topology::schedule::Part::Patch(_) => {
                let sub = topology::patch_rows(rows.len(), self.sp_rows.len())?;
                sub.get(rank)
                    .map(|r| rows.start + r.start..rows.start + r.end)
            }
        }
    }

    /// The rows rank `rank` holds up to date at the end of the request (its sub-strips of every
    /// patch after a patch step, its shard after a whole-image one).
    pub fn final_rows(&self, rank: usize) -> Vec<Range<usize>> {
        self.rows_after_step(self.steps().saturating_sub(1), rank)
    }

    /// MMDiT: the prompt tokens a frame of token rows `rows` of a part with rows `part_rows`
    /// carries: all T without sequence parallelism; under it only the rank whose rows hold the
    /// prompt's end of the sequence (Flux: the part's first rows, SD3: its last), so that the
    /// ranks' shards in rank order are the serial sequence. 0 for DiT and PixArt.
    pub fn prompt_rows(&self, rows: &Range<usize>, part_rows: &Range<usize>) -> usize {
        let t = self.prepared.text_tokens();
        let holds = match self.prepared.prompt_first() {
            true => rows.start == part_rows.start,
            false => rows.end == part_rows.end,
        };
        if self.sp_rows.is_empty() || holds {
            t
        } else {
            0
        }
    }

    /// Sequence-parallel ranks (1 without).
    pub fn sp_degree(&self) -> usize {
        self.sp_rows.len().max(1)
    }

    /// CFG groups (1, or 2 with CFG parallel).
    pub fn cfg_degree(&self) -> usize {
        self.forward.len()
    }

    /// What CFG group `group` forwards.
    pub fn forward_of(&self, group: usize) -> Result<&PreparedRequest> {
        self.forward.get(group).ok_or_else(|| {
            ClusterError::BadRequest(format!(
                "CFG group {group} of a request split over {} group(s)",
                self.forward.len()
            ))
        })
    }

    /// Number of denoising steps T.
    pub fn steps(&self) -> usize {
        self.sampling.timesteps.len()
    }

    /// Token rows of the image.
    pub fn token_rows(&self) -> usize {
        self.patches.last().map_or(0, |r| r.end)
    }

    /// Token rows of `part` of a step.
    pub fn rows(&self, part: topology::schedule::Part) -> Option<Range<usize>> {
        match part {
            topology::schedule::Part::Whole => Some(0..self.token_rows()),
            topology::schedule::Part::Patch(p) => self.patches.get(p).cloned(),
        }
    }

    /// The shape a frame carrying `part` must have: the latent rows `[B, C, rows*p, W]` when
    /// sent to stage 0 (and a CFG noise prediction), else hidden states `[B', rows*w + T, d]`
    /// with B' the forward batch of CFG group `group` and T its prompt tokens (MMDiT; 0 else).
    pub fn frame_shape(
        &self,
        part: topology::schedule::Part,
        to_first: bool,
        group: usize,
    ) -> Option<Vec<usize>> {
        let rows = self.rows(part)?;
        let t = self.prepared.text_tokens();
        self.frame_shape_rows(rows.len(), t, to_first, group)
    }

    /// [`frame_shape`](Self::frame_shape) for `rows` token rows (a sequence-parallel rank's)
    /// and `prompt` prompt tokens ([`prompt_rows`](Self::prompt_rows)).
    pub fn frame_shape_rows(
        &self,
        rows: usize,
        prompt: usize,
        to_first: bool,
        group: usize,
    ) -> Option<Vec<usize>> {
        let [b, c, h, w] = self.prepared.latent_shape();
        let p = h / self.token_rows().max(1);
        Some(if to_first {
            vec![b, c, rows * p, w]
        } else {
            vec![
                self.forward.get(group)?.forward_batch(),
                rows * (w / p.max(1)) + prompt,
                self.hidden,
            ]
        })
    }

    /// The work items of step `step`, as (token rows, ends the step).
    pub fn jobs(&self, step: usize) -> Vec<StageJob> {
        if step < self.warmup {
            return vec![StageJob {
                step,
                rows: 0..self.token_rows(),
                patch: 0..self.token_rows(),
                ends_step: true,
            }];
        }
        let m = self.patches.len();
        (0..m)
            .map(|p| StageJob {
                step,
                rows: self.patches[p].clone(),
                patch: self.patches[p].clone(),
                ends_step: p + 1 == m,
            })
            .collect()
    }
}
