//! One generation request as the model sees it: batch, class labels or caption, guidance, latent
//! size. [`PreparedRequest`] turns it into the inputs of every forward (doubled under
//! classifier-free guidance) and applies the guidance to the output. The single-device loop and
//! every pipeline stage use the same code, so both compute the same numbers.

use kernels::Tensor;

use crate::cond::CondInputs;
use crate::config::{Arch, ModelConfig};
use crate::error::{ModelError, Result};
use crate::sampler::guidance::{cfg_combine, take_channels, CfgOrder};

/// PixArt caption embeddings (no text encoder runs here).
#[derive(Debug, Clone)]
pub struct Caption {
    /// `[B, T, caption_channels]`.
    pub embeds: Tensor,
    /// `[B, T]`, 1 = keep, 0 = padding; all ones when absent.
    pub mask: Option<Tensor>,
    /// Negative prompt embeddings and mask, needed under guidance.
    pub negative: Option<(Tensor, Option<Tensor>)>,
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
        };
        Ok(PreparedRequest {
            batch,
            scale: req.guidance_scale,
            guided,
            order: match cfg.arch {
                Arch::Dit => CfgOrder::CondFirst,
                Arch::PixArt => CfgOrder::UncondFirst,
            },
            channels: cfg.in_channels,
            labels,
            caption,
            caption_mask,
            additional: cfg.use_additional_conditions,
            latent_shape: [batch, cfg.in_channels, h, w],
        })
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
    /// class; PixArt: 0 = negative prompt, 1 = prompt), unguided, so `forward_batch` is B and
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
