//! From final latents to images: through the model's `vae/` decoder for latent-space models, or
//! directly for pixel-space models (1 or 3 channels and no VAE), then to [0, 1] as diffusers'
//! image processor does (`x / 2 + 0.5`, clamped).

use anyhow::{bail, Context, Result};
use kernels::Tensor;

use actors::ModelSource;

/// Image pixels per latent element along each side: the VAE's upscaling
/// (2^(len(block_out_channels) - 1), 8 for Stable Diffusion's), 1 for a pixel-space model
/// (1 or 3 channels, no vae/), and 8 for a latent model without a VAE folder (a bare transformer
/// folder or a preset: its latents are sized as if SD's VAE were there).
pub(crate) fn pixel_factor(model: &ModelSource) -> Result<usize> {
    if let Some(vae) = &model.vae_dir {
        let path = vae.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
        let n = v
            .get("block_out_channels")
            .and_then(|b| b.as_array())
            .map(|b| b.len())
            .with_context(|| {
                format!(
                    "{}: field `block_out_channels` missing or not a list",
                    path.display()
                )
            })?;
        if n == 0 {
            bail!("{}: `block_out_channels` is empty", path.display());
        }
        return Ok(1 << (n - 1));
    }
    Ok(if is_pixel_space(model) { 1 } else { 8 })
}

fn is_pixel_space(model: &ModelSource) -> bool {
    model.vae_dir.is_none() && matches!(model.config.in_channels, 1 | 3)
}

/// Images `[B, C, H, W]` in [0, 1] from final latents `[B, C_latent, h, w]`.
pub(crate) fn to_images(model: &ModelSource, latent: &Tensor) -> Result<Tensor> {
    let x = if let Some(_vae) = &model.vae_dir {
        bail!("decoding through vae/ is not wired in yet");
    } else if is_pixel_space(model) {
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
