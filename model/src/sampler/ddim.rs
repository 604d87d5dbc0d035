//! `DDIMScheduler` with eta = 0 (deterministic).
//! Reference: diffusers 0.42.1 `scheduling_ddim.py` (`set_timesteps`, `step`).

use super::spacing::{leading, np_arange_down, np_linspace, Spacing};
use super::{alphas_cumprod, require_epsilon, Fields, SamplingPlan, StepRule};
use crate::error::{ModelError, Result};

/// DDIM's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Ddim {
    acp: Vec<f32>,
    final_alpha: f32,
    steps_offset: usize,
    spacing: Spacing,
}

impl Ddim {
    pub(super) fn from_fields(f: &Fields<'_>) -> Result<Ddim> {
        require_epsilon(f)?;
        // diffusers' default is clip_sample = true; a config must turn it off explicitly.
        if f.bool("clip_sample", true)? {
            return Err(ModelError::config(
                f.path,
                "clip_sample",
                "true (the default when absent) is not supported; DiT's config sets false",
            ));
        }
        for k in ["thresholding", "rescale_betas_zero_snr"] {
            if f.bool(k, false)? {
                return Err(ModelError::config(f.path, k, "true is not supported"));
            }
        }
        let acp = alphas_cumprod(f)?;
        let steps_offset = super::spacing::steps_offset(f, acp.len())?;
        let final_alpha = if f.bool("set_alpha_to_one", true)? {
            1.0
        } else {
            acp[0]
        };
        let spacing = Spacing::from_fields(f, "leading")?;
        Ok(Ddim {
            acp,
            final_alpha,
            steps_offset,
            spacing,
        })
    }

    pub(super) fn acp(&self) -> &[f32] {
        &self.acp
    }

    pub(super) fn plan(&self, n: usize) -> Result<SamplingPlan> {
        let train = self.acp.len();
        if n > train {
            return Err(ModelError::Input(format!(
                "{n} steps exceed the {train} training timesteps"
            )));
        }
        let ts: Vec<usize> = match self.spacing {
            Spacing::Linspace => np_linspace((train - 1) as f64, n)
                .iter()
                .rev()
                .map(|t| t.round_ties_even() as usize)
                .collect(),
            Spacing::Trailing => np_arange_down(train as f64, train as f64 / n as f64, n)
                .iter()
                .map(|t| t.round_ties_even() as usize - 1)
                .collect(),
            Spacing::Leading => leading(n, 0, train / n, self.steps_offset, train)?,
        };
        let rules = ts
            .iter()
            .map(|&t| {
                let a_t = self.acp[t] as f64;
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
