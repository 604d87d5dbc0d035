//! Flux.1's two kinds of blocks and its rotary position table.
//!
//! - Double-stream block: the image and prompt streams each have their own adaLN-Zero, fused QKV
//!   (per-head RMS q/k norm), output projection and MLP; they attend together over
//!   `[prompt; image]` (prompt first, unlike SD3) with rotary embeddings on queries and keys.
//! - Single-stream block: one stream over `[prompt; image]`: adaLN (shift, scale, gate), then
//!   attention (no output projection of its own) and a tanh-GELU MLP side by side, concatenated
//!   and projected by one `proj_out`, gated into the residual.
//!
//! Reference: diffusers 0.42.1 `transformer_flux.py` (`FluxTransformerBlock`,
//! `FluxSingleTransformerBlock`, `FluxAttnProcessor`, `FluxPosEmbed`),
//! `embeddings.py::get_1d_rotary_pos_embed` (`repeat_interleave_real`, f64 angles).

use kernels::{Device, Tensor};

use crate::blocks::{norm_modulate, residual, FeedForward};
use crate::embedding::Linear;
use crate::error::Result;
use crate::weights::WeightSource;

use super::block::{attend_joint, chunk, JointAttn, Qkv, ADDED_QKV, EPS, QKV};
use super::flux_config::FluxConfig;

/// `cos, sin: [S, head_dim]` of positions `ids` (one `[index, row, column]` per token): axis `a`
/// of width `w_a` takes channels after the previous axes; channel pair `k` of an axis turns by
/// `pos x theta^(-2k / w_a)` (computed in f64 like diffusers), each value repeated for the pair.
pub(crate) fn rope_tables(
    ids: &[[f32; 3]],
    axes: &[usize],
    theta: f64,
) -> Result<(Tensor, Tensor)> {
    let hd: usize = axes.iter().sum();
    let (mut cos, mut sin) = (
        Vec::with_capacity(ids.len() * hd),
        Vec::with_capacity(ids.len() * hd),
    );
    for id in ids {
        for (a, &w) in axes.iter().enumerate() {
            let pos = id[a] as f64;
            for k in 0..w / 2 {
                let freq = 1.0 / theta.powf((2 * k) as f64 / w as f64);
                let angle = pos * freq;
                let (c, s) = (angle.cos() as f32, angle.sin() as f32);
                cos.extend([c, c]);
                sin.extend([s, s]);
            }
        }
    }
    Ok((
        Tensor::from_vec(cos, &[ids.len(), hd])?,
        Tensor::from_vec(sin, &[ids.len(), hd])?,
    ))
}

/// Rotary embedding on the queries and keys of a fused `[B, S, 3d]` QKV.
fn rope_qk(dev: &Device, qkv: &mut Tensor, rope: &(Tensor, Tensor)) -> Result<()> {
    let d = qkv.dim(2) / 3;
    Ok(dev.rope_(qkv, 0, 2 * d, &rope.0, &rope.1)?)
}

/// A double-stream block (see the module documentation).
#[derive(Debug, Clone)]
pub(crate) struct DoubleBlock {
    modulation: Linear,         // norm1.linear [6d, d]
    context_modulation: Linear, // norm1_context.linear [6d, d]
    qkv: Qkv,
    context_qkv: Qkv,
    out: Linear,
    context_out: Linear,
    ff: FeedForward,
    context_ff: FeedForward,
}

impl DoubleBlock {
    pub(crate) fn load(src: &dyn WeightSource, i: usize, cfg: &FluxConfig) -> Result<Self> {
        let (d, p) = (cfg.hidden(), format!("transformer_blocks.{i}"));
        let attn = format!("{p}.attn");
        let dims = (d, cfg.head_dim);
        Ok(DoubleBlock {
            modulation: Linear::load(src, &format!("{p}.norm1.linear"), 6 * d, d)?,
            context_modulation: Linear::load(src, &format!("{p}.norm1_context.linear"), 6 * d, d)?,
            qkv: Qkv::load(src, &attn, QKV, Some(["norm_q", "norm_k"]), dims)?,
            context_qkv: Qkv::load(
                src,
                &attn,
                ADDED_QKV,
                Some(["norm_added_q", "norm_added_k"]),
                dims,
            )?,
            out: Linear::load(src, &format!("{attn}.to_out.0"), d, d)?,
            context_out: Linear::load(src, &format!("{attn}.to_add_out"), d, d)?,
            ff: FeedForward::load(src, &format!("{p}.ff"), d)?,
            context_ff: FeedForward::load(src, &format!("{p}.ff_context"), d)?,
        })
    }

    /// Updates `x: [B, S, d]` (image) and `ctx: [B, T, d]` (prompt) in place; `rope` covers the
    /// `T + S` positions, prompt first. With a slot the image tokens are one PipeFusion patch.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &self,
        dev: &Device,
        x: &mut Tensor,
        ctx: &mut Tensor,
        temb_silu: &Tensor,
        rope: &(Tensor, Tensor),
        cfg: &FluxConfig,
        mut slot: Option<JointAttn<'_>>,
    ) -> Result<()> {
        let t = ctx.dim(1);
        let (m, cm) = {
            let _op = op_span!("modulation");
            let m = self.modulation.forward(dev, temb_silu)?; // [B, 6d]
            (m, self.context_modulation.forward(dev, temb_silu)?)
        };
        let (c, cc) = (|j| chunk(&m, 6, j), |j| chunk(&cm, 6, j));
        let h = norm_modulate(dev, x, &c(0)?, &c(1)?, EPS)?;
        let image_qkv = {
            let _op = op_span!("qkv");
            self.qkv.forward(dev, &h)?
        };
        // A sequence-parallel rank without the prompt tokens runs the image side only.
        let mut joint = match t {
            0 => image_qkv,
            _ => {
                let hc = norm_modulate(dev, ctx, &cc(0)?, &cc(1)?, EPS)?;
                let _op = op_span!("qkv");
                Tensor::cat(&[&self.context_qkv.forward(dev, &hc)?, &image_qkv], 1)?
            }
        }; // [B, T + S, 3d]
        let o = {
            let _op = op_span!("attend");
            rope_qk(dev, &mut joint, rope)?;
            attend_joint(dev, &joint, t, slot.as_mut(), cfg.num_heads, cfg.head_dim)?
        };
        let s = o.dim(1) - t;
        let a = {
            let _op = op_span!("attn_out");
            self.out.forward(dev, &o.narrow(1, t, s)?)?
        };
        residual(dev, x, &a, Some(&c(2)?))?;
        let h = norm_modulate(dev, x, &c(3)?, &c(4)?, EPS)?;
        let f = self.ff.forward(dev, &h)?;
        residual(dev, x, &f, Some(&c(5)?))?;
        if t == 0 {
            return Ok(());
        }
        let ac = {
            let _op = op_span!("attn_out");
            self.context_out.forward(dev, &o.narrow(1, 0, t)?)?
        };
        residual(dev, ctx, &ac, Some(&cc(2)?))?;
        let hc = norm_modulate(dev, ctx, &cc(3)?, &cc(4)?, EPS)?;
        let fc = self.context_ff.forward(dev, &hc)?;
        residual(dev, ctx, &fc, Some(&cc(5)?))?;
        Ok(())
    }
}

/// A single-stream block (see the module documentation).
#[derive(Debug, Clone)]
pub(crate) struct SingleBlock {
    modulation: Linear, // norm.linear [3d, d]
    qkv: Qkv,
    mlp: Linear,      // proj_mlp [4d, d]
    proj_out: Linear, // [d, d + 4d]
}

impl SingleBlock {
    pub(crate) fn load(src: &dyn WeightSource, i: usize, cfg: &FluxConfig) -> Result<Self> {
        let (d, p) = (cfg.hidden(), format!("single_transformer_blocks.{i}"));
        Ok(SingleBlock {
            modulation: Linear::load(src, &format!("{p}.norm.linear"), 3 * d, d)?,
            qkv: Qkv::load(
                src,
                &format!("{p}.attn"),
                QKV,
                Some(["norm_q", "norm_k"]),
                (d, cfg.head_dim),
            )?,
            mlp: Linear::load(src, &format!("{p}.proj_mlp"), 4 * d, d)?,
            proj_out: Linear::load(src, &format!("{p}.proj_out"), d, 5 * d)?,
        })
    }

    /// Updates the joint tokens `z: [B, T + S, d]` (`t` prompt tokens first) in place. With a
    /// slot the image tokens are one PipeFusion patch.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &self,
        dev: &Device,
        z: &mut Tensor,
        t: usize,
        temb_silu: &Tensor,
        rope: &(Tensor, Tensor),
        cfg: &FluxConfig,
        mut slot: Option<JointAttn<'_>>,
    ) -> Result<()> {
        let m = {
            let _op = op_span!("modulation");
            self.modulation.forward(dev, temb_silu)? // [B, 3d]: shift, scale, gate
        };
        let h = norm_modulate(dev, z, &chunk(&m, 3, 0)?, &chunk(&m, 3, 1)?, EPS)?;
        let mlp = {
            let _op = op_span!("fc1_gelu");
            self.mlp.forward_gelu(dev, &h)? // [B, T + S, 4d]
        };
        let mut qkv = {
            let _op = op_span!("qkv");
            self.qkv.forward(dev, &h)?
        };
        let o = {
            let _op = op_span!("attend");
            rope_qk(dev, &mut qkv, rope)?;
            attend_joint(dev, &qkv, t, slot.as_mut(), cfg.num_heads, cfg.head_dim)?
            // [B, T + S, d]
        };
        let y = {
            // Attention's output projection and the MLP's down projection in one product.
            let _op = op_span!("proj_out");
            self.proj_out.forward(dev, &Tensor::cat(&[&o, &mlp], 2)?)?
        };
        residual(dev, z, &y, Some(&chunk(&m, 3, 2)?))?;
        Ok(())
    }
}
