//! Prompt embeddings from a safetensors file with diffusers' names (no text encoder runs here):
//! PixArt's caption (with attention masks), SD3 / Flux's prompt and pooled embeddings; validated
//! against each other and the model, with errors naming the file and the tensor.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use kernels::Tensor;
use model::Caption;

/// `[B, T, C]` (a `[T, C]` tensor is one caption).
fn as_embeds(path: &Path, name: &str, x: Tensor, channels: usize) -> Result<Tensor> {
    let x = match x.shape().len() {
        2 => {
            let s = x.shape().to_vec();
            x.reshape(&[1, s[0], s[1]])?
        }
        3 => x,
        _ => bail!(
            "{}: `{name}` must be [B, T, C] or [T, C], got {:?}",
            path.display(),
            x.shape()
        ),
    };
    if x.dim(2) != channels || x.dim(0) == 0 || x.dim(1) == 0 {
        bail!(
            "{}: `{name}` is {:?}; the model expects [B, T, {channels}] caption embeddings",
            path.display(),
            x.shape()
        );
    }
    Ok(x)
}

/// A `[B, T]` mask (a `[T]` mask is one caption) matching `embeds`.
fn as_mask(path: &Path, name: &str, m: Tensor, embeds: &Tensor, of: &str) -> Result<Tensor> {
    let m = if m.shape().len() == 1 {
        let t = m.dim(0);
        m.reshape(&[1, t])?
    } else {
        m
    };
    if m.shape() != [embeds.dim(0), embeds.dim(1)] {
        bail!(
            "{}: `{name}` is {:?}, but `{of}` is {:?}: the mask must be [B, T] = [{}, {}]",
            path.display(),
            m.shape(),
            embeds.shape(),
            embeds.dim(0),
            embeds.dim(1)
        );
    }
    Ok(m)
}

/// Repeats a batch-1 tensor `b` times along dim 0 (one negative prompt for every image).
fn broadcast(x: Tensor, b: usize) -> Result<Tensor> {
    if x.dim(0) == b {
        return Ok(x);
    }
    Ok(Tensor::cat(&vec![&x; b], 0)?)
}

/// A `[B, P]` pooled embedding (a `[P]` one is one prompt), broadcast from batch 1 to `b`.
fn as_pooled(path: &Path, name: &str, x: Tensor, b: usize) -> Result<Tensor> {
    let x = match x.shape().len() {
        1 => {
            let p = x.dim(0);
            x.reshape(&[1, p])?
        }
        2 => x,
        _ => bail!(
            "{}: `{name}` must be [B, P] or [P], got {:?}",
            path.display(),
            x.shape()
        ),
    };
    if (x.dim(0) != b && x.dim(0) != 1) || x.dim(1) == 0 {
        bail!(
            "{}: `{name}` is {:?}: it needs a batch of {b} (or 1) like the prompt embeddings",
            path.display(),
            x.shape()
        );
    }
    broadcast(x, b)
}

/// SD3 / Flux: [`read_caption`] plus `pooled_prompt_embeds` [B, P] (required) and, with a
/// negative prompt, `negative_pooled_prompt_embeds` [B or 1, P]; attention masks are refused
/// (these pipelines attend to every prompt token).
pub(crate) fn read_prompt(
    path: &Path,
    mut t: HashMap<String, Tensor>,
    channels: usize,
) -> Result<Caption> {
    let pooled = t.remove("pooled_prompt_embeds").with_context(|| {
        format!(
            "{}: no tensor `pooled_prompt_embeds` (SD3 and Flux need the pooled text embedding)",
            path.display()
        )
    })?;
    let negative_pooled = t.remove("negative_pooled_prompt_embeds");
    for mask in ["prompt_attention_mask", "negative_prompt_attention_mask"] {
        if t.contains_key(mask) {
            bail!(
                "{}: `{mask}`: SD3 and Flux take no attention mask (their pipelines attend to                  every prompt token)",
                path.display()
            );
        }
    }
    let mut c = read_caption(path, t, channels)?;
    let b = c.embeds.dim(0);
    c.pooled = Some(as_pooled(path, "pooled_prompt_embeds", pooled, b)?);
    c.negative_pooled = match (negative_pooled, c.negative.is_some()) {
        (Some(n), true) => Some(as_pooled(path, "negative_pooled_prompt_embeds", n, b)?),
        (None, false) => None,
        (Some(_), false) => bail!(
            "{}: `negative_pooled_prompt_embeds` without `negative_prompt_embeds`",
            path.display()
        ),
        (None, true) => bail!(
            "{}: `negative_prompt_embeds` without `negative_pooled_prompt_embeds` (guidance needs              both)",
            path.display()
        ),
    };
    if let (Some(p), Some(n)) = (&c.pooled, &c.negative_pooled) {
        if p.dim(1) != n.dim(1) {
            bail!(
                "{}: `pooled_prompt_embeds` and `negative_pooled_prompt_embeds` differ in width",
                path.display()
            );
        }
    }
    Ok(c)
}

/// Reads `prompt_embeds` [B, T, C] and optionally `prompt_attention_mask` [B, T],
/// `negative_prompt_embeds` [B or 1, T, C], `negative_prompt_attention_mask` [B or 1, T], from
/// the tensors of the file `path` names.
pub(crate) fn read_caption(
    path: &Path,
    mut t: HashMap<String, Tensor>,
    channels: usize,
) -> Result<Caption> {
    let embeds = t
        .remove("prompt_embeds")
        .with_context(|| format!("{}: no tensor `prompt_embeds`", path.display()))?;
    let embeds = as_embeds(path, "prompt_embeds", embeds, channels)?;
    let b = embeds.dim(0);
    let mask = t
        .remove("prompt_attention_mask")
        .map(|m| as_mask(path, "prompt_attention_mask", m, &embeds, "prompt_embeds"))
        .transpose()?;
    let negative = match t.remove("negative_prompt_embeds") {
        None => {
            if t.contains_key("negative_prompt_attention_mask") {
                bail!(
                    "{}: `negative_prompt_attention_mask` without `negative_prompt_embeds`",
                    path.display()
                );
            }
            None
        }
        Some(u) => {
            let u = as_embeds(path, "negative_prompt_embeds", u, channels)?;
            if (u.dim(0) != b && u.dim(0) != 1) || u.dim(1) != embeds.dim(1) {
                bail!(
                    "{}: `negative_prompt_embeds` is {:?}, `prompt_embeds` is {:?}: the negative prompt needs the same T and a batch of {b} or 1",
                    path.display(),
                    u.shape(),
                    embeds.shape()
                );
            }
            let um = t
                .remove("negative_prompt_attention_mask")
                .map(|m| {
                    as_mask(
                        path,
                        "negative_prompt_attention_mask",
                        m,
                        &u,
                        "negative_prompt_embeds",
                    )
                })
                .transpose()?
                .map(|m| broadcast(m, b))
                .transpose()?;
            Some((broadcast(u, b)?, um))
        }
    };
    if let Some(extra) = t.keys().next() {
        bail!(
            "{}: unexpected tensor `{extra}` (expected prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask)",
            path.display()
        );
    }
    Ok(Caption {
        embeds,
        mask,
        negative,
        pooled: None,
        negative_pooled: None,
    })
}
