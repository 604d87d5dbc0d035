//! PipeFusion updates the latent strip by strip: for every scheduler (incl. the multistep
//! DPM-Solver++, whose history is a full-latent buffer) strip updates followed by one `advance`
//! per step equal the whole-latent step, bitwise.

use kernels::Tensor;
use model::sampler::{SamplerState, Scheduler};

#[test]
fn strip_updates_then_advance_equal_whole_latent_steps() {
    let shape = [2, 3, 8, 5]; // [B, C, H, W]; strips of 3, 3, 2 rows
    let strips = [(0, 3), (3, 3), (6, 2)];
    for name in ["ddim", "dpm", "flow"] {
        let plan = Scheduler::named(name).unwrap().plan(6).unwrap();
        let mut whole = SamplerState::new(plan.clone(), 2 * 3 * 8 * 5);
        let mut parts = SamplerState::new(plan, 2 * 3 * 8 * 5);
        let mut x_whole = model::gaussian(&shape, 1);
        let mut x_parts = x_whole.clone();
        for step in 0..6 {
            let eps = model::gaussian(&shape, 100 + step);
            whole
                .step(x_whole.as_f32_mut().unwrap(), eps.as_f32().unwrap())
                .unwrap();
            for (r0, h) in strips {
                let e = eps.narrow(2, r0, h).unwrap();
                parts.update_rows(&mut x_parts, r0, &e).unwrap();
            }
            parts.advance();
            assert_eq!(
                x_whole.as_f32().unwrap(),
                x_parts.as_f32().unwrap(),
                "{name}, step {step}"
            );
        }
    }
}

#[test]
fn a_strip_that_does_not_fit_is_an_error() {
    let plan = Scheduler::named("dpm").unwrap().plan(3).unwrap();
    let mut s = SamplerState::new(plan, 2 * 3 * 8 * 5);
    let mut x = Tensor::zeros(&[2, 3, 8, 5]);
    let eps = Tensor::zeros(&[2, 3, 3, 5]);
    assert!(s.update_rows(&mut x, 6, &eps).is_err()); // rows 6..9 of 8
    let wrong = Tensor::zeros(&[2, 2, 3, 5]);
    assert!(s.update_rows(&mut x, 0, &wrong).is_err());
}

/// A run continued from a checkpoint (the latent and the history after step k, the plan's steps
/// from k on) ends where the uninterrupted run ends, bitwise, for every scheduler and every k.
#[test]
fn a_run_resumed_from_a_checkpoint_equals_the_uninterrupted_run() {
    let shape = [1, 2, 4, 4];
    let len = 2 * 4 * 4;
    for name in ["ddim", "dpm", "flow"] {
        let plan = Scheduler::named(name).unwrap().plan(7).unwrap();
        let eps: Vec<Tensor> = (0..7).map(|s| model::gaussian(&shape, 50 + s)).collect();
        let mut straight = SamplerState::new(plan.clone(), len);
        let mut x = model::gaussian(&shape, 3);
        let mut saved = Vec::new();
        for e in &eps {
            straight
                .step(x.as_f32_mut().unwrap(), e.as_f32().unwrap())
                .unwrap();
            saved.push((x.clone(), straight.history().to_vec()));
        }
        for k in 1..7 {
            let (mut y, history) = saved[k - 1].clone();
            let rest = plan.from_step(k).expect("steps left");
            assert_eq!(rest.timesteps.len(), 7 - k);
            let mut resumed = SamplerState::resumed(rest, len, history).unwrap();
            for e in &eps[k..] {
                resumed
                    .step(y.as_f32_mut().unwrap(), e.as_f32().unwrap())
                    .unwrap();
            }
            assert_eq!(y.as_f32().unwrap(), x.as_f32().unwrap(), "{name}, k {k}");
        }
        assert!(plan.from_step(7).is_none());
        let wrong = vec![0.0; if plan.multistep { len + 1 } else { 1 }];
        assert!(SamplerState::resumed(plan.clone(), len, wrong).is_err());
    }
}
