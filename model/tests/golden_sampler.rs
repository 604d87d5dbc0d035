//! Samplers against diffusers 0.42.1 trajectories (tools/make_fixtures.py): at every step of a
//! 12- or 20-step run, given diffusers' recorded model output, our update must reproduce
//! diffusers' next sample (relative L2 <= 1e-5 per step), and the timesteps must agree.
//! Then the whole DiT DDIM + CFG pipeline against diffusers' `DiTPipeline` (relative L2 <= 1e-4).

mod common;

use common::{fixtures, rel_l2, Fixture};
use kernels::Device;
use model::sampler::guidance::{cfg_combine, denoise, CfgOrder};
use model::sampler::{SamplerState, Scheduler};
use model::{CondInputs, Transformer};

fn check_trajectory(case: &str, config: &str) {
    let fx = Fixture::load("schedulers/trajectories.safetensors");
    let sched = Scheduler::from_file(
        &fixtures().join(format!("schedulers/{config}/scheduler_config.json")),
    )
    .unwrap();
    let want_ts = &fx.doubles[&format!("{case}.timesteps")];
    let plan = sched.plan(want_ts.len()).unwrap();
    for (got, want) in plan.timesteps.iter().zip(want_ts) {
        assert!(
            (*got as f64 - want).abs() <= 1e-3 * want.abs().max(1.0),
            "{case}: timesteps {:?} vs {want_ts:?}",
            plan.timesteps
        );
    }
    let (xs, eps, outs) = (
        fx.f(&format!("{case}.sample_in")),
        fx.f(&format!("{case}.model_output")),
        fx.f(&format!("{case}.sample_out")),
    );
    let n = want_ts.len();
    let per = xs.elem_count() / n;
    let mut state = SamplerState::new(plan, per);
    for i in 0..n {
        let mut x = xs.as_f32().unwrap()[i * per..(i + 1) * per].to_vec();
        let e = &eps.as_f32().unwrap()[i * per..(i + 1) * per];
        // Update in two parts, as PipeFusion does patch by patch.
        let (a, b) = x.split_at_mut(per / 3);
        state.update_part(0, a, &e[..per / 3]).unwrap();
        state.update_part(per / 3, b, &e[per / 3..]).unwrap();
        state.advance();
        let err = rel_l2(&x, &outs.as_f32().unwrap()[i * per..(i + 1) * per]);
        assert!(err <= 1e-5, "{case} step {i}: relative L2 {err:.3e}");
    }
}

#[test]
fn ddim_matches_diffusers() {
    check_trajectory("ddim", "ddim");
}

#[test]
fn dpm_solver_pp_2m_matches_diffusers_12_steps() {
    check_trajectory("dpm", "dpm");
}

#[test]
fn dpm_solver_pp_2m_matches_diffusers_20_steps() {
    check_trajectory("dpm20", "dpm");
}

#[test]
fn flow_euler_matches_diffusers() {
    check_trajectory("flow", "flow");
}

#[test]
fn built_in_scheduler_names_match_the_shipped_configs() {
    for (name, dir) in [("ddim", "ddim"), ("dpm", "dpm"), ("flow", "flow")] {
        let file = Scheduler::from_file(
            &fixtures().join(format!("schedulers/{dir}/scheduler_config.json")),
        )
        .unwrap();
        assert_eq!(
            Scheduler::named(name).unwrap().plan(17).unwrap(),
            file.plan(17).unwrap(),
            "{name}"
        );
    }
}

#[test]
fn unsupported_scheduler_settings_are_named() {
    let v: serde_json::Value =
        serde_json::from_str(r#"{"_class_name":"DDIMScheduler","prediction_type":"v_prediction"}"#)
            .unwrap();
    let err = Scheduler::from_json(&v, std::path::Path::new("x/scheduler_config.json"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("prediction_type") && err.contains("x/scheduler_config.json"),
        "{err}"
    );
}

/// diffusers' DiTPipeline (12 steps, guidance 4, labels [3, 7]) from fixed noise.
#[test]
fn dit_ddim_cfg_pipeline_matches_diffusers() {
    let fx = Fixture::load("dit_pipeline_ddim.safetensors");
    let dir = fixtures().join("dit_tiny_pipeline");
    let model = Transformer::load(&dir.join("transformer"), None, Device::cpu(2).unwrap()).unwrap();
    let sched = Scheduler::from_file(&dir.join("scheduler/scheduler_config.json")).unwrap();
    let noise = fx.f("noise").clone();
    let labels: Vec<usize> = fx.i("class_labels").iter().map(|&l| l as usize).collect();
    let b = labels.len();
    let null = model.config().null_class();
    let mut state = SamplerState::new(sched.plan(12).unwrap(), noise.elem_count());
    let mut per_step = Vec::new();
    let out = denoise(
        &mut state,
        noise,
        |_, t, x| {
            let doubled = kernels::Tensor::cat(&[x, x], 0)?;
            let inputs = CondInputs {
                timesteps: vec![t; 2 * b],
                class_labels: labels
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(null, b))
                    .collect(),
                ..Default::default()
            };
            let o = model.forward(&doubled, &inputs)?;
            cfg_combine(&o, 4, 4.0, CfgOrder::CondFirst)
        },
        |i| per_step.push(i),
    )
    .unwrap();
    assert_eq!(per_step, (0..12).collect::<Vec<_>>());
    let e = rel_l2(
        out.as_f32().unwrap(),
        fx.f("final_latent").as_f32().unwrap(),
    );
    eprintln!("final latent relative L2 vs diffusers: {e:.2e}");
    assert!(e <= 1e-4, "final latent relative L2 {e:.3e}");
}

/// Step counts whose timesteps fall on a .5 tie, where numpy's linspace/arange arithmetic matters.
/// Expected lists printed by diffusers 0.42.1 `set_timesteps` (DPMSolverMultistepScheduler() with
/// n = 26; DDIMScheduler(clip_sample=False, timestep_spacing=...) with n = 48 trailing, 26 linspace).
#[test]
fn timestep_spacings_round_like_numpy() {
    let parse = |j: &str| {
        Scheduler::from_json(&serde_json::from_str(j).unwrap(), std::path::Path::new("t")).unwrap()
    };
    let dpm = parse(r#"{"_class_name":"DPMSolverMultistepScheduler"}"#)
        .plan(26)
        .unwrap();
    assert_eq!(dpm.timesteps[13], 499.0, "{:?}", dpm.timesteps);
    assert_eq!(dpm.timesteps[..3], [999.0, 961.0, 922.0]);
    let trailing = parse(
        r#"{"_class_name":"DDIMScheduler","clip_sample":false,"timestep_spacing":"trailing"}"#,
    )
    .plan(48)
    .unwrap();
    assert_eq!(trailing.timesteps[3], 936.0, "{:?}", trailing.timesteps);
    assert_eq!(*trailing.timesteps.last().unwrap(), 20.0);
    let lin = parse(
        r#"{"_class_name":"DDIMScheduler","clip_sample":false,"timestep_spacing":"linspace"}"#,
    )
    .plan(26)
    .unwrap();
    assert_eq!(lin.timesteps[13], 480.0, "{:?}", lin.timesteps);
    assert_eq!(lin.timesteps[12], 519.0);
}

#[test]
fn ddim_without_clip_sample_key_is_refused_like_diffusers_default() {
    let v: serde_json::Value = serde_json::from_str(r#"{"_class_name":"DDIMScheduler"}"#).unwrap();
    let err = Scheduler::from_json(&v, std::path::Path::new("s.json"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("clip_sample"), "{err}");
}
