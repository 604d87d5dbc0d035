//! From final latents to images: through the model's `vae/` decoder for latent-space models, or
//! directly for pixel-space models (1 or 3 channels and no VAE), then to [0, 1] as diffusers'
//! image processor does (`x / 2 + 0.5`, clamped).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use kernels::{Device, Tensor};
use model::{to_unit_range, VaeConfig, VaeDecoder};

use actors::ModelSource;

/// Image pixels per latent element along each side: the VAE's upscaling
/// (2^(len(block_out_channels) - 1), 8 for Stable Diffusion's), 1 for a pixel-space model
/// (1 or 3 channels, no vae/), and 8 for a latent model without a VAE folder (a bare transformer
/// folder or a preset: its latents are sized as if SD's VAE were there).
pub(crate) fn pixel_factor(model: &ModelSource) -> Result<usize> {
    if let Some(vae) = &model.vae_dir {
        return Ok(VaeConfig::from_dir(vae)?.upscale_factor());
    }
    Ok(if is_pixel_space(model) { 1 } else { 8 })
}

fn is_pixel_space(model: &ModelSource) -> bool {
    model.vae_dir.is_none() && matches!(model.config.in_channels, 1 | 3)
}

/// Errors unless the model's final latents can become images (a `vae/`, or pixel space).
pub(crate) fn check_decodable(model: &ModelSource) -> Result<()> {
    if model.vae_dir.is_none() && !is_pixel_space(model) {
        bail!(
            "--out: the model's latents have {} channels and its folder has no vae/ to decode them; use --save-latent",
            model.config.in_channels
        );
    }
    Ok(())
}

/// Images `[B, C, H, W]` in [0, 1] from final latents `[B, C_latent, h, w]`.
/// The VAE runs on one CPU device with `threads` threads.
pub(crate) fn to_images(model: &ModelSource, latent: &Tensor, threads: usize) -> Result<Tensor> {
    if let Some(dir) = &model.vae_dir {
        let t = Instant::now();
        let vae = VaeDecoder::load(dir, Device::cpu(threads)?)
            .with_context(|| format!("loading the VAE decoder from {}", dir.display()))?;
        let image = vae.decode(latent)?; // [B, out_channels, f*h, f*w]
        tracing::info!(secs = t.elapsed().as_secs_f32(), shape = ?image.shape(), "decoded through the VAE");
        return Ok(to_unit_range(&image)?);
    }
    let x = if is_pixel_space(model) {
        latent.clone()
    } else {
        bail!(
            "the model's latents have {} channels and its folder has no vae/ to decode them; use --save-latent",
            model.config.in_channels
        );
    };
    let mut x = x;
    x.as_f32_mut()?
        .iter_mut()
        .for_each(|v| *v = (*v / 2.0 + 0.5).clamp(0.0, 1.0));
    Ok(x)
}
