//! `DDIMScheduler` with eta = 0 (deterministic).
//! Reference: diffusers 0.42.1 `scheduling_ddim.py` (`set_timesteps`, `step`).

use super::{alphas_cumprod, require_epsilon, Fields, SamplingPlan, StepRule};
use crate::error::{ModelError, Result};

/// DDIM's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Ddim {
    acp: Vec<f32>,
    final_alpha: f32,
    steps_offset: usize,
    spacing: String,
}

impl Ddim {
    pub(super) fn from_fields(f: &Fields<'_>) -> Result<Ddim> {
        require_epsilon(f)?;
        if f.bool("clip_sample", false)? {
            return Err(ModelError::config(
                f.path,
                "clip_sample",
                "true is not supported (DiT uses false)",
            ));
        }
        let acp = alphas_cumprod(f)?;
        let final_alpha = if f.bool("set_alpha_to_one", true)? {
            1.0
        } else {
            acp[0]
        };
        let spacing = f.str("timestep_spacing", "leading")?;
        if !["leading", "trailing", "linspace"].contains(&spacing.as_str()) {
            return Err(ModelError::config(
                f.path,
                "timestep_spacing",
                format!("`{spacing}` is not one of leading, trailing, linspace"),
            ));
        }
        Ok(Ddim {
            acp,
            final_alpha,
            steps_offset: f.usize("steps_offset", 0)?,
            spacing,
        })
    }

    pub(super) fn plan(&self, n: usize) -> Result<SamplingPlan> {
        let train = self.acp.len();
        if n > train {
            return Err(ModelError::Input(format!(
                "{n} steps exceed the {train} training timesteps"
            )));
        }
        let ts: Vec<usize> = match self.spacing.as_str() {
            "linspace" => (0..n)
                .rev()
                .map(|i| {
                    ((train - 1) as f64 * i as f64 / (n - 1).max(1) as f64).round_ties_even()
                        as usize
                })
                .collect(),
            "trailing" => {
                let ratio = train as f64 / n as f64;
                (0..n)
                    .map(|i| (train as f64 - i as f64 * ratio).round_ties_even() as usize - 1)
                    .collect()
            }
            _ => (0..n)
                .rev()
                .map(|i| i * (train / n) + self.steps_offset)
                .collect(),
        };
        let rules = ts
            .iter()
            .map(|&t| {
                let a_t = self.acp[t.min(train - 1)] as f64;
                let prev = t as i64 - (train / n) as i64;
                let a_p = if prev >= 0 {
                    self.acp[prev as usize] as f64
                } else {
                    self.final_alpha as f64
                };
                StepRule {
                    x0_alpha: a_t.sqrt() as f32,
                    x0_sigma: (1.0 - a_t).sqrt() as f32,
                    a: 0.0,
                    b: a_p.sqrt() as f32,
                    c: 0.0,
                    e: (1.0 - a_p).sqrt() as f32,
                }
            })
            .collect();
        Ok(SamplingPlan {
            timesteps: ts.iter().map(|&t| t as f32).collect(),
            rules,
            multistep: false,
            init_noise_sigma: 1.0,
        })
    }
}
