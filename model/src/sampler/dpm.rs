//! `DPMSolverMultistepScheduler`, algorithm `dpmsolver++`, order 1 or 2 (midpoint or heun), with
//! `final_sigmas_type` zero and `lower_order_final`.
//! Reference: diffusers 0.42.1 `scheduling_dpmsolver_multistep.py` (`set_timesteps`,
//! `dpm_solver_first_order_update`, `multistep_dpm_solver_second_order_update`, `step`).

use super::spacing::{leading, np_arange_down, np_linspace, Spacing};
use super::{alphas_cumprod, require_epsilon, Fields, SamplingPlan, StepRule};
use crate::error::{ModelError, Result};

/// DPM-Solver++'s configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct DpmSolver {
    acp: Vec<f32>,
    order: usize,
    heun: bool,
    spacing: Spacing,
    steps_offset: usize,
}

impl DpmSolver {
    pub(super) fn from_fields(f: &Fields<'_>) -> Result<DpmSolver> {
        require_epsilon(f)?;
        let algo = f.str("algorithm_type", "dpmsolver++")?;
        if algo != "dpmsolver++" {
            return Err(ModelError::config(
                f.path,
                "algorithm_type",
                format!("`{algo}` is not supported (dpmsolver++)"),
            ));
        }
        let order = f.usize("solver_order", 2)?;
        if !(1..=2).contains(&order) {
            return Err(ModelError::config(
                f.path,
                "solver_order",
                format!("{order} is not supported (1 or 2)"),
            ));
        }
        let solver = f.str("solver_type", "midpoint")?;
        if solver != "midpoint" && solver != "heun" {
            return Err(ModelError::config(
                f.path,
                "solver_type",
                format!("`{solver}` is not one of midpoint, heun"),
            ));
        }
        for (k, d) in [
            ("use_karras_sigmas", false),
            ("use_lu_lambdas", false),
            ("use_exponential_sigmas", false),
            ("use_beta_sigmas", false),
            ("use_flow_sigmas", false),
            ("thresholding", false),
        ] {
            if f.bool(k, d)? {
                return Err(ModelError::config(f.path, k, "true is not supported"));
            }
        }
        let final_type = f.str("final_sigmas_type", "zero")?;
        if final_type != "zero" {
            return Err(ModelError::config(
                f.path,
                "final_sigmas_type",
                format!("`{final_type}` is not supported (zero)"),
            ));
        }
        let spacing = Spacing::from_fields(f, "linspace")?;
        if f.bool("rescale_betas_zero_snr", false)? {
            return Err(ModelError::config(
                f.path,
                "rescale_betas_zero_snr",
                "true is not supported",
            ));
        }
        // Python's bare -Infinity is read as the string "-Infinity" (`fields::python_json`).
        match f.v.get("lambda_min_clipped") {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::String(s)) if s == "-Infinity" => {}
            Some(other) => {
                return Err(ModelError::config(
                    f.path,
                    "lambda_min_clipped",
                    format!("{other} is not supported: only -Infinity (no clipping)"),
                ))
            }
        }
        let acp = alphas_cumprod(f)?;
        let steps_offset = super::spacing::steps_offset(f, acp.len())?;
        Ok(DpmSolver {
            acp,
            order,
            heun: solver == "heun",
            spacing,
            steps_offset,
        })
    }

    pub(super) fn acp(&self) -> &[f32] {
        &self.acp
    }

    fn timesteps(&self, n: usize) -> Result<Vec<usize>> {
        let last = self.acp.len(); // lambda_min_clipped = -inf
        Ok(match self.spacing {
            Spacing::Linspace => np_linspace((last - 1) as f64, n + 1)
                .iter()
                .rev()
                .take(n)
                .map(|t| t.round_ties_even() as usize)
                .collect(),
            Spacing::Leading => leading(n, 1, last / (n + 1), self.steps_offset, last)?,
            Spacing::Trailing => np_arange_down(last as f64, last as f64 / n as f64, n)
                .iter()
                .map(|t| t.round_ties_even() as usize - 1)
                .collect(),
        })
    }

    pub(super) fn plan(&self, n: usize) -> Result<SamplingPlan> {
        if n >= self.acp.len() {
            return Err(ModelError::Input(format!(
                "{n} steps exceed the {} training timesteps",
                self.acp.len()
            )));
        }
        let ts = self.timesteps(n)?;
        // sigma = sqrt((1 - acp) / acp) in f32, then (alpha, sigma) = (1, sigma) / sqrt(sigma^2 + 1).
        let mut sigmas: Vec<f64> = ts
            .iter()
            .map(|&t| ((1.0 - self.acp[t]) / self.acp[t]).sqrt() as f64)
            .collect();
        sigmas.push(0.0);
        let alpha_sigma = |s: f64| {
            let a = 1.0 / (s * s + 1.0).sqrt();
            (a, s * a)
        };
        let lambda = |s: f64| {
            let (a, sg) = alpha_sigma(s);
            a.ln() - sg.ln()
        };
        let mut rules = Vec::with_capacity(n);
        for i in 0..n {
            let (alpha_s, sigma_s) = alpha_sigma(sigmas[i]);
            let (alpha_t, sigma_t) = alpha_sigma(sigmas[i + 1]);
            let h = lambda(sigmas[i + 1]) - lambda(sigmas[i]);
            let em1 = (-h).exp() - 1.0; // exp(-h) - 1, -1 at the final (sigma = 0) step
            let last = i == n - 1;
            // diffusers: the final step is first order whenever final_sigmas_type is "zero" (the
            // only type supported), so `lower_order_final` changes nothing here; with order <= 2
            // the second-to-last step is second order either way.
            let first_order = self.order == 1 || i == 0 || last;
            let c = if first_order {
                0.0
            } else {
                let h0 = lambda(sigmas[i]) - lambda(sigmas[i - 1]);
                let r0 = h0 / h;
                if self.heun {
                    alpha_t * (em1 / h + 1.0) / r0
                } else {
                    -0.5 * alpha_t * em1 / r0
                }
            };
            rules.push(StepRule {
                x0_alpha: alpha_s as f32,
                x0_sigma: sigma_s as f32,
                a: (sigma_t / sigma_s) as f32,
                b: (-alpha_t * em1) as f32,
                c: c as f32,
                e: 0.0,
            });
        }
        Ok(SamplingPlan {
            timesteps: ts.iter().map(|&t| t as f32).collect(),
            rules,
            multistep: self.order > 1,
            init_noise_sigma: 1.0,
        })
    }
}
