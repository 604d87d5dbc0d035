//! MMDiT models, whole-model forward on one device: Stable Diffusion 3 / 3.5
//! (`SD3Transformer2DModel`: [`Sd3Transformer`], joint blocks in `block.rs`) and Flux.1
//! (`FluxTransformer2DModel`: [`FluxTransformer`], double- and single-stream blocks with rotary
//! positions in `flux_blocks.rs`). Image tokens and prompt tokens keep separate weights but attend
//! jointly; the conditioning is the timestep (and for Flux.1-dev the guidance) embedding plus the
//! pooled text embedding.
//!
//! The runtime runs them through [`crate::Transformer`] (slices of blocks over parts of the
//! image with the prompt tokens: `slice.rs`); `family.rs` states them in the runtime's
//! [`crate::ModelConfig`].
//!
//! Reference: diffusers 0.42.1 `transformer_sd3.py` (`SD3Transformer2DModel.forward`),
//! `embeddings.py` (`PatchEmbed` with `pos_embed_max_size`, `CombinedTimestepTextProjEmbeddings`).

mod block;
mod config;
mod family;
mod flux;
mod flux_blocks;
mod flux_config;
mod shared;
mod slice;

pub use config::Sd3Config;
pub(crate) use family::preset;
pub use family::MmditConfig;
pub use flux::{image_ids, pack_latents, unpack_latents, FluxBlock, FluxInputs, FluxTransformer};
pub use flux_config::FluxConfig;
pub(crate) use slice::{MmditSlice, PartMode};

use std::path::Path;

use kernels::{Device, Tensor};

use crate::embedding::{pos_embed_2d_window, Linear, PatchEmbed};
use crate::error::{ModelError, Result};
use crate::weights::{RandomWeights, SafetensorsDir, WeightSource};
use block::JointBlock;
use shared::{OutputHead, TimeTextEmbed};

/// An SD3 / SD3.5 transformer (all blocks).
pub struct Sd3Transformer {
    cfg: Sd3Config,
    device: Device,
    patch_embed: PatchEmbed,
    time_text: TimeTextEmbed,
    context_embedder: Linear,
    blocks: Vec<JointBlock>,
    head: OutputHead,
}

impl std::fmt::Debug for Sd3Transformer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Sd3Transformer({} blocks, d {}, on {})",
            self.blocks.len(),
            self.cfg.hidden(),
            self.device.name()
        )
    }
}

/// What one forward takes besides the latent.
#[derive(Debug, Clone)]
pub struct Sd3Inputs {
    /// One timestep per latent (flow matching: sigma x 1000).
    pub timesteps: Vec<f32>,
    /// Prompt embeddings `[B, T, joint_attention_dim]` (diffusers' `prompt_embeds`).
    pub prompt_embeds: Tensor,
    /// Pooled text embeddings `[B, pooled_projection_dim]` (`pooled_prompt_embeds`).
    pub pooled: Tensor,
}

impl Sd3Transformer {
    /// Loads the diffusers model in `dir` (`config.json` + safetensors).
    pub fn load(dir: &Path, device: Device) -> Result<Sd3Transformer> {
        let cfg = Sd3Config::from_dir(dir)?;
        let src = SafetensorsDir::open(dir)?;
        src.check_block_counts(&dir.join("config.json"), &cfg.block_families())?;
        Self::from_source(cfg, &src, device)
    }

    /// Random weights (std 0.02), deterministic in `seed`.
    pub fn random(cfg: Sd3Config, seed: u64, device: Device) -> Result<Sd3Transformer> {
        Self::from_source(cfg, &RandomWeights { seed, std: 0.02 }, device)
    }

    /// Builds the model from any weight source.
    pub fn from_source(
        cfg: Sd3Config,
        src: &dyn WeightSource,
        device: Device,
    ) -> Result<Sd3Transformer> {
        let d = cfg.hidden();
        // On a GPU the weights go there as they are read, in its compute dtype.
        let placed = crate::weights::placed(src, &device);
        let src = placed.source();
        let lin = |name: &str, out, inp| Linear::load(src, name, out, inp);
        let blocks = (0..cfg.num_layers)
            .map(|i| JointBlock::load(src, i, &cfg))
            .collect::<Result<Vec<_>>>()?;
        let out = cfg.patch_size * cfg.patch_size * cfg.out_channels;
        Ok(Sd3Transformer {
            patch_embed: PatchEmbed::load(src, d, cfg.in_channels, cfg.patch_size)?,
            time_text: TimeTextEmbed::load(src, d, cfg.pooled_projection_dim, false)?,
            context_embedder: lin("context_embedder", d, cfg.joint_attention_dim)?,
            blocks,
            head: OutputHead::load(src, d, out)?,
            cfg,
            device,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Sd3Config {
        &self.cfg
    }

    /// The position embedding of an `rows x cols` token grid `[rows * cols, d]`: the centre crop
    /// of the `max x max` table (base grid `sample_size / patch`).
    fn pos_embed(&self, rows: usize, cols: usize) -> Result<Tensor> {
        let (max, p) = (self.cfg.pos_embed_max_size, self.cfg.patch_size);
        if rows > max || cols > max {
            return Err(ModelError::Input(format!(
                "a {rows} x {cols} token grid exceeds the position table's {max} x {max} \
                 (pos_embed_max_size): the latent is too large for this model"
            )));
        }
        let (d, base) = (self.cfg.hidden(), self.cfg.sample_size / p);
        let (top, left) = ((max - rows) / 2, (max - cols) / 2);
        let out = pos_embed_2d_window(d, (max, max), base, 1.0, top..top + rows, left..left + cols);
        Ok(self
            .device
            .import(Tensor::from_vec(out, &[rows * cols, d])?)?)
    }

    /// `latent [B, C, H, W]` -> the predicted velocity `[B, out_channels, H, W]`.
    pub fn forward(&self, latent: &Tensor, inputs: &Sd3Inputs) -> Result<Tensor> {
        self.forward_traced(latent, inputs, &mut |_, _| {})
    }

    /// [`forward`](Self::forward), handing the image tokens `[B, n, d]` after each block to
    /// `after_block(i, tokens)` (golden tests of the intermediates).
    pub fn forward_traced(
        &self,
        latent: &Tensor,
        inputs: &Sd3Inputs,
        after_block: &mut (dyn FnMut(usize, &Tensor) + Send),
    ) -> Result<Tensor> {
        let (cfg, dev) = (&self.cfg, &self.device);
        let &[b, c, h, w] = latent.shape() else {
            return Err(ModelError::Input(format!(
                "latent must be [B, C, H, W], got {:?}",
                latent.shape()
            )));
        };
        let p = cfg.patch_size;
        if c != cfg.in_channels || h % p != 0 || w % p != 0 || h == 0 || w == 0 {
            return Err(ModelError::Input(format!(
                "latent {:?} must have {} channels and a size divisible by the patch size {p}",
                latent.shape(),
                cfg.in_channels
            )));
        }
        let pe = &inputs.prompt_embeds;
        if inputs.timesteps.len() != b
            || pe.shape().len() != 3
            || pe.dim(0) != b
            || pe.dim(2) != cfg.joint_attention_dim
            || inputs.pooled.shape() != [b, cfg.pooled_projection_dim]
        {
            return Err(ModelError::Input(format!(
                "for a batch of {b}: timesteps {} (want {b}), prompt_embeds {:?} (want [{b}, T, {}]), \
                 pooled {:?} (want [{b}, {}])",
                inputs.timesteps.len(),
                pe.shape(),
                cfg.joint_attention_dim,
                inputs.pooled.shape(),
                cfg.pooled_projection_dim
            )));
        }
        let (rows, cols) = (h / p, w / p);
        let pos = self.pos_embed(rows, cols)?;
        dev.install(|| {
            let mut x = self.patch_embed.forward(dev, latent)?; // [B, n, d]
            dev.add_broadcast_(&mut x, &pos)?;
            let temb = self
                .time_text
                .forward(dev, &inputs.timesteps, None, &inputs.pooled)?; // [B, d]
            let temb_silu = dev.silu(&temb)?;
            let pe = crate::dit::on_device(dev, pe)?;
            let mut ctx = self.context_embedder.forward(dev, &pe)?; // [B, T, d]
            for (i, block) in self.blocks.iter().enumerate() {
                let _span = tracing::trace_span!("joint block", i).entered();
                block.forward(dev, &mut x, &mut ctx, &temb_silu, cfg, None)?;
                after_block(i, &x);
            }
            let tok = self.head.forward(dev, &x, &temb_silu)?; // [B, n, p*p*C_out]
            Ok(dev.unpatchify(&tok, cfg.out_channels, rows, w, p)?)
        })
    }
}
