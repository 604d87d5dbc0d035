//! Flux.1 (`FluxTransformer2DModel`), whole-model forward on one device, over packed tokens as
//! diffusers' transformer takes them, plus the pipeline's packing of latents into tokens.
//! Reference: diffusers 0.42.1 `transformer_flux.py` (`FluxTransformer2DModel.forward`),
//! `embeddings.py` (`CombinedTimestepTextProjEmbeddings`,
//! `CombinedTimestepGuidanceTextProjEmbeddings`), `pipeline_flux.py` (`_pack_latents`,
//! `_unpack_latents`, `_prepare_latent_image_ids`).

use std::path::Path;

use kernels::{Device, Tensor};

use crate::dit::on_device;
use crate::embedding::Linear;
use crate::error::{ModelError, Result};
use crate::weights::{RandomWeights, SafetensorsDir, WeightSource};

use super::flux_blocks::{rope_tables, DoubleBlock, SingleBlock};
use super::flux_config::FluxConfig;
use super::shared::{OutputHead, TimeTextEmbed};

/// What one forward takes besides the packed image tokens.
#[derive(Debug, Clone)]
pub struct FluxInputs {
    /// One timestep per image as the scheduler gives it (sigma in `[0, 1]`; the model multiplies
    /// by 1000, as diffusers' does).
    pub timesteps: Vec<f32>,
    /// Flux.1-dev: the embedded guidance scale per image (also times 1000 inside); `None` for
    /// models without a guidance embedding.
    pub guidance: Option<Vec<f32>>,
    /// Prompt embeddings `[B, T, joint_attention_dim]` (T5).
    pub prompt_embeds: Tensor,
    /// Pooled text embeddings `[B, pooled_projection_dim]` (CLIP).
    pub pooled: Tensor,
    /// Position of every prompt token (`[index, row, column]`; zeros in the pipelines).
    pub txt_ids: Vec<[f32; 3]>,
    /// Position of every image token (see [`image_ids`]).
    pub img_ids: Vec<[f32; 3]>,
}

/// A Flux.1 transformer (all blocks).
pub struct FluxTransformer {
    cfg: FluxConfig,
    device: Device,
    x_embedder: Linear,
    time_text: TimeTextEmbed,
    context_embedder: Linear,
    double: Vec<DoubleBlock>,
    single: Vec<SingleBlock>,
    head: OutputHead,
}

impl std::fmt::Debug for FluxTransformer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "FluxTransformer({} double + {} single blocks, d {}, on {})",
            self.double.len(),
            self.single.len(),
            self.cfg.hidden(),
            self.device.name()
        )
    }
}

/// Which block a traced forward reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FluxBlock {
    /// Double-stream block `i`.
    Double(usize),
    /// Single-stream block `i`.
    Single(usize),
}

impl FluxTransformer {
    /// Loads the diffusers model in `dir` (`config.json` + safetensors).
    pub fn load(dir: &Path, device: Device) -> Result<FluxTransformer> {
        let cfg = FluxConfig::from_dir(dir)?;
        let src = SafetensorsDir::open(dir)?;
        src.check_block_counts(&dir.join("config.json"), &cfg.block_families())?;
        Self::from_source(cfg, &src, device)
    }

    /// Random weights (std 0.02), deterministic in `seed`.
    pub fn random(cfg: FluxConfig, seed: u64, device: Device) -> Result<FluxTransformer> {
        Self::from_source(cfg, &RandomWeights { seed, std: 0.02 }, device)
    }

    /// Builds the model from any weight source.
    pub fn from_source(cfg: FluxConfig, src: &dyn WeightSource, device: Device) -> Result<Self> {
        let d = cfg.hidden();
        // On a GPU the weights go there as they are read, in its compute dtype.
        let placed = crate::weights::placed(src, &device);
        let src = placed.source();
        let lin = |name: &str, out, inp| Linear::load(src, name, out, inp);
        Ok(FluxTransformer {
            x_embedder: lin("x_embedder", d, cfg.in_channels)?,
            time_text: TimeTextEmbed::load(src, d, cfg.pooled_projection_dim, cfg.guidance_embeds)?,
            context_embedder: lin("context_embedder", d, cfg.joint_attention_dim)?,
            double: (0..cfg.num_layers)
                .map(|i| DoubleBlock::load(src, i, &cfg))
                .collect::<Result<_>>()?,
            single: (0..cfg.num_single_layers)
                .map(|i| SingleBlock::load(src, i, &cfg))
                .collect::<Result<_>>()?,
            head: OutputHead::load(src, d, cfg.patch_size * cfg.patch_size * cfg.out_channels)?,
            cfg,
            device,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &FluxConfig {
        &self.cfg
    }

    /// Packed image tokens `[B, S, in_channels]` -> output tokens `[B, S, out_channels]`.
    pub fn forward(&self, tokens: &Tensor, inputs: &FluxInputs) -> Result<Tensor> {
        self.forward_traced(tokens, inputs, &mut |_, _| {})
    }

    /// [`forward`](Self::forward), handing the image tokens `[B, S, d]` after each block to
    /// `after_block` (golden tests of the intermediates).
    pub fn forward_traced(
        &self,
        tokens: &Tensor,
        inputs: &FluxInputs,
        after_block: &mut (dyn FnMut(FluxBlock, &Tensor) + Send),
    ) -> Result<Tensor> {
        let (cfg, dev) = (&self.cfg, &self.device);
        self.check(tokens, inputs)?;
        let (b, s, t) = (tokens.dim(0), tokens.dim(1), inputs.prompt_embeds.dim(1));
        let ids: Vec<[f32; 3]> = inputs
            .txt_ids
            .iter()
            .chain(&inputs.img_ids)
            .copied()
            .collect();
        let (cos, sin) = rope_tables(&ids, &cfg.axes_dims_rope, 10_000.0)?; // [T + S, head_dim]
        let rope = (dev.import_f32(cos)?, dev.import_f32(sin)?);
        let scaled = |v: &[f32]| v.iter().map(|x| x * 1000.0).collect::<Vec<f32>>();
        dev.install(|| {
            let x = self.x_embedder.forward(dev, &*on_device(dev, tokens)?)?; // [B, S, d]
                                                                              // The timesteps (and guidance scales) enter times 1000, as in diffusers.
            let guidance = inputs.guidance.as_deref().map(scaled);
            let temb = self.time_text.forward(
                dev,
                &scaled(&inputs.timesteps),
                guidance.as_deref(),
                &inputs.pooled,
            )?; // [B, d]
            let temb_silu = dev.silu(&temb)?;
            let pe = on_device(dev, &inputs.prompt_embeds)?;
            let mut ctx = self.context_embedder.forward(dev, &pe)?; // [B, T, d]
            let mut x = x;
            for (i, block) in self.double.iter().enumerate() {
                let _span = tracing::trace_span!("double block", i).entered();
                block.forward(dev, &mut x, &mut ctx, &temb_silu, &rope, cfg, None)?;
                after_block(FluxBlock::Double(i), &x);
            }
            let mut z = Tensor::cat(&[&ctx, &x], 1)?; // [B, T + S, d]
            for (i, block) in self.single.iter().enumerate() {
                let _span = tracing::trace_span!("single block", i).entered();
                block.forward(dev, &mut z, t, &temb_silu, &rope, cfg, None)?;
                after_block(FluxBlock::Single(i), &z.narrow(1, t, s)?);
            }
            let x = z.narrow(1, t, s)?;
            let out = self.head.forward(dev, &x, &temb_silu)?;
            debug_assert_eq!(out.shape(), [b, s, cfg.out_channels]);
            Ok(out)
        })
    }

    /// Shapes of the inputs against the config, naming what is wrong.
    fn check(&self, tokens: &Tensor, inputs: &FluxInputs) -> Result<()> {
        let cfg = &self.cfg;
        let [b, s, c] = tokens.shape() else {
            return Err(ModelError::Input(format!(
                "packed tokens must be [B, S, C], got {:?}",
                tokens.shape()
            )));
        };
        let (b, s) = (*b, *s);
        let pe = &inputs.prompt_embeds;
        let guidance_ok = match (cfg.guidance_embeds, &inputs.guidance) {
            (true, Some(g)) => g.len() == b,
            (false, None) => true,
            _ => false,
        };
        let ok = *c == cfg.in_channels
            && inputs.timesteps.len() == b
            && pe.shape().len() == 3
            && pe.dim(0) == b
            && pe.dim(2) == cfg.joint_attention_dim
            && inputs.pooled.shape() == [b, cfg.pooled_projection_dim]
            && inputs.txt_ids.len() == pe.dim(1)
            && inputs.img_ids.len() == s
            && guidance_ok;
        if !ok {
            return Err(ModelError::Input(format!(
                "for {b} images of {s} packed tokens: tokens {:?} (want [{b}, {s}, {}]), timesteps {}, \
                 guidance {} (the model {} one), prompt_embeds {:?} (want [{b}, T, {}]), pooled {:?} \
                 (want [{b}, {}]), txt_ids {} (want T), img_ids {} (want {s})",
                tokens.shape(),
                cfg.in_channels,
                inputs.timesteps.len(),
                inputs.guidance.as_ref().map_or("none".into(), |g| g.len().to_string()),
                if cfg.guidance_embeds { "needs" } else { "takes no" },
                pe.shape(),
                cfg.joint_attention_dim,
                inputs.pooled.shape(),
                cfg.pooled_projection_dim,
                inputs.txt_ids.len(),
                inputs.img_ids.len()
            )));
        }
        Ok(())
    }
}

/// Flux's tokens of a latent `[B, C, H, W]`: each 2x2 block becomes one `[4C]` token (channels
/// ordered c, dy, dx), row-major over the `H/2 x W/2` grid -> `[B, (H/2)(W/2), 4C]`.
pub fn pack_latents(dev: &Device, latent: &Tensor) -> Result<Tensor> {
    let &[_, _, h, w] = latent.shape() else {
        return Err(ModelError::Input(format!(
            "latent must be [B, C, H, W], got {:?}",
            latent.shape()
        )));
    };
    if h % 2 != 0 || w % 2 != 0 || h == 0 || w == 0 {
        return Err(ModelError::Input(format!(
            "latent {:?}: Flux packs 2x2 blocks, height and width must be even",
            latent.shape()
        )));
    }
    Ok(dev.patchify(latent, 2, 0..h / 2)?)
}

/// The inverse of [`pack_latents`]: tokens `[B, (H/2)(W/2), 4C]` -> `[B, C, H, W]`.
pub fn unpack_latents(tokens: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    let &[b, s, c4] = tokens.shape() else {
        return Err(ModelError::Input(format!(
            "tokens must be [B, S, 4C], got {:?}",
            tokens.shape()
        )));
    };
    let (rows, cols) = (height / 2, width / 2);
    #[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; the MSRV is 1.85
    if s != rows * cols || c4 % 4 != 0 || height % 2 != 0 || width % 2 != 0 {
        return Err(ModelError::Input(format!(
            "{s} tokens of {c4} channels do not unpack to a {height} x {width} latent"
        )));
    }
    let c = c4 / 4;
    // A layout op on the host, like unpatchify (the sampler's latent is host f32).
    let src = &tokens.to_vec_f32()?;
    let mut out = vec![0f32; b * c * height * width];
    for bi in 0..b {
        for (tok, chunk) in src[bi * s * c4..(bi + 1) * s * c4].chunks(c4).enumerate() {
            let (r, q) = (tok / cols, tok % cols);
            for ch in 0..c {
                for dy in 0..2 {
                    for dx in 0..2 {
                        let y = ((bi * c + ch) * height + 2 * r + dy) * width + 2 * q + dx;
                        out[y] = chunk[ch * 4 + dy * 2 + dx];
                    }
                }
            }
        }
    }
    Ok(Tensor::from_vec(out, &[b, c, height, width])?)
}

/// The pipelines' image token positions: `[0, row, column]` for each of `rows x cols` packed
/// tokens, row-major.
pub fn image_ids(rows: usize, cols: usize) -> Vec<[f32; 3]> {
    (0..rows * cols)
        .map(|i| [0.0, (i / cols) as f32, (i % cols) as f32])
        .collect()
}
