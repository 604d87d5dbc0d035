//! Shared helpers for the runtime tests: the fixture model, request setups, the serial reference
//! and error metrics.
#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::sync::Arc;

use actors::stage::{run_in_order, RequestSetup, StageExecutor};
use kernels::{Device, Tensor};
use model::sampler::Scheduler;
use model::{Request, Transformer};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// `dit_pf`: diffusers DiT, 4 layers, 16x16 latent (8 token rows), 1000 classes.
pub fn dit_pf() -> PathBuf {
    fixtures().join("dit_pf")
}

pub fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.shape(), b.shape());
    let (a, b) = (a.as_f32().unwrap(), b.as_f32().unwrap());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// PSNR in dB with the reference's peak-to-peak range as the signal range.
pub fn psnr(a: &Tensor, reference: &Tensor) -> f64 {
    let (a, r) = (a.as_f32().unwrap(), reference.as_f32().unwrap());
    let mse: f64 = a
        .iter()
        .zip(r)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    let (lo, hi) = r
        .iter()
        .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    let range = (hi - lo) as f64;
    10.0 * (range * range / mse).log10()
}

/// A request's setup with `m` patches (equal split per ALGORITHMS.md) and `w` warmup steps.
pub fn setup(
    cfg: &model::ModelConfig,
    request: &Request,
    scheduler: &Scheduler,
    steps: usize,
    noise: &Tensor,
    m: usize,
    w: usize,
) -> Arc<RequestSetup> {
    let rows = request.latent_size[0] / cfg.patch_size;
    let patches = topology::patch_rows(rows, m).expect("valid M");
    Arc::new(RequestSetup::new(1, cfg, request, scheduler, steps, noise, patches, w).unwrap())
}

/// Stages over `splits` of the layers, from `load(range)`.
pub fn stages(
    layers: usize,
    n: usize,
    mut load: impl FnMut(std::ops::Range<usize>) -> Transformer,
) -> Vec<StageExecutor> {
    topology::split_layers(layers, n)
        .into_iter()
        .map(|r| StageExecutor::new(load(r)))
        .collect()
}

/// The plain single-device sampling loop (no patches, no buffers).
pub fn serial(model: &Transformer, setup: &RequestSetup) -> Tensor {
    actors::stage::run_serial(model, setup, |_| {}).unwrap()
}

pub fn pipefusion(stages: &mut [StageExecutor], setup: &Arc<RequestSetup>) -> Tensor {
    run_in_order(stages, setup.clone()).unwrap()
}

pub fn cpu() -> Device {
    Device::cpu(1).unwrap()
}

/// The same request split over two CFG groups (ALGORITHMS.md section 3).
pub fn split_cfg(one: &Arc<RequestSetup>, cfg: &model::ModelConfig) -> Arc<RequestSetup> {
    Arc::new(
        RequestSetup::from_plan(
            one.id,
            cfg,
            &one.request,
            one.sampling.clone(),
            one.initial_latent.clone(),
            one.patches.clone(),
            one.warmup,
        )
        .unwrap()
        .with_cfg_degree(2)
        .unwrap(),
    )
}

/// The in-order reference of CFG parallel: two groups of `n` stages each over `layers` layers.
pub fn cfg_pipefusion(
    layers: usize,
    n: usize,
    mut load: impl FnMut(std::ops::Range<usize>) -> Transformer,
    setup: Arc<RequestSetup>,
) -> Tensor {
    let mut group = |g| -> Vec<StageExecutor> {
        stages(layers, n, &mut load)
            .into_iter()
            .map(|s| s.with_cfg_group(g))
            .collect()
    };
    let (mut g0, mut g1) = (group(0), group(1));
    actors::stage::run_groups_in_order(&mut [&mut g0[..], &mut g1[..]], setup).unwrap()
}

/// [`setup`] for a request made for `cluster` (its model, steps, noise).
pub fn setup_for(
    cluster: &actors::Cluster,
    req: &actors::GenerateRequest,
    m: usize,
    w: usize,
) -> Arc<RequestSetup> {
    setup(
        &cluster.model().config,
        &req.request,
        &req.scheduler,
        req.steps,
        &req.noise,
        m,
        w,
    )
}
