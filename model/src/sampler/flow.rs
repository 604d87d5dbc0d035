//! `FlowMatchEulerDiscreteScheduler`: SD3's static shift and the resolution-dependent
//! ("dynamic") shift Flux uses, with the sigmas the pipelines pass.
//! Reference: diffusers 0.42.1 `scheduling_flow_match_euler_discrete.py` (`set_timesteps`,
//! `time_shift`), `pipeline_flux.py` / `pipeline_stable_diffusion_3.py` (`calculate_shift`,
//! FluxPipeline's `np.linspace(1.0, 1 / steps, steps)` sigmas).

use super::{Fields, SamplingPlan, StepRule};
use crate::error::{ModelError, Result};

/// The range of a static `shift` whose f32 sigmas stay in [0, 1] (up to 1e-5) and distinct;
/// released models use 1 to ~17.
const MIN_SHIFT: f64 = 0.01;
const MAX_SHIFT: f64 = 1000.0;

/// Flow-matching Euler's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowEuler {
    train: usize,
    shift: f64,
    dynamic: Option<DynamicShift>,
}

/// `use_dynamic_shifting`: `mu` grows linearly with the image's token count from `base_shift`
/// at `base_seq` tokens to `max_shift` at `max_seq`; sigmas become `e^mu / (e^mu + 1/s - 1)`
/// (exponential) or `mu / (mu + 1/s - 1)` (linear `time_shift_type`).
#[derive(Debug, Clone, PartialEq)]
struct DynamicShift {
    base_shift: f64,
    max_shift: f64,
    base_seq: f64,
    max_seq: f64,
    linear: bool,
}

impl DynamicShift {
    /// The pipelines' `calculate_shift` (f64, as Python computes it).
    fn mu(&self, image_tokens: usize) -> f64 {
        let m = (self.max_shift - self.base_shift) / (self.max_seq - self.base_seq);
        let b = self.base_shift - m * self.base_seq;
        image_tokens as f64 * m + b
    }

    /// `time_shift(mu, 1.0, s)` on a float32 array (NumPy keeps float32: the Python float
    /// `exp(mu)` is cast to it).
    fn shift(&self, mu: f64, s: f32) -> f32 {
        let e = if self.linear {
            mu as f32
        } else {
            mu.exp() as f32
        };
        e / (e + (1.0 / s - 1.0))
    }

    /// Errors unless every shifted sigma is a number in `[0, 1]`: a shift that extrapolates far
    /// from `base_image_seq_len..max_image_seq_len` (or a linear shift through 0) would make
    /// NaN or negative noise levels.
    fn check(&self, mu: f64, image_tokens: usize, sigmas: &[f32]) -> Result<()> {
        if sigmas.iter().all(|s| (0.0..=1.0).contains(s)) {
            return Ok(());
        }
        Err(ModelError::Input(format!(
            "the scheduler's dynamic shift for {image_tokens} image tokens is mu = {mu} \
             (base_shift {} at {} tokens, max_shift {} at {}), which gives noise levels outside \
             [0, 1]; use an image size nearer the config's range or other shifts",
            self.base_shift, self.base_seq, self.max_shift, self.max_seq
        )))
    }

    /// The same on a float64 array.
    fn shift_f64(&self, mu: f64, s: f64) -> f64 {
        let e = if self.linear { mu } else { mu.exp() };
        e / (e + (1.0 / s - 1.0))
    }
}

/// How a model family's diffusers pipeline sets a scheduler's timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipelineTimesteps {
    /// `set_timesteps(steps)` (DiT, PixArt, SD3; SD3 passes `mu` when the scheduler shifts
    /// dynamically).
    Default,
    /// FluxPipeline: its own sigmas `linspace(1, 1 / steps, steps)`, and `mu`.
    FluxSigmas,
}

impl FlowEuler {
    pub(super) fn from_fields(f: &Fields<'_>) -> Result<FlowEuler> {
        for k in [
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
        let dynamic = match f.bool("use_dynamic_shifting", false)? {
            false => None,
            true => Some(DynamicShift {
                base_shift: f.f64("base_shift", 0.5)?,
                max_shift: f.f64("max_shift", 1.15)?,
                base_seq: f.usize("base_image_seq_len", 256)? as f64,
                max_seq: f.usize("max_image_seq_len", 4096)? as f64,
                linear: match f.str("time_shift_type", "exponential")?.as_str() {
                    "exponential" => false,
                    "linear" => true,
                    other => {
                        return Err(ModelError::config(
                            f.path,
                            "time_shift_type",
                            format!("`{other}`: expected \"exponential\" or \"linear\""),
                        ))
                    }
                },
            }),
        };
        if let Some(d) = &dynamic {
            if d.max_seq == d.base_seq {
                return Err(ModelError::config(
                    f.path,
                    "max_image_seq_len",
                    "must differ from base_image_seq_len",
                ));
            }
        }
        // The shifted sigmas are computed in f32 as diffusers does: the first one is
        // `shift / (1 + (shift - 1))`, which rounds above 1 by ~6e-8 / shift (a shift of 1e-9
        // divides by 0: inf); a shift far above 1000 makes every sigma ~1.
        let shift = f.positive_f64("shift", 1.0)?;
        if !(MIN_SHIFT..=MAX_SHIFT).contains(&shift) {
            return Err(ModelError::config(
                f.path,
                "shift",
                format!(
                    "{shift} is out of range; values that work: {MIN_SHIFT}..={MAX_SHIFT} (SD3 \
                     uses 3.0, Flux.1-schnell 1.0)"
                ),
            ));
        }
        Ok(FlowEuler {
            train: super::spacing::train_steps(f, 1)?,
            shift,
            dynamic,
        })
    }

    fn shifted(&self, s: f64) -> f64 {
        self.shift * s / (1.0 + (self.shift - 1.0) * s)
    }

    /// The plan for `n` steps of an image of `image_tokens` tokens (the dynamic shift's input),
    /// with the sigmas the pipeline passes.
    pub(super) fn plan(
        &self,
        n: usize,
        image_tokens: usize,
        how: PipelineTimesteps,
    ) -> Result<SamplingPlan> {
        let mut sigmas: Vec<f32> = match (&self.dynamic, how) {
            (None, PipelineTimesteps::Default) => return self.plan_static(n),
            (Some(_), _) if image_tokens == 0 => {
                return Err(ModelError::Input(
                    "this scheduler shifts by the image size (use_dynamic_shifting): the plan                      needs the image's token count"
                        .into(),
                ))
            }
            // linspace(1, 1/n, n) in f64, then float32.
            (_, PipelineTimesteps::FluxSigmas) => (0..n)
                .map(|i| {
                    let end = 1.0 / n as f64;
                    match n {
                        1 => 1.0,
                        _ => (1.0 + (end - 1.0) * i as f64 / (n - 1) as f64) as f32,
                    }
                })
                .collect(),
            // The unshifted training range (dynamic schedulers do not shift at construction),
            // spaced and shifted in f64 (NumPy float64 arrays), then float32.
            (Some(d), PipelineTimesteps::Default) => {
                let train = self.train as f64;
                let (t0, t1) = (train, (1.0f32 / self.train as f32) as f64 * train);
                let mu = d.mu(image_tokens);
                let sigmas = (0..n)
                    .map(|i| {
                        let t = match n {
                            1 => t0,
                            _ => t0 + (t1 - t0) * i as f64 / (n - 1) as f64,
                        };
                        d.shift_f64(mu, t / train) as f32
                    })
                    .collect::<Vec<f32>>();
                d.check(mu, image_tokens, &sigmas)?;
                return Ok(self.plan_of_sigmas(sigmas));
            }
        };
        match &self.dynamic {
            Some(d) => {
                let mu = d.mu(image_tokens);
                sigmas.iter_mut().for_each(|s| *s = d.shift(mu, *s));
                d.check(mu, image_tokens, &sigmas)?;
            }
            None => {
                let shift = self.shift as f32;
                sigmas
                    .iter_mut()
                    .for_each(|s| *s = shift * *s / (1.0 + (shift - 1.0) * *s));
            }
        }
        Ok(self.plan_of_sigmas(sigmas))
    }

    /// Timesteps (sigma x train, float32) and Euler rules from the shifted sigmas (a terminal
    /// 0 appended).
    fn plan_of_sigmas(&self, mut sigmas: Vec<f32>) -> SamplingPlan {
        let n = sigmas.len();
        let train = self.train as f32;
        sigmas.push(0.0);
        SamplingPlan {
            timesteps: sigmas[..n].iter().map(|s| s * train).collect(),
            rules: (0..n)
                .map(|i| StepRule {
                    x0_alpha: 1.0,
                    x0_sigma: 0.0,
                    a: 1.0,
                    b: 0.0,
                    c: 0.0,
                    e: sigmas[i + 1] - sigmas[i],
                })
                .collect(),
            multistep: false,
            init_noise_sigma: 1.0,
        }
    }

    fn plan_static(&self, n: usize) -> Result<SamplingPlan> {
        let train = self.train as f64;
        // The training sigmas are shifted once at construction; set_timesteps spaces timesteps
        // between the shifted extremes and shifts again (diffusers' behaviour, kept).
        // The largest training sigma is timestep `train` / `train`: exactly 1.0 in f32.
        let sigma_max = self.shifted(1.0) as f32 as f64;
        let sigma_min = self.shifted((1.0f32 / train as f32) as f64) as f32 as f64;
        let (t0, t1) = (sigma_max * train, sigma_min * train);
        let sigmas: Vec<f32> = (0..n)
            .map(|i| {
                let t = if n == 1 {
                    t0
                } else {
                    t0 + (t1 - t0) * i as f64 / (n - 1) as f64
                };
                self.shifted(t / train) as f32
            })
            .collect();
        Ok(self.plan_of_sigmas(sigmas))
    }
}
