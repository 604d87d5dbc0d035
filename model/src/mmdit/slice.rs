//! An MMDiT model as the runtime runs it: a slice of blocks for one pipeline stage, working on
//! one part of the image (a PipeFusion patch of token rows, or the whole image) together with the
//! prompt tokens. [`crate::Transformer`] delegates to it for `Arch::Sd3` / `Arch::Flux`.
//!
//! **The stage frame.** Between stages a part travels as one tensor `[B', n + T, d]`: its `n`
//! image tokens and the `T` prompt tokens, in the model's own order (SD3 `[image; prompt]`,
//! Flux `[prompt; image]`). Every part carries its own prompt stream: stage 0 embeds the prompt
//! for each part, each stage's blocks update it with the part's attention, and the last stage
//! drops it (only image tokens reach the head).
//!
//! **PipeFusion K/V buffer.** A stage keeps, per joint attention it owns, the keys and values of
//! all `S` image tokens *and* the `T` prompt tokens, `[B', S + T, 2d]`, laid out in the model's
//! order (SD3: image rows `0..S`, prompt rows `S..S+T`; Flux: prompt rows `0..T`, image rows
//! `T..T+S`). A part writes its image rows and the prompt rows (always fresh: the part's own
//! prompt stream), then attends to the whole buffer: image rows of parts already run this step
//! are fresh, the others one step stale, never-written ones masked. SD3.5's image-only second
//! attentions have their own layers (rows `0..S`). With one part covering the whole image this
//! is the serial forward, bit for bit (same key order, same tiles).
//! The semantics and the comparison with xDiT are in ARCHITECTURE.md ("MMDiT under PipeFusion").

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use kernels::{Device, Tensor};

use crate::cond::{CondInputs, Conditioning};
use crate::dit::{bring, on_device};
use crate::embedding::{pos_embed_2d_window, Linear, PatchEmbed};
use crate::error::{ModelError, Result};
use crate::kv_buffer::KvBuffer;
use crate::weights::WeightSource;

use super::block::{JointAttn, JointBlock, JointSlot};
use super::flux_blocks::{rope_tables, DoubleBlock, SingleBlock};
use super::shared::{OutputHead, TimeTextEmbed};
use super::{image_ids, unpack_latents, FluxConfig, MmditConfig, Sd3Config};
use crate::sp::SequenceAttention;

enum Body {
    Sd3 {
        cfg: Sd3Config,
        patch_embed: Option<PatchEmbed>,
        blocks: Vec<JointBlock>,
        /// Buffer layer of each block's second attention (MMDiT-X), if it has one.
        second: Vec<Option<usize>>,
    },
    Flux {
        cfg: FluxConfig,
        x_embedder: Option<Linear>,
        double: Vec<DoubleBlock>,
        single: Vec<SingleBlock>,
    },
}

/// Rotary tables `(cos, sin)` of one frame, keyed by (first image token, image tokens, columns,
/// prompt tokens).
type RopeCache = HashMap<(usize, usize, usize, usize), Arc<(Tensor, Tensor)>>;

/// Blocks `range` of an SD3 or Flux model (see the module documentation).
pub(crate) struct MmditSlice {
    body: Body,
    range: Range<usize>,
    time_text: TimeTextEmbed,
    /// Stage 0: `context_embedder`.
    context_embedder: Option<Linear>,
    /// Last stage.
    head: Option<OutputHead>,
    rope: Mutex<RopeCache>,
}

impl MmditSlice {
    /// Loads blocks `range` (Flux: double-stream blocks first, then single-stream) and the
    /// embeddings or head when the range starts at 0 or ends at the last block.
    pub(crate) fn load(
        m: &MmditConfig,
        src: &dyn WeightSource,
        range: Range<usize>,
    ) -> Result<Self> {
        let (d, layers) = match m {
            MmditConfig::Sd3(c) => (c.hidden(), c.num_layers),
            MmditConfig::Flux(c) => (c.hidden(), c.num_layers + c.num_single_layers),
        };
        let (first, last) = (range.start == 0, range.end == layers);
        let body = match m {
            MmditConfig::Sd3(c) => {
                let blocks = range
                    .clone()
                    .map(|i| JointBlock::load(src, i, c))
                    .collect::<Result<Vec<_>>>()?;
                let mut next = blocks.len();
                let second = range
                    .clone()
                    .map(|i| {
                        c.dual_attention_layers.contains(&i).then(|| {
                            next += 1;
                            next - 1
                        })
                    })
                    .collect();
                Body::Sd3 {
                    patch_embed: first
                        .then(|| PatchEmbed::load(src, d, c.in_channels, c.patch_size))
                        .transpose()?,
                    blocks,
                    second,
                    cfg: c.clone(),
                }
            }
            MmditConfig::Flux(c) => {
                let l = c.num_layers;
                Body::Flux {
                    x_embedder: first
                        .then(|| Linear::load(src, "x_embedder", d, c.in_channels))
                        .transpose()?,
                    double: (range.start.min(l)..range.end.min(l))
                        .map(|i| DoubleBlock::load(src, i, c))
                        .collect::<Result<_>>()?,
                    single: (range.start.max(l) - l..range.end.max(l) - l)
                        .map(|i| SingleBlock::load(src, i, c))
                        .collect::<Result<_>>()?,
                    cfg: c.clone(),
                }
            }
        };
        let (pooled, guidance, prompt_width, out) = match m {
            MmditConfig::Sd3(c) => (
                c.pooled_projection_dim,
                false,
                c.joint_attention_dim,
                c.patch_size * c.patch_size * c.out_channels,
            ),
            MmditConfig::Flux(c) => (
                c.pooled_projection_dim,
                c.guidance_embeds,
                c.joint_attention_dim,
                c.out_channels,
            ),
        };
        Ok(MmditSlice {
            body,
            range,
            time_text: TimeTextEmbed::load(src, d, pooled, guidance)?,
            context_embedder: first
                .then(|| Linear::load(src, "context_embedder", d, prompt_width))
                .transpose()?,
            head: last.then(|| OutputHead::load(src, d, out)).transpose()?,
            rope: Mutex::new(HashMap::new()),
        })
    }

    /// Layers of the K/V buffer: one per block, plus one per MMDiT-X second attention.
    pub(crate) fn kv_layers(&self) -> usize {
        match &self.body {
            Body::Sd3 { blocks, second, .. } => blocks.len() + second.iter().flatten().count(),
            Body::Flux { double, single, .. } => double.len() + single.len(),
        }
    }

    fn hidden(&self) -> usize {
        match &self.body {
            Body::Sd3 { cfg, .. } => cfg.hidden(),
            Body::Flux { cfg, .. } => cfg.hidden(),
        }
    }

    fn prompt_first(&self) -> bool {
        matches!(self.body, Body::Flux { .. })
    }

    /// The conditioning of one forward: `silu(temb)` from the timesteps (scheduler units, sigma
    /// x 1000), Flux-dev's guidance and the pooled text; on stage 0 the embedded prompt.
    pub(crate) fn conditioning(&self, dev: &Device, inputs: &CondInputs) -> Result<Conditioning> {
        let b = inputs.batch();
        let prompt = inputs.caption.as_ref().ok_or_else(|| {
            ModelError::Input("an MMDiT forward needs prompt embeddings (prompt_embeds)".into())
        })?;
        let pooled = inputs.pooled.as_ref().ok_or_else(|| {
            ModelError::Input("an MMDiT forward needs pooled_prompt_embeds".into())
        })?;
        if prompt.shape().len() != 3 || prompt.dim(0) != b || pooled.dim(0) != b {
            return Err(ModelError::Input(format!(
                "prompt_embeds {:?} and pooled_prompt_embeds {:?} must have the batch {b} of the \
                 timesteps",
                prompt.shape(),
                pooled.shape()
            )));
        }
        let flux = self.prompt_first();
        // FluxPipeline passes t / 1000 and the model multiplies by 1000 again (f32 both ways).
        let scale = |v: &[f32]| -> Vec<f32> { v.iter().map(|x| x / 1000.0 * 1000.0).collect() };
        let guidance: Option<Vec<f32>> = match (&self.body, &inputs.guidance) {
            (Body::Flux { cfg, .. }, Some(g)) if cfg.guidance_embeds && g.len() == b => {
                Some(g.iter().map(|x| x * 1000.0).collect())
            }
            (Body::Flux { cfg, .. }, g) if cfg.guidance_embeds => {
                return Err(ModelError::Input(format!(
                    "this Flux model embeds the guidance scale: one per image needed, got {}",
                    g.as_ref().map_or(0, |g| g.len())
                )))
            }
            _ => None,
        };
        let t = match flux {
            true => scale(&inputs.timesteps),
            false => inputs.timesteps.clone(),
        };
        let p = match &self.body {
            Body::Sd3 { cfg, .. } => cfg.patch_size,
            Body::Flux { .. } => 2,
        };
        dev.install(|| {
            let temb = self
                .time_text
                .forward(dev, &t, guidance.as_deref(), pooled)?;
            let context = self
                .context_embedder
                .as_ref()
                .map(|e| e.forward(dev, &*on_device(dev, prompt)?))
                .transpose()?;
            Ok(Conditioning::Mmdit {
                temb_silu: dev.silu(&temb)?,
                context,
                text: prompt.dim(1),
                cols: inputs.latent_size[1] / p,
                holds_prompt: true,
            })
        })
    }

    /// Stage 0: the frame `[B', n + T, d]` of a latent strip `[B', C, rows*p, W]` whose first
    /// token row is `first_row` of an image `grid_rows` token rows high.
    pub(crate) fn embed(
        &self,
        dev: &Device,
        strip: &Tensor,
        first_row: usize,
        grid_rows: usize,
        cond: &Conditioning,
    ) -> Result<Tensor> {
        let ctx = match cond {
            Conditioning::Mmdit {
                context: Some(c), ..
            } => Some(c),
            // A sequence-parallel rank without the prompt.
            Conditioning::Mmdit {
                holds_prompt: false,
                ..
            } => None,
            _ => {
                return Err(ModelError::Input(format!(
                    "blocks {:?} do not include the embeddings (stage 0), or the conditioning is \
                     not an MMDiT model's",
                    self.range
                )))
            }
        };
        let x = match &self.body {
            Body::Sd3 {
                cfg,
                patch_embed: Some(pe),
                ..
            } => {
                let (p, max) = (cfg.patch_size, cfg.pos_embed_max_size);
                let (rows, cols) = (strip.dim(2) / p, strip.dim(3) / p);
                if grid_rows > max || cols > max || first_row + rows > grid_rows {
                    return Err(ModelError::Input(format!(
                        "a {grid_rows} x {cols} token grid exceeds the position table's {max} x \
                         {max} (pos_embed_max_size), or rows {first_row}..{} are outside it",
                        first_row + rows
                    )));
                }
                let (top, left) = ((max - grid_rows) / 2, (max - cols) / 2);
                let r0 = top + first_row;
                let pos = pos_embed_2d_window(
                    cfg.hidden(),
                    (max, max),
                    cfg.sample_size / p,
                    1.0,
                    r0..r0 + rows,
                    left..left + cols,
                );
                let pos = dev.import(Tensor::from_vec(pos, &[rows * cols, cfg.hidden()])?)?;
                let mut x = pe.forward(dev, strip)?;
                dev.add_broadcast_(&mut x, &pos)?;
                x
            }
            Body::Flux {
                x_embedder: Some(e),
                ..
            } => e.forward(dev, &dev.import(super::pack_latents(dev, strip)?)?)?,
            _ => {
                return Err(ModelError::Input(format!(
                    "blocks {:?} do not include the patch embedding (stage 0)",
                    self.range
                )))
            }
        };
        Ok(match (ctx, self.prompt_first()) {
            (None, _) => x,
            (Some(ctx), true) => Tensor::cat(&[ctx, &x], 1)?,
            (Some(ctx), false) => Tensor::cat(&[&x, ctx], 1)?,
        })
    }

    /// Runs the slice's blocks on a frame `x: [B', n + T, d]` (see [`PartMode`]).
    pub(crate) fn run(
        &self,
        dev: &Device,
        x: &mut Tensor,
        cond: &Conditioning,
        mode: PartMode<'_>,
    ) -> Result<()> {
        let Conditioning::Mmdit {
            temb_silu,
            text,
            cols,
            holds_prompt,
            ..
        } = cond
        else {
            return Err(ModelError::Input(
                "conditioning of the wrong model family".into(),
            ));
        };
        // T: the request's prompt tokens; t: those in this frame (a sequence-parallel rank
        // without the prompt has none).
        let (big_t, d) = (*text, self.hidden());
        let t = if *holds_prompt { big_t } else { 0 };
        if x.shape().len() != 3 || x.dim(1) < t || x.dim(2) != d || x.dim(0) != temb_silu.dim(0) {
            return Err(ModelError::Input(format!(
                "frame {:?} must be [{}, n + {t}, {d}] (image tokens and {t} prompt tokens)",
                x.shape(),
                temb_silu.dim(0)
            )));
        }
        let n = x.dim(1) - t;
        // A frame from the wire or another device arrives in host memory.
        bring(dev, x)?;
        // This frame's first image token; the image tokens whose buffer rows it writes (the
        // whole part's under sequence parallelism: the ranks gather them).
        let (mut kv, mut sp, first, written) = match mode {
            PartMode::Whole => (None, None, 0, 0..0),
            PartMode::Buffer(buf, first) => (Some(buf), None, first, first..first + n),
            PartMode::Shared(sp, first) => (None, Some(sp), first, 0..0),
            PartMode::SharedBuffer(sp, buf, first, part) => (Some(buf), Some(sp), first, part),
        };
        // Buffer rows of the frame's (or gathered part's) image tokens and of the prompt.
        let mut image_tokens = n;
        let rows = if let Some(buf) = kv.as_mut() {
            let total = buf.dims().1;
            if total < big_t + written.end || !written.contains(&first) && n > 0 {
                return Err(ModelError::Input(format!(
                    "image tokens {}..{} and {big_t} prompt tokens do not fit the K/V buffer's \
                     {total} rows",
                    written.start, written.end
                )));
            }
            image_tokens = total - big_t;
            let (image_at, prompt_at) = match self.prompt_first() {
                true => (big_t + written.start, 0),
                false => (written.start, image_tokens),
            };
            buf.mark_written(image_at, written.len())?;
            buf.mark_written(prompt_at, big_t)?;
            (image_at, prompt_at)
        } else {
            (0, n)
        };
        let pf = self.prompt_first();
        dev.install(|| match &self.body {
            Body::Sd3 {
                cfg,
                blocks,
                second,
                ..
            } => {
                let mut img = x.narrow(1, 0, n)?;
                let mut ctx = x.narrow(1, n, t)?;
                for (i, block) in blocks.iter().enumerate() {
                    let _span =
                        tracing::trace_span!("joint block", i = self.range.start + i).entered();
                    let sec = second[i].unwrap_or(0);
                    let s = joint_attn(&mut kv, &mut sp, i, sec, rows, big_t, pf, image_tokens);
                    block.forward(dev, &mut img, &mut ctx, temb_silu, cfg, s)?;
                }
                *x = Tensor::cat(&[&img, &ctx], 1)?;
                Ok(())
            }
            Body::Flux {
                cfg,
                double,
                single,
                ..
            } => {
                let rope = self.rope_for(dev, first, n, *cols, t, &cfg.axes_dims_rope)?;
                if !double.is_empty() {
                    let mut ctx = x.narrow(1, 0, t)?;
                    let mut img = x.narrow(1, t, n)?;
                    for (i, block) in double.iter().enumerate() {
                        let _span = tracing::trace_span!("double block", i).entered();
                        let s = joint_attn(&mut kv, &mut sp, i, 0, rows, big_t, pf, image_tokens);
                        block.forward(dev, &mut img, &mut ctx, temb_silu, &rope, cfg, s)?;
                    }
                    *x = Tensor::cat(&[&ctx, &img], 1)?;
                }
                for (j, block) in single.iter().enumerate() {
                    let _span = tracing::trace_span!("single block", j).entered();
                    let l = double.len() + j;
                    let s = joint_attn(&mut kv, &mut sp, l, 0, rows, big_t, pf, image_tokens);
                    block.forward(dev, x, t, temb_silu, &rope, cfg, s)?;
                }
                Ok(())
            }
        })
    }

    /// Rotary tables of a frame: `t` prompt tokens at position 0, then image tokens
    /// `first..first + n` of a grid `cols` wide, f32 in `dev`'s memory (cached: a request has
    /// few distinct parts).
    fn rope_for(
        &self,
        dev: &Device,
        first: usize,
        n: usize,
        cols: usize,
        t: usize,
        axes: &[usize],
    ) -> Result<Arc<(Tensor, Tensor)>> {
        if cols == 0 {
            return Err(ModelError::Input(
                "the request did not give the latent size (Flux positions need the width)".into(),
            ));
        }
        let key = (first, n, cols, t);
        let mut cache = self.rope.lock().expect("rope cache poisoned");
        if let Some(r) = cache.get(&key) {
            return Ok(r.clone());
        }
        let mut ids = vec![[0.0f32; 3]; t];
        let rows = (first + n).div_ceil(cols);
        ids.extend(image_ids(rows, cols).into_iter().skip(first).take(n));
        let (cos, sin) = rope_tables(&ids, axes, 10_000.0)?;
        let r = Arc::new((dev.import_f32(cos)?, dev.import_f32(sin)?));
        if cache.len() >= 64 {
            cache.clear();
        }
        cache.insert(key, r.clone());
        Ok(r)
    }

    /// Last stage: the image tokens of a frame -> the model output `[B', C_out, rows*p, width]`
    /// of a strip `token_rows` high and `width` latent pixels wide.
    pub(crate) fn head(
        &self,
        dev: &Device,
        x: &Tensor,
        cond: &Conditioning,
        token_rows: usize,
        width: usize,
    ) -> Result<Tensor> {
        let (
            Some(head),
            Conditioning::Mmdit {
                temb_silu,
                text,
                holds_prompt,
                ..
            },
        ) = (&self.head, cond)
        else {
            return Err(ModelError::Input(format!(
                "blocks {:?} do not include the final layer (last stage), or the conditioning is \
                 not an MMDiT model's",
                self.range
            )));
        };
        let t = if *holds_prompt { *text } else { 0 };
        let n = x.dim(1).checked_sub(t).ok_or_else(|| {
            ModelError::Input(format!("frame {:?} has fewer than {t} rows", x.shape()))
        })?;
        dev.install(|| match &self.body {
            Body::Sd3 { cfg, .. } => {
                let tok = head.forward(dev, &x.narrow(1, 0, n)?, temb_silu)?;
                let p = cfg.patch_size;
                Ok(dev.unpatchify(&tok, cfg.out_channels, token_rows, width, p)?)
            }
            Body::Flux { .. } => {
                let tok = head.forward(dev, &x.narrow(1, t, n)?, temb_silu)?;
                unpack_latents(&tok, 2 * token_rows, width)
            }
        })
    }
}

/// How a part's attention reaches the rest of the sequence.
pub(crate) enum PartMode<'a> {
    /// The frame is the whole image (and the prompt).
    Whole,
    /// PipeFusion: the frame's image tokens start at image token `first`; attention reads the
    /// whole buffer.
    Buffer(&'a mut KvBuffer, usize),
    /// Sequence parallelism: the frame is this rank's shard (its image tokens start at `first`;
    /// the prompt rows are there on the rank that holds them); attention goes through the
    /// collective.
    Shared(&'a mut dyn SequenceAttention, usize),
    /// Both: this rank's sub-strip (image tokens from `first`) of a part whose image tokens are
    /// `part`; the collective gathers the part into the buffer of this rank's head group.
    SharedBuffer(
        &'a mut dyn SequenceAttention,
        &'a mut KvBuffer,
        usize,
        std::ops::Range<usize>,
    ),
}

/// Block `layer`'s attention mode (`second`: its MMDiT-X attention's buffer layer; `rows`: the
/// buffer rows of the part's first image token and of the prompt).
#[allow(clippy::too_many_arguments)]
fn joint_attn<'a>(
    kv: &'a mut Option<&mut KvBuffer>,
    sp: &'a mut Option<&mut dyn SequenceAttention>,
    layer: usize,
    second: usize,
    (image_at, prompt_at): (usize, usize),
    prompt: usize,
    prompt_first: bool,
    image_tokens: usize,
) -> Option<JointAttn<'a>> {
    let slot = kv.as_mut().map(|buf| JointSlot {
        buf,
        layer,
        second_layer: second,
        image_at,
        prompt_at,
        prompt,
        prompt_first,
        image_tokens,
    });
    match (sp.as_mut(), slot) {
        (Some(sp), Some(slot)) => Some(JointAttn::SharedBuffer(&mut **sp, slot)),
        (Some(sp), None) => Some(JointAttn::Shared(&mut **sp)),
        (None, slot) => slot.map(JointAttn::Buffer),
    }
}
