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
