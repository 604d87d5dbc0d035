//! Model configuration: read from a diffusers `config.json` (DiT, PixArt-alpha, and the legacy
//! `Transformer2DModel` + `ada_norm_zero` form that hub DiT checkpoints carry) or built from a
//! named preset.

use std::path::Path;

use serde_json::Value;

use crate::error::{read_json, ModelError, Result};
use crate::fields::{hidden_size, in_range, sample_and_patch, Fields, MAX_LAYERS, MAX_WIDTH};

/// The most classes a DiT config may state (its class table has one row per class).
const MAX_CLASSES: usize = 1 << 24;

/// Which transformer family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Class-conditional DiT with adaLN-Zero (diffusers `DiTTransformer2DModel`).
    Dit,
    /// Text-conditional PixArt-alpha with adaLN-single (diffusers `PixArtTransformer2DModel`).
    PixArt,
    /// Stable Diffusion 3 / 3.5 MMDiT (diffusers `SD3Transformer2DModel`).
    Sd3,
    /// Flux.1 MMDiT (diffusers `FluxTransformer2DModel`).
    Flux,
}

/// Shapes and constants of a DiT / PixArt transformer.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Model family.
    pub arch: Arch,
    /// Latent channels in.
    pub in_channels: usize,
    /// Channels out (2x in with learned sigma).
    pub out_channels: usize,
    /// Patch size p.
    pub patch_size: usize,
    /// Latent side the model was trained at (sets the position-embedding base grid).
    pub sample_size: usize,
    /// Number of transformer blocks L.
    pub num_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// eps of the configurable norms (DiT `norm3`, PixArt `norm1`/`norm2`).
    pub norm_eps: f32,
    /// DiT: number of classes (the class table has one more row, the CFG null class).
    pub num_classes: usize,
    /// PixArt: caption embedding width.
    pub caption_channels: usize,
    /// PixArt: position-embedding interpolation scale.
    pub interpolation_scale: f32,
    /// PixArt: resolution / aspect-ratio conditioning (PixArt-XL-2-1024-MS).
    pub use_additional_conditions: bool,
    /// MMDiT models: their own configuration (the fields above restate its shapes in the
    /// runtime's terms: unpacked latent channels, layers = every block a stage can own).
    pub mmdit: Option<crate::mmdit::MmditConfig>,
}

impl ModelConfig {
    /// Hidden size d.
    pub fn hidden(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// The checkpoint's block families as (tensor name prefix, blocks, config field): what
    /// [`crate::SafetensorsDir::check_block_counts`] compares a checkpoint with.
    pub fn block_families(&self) -> Vec<(&'static str, usize, &'static str)> {
        match &self.mmdit {
            Some(crate::mmdit::MmditConfig::Sd3(c)) => c.block_families(),
            Some(crate::mmdit::MmditConfig::Flux(c)) => c.block_families(),
            None => vec![("transformer_blocks", self.num_layers, "num_layers")],
        }
    }

    /// The CFG null class label (DiT).
    pub fn null_class(&self) -> usize {
        self.num_classes
    }

    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<ModelConfig> {
        let path = dir.join("config.json");
        Self::from_json(&read_json(&path)?, &path)
    }

    /// Parses a diffusers transformer config; `path` is only used in error messages.
    pub fn from_json(v: &Value, path: &Path) -> Result<ModelConfig> {
        crate::error::json_object(v, path)?;
        let field = Fields { v, path };
        let class = field.str("_class_name", "")?;
        match class.as_str() {
            "SD3Transformer2DModel" => {
                return Ok(ModelConfig::from_sd3(crate::mmdit::Sd3Config::from_json(
                    v, path,
                )?))
            }
            "FluxTransformer2DModel" => {
                return ModelConfig::from_flux(crate::mmdit::FluxConfig::from_json(v, path)?)
                    .map_err(|m| ModelError::config(path, "in_channels", m))
            }
            _ => {}
        }
        let norm_type = field.str("norm_type", "")?;
        let arch = match (class.as_str(), norm_type.as_str()) {
            ("DiTTransformer2DModel", "ada_norm_zero" | "") => Arch::Dit,
            ("Transformer2DModel", "ada_norm_zero") => Arch::Dit,
            ("PixArtTransformer2DModel", "ada_norm_single" | "") => Arch::PixArt,
            ("Transformer2DModel", "ada_norm_single") => Arch::PixArt,
            (c, n) => {
                return Err(ModelError::config(path, "_class_name", format!(
                    "unsupported model `{c}` with norm_type `{n}`; supported: DiTTransformer2DModel, PixArtTransformer2DModel, Transformer2DModel with ada_norm_zero / ada_norm_single, SD3Transformer2DModel, FluxTransformer2DModel"
                )))
            }
        };
        let act = field.str("activation_fn", "gelu-approximate")?;
        if act != "gelu-approximate" {
            return Err(ModelError::config(
                path,
                "activation_fn",
                format!("`{act}` is not supported (only gelu-approximate)"),
            ));
        }
        if !field.bool("attention_bias", true)? {
            return Err(ModelError::config(
                path,
                "attention_bias",
                "false is not supported (DiT and PixArt use biased projections)",
            ));
        }
        let in_channels = field.usize("in_channels", 4)?;
        let num_heads = field.usize("num_attention_heads", 16)?;
        let head_dim = field.usize("attention_head_dim", 72)?;
        let sample_size = field.usize("sample_size", if arch == Arch::Dit { 32 } else { 128 })?;
        let cfg = ModelConfig {
            arch,
            in_channels,
            out_channels: field.opt_usize("out_channels")?.unwrap_or(in_channels),
            patch_size: field.usize("patch_size", 2)?,
            sample_size,
            num_layers: field.usize("num_layers", 28)?,
            num_heads,
            head_dim,
            norm_eps: field.f64("norm_eps", if arch == Arch::Dit { 1e-5 } else { 1e-6 })? as f32,
            num_classes: field.usize("num_embeds_ada_norm", 1000)?,
            caption_channels: field.usize("caption_channels", 4096)?,
            interpolation_scale: match field.opt_f64("interpolation_scale")?.map(|x| x as f32) {
                Some(s) => s,
                None => (sample_size / 64).max(1) as f32,
            },
            use_additional_conditions: match v.get("use_additional_conditions") {
                Some(Value::Bool(b)) => *b,
                None | Some(Value::Null) => arch == Arch::PixArt && sample_size == 128,
                Some(_) => {
                    return Err(ModelError::config(
                        path,
                        "use_additional_conditions",
                        "expected true, false or null",
                    ))
                }
            },
            mmdit: None,
        };
        cfg.check_domains(path)?;
        if arch == Arch::PixArt {
            let cross = field
                .opt_usize("cross_attention_dim")?
                .unwrap_or(cfg.hidden());
            if cross != cfg.hidden() {
                return Err(ModelError::config(
                    path,
                    "cross_attention_dim",
                    format!("{cross} must equal the hidden size {}", cfg.hidden()),
                ));
            }
        }
        cfg.validate()
            .map_err(|(f, m)| ModelError::config(path, f, m))?;
        Ok(cfg)
    }

    /// Every size in its range and every number in its domain, before anything multiplies them
    /// (so `hidden()` and the weight shapes cannot overflow).
    fn check_domains(&self, path: &Path) -> Result<()> {
        sample_and_patch(path, self.sample_size, self.patch_size)?;
        in_range(path, "num_layers", self.num_layers, 1, MAX_LAYERS, "")?;
        hidden_size(path, self.num_heads, self.head_dim)?;
        in_range(path, "in_channels", self.in_channels, 1, MAX_WIDTH, "")?;
        in_range(path, "out_channels", self.out_channels, 1, MAX_WIDTH, "")?;
        match self.arch {
            Arch::Dit => in_range(
                path,
                "num_embeds_ada_norm",
                self.num_classes,
                1,
                MAX_CLASSES,
                " (the class count of a class-conditional DiT)",
            )?,
            Arch::PixArt => in_range(
                path,
                "caption_channels",
                self.caption_channels,
                1,
                MAX_WIDTH,
                "",
            )?,
            Arch::Sd3 | Arch::Flux => {}
        }
        for (field, x) in [
            ("norm_eps", self.norm_eps),
            ("interpolation_scale", self.interpolation_scale),
        ] {
            // Checked in f32, as the model uses them: 1e-50 is 0 there, 1e39 infinite.
            if !(x.is_finite() && x > 0.0) {
                return Err(ModelError::config(
                    path,
                    field,
                    format!(
                        "{x} (as f32) is out of range; values that work: a finite number > 0 \
                         (diffusers' DiT uses norm_eps 1e-5, PixArt 1e-6)"
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        if self.hidden() % 4 != 0 {
            return Err((
                "attention_head_dim",
                format!(
                    "hidden size {} must divide by 4 (2-D sin-cos position table)",
                    self.hidden()
                ),
            ));
        }
        if self.use_additional_conditions && self.hidden() % 3 != 0 {
            return Err((
                "use_additional_conditions",
                format!("hidden size {} must divide by 3", self.hidden()),
            ));
        }
        Ok(())
    }

    /// A named preset: `DiT-S/2`, `DiT-B/2`, `DiT-L/2`, `DiT-XL/2` (class-conditional, 1000 classes,
    /// latent side `sample_size`), `PixArt-alpha-256`, `-512`, `-1024`, and the MMDiT models
    /// `SD3-Medium`, `SD3.5-Medium`, `SD3.5-Large`, `Flux.1-dev`, `Flux.1-schnell`.
    pub fn preset(name: &str) -> Option<ModelConfig> {
        let dit = |hidden: usize, layers: usize, heads: usize| ModelConfig {
            arch: Arch::Dit,
            in_channels: 4,
            out_channels: 8,
            patch_size: 2,
            sample_size: 32,
            num_layers: layers,
            num_heads: heads,
            head_dim: hidden / heads,
            norm_eps: 1e-5,
            num_classes: 1000,
            caption_channels: 0,
            interpolation_scale: 1.0,
            use_additional_conditions: false,
            mmdit: None,
        };
        let pixart = |sample: usize| ModelConfig {
            arch: Arch::PixArt,
            sample_size: sample,
            norm_eps: 1e-6,
            caption_channels: 4096,
            interpolation_scale: (sample / 64).max(1) as f32,
            use_additional_conditions: sample == 128,
            ..dit(1152, 28, 16)
        };
        Some(match name.to_ascii_lowercase().as_str() {
            "dit-s/2" => dit(384, 12, 6),
            "dit-b/2" => dit(768, 12, 12),
            "dit-l/2" => dit(1024, 24, 16),
            "dit-xl/2" => dit(1152, 28, 16),
            "pixart-alpha-256" => pixart(32),
            "pixart-alpha-512" => pixart(64),
            "pixart-alpha-1024" => pixart(128),
            other => return crate::mmdit::preset(other),
        })
    }

    /// Names accepted by [`ModelConfig::preset`].
    pub const PRESETS: &'static [&'static str] = &[
        "DiT-S/2",
        "DiT-B/2",
        "DiT-L/2",
        "DiT-XL/2",
        "PixArt-alpha-256",
        "PixArt-alpha-512",
        "PixArt-alpha-1024",
        "SD3-Medium",
        "SD3.5-Medium",
        "SD3.5-Large",
        "Flux.1-dev",
        "Flux.1-schnell",
    ];
}

impl ModelConfig {
    /// The text tokens a typical request has: PixArt's caption (120, cross-attention), SD3's
    /// prompt in the joint sequence (333 = 77 CLIP + 256 T5), Flux's (512 T5); 0 for DiT. What
    /// `bench` and `plan` assume when not told.
    pub fn typical_text_tokens(&self) -> usize {
        match self.arch {
            Arch::Dit => 0,
            Arch::PixArt => 120,
            Arch::Sd3 => 333,
            Arch::Flux => 512,
        }
    }

    /// FLOPs of one forward over `batch` latents of `tokens` tokens (multiply-add = 2; softmax,
    /// norms, activations and biases not counted), the formula `tools/bench_torch.py` shares:
    /// per block `2 R d (3d + d + 4d + 4d)` linear + `4 B T^2 d` attention + per-block modulation
    /// `2 B (256 d + d^2 + 6 d^2)` (DiT; PixArt shares one, counted once) + PixArt cross-attention
    /// with `caption_tokens`; plus patch embedding and final layer.
    pub fn forward_flops(&self, batch: usize, tokens: usize, caption_tokens: usize) -> f64 {
        if let Some(m) = &self.mmdit {
            return m.forward_flops(batch, tokens, caption_tokens);
        }
        let (b, t, d) = (batch as f64, tokens as f64, self.hidden() as f64);
        let (r, p2) = (b * t, (self.patch_size * self.patch_size) as f64);
        let mut block = 2.0 * r * d * 12.0 * d + 4.0 * b * t * t * d;
        let modulation = 2.0 * b * (256.0 * d + d * d + 6.0 * d * d);
        let mut total = 0.0;
        match self.arch {
            Arch::Dit => block += modulation,
            Arch::Sd3 | Arch::Flux => {}
            Arch::PixArt => {
                let tc = caption_tokens as f64;
                block += 2.0 * r * d * 2.0 * d + 2.0 * b * tc * d * 2.0 * d + 4.0 * b * t * tc * d;
                total += modulation + 2.0 * b * tc * (self.caption_channels as f64 * d + d * d);
            }
        }
        total
            + self.num_layers as f64 * block
            + 2.0 * r * self.in_channels as f64 * p2 * d
            + 2.0 * r * d * p2 * self.out_channels as f64
            + 2.0 * b * d * 2.0 * d
    }
}
