//! [`FluxConfig`]: the configuration of diffusers' `FluxTransformer2DModel` (Flux.1), from a
//! `config.json` (missing keys take the class defaults) or a named preset.
//! Reference: diffusers 0.42.1 `transformer_flux.py` (`FluxTransformer2DModel.__init__`).

use std::path::Path;

use serde_json::Value;

use crate::error::{read_json, ModelError, Result};
use crate::fields::{hidden_size, in_range, Fields, MAX_LAYERS, MAX_WIDTH};

/// The shape of a Flux.1 transformer.
#[derive(Debug, Clone, PartialEq)]
pub struct FluxConfig {
    /// Patch size of the token projection (1 in every released model: the pipeline packs 2x2
    /// latent blocks into tokens itself).
    pub patch_size: usize,
    /// Channels of a packed token (4 x latent channels).
    pub in_channels: usize,
    /// Channels of an output token.
    pub out_channels: usize,
    /// Double-stream blocks (image and prompt streams with their own weights).
    pub num_layers: usize,
    /// Single-stream blocks (one stream over `[prompt; image]`, attention and MLP in parallel).
    pub num_single_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// Width of the prompt embeddings (T5).
    pub joint_attention_dim: usize,
    /// Width of the pooled text embedding (CLIP).
    pub pooled_projection_dim: usize,
    /// Flux.1-dev: the guidance scale is an input embedded like the timestep.
    pub guidance_embeds: bool,
    /// Channels of each rotary axis (text/index, row, column); they sum to `head_dim`.
    pub axes_dims_rope: Vec<usize>,
}

impl FluxConfig {
    /// Hidden size d = heads x head_dim.
    pub fn hidden(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// The checkpoint's block families: double-stream, then single-stream (see
    /// [`crate::ModelConfig::block_families`]).
    pub fn block_families(&self) -> Vec<(&'static str, usize, &'static str)> {
        vec![
            ("transformer_blocks", self.num_layers, "num_layers"),
            (
                "single_transformer_blocks",
                self.num_single_layers,
                "num_single_layers",
            ),
        ]
    }

    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<FluxConfig> {
        let path = dir.join("config.json");
        Self::from_json(&read_json(&path)?, &path)
    }

    /// Parses a `FluxTransformer2DModel` config; errors name `path` and the field.
    pub fn from_json(v: &Value, path: &Path) -> Result<FluxConfig> {
        crate::error::json_object(v, path)?;
        let f = Fields { v, path };
        let class = f.str("_class_name", "")?;
        if class != "FluxTransformer2DModel" {
            return Err(ModelError::config(
                path,
                "_class_name",
                format!("`{class}` is not a FluxTransformer2DModel"),
            ));
        }
        let in_channels = f.usize("in_channels", 64)?;
        let cfg = FluxConfig {
            patch_size: f.usize("patch_size", 1)?,
            in_channels,
            out_channels: f.opt_usize("out_channels")?.unwrap_or(in_channels),
            num_layers: f.usize("num_layers", 19)?,
            num_single_layers: f.usize("num_single_layers", 38)?,
            num_heads: f.usize("num_attention_heads", 24)?,
            head_dim: f.usize("attention_head_dim", 128)?,
            joint_attention_dim: f.usize("joint_attention_dim", 4096)?,
            pooled_projection_dim: f.usize("pooled_projection_dim", 768)?,
            guidance_embeds: f.bool("guidance_embeds", false)?,
            axes_dims_rope: f
                .opt_usize_list("axes_dims_rope")?
                .unwrap_or_else(|| vec![16, 56, 56]),
        };
        cfg.check(path)?;
        Ok(cfg)
    }

    /// A named preset with the released shapes: `Flux.1-dev` (guidance embedding) and
    /// `Flux.1-schnell` (none).
    pub fn preset(name: &str) -> Option<FluxConfig> {
        let dev = FluxConfig {
            patch_size: 1,
            in_channels: 64,
            out_channels: 64,
            num_layers: 19,
            num_single_layers: 38,
            num_heads: 24,
            head_dim: 128,
            joint_attention_dim: 4096,
            pooled_projection_dim: 768,
            guidance_embeds: true,
            axes_dims_rope: vec![16, 56, 56],
        };
        Some(match name.to_ascii_lowercase().as_str() {
            "flux.1-dev" => dev,
            "flux.1-schnell" => FluxConfig {
                guidance_embeds: false,
                ..dev
            },
            _ => return None,
        })
    }

    fn check(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, msg: String| Err(ModelError::config(path, field, msg));
        if self.patch_size != 1 {
            return bad(
                "patch_size",
                format!(
                    "{} is not supported (every Flux.1 model uses 1)",
                    self.patch_size
                ),
            );
        }
        in_range(path, "num_layers", self.num_layers, 0, MAX_LAYERS, "")?;
        in_range(
            path,
            "num_single_layers",
            self.num_single_layers,
            0,
            MAX_LAYERS,
            "",
        )?;
        if self.num_layers + self.num_single_layers == 0 {
            return bad(
                "num_layers",
                "0 with num_single_layers 0: a model needs at least one block; values that \
                 work: num_layers + num_single_layers >= 1 (Flux.1: 19 + 38)"
                    .into(),
            );
        }
        hidden_size(path, self.num_heads, self.head_dim)?;
        for (field, v) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("joint_attention_dim", self.joint_attention_dim),
            ("pooled_projection_dim", self.pooled_projection_dim),
        ] {
            in_range(path, field, v, 1, MAX_WIDTH, "")?;
        }
        // Each axis within the head (checked before summing: no overflow).
        let sum: usize = self
            .axes_dims_rope
            .iter()
            .map(|a| (*a).min(MAX_WIDTH + 1))
            .sum();
        if self.axes_dims_rope.len() != 3
            || sum != self.head_dim
            || self.axes_dims_rope.iter().any(|a| a % 2 != 0)
        {
            return bad(
                "axes_dims_rope",
                format!(
                    "{:?} must be three even sizes summing to attention_head_dim = {}",
                    self.axes_dims_rope, self.head_dim
                ),
            );
        }
        Ok(())
    }
}
