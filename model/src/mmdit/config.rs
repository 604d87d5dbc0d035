//! [`Sd3Config`]: the configuration of diffusers' `SD3Transformer2DModel` (Stable Diffusion 3 and
//! 3.5), from a `config.json` (missing keys take the class defaults) or a named preset.
//! Reference: diffusers 0.42.1 `transformer_sd3.py` (`SD3Transformer2DModel.__init__`).

use std::path::Path;

use serde_json::Value;

use crate::error::{read_json, ModelError, Result};
use crate::fields::{hidden_size, in_range, sample_and_patch, Fields, MAX_LAYERS, MAX_WIDTH};

/// The shape of an SD3 / SD3.5 MMDiT.
#[derive(Debug, Clone, PartialEq)]
pub struct Sd3Config {
    /// Latent side the model was trained at (the position table's base grid is this / patch).
    pub sample_size: usize,
    /// Patch size P.
    pub patch_size: usize,
    /// Latent channels in.
    pub in_channels: usize,
    /// Latent channels out.
    pub out_channels: usize,
    /// Joint transformer blocks L.
    pub num_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// Width of the prompt embeddings (`encoder_hidden_states`).
    pub joint_attention_dim: usize,
    /// Width of the embedded prompt tokens (equals the hidden size in every released model).
    pub caption_projection_dim: usize,
    /// Width of the pooled text embedding.
    pub pooled_projection_dim: usize,
    /// Side of the stored position table; an image's token grid is cropped from its centre.
    pub pos_embed_max_size: usize,
    /// Blocks with the MMDiT-X second (image-only) self-attention (SD3.5).
    pub dual_attention_layers: Vec<usize>,
    /// Per-head RMSNorm of queries and keys (`qk_norm = "rms_norm"`, SD3.5).
    pub qk_norm: bool,
}

impl Sd3Config {
    /// Hidden size d = heads x head_dim.
    pub fn hidden(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// The checkpoint's block family (see [`crate::ModelConfig::block_families`]).
    pub fn block_families(&self) -> Vec<(&'static str, usize, &'static str)> {
        vec![("transformer_blocks", self.num_layers, "num_layers")]
    }

    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Sd3Config> {
        let path = dir.join("config.json");
        Self::from_json(&read_json(&path)?, &path)
    }

    /// Parses an `SD3Transformer2DModel` config; errors name `path` and the field.
    pub fn from_json(v: &Value, path: &Path) -> Result<Sd3Config> {
        crate::error::json_object(v, path)?;
        let f = Fields { v, path };
        let class = f.str("_class_name", "")?;
        if class != "SD3Transformer2DModel" {
            return Err(ModelError::config(
                path,
                "_class_name",
                format!("`{class}` is not an SD3Transformer2DModel"),
            ));
        }
        let in_channels = f.usize("in_channels", 16)?;
        let qk_norm = match f.str("qk_norm", "")?.as_str() {
            "" => false,
            "rms_norm" => true,
            other => {
                return Err(ModelError::config(
                    path,
                    "qk_norm",
                    format!("`{other}` is not supported (null or \"rms_norm\")"),
                ))
            }
        };
        let cfg = Sd3Config {
            sample_size: f.usize("sample_size", 128)?,
            patch_size: f.usize("patch_size", 2)?,
            in_channels,
            out_channels: f.opt_usize("out_channels")?.unwrap_or(in_channels),
            num_layers: f.usize("num_layers", 18)?,
            num_heads: f.usize("num_attention_heads", 18)?,
            head_dim: f.usize("attention_head_dim", 64)?,
            joint_attention_dim: f.usize("joint_attention_dim", 4096)?,
            caption_projection_dim: f.usize("caption_projection_dim", 1152)?,
            pooled_projection_dim: f.usize("pooled_projection_dim", 2048)?,
            pos_embed_max_size: f.usize("pos_embed_max_size", 96)?,
            dual_attention_layers: f
                .opt_usize_list("dual_attention_layers")?
                .unwrap_or_default(),
            qk_norm,
        };
        cfg.check(path)?;
        Ok(cfg)
    }

    /// A named preset with the released models' shapes: `SD3-Medium`, `SD3.5-Medium`,
    /// `SD3.5-Large`.
    pub fn preset(name: &str) -> Option<Sd3Config> {
        let base = |layers: usize, heads: usize, max: usize| Sd3Config {
            sample_size: 128,
            patch_size: 2,
            in_channels: 16,
            out_channels: 16,
            num_layers: layers,
            num_heads: heads,
            head_dim: 64,
            joint_attention_dim: 4096,
            caption_projection_dim: heads * 64,
            pooled_projection_dim: 2048,
            pos_embed_max_size: max,
            dual_attention_layers: Vec::new(),
            qk_norm: false,
        };
        Some(match name.to_ascii_lowercase().as_str() {
            "sd3-medium" => base(24, 24, 192),
            "sd3.5-medium" => Sd3Config {
                dual_attention_layers: (0..13).collect(),
                qk_norm: true,
                pos_embed_max_size: 384,
                ..base(24, 24, 384)
            },
            "sd3.5-large" => Sd3Config {
                qk_norm: true,
                ..base(38, 38, 192)
            },
            _ => return None,
        })
    }

    /// Checks what the forward relies on.
    fn check(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, msg: String| Err(ModelError::config(path, field, msg));
        sample_and_patch(path, self.sample_size, self.patch_size)?;
        in_range(path, "num_layers", self.num_layers, 1, MAX_LAYERS, "")?;
        hidden_size(path, self.num_heads, self.head_dim)?;
        for (field, v) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("joint_attention_dim", self.joint_attention_dim),
            ("caption_projection_dim", self.caption_projection_dim),
            ("pooled_projection_dim", self.pooled_projection_dim),
            ("pos_embed_max_size", self.pos_embed_max_size),
        ] {
            in_range(path, field, v, 1, MAX_WIDTH, "")?;
        }
        if self.caption_projection_dim != self.hidden() {
            return bad(
                "caption_projection_dim",
                format!(
                    "{} must equal heads x head_dim = {} (the prompt tokens join the image tokens)",
                    self.caption_projection_dim,
                    self.hidden()
                ),
            );
        }
        if let Some(&l) = self
            .dual_attention_layers
            .iter()
            .find(|&&l| l >= self.num_layers)
        {
            return bad(
                "dual_attention_layers",
                format!("layer {l} is past the model's {} layers", self.num_layers),
            );
        }
        Ok(())
    }
}
