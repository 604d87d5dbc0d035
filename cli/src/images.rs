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

/// Bytes the outputs of `batch` images of `h` x `w` pixels take after the request: the VAE
/// decode's largest activations (about five copies of the biggest level: input, residual, group
/// norm and convolution outputs, the upsampled map; its im2col buffer is bounded), the images in
/// [0, 1], and the PNG grid (`png_scale`: refused naming --png-scale when absurd). Saturating:
/// a figure near 2^64 is refused by the memory check anyway.
pub(crate) fn output_bytes(
    model: &ModelSource,
    batch: usize,
    (h, w): (usize, usize),
    png_scale: Option<usize>,
) -> Result<u64> {
    let u = |x: usize| x as u64;
    let pixels = u(batch).saturating_mul(u(h)).saturating_mul(u(w));
    let mut bytes = pixels.saturating_mul(3 * 4 * 2);
    if let Some(dir) = &model.vae_dir {
        let vae = VaeConfig::from_dir(dir)?;
        let f = u(vae.upscale_factor().max(1));
        let latent = pixels / f.saturating_mul(f);
        // Level i of the decoder runs at 4^i the latent's pixels with the reversed channels.
        let largest = vae
            .block_out_channels
            .iter()
            .rev()
            .enumerate()
            .map(|(i, &c)| {
                let scale = 1u64.checked_shl(2 * i as u32).unwrap_or(u64::MAX);
                latent.saturating_mul(scale).saturating_mul(u(c))
            })
            .max()
            .unwrap_or(0);
        // The upsampled map at the next level keeps the channels: counted by the 5 copies.
        bytes = bytes.saturating_add(largest.saturating_mul(4 * 4 * 5));
    }
    if let Some(scale) = png_scale {
        let (gw, gh) = crate::png_out::grid_size(batch, h, w, scale)?;
        bytes = bytes.saturating_add(u(gw as usize * gh as usize).saturating_mul(3 * 2));
    }
    Ok(bytes)
}
