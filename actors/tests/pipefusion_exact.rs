//! PipeFusion's numerics without actors: the in-order stage chain against the independent numpy
//! reference (shared/reference/pipefusion_ref.py, fixtures from tools/make_fixtures.py) and the
//! exactness properties of ALGORITHMS.md §2 (W = T, or M = 1, equals serial).

mod common;

use common::*;
use kernels::Tensor;
use model::sampler::Scheduler;
use model::{Arch, Caption, ModelConfig, Request, Transformer};

struct Reference {
    noise: Tensor,
    cases: std::collections::HashMap<String, Tensor>,
}

fn reference() -> Reference {
    let bytes = std::fs::read(fixtures().join("pipefusion_ref.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut cases = std::collections::HashMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() == safetensors::Dtype::F32 && view.shape().len() == 4 {
            let v = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            cases.insert(name, Tensor::from_vec(v, view.shape()).unwrap());
        }
    }
    Reference {
        noise: cases.remove("noise").unwrap(),
        cases,
    }
}

fn dit_request(labels: Vec<usize>, size: usize) -> Request {
    Request {
        class_labels: labels,
        caption: None,
        guidance_scale: 4.0,
        latent_size: [size, size],
        embedded_guidance: None,
    }
}

/// Every (M, W) case of the numpy reference, run as N = 2 and N = 4 stage chains. The stage
/// count must not matter (each layer sees the same (step, patch) order); the numpy reference
/// differs from us only by float rounding (it uses separate Q/K/V matmuls, numpy's reductions).
#[test]
fn pipefusion_matches_the_numpy_reference_for_every_m_and_w() {
    let r = reference();
    let dir = dit_pf().join("transformer");
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let sched = Scheduler::from_file(&dit_pf().join("scheduler/scheduler_config.json")).unwrap();
    let req = dit_request(vec![3, 7], 16);
    let mut worst = 0f64;
    for (name, m, w) in [
        ("M1_W0", 1, 0),
        ("M1_W1", 1, 1),
        ("M2_W1", 2, 1),
        ("M4_W1", 4, 1),
        ("M4_W0", 4, 0),
        ("M3_W2", 3, 2),
        ("M8_W1", 8, 1),
        ("M2_W8", 2, 8),
        ("serial", 1, 8),
    ] {
        let s = setup(&cfg, &req, &sched, 8, &r.noise, m, w);
        for n in [2, 4] {
            let mut st = stages(4, n, |range| {
                Transformer::load(&dir, Some(range), cpu()).unwrap()
            });
            let got = pipefusion(&mut st, &s);
            let e = rel_l2(&got, &r.cases[name]);
            worst = worst.max(e);
            assert!(
                e < 2e-5,
                "{name} with {n} stages: rel L2 {e:.3e} vs numpy reference"
            );
        }
    }
    eprintln!("worst rel L2 vs numpy PipeFusion reference: {worst:.3e}");
}

fn tiny(arch: Arch) -> ModelConfig {
    ModelConfig {
        arch,
        in_channels: 4,
        out_channels: 8,
        patch_size: 2,
        sample_size: 16,
        num_layers: 4,
        num_heads: 2,
        head_dim: 16,
        norm_eps: 1e-6,
        num_classes: 10,
        caption_channels: 12,
        interpolation_scale: 1.0,
        use_additional_conditions: false,
        mmdit: None,
    }
}

fn request_for(arch: Arch) -> Request {
    match arch {
        Arch::Dit => Request {
            class_labels: vec![1, 4],
            caption: None,
            guidance_scale: 4.0,
            latent_size: [16, 12],
            embedded_guidance: None,
        },
        Arch::PixArt => {
            let emb = model::gaussian(&[2, 5, 12], 11);
            let mut mask = Tensor::from_vec(vec![1.0; 10], &[2, 5]).unwrap();
            mask.as_f32_mut().unwrap()[9] = 0.0; // padding in the second caption
            Request {
                class_labels: vec![],
                caption: Some(Caption {
                    embeds: emb,
                    mask: Some(mask),
                    negative: Some((model::gaussian(&[2, 5, 12], 12), None)),
                    pooled: None,
                    negative_pooled: None,
                }),
                guidance_scale: 4.5,
                latent_size: [16, 12],
                embedded_guidance: None,
            }
        }
        _ => unreachable!("DiT and PixArt only"),
    }
}

/// ALGORITHMS.md §2: with W = T (all warmup) or M = 1 the pipeline equals the serial forward, for
/// DiT (DDIM) and PixArt (DPM-Solver++, a multistep solver), N = 2, 3, 4, non-square latents.
#[test]
fn whole_warmup_or_one_patch_equals_serial_for_dit_and_pixart() {
    for arch in [Arch::Dit, Arch::PixArt] {
        let cfg = tiny(arch);
        let sched = Scheduler::named(if arch == Arch::Dit { "ddim" } else { "dpm" }).unwrap();
        let req = request_for(arch);
        let noise = model::gaussian(&[2, 4, 16, 12], 5);
        let full = Transformer::random(cfg.clone(), 9, None, cpu()).unwrap();
        let steps = 6;
        let want = serial(&full, &setup(&cfg, &req, &sched, steps, &noise, 1, steps));
        for n in [2, 3, 4] {
            for (m, w) in [(4, steps), (3, steps + 2), (1, 1), (1, 0)] {
                let s = setup(&cfg, &req, &sched, steps, &noise, m, w);
                let mut st = stages(4, n, |r| {
                    Transformer::random(cfg.clone(), 9, Some(r), cpu()).unwrap()
                });
                let got = pipefusion(&mut st, &s);
                let e = rel_l2(&got, &want);
                assert!(
                    e <= 1e-5,
                    "{arch:?} N={n} M={m} W={w}: rel L2 {e:.3e} vs serial"
                );
            }
        }
    }
}

/// With patches and W < T the result drifts from serial (stale K/V), and more warmup shrinks the
/// drift; the stage count never matters.
#[test]
fn stale_buffers_drift_and_warmup_reduces_the_drift() {
    let cfg = tiny(Arch::Dit);
    let sched = Scheduler::named("ddim").unwrap();
    let req = request_for(Arch::Dit);
    let noise = model::gaussian(&[2, 4, 16, 12], 5);
    let full = Transformer::random(cfg.clone(), 9, None, cpu()).unwrap();
    let want = serial(&full, &setup(&cfg, &req, &sched, 8, &noise, 1, 8));
    let mut drift = Vec::new();
    for w in [0, 1, 3] {
        let s = setup(&cfg, &req, &sched, 8, &noise, 4, w);
        let mut by_n = Vec::new();
        for n in [1, 2, 4] {
            let mut st = stages(4, n, |r| {
                Transformer::random(cfg.clone(), 9, Some(r), cpu()).unwrap()
            });
            by_n.push(pipefusion(&mut st, &s));
        }
        assert!(rel_l2(&by_n[1], &by_n[0]) < 1e-6 && rel_l2(&by_n[2], &by_n[0]) < 1e-6);
        drift.push(rel_l2(&by_n[0], &want));
    }
    assert!(
        drift[0] > 1e-6,
        "M=4, W=0 must differ from serial: {drift:?}"
    );
    assert!(
        drift[0] > drift[1] && drift[1] > drift[2],
        "drift must shrink with W: {drift:?}"
    );
}

/// A latent that turns non-finite (here: a NaN planted in the initial noise, which the binary
/// refuses at input; a diverging model would do the same) fails the request naming the step and
/// the token rows, instead of finishing with a NaN image (issue 16 group 5).
#[test]
fn a_non_finite_latent_fails_naming_the_step() {
    let cfg = tiny(Arch::Dit);
    let req = request_for(Arch::Dit);
    let sched = Scheduler::named("ddim").unwrap();
    let mut noise = model::gaussian(&[2, 4, 16, 12], 5);
    noise.as_f32_mut().unwrap()[100] = f32::NAN;
    let s = setup(&cfg, &req, &sched, 3, &noise, 2, 1);
    let mut st = stages(cfg.num_layers, 2, |r| {
        Transformer::random(cfg.clone(), 3, Some(r), cpu()).unwrap()
    });
    let e = actors::stage::run_in_order(&mut st, s)
        .unwrap_err()
        .to_string();
    assert!(e.contains("step 0") && e.contains("non-finite"), "{e}");
}
