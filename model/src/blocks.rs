//! Transformer blocks: DiT (adaLN-Zero, per-block conditioning embedder) and PixArt-alpha
//! (adaLN-single with a per-block `scale_shift_table`, plus cross-attention to the caption).
//! Reference: diffusers 0.42.1 `attention.py::BasicTransformerBlock` with `ada_norm_zero` /
//! `ada_norm_single`, restated in shared/reference/LAYOUT.md §4.

use kernels::{AttnView, Device, Tensor};

use crate::cond::Conditioning;
use crate::config::{Arch, ModelConfig};
use crate::embedding::{Linear, TimestepEmbedding};
use crate::error::{ModelError, Result};
pub(crate) use crate::kv_buffer::KvSlot;
use crate::weights::WeightSource;

/// How a block's self-attention sees the rest of the sequence.
pub(crate) enum AttnMode<'a> {
    /// The tokens given are the whole sequence.
    Local,
    /// PipeFusion: the tokens are one patch; K/V live in a buffer (see [`KvSlot`]).
    Buffer(KvSlot<'a>),
    /// Sequence parallelism: the tokens are this device's shard; the other shards' keys and
    /// values are reached through a collective (`layer` counts the blocks run so far).
    Shared(&'a mut dyn crate::sp::SequenceAttention, usize),
    /// Both: the tokens are this device's sub-strip of a patch; the collective gathers the
    /// patch, whose K/V go into the buffer (this device's head group).
    SharedBuffer(&'a mut dyn crate::sp::SequenceAttention, KvSlot<'a>),
}

/// Self-attention with Q, K, V fused into one `[3d, d]` projection.
#[derive(Debug, Clone)]
struct SelfAttention {
    qkv: Linear,
    out: Linear,
}

impl SelfAttention {
    fn load(src: &dyn WeightSource, name: &str, d: usize) -> Result<Self> {
        let names = ["to_q", "to_k", "to_v"].map(|p| format!("{name}.{p}"));
        Ok(SelfAttention {
            qkv: Linear::load_fused(src, &names, d, d)?,
            out: Linear::load(src, &format!("{name}.to_out.0"), d, d)?,
        })
    }

    /// `x: [B, n, d]` -> `[B, n, d]`. Without a K/V slot the tokens attend to each other; with
    /// one, their K/V are written into the buffer and they attend to the whole buffer.
    fn forward(
        &self,
        dev: &Device,
        x: &Tensor,
        cfg: &ModelConfig,
        mode: AttnMode<'_>,
    ) -> Result<Tensor> {
        let d = cfg.hidden();
        let (b, heads, hd) = (x.dim(0), cfg.num_heads, cfg.head_dim);
        let qkv = {
            let _op = op_span!("qkv");
            self.qkv.forward(dev, x)? // [B, n, 3d]
        };
        let q = AttnView::of(&qkv, 0)?;
        let attend = op_span!("attend");
        let o = match mode {
            AttnMode::Local => {
                let (k, v) = (AttnView::of(&qkv, d)?, AttnView::of(&qkv, 2 * d)?);
                dev.attention(q, k, v, None, b, heads, hd)? // [B, n, d]
            }
            AttnMode::Shared(sp, layer) => sp.attend(dev, layer, &qkv, heads, hd)?,
            AttnMode::SharedBuffer(sp, slot) => {
                sp.attend_with_buffer(dev, &qkv, heads, hd, slot)?
            }
            AttnMode::Buffer(slot) => {
                slot.buf.write(slot.layer, slot.first, &qkv)?;
                slot.buf.attend(dev, slot.layer, q, None, (b, heads, hd))? // [B, n, d]
            }
        };
        drop(attend);
        let _op = op_span!("attn_out");
        self.out.forward(dev, &o)
    }
}

/// Cross-attention from image tokens to caption tokens (PixArt `attn2`).
#[derive(Debug, Clone)]
struct CrossAttention {
    q: Linear,
    kv: Linear,
    out: Linear,
}

impl CrossAttention {
    fn load(src: &dyn WeightSource, name: &str, d: usize) -> Result<Self> {
        let names = ["to_k", "to_v"].map(|p| format!("{name}.{p}"));
        Ok(CrossAttention {
            q: Linear::load(src, &format!("{name}.to_q"), d, d)?,
            kv: Linear::load_fused(src, &names, d, d)?,
            out: Linear::load(src, &format!("{name}.to_out.0"), d, d)?,
        })
    }

    /// `x: [B, n, d]`, `ctx: [B, T, d]`, `bias: [B, T]` -> `[B, n, d]`.
    fn forward(
        &self,
        dev: &Device,
        x: &Tensor,
        ctx: &Tensor,
        bias: Option<&Tensor>,
        cfg: &ModelConfig,
    ) -> Result<Tensor> {
        let d = cfg.hidden();
        let q = self.q.forward(dev, x)?; // [B, n, d]
        let kv = self.kv.forward(dev, ctx)?; // [B, T, 2d]
        let (qv, kv_k, kv_v) = (
            AttnView::of(&q, 0)?,
            AttnView::of(&kv, 0)?,
            AttnView::of(&kv, d)?,
        );
        let o = dev.attention(qv, kv_k, kv_v, bias, x.dim(0), cfg.num_heads, cfg.head_dim)?;
        self.out.forward(dev, &o)
    }
}

/// `net.2(gelu_tanh(net.0.proj(x)))`.
#[derive(Debug, Clone)]
pub(crate) struct FeedForward {
    up: Linear,
    down: Linear,
}

impl FeedForward {
    pub(crate) fn load(src: &dyn WeightSource, name: &str, d: usize) -> Result<Self> {
        Ok(FeedForward {
            up: Linear::load(src, &format!("{name}.net.0.proj"), 4 * d, d)?,
            down: Linear::load(src, &format!("{name}.net.2"), d, 4 * d)?,
        })
    }
    pub(crate) fn forward(&self, dev: &Device, x: &Tensor) -> Result<Tensor> {
        let h = {
            let _op = op_span!("fc1_gelu");
            self.up.forward_gelu_for(&self.down, dev, x)? // [B, n, 4d]
        };
        let _op = op_span!("fc2");
        self.down.forward(dev, &h)
    }
}

/// A DiT block's private conditioning embedder (`norm1.emb`): every diffusers DiT block has its
/// own timestep MLP and class table; the final layer uses block 0's.
#[derive(Debug, Clone)]
pub(crate) struct DitEmbedder {
    timestep: TimestepEmbedding,
    classes: Tensor, // [num_classes + 1, d]
}

impl DitEmbedder {
    pub(crate) fn load(src: &dyn WeightSource, block: usize, cfg: &ModelConfig) -> Result<Self> {
        let p = format!("transformer_blocks.{block}.norm1.emb");
        Ok(DitEmbedder {
            timestep: TimestepEmbedding::load(
                src,
                &format!("{p}.timestep_embedder"),
                256,
                cfg.hidden(),
            )?,
            classes: src.tensor(
                &format!("{p}.class_embedder.embedding_table.weight"),
                &[cfg.num_classes + 1, cfg.hidden()],
            )?,
        })
    }

    /// `c = TimestepEmbedding(features) + classes[labels]`, `[B, d]`.
    pub(crate) fn forward(
        &self,
        dev: &Device,
        t_features: &Tensor,
        labels: &[usize],
    ) -> Result<Tensor> {
        let mut c = self.timestep.forward(dev, t_features)?; // [B, d]
        let y = dev.embedding(&self.classes, labels).map_err(|e| match e {
            kernels::KernelError::Shape { .. } => ModelError::Input(format!("class labels {labels:?} out of range: the model has {} classes plus the null class {}", self.classes.dim(0) - 1, self.classes.dim(0) - 1)),
            other => other.into(),
        })?;
        dev.add_gated_(&mut c, &y, None)?;
        Ok(c)
    }
}

#[derive(Debug, Clone)]
enum Modulation {
    /// DiT: own embedder, then `norm1.linear(silu(c))` -> `[B, 6d]`.
    Dit { emb: DitEmbedder, linear: Linear },
    /// PixArt: `scale_shift_table [6, d]` added to the shared `[B, 6d]` timestep modulation.
    PixArt { table: Tensor },
}

/// One transformer block of either family.
#[derive(Debug, Clone)]
pub(crate) struct Block {
    modulation: Modulation,
    attn: SelfAttention,
    cross: Option<CrossAttention>,
    ff: FeedForward,
}

/// `x += gate * a` (without a gate: `x += a`), a block's residual, timed as the `residual` op.
pub(crate) fn residual(
    dev: &Device,
    x: &mut Tensor,
    a: &Tensor,
    gate: Option<&Tensor>,
) -> Result<()> {
    let _op = op_span!("residual");
    Ok(dev.add_gated_(x, a, gate)?)
}

/// `layer_norm(x) * (1 + scale) + shift`, timed as the `norm` op.
pub(crate) fn norm_modulate(
    dev: &Device,
    x: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    let _op = op_span!("norm");
    Ok(dev.layer_norm_modulate(x, shift, scale, eps)?)
}

/// Chunk `j` of a `[B, 6d]` modulation as `[B, d]` (on the modulation's device).
fn chunk(m: &Tensor, d: usize, j: usize) -> Result<Tensor> {
    Ok(m.narrow(1, j * d, d)?)
}

impl Block {
    pub(crate) fn load(src: &dyn WeightSource, i: usize, cfg: &ModelConfig) -> Result<Block> {
        let d = cfg.hidden();
        let p = format!("transformer_blocks.{i}");
        let modulation = match cfg.arch {
            Arch::Dit => Modulation::Dit {
                emb: DitEmbedder::load(src, i, cfg)?,
                linear: Linear::load(src, &format!("{p}.norm1.linear"), 6 * d, d)?,
            },
            Arch::PixArt => Modulation::PixArt {
                table: src.tensor(&format!("{p}.scale_shift_table"), &[6, d])?,
            },
            Arch::Sd3 | Arch::Flux => {
                return Err(ModelError::Input(
                    "MMDiT blocks are built by the MMDiT slice".into(),
                ))
            }
        };
        let cross = match cfg.arch {
            Arch::Dit | Arch::Sd3 | Arch::Flux => None,
            Arch::PixArt => Some(CrossAttention::load(src, &format!("{p}.attn2"), d)?),
        };
        Ok(Block {
            modulation,
            attn: SelfAttention::load(src, &format!("{p}.attn1"), d)?,
            cross,
            ff: FeedForward::load(src, &format!("{p}.ff"), d)?,
        })
    }

    /// The six modulation vectors `[B, 6d]` (shift, scale, gate for attention; then for the MLP).
    fn modulation(
        &self,
        dev: &Device,
        cond: &Conditioning,
        batch: usize,
        d: usize,
    ) -> Result<Tensor> {
        match (&self.modulation, cond) {
            (Modulation::Dit { emb, linear }, Conditioning::Dit { t_features, labels }) => {
                let c = emb.forward(dev, t_features, labels)?;
                linear.forward(dev, &dev.silu(&c)?)
            }
            (Modulation::PixArt { table }, Conditioning::PixArt { timestep_mod, .. }) => {
                // timestep_mod [B, 6d] plus the block's table [6, d] in every batch row.
                let mut m = timestep_mod.clone().reshape(&[batch, 1, 6 * d])?;
                dev.add_broadcast_(&mut m, &table.clone().reshape(&[1, 6 * d])?)?;
                Ok(m.reshape(&[batch, 6 * d])?)
            }
            _ => Err(ModelError::Input(
                "conditioning of the wrong model family".into(),
            )),
        }
    }

    /// `x: [B, n, d]` updated in place (see [`AttnMode`] for how its self-attention runs).
    pub(crate) fn forward(
        &self,
        dev: &Device,
        x: &mut Tensor,
        cond: &Conditioning,
        cfg: &ModelConfig,
        mode: AttnMode<'_>,
    ) -> Result<()> {
        let (batch, d) = (x.dim(0), cfg.hidden());
        let m = {
            let _op = op_span!("modulation");
            self.modulation(dev, cond, batch, d)?
        };
        let c = |j| chunk(&m, d, j);
        let eps1 = match cfg.arch {
            Arch::Dit | Arch::Sd3 | Arch::Flux => 1e-6,
            Arch::PixArt => cfg.norm_eps,
        };
        let h = norm_modulate(dev, x, &c(0)?, &c(1)?, eps1)?;
        let a = self.attn.forward(dev, &h, cfg, mode)?;
        residual(dev, x, &a, Some(&c(2)?))?;
        if let (
            Some(cross),
            Conditioning::PixArt {
                caption,
                caption_bias,
                ..
            },
        ) = (&self.cross, cond)
        {
            let _op = op_span!("cross_attention");
            let a = cross.forward(dev, x, caption, caption_bias.as_ref(), cfg)?;
            dev.add_gated_(x, &a, None)?;
        }
        let h = norm_modulate(dev, x, &c(3)?, &c(4)?, cfg.norm_eps)?;
        let f = self.ff.forward(dev, &h)?;
        residual(dev, x, &f, Some(&c(5)?))?;
        Ok(())
    }
}
