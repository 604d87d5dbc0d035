//! A request on the wire: what the coordinator's node sends so that every other node rebuilds
//! the identical [`RequestSetup`] (the request as asked, the sampling plan, the scaled initial
//! latent, the patch table), and the conversions between tensors and wire tensors.

use std::sync::Arc;

use kernels::Tensor;
use model::{Caption, ModelConfig, Request};
use topology::schedule::ScheduleConfig;
use transport::{RequestSpec, WireTensor};

use crate::error::{ClusterError, Result};
use crate::stage::RequestSetup;

pub(crate) fn to_wire(t: &Tensor) -> Result<WireTensor> {
    Ok(WireTensor {
        shape: t.shape().iter().map(|&d| d as u32).collect(),
        data: t.as_f32()?.to_vec(),
    })
}

pub(crate) fn from_wire(w: &WireTensor) -> Result<Tensor> {
    let shape: Vec<usize> = w.shape.iter().map(|&d| d as usize).collect();
    Ok(Tensor::from_vec(w.data.clone(), &shape)?)
}

fn opt(t: Option<&Tensor>) -> Result<Option<WireTensor>> {
    t.map(to_wire).transpose()
}

fn opt_back(w: Option<&WireTensor>) -> Result<Option<Tensor>> {
    w.map(from_wire).transpose()
}

/// The wire form of a request.
pub(crate) fn spec_of(setup: &RequestSetup, schedule: &ScheduleConfig) -> Result<RequestSpec> {
    let r = &setup.request;
    let cap = r.caption.as_ref();
    let neg = cap.and_then(|c| c.negative.as_ref());
    Ok(RequestSpec {
        class_labels: r.class_labels.iter().map(|&l| l as u32).collect(),
        caption: opt(cap.map(|c| &c.embeds))?,
        caption_mask: opt(cap.and_then(|c| c.mask.as_ref()))?,
        negative_caption: opt(neg.map(|n| &n.0))?,
        negative_caption_mask: opt(neg.and_then(|n| n.1.as_ref()))?,
        guidance_scale: r.guidance_scale,
        latent_size: [r.latent_size[0] as u32, r.latent_size[1] as u32],
        steps: schedule.steps as u32,
        // The sampling plan itself (timesteps and step rules), not the scheduler's config: no
        // node recomputes it, so every node steps with the same numbers.
        scheduler_json: serde_json::to_string(&setup.sampling)
            .map_err(|e| ClusterError::BadRequest(format!("sampling plan: {e}")))?,
        noise: to_wire(&setup.initial_latent)?,
        patches: setup
            .patches
            .iter()
            .map(|p| [p.start as u32, p.end as u32])
            .collect(),
        warmup: setup.warmup as u32,
        stages: schedule.stages as u32,
        cfg_degree: setup.cfg_degree() as u32,
        sp_degree: setup.sp_degree() as u32,
    })
}

/// Rebuilds the request on a node (`cfg` is the model it loaded).
pub(crate) fn setup_of(
    cfg: &ModelConfig,
    request: u64,
    spec: &RequestSpec,
) -> Result<(Arc<RequestSetup>, ScheduleConfig)> {
    let caption = match opt_back(spec.caption.as_ref())? {
        None => None,
        Some(embeds) => Some(Caption {
            embeds,
            mask: opt_back(spec.caption_mask.as_ref())?,
            negative: match opt_back(spec.negative_caption.as_ref())? {
                None => None,
                Some(n) => Some((n, opt_back(spec.negative_caption_mask.as_ref())?)),
            },
        }),
    };
    let req = Request {
        class_labels: spec.class_labels.iter().map(|&l| l as usize).collect(),
        caption,
        guidance_scale: spec.guidance_scale,
        latent_size: [spec.latent_size[0] as usize, spec.latent_size[1] as usize],
    };
    let sampling = serde_json::from_str(&spec.scheduler_json).map_err(|e| {
        ClusterError::BadRequest(format!("sampling plan from the coordinator: {e}"))
    })?;
    let patches = spec
        .patches
        .iter()
        .map(|p| p[0] as usize..p[1] as usize)
        .collect();
    let setup = RequestSetup::from_plan(
        request,
        cfg,
        &req,
        sampling,
        from_wire(&spec.noise)?,
        patches,
        spec.warmup as usize,
    )?
    .with_cfg_degree(spec.cfg_degree as usize)?
    .with_sp_degree(spec.sp_degree as usize)?;
    let schedule = ScheduleConfig {
        stages: spec.stages as usize,
        patches: setup.patches.len(),
        warmup: setup.warmup,
        steps: spec.steps as usize,
    };
    Ok((Arc::new(setup), schedule))
}
