//! `pipefuse generate`: one whole sampling loop on one CPU device.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kernels::{Device, Tensor};
use model::sampler::guidance::{cfg_combine, denoise, take_channels, CfgOrder};
use model::sampler::{SamplerState, Scheduler};
use model::{Arch, CondInputs, Transformer};

use crate::tensor_io::{read_tensors, write_tensors};
use model::gaussian;

/// Arguments of `pipefuse generate`.
#[derive(Args, Debug)]
pub(crate) struct GenerateArgs {
    /// Model folder: a diffusers pipeline (model_index.json, transformer/, scheduler/) or a
    /// transformer folder (config.json + diffusion_pytorch_model*.safetensors).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// DiT: class label to generate; repeat for a batch (e.g. --class-label 1 --class-label 7).
    #[arg(long = "class-label", value_name = "N")]
    class_labels: Vec<usize>,
    /// PixArt: safetensors file with `prompt_embeds` [B, T, C] and optionally
    /// `prompt_attention_mask`, `negative_prompt_embeds`, `negative_prompt_attention_mask`.
    #[arg(long, value_name = "FILE")]
    prompt_embeds: Option<PathBuf>,
    /// Denoising steps [default: 50 for DiT, 20 for PixArt].
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale; 1 disables guidance [default: 4.0 DiT, 4.5 PixArt].
    #[arg(long)]
    guidance_scale: Option<f32>,
    /// Scheduler: `ddim`, `dpm` (DPM-Solver++ 2M), `flow` (flow-matching Euler), or a
    /// scheduler_config.json [default: the pipeline's scheduler/, else ddim for DiT, dpm for PixArt].
    #[arg(long, value_name = "NAME|FILE")]
    scheduler: Option<String>,
    /// Seed of the initial noise (ignored with --latents).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Image height in pixels (latent height x 8) [default: the model's sample size x 8].
    #[arg(long)]
    height: Option<usize>,
    /// Image width in pixels (latent width x 8) [default: the model's sample size x 8].
    #[arg(long)]
    width: Option<usize>,
    /// CPU threads of the device.
    #[arg(long, default_value_t = default_threads())]
    threads: usize,
    /// Initial noise from a safetensors file holding one tensor [B, C, H/8, W/8].
    #[arg(long, value_name = "FILE")]
    latents: Option<PathBuf>,
    /// Write the final latent to this safetensors file (tensor name `latent`).
    #[arg(long, value_name = "FILE")]
    save_latent: Option<PathBuf>,
}

pub(crate) fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Transformer folder and scheduler config of a model folder.
fn locate(dir: &Path) -> Result<(PathBuf, Option<PathBuf>)> {
    if dir.join("model_index.json").exists() {
        let t = dir.join("transformer");
        if !t.join("config.json").exists() {
            bail!(
                "{}: pipeline folder without transformer/config.json",
                dir.display()
            );
        }
        let s = dir.join("scheduler/scheduler_config.json");
        Ok((t, s.exists().then_some(s)))
    } else if dir.join("config.json").exists() {
        Ok((dir.to_path_buf(), None))
    } else {
        bail!("{}: neither a diffusers pipeline (model_index.json) nor a transformer folder (config.json)", dir.display())
    }
}

struct Caption {
    cond: Tensor,
    cond_mask: Option<Tensor>,
    uncond: Option<(Tensor, Option<Tensor>)>,
}

fn read_caption(path: &Path) -> Result<Caption> {
    let mut t = read_tensors(path)?;
    let as3 = |x: Tensor| -> Result<Tensor> {
        Ok(match x.shape().len() {
            2 => {
                let s = x.shape().to_vec();
                x.reshape(&[1, s[0], s[1]])?
            }
            3 => x,
            _ => bail!(
                "{}: `prompt_embeds` must be [B, T, C] or [T, C], got {:?}",
                path.display(),
                x.shape()
            ),
        })
    };
    let cond = as3(t
        .remove("prompt_embeds")
        .with_context(|| format!("{}: no tensor `prompt_embeds`", path.display()))?)?;
    let uncond = t
        .remove("negative_prompt_embeds")
        .map(as3)
        .transpose()?
        .map(|u| (u, t.remove("negative_prompt_attention_mask")));
    Ok(Caption {
        cond,
        cond_mask: t.remove("prompt_attention_mask"),
        uncond,
    })
}

pub(crate) fn run(a: GenerateArgs) -> Result<()> {
    let (tdir, pipeline_sched) = locate(&a.model)?;
    let device = Device::cpu(a.threads)?;
    let t0 = Instant::now();
    let model = Transformer::load(&tdir, None, device)
        .with_context(|| format!("loading {}", tdir.display()))?;
    let cfg = model.config().clone();
    tracing::info!(model = %tdir.display(), arch = ?cfg.arch, layers = cfg.num_layers, secs = t0.elapsed().as_secs_f32(), "model loaded");
    let sched = match (&a.scheduler, &pipeline_sched) {
        (Some(name), _) => match Scheduler::named(name) {
            Some(s) => s,
            None => Scheduler::from_file(Path::new(name)).with_context(|| {
                format!(
                    "--scheduler {name}: not ddim, dpm, flow or a readable scheduler_config.json"
                )
            })?,
        },
        (None, Some(file)) => Scheduler::from_file(file)?,
        (None, None) => {
            Scheduler::named(if cfg.arch == Arch::Dit { "ddim" } else { "dpm" }).expect("built-in")
        }
    };
    let steps = a
        .steps
        .unwrap_or(if cfg.arch == Arch::Dit { 50 } else { 20 });
    let scale = a
        .guidance_scale
        .unwrap_or(if cfg.arch == Arch::Dit { 4.0 } else { 4.5 });
    let guided = scale > 1.0;

    // Batch and conditioning.
    let (batch, caption) = match cfg.arch {
        Arch::Dit => {
            if a.class_labels.is_empty() {
                bail!(
                    "a DiT model needs at least one --class-label (0..{})",
                    cfg.num_classes - 1
                );
            }
            if let Some(&bad) = a.class_labels.iter().find(|&&l| l >= cfg.num_classes) {
                bail!(
                    "--class-label {bad} out of range: the model has classes 0..{}",
                    cfg.num_classes - 1
                );
            }
            (a.class_labels.len(), None)
        }
        Arch::PixArt => {
            let path = a
                .prompt_embeds
                .as_ref()
                .context("a PixArt model needs --prompt-embeds FILE (no text encoder runs here)")?;
            let c = read_caption(path)?;
            if guided && c.uncond.is_none() {
                bail!("{}: guidance scale {scale} needs `negative_prompt_embeds` (or pass --guidance-scale 1)", path.display());
            }
            (c.cond.dim(0), Some(c))
        }
    };
    let p8 = 8 * cfg.patch_size;
    let (h, w) = (
        a.height.unwrap_or(cfg.sample_size * 8),
        a.width.unwrap_or(cfg.sample_size * 8),
    );
    if h % p8 != 0 || w % p8 != 0 || h == 0 || w == 0 {
        bail!("--height {h} / --width {w} must be positive multiples of {p8} (VAE factor 8 x patch size {})", cfg.patch_size);
    }
    let shape = [batch, cfg.in_channels, h / 8, w / 8];
    let mut latent = match &a.latents {
        Some(path) => {
            let t = read_tensors(path)?;
            if t.len() != 1 {
                bail!(
                    "{}: --latents needs a file with exactly one tensor, found {}",
                    path.display(),
                    t.len()
                );
            }
            let x = t.into_values().next().expect("one tensor");
            if x.shape() != shape {
                bail!("{}: latents have shape {:?}, the request needs {:?} (batch, channels, height/8, width/8)", path.display(), x.shape(), shape);
            }
            x
        }
        None => gaussian(&shape, a.seed),
    };
    let plan = sched.plan(steps)?;
    if plan.init_noise_sigma != 1.0 {
        latent
            .as_f32_mut()?
            .iter_mut()
            .for_each(|v| *v *= plan.init_noise_sigma);
    }
    let mut state = SamplerState::new(plan, latent.elem_count());

    // Inputs of one forward (doubled under guidance).
    let labels: Vec<usize> = if guided {
        a.class_labels
            .iter()
            .copied()
            .chain(std::iter::repeat_n(cfg.null_class(), batch))
            .collect()
    } else {
        a.class_labels.clone()
    };
    let (caption_t, mask_t) = match &caption {
        None => (None, None),
        Some(c) if guided => {
            let (u, um) = c.uncond.as_ref().expect("checked above");
            let ones = |e: &Tensor| {
                Tensor::from_vec(vec![1.0; e.dim(0) * e.dim(1)], &[e.dim(0), e.dim(1)])
            };
            let (cm, um) = (
                c.cond_mask.clone().map_or_else(|| ones(&c.cond), Ok)?,
                um.clone().map_or_else(|| ones(u), Ok)?,
            );
            (
                Some(Tensor::cat(&[u, &c.cond], 0)?),
                Some(Tensor::cat(&[&um, &cm], 0)?),
            )
        }
        Some(c) => (Some(c.cond.clone()), c.cond_mask.clone()),
    };
    let order = if cfg.arch == Arch::Dit {
        CfgOrder::CondFirst
    } else {
        CfgOrder::UncondFirst
    };

    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} step {pos}/{len} [{bar:30}] {elapsed_precise} ({per_sec}, eta {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let t1 = Instant::now();
    let out = denoise(
        &mut state,
        latent,
        |_, t, x| {
            let xin = if guided {
                Tensor::cat(&[x, x], 0)?
            } else {
                x.clone()
            };
            let inputs = CondInputs {
                timesteps: vec![t; xin.dim(0)],
                class_labels: labels.clone(),
                caption: caption_t.clone(),
                caption_mask: mask_t.clone(),
                resolution: cfg
                    .use_additional_conditions
                    .then(|| vec![[h as f32, w as f32]; xin.dim(0)]),
                aspect_ratio: cfg
                    .use_additional_conditions
                    .then(|| vec![h as f32 / w as f32; xin.dim(0)]),
            };
            let o = model.forward(&xin, &inputs)?;
            if guided {
                cfg_combine(&o, cfg.in_channels, scale, order)
            } else {
                take_channels(&o, cfg.in_channels)
            }
        },
        |_| bar.inc(1),
    )?;
    bar.finish_and_clear();
    let secs = t1.elapsed().as_secs_f64();
    eprintln!(
        "generated {batch} latent(s) {:?} in {steps} steps: {secs:.2} s ({:.3} s/step)",
        out.shape(),
        secs / steps as f64
    );
    if let Some(path) = &a.save_latent {
        write_tensors(path, &[("latent", &out)])?;
        eprintln!("final latent written to {}", path.display());
    }
    Ok(())
}
