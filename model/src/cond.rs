//! Per-step conditioning: what a forward needs besides the latent, and the embedders that turn it
//! into the vectors the blocks consume. Every pipeline stage computes its own conditioning (it is
//! cheap), so no stage waits for another to send it.

use kernels::{Device, Tensor};

use crate::config::{Arch, ModelConfig};
use crate::embedding::{timestep_features, Linear, TimestepEmbedding};
use crate::error::{ModelError, Result};
use crate::weights::WeightSource;

/// The request-side inputs of one forward over a batch of B.
#[derive(Debug, Clone, Default)]
pub struct CondInputs {
    /// Diffusion timestep per batch element.
    pub timesteps: Vec<f32>,
    /// DiT: class label per batch element (`num_classes` is the CFG null class).
    pub class_labels: Vec<usize>,
    /// PixArt: caption embeddings `[B, T, caption_channels]`; SD3 / Flux: the prompt
    /// embeddings (`prompt_embeds`).
    pub caption: Option<Tensor>,
    /// PixArt: caption mask `[B, T]`, 1 = keep, 0 = padding.
    pub caption_mask: Option<Tensor>,
    /// PixArt-1024: image (height, width) in pixels per batch element.
    pub resolution: Option<Vec<[f32; 2]>>,
    /// PixArt-1024: aspect ratio (height / width) per batch element.
    pub aspect_ratio: Option<Vec<f32>>,
    /// SD3 / Flux: pooled text embeddings `[B, pooled_projection_dim]`.
    pub pooled: Option<Tensor>,
    /// Flux.1-dev: the embedded guidance scale per batch element.
    pub guidance: Option<Vec<f32>>,
    /// Latent height and width (Flux's rotary positions need the width).
    pub latent_size: [usize; 2],
}

impl Conditioning {
    /// Batch size the conditioning was built for.
    pub fn batch(&self) -> usize {
        match self {
            Conditioning::Dit { labels, .. } => labels.len(),
            Conditioning::PixArt {
                embedded_timestep, ..
            } => embedded_timestep.dim(0),
            Conditioning::Mmdit { temb_silu, .. } => temb_silu.dim(0),
        }
    }

    /// MMDiT: the same conditioning for a sequence-parallel rank whose frames hold no prompt
    /// tokens (another rank of its group holds them); other families are unchanged.
    pub fn without_prompt(self) -> Conditioning {
        match self {
            Conditioning::Mmdit {
                temb_silu,
                text,
                cols,
                ..
            } => Conditioning::Mmdit {
                temb_silu,
                context: None,
                text,
                cols,
                holds_prompt: false,
            },
            other => other,
        }
    }

    /// Errors unless `x` is `[B, n, d]` with this conditioning's batch.
    pub(crate) fn check_tokens(&self, x: &Tensor, d: usize) -> Result<()> {
        if x.shape().len() != 3 || x.dim(0) != self.batch() || x.dim(2) != d {
            return Err(ModelError::Input(format!(
                "tokens {:?} do not match the conditioning's batch {} and hidden size {d}",
                x.shape(),
                self.batch()
            )));
        }
        Ok(())
    }
}

impl CondInputs {
    /// Batch size B.
    pub fn batch(&self) -> usize {
        self.timesteps.len()
    }
}

/// Conditioning in the form blocks consume.
#[derive(Debug, Clone)]
pub enum Conditioning {
    /// DiT: each block embeds timestep and class with its own embedder.
    Dit {
        /// `[B, 256]` sinusoidal features (shift 1).
        t_features: Tensor,
        /// Class labels.
        labels: Vec<usize>,
    },
    /// PixArt: shared by all blocks.
    PixArt {
        /// `[B, d]` (before SiLU; also drives the final layer).
        embedded_timestep: Tensor,
        /// `[B, 6d]` = `adaln_single.linear(silu(embedded_timestep))`.
        timestep_mod: Tensor,
        /// `[B, T, d]` projected caption.
        caption: Tensor,
        /// `[B, T]` additive bias, `(1 - mask) * -10000`.
        caption_bias: Option<Tensor>,
    },
    /// SD3 / Flux: shared by all blocks.
    Mmdit {
        /// `silu(temb)`, `[B, d]` (temb: timestep [+ guidance] + pooled text).
        temb_silu: Tensor,
        /// Stage 0: the embedded prompt tokens `[B, T, d]` every part starts with.
        context: Option<Tensor>,
        /// Prompt tokens T (each stage frame carries them after or before the image tokens).
        text: usize,
        /// Token columns of the image.
        cols: usize,
        /// This device's frames hold the prompt tokens (false: a sequence-parallel rank whose
        /// group holds them on another rank).
        holds_prompt: bool,
    },
}

/// PixArt's shared embedders (`adaln_single`, `caption_projection`).
#[derive(Debug, Clone)]
pub(crate) struct PixArtEmbedders {
    timestep: TimestepEmbedding,
    extra: Option<(TimestepEmbedding, TimestepEmbedding)>, // resolution, aspect ratio
    adaln: Linear,
    caption_in: Linear,
    caption_out: Linear,
}

impl PixArtEmbedders {
    pub(crate) fn load(src: &dyn WeightSource, cfg: &ModelConfig) -> Result<Self> {
        let d = cfg.hidden();
        let extra = if cfg.use_additional_conditions {
            Some((
                TimestepEmbedding::load(src, "adaln_single.emb.resolution_embedder", 256, d / 3)?,
                TimestepEmbedding::load(src, "adaln_single.emb.aspect_ratio_embedder", 256, d / 3)?,
            ))
        } else {
            None
        };
        Ok(PixArtEmbedders {
            timestep: TimestepEmbedding::load(src, "adaln_single.emb.timestep_embedder", 256, d)?,
            extra,
            adaln: Linear::load(src, "adaln_single.linear", 6 * d, d)?,
            caption_in: Linear::load(src, "caption_projection.linear_1", d, cfg.caption_channels)?,
            caption_out: Linear::load(src, "caption_projection.linear_2", d, d)?,
        })
    }

    fn forward(
        &self,
        dev: &Device,
        inputs: &CondInputs,
        cfg: &ModelConfig,
    ) -> Result<Conditioning> {
        let b = inputs.batch();
        let features =
            |t: &[f32]| -> Result<Tensor> { Ok(dev.import(timestep_features(t, 0.0)?)?) };
        let mut emb = self.timestep.forward(dev, &features(&inputs.timesteps)?)?; // [B, d]
        if let Some((res_emb, ar_emb)) = &self.extra {
            let (Some(res), Some(ar)) = (&inputs.resolution, &inputs.aspect_ratio) else {
                return Err(ModelError::Input("this PixArt model uses resolution and aspect-ratio conditioning; both must be given".into()));
            };
            if res.len() != b || ar.len() != b {
                return Err(ModelError::Input(format!(
                    "{} resolutions and {} aspect ratios for a batch of {b}",
                    res.len(),
                    ar.len()
                )));
            }
            let r = res_emb.forward(
                dev,
                &features(&res.iter().flatten().copied().collect::<Vec<_>>())?,
            )?; // [2B, d/3]: height and width rows of each batch entry
            let a = ar_emb.forward(dev, &features(ar)?)?; // [B, d/3]
                                                          // emb[i] += [r[2i] | r[2i + 1] | a[i]] (diffusers' concatenation), as one add.
            let third = cfg.hidden() / 3;
            let extra = Tensor::cat(&[&r.reshape(&[b, 2 * third])?, &a], 1)?; // [B, d]
            dev.add_gated_(&mut emb, &extra, None)?;
        }
        let timestep_mod = self.adaln.forward(dev, &dev.silu(&emb)?)?; // [B, 6d]
        let caption = inputs
            .caption
            .as_ref()
            .ok_or_else(|| ModelError::Input("PixArt needs caption embeddings".into()))?;
        if caption.shape().len() != 3
            || caption.dim(0) != b
            || caption.dim(2) != cfg.caption_channels
        {
            return Err(ModelError::Input(format!(
                "caption embeddings {:?} must be [{b}, T, {}]",
                caption.shape(),
                cfg.caption_channels
            )));
        }
        let h = self
            .caption_in
            .forward_gelu(dev, &dev.import(caption.clone())?)?;
        let caption = self.caption_out.forward(dev, &h)?; // [B, T, d]
        let caption_bias = match &inputs.caption_mask {
            None => None,
            Some(m) if m.elem_count() == b * caption.dim(1) => Some(
                dev.import_f32(Tensor::from_vec(
                    m.to_vec_f32()?
                        .iter()
                        .map(|k| (1.0 - k) * -10000.0)
                        .collect(),
                    &[b, caption.dim(1)],
                )?)?,
            ),
            Some(m) => {
                return Err(ModelError::Input(format!(
                    "caption mask {:?} must be [{b}, {}]",
                    m.shape(),
                    caption.dim(1)
                )))
            }
        };
        Ok(Conditioning::PixArt {
            embedded_timestep: emb,
            timestep_mod,
            caption,
            caption_bias,
        })
    }
}

/// Builds [`Conditioning`] from [`CondInputs`] for a model family.
pub(crate) fn conditioning(
    dev: &Device,
    cfg: &ModelConfig,
    pixart: Option<&PixArtEmbedders>,
    inputs: &CondInputs,
) -> Result<Conditioning> {
    if inputs.batch() == 0 {
        return Err(ModelError::Input("empty batch: no timesteps given".into()));
    }
    match (cfg.arch, pixart) {
        (Arch::Dit, _) => {
            if inputs.class_labels.len() != inputs.batch() {
                return Err(ModelError::Input(format!(
                    "{} class labels for a batch of {}",
                    inputs.class_labels.len(),
                    inputs.batch()
                )));
            }
            Ok(Conditioning::Dit {
                t_features: dev.import(timestep_features(&inputs.timesteps, 1.0)?)?,
                labels: inputs.class_labels.clone(),
            })
        }
        (Arch::PixArt, Some(p)) => p.forward(dev, inputs, cfg),
        (Arch::PixArt, None) => Err(ModelError::Input("PixArt embedders not loaded".into())),
        (Arch::Sd3 | Arch::Flux, _) => Err(ModelError::Input(
            "MMDiT conditioning comes from the model slice".into(),
        )),
    }
}
