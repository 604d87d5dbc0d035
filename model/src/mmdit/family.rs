//! The MMDiT models inside the runtime's [`ModelConfig`]: [`MmditConfig`] keeps the model's own
//! configuration, and the shared fields restate it in the runtime's terms, so that plans, patch
//! tables and request checks treat every family alike:
//!
//! - the latent is always the *unpacked* `[B, C, H, W]` (Flux's 2x2 packing happens inside the
//!   model), so Flux has `in_channels = 16` (its packed 64 / 4) and a patch size of 2 (one token
//!   row = two latent rows);
//! - `num_layers` counts every block a pipeline stage can own: SD3's joint blocks; Flux's
//!   double-stream blocks followed by its single-stream blocks (`19 + 38 = 57` for Flux.1);
//! - `caption_channels` is the prompt embeddings' width (`joint_attention_dim`).

use crate::config::{Arch, ModelConfig};

use super::{FluxConfig, Sd3Config};

/// An MMDiT model's own configuration.
#[derive(Debug, Clone, PartialEq)]
pub enum MmditConfig {
    /// Stable Diffusion 3 / 3.5.
    Sd3(Sd3Config),
    /// Flux.1.
    Flux(FluxConfig),
}

impl ModelConfig {
    /// The runtime's view of an SD3 / SD3.5 transformer.
    pub fn from_sd3(c: Sd3Config) -> ModelConfig {
        ModelConfig {
            in_channels: c.in_channels,
            out_channels: c.out_channels,
            patch_size: c.patch_size,
            sample_size: c.sample_size,
            num_layers: c.num_layers,
            ..mmdit_base(MmditConfig::Sd3(c))
        }
    }

    /// The runtime's view of a Flux.1 transformer (its packed channels must divide by 4).
    pub fn from_flux(c: FluxConfig) -> std::result::Result<ModelConfig, String> {
        #[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; the MSRV is 1.85
        if c.in_channels % 4 != 0 || c.out_channels % 4 != 0 {
            return Err(format!(
                "Flux tokens pack 2x2 latent pixels: in_channels {} and out_channels {} must \
                 divide by 4",
                c.in_channels, c.out_channels
            ));
        }
        Ok(ModelConfig {
            in_channels: c.in_channels / 4,
            out_channels: c.out_channels / 4,
            patch_size: 2,
            // FluxPipeline's default_sample_size: 1024 px images.
            sample_size: 128,
            num_layers: c.num_layers + c.num_single_layers,
            ..mmdit_base(MmditConfig::Flux(c))
        })
    }
}

/// The fields every MMDiT shares (the shape fields are overwritten by the caller).
fn mmdit_base(m: MmditConfig) -> ModelConfig {
    let (arch, heads, head_dim, prompt) = match &m {
        MmditConfig::Sd3(c) => (Arch::Sd3, c.num_heads, c.head_dim, c.joint_attention_dim),
        MmditConfig::Flux(c) => (Arch::Flux, c.num_heads, c.head_dim, c.joint_attention_dim),
    };
    ModelConfig {
        arch,
        in_channels: 0,
        out_channels: 0,
        patch_size: 0,
        sample_size: 0,
        num_layers: 0,
        num_heads: heads,
        head_dim,
        norm_eps: super::block::EPS,
        num_classes: 0,
        caption_channels: prompt,
        interpolation_scale: 1.0,
        use_additional_conditions: false,
        mmdit: Some(m),
    }
}

/// The MMDiT presets as runtime configs (`None` for an unknown name).
pub(crate) fn preset(name: &str) -> Option<ModelConfig> {
    if let Some(c) = Sd3Config::preset(name) {
        return Some(ModelConfig::from_sd3(c));
    }
    FluxConfig::preset(name).map(|c| ModelConfig::from_flux(c).expect("presets pack"))
}

impl MmditConfig {
    /// FLOPs of one forward (multiply-add = 2; norms, activations, biases, RoPE not counted):
    /// `batch` images of `tokens` image tokens and `text` prompt tokens. Per joint / double block
    /// `2 (n + T) d 12 d` linear + `4 (n + T)^2 d` attention (+ SD3.5's second image attention
    /// `2 n d 4 d + 4 n^2 d`); per Flux single block `2 (n + T) d 12 d + 4 (n + T)^2 d`; plus the
    /// per-block modulations, embeddings and head.
    pub fn forward_flops(&self, batch: usize, tokens: usize, text: usize) -> f64 {
        let (b, n, t) = (batch as f64, tokens as f64, text as f64);
        let joint = |d: f64| 2.0 * (n + t) * d * 12.0 * d + 4.0 * (n + t) * (n + t) * d;
        match self {
            MmditConfig::Sd3(c) => {
                let d = c.hidden() as f64;
                let p2 = (c.patch_size * c.patch_size) as f64;
                let dual = c.dual_attention_layers.len() as f64;
                let second = 2.0 * n * d * 4.0 * d + 4.0 * n * n * d;
                let modulation = 2.0 * d * 12.0 * d; // image 6d (or 9d) + prompt 6d
                b * (c.num_layers as f64 * (joint(d) + modulation)
                    + dual * (second + 2.0 * d * 3.0 * d)
                    + 2.0 * n * c.in_channels as f64 * p2 * d
                    + 2.0 * t * c.joint_attention_dim as f64 * d
                    + 2.0 * n * d * p2 * c.out_channels as f64)
            }
            MmditConfig::Flux(c) => {
                let d = c.hidden() as f64;
                let double = c.num_layers as f64 * (joint(d) + 2.0 * d * 12.0 * d);
                let single = c.num_single_layers as f64 * (joint(d) + 2.0 * d * 3.0 * d);
                b * (double
                    + single
                    + 2.0 * n * c.in_channels as f64 * d
                    + 2.0 * t * c.joint_attention_dim as f64 * d
                    + 2.0 * n * d * c.out_channels as f64)
            }
        }
    }
}
