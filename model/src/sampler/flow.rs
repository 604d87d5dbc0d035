//! `FlowMatchEulerDiscreteScheduler` (static shift; no dynamic shifting).
//! Reference: diffusers 0.42.1 `scheduling_flow_match_euler_discrete.py`.

use super::{Fields, SamplingPlan, StepRule};
use crate::error::{ModelError, Result};

/// Flow-matching Euler's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowEuler {
    train: usize,
    shift: f64,
}

impl FlowEuler {
    pub(super) fn from_fields(f: &Fields<'_>) -> Result<FlowEuler> {
        for k in [
            "use_dynamic_shifting",
            "invert_sigmas",
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "stochastic_sampling",
        ] {
            if f.bool(k, false)? {
                return Err(ModelError::config(f.path, k, "true is not supported"));
            }
        }
        if f.v.get("shift_terminal").is_some_and(|v| !v.is_null()) {
            return Err(ModelError::config(
                f.path,
                "shift_terminal",
                "is not supported",
            ));
        }
        Ok(FlowEuler {
            train: f.usize("num_train_timesteps", 1000)?,
            shift: f.f64("shift", 1.0)?,
        })
    }

    fn shifted(&self, s: f64) -> f64 {
        self.shift * s / (1.0 + (self.shift - 1.0) * s)
    }

    pub(super) fn plan(&self, n: usize) -> Result<SamplingPlan> {
        let train = self.train as f64;
        // The training sigmas are shifted once at construction; set_timesteps spaces timesteps
        // between the shifted extremes and shifts again (diffusers' behaviour, kept).
        // The largest training sigma is timestep `train` / `train`: exactly 1.0 in f32.
        let sigma_max = self.shifted(1.0) as f32 as f64;
        let sigma_min = self.shifted((1.0f32 / train as f32) as f64) as f32 as f64;
        let (t0, t1) = (sigma_max * train, sigma_min * train);
        let mut sigmas: Vec<f32> = (0..n)
            .map(|i| {
                let t = if n == 1 {
                    t0
                } else {
                    t0 + (t1 - t0) * i as f64 / (n - 1) as f64
                };
                self.shifted(t / train) as f32
            })
            .collect();
        sigmas.push(0.0);
        let rules = (0..n)
            .map(|i| StepRule {
                x0_alpha: 1.0,
                x0_sigma: 0.0,
                a: 1.0,
                b: 0.0,
                c: 0.0,
                e: sigmas[i + 1] - sigmas[i],
            })
            .collect();
        Ok(SamplingPlan {
            timesteps: sigmas[..n].iter().map(|s| s * train as f32).collect(),
            rules,
            multistep: false,
            init_noise_sigma: 1.0,
        })
    }
}
