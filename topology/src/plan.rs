//! The parallel plan: which device runs which layers (pipeline stages) of which CFG group, how
//! the latent is cut into patches, and what crosses each link per step (ALGORITHMS.md sections
//! 2, 3 and 5).
//!
//! [`Plan::new`] is where a [`ClusterSpec`] meets the model: checks that need the layer count or
//! the latent size happen here and report against the spec's file and lines.

use std::ops::Range;

use crate::error::Result;
use crate::plan_sp::SequenceParallel;
use crate::shape::{patch_rows, split_layers, ModelShape};
use crate::spec::{ClusterSpec, DeviceRef};

/// Pipeline stages and the patch table for one model and request shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Every stage of every CFG group, in device-rank order (ALGORITHMS.md section 5: rank =
    /// stage + N * group): group g's pipeline is `stages[g * N..(g + 1) * N]`.
    pub stages: Vec<Stage>,
    /// CFG groups (1, or 2 with CFG parallel: group 0 runs the first half of the doubled batch,
    /// group 1 the second).
    pub cfg_degree: usize,
    /// Sequence parallelism inside each pipeline stage (see [`SequenceParallel`]).
    pub sp: SequenceParallel,
    /// Token rows of each patch: contiguous, covering `0..shape.token_rows`.
    pub patches: Vec<Range<usize>>,
    /// Synchronous full-image warmup steps W.
    pub warmup_steps: usize,
    /// The shape the plan was made for.
    pub shape: ModelShape,
}

/// One device's assignment: its stage, CFG group, sequence-parallel rank and layers
/// ([`Plan::role`] derives its neighbours and groups from these).
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    /// Its stage: position in its pipeline, `0..N` (the device's rank is `device.index`).
    pub index: usize,
    /// The CFG group whose pipeline it belongs to (0 without CFG parallel).
    pub cfg_group: usize,
    /// Its rank in its sequence-parallel group (0 without sequence parallelism): it owns token
    /// rows `plan.sp.rows[sp_rank]`.
    pub sp_rank: usize,
    /// The device that runs it.
    pub device: DeviceRef,
    /// The transformer blocks it owns (contiguous, non-empty).
    pub layers: Range<usize>,
}

/// Bytes one link carries per PipeFusion step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkBytes {
    /// Sending device rank (= stage index without CFG parallel).
    pub from: usize,
    /// Receiving device rank.
    pub to: usize,
    /// f32 bytes per denoising step.
    pub bytes_per_step: u64,
    /// What it carries.
    pub kind: LinkKind,
}

/// What a link carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// Hidden states, stage s -> s + 1.
    Hidden,
    /// The updated latent rows, last stage -> stage 0.
    Latent,
    /// One CFG branch's noise prediction, between the groups' last stages.
    CfgPrediction,
    /// Attention inputs and outputs between the ranks of a sequence-parallel group.
    SequenceParallel,
}

impl Plan {
    /// Builds the plan: device rank = sp_rank + S x (stage + N x cfg_group) of
    /// [`ClusterSpec::devices`], layers from `parallel.layer_split` or [`split_layers`], patches
    /// from [`patch_rows`], sequence-parallel token rows from [`SequenceParallel`].
    ///
    /// Errors (against the spec's file and lines): an invalid spec, CFG parallel for an unguided
    /// request, sequence-parallel combinations not built yet (USP, inside a pipeline, with
    /// patches) or that do not fit the model (heads, rows), more stages than layers, a
    /// `layer_split` that does not sum to the layers, a `num_patches` the token rows cannot be
    /// cut into.
    pub fn new(spec: &ClusterSpec, shape: &ModelShape) -> Result<Plan> {
        spec.validate()?;
        let p = &spec.parallel;
        // One step's hidden states (B' x tokens x d floats) must be a 64-bit byte count, so the
        // plan's figures (link bytes, buffers) are exact or saturate, never wrap.
        let tokens = (shape.token_rows as u64)
            .checked_mul(shape.token_cols as u64)
            .and_then(|t| t.checked_add(shape.text_tokens as u64));
        let step_bytes = [shape.batch, shape.hidden.max(shape.latent_channels), 4]
            .iter()
            .fold(tokens, |a, &x| a.and_then(|a| a.checked_mul(x as u64)));
        if step_bytes.is_none() {
            return Err(crate::TopologyError::Overflow(format!(
                "{} x {} tokens (+ {} prompt tokens), {} rows per forward, hidden size {}: one \
                 step's activations exceed 2^64 bytes",
                shape.token_rows, shape.token_cols, shape.text_tokens, shape.batch, shape.hidden
            )));
        }

        if p.cfg_degree == 2 && shape.batch != 2 * shape.latent_batch {
            return Err(spec.error(
                "parallel.cfg_degree",
                "cfg_degree = 2 splits the two branches of classifier-free guidance, but this \
                 request is not guided (guidance scale <= 1)"
                    .to_string(),
                Some("use a guidance scale above 1, or cfg_degree = 1".into()),
            ));
        }
        let n = p.pipefusion_degree;
        if n > shape.layers {
            return Err(spec.error(
                "parallel.pipefusion_degree",
                format!(
                    "{n} pipeline stages but the model has only {} layers",
                    shape.layers
                ),
                Some(format!(
                    "use pipefusion_degree <= {} (every stage needs a layer)",
                    shape.layers
                )),
            ));
        }
        let layers = match &p.layer_split {
            Some(split) => {
                let sum: usize = split.iter().sum();
                if sum != shape.layers {
                    return Err(spec.error(
                        "parallel.layer_split",
                        format!(
                            "layer_split {split:?} sums to {sum} but the model has {} layers",
                            shape.layers
                        ),
                        Some(format!(
                            "make the entries sum to {}, or remove layer_split for an even split",
                            shape.layers
                        )),
                    ));
                }
                split
                    .iter()
                    .scan(0, |start, &len| {
                        let r = *start..*start + len;
                        *start += len;
                        Some(r)
                    })
                    .collect()
            }
            None => split_layers(shape.layers, n),
        };
        let m = p.num_patches;
        let h = shape.token_rows;
        let Some(patches) = patch_rows(h, m) else {
            let valid: Vec<String> = (1..=h)
                .filter(|&k| patch_rows(h, k).is_some())
                .map(|k| k.to_string())
                .collect();
            return Err(spec.error(
                "parallel.num_patches",
                format!(
                    "{h} token rows cannot be cut into num_patches = {m} strips of ceil({h}/{m}) \
                     rows (the last takes the remainder)"
                ),
                Some(format!(
                    "num_patches values that work for {h} token rows: {}",
                    valid.join(", ")
                )),
            ));
        };
        let sp = SequenceParallel::new(spec, shape)?;
        let ranks = sp.degree();
        // ALGORITHMS.md section 5: rank = sp_rank + S * (stage + N * group).
        let stages: Vec<Stage> = spec
            .devices()
            .into_iter()
            .enumerate()
            .map(|(rank, device)| Stage {
                index: (rank / ranks) % n,
                cfg_group: rank / (ranks * n),
                sp_rank: rank % ranks,
                device,
                layers: layers[(rank / ranks) % n].clone(),
            })
            .collect();
        if m < n {
            tracing::warn!(
                num_patches = m,
                pipefusion_degree = n,
                "num_patches < pipefusion_degree: the pipeline will not stay full"
            );
        }
        tracing::debug!(stages = stages.len(), patches = patches.len(), "built plan");
        Ok(Plan {
            stages,
            cfg_degree: p.cfg_degree,
            sp,
            patches,
            warmup_steps: p.warmup_steps,
            shape: *shape,
        })
    }

    /// Patches M per image.
    pub fn num_patches(&self) -> usize {
        self.patches.len()
    }

    /// Pipeline stages N of one CFG group (the PipeFusion degree).
    pub fn pipeline_len(&self) -> usize {
        self.stages.len() / (self.cfg_degree.max(1) * self.sp.degree())
    }

    /// Every stage of CFG group `g` (all its pipeline stages and sequence-parallel ranks; empty
    /// past the last group).
    pub fn group(&self, g: usize) -> &[Stage] {
        let n = self.pipeline_len() * self.sp.degree();
        self.stages.get(g * n..(g + 1) * n).unwrap_or(&[])
    }

    /// The device of every stage of the pipeline `stage` belongs to (same CFG group, same
    /// sequence-parallel rank), in stage order ([`DeviceRole::pipeline`](crate::DeviceRole::pipeline)).
    pub fn pipeline_of(&self, stage: &Stage) -> Vec<usize> {
        self.role(stage.device.index)
            .map_or_else(Vec::new, |r| r.pipeline)
    }

    /// Under CFG parallel: the device holding the same stage and sequence-parallel rank in the
    /// other CFG group.
    pub fn cfg_partner(&self, stage: &Stage) -> Option<usize> {
        (self.cfg_degree == 2).then(|| {
            self.group(1 - stage.cfg_group)
                .iter()
                .find(|s| s.index == stage.index && s.sp_rank == stage.sp_rank)
                .map(|s| s.device.index)
        })?
    }
}
