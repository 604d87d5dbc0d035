//! One MMDiT joint block: the image tokens and the prompt tokens each have their own adaLN
//! modulation, QKV and MLP, and attend together over the concatenated sequence (image first).
//! SD3.5's MMDiT-X blocks add a second, image-only self-attention from the same normalised tokens
//! with its own modulation; `qk_norm` normalises every head's queries and keys (RMSNorm). The last
//! block only reads the prompt (`context_pre_only`): its prompt side has a continuous adaLN and no
//! output projection or MLP.
//! Reference: diffusers 0.42.1 `attention.py::JointTransformerBlock`,
//! `attention_processor.py::JointAttnProcessor2_0`, `normalization.py` (`AdaLayerNormZero`,
//! `SD35AdaLayerNormZeroX`, `AdaLayerNormContinuous`, `RMSNorm`).

use kernels::{AttnView, Device, Tensor};

use crate::blocks::{norm_modulate, residual, FeedForward};
use crate::embedding::Linear;
use crate::error::Result;
use crate::kv_buffer::KvBuffer;
use crate::weights::WeightSource;

use super::config::Sd3Config;

/// LayerNorm and RMSNorm epsilon of every norm in the block (diffusers: 1e-6).
pub(super) const EPS: f32 = 1e-6;

/// The image stream's projections.
pub(super) const QKV: [&str; 3] = ["to_q", "to_k", "to_v"];
/// The prompt stream's projections.
pub(super) const ADDED_QKV: [&str; 3] = ["add_q_proj", "add_k_proj", "add_v_proj"];

/// Fused Q, K, V of one token stream with its optional per-head RMS norms of Q and K (shared by
/// the SD3 and Flux blocks).
#[derive(Debug, Clone)]
pub(super) struct Qkv {
    proj: Linear, // [3d, d]
    norms: Option<(Tensor, Tensor)>,
}

impl Qkv {
    /// `{p}.{names}` (each `[d, d]` + bias) and, with `norms`, `{p}.{norm}.weight` `[head_dim]`.
    pub(super) fn load(
        src: &dyn WeightSource,
        p: &str,
        names: [&str; 3],
        norms: Option<[&str; 2]>,
        (d, head_dim): (usize, usize),
    ) -> Result<Qkv> {
        let names = names.map(|n| format!("{p}.{n}"));
        let norms = match norms {
            Some([q, k]) => Some((
                src.tensor(&format!("{p}.{q}.weight"), &[head_dim])?,
                src.tensor(&format!("{p}.{k}.weight"), &[head_dim])?,
            )),
            None => None,
        };
        Ok(Qkv {
            proj: Linear::load_fused(src, &names, d, d)?,
            norms,
        })
    }

    /// `x: [B, n, d]` -> `[B, n, 3d]` (Q and K normalised per head when the model does).
    pub(super) fn forward(&self, dev: &Device, x: &Tensor) -> Result<Tensor> {
        let mut qkv = self.proj.forward(dev, x)?;
        if let Some((nq, nk)) = &self.norms {
            let d = x.dim(2);
            dev.rms_norm_groups_(&mut qkv, 0, d, nq, EPS)?;
            dev.rms_norm_groups_(&mut qkv, d, d, nk, EPS)?;
        }
        Ok(qkv)
    }
}

/// Attention over a fused `[B, S, 3d]` QKV of `heads` heads of `head_dim`, `[B, S, d]`.
pub(super) fn attend(dev: &Device, qkv: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor> {
    let d = heads * head_dim;
    Ok(dev.attention(
        AttnView::of(qkv, 0)?,
        AttnView::of(qkv, d)?,
        AttnView::of(qkv, 2 * d)?,
        None,
        qkv.dim(0),
        heads,
        head_dim,
    )?)
}

/// PipeFusion: where a block's attentions keep the keys and values of the whole sequence (the
/// slice's buffer, laid out as the model orders its streams; see `slice.rs`).
pub(super) struct JointSlot<'a> {
    pub(super) buf: &'a mut KvBuffer,
    /// The buffer layer of this block's joint attention.
    pub(super) layer: usize,
    /// SD3.5 MMDiT-X: the layer of the block's image-only attention (its rows `0..image_tokens`).
    pub(super) second_layer: usize,
    /// Buffer row of the part's first image token, and of the prompt's first token.
    pub(super) image_at: usize,
    pub(super) prompt_at: usize,
    /// The request's prompt tokens T, and whether they precede the image (Flux).
    pub(super) prompt: usize,
    pub(super) prompt_first: bool,
    /// Image tokens S of the whole image.
    pub(super) image_tokens: usize,
}

impl JointSlot<'_> {
    /// The slot in the form the sequence-parallel procedures take (`keys`: attend to the first
    /// rows only, 0 = all).
    fn kv_slot(&mut self, layer: usize, prompt: usize, keys: usize) -> crate::KvSlot<'_> {
        crate::KvSlot {
            buf: &mut *self.buf,
            layer,
            first: self.image_at,
            joint: crate::kv_buffer::JointRows {
                prompt,
                prompt_first: self.prompt_first,
                prompt_at: self.prompt_at,
                keys,
            },
        }
    }
}

/// How a block's attentions see the rest of the sequence, when the tokens given are not all of it.
pub(super) enum JointAttn<'a> {
    /// PipeFusion: one part's tokens over the stage's K/V buffer.
    Buffer(JointSlot<'a>),
    /// Sequence parallelism: this rank's tokens (its image shard, and the prompt on the rank
    /// that holds it) with the other ranks' through a collective.
    Shared(&'a mut dyn crate::sp::SequenceAttention),
    /// Both: this rank's sub-strip of a part; the collective gathers the part's keys and values
    /// (the prompt's from the rank that holds it) into the buffer of this rank's head group.
    SharedBuffer(&'a mut dyn crate::sp::SequenceAttention, JointSlot<'a>),
}

/// Attention of a fused `qkv: [B, n1 + n2, 3d]` holding two streams (`n1` rows first): over
/// itself; with a buffer slot, its keys and values written into the buffer and its queries
/// attending to the whole buffer; shared, over every rank's tokens (and buffer).
pub(super) fn attend_joint(
    dev: &Device,
    qkv: &Tensor,
    n1: usize,
    attn: Option<&mut JointAttn<'_>>,
    heads: usize,
    head_dim: usize,
) -> Result<Tensor> {
    let slot = match attn {
        None => return attend(dev, qkv, heads, head_dim),
        Some(JointAttn::Shared(sp)) => return sp.attend(dev, 0, qkv, heads, head_dim),
        Some(JointAttn::SharedBuffer(sp, slot)) => {
            let (layer, prompt) = (slot.layer, slot.prompt);
            return sp.attend_with_buffer(
                dev,
                qkv,
                heads,
                head_dim,
                slot.kv_slot(layer, prompt, 0),
            );
        }
        Some(JointAttn::Buffer(slot)) => slot,
    };
    let n2 = qkv.dim(1) - n1;
    let rows = match slot.prompt_first {
        true => (slot.prompt_at, slot.image_at),
        false => (slot.image_at, slot.prompt_at),
    };
    if n1 > 0 {
        slot.buf.write(slot.layer, rows.0, &qkv.narrow(1, 0, n1)?)?;
    }
    if n2 > 0 {
        slot.buf
            .write(slot.layer, rows.1, &qkv.narrow(1, n1, n2)?)?;
    }
    let q = AttnView::of(qkv, 0)?;
    slot.buf
        .attend(dev, slot.layer, q, None, (qkv.dim(0), heads, head_dim))
}

/// SD3.5's image-only attention of `qkv: [B, n, 3d]` (image tokens starting at buffer row
/// `rows.0`), over itself or over the image rows of the slot's second layer.
fn attend_image_only(
    dev: &Device,
    qkv: &Tensor,
    attn: Option<&mut JointAttn<'_>>,
    heads: usize,
    head_dim: usize,
) -> Result<Tensor> {
    let slot = match attn {
        None => return attend(dev, qkv, heads, head_dim),
        Some(JointAttn::Shared(sp)) => return sp.attend(dev, 0, qkv, heads, head_dim),
        Some(JointAttn::SharedBuffer(sp, slot)) => {
            let (layer, s) = (slot.second_layer, slot.image_tokens);
            return sp.attend_with_buffer(dev, qkv, heads, head_dim, slot.kv_slot(layer, 0, s));
        }
        Some(JointAttn::Buffer(slot)) => slot,
    };
    slot.buf.write(slot.second_layer, slot.image_at, qkv)?;
    let q = AttnView::of(qkv, 0)?;
    let dims = (qkv.dim(0), heads, head_dim);
    slot.buf
        .attend(dev, slot.second_layer, q, Some(slot.image_tokens), dims)
}

/// The prompt side of a block.
// One per block, built once: the size difference between the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
enum ContextSide {
    /// Every block but the last: adaLN-Zero (6 chunks), QKV, output projection, MLP.
    Full {
        modulation: Linear, // [6d, d]
        qkv: Qkv,
        out: Linear,
        ff: FeedForward,
    },
    /// The last block: continuous adaLN (`[scale | shift]`) and QKV only.
    PreOnly { modulation: Linear, qkv: Qkv },
}

/// One joint block (see the module documentation).
#[derive(Debug, Clone)]
pub(crate) struct JointBlock {
    /// `norm1.linear`: `[6d, d]`, or `[9d, d]` with the second attention.
    modulation: Linear,
    qkv: Qkv,
    out: Linear,
    /// MMDiT-X: the image-only attention (`attn2`).
    second: Option<(Qkv, Linear)>,
    ff: FeedForward,
    context: ContextSide,
}

/// Chunk `j` of `k` of a `[B, k d]` modulation, as `[B, d]`.
pub(super) fn chunk(m: &Tensor, k: usize, j: usize) -> Result<Tensor> {
    let d = m.dim(1) / k;
    Ok(m.narrow(1, j * d, d)?)
}

impl JointBlock {
    pub(crate) fn load(src: &dyn WeightSource, i: usize, cfg: &Sd3Config) -> Result<JointBlock> {
        let d = cfg.hidden();
        let p = format!("transformer_blocks.{i}");
        let dual = cfg.dual_attention_layers.contains(&i);
        let last = i + 1 == cfg.num_layers;
        let norms = |q: &'static str, k: &'static str| cfg.qk_norm.then_some([q, k]);
        let dims = (d, cfg.head_dim);
        let attn = format!("{p}.attn");
        let qkv = Qkv::load(src, &attn, QKV, norms("norm_q", "norm_k"), dims)?;
        let ctx_qkv = Qkv::load(
            src,
            &attn,
            ADDED_QKV,
            norms("norm_added_q", "norm_added_k"),
            dims,
        )?;
        let context = match last {
            true => ContextSide::PreOnly {
                modulation: Linear::load(src, &format!("{p}.norm1_context.linear"), 2 * d, d)?,
                qkv: ctx_qkv,
            },
            false => ContextSide::Full {
                modulation: Linear::load(src, &format!("{p}.norm1_context.linear"), 6 * d, d)?,
                qkv: ctx_qkv,
                out: Linear::load(src, &format!("{attn}.to_add_out"), d, d)?,
                ff: FeedForward::load(src, &format!("{p}.ff_context"), d)?,
            },
        };
        let second = match dual {
            true => {
                let a2 = format!("{p}.attn2");
                Some((
                    Qkv::load(src, &a2, QKV, norms("norm_q", "norm_k"), dims)?,
                    Linear::load(src, &format!("{a2}.to_out.0"), d, d)?,
                ))
            }
            false => None,
        };
        Ok(JointBlock {
            modulation: Linear::load(
                src,
                &format!("{p}.norm1.linear"),
                if dual { 9 } else { 6 } * d,
                d,
            )?,
            qkv,
            out: Linear::load(src, &format!("{attn}.to_out.0"), d, d)?,
            second,
            ff: FeedForward::load(src, &format!("{p}.ff"), d)?,
            context,
        })
    }

    /// Updates the image tokens `x: [B, n, d]` and the prompt tokens `ctx: [B, T, d]` in place
    /// (`ctx` is left as it was after the last block, which only reads it). `temb_silu` is
    /// `silu(temb)`, `[B, d]`. With a slot the image tokens are one PipeFusion patch and the
    /// attentions read the whole buffer.
    pub(crate) fn forward(
        &self,
        dev: &Device,
        x: &mut Tensor,
        ctx: &mut Tensor,
        temb_silu: &Tensor,
        cfg: &Sd3Config,
        mut slot: Option<JointAttn<'_>>,
    ) -> Result<()> {
        let n = x.dim(1);
        let k = if self.second.is_some() { 9 } else { 6 };
        let m = {
            let _op = op_span!("modulation");
            self.modulation.forward(dev, temb_silu)? // [B, k d]
        };
        let c = |j| chunk(&m, k, j);
        // Image side: shift, scale, gate (attention), shift, scale, gate (MLP)[, shift, scale,
        // gate (second attention)].
        let norm = op_span!("norm");
        let h = dev.layer_norm_modulate(x, &c(0)?, &c(1)?, EPS)?;
        let h2 = match self.second.is_some() {
            true => Some(dev.layer_norm_modulate(x, &c(6)?, &c(7)?, EPS)?),
            false => None,
        };
        drop(norm);
        let (ctx_qkv, cm) = match &self.context {
            ContextSide::Full {
                modulation, qkv, ..
            }
            | ContextSide::PreOnly { modulation, qkv } => {
                let _op = op_span!("modulation");
                (qkv, modulation.forward(dev, temb_silu)?)
            }
        };
        // A sequence-parallel rank without the prompt tokens runs the image side only.
        let t = ctx.dim(1);
        let image_qkv = {
            let _op = op_span!("qkv");
            self.qkv.forward(dev, &h)?
        };
        let joint = if t == 0 {
            image_qkv
        } else {
            let norm = op_span!("norm");
            let hc = match &self.context {
                ContextSide::Full { .. } => {
                    dev.layer_norm_modulate(ctx, &chunk(&cm, 6, 0)?, &chunk(&cm, 6, 1)?, EPS)?
                }
                // AdaLayerNormContinuous: [scale | shift].
                ContextSide::PreOnly { .. } => {
                    dev.layer_norm_modulate(ctx, &chunk(&cm, 2, 1)?, &chunk(&cm, 2, 0)?, EPS)?
                }
            };
            drop(norm);
            // Joint attention over [image tokens; prompt tokens].
            let _op = op_span!("qkv");
            Tensor::cat(&[&image_qkv, &ctx_qkv.forward(dev, &hc)?], 1)?
        };
        let o = {
            let _op = op_span!("attend");
            attend_joint(dev, &joint, n, slot.as_mut(), cfg.num_heads, cfg.head_dim)?
            // [B, n + T, d]
        };
        let a = {
            let _op = op_span!("attn_out");
            self.out.forward(dev, &o.narrow(1, 0, n)?)?
        };
        residual(dev, x, &a, Some(&c(2)?))?;
        if let (Some((qkv2, out2)), Some(h2)) = (&self.second, &h2) {
            let qkv2 = {
                let _op = op_span!("qkv");
                qkv2.forward(dev, h2)?
            };
            let o2 = {
                let _op = op_span!("attend");
                attend_image_only(dev, &qkv2, slot.as_mut(), cfg.num_heads, cfg.head_dim)?
            };
            let a2 = {
                let _op = op_span!("attn_out");
                out2.forward(dev, &o2)?
            };
            residual(dev, x, &a2, Some(&c(8)?))?;
        }
        let h = norm_modulate(dev, x, &c(3)?, &c(4)?, EPS)?;
        let f = self.ff.forward(dev, &h)?;
        residual(dev, x, &f, Some(&c(5)?))?;
        if let (ContextSide::Full { out, ff, .. }, true) = (&self.context, t > 0) {
            let cc = |j| chunk(&cm, 6, j);
            let ac = {
                let _op = op_span!("attn_out");
                out.forward(dev, &o.narrow(1, n, t)?)?
            };
            residual(dev, ctx, &ac, Some(&cc(2)?))?;
            let hc = norm_modulate(dev, ctx, &cc(3)?, &cc(4)?, EPS)?;
            let fc = ff.forward(dev, &hc)?;
            residual(dev, ctx, &fc, Some(&cc(5)?))?;
        }
        Ok(())
    }
}
