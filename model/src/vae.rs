//! The VAE decoder of diffusers' `AutoencoderKL`: latents to images, on the CPU in f32.
//! Reference: diffusers 0.42.1 `models/autoencoders/autoencoder_kl.py::AutoencoderKL._decode`
//! (`post_quant_conv`, then `decoder`) and `models/autoencoders/vae.py::Decoder.forward`
//! (`conv_in`, `mid_block`, `up_blocks`, `conv_norm_out` + SiLU, `conv_out`); the layers are in
//! `vae/blocks.rs`, the config in `vae/config.rs`.
//!
//! Only `decoder.*` and `post_quant_conv.*` tensors are read from the folder's safetensors; the
//! encoder's weights are never touched.

mod blocks;
mod config;

use std::path::Path;

use kernels::{Device, Tensor};

pub use config::VaeConfig;

use crate::error::{ModelError, Result};
use crate::weights::{RandomWeights, SafetensorsDir, WeightSource};
use blocks::{Conv2d, GroupNorm, MidBlock, UpBlock};

/// An `AutoencoderKL` decoder.
///
/// [`VaeDecoder::decode`] takes the **sampler's latents** (what the DiT / PixArt denoising loop
/// ends with) and does the un-scaling itself: it first computes
/// `z = latents / scaling_factor` (`+ shift_factor` when the config has one), exactly what
/// diffusers' pipelines do before calling the VAE (`DiTPipeline`:
/// `latents = 1 / self.vae.config.scaling_factor * latents`, PixArt:
/// `self.vae.decode(latents / self.vae.config.scaling_factor)`), then returns
/// `vae.decode(z).sample`: the image in about `[-1, 1]`. Do **not** divide by the scaling factor
/// before calling it. [`to_unit_range`] is the pipelines' last step,
/// `(image / 2 + 0.5).clamp(0, 1)`.
pub struct VaeDecoder {
    cfg: VaeConfig,
    device: Device,
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid: MidBlock,
    up_blocks: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl std::fmt::Debug for VaeDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VaeDecoder(channels {:?}, x{}, on {})",
            self.cfg.block_out_channels,
            self.cfg.upscale_factor(),
            self.device.name()
        )
    }
}

impl VaeDecoder {
    /// Loads the decoder of a diffusers `vae/` folder (`config.json` +
    /// `diffusion_pytorch_model.safetensors`, single or sharded).
    pub fn load(dir: &Path, device: Device) -> Result<VaeDecoder> {
        let cfg = VaeConfig::from_dir(dir)?;
        let src = SafetensorsDir::open(dir)?;
        Self::from_source(cfg, &src, device)
    }

    /// Random weights (std 0.02), deterministic in `seed`: for benchmarks.
    pub fn random(cfg: VaeConfig, seed: u64, device: Device) -> Result<VaeDecoder> {
        Self::from_source(cfg, &RandomWeights { seed, std: 0.02 }, device)
    }

    /// Builds the decoder from any weight source, asking only for `decoder.*` and
    /// `post_quant_conv.*` (diffusers' names; the mid-block attention also under its legacy
    /// names `query` / `key` / `value` / `proj_attn`).
    pub fn from_source(cfg: VaeConfig, src: &dyn WeightSource, device: Device) -> Result<Self> {
        cfg.validate()
            .map_err(|(field, msg)| ModelError::Input(format!("VaeConfig `{field}`: {msg}")))?;
        let _span = tracing::info_span!("load_vae", channels = ?cfg.block_out_channels).entered();
        // On a GPU the weights go to it as they are read, in its compute dtype.
        let placed = crate::weights::placed(src, &device);
        let src = placed.source();
        let (groups, lc) = (cfg.norm_num_groups, cfg.latent_channels);
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let post_quant_conv = cfg
            .use_post_quant_conv
            .then(|| Conv2d::load(src, "post_quant_conv", lc, lc, 1))
            .transpose()?;
        let conv_in = Conv2d::load(src, "decoder.conv_in", rev[0], lc, 3)?;
        let mid = MidBlock::load(
            src,
            "decoder.mid_block",
            rev[0],
            groups,
            cfg.mid_block_add_attention,
        )?;
        let up_blocks = (0..rev.len())
            .map(|i| {
                let name = format!("decoder.up_blocks.{i}");
                let inp = rev[i.saturating_sub(1)];
                let last = i + 1 == rev.len();
                UpBlock::load(
                    src,
                    &name,
                    inp,
                    rev[i],
                    cfg.layers_per_block + 1,
                    groups,
                    !last,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let c0 = cfg.block_out_channels[0];
        let norm_out = GroupNorm::load(src, "decoder.conv_norm_out", c0, groups)?;
        let conv_out = Conv2d::load(src, "decoder.conv_out", cfg.out_channels, c0, 3)?;
        tracing::debug!(up_blocks = up_blocks.len(), "vae decoder loaded");
        Ok(VaeDecoder {
            cfg,
            device,
            post_quant_conv,
            conv_in,
            mid,
            up_blocks,
            norm_out,
            conv_out,
        })
    }

    /// The config.
    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// The device the decoder runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Sampler latents `[B, latent_channels, h, w]` -> image `[B, out_channels, f*h, f*w]`
    /// (`f` = [`VaeConfig::upscale_factor`], 8 for SD-VAE), in about `[-1, 1]`. Un-scales the
    /// latents first (see the type doc). A latent of the wrong shape is an error.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.decode_inspect(latents, |_, _| {})
    }

    /// [`VaeDecoder::decode`], calling `inspect(stage, tensor)` after each stage, named as in
    /// diffusers' module tree: `decode_input` (the un-scaled latents), `post_quant_conv`,
    /// `conv_in`, `mid_block`, `up_blocks.{i}` (for golden tests and debugging).
    pub fn decode_inspect(
        &self,
        latents: &Tensor,
        mut inspect: impl FnMut(&str, &Tensor),
    ) -> Result<Tensor> {
        let dev = &self.device;
        let lc = self.cfg.latent_channels;
        let &[b, c, h, w] = latents.shape() else {
            return Err(ModelError::Input(format!(
                "VAE latents must be [B, {lc}, h, w], got {:?}",
                latents.shape()
            )));
        };
        if c != lc || b == 0 || h == 0 || w == 0 {
            return Err(ModelError::Input(format!(
                "VAE latents must be [B, {lc}, h, w] with B, h, w >= 1 (latent_channels {lc}), \
                 got {:?}",
                latents.shape()
            )));
        }
        let _span = tracing::debug_span!("vae_decode", b, h, w).entered();
        // The latents come from the host (the sampler's): un-scaled there, then brought over.
        let mut z = dev.import(self.unscale(latents)?)?; // [B, lc, h, w]
        inspect("decode_input", &z);
        if let Some(pq) = &self.post_quant_conv {
            z = pq.forward(dev, &z)?; // [B, lc, h, w]
            inspect("post_quant_conv", &z);
        }
        let mut x = self.conv_in.forward(dev, &z)?; // [B, C_last, h, w]
        inspect("conv_in", &x);
        x = self.mid.forward(dev, &x)?; // [B, C_last, h, w]
        inspect("mid_block", &x);
        for (i, up) in self.up_blocks.iter().enumerate() {
            x = up.forward(dev, &x)?; // [B, C_(n-1-i), h * 2^(i+1), ..] (last: no upsampling)
            inspect(&format!("up_blocks.{i}"), &x);
        }
        let x = self.norm_out.forward_silu(dev, &x)?; // [B, C_0, f*h, f*w]
        let image = self.conv_out.forward(dev, &x)?; // [B, out_channels, f*h, f*w]
                                                     // The image goes back to the host as f32 (PNG writing, the API's encoders).
        Ok(
            match image.is_host() && image.dtype() == kernels::DType::F32 {
                true => image,
                false => image.to_host()?.to_dtype(kernels::DType::F32)?,
            },
        )
    }

    /// `latents / scaling_factor (+ shift_factor)`, element-wise in f32 like torch.
    fn unscale(&self, latents: &Tensor) -> Result<Tensor> {
        let sf = self.cfg.scaling_factor as f32;
        let data = match self.cfg.shift_factor.map(|s| s as f32) {
            Some(shift) => latents.as_f32()?.iter().map(|v| v / sf + shift).collect(),
            None => latents.as_f32()?.iter().map(|v| v / sf).collect(),
        };
        Ok(Tensor::from_vec(data, latents.shape())?)
    }
}

/// The pipelines' post-processing of a decoded image: `(image / 2 + 0.5).clamp(0, 1)`, element
/// by element, any shape.
pub fn to_unit_range(image: &Tensor) -> Result<Tensor> {
    let data = image
        .as_f32()?
        .iter()
        .map(|v| (v / 2.0 + 0.5).clamp(0.0, 1.0))
        .collect();
    Ok(Tensor::from_vec(data, image.shape())?)
}
