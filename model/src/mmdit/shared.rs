//! What SD3 and Flux share outside their blocks: the conditioning embedder (timestep, optional
//! guidance, pooled text) and the output head (continuous adaLN + projection).
//! Reference: diffusers 0.42.1 `embeddings.py` (`CombinedTimestepTextProjEmbeddings`,
//! `CombinedTimestepGuidanceTextProjEmbeddings`, `PixArtAlphaTextProjection`),
//! `normalization.py::AdaLayerNormContinuous`.

use kernels::{Device, Tensor};

use crate::dit::on_device;
use crate::embedding::{timestep_features, Linear, TimestepEmbedding};
use crate::error::Result;
use crate::weights::WeightSource;

/// `time_text_embed`: `temb = TimestepEmbedding(t) [+ TimestepEmbedding(guidance)] +
/// linear_2(silu(linear_1(pooled)))`, sinusoidal features without shift.
#[derive(Debug, Clone)]
pub(super) struct TimeTextEmbed {
    timestep: TimestepEmbedding,
    guidance: Option<TimestepEmbedding>,
    text: (Linear, Linear),
}

impl TimeTextEmbed {
    pub(super) fn load(
        src: &dyn WeightSource,
        d: usize,
        pooled_dim: usize,
        guidance: bool,
    ) -> Result<Self> {
        let p = "time_text_embed";
        Ok(TimeTextEmbed {
            timestep: TimestepEmbedding::load(src, &format!("{p}.timestep_embedder"), 256, d)?,
            guidance: match guidance {
                true => Some(TimestepEmbedding::load(
                    src,
                    &format!("{p}.guidance_embedder"),
                    256,
                    d,
                )?),
                false => None,
            },
            text: (
                Linear::load(src, &format!("{p}.text_embedder.linear_1"), d, pooled_dim)?,
                Linear::load(src, &format!("{p}.text_embedder.linear_2"), d, d)?,
            ),
        })
    }

    /// `[B, d]` from one timestep (and guidance value) per image and `pooled: [B, pooled_dim]`.
    pub(super) fn forward(
        &self,
        dev: &Device,
        timesteps: &[f32],
        guidance: Option<&[f32]>,
        pooled: &Tensor,
    ) -> Result<Tensor> {
        // The sinusoidal features are made on the host; a GPU takes them (and the pooled text).
        let features =
            |t: &[f32]| -> Result<Tensor> { Ok(dev.import(timestep_features(t, 0.0)?)?) };
        let mut temb = self.timestep.forward(dev, &features(timesteps)?)?;
        if let (Some(g), Some(scales)) = (&self.guidance, guidance) {
            let ge = g.forward(dev, &features(scales)?)?;
            dev.add_gated_(&mut temb, &ge, None)?;
        }
        let (l1, l2) = &self.text;
        let pooled = on_device(dev, pooled)?;
        let text = l2.forward(dev, &dev.silu(&l1.forward(dev, &pooled)?)?)?;
        dev.add_gated_(&mut temb, &text, None)?;
        Ok(temb)
    }
}

/// `norm_out` (continuous adaLN: `LN(x) * (1 + scale) + shift`, `[scale | shift]` from
/// `silu(temb)`, eps 1e-6) and `proj_out`.
#[derive(Debug, Clone)]
pub(super) struct OutputHead {
    norm: Linear, // [2d, d]
    proj: Linear, // [out, d]
}

impl OutputHead {
    pub(super) fn load(src: &dyn WeightSource, d: usize, out: usize) -> Result<Self> {
        Ok(OutputHead {
            norm: Linear::load(src, "norm_out.linear", 2 * d, d)?,
            proj: Linear::load(src, "proj_out", out, d)?,
        })
    }

    /// Image tokens `x: [B, n, d]` -> `[B, n, out]`.
    pub(super) fn forward(&self, dev: &Device, x: &Tensor, temb_silu: &Tensor) -> Result<Tensor> {
        let x = &*on_device(dev, x)?;
        let m = self.norm.forward(dev, temb_silu)?; // [B, 2d]
        let d = x.dim(2);
        let (scale, shift) = (m.narrow(1, 0, d)?, m.narrow(1, d, d)?);
        let h = dev.layer_norm_modulate(x, &shift, &scale, 1e-6)?;
        self.proj.forward(dev, &h)
    }
}
