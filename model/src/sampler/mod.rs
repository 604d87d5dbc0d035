//! Samplers as plain functions, separate from the network: a scheduler config
//! (`scheduler_config.json`) gives a [`SamplingPlan`] for a step count: the timesteps and one
//! element-wise [`StepRule`] per step. A [`SamplerState`] applies the rules; it keeps the
//! multistep history (DPM-Solver++'s previous x0 prediction) as a full-latent buffer, and a rule
//! can be applied to any subset of the latent's elements (PipeFusion steps patch by patch), with
//! the solver's step counter advancing once per step, not per patch.
//!
//! Implemented (diffusers 0.42.1 semantics, golden-tested over 12- and 20-step trajectories):
//! DDIM (eta 0; DiT's default), DPM-Solver++ 2M (midpoint; PixArt's default) and flow-matching
//! Euler (SD3's). [`guidance::cfg_combine`] does classifier-free guidance.

mod ddim;
mod dpm;
mod flow;
pub mod guidance;
mod spacing;

pub use flow::PipelineTimesteps;

use std::path::Path;

use kernels::Tensor;
use serde_json::Value;

use crate::error::{ModelError, Result};
pub(crate) use crate::fields::Fields;

/// One step as an element-wise formula. With `m0 = (x - x0_sigma * eps) / x0_alpha` (the x0
/// prediction) and `m1` the previous step's `m0`:
/// `x' = a * x + b * m0 + c * (m0 - m1) + e * eps`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepRule {
    /// x0 prediction: divisor.
    pub x0_alpha: f32,
    /// x0 prediction: noise coefficient.
    pub x0_sigma: f32,
    /// Coefficient of the sample.
    pub a: f32,
    /// Coefficient of the x0 prediction.
    pub b: f32,
    /// Coefficient of the x0 difference to the previous step (second-order term).
    pub c: f32,
    /// Coefficient of the model output.
    pub e: f32,
}

impl StepRule {
    /// Applies the rule to matching element slices; `history` (previous m0, replaced by this
    /// step's m0) is needed when `c != 0` and kept up to date whenever given.
    pub fn apply(&self, x: &mut [f32], eps: &[f32], mut history: Option<&mut [f32]>) {
        for i in 0..x.len() {
            let m0 = (x[i] - self.x0_sigma * eps[i]) / self.x0_alpha;
            let mut v = self.a * x[i] + self.b * m0 + self.e * eps[i];
            if let Some(h) = history.as_deref_mut() {
                if self.c != 0.0 {
                    v += self.c * (m0 - h[i]);
                }
                h[i] = m0;
            }
            x[i] = v;
        }
    }
}

/// Timesteps and step rules of one sampling run (serialisable: a node that receives a request
/// from another uses the sender's plan, bit for bit).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingPlan {
    /// Model timestep at each step.
    pub timesteps: Vec<f32>,
    /// How to update the latent after each step's model call.
    pub rules: Vec<StepRule>,
    /// Whether the rules need the previous x0 prediction.
    pub multistep: bool,
    /// Scale of the initial noise.
    pub init_noise_sigma: f32,
}

impl SamplingPlan {
    /// The plan's steps from `step` on (a run continued from a checkpoint taken after step
    /// `step - 1`): the same timesteps and rules, so the continuation computes what the
    /// uninterrupted run would have. `None` when `step` is not before the last step.
    pub fn from_step(&self, step: usize) -> Option<SamplingPlan> {
        (step < self.timesteps.len() && step < self.rules.len()).then(|| SamplingPlan {
            timesteps: self.timesteps[step..].to_vec(),
            rules: self.rules[step..].to_vec(),
            multistep: self.multistep,
            init_noise_sigma: self.init_noise_sigma,
        })
    }
}

/// A scheduler read from `scheduler_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub enum Scheduler {
    /// `DDIMScheduler` (eta = 0).
    Ddim(ddim::Ddim),
    /// `DPMSolverMultistepScheduler` (dpmsolver++, order <= 2).
    DpmSolverPP(dpm::DpmSolver),
    /// `FlowMatchEulerDiscreteScheduler`.
    FlowEuler(flow::FlowEuler),
}

impl Scheduler {
    /// Reads a `scheduler_config.json`.
    pub fn from_file(path: &Path) -> Result<Scheduler> {
        crate::error::regular_file(path, "a JSON file")?;
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        // Python's json writes bare -Infinity / NaN values (e.g. `lambda_min_clipped`): not JSON;
        // read them as strings, which each field accepts or refuses.
        let v: Value = serde_json::from_str(&crate::fields::python_json(&text)).map_err(|e| {
            ModelError::Json {
                path: path.to_path_buf(),
                line: e.line(),
                msg: e.to_string(),
            }
        })?;
        Self::from_json(&v, path)
    }

    /// Parses a scheduler config; `path` is used in error messages.
    pub fn from_json(v: &Value, path: &Path) -> Result<Scheduler> {
        crate::error::json_object(v, path)?;
        let f = Fields { v, path };
        match f.str("_class_name", "")?.as_str() {
            "DDIMScheduler" => Ok(Scheduler::Ddim(ddim::Ddim::from_fields(&f)?)),
            "DPMSolverMultistepScheduler" => Ok(Scheduler::DpmSolverPP(dpm::DpmSolver::from_fields(&f)?)),
            "FlowMatchEulerDiscreteScheduler" => Ok(Scheduler::FlowEuler(flow::FlowEuler::from_fields(&f)?)),
            other => Err(ModelError::config(path, "_class_name", format!("unsupported scheduler `{other}`; supported: DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler"))),
        }
    }

    /// A default config by short name: `ddim` (DiT-XL-2-256's), `dpm` (PixArt-alpha's),
    /// `flow` (SD3's, shift 3), `flux` (FLUX.1-dev's: resolution-dependent shift).
    pub fn named(name: &str) -> Option<Scheduler> {
        let json = match name {
            "ddim" => {
                r#"{"_class_name":"DDIMScheduler","beta_start":0.0001,"beta_end":0.02,"beta_schedule":"linear","num_train_timesteps":1000,"set_alpha_to_one":true,"steps_offset":0,"clip_sample":false,"prediction_type":"epsilon","timestep_spacing":"leading"}"#
            }
            "dpm" | "dpm++" | "dpmsolver++" => {
                r#"{"_class_name":"DPMSolverMultistepScheduler","beta_start":0.0001,"beta_end":0.02,"beta_schedule":"linear","num_train_timesteps":1000,"algorithm_type":"dpmsolver++","solver_order":2,"solver_type":"midpoint","lower_order_final":true,"timestep_spacing":"linspace"}"#
            }
            "flow" | "euler" => {
                r#"{"_class_name":"FlowMatchEulerDiscreteScheduler","num_train_timesteps":1000,"shift":3.0}"#
            }
            "flux" => {
                r#"{"_class_name":"FlowMatchEulerDiscreteScheduler","num_train_timesteps":1000,"shift":3.0,"use_dynamic_shifting":true,"base_shift":0.5,"max_shift":1.15,"base_image_seq_len":256,"max_image_seq_len":4096}"#
            }
            _ => return None,
        };
        Self::from_json(
            &serde_json::from_str(json).expect("built-in config is JSON"),
            Path::new("<built-in>"),
        )
        .ok()
    }

    /// A model family's default scheduler (when its folder has none): DDIM for DiT, DPM-Solver++
    /// for PixArt, flow-matching Euler for SD3 (shift 3) and Flux (FLUX.1-dev's dynamic shift).
    pub fn family_default(arch: crate::Arch) -> Scheduler {
        Scheduler::named(match arch {
            crate::Arch::Dit => "ddim",
            crate::Arch::PixArt => "dpm",
            crate::Arch::Sd3 => "flow",
            crate::Arch::Flux => "flux",
        })
        .expect("built-in scheduler")
    }

    /// The training noise schedule `alphas_cumprod`, one value per training timestep (DDIM and
    /// DPM-Solver++; `None` for flow matching, which has none).
    pub fn alphas_cumprod(&self) -> Option<&[f32]> {
        match self {
            Scheduler::Ddim(s) => Some(s.acp()),
            Scheduler::DpmSolverPP(s) => Some(s.acp()),
            Scheduler::FlowEuler(_) => None,
        }
    }

    /// The plan for `steps` denoising steps as `set_timesteps(steps)` makes it (a scheduler
    /// that shifts by the image size needs [`plan_for`](Self::plan_for)).
    pub fn plan(&self, steps: usize) -> Result<SamplingPlan> {
        self.plan_for(steps, 0, PipelineTimesteps::Default)
    }

    /// The plan `cfg`'s diffusers pipeline makes for `steps` steps of a latent `[h, w]`:
    /// FluxPipeline passes its own sigmas; a dynamically shifting scheduler shifts by the image's
    /// token count.
    pub fn plan_for_model(
        &self,
        steps: usize,
        cfg: &crate::ModelConfig,
        [h, w]: [usize; 2],
    ) -> Result<SamplingPlan> {
        let p = cfg.patch_size.max(1);
        let how = match cfg.arch {
            crate::Arch::Flux => PipelineTimesteps::FluxSigmas,
            _ => PipelineTimesteps::Default,
        };
        self.plan_for(steps, (h / p) * (w / p), how)
    }

    /// The plan a model family's pipeline makes for `steps` steps of an image of `image_tokens`
    /// tokens (flow matching with `use_dynamic_shifting` shifts by it; FluxPipeline passes its
    /// own sigmas: `how`).
    pub fn plan_for(
        &self,
        steps: usize,
        image_tokens: usize,
        how: PipelineTimesteps,
    ) -> Result<SamplingPlan> {
        if steps == 0 {
            return Err(ModelError::Input(
                "the number of steps must be at least 1".into(),
            ));
        }
        match self {
            Scheduler::Ddim(s) => s.plan(steps),
            Scheduler::DpmSolverPP(s) => s.plan(steps),
            Scheduler::FlowEuler(s) => s.plan(steps, image_tokens, how),
        }
    }
}

/// A sampling run's mutable state: the step index and the multistep history.
#[derive(Debug, Clone)]
pub struct SamplerState {
    plan: SamplingPlan,
    history: Vec<f32>,
    step: usize,
}

impl SamplerState {
    /// State for a latent of `latent_len` elements.
    pub fn new(plan: SamplingPlan, latent_len: usize) -> SamplerState {
        let history = if plan.multistep {
            vec![0.0; latent_len]
        } else {
            Vec::new()
        };
        SamplerState {
            plan,
            history,
            step: 0,
        }
    }

    /// State that continues a run from a checkpoint: `plan` holds the remaining steps
    /// ([`SamplingPlan::from_step`]) and `history` the multistep history saved after the last
    /// completed step ([`SamplerState::history`]; empty for a single-step plan). Fails when the
    /// history's length does not match the latent's.
    pub fn resumed(
        plan: SamplingPlan,
        latent_len: usize,
        history: Vec<f32>,
    ) -> Result<SamplerState> {
        let want = if plan.multistep { latent_len } else { 0 };
        if history.len() != want {
            return Err(ModelError::Input(format!(
                "a checkpoint's sampler history has {} elements, the latent {latent_len} (multistep: {})",
                history.len(),
                plan.multistep
            )));
        }
        Ok(SamplerState {
            plan,
            history,
            step: 0,
        })
    }

    /// The multistep history (previous x0 prediction per latent element; empty when the plan
    /// is single-step): with the latent, what a checkpoint must keep to continue the run.
    pub fn history(&self) -> &[f32] {
        &self.history
    }

    /// The plan.
    pub fn plan(&self) -> &SamplingPlan {
        &self.plan
    }

    /// Index of the step the next update belongs to.
    pub fn step_index(&self) -> usize {
        self.step
    }

    /// Updates the elements `offset..offset + x.len()` of the latent for the current step (a part
    /// of the latent: call once per part, then [`SamplerState::advance`]).
    pub fn update_part(&mut self, offset: usize, x: &mut [f32], eps: &[f32]) -> Result<()> {
        let rule = *self.plan.rules.get(self.step).ok_or_else(|| {
            ModelError::Input(format!(
                "step {} is past the plan's {} steps",
                self.step,
                self.plan.rules.len()
            ))
        })?;
        if eps.len() != x.len() || (self.plan.multistep && offset + x.len() > self.history.len()) {
            return Err(ModelError::Input(format!(
                "sampler update of {} elements at {offset} does not fit ({} model outputs)",
                x.len(),
                eps.len()
            )));
        }
        let hist = self
            .plan
            .multistep
            .then(|| &mut self.history[offset..offset + x.len()]);
        rule.apply(x, eps, hist);
        Ok(())
    }

    /// Updates rows `row0..row0 + h` of a latent `x: [B, C, H, W]` for the current step with the
    /// model output of that strip, `eps: [B, C, h, W]` (one PipeFusion patch).
    pub fn update_rows(&mut self, x: &mut Tensor, row0: usize, eps: &Tensor) -> Result<()> {
        let (&[b, c, hh, w], &[eb, ec, h, ew]) = (x.shape(), eps.shape()) else {
            return Err(ModelError::Input(format!(
                "sampler strip update needs [B, C, H, W] tensors, got {:?} and {:?}",
                x.shape(),
                eps.shape()
            )));
        };
        if (eb, ec, ew) != (b, c, w) || row0 + h > hh {
            return Err(ModelError::Input(format!(
                "model output strip {:?} at row {row0} does not fit the latent {:?}",
                eps.shape(),
                x.shape()
            )));
        }
        let (xs, es) = (x.as_f32_mut()?, eps.as_f32()?);
        for plane in 0..b * c {
            let off = (plane * hh + row0) * w;
            let len = h * w;
            let e = &es[plane * len..(plane + 1) * len];
            self.update_part(off, &mut xs[off..off + len], e)?;
        }
        Ok(())
    }

    /// Ends the current step.
    pub fn advance(&mut self) {
        self.step += 1;
    }

    /// Updates the whole latent and ends the step.
    pub fn step(&mut self, x: &mut [f32], eps: &[f32]) -> Result<()> {
        self.update_part(0, x, eps)?;
        self.advance();
        Ok(())
    }
}

/// `alphas_cumprod` of a beta schedule, in f32 as torch computes it. The betas must lie in
/// `(0, 1)` and not decrease (`0 < beta_start <= beta_end < 1`, in f32 too), and the product
/// must stay a normal f32: outside that the samplers divide by zero or take the root of a
/// negative number and make NaN images.
pub(crate) fn alphas_cumprod(f: &Fields<'_>) -> Result<Vec<f32>> {
    let n = spacing::train_steps(f, 2)?;
    let (b0, b1) = (f.f64("beta_start", 0.0001)?, f.f64("beta_end", 0.02)?);
    // 1 - beta must be below 1 in f32: beta >= 2^-24.
    let smallest = f32::EPSILON as f64 / 2.0;
    let works = format!(
        "values that work: {smallest:.1e} <= beta_start <= beta_end < 1 (diffusers' defaults: \
         0.0001 and 0.02)"
    );
    for (k, b) in [("beta_start", b0), ("beta_end", b1)] {
        if !(b >= smallest && (b as f32) < 1.0) {
            return Err(ModelError::config(
                f.path,
                k,
                format!("{b} is out of range; {works}"),
            ));
        }
    }
    if b0 > b1 {
        return Err(ModelError::config(
            f.path,
            "beta_start",
            format!("{b0} is above beta_end {b1} (the noise would decrease over time); {works}"),
        ));
    }
    if f.v.get("trained_betas").is_some_and(|v| !v.is_null()) {
        return Err(ModelError::config(
            f.path,
            "trained_betas",
            "explicit beta lists are not supported",
        ));
    }
    let lin = |a: f64, b: f64| (0..n).map(move |i| a + (b - a) * i as f64 / (n - 1).max(1) as f64);
    let betas: Vec<f32> = match f.str("beta_schedule", "linear")?.as_str() {
        "linear" => lin(b0, b1).map(|b| b as f32).collect(),
        "scaled_linear" => lin(b0.sqrt(), b1.sqrt()).map(|b| (b * b) as f32).collect(),
        other => {
            return Err(ModelError::config(
                f.path,
                "beta_schedule",
                format!("`{other}` is not supported (linear, scaled_linear)"),
            ))
        }
    };
    let mut acc = 1f32;
    let acp: Vec<f32> = betas
        .iter()
        .map(|b| {
            acc *= 1.0 - b;
            acc
        })
        .collect();
    if let Some(t) = acp.iter().position(|a| *a < f32::MIN_POSITIVE) {
        return Err(ModelError::config(
            f.path,
            "beta_end",
            format!(
                "{b1} with {n} training timesteps removes all signal: alphas_cumprod falls to \
                 {:e} at timestep {t}, below f32's smallest normal number; lower beta_end or \
                 num_train_timesteps",
                acp[t]
            ),
        ));
    }
    Ok(acp)
}

pub(crate) fn require_epsilon(f: &Fields<'_>) -> Result<()> {
    match f.str("prediction_type", "epsilon")?.as_str() {
        "epsilon" => Ok(()),
        other => Err(ModelError::config(
            f.path,
            "prediction_type",
            format!("`{other}` is not supported (epsilon)"),
        )),
    }
}
