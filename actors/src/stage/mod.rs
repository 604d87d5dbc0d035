//! What one pipeline stage computes for one work item, with no actors or I/O: embed (stage 0),
//! the owned blocks over the stage's K/V buffers, and on the last stage the head, the guidance
//! and the scheduler step of the patch's latent rows. The device actor runs a [`StageExecutor`] on
//! its compute thread; [`run_in_order`] runs a chain of them in one thread in global
//! (step, patch, stage) order, which is the numerical reference for the actor runtime.

mod setup;

pub use setup::{Checkpoint, RequestSetup};

use std::ops::Range;
use std::sync::Arc;

use kernels::Tensor;
use model::sampler::guidance::denoise;
use model::sampler::SamplerState;
use model::{Conditioning, KvBuffer, Transformer};

use crate::error::{ClusterError, Result};

/// One (step, part) as a stage sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageJob {
    /// Denoising step.
    pub step: usize,
    /// Token rows this stage computes: the part's (all rows in warmup steps), or under sequence
    /// parallelism this rank's sub-strip of them.
    pub rows: Range<usize>,
    /// Token rows of the whole part (equal to `rows` without sequence parallelism).
    pub patch: Range<usize>,
    /// The last part of the step (the last stage advances the sampler after it).
    pub ends_step: bool,
}

struct Active {
    setup: Arc<RequestSetup>,
    kv: KvBuffer,
    cond: Option<(usize, Conditioning)>,
    /// Last stage: the sampler and the full latent x_t.
    sampler: Option<(SamplerState, Tensor)>,
}

/// A stage's layer slice and its per-request state (K/V buffers; on the last stage the sampler and
/// the latent).
pub struct StageExecutor {
    model: Transformer,
    first: bool,
    last: bool,
    /// The CFG group under CFG parallel.
    cfg_group: Option<usize>,
    /// Under sequence parallelism: how self-attention reaches the other ranks.
    sequence: Option<Box<dyn model::sp::SequenceAttention>>,
    /// Inside PipeFusion: the Ulysses degree U (1 for Ring), the stage keeping a K/V buffer of
    /// `1 / U` of the heads; 0 when attention sees the whole sequence every step (no patches).
    kv_head_groups: usize,
    active: Option<Active>,
}

impl StageExecutor {
    /// A stage owning `model`'s blocks; it is the first stage if they start at block 0, the last
    /// if they end at the last block.
    pub fn new(model: Transformer) -> StageExecutor {
        let r = model.block_range();
        StageExecutor {
            first: r.start == 0,
            last: r.end == model.config().num_layers,
            model,
            cfg_group: None,
            sequence: None,
            kv_head_groups: 0,
            active: None,
        }
    }

    /// The same stage as one rank of a sequence-parallel group: it runs the token rows it is
    /// given, and its self-attention goes through `attention` (Ulysses, Ring or USP over the
    /// group). With `kv_head_groups` = U > 0 (the Ulysses degree, 1 for Ring) it keeps a K/V
    /// buffer of its head group and runs PipeFusion patches; with 0 every item must cover the
    /// whole image.
    pub fn with_sequence_parallel(
        mut self,
        attention: Box<dyn model::sp::SequenceAttention>,
        kv_head_groups: usize,
    ) -> StageExecutor {
        self.sequence = Some(attention);
        self.kv_head_groups = kv_head_groups;
        self
    }

    /// The same stage in CFG group `group` of a CFG-parallel plan: it forwards that group's
    /// branch, and as a last stage it returns its branch's noise prediction from
    /// [`run`](Self::run) and needs the other group's for [`combine`](Self::combine).
    pub fn with_cfg_group(mut self, group: usize) -> StageExecutor {
        self.cfg_group = Some(group);
        self
    }

    /// A last stage under CFG parallel: its items end with an exchange of noise predictions.
    pub fn exchanges_predictions(&self) -> bool {
        self.last && self.cfg_group.is_some()
    }

    fn group(&self) -> usize {
        self.cfg_group.unwrap_or(0)
    }

    /// The layer slice.
    pub fn model(&self) -> &Transformer {
        &self.model
    }

    /// Starts a request: fresh K/V buffers (nothing from an earlier request is ever read).
    pub fn begin(&mut self, setup: Arc<RequestSetup>) -> Result<()> {
        let p = self.model.config().patch_size;
        let [_, _, h, w] = setup.prepared.latent_shape();
        if setup.token_rows() * p != h
            || setup.initial_latent.shape() != setup.prepared.latent_shape()
        {
            return Err(ClusterError::BadRequest(format!(
                "patch table covers {} token rows, latent {:?} has {}",
                setup.token_rows(),
                setup.initial_latent.shape(),
                h / p
            )));
        }
        let expected_groups = if self.cfg_group.is_some() { 2 } else { 1 };
        if setup.cfg_degree() != expected_groups {
            return Err(ClusterError::BadRequest(format!(
                "the request is split over {} CFG group(s), this stage expects {expected_groups}",
                setup.cfg_degree()
            )));
        }
        let fwd = setup.forward_of(self.group())?;
        // MMDiT: the prompt tokens join the image tokens in the buffer.
        let (b, tokens) = (fwd.forward_batch(), (h / p) * (w / p) + fwd.text_tokens());
        // A rank of a group that runs no patches keeps no K/V buffer: its attention sees the
        // whole sequence through the group, every step. Inside PipeFusion it keeps its head
        // group's.
        let (tokens, groups) = match (&self.sequence, self.kv_head_groups) {
            (Some(_), 0) => (0, 1),
            (Some(_), u) => (tokens, u),
            (None, _) => (tokens, 1),
        };
        let kv = match self.active.take() {
            Some(a) if a.kv.dims() == (b, tokens) => {
                let mut kv = a.kv;
                kv.reset();
                kv
            }
            old => {
                drop(old); // free the old buffers before allocating new ones
                self.model.kv_buffer_for_heads(b, tokens, groups)?
            }
        };
        let sampler = match self.last {
            true => Some((setup.sampler_state()?, setup.initial_latent.clone())),
            false => None,
        };
        tracing::debug!(request = setup.id, kv_bytes = kv.bytes(), "stage ready");
        self.active = Some(Active {
            setup,
            kv,
            cond: None,
            sampler,
        });
        Ok(())
    }

    /// Runs `job`. `input` is the latent (stage 0: the part's rows `[B, C, h, W]`, or the whole
    /// latent) or the hidden states `[B', n, d]` from the previous stage. Returns the hidden states
    /// for the next stage, or on the last stage the part's updated latent rows x_{t+1} (under CFG
    /// parallel: this group's noise prediction `[B, C, h, W]`, for [`combine`](Self::combine)).
    pub fn run(&mut self, job: &StageJob, input: &Tensor) -> Result<Tensor> {
        let a = self
            .active
            .as_mut()
            .ok_or_else(|| ClusterError::BadRequest("stage has no active request".into()))?;
        let setup = a.setup.clone();
        let p = self.model.config().patch_size;
        let [_, _, h, w] = setup.prepared.latent_shape();
        let (grid_rows, cols) = (h / p, w / p);
        let t = *setup.sampling.timesteps.get(job.step).ok_or_else(|| {
            ClusterError::BadRequest(format!("step {} is past the request's steps", job.step))
        })?;
        let fwd = setup.forward_of(self.cfg_group.unwrap_or(0))?;
        if a.cond.as_ref().is_none_or(|(s, _)| *s != job.step) {
            let mut cond = self.model.conditioning(&fwd.inputs(t))?;
            // MMDiT under sequence parallelism: one rank of the group holds the prompt tokens
            // (the same rank for every item: pure sequence parallelism runs whole images).
            if setup.prompt_rows(&job.rows, &job.patch) == 0 {
                cond = cond.without_prompt();
            }
            a.cond = Some((job.step, cond));
        }
        let cond = &a.cond.as_ref().expect("set above").1;
        let (r0, n_rows) = (job.rows.start, job.rows.len());
        let mut x = if self.first {
            let strip = if input.dim(2) == n_rows * p {
                input.clone()
            } else {
                input.narrow(2, r0 * p, n_rows * p)?
            };
            let xin = fwd.model_input(&strip)?; // [B', C, rows*p, W]
            self.model.embed_with(&xin, r0, grid_rows, cond)? // [B', n (+ T), d]
        } else {
            input.clone()
        };
        match (self.sequence.as_mut(), self.kv_head_groups) {
            (Some(sp), 0) => {
                self.model
                    .run_blocks_sequence_parallel(&mut x, cond, sp.as_mut(), r0 * cols)?
            }
            (Some(sp), _) => self.model.run_blocks_sequence_parallel_with_kv(
                &mut x,
                cond,
                sp.as_mut(),
                &mut a.kv,
                job.patch.start * cols,
                job.patch.len() * cols,
                r0 * cols,
            )?,
            (None, _) => self
                .model
                .run_blocks_with_kv(&mut x, cond, &mut a.kv, r0 * cols)?,
        }
        if !self.last {
            return Ok(x);
        }
        let out = self.model.head(&x, cond, n_rows, w)?; // [B', C_out, rows*p, W]
        if self.cfg_group.is_some() {
            // An unguided branch's `guide` keeps the first C channels: the noise prediction.
            return Ok(fwd.guide(&out)?);
        }
        let eps = setup.prepared.guide(&out)?; // [B, C, rows*p, W]
        self.step_rows(job, &eps)
    }

    /// CFG parallel, last stage: guides with this group's prediction `own` and the other
    /// group's `partner` (both `[B, C, rows*p, W]` from [`run`](Self::run)), applies the
    /// scheduler step to the part's rows and returns them, as [`run`](Self::run) does without
    /// CFG parallel. Both groups compute the same numbers, so their latents stay identical.
    pub fn combine(&mut self, job: &StageJob, own: &Tensor, partner: &Tensor) -> Result<Tensor> {
        let Some(g) = self.cfg_group.filter(|_| self.last) else {
            return Err(ClusterError::BadRequest(
                "combine is for the last stage of a CFG group".into(),
            ));
        };
        if own.shape() != partner.shape() {
            return Err(ClusterError::BadRequest(format!(
                "CFG predictions differ in shape: own {:?}, partner {:?}",
                own.shape(),
                partner.shape()
            )));
        }
        let pair = if g == 0 {
            [own, partner]
        } else {
            [partner, own]
        };
        let a = self
            .active
            .as_ref()
            .ok_or_else(|| ClusterError::BadRequest("stage has no active request".into()))?;
        let eps = a.setup.prepared.guide(&Tensor::cat(&pair, 0)?)?;
        self.step_rows(job, &eps)
    }

    /// The last stage's scheduler step on the job's rows with the guided prediction `eps`.
    fn step_rows(&mut self, job: &StageJob, eps: &Tensor) -> Result<Tensor> {
        let p = self.model.config().patch_size;
        let setup = self
            .active
            .as_ref()
            .ok_or_else(|| ClusterError::BadRequest("stage has no active request".into()))?
            .setup
            .clone();
        // Sequence parallelism inside PipeFusion, a whole-image step: each rank predicted its
        // shard, but its
        // next patches cover rows of other shards. The ranks share their predictions and all
        // step the whole latent, so latents and multistep histories stay identical everywhere.
        let (eps, r0, n_rows) = if self.whole_step_needs_gather(&setup, job) {
            let sp = self.sequence.as_mut().expect("checked");
            let parts = sp.all_gather(eps.clone())?;
            let refs: Vec<&Tensor> = parts.iter().collect();
            (Tensor::cat(&refs, 2)?, 0, setup.token_rows())
        } else {
            (eps.clone(), job.rows.start, job.rows.len())
        };
        let a = self.active.as_mut().expect("checked above");
        let (sampler, latent) = a.sampler.as_mut().expect("last stage has a sampler");
        sampler.update_rows(latent, r0 * p, &eps)?;
        if job.ends_step {
            sampler.advance();
        }
        let rows = latent.narrow(2, r0 * p, n_rows * p)?;
        // A diverging model or input is an error naming where, not a NaN image.
        if rows.as_f32()?.iter().any(|v| !v.is_finite()) {
            return Err(ClusterError::BadRequest(format!(
                "step {}: the latent became non-finite (NaN or infinite) in token rows {}..{} \
                 at the last stage: the model, its weights or the request's inputs diverge",
                job.step,
                r0,
                r0 + n_rows
            )));
        }
        Ok(rows)
    }

    /// Whether `job` is a whole-image step of a sequence-parallel rank inside a PipeFusion plan
    /// with several patches (see [`Self::step_rows`]).
    fn whole_step_needs_gather(&self, setup: &RequestSetup, job: &StageJob) -> bool {
        self.sequence.is_some()
            && self.kv_head_groups > 0
            && setup.patches.len() > 1
            && job.patch == (0..setup.token_rows())
    }

    /// Last stage: the latent and the multistep sampler's history (as a tensor of the latent's
    /// shape; `None` for single-step samplers) as they stand now, for a checkpoint after a step.
    pub fn sampler_snapshot(&self) -> Option<(Tensor, Option<Tensor>)> {
        let (sampler, latent) = self.active.as_ref()?.sampler.as_ref()?;
        let history = match sampler.history() {
            [] => None,
            h => Some(Tensor::from_vec(h.to_vec(), latent.shape()).ok()?),
        };
        Some((latent.clone(), history))
    }

    /// Ends the request; the last stage returns the final latent.
    pub fn finish(&mut self) -> Option<Tensor> {
        let a = self.active.as_mut()?;
        a.cond = None;
        a.sampler.take().map(|(_, latent)| latent)
    }
}

/// Runs a whole request over a chain of stages in one thread, in global (step, part, stage) order:
/// the PipeFusion result the actor runtime must reproduce exactly (it only changes *when* each
/// item runs, never the order a stage sees them in). Returns the final latent.
pub fn run_in_order(stages: &mut [StageExecutor], setup: Arc<RequestSetup>) -> Result<Tensor> {
    run_groups_in_order(&mut [stages], setup)
}

/// [`run_in_order`] for CFG parallel: `groups[g]` is CFG group g's chain (executors made with
/// [`StageExecutor::with_cfg_group`]); per item both chains run to their last stage, then each
/// last stage combines the two predictions. Fails if the groups' latents ever differ.
pub fn run_groups_in_order(
    groups: &mut [&mut [StageExecutor]],
    setup: Arc<RequestSetup>,
) -> Result<Tensor> {
    for s in groups.iter_mut().flat_map(|g| g.iter_mut()) {
        s.begin(setup.clone())?;
    }
    let mut latent = setup.initial_latent.clone();
    for step in 0..setup.steps() {
        let mut next: Vec<(usize, Tensor)> = Vec::new();
        for job in setup.jobs(step) {
            let mut outs = Vec::new();
            for chain in groups.iter_mut() {
                let mut x = latent.clone();
                for s in chain.iter_mut() {
                    x = s.run(&job, &x)?;
                }
                outs.push(x);
            }
            let x = if let [a, b] = &outs[..] {
                let rows0 = last(groups, 0)?.combine(&job, a, b)?;
                let rows1 = last(groups, 1)?.combine(&job, b, a)?;
                if rows0.as_f32()? != rows1.as_f32()? {
                    return Err(ClusterError::BadRequest(format!(
                        "CFG groups diverged at step {step}, rows {:?}",
                        job.rows
                    )));
                }
                rows0
            } else {
                outs.pop().expect("one group")
            };
            next.push((job.rows.start, x));
        }
        let p = latent.dim(2) / setup.token_rows();
        let parts: Vec<&Tensor> = next.iter().map(|(_, t)| t).collect();
        debug_assert!(next.windows(2).all(|w| w[0].0 < w[1].0));
        latent = Tensor::cat(&parts, 2)?;
        debug_assert_eq!(latent.dim(2), setup.token_rows() * p);
    }
    for g in 1..groups.len() {
        last(groups, g)?.finish();
    }
    last(groups, 0)?
        .finish()
        .ok_or_else(|| ClusterError::BadRequest("no stages".into()))
}

fn last<'a>(groups: &'a mut [&mut [StageExecutor]], g: usize) -> Result<&'a mut StageExecutor> {
    groups
        .get_mut(g)
        .and_then(|c| c.last_mut())
        .ok_or_else(|| ClusterError::BadRequest(format!("CFG group {g} has no stages")))
}

/// The plain single-device sampling loop over a whole model (no patches, no K/V buffers): the
/// serial baseline PipeFusion is compared against. `on_step(step)` after every step.
pub fn run_serial(
    model: &Transformer,
    setup: &RequestSetup,
    on_step: impl FnMut(usize),
) -> Result<Tensor> {
    let mut state = setup.sampler_state()?;
    let p = &setup.prepared;
    Ok(denoise(
        &mut state,
        setup.initial_latent.clone(),
        |_, t, x| {
            let out = model.forward(&p.model_input(x)?, &p.inputs(t))?;
            p.guide(&out)
        },
        on_step,
    )?)
}
