//! A request on the wire: what the coordinator's node sends so that every other node rebuilds
//! the identical [`RequestSetup`] (the request as asked, the sampling plan, the scaled initial
//! latent, the patch table). The transport carries it as opaque bytes
//! (`ControlMessage::Begin::spec`); the schema and its version live here.
//!
//! Layout: `b"PFRQ"`, a `u32` LE version ([`REQUEST_VERSION`]), a `u32` LE length and that many
//! bytes of JSON ([`SpecHeader`]: every number of the request, the sampling plan included, f32s
//! printed shortest-round-trip so they come back exactly), then the tensors as `codec` blobs: the
//! initial latent, then the caption tensors the header says are present, in field order
//! (version 2 added SD3 / Flux's pooled embeddings and Flux-dev's embedded guidance). Decoding
//! checks every length before it reads or allocates, and errors name the field.

use std::sync::Arc;

use kernels::Tensor;
use model::sampler::SamplingPlan;
use model::{Caption, ModelConfig, Request};
use serde::{Deserialize, Serialize};
use topology::schedule::ScheduleConfig;

use crate::codec::{put_tensor, take_tensor};
use crate::error::{ClusterError, Result};
use crate::stage::RequestSetup;

/// What opens a request payload.
const MAGIC: &[u8; 4] = b"PFRQ";

/// The request payload's version: a node refuses another (with WIRE_VERSION, the handshake already
/// refuses other builds; this catches a payload written by another layout of the same wire).
pub(crate) const REQUEST_VERSION: u32 = 2;

/// Everything of a request but its tensors.
#[derive(Debug, Serialize, Deserialize)]
struct SpecHeader {
    class_labels: Vec<usize>,
    guidance_scale: f32,
    latent_size: [usize; 2],
    steps: usize,
    /// The sampling plan itself (timesteps and step rules), not the scheduler's config: no node
    /// recomputes it, so every node steps with the same numbers.
    sampling: SamplingPlan,
    patches: Vec<[usize; 2]>,
    warmup: usize,
    stages: usize,
    cfg_degree: usize,
    sp_degree: usize,
    /// Which caption tensors follow the initial latent: embeds, mask, negative, negative mask,
    /// pooled, negative pooled (SD3 / Flux).
    caption: [bool; 6],
    /// Flux.1-dev's embedded guidance scale.
    embedded_guidance: Option<f32>,
}

/// The payload of a request (see the module documentation).
pub(crate) fn encode_request(setup: &RequestSetup, schedule: &ScheduleConfig) -> Result<Vec<u8>> {
    let r = &setup.request;
    let cap = r.caption.as_ref();
    let neg = cap.and_then(|c| c.negative.as_ref());
    let captions = [
        cap.map(|c| &c.embeds),
        cap.and_then(|c| c.mask.as_ref()),
        neg.map(|n| &n.0),
        neg.and_then(|n| n.1.as_ref()),
        cap.and_then(|c| c.pooled.as_ref()),
        cap.and_then(|c| c.negative_pooled.as_ref()),
    ];
    let header = SpecHeader {
        class_labels: r.class_labels.clone(),
        guidance_scale: r.guidance_scale,
        latent_size: r.latent_size,
        steps: schedule.steps,
        sampling: setup.sampling.clone(),
        patches: setup.patches.iter().map(|p| [p.start, p.end]).collect(),
        warmup: setup.warmup,
        stages: schedule.stages,
        cfg_degree: setup.cfg_degree(),
        sp_degree: setup.sp_degree(),
        caption: captions.map(|t| t.is_some()),
        embedded_guidance: r.embedded_guidance,
    };
    let json = serde_json::to_vec(&header)
        .map_err(|e| ClusterError::BadRequest(format!("request header: {e}")))?;
    let mut out = Vec::with_capacity(12 + json.len() + 4 * setup.initial_latent.elem_count());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&REQUEST_VERSION.to_le_bytes());
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    put_tensor(&mut out, &setup.initial_latent)?;
    for t in captions.into_iter().flatten() {
        put_tensor(&mut out, t)?;
    }
    Ok(out)
}

/// Rebuilds the request of a payload on a node (`cfg` is the model it loaded).
pub(crate) fn decode_request(
    cfg: &ModelConfig,
    request: u64,
    payload: &[u8],
) -> Result<(Arc<RequestSetup>, ScheduleConfig)> {
    let bad = |m: String| ClusterError::BadRequest(format!("request payload: {m}"));
    let mut r = payload;
    let mut word = |what: &str| -> Result<[u8; 4]> {
        let (head, rest) = r
            .split_first_chunk::<4>()
            .ok_or_else(|| bad(format!("ends before its {what}")))?;
        r = rest;
        Ok(*head)
    };
    if &word("magic")? != MAGIC {
        return Err(bad("does not start with PFRQ".into()));
    }
    let version = u32::from_le_bytes(word("version")?);
    if version != REQUEST_VERSION {
        return Err(bad(format!(
            "version {version}, this node reads version {REQUEST_VERSION}"
        )));
    }
    let len = u32::from_le_bytes(word("header length")?) as usize;
    if len > r.len() {
        return Err(bad(format!("header of {len} bytes, {} left", r.len())));
    }
    let (json, mut r) = r.split_at(len);
    let h: SpecHeader = serde_json::from_slice(json).map_err(|e| bad(format!("header: {e}")))?;
    if h.steps != h.sampling.timesteps.len() {
        return Err(bad(format!(
            "steps {} but the sampling plan has {} timesteps",
            h.steps,
            h.sampling.timesteps.len()
        )));
    }
    if let Some((i, p)) = h.patches.iter().enumerate().find(|(_, p)| p[0] > p[1]) {
        return Err(bad(format!(
            "patches[{i}]: range {}..{} is reversed",
            p[0], p[1]
        )));
    }
    let noise = take_tensor(&mut r, "noise")?;
    let names = [
        "caption",
        "caption_mask",
        "negative_caption",
        "negative_caption_mask",
        "pooled",
        "negative_pooled",
    ];
    let mut caps: Vec<Option<Tensor>> = Vec::new();
    for (present, name) in h.caption.iter().zip(names) {
        caps.push(match present {
            true => Some(take_tensor(&mut r, name)?),
            false => None,
        });
    }
    if !r.is_empty() {
        return Err(bad(format!("{} bytes after the last tensor", r.len())));
    }
    let [embeds, mask, negative, negative_mask, pooled, negative_pooled]: [Option<Tensor>; 6] =
        caps.try_into().expect("six caption tensors");
    if embeds.is_none() && [&mask, &negative, &pooled].iter().any(|t| t.is_some()) {
        return Err(bad("caption tensors without the prompt embeddings".into()));
    }
    let caption = embeds.map(|embeds| Caption {
        embeds,
        mask,
        negative: negative.map(|n| (n, negative_mask)),
        pooled,
        negative_pooled,
    });
    let req = Request {
        class_labels: h.class_labels,
        caption,
        guidance_scale: h.guidance_scale,
        latent_size: h.latent_size,
        embedded_guidance: h.embedded_guidance,
    };
    let patches = h.patches.iter().map(|p| p[0]..p[1]).collect();
    let setup = RequestSetup::from_plan(request, cfg, &req, h.sampling, noise, patches, h.warmup)?
        .with_cfg_degree(h.cfg_degree)?
        .with_sp_degree(h.sp_degree)?;
    let schedule = ScheduleConfig {
        stages: h.stages,
        patches: setup.patches.len(),
        warmup: setup.warmup,
        steps: h.steps,
    };
    Ok((Arc::new(setup), schedule))
}

/// A final latent as a control payload (one `codec` blob).
pub(crate) fn encode_latent(t: &Tensor) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    put_tensor(&mut out, t)?;
    Ok(out)
}

/// The final latent of a control payload; errors name it.
pub(crate) fn decode_latent(bytes: &[u8]) -> Result<Tensor> {
    decode_tensor(bytes, "final latent")
}

/// The one tensor of a control payload (`what` names it in errors).
pub(crate) fn decode_tensor(bytes: &[u8], what: &str) -> Result<Tensor> {
    let mut r = bytes;
    let t = take_tensor(&mut r, what)?;
    match r.is_empty() {
        true => Ok(t),
        false => Err(ClusterError::BadRequest(format!(
            "{what}: {} bytes after the tensor",
            r.len()
        ))),
    }
}

#[cfg(test)]
#[path = "spec_tests.rs"]
mod tests;
