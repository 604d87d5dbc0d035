//! One generation request as the model sees it: batch, class labels or caption, guidance, latent
//! size. [`PreparedRequest`] turns it into the inputs of every forward (doubled under
//! classifier-free guidance) and applies the guidance to the output. The single-device loop and
//! every pipeline stage use the same code, so both compute the same numbers.

use kernels::Tensor;

use crate::cond::CondInputs;
use crate::config::{Arch, ModelConfig};
use crate::error::{ModelError, Result};
use crate::sampler::guidance::{cfg_combine, take_channels, CfgOrder};

/// Text embeddings (no text encoder runs here): PixArt's caption, SD3 / Flux's prompt.
#[derive(Debug, Clone)]
pub struct Caption {
    /// `[B, T, caption_channels]` (diffusers' `prompt_embeds`).
    pub embeds: Tensor,
    /// PixArt: `[B, T]`, 1 = keep, 0 = padding; all ones when absent.
    pub mask: Option<Tensor>,
    /// Negative prompt embeddings and mask, needed under guidance.
    pub negative: Option<(Tensor, Option<Tensor>)>,
    /// SD3 / Flux: `pooled_prompt_embeds` `[B, pooled_projection_dim]`.
    pub pooled: Option<Tensor>,
    /// SD3 / Flux under guidance: `negative_pooled_prompt_embeds`.
    pub negative_pooled: Option<Tensor>,
}

/// What the user asks for.
#[derive(Debug, Clone)]
pub struct Request {
    /// DiT: one class label per image.
    pub class_labels: Vec<usize>,
    /// PixArt: the caption.
    pub caption: Option<Caption>,
    /// Classifier-free guidance scale; `<= 1` disables guidance.
    pub guidance_scale: f32,
    /// Latent height and width (image pixels / 8).
    pub latent_size: [usize; 2],
    /// Flux.1-dev: the guidance scale the model embeds (diffusers' `guidance_scale` of
    /// FluxPipeline; `guidance_scale` above is then true CFG's).
    pub embedded_guidance: Option<f32>,
}

/// A validated request: the inputs of each forward and the guidance.
#[derive(Debug, Clone)]
pub struct PreparedRequest {
    batch: usize,
    scale: f32,
    guided: bool,
    order: CfgOrder,
    channels: usize,
    labels: Vec<usize>,
    caption: Option<Tensor>,
    caption_mask: Option<Tensor>,
    additional: bool,
    latent_shape: [usize; 4],
    /// SD3 / Flux: pooled text per forward row.
    pooled: Option<Tensor>,
    /// Flux.1-dev: the embedded guidance scale.
    embedded_guidance: Option<f32>,
    /// Prompt tokens inside the attention sequence (MMDiT; 0 for DiT and PixArt).
    text_tokens: usize,
    /// Flux: the prompt tokens come before the image tokens (SD3: after).
    prompt_first: bool,
}

fn ones_mask(e: &Tensor) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        vec![1.0; e.dim(0) * e.dim(1)],
        &[e.dim(0), e.dim(1)],
    )?)
}

impl PreparedRequest {
    /// Validates `req` against the model config.
    pub fn new(cfg: &ModelConfig, req: &Request) -> Result<PreparedRequest> {
        let guided = req.guidance_scale > 1.0;
        let [h, w] = req.latent_size;
        let p = cfg.patch_size;
        if h == 0 || w == 0 || h % p != 0 || w % p != 0 {
            return Err(ModelError::Input(format!(
                "latent size {h}x{w} must be positive multiples of the patch size {p}"
            )));
        }
        let (batch, labels, caption, caption_mask) = match cfg.arch {
            Arch::Dit => {
                if req.class_labels.is_empty() {
                    return Err(ModelError::Input(format!(
                        "a DiT request needs at least one class label (0..{})",
                        cfg.num_classes - 1
                    )));
                }
                if let Some(&bad) = req.class_labels.iter().find(|&&l| l >= cfg.num_classes) {
                    return Err(ModelError::Input(format!(
                        "class label {bad} out of range: the model has classes 0..{}",
                        cfg.num_classes - 1
                    )));
                }
                let b = req.class_labels.len();
                let mut labels = req.class_labels.clone();
                if guided {
                    labels.extend(std::iter::repeat_n(cfg.null_class(), b));
                }
                (b, labels, None, None)
            }
            Arch::PixArt => {
                let c = req.caption.as_ref().ok_or_else(|| {
                    ModelError::Input("a PixArt request needs caption embeddings".into())
                })?;
                let b = c.embeds.dim(0);
                if guided {
                    let (u, um) = c.negative.as_ref().ok_or_else(|| {
                        ModelError::Input(format!(
                            "guidance scale {} needs negative prompt embeddings (or use scale 1)",
                            req.guidance_scale
                        ))
                    })?;
                    let cm = c.mask.clone().map_or_else(|| ones_mask(&c.embeds), Ok)?;
                    let um = um.clone().map_or_else(|| ones_mask(u), Ok)?;
                    (
                        b,
                        Vec::new(),
                        Some(Tensor::cat(&[u, &c.embeds], 0)?),
                        Some(Tensor::cat(&[&um, &cm], 0)?),
                    )
                } else {
                    (b, Vec::new(), Some(c.embeds.clone()), c.mask.clone())
                }
            }
            Arch::Sd3 | Arch::Flux => return mmdit_request(cfg, req, guided),
        };
        Ok(PreparedRequest {
            batch,
            scale: req.guidance_scale,
            guided,
            order: match cfg.arch {
                Arch::Dit => CfgOrder::CondFirst,
                _ => CfgOrder::UncondFirst,
            },
            channels: cfg.in_channels,
            labels,
            caption,
            caption_mask,
            additional: cfg.use_additional_conditions,
            latent_shape: [batch, cfg.in_channels, h, w],
            pooled: None,
            embedded_guidance: None,
            text_tokens: 0,
            prompt_first: false,
        })
    }

    /// Prompt tokens that join the image tokens in every self-attention (SD3 / Flux: T; DiT
    /// and PixArt: 0). A stage frame holds them after (SD3) or before (Flux) the image tokens.
    pub fn text_tokens(&self) -> usize {
        self.text_tokens
    }

    /// Whether the prompt tokens come before the image tokens in the sequence (Flux) or after
    /// them (SD3).
    pub fn prompt_first(&self) -> bool {
        self.prompt_first
    }

    /// Images in the request (B).
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Rows of one forward (B' = 2B under guidance).
    pub fn forward_batch(&self) -> usize {
        if self.guided {
            2 * self.batch
        } else {
            self.batch
        }
    }

    /// `[B, C, H, W]` of the latent.
    pub fn latent_shape(&self) -> [usize; 4] {
        self.latent_shape
    }

    /// The conditioning inputs of a forward at timestep `t`.
    pub fn inputs(&self, t: f32) -> CondInputs {
        let n = self.forward_batch();
        let [_, _, h, w] = self.latent_shape;
        let (hp, wp) = ((h * 8) as f32, (w * 8) as f32);
        CondInputs {
            timesteps: vec![t; n],
            class_labels: self.labels.clone(),
            caption: self.caption.clone(),
            caption_mask: self.caption_mask.clone(),
            resolution: self.additional.then(|| vec![[hp, wp]; n]),
            aspect_ratio: self.additional.then(|| vec![hp / wp; n]),
            pooled: self.pooled.clone(),
            guidance: self.embedded_guidance.map(|g| vec![g; n]),
            latent_size: [h, w],
        }
    }

    /// The model input for latent (or latent strip) `x: [B, C, h, W]`: doubled under guidance.
    pub fn model_input(&self, x: &Tensor) -> Result<Tensor> {
        Ok(if self.guided {
            Tensor::cat(&[x, x], 0)?
        } else {
            x.clone()
        })
    }

    /// Branches of classifier-free guidance: 2 when guided, else 1.
    pub fn cfg_branches(&self) -> usize {
        if self.guided {
            2
        } else {
            1
        }
    }

    /// The request one CFG-parallel device group runs (ALGORITHMS.md section 3): the rows
    /// `branch * B .. (branch + 1) * B` of the doubled batch (DiT: 0 = conditional, 1 = null
    /// class; PixArt, SD3, Flux: 0 = negative prompt, 1 = prompt), unguided, so `forward_batch` is B and
    /// `model_input` does not double. Concatenating the branches' outputs along the batch in
    /// branch order and passing that to *this* request's [`guide`](Self::guide) gives what one
    /// device computes.
    pub fn cfg_branch(&self, branch: usize) -> Result<PreparedRequest> {
        if !self.guided || branch > 1 {
            return Err(ModelError::Input(format!(
                "CFG branch {branch} of a request with {} branch(es) (CFG parallel needs a \
                 guidance scale above 1)",
                self.cfg_branches()
            )));
        }
        let b = self.batch;
        let rows = |t: &Option<Tensor>| -> Result<Option<Tensor>> {
            t.as_ref()
                .map(|t| Ok(t.narrow(0, branch * b, b)?))
                .transpose()
        };
        Ok(PreparedRequest {
            guided: false,
            labels: if self.labels.is_empty() {
                Vec::new()
            } else {
                self.labels[branch * b..(branch + 1) * b].to_vec()
            },
            caption: rows(&self.caption)?,
            caption_mask: rows(&self.caption_mask)?,
            pooled: rows(&self.pooled)?,
            ..self.clone()
        })
    }

    /// The prediction the sampler uses, from a model output `[B', C_out, h, W]`: guided
    /// combination (or just the first C channels) -> `[B, C, h, W]`.
    pub fn guide(&self, out: &Tensor) -> Result<Tensor> {
        if self.guided {
            cfg_combine(out, self.channels, self.scale, self.order)
        } else {
            take_channels(out, self.channels)
        }
    }
}

/// An SD3 / Flux request: prompt and pooled embeddings (negative ones first under guidance, as
/// `StableDiffusion3Pipeline` concatenates them), Flux-dev's embedded guidance.
fn mmdit_request(cfg: &ModelConfig, req: &Request, guided: bool) -> Result<PreparedRequest> {
    let [h, w] = req.latent_size;
    let name = format!("{:?}", cfg.arch);
    let c = req.caption.as_ref().ok_or_else(|| {
        ModelError::Input(format!(
            "a {name} request needs prompt_embeds and pooled_prompt_embeds"
        ))
    })?;
    let pooled = c
        .pooled
        .as_ref()
        .ok_or_else(|| ModelError::Input(format!("a {name} request needs pooled_prompt_embeds")))?;
    if c.mask.is_some() {
        return Err(ModelError::Input(format!(
            "{name} takes no prompt attention mask (its pipelines attend to every prompt token)"
        )));
    }
    if let Some(crate::mmdit::MmditConfig::Sd3(s)) = &cfg.mmdit {
        let (rows, cols, max) = (h / cfg.patch_size, w / cfg.patch_size, s.pos_embed_max_size);
        if rows > max || cols > max {
            return Err(ModelError::Input(format!(
                "a {rows} x {cols} token grid ({}x{} latent) exceeds this SD3 model's position \
                 table of {max} x {max} tokens (pos_embed_max_size): at most {} latent pixels a \
                 side",
                h,
                w,
                max * cfg.patch_size
            )));
        }
    }
    let b = c.embeds.dim(0);
    let check = |what: &str, e: &Tensor, p: &Tensor| -> Result<()> {
        let ok = e.shape().len() == 3
            && e.dim(0) == b
            && e.dim(2) == cfg.caption_channels
            && p.shape().len() == 2
            && p.dim(0) == b;
        match ok {
            true => Ok(()),
            false => Err(ModelError::Input(format!(
                "{what}: prompt embeddings {:?} must be [{b}, T, {}] and pooled {:?} [{b}, P]",
                e.shape(),
                cfg.caption_channels,
                p.shape()
            ))),
        }
    };
    check("prompt", &c.embeds, pooled)?;
    let flux_dev =
        matches!(&cfg.mmdit, Some(crate::mmdit::MmditConfig::Flux(f)) if f.guidance_embeds);
    let embedded_guidance = match (flux_dev, req.embedded_guidance) {
        (true, Some(g)) => Some(g),
        (true, None) => return Err(ModelError::Input(
            "this Flux model embeds the guidance scale: give one (FluxPipeline's default is 3.5)"
                .into(),
        )),
        (false, Some(g)) => {
            return Err(ModelError::Input(format!(
                "embedded guidance {g}: only Flux models with guidance_embeds take it"
            )))
        }
        (false, None) => None,
    };
    let (caption, pooled) = if guided {
        let (Some((neg, neg_mask)), Some(neg_pooled)) = (&c.negative, &c.negative_pooled) else {
            return Err(ModelError::Input(format!(
                "guidance scale {} needs negative_prompt_embeds and negative_pooled_prompt_embeds                  (or use scale 1)",
                req.guidance_scale
            )));
        };
        if neg_mask.is_some() {
            return Err(ModelError::Input(format!(
                "{name} takes no negative prompt mask"
            )));
        }
        check("negative prompt", neg, neg_pooled)?;
        if neg.dim(1) != c.embeds.dim(1) {
            return Err(ModelError::Input(format!(
                "negative_prompt_embeds has {} tokens, prompt_embeds {}: they must match",
                neg.dim(1),
                c.embeds.dim(1)
            )));
        }
        (
            Tensor::cat(&[neg, &c.embeds], 0)?,
            Tensor::cat(&[neg_pooled, pooled], 0)?,
        )
    } else {
        (c.embeds.clone(), pooled.clone())
    };
    Ok(PreparedRequest {
        batch: b,
        scale: req.guidance_scale,
        guided,
        order: CfgOrder::UncondFirst,
        channels: cfg.in_channels,
        labels: Vec::new(),
        text_tokens: caption.dim(1),
        caption: Some(caption),
        caption_mask: None,
        additional: false,
        latent_shape: [b, cfg.in_channels, h, w],
        pooled: Some(pooled),
        embedded_guidance,
        prompt_first: cfg.arch == Arch::Flux,
    })
}
