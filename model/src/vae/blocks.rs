//! The layers of the VAE decoder: convolution, GroupNorm, `ResnetBlock2D`, `Upsample2D`, the
//! mid block's single-head self-attention, and the mid / up blocks built from them.
//! Reference: diffusers 0.42.1 `resnet.py::ResnetBlock2D` (`time_embedding_norm="default"`, no
//! `temb`, `output_scale_factor` 1), `upsampling.py::Upsample2D(use_conv=True)`,
//! `unets/unet_2d_blocks.py::{UNetMidBlock2D, UpDecoderBlock2D}` and
//! `attention_processor.py::{Attention, AttnProcessor2_0}` as `UNetMidBlock2D` builds it
//! (`_from_deprecated_attn_block`, `residual_connection`, `spatial_norm_dim=None`, heads 1).
//!
//! Shapes: `B` images, `C` channels, `H x W` pixels of the current level.

use kernels::{AttnView, Device, Tensor};

use crate::embedding::Linear;
use crate::error::{ModelError, Result};
use crate::weights::WeightSource;

/// eps of every GroupNorm in the decoder (`resnet_eps`, the attention's and `conv_norm_out`'s).
const EPS: f32 = 1e-6;

/// torch `Conv2d` with bias, stride 1, "same" padding `k / 2`.
#[derive(Debug, Clone)]
pub(crate) struct Conv2d {
    w: Tensor, // [O, C, k, k]
    b: Tensor, // [O]
    pad: usize,
}

impl Conv2d {
    pub(crate) fn load(
        src: &dyn WeightSource,
        name: &str,
        out: usize,
        inp: usize,
        k: usize,
    ) -> Result<Conv2d> {
        Ok(Conv2d {
            w: src.tensor(&format!("{name}.weight"), &[out, inp, k, k])?,
            b: src.tensor(&format!("{name}.bias"), &[out])?,
            pad: k / 2,
        })
    }

    /// `x: [B, C, H, W]` -> `[B, O, H, W]`.
    pub(crate) fn forward(&self, dev: &Device, x: &Tensor) -> Result<Tensor> {
        Ok(dev.conv2d(x, &self.w, Some(&self.b), self.pad)?)
    }
}

/// torch `GroupNorm(groups, C, eps=1e-6, affine=True)`.
#[derive(Debug, Clone)]
pub(crate) struct GroupNorm {
    gamma: Tensor, // [C]
    beta: Tensor,  // [C]
    groups: usize,
}

impl GroupNorm {
    pub(crate) fn load(
        src: &dyn WeightSource,
        name: &str,
        channels: usize,
        groups: usize,
    ) -> Result<GroupNorm> {
        Ok(GroupNorm {
            gamma: src.tensor(&format!("{name}.weight"), &[channels])?,
            beta: src.tensor(&format!("{name}.bias"), &[channels])?,
            groups,
        })
    }

    /// `x: [B, C, H, W]` -> `[B, C, H, W]`.
    pub(crate) fn forward(&self, dev: &Device, x: &Tensor) -> Result<Tensor> {
        Ok(dev.group_norm(x, self.groups, Some(&self.gamma), Some(&self.beta), EPS)?)
    }

    /// `silu(GroupNorm(x))`, the pre-activation of every conv in the decoder.
    pub(crate) fn forward_silu(&self, dev: &Device, x: &Tensor) -> Result<Tensor> {
        let mut y = self.forward(dev, x)?; // [B, C, H, W]
        dev.silu_(&mut y)?;
        Ok(y)
    }
}

/// `ResnetBlock2D` without time embedding:
/// `shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`, with a 1x1 `conv_shortcut` when
/// the channel count changes.
#[derive(Debug, Clone)]
pub(crate) struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    pub(crate) fn load(
        src: &dyn WeightSource,
        name: &str,
        inp: usize,
        out: usize,
        groups: usize,
    ) -> Result<ResnetBlock> {
        Ok(ResnetBlock {
            norm1: GroupNorm::load(src, &format!("{name}.norm1"), inp, groups)?,
            conv1: Conv2d::load(src, &format!("{name}.conv1"), out, inp, 3)?,
            norm2: GroupNorm::load(src, &format!("{name}.norm2"), out, groups)?,
            conv2: Conv2d::load(src, &format!("{name}.conv2"), out, out, 3)?,
            shortcut: (inp != out)
                .then(|| Conv2d::load(src, &format!("{name}.conv_shortcut"), out, inp, 1))
                .transpose()?,
        })
    }

    /// `x: [B, C_in, H, W]` -> `[B, C_out, H, W]`.
    pub(crate) fn forward(&self, dev: &Device, x: &Tensor) -> Result<Tensor> {
        // Each activation is a temporary, dropped as soon as its conv has read it.
        let mut h = {
            let h = self.conv1.forward(dev, &self.norm1.forward_silu(dev, x)?)?; // [B, C_out, H, W]
            self.conv2
                .forward(dev, &self.norm2.forward_silu(dev, &h)?)? // [B, C_out, H, W]
        };
        match &self.shortcut {
            Some(s) => dev.add_gated_(&mut h, &s.forward(dev, x)?, None)?, // 1x1: [B, C_out, H, W]
            None => dev.add_gated_(&mut h, x, None)?,
        }
        Ok(h)
    }
}

/// The mid block's self-attention over the `H*W` pixels as tokens, one head of width `C`:
/// `x + to_out(softmax(q k^T / sqrt(C)) v)` with `q, k, v` projections of `GroupNorm(x)`.
#[derive(Debug, Clone)]
pub(crate) struct MidAttention {
    norm: GroupNorm,
    qkv: Linear, // [3C, C]: to_q, to_k, to_v fused
    out: Linear, // [C, C]: to_out.0
    channels: usize,
}

impl MidAttention {
    /// Loads `{name}.{group_norm, to_q, to_k, to_v, to_out.0}`, or the legacy `AttentionBlock`
    /// names `{query, key, value, proj_attn}` that diffusers still renames on load (old hub VAEs).
    pub(crate) fn load(
        src: &dyn WeightSource,
        name: &str,
        c: usize,
        groups: usize,
    ) -> Result<MidAttention> {
        let legacy = !src.contains(&format!("{name}.to_q.weight"))
            && src.contains(&format!("{name}.query.weight"));
        let [q, k, v, o] = if legacy {
            ["query", "key", "value", "proj_attn"]
        } else {
            ["to_q", "to_k", "to_v", "to_out.0"]
        };
        let qkv_names = [q, k, v].map(|p| format!("{name}.{p}"));
        Ok(MidAttention {
            norm: GroupNorm::load(src, &format!("{name}.group_norm"), c, groups)?,
            qkv: Linear::load_fused(src, &qkv_names, c, c)?,
            out: Linear::load(src, &format!("{name}.{o}"), c, c)?,
            channels: c,
        })
    }

    /// `x: [B, C, H, W]` -> `[B, C, H, W]`.
    pub(crate) fn forward(&self, dev: &Device, x: &Tensor) -> Result<Tensor> {
        let &[b, c, h, w] = x.shape() else {
            return Err(ModelError::Input(format!(
                "mid-block attention needs [B, C, H, W], got {:?}",
                x.shape()
            )));
        };
        let n = h * w;
        let normed = self.norm.forward(dev, x)?.reshape(&[b, c, n])?; // [B, C, HW]
        let tokens = dev.transpose_last2(&normed)?; // [B, HW, C]
        let qkv = self.qkv.forward(dev, &tokens)?; // [B, HW, 3C]
        let [q, k, v] = [0, c, 2 * c].map(|off| AttnView::of(&qkv, off)); // [B, HW, 1, C] each
        let att = dev.attention(q?, k?, v?, None, b, 1, self.channels)?; // [B, HW, C]
        let proj = self.out.forward(dev, &att)?; // [B, HW, C]
        let mut y = dev.transpose_last2(&proj)?.reshape(&[b, c, h, w])?; // [B, C, H, W]
        dev.add_gated_(&mut y, x, None)?;
        Ok(y)
    }
}

/// `UNetMidBlock2D` (one layer): resnet, attention (if present), resnet; channels unchanged.
#[derive(Debug, Clone)]
pub(crate) struct MidBlock {
    resnets: [ResnetBlock; 2],
    attention: Option<MidAttention>,
}

impl MidBlock {
    pub(crate) fn load(
        src: &dyn WeightSource,
        name: &str,
        c: usize,
        groups: usize,
        attention: bool,
    ) -> Result<MidBlock> {
        let resnet =
            |i: usize| ResnetBlock::load(src, &format!("{name}.resnets.{i}"), c, c, groups);
        Ok(MidBlock {
            resnets: [resnet(0)?, resnet(1)?],
            attention: attention
                .then(|| MidAttention::load(src, &format!("{name}.attentions.0"), c, groups))
                .transpose()?,
        })
    }

    /// `x: [B, C, H, W]` -> `[B, C, H, W]`.
    pub(crate) fn forward(&self, dev: &Device, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(dev, x)?; // [B, C, H, W]
        if let Some(a) = &self.attention {
            h = a.forward(dev, &h)?; // [B, C, H, W]
        }
        self.resnets[1].forward(dev, &h)
    }
}

/// `UpDecoderBlock2D`: `layers` resnets (the first maps `C_in` to `C_out`), then, except in the
/// last block, `Upsample2D`: nearest 2x and a 3x3 conv.
#[derive(Debug, Clone)]
pub(crate) struct UpBlock {
    resnets: Vec<ResnetBlock>,
    upsample: Option<Conv2d>,
}

impl UpBlock {
    pub(crate) fn load(
        src: &dyn WeightSource,
        name: &str,
        inp: usize,
        out: usize,
        layers: usize,
        groups: usize,
        upsample: bool,
    ) -> Result<UpBlock> {
        let resnets = (0..layers)
            .map(|j| {
                let c_in = if j == 0 { inp } else { out };
                ResnetBlock::load(src, &format!("{name}.resnets.{j}"), c_in, out, groups)
            })
            .collect::<Result<Vec<_>>>()?;
        let upsample = upsample
            .then(|| Conv2d::load(src, &format!("{name}.upsamplers.0.conv"), out, out, 3))
            .transpose()?;
        Ok(UpBlock { resnets, upsample })
    }

    /// `x: [B, C_in, H, W]` -> `[B, C_out, 2H, 2W]` (`[B, C_out, H, W]` for the last block).
    pub(crate) fn forward(&self, dev: &Device, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(dev, x)?; // [B, C_out, H, W]
        for r in &self.resnets[1..] {
            h = r.forward(dev, &h)?; // [B, C_out, H, W]
        }
        match &self.upsample {
            Some(conv) => conv.forward(dev, &dev.upsample_nearest2x(&h)?), // [B, C_out, 2H, 2W]
            None => Ok(h),
        }
    }
}
