//! `VaeConfig`: the decoder half of a diffusers `AutoencoderKL` `config.json`.
//! Reference: diffusers 0.42.1 `models/autoencoders/autoencoder_kl.py::AutoencoderKL.__init__`.

use std::path::Path;

use serde_json::Value;

use crate::error::{read_json, ModelError, Result};
use crate::fields::Fields;

/// Shapes and constants of an `AutoencoderKL` decoder.
///
/// Read from `config.json`: `block_out_channels`, `layers_per_block`, `latent_channels`,
/// `out_channels` and `norm_num_groups` are required (they set every weight's shape; diffusers
/// would silently build its class default, a 64-channel toy, and then fail on the weights).
/// `scaling_factor` (default 0.18215), `shift_factor` (default none), `use_post_quant_conv`
/// (default true) and `mid_block_add_attention` (default true) take diffusers' class defaults
/// when absent or `null`, as old hub configs (e.g. `stabilityai/sd-vae-ft-ema`) omit some of
/// them. `act_fn` must be `silu` and every `up_block_types` entry `UpDecoderBlock2D` when given;
/// the encoder's fields, `force_upcast`, `sample_size` and `latents_mean` / `latents_std` (not
/// used by the DiT / PixArt pipelines) are ignored.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    /// Channels per resolution level, finest first (SD: `[128, 256, 512, 512]`); the decoder
    /// runs them in reverse and upsamples between levels.
    pub block_out_channels: Vec<usize>,
    /// ResNet blocks per encoder level; each decoder up block has one more.
    pub layers_per_block: usize,
    /// Latent channels (4 for SD / DiT / PixArt-alpha).
    pub latent_channels: usize,
    /// Image channels out (3).
    pub out_channels: usize,
    /// Groups of every GroupNorm.
    pub norm_num_groups: usize,
    /// Latent scale: the sampler's latents are `scaling_factor * (vae latents - shift)`.
    pub scaling_factor: f64,
    /// Latent shift (SD3 / Flux VAEs; `None` for SD-VAE).
    pub shift_factor: Option<f64>,
    /// Whether a 1x1 `post_quant_conv` precedes the decoder.
    pub use_post_quant_conv: bool,
    /// Whether the mid block has its self-attention.
    pub mid_block_add_attention: bool,
}

const REQUIRED: &str = "required: it sets the decoder's weight shapes";

impl VaeConfig {
    /// The SD-VAE used by DiT and PixArt-alpha (`stabilityai/sd-vae-ft-ema` / `-mse`): channels
    /// `[128, 256, 512, 512]`, 2 layers per block, 32 groups, upscale factor 8.
    pub fn sd_vae() -> VaeConfig {
        VaeConfig {
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            out_channels: 3,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }

    /// Image pixels per latent pixel along each side: `2^(len(block_out_channels) - 1)`, as
    /// diffusers computes it (8 for SD-VAE).
    pub fn upscale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<VaeConfig> {
        let path = dir.join("config.json");
        Self::from_json(&read_json(&path)?, &path)
    }

    /// Parses an `AutoencoderKL` config; `path` is only used in error messages.
    pub fn from_json(v: &Value, path: &Path) -> Result<VaeConfig> {
        let field = Fields { v, path };
        let class = field.str("_class_name", "AutoencoderKL")?;
        if class != "AutoencoderKL" {
            return Err(ModelError::config(
                path,
                "_class_name",
                format!(
                    "`{class}` is not a VAE; expected AutoencoderKL (the pipeline's vae/ folder)"
                ),
            ));
        }
        let act = field.str("act_fn", "silu")?;
        if act != "silu" {
            return Err(ModelError::config(
                path,
                "act_fn",
                format!("`{act}` is not supported (only silu)"),
            ));
        }
        for k in [
            "block_out_channels",
            "layers_per_block",
            "latent_channels",
            "out_channels",
            "norm_num_groups",
        ] {
            field.require(k, REQUIRED)?;
        }
        let cfg = VaeConfig {
            block_out_channels: field
                .opt_usize_list("block_out_channels")?
                .unwrap_or_default(),
            layers_per_block: field.usize("layers_per_block", 0)?,
            latent_channels: field.usize("latent_channels", 0)?,
            out_channels: field.usize("out_channels", 0)?,
            norm_num_groups: field.usize("norm_num_groups", 0)?,
            scaling_factor: field.f64("scaling_factor", 0.18215)?,
            shift_factor: field.opt_f64("shift_factor")?,
            use_post_quant_conv: field.bool("use_post_quant_conv", true)?,
            mid_block_add_attention: field.bool("mid_block_add_attention", true)?,
        };
        if let Some(types) = field.opt_str_list("up_block_types")? {
            if let Some(t) = types.iter().find(|t| *t != "UpDecoderBlock2D") {
                return Err(ModelError::config(
                    path,
                    "up_block_types",
                    format!("`{t}` is not supported (only UpDecoderBlock2D)"),
                ));
            }
            if types.len() != cfg.block_out_channels.len() {
                return Err(ModelError::config(
                    path,
                    "up_block_types",
                    format!(
                        "{} entries, but block_out_channels has {}",
                        types.len(),
                        cfg.block_out_channels.len()
                    ),
                ));
            }
        }
        cfg.validate()
            .map_err(|(f, m)| ModelError::config(path, f, m))?;
        Ok(cfg)
    }

    /// Checks what a folder's config cannot be trusted with; `(field, why)` on failure.
    pub(crate) fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        let boc = &self.block_out_channels;
        if boc.is_empty() || boc.contains(&0) {
            return Err((
                "block_out_channels",
                format!("needs at least one level, all >= 1; got {boc:?}"),
            ));
        }
        if self.norm_num_groups == 0 || boc.iter().any(|c| c % self.norm_num_groups != 0) {
            return Err((
                "norm_num_groups",
                format!(
                    "{} must divide every entry of block_out_channels {boc:?}",
                    self.norm_num_groups
                ),
            ));
        }
        if self.latent_channels == 0 {
            return Err(("latent_channels", "must be >= 1".into()));
        }
        if self.out_channels == 0 {
            return Err(("out_channels", "must be >= 1".into()));
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            return Err((
                "scaling_factor",
                format!("must be a positive number, got {}", self.scaling_factor),
            ));
        }
        if self.shift_factor.is_some_and(|s| !s.is_finite()) {
            return Err(("shift_factor", "must be a finite number or null".into()));
        }
        Ok(())
    }
}
