//! `pipefuse generate`: one request on a cluster (a topology file, or a local cluster of CPU
//! devices; one device runs the plain sampling loop's numbers).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use actors::{Cluster, ClusterOptions, GenerateRequest, Progress};
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use model::sampler::Scheduler;
use model::{gaussian, Arch, Request};

use crate::cluster_args::ClusterArgs;
use crate::tensor_io::{read_tensors, write_tensors};

/// Arguments of `pipefuse generate`.
#[derive(Args, Debug)]
pub(crate) struct GenerateArgs {
    #[command(flatten)]
    pub(crate) cluster: ClusterArgs,
    /// DiT: class label to generate; repeat for a batch (e.g. --class-label 1 --class-label 7).
    #[arg(long = "class-label", value_name = "N")]
    class_labels: Vec<usize>,
    /// Text-conditioned models (no text encoder runs here): a safetensors file with diffusers'
    /// names. PixArt: `prompt_embeds` [B, T, C], optionally `prompt_attention_mask`,
    /// `negative_prompt_embeds`, `negative_prompt_attention_mask`. SD3 / Flux:
    /// `prompt_embeds` [B, T, C] and `pooled_prompt_embeds` [B, P], for guidance also
    /// `negative_prompt_embeds` and `negative_pooled_prompt_embeds` (batch B or 1).
    #[arg(long, value_name = "FILE")]
    prompt_embeds: Option<PathBuf>,
    /// The prompt embeddings file's bytes when they came in a request (`pipefuse serve`), not
    /// from a file; `prompt_embeds` then only names them in messages.
    #[arg(skip)]
    prompt_embeds_bytes: Option<Vec<u8>>,
    /// Denoising steps [default: 50 for DiT, 20 for PixArt, 28 for SD3 and Flux].
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale; 1 disables guidance [default: 4.0 DiT, 4.5 PixArt,
    /// 7.0 SD3]. Flux: the guidance scale the model embeds (Flux.1-dev style models only,
    /// default 3.5); Flux's classifier-free guidance is --true-cfg-scale.
    #[arg(long)]
    guidance_scale: Option<f32>,
    /// Flux: true classifier-free guidance with the negative prompt embeddings (FluxPipeline's
    /// `true_cfg_scale`); 1 disables it [default: 1].
    #[arg(long, value_name = "SCALE")]
    true_cfg_scale: Option<f32>,
    /// Scheduler: `ddim`, `dpm` (DPM-Solver++ 2M), `flow` (flow-matching Euler, shift 3),
    /// `flux` (flow matching with FLUX.1-dev's resolution-dependent shift), or a
    /// scheduler_config.json [default: the pipeline's scheduler/, else ddim for DiT, dpm for
    /// PixArt, flow for SD3, flux for Flux].
    #[arg(long, value_name = "NAME|FILE")]
    scheduler: Option<String>,
    /// Seed of the initial noise (ignored with --latents).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Image height in pixels: latent height x the VAE's factor (8 for SD's VAE; 1 for a
    /// pixel-space model) [default: the model's sample size x that factor].
    #[arg(long)]
    height: Option<usize>,
    /// Image width in pixels (see --height) [default: the model's sample size x the factor].
    #[arg(long)]
    width: Option<usize>,
    /// Initial noise from a safetensors file holding one tensor [B, C, H/8, W/8] (unpacked for
    /// every model: Flux's 2x2 packing happens inside); it sets the image size unless
    /// --height / --width are given (they must then agree).
    #[arg(long, value_name = "FILE")]
    latents: Option<PathBuf>,
    /// Write the final latent to this safetensors file (tensor name `latent`).
    #[arg(long, value_name = "FILE")]
    save_latent: Option<PathBuf>,
    /// Write the images as one PNG grid (decoded through the model's vae/, or the samples
    /// themselves for a pixel-space model).
    #[arg(long, value_name = "FILE.png")]
    out: Option<PathBuf>,
    /// Seconds a stage may wait for its next input before the request fails.
    #[arg(long, value_name = "SECS", default_value_t = 600.0)]
    stall_timeout: f64,
    /// Seconds one patch (or warmup image) may compute on a device before the request fails
    /// naming the device (keep it below --stall-timeout).
    #[arg(long, value_name = "SECS", default_value_t = 300.0)]
    compute_timeout: f64,
    /// Multi-node clusters: a request whose node is lost fails naming the node, instead of
    /// resuming from its last step on the nodes that remain (the cluster still re-plans for the
    /// requests after it, and takes the node back when it returns).
    #[arg(long)]
    no_resume: bool,
    /// Send this request to a running cluster's coordinator (`pipefuse launch --serve`) through
    /// its Unix socket, instead of starting a cluster; cluster flags are not allowed then.
    #[arg(long, value_name = "SOCKET")]
    attach: Option<PathBuf>,
    /// Integer upscaling of each image in the PNG [default: tiles at least 96 px].
    #[arg(long, value_name = "N")]
    png_scale: Option<usize>,
}

fn scheduler(a: &GenerateArgs, cluster: &Cluster) -> Result<Scheduler> {
    Ok(match &a.scheduler {
        Some(name) => match Scheduler::named(name) {
            Some(s) => s,
            None => Scheduler::from_file(Path::new(name)).with_context(|| {
                format!(
                    "--scheduler {name}: not ddim, dpm, flow, flux or a readable scheduler_config.json"
                )
            })?,
        },
        None => cluster.model().default_scheduler()?,
    })
}

/// What an HTTP request asks for, in generate's terms: `pipefuse serve` builds its requests
/// through the same checks as the command line.
#[derive(Debug, Default)]
pub(crate) struct RequestFields {
    pub(crate) class_labels: Vec<usize>,
    /// A safetensors file's bytes (the request's `prompt_embeds`).
    pub(crate) prompt_embeds: Option<Vec<u8>>,
    pub(crate) steps: Option<usize>,
    pub(crate) guidance_scale: Option<f32>,
    pub(crate) seed: u64,
    pub(crate) height: Option<usize>,
    pub(crate) width: Option<usize>,
}

impl GenerateArgs {
    /// Generate's defaults with `f`'s request fields.
    pub(crate) fn from_fields(f: RequestFields) -> Result<GenerateArgs> {
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            args: GenerateArgs,
        }
        let mut a = <Defaults as clap::Parser>::try_parse_from(["generate"])?.args;
        a.class_labels = f.class_labels;
        a.prompt_embeds = f
            .prompt_embeds
            .as_ref()
            .map(|_| PathBuf::from("`prompt_embeds`"));
        a.prompt_embeds_bytes = f.prompt_embeds;
        a.steps = f.steps;
        a.guidance_scale = f.guidance_scale;
        a.seed = f.seed;
        a.height = f.height;
        a.width = f.width;
        Ok(a)
    }
}

/// The prompt embeddings' tensors: the request's bytes, else the `--prompt-embeds` file.
fn prompt_tensors(
    a: &GenerateArgs,
    path: &Path,
) -> Result<std::collections::HashMap<String, kernels::Tensor>> {
    match &a.prompt_embeds_bytes {
        Some(bytes) => crate::tensor_io::tensors_from_bytes(bytes, path),
        None => read_tensors(path),
    }
}

/// The request the flags describe, for the cluster's model.
pub(crate) fn request(a: &GenerateArgs, cluster: &Cluster) -> Result<GenerateRequest> {
    let cfg = &cluster.model().config;
    let steps = a.steps.unwrap_or(match cfg.arch {
        Arch::Dit => 50,
        Arch::PixArt => 20,
        Arch::Sd3 | Arch::Flux => 28,
    });
    if steps == 0 {
        bail!("--steps must be at least 1");
    }
    let (scale, embedded_guidance) = guidance(a, cfg)?;
    // A flag the model cannot use is an error, not silently dropped.
    match (cfg.arch, a.prompt_embeds.as_ref(), a.class_labels.first()) {
        (Arch::Dit, Some(p), _) => bail!(
            "--prompt-embeds {}: this is a class-conditioned DiT model, it takes --class-label \
             instead (prompt embeddings are for PixArt models)",
            p.display()
        ),
        (Arch::PixArt | Arch::Sd3 | Arch::Flux, _, Some(l)) => bail!(
            "--class-label {l}: this is a text-conditioned {:?} model, it takes \
             --prompt-embeds FILE instead (class labels are for DiT models)",
            cfg.arch
        ),
        _ => {}
    }
    let (batch, caption) = match cfg.arch {
        Arch::Dit if a.class_labels.is_empty() && a.cluster.uses_bundled_model() => {
            // The demo's default request: one image of every class (the digits 0-9).
            (cfg.num_classes, None)
        }
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
            let c =
                crate::caption::read_caption(path, prompt_tensors(a, path)?, cfg.caption_channels)?;
            if scale > 1.0 && c.negative.is_none() {
                bail!("{}: guidance scale {scale} needs `negative_prompt_embeds` (or pass --guidance-scale 1)", path.display());
            }
            (c.embeds.dim(0), Some(c))
        }
        Arch::Sd3 | Arch::Flux => {
            let path = a.prompt_embeds.as_ref().with_context(|| {
                format!(
                    "a {:?} model needs --prompt-embeds FILE with prompt_embeds and \
                     pooled_prompt_embeds (no text encoder runs here)",
                    cfg.arch
                )
            })?;
            let c =
                crate::caption::read_prompt(path, prompt_tensors(a, path)?, cfg.caption_channels)?;
            if scale > 1.0 && c.negative.is_none() {
                bail!(
                    "{}: guidance scale {scale} needs `negative_prompt_embeds` and \
                     `negative_pooled_prompt_embeds` (or pass {} 1)",
                    path.display(),
                    if cfg.arch == Arch::Flux {
                        "--true-cfg-scale"
                    } else {
                        "--guidance-scale"
                    }
                );
            }
            (c.embeds.dim(0), Some(c))
        }
    };
    let f = crate::images::pixel_factor(cluster.model())?;
    let pf = f * cfg.patch_size;
    // --latents fixes the size (unless --height / --width say the same).
    let given = match &a.latents {
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
            if x.shape().len() != 4 {
                bail!(
                    "{}: latents have shape {:?}: expected [B, C, H/{f}, W/{f}] (unpacked, for \
                     every model)",
                    path.display(),
                    x.shape()
                );
            }
            Some((path, x))
        }
        None => None,
    };
    let from_latents = given.as_ref().map(|(_, x)| (x.dim(2) * f, x.dim(3) * f));
    let (h, w) = (
        a.height
            .or(from_latents.map(|s| s.0))
            .unwrap_or(cfg.sample_size * f),
        a.width
            .or(from_latents.map(|s| s.1))
            .unwrap_or(cfg.sample_size * f),
    );
    if h % pf != 0 || w % pf != 0 || h == 0 || w == 0 {
        bail!("--height {h} / --width {w} must be positive multiples of {pf} (pixels per latent element {f} x patch size {})", cfg.patch_size);
    }
    let shape = [batch, cfg.in_channels, h / f, w / f];
    let request = Request {
        class_labels: if a.class_labels.is_empty() && cfg.arch == Arch::Dit {
            (0..batch).collect()
        } else {
            a.class_labels.clone()
        },
        caption,
        guidance_scale: scale,
        latent_size: [h / f, w / f],
        embedded_guidance,
    };
    // Everything the request will allocate, against what this host can give, before the noise
    // (B C H W floats) or anything else of its size exists.
    let png_scale = a.out.as_ref().map(|_| {
        a.png_scale
            .unwrap_or_else(|| crate::png_out::auto_scale(h, w))
    });
    let outputs = crate::images::output_bytes(cluster.model(), batch, (h, w), png_scale)?;
    let estimate = cluster.check_memory(&request, outputs).map_err(|e| {
        let size = match (a.height, a.width, &a.latents) {
            (None, None, None) => format!(
                "{h}x{w} px (the default: the model's sample_size {} x {f})",
                cfg.sample_size
            ),
            (_, _, Some(p)) if a.height.is_none() => {
                format!("{h}x{w} px (from --latents {})", p.display())
            }
            _ => format!("--height {h} / --width {w}"),
        };
        let images = match (a.class_labels.len(), &a.prompt_embeds) {
            (0, None) => format!("{batch} image(s)"),
            (n, None) => format!("{n} --class-label image(s)"),
            (_, Some(p)) => format!("{batch} prompt(s) in {}", p.display()),
        };
        anyhow::anyhow!("{images} of {size}: {e}")
    })?;
    tracing::info!(%estimate, "request memory estimate");
    let noise = match given {
        Some((path, x)) => {
            if x.shape() != shape {
                bail!("{}: latents have shape {:?}, the request needs {:?} (batch, channels, height/{f}, width/{f})", path.display(), x.shape(), shape);
            }
            check_values(path, "latents", &x, MAX_NOISE)?;
            x
        }
        None => gaussian(&shape, a.seed),
    };
    if let Some(c) = &request.caption {
        let path = a.prompt_embeds.as_deref().unwrap_or(Path::new("prompt"));
        for (name, t) in [
            ("prompt_embeds", Some(&c.embeds)),
            ("negative_prompt_embeds", c.negative.as_ref().map(|n| &n.0)),
            ("pooled_prompt_embeds", c.pooled.as_ref()),
            ("negative_pooled_prompt_embeds", c.negative_pooled.as_ref()),
        ] {
            if let Some(t) = t {
                check_values(path, name, t, f32::MAX)?;
            }
        }
    }
    Ok(GenerateRequest {
        request,
        steps,
        scheduler: scheduler(a, cluster)?,
        noise,
    })
}

/// The classifier-free guidance scale and Flux-dev's embedded guidance the flags ask for; a
/// guidance flag the model cannot use is an error.
/// The largest initial-noise magnitude accepted from a --latents file (Gaussian noise stays far
/// below it; 3e38 or a typo'd scale would only produce garbage).
const MAX_NOISE: f32 = 1e4;

/// Refuses NaN, infinite and (beyond `max`) absurd values in an input tensor, naming the file,
/// the tensor and the first bad element.
fn check_values(path: &Path, name: &str, t: &kernels::Tensor, max: f32) -> Result<()> {
    if let Some((i, v)) = t
        .as_f32()?
        .iter()
        .enumerate()
        .find(|(_, v)| !v.is_finite() || v.abs() > max)
    {
        bail!(
            "{}: `{name}` element {i} is {v}: inputs must be finite{}",
            path.display(),
            if max < f32::MAX {
                format!(" and within +-{max:e}")
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

fn guidance(a: &GenerateArgs, cfg: &model::ModelConfig) -> Result<(f32, Option<f32>)> {
    for (flag, v) in [
        ("--guidance-scale", a.guidance_scale),
        ("--true-cfg-scale", a.true_cfg_scale),
    ] {
        if let Some(v) = v.filter(|v| !v.is_finite() || *v < 0.0) {
            bail!("{flag} {v}: must be a finite number >= 0 (1 disables guidance)");
        }
    }
    if let (Some(s), false) = (a.true_cfg_scale, cfg.arch == Arch::Flux) {
        bail!("--true-cfg-scale {s}: only Flux models take it (use --guidance-scale)");
    }
    Ok(match cfg.arch {
        Arch::Dit => (a.guidance_scale.unwrap_or(4.0), None),
        Arch::PixArt => (a.guidance_scale.unwrap_or(4.5), None),
        Arch::Sd3 => (a.guidance_scale.unwrap_or(7.0), None),
        Arch::Flux => {
            let embeds =
                matches!(&cfg.mmdit, Some(model::mmdit::MmditConfig::Flux(f)) if f.guidance_embeds);
            let embedded = match (embeds, a.guidance_scale) {
                (true, g) => Some(g.unwrap_or(3.5)),
                (false, None) => None,
                (false, Some(g)) => bail!(
                    "--guidance-scale {g}: this Flux model has no guidance embedding \
                     (Flux.1-schnell style); for classifier-free guidance use --true-cfg-scale \
                     with negative prompt embeddings"
                ),
            };
            (a.true_cfg_scale.unwrap_or(1.0), embedded)
        }
    })
}

impl GenerateArgs {
    /// The flags of one request that were given (they mean nothing to a process that does not
    /// run that request: a non-coordinator node, or a server that takes requests from clients).
    pub(crate) fn request_flags(&self) -> Vec<&'static str> {
        [
            ("--class-label", !self.class_labels.is_empty()),
            ("--prompt-embeds", self.prompt_embeds.is_some()),
            ("--steps", self.steps.is_some()),
            ("--guidance-scale", self.guidance_scale.is_some()),
            ("--true-cfg-scale", self.true_cfg_scale.is_some()),
            ("--scheduler", self.scheduler.is_some()),
            ("--seed", self.seed != 0),
            ("--height", self.height.is_some()),
            ("--width", self.width.is_some()),
            ("--latents", self.latents.is_some()),
            ("--save-latent", self.save_latent.is_some()),
            ("--out", self.out.is_some()),
            ("--png-scale", self.png_scale.is_some()),
            ("--attach", self.attach.is_some()),
        ]
        .into_iter()
        .filter_map(|(flag, given)| given.then_some(flag))
        .collect()
    }

    /// The runtime flags another node's process must repeat.
    pub(crate) fn forwarded_timeouts(&self) -> Vec<String> {
        vec![
            "--stall-timeout".into(),
            self.stall_timeout.to_string(),
            "--compute-timeout".into(),
            self.compute_timeout.to_string(),
        ]
    }

    /// The cluster options the flags ask for.
    pub(crate) fn options(&self) -> Result<ClusterOptions> {
        let secs = |v: f64, flag: &str| {
            std::time::Duration::try_from_secs_f64(v)
                .ok()
                .filter(|d| !d.is_zero())
                .with_context(|| format!("{flag} {v}: must be a positive number of seconds"))
        };
        Ok(ClusterOptions {
            stall_timeout: secs(self.stall_timeout, "--stall-timeout")?,
            compute_timeout: secs(self.compute_timeout, "--compute-timeout")?,
            // Chaos drills and the fault tests: a deliberate failure from the environment.
            fault: actors::Fault::from_env().map_err(anyhow::Error::msg)?,
            resume: !self.no_resume,
        })
    }
}

pub(crate) fn run(a: GenerateArgs) -> Result<()> {
    if let Some(socket) = &a.attach {
        // Forward the command line as given, minus --attach.
        let mut args: Vec<String> = std::env::args()
            .skip_while(|x| x != "generate")
            .skip(1)
            .collect();
        if let Some(i) = args.iter().position(|x| x == "--attach") {
            args.drain(i..(i + 2).min(args.len()));
        }
        args.retain(|x| !x.starts_with("--attach="));
        return crate::attach::attach(socket, args);
    }
    let spec = a.cluster.spec()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let t0 = Instant::now();
        let options = a.options()?;
        let cluster = Cluster::start(spec, options).await?;
        tracing::info!(secs = t0.elapsed().as_secs_f32(), "cluster started");
        let result = generate(&a, &cluster).await;
        cluster.shutdown().await;
        result
    })
}

/// Where a request's messages go: the terminal (progress bar + stderr) or a client connection.
pub(crate) trait Report: Send + Sync {
    /// A line of output.
    fn line(&self, s: &str);
    /// The request started; `steps` in total.
    fn start(&self, _steps: usize) {}
    /// The request was queued on the cluster as request `id` (nothing is queued before this).
    fn submitted(&self, _id: u64) {}
    /// `done` steps of `steps` are complete.
    fn step(&self, done: usize, steps: usize);
    /// The request ended (successfully or not).
    fn end(&self) {}
}

/// Progress bar and messages on stderr.
#[derive(Default)]
pub(crate) struct Terminal(std::sync::OnceLock<ProgressBar>);

impl Report for Terminal {
    fn line(&self, s: &str) {
        match self.0.get() {
            // A closed stderr (`... 2>&1 | head -1`) must not stop the run before it saves.
            Some(bar) => bar.suspend(|| {
                let _ = writeln!(std::io::stderr(), "{s}");
            }),
            None => {
                let _ = writeln!(std::io::stderr(), "{s}");
            }
        }
    }
    fn start(&self, steps: usize) {
        let bar = ProgressBar::new(steps as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} step {pos}/{len} [{bar:30}] {elapsed_precise} ({per_sec}, eta {eta})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        let _ = self.0.set(bar);
    }
    fn step(&self, done: usize, _steps: usize) {
        if let Some(bar) = self.0.get() {
            bar.set_position(done as u64);
        }
    }
    fn end(&self) {
        if let Some(bar) = self.0.get() {
            bar.finish_and_clear();
        }
    }
}

/// Refuses, before any compute, outputs that could not be written: a PNG path that is not `.png`
/// or whose folder does not exist, a PNG of a model whose latents cannot become images, a latent
/// file in a missing folder.
fn check_outputs(a: &GenerateArgs, cluster: &Cluster) -> Result<()> {
    if let Some(out) = &a.out {
        let is_png = out
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("png"));
        let is_device = std::fs::metadata(out)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_char_device(&m.file_type()));
        if !is_png && !is_device {
            bail!(
                "--out {}: only PNG is written; use a .png file name",
                out.display()
            );
        }
        crate::output_file::check_writable(out, "--out")?;
        crate::images::check_decodable(cluster.model())?;
    }
    if let Some(p) = &a.save_latent {
        crate::output_file::check_writable(p, "--save-latent")?;
    }
    Ok(())
}

/// Runs the request the flags describe on `cluster` and writes the outputs, messages on stderr.
pub(crate) async fn generate(a: &GenerateArgs, cluster: &Cluster) -> Result<()> {
    generate_with(a, cluster, &Terminal::default()).await
}

/// Runs the request the flags describe on `cluster` and writes the outputs, messages to `report`.
pub(crate) async fn generate_with(
    a: &GenerateArgs,
    cluster: &Cluster,
    report: &dyn Report,
) -> Result<()> {
    let req = request(a, cluster)?;
    let plan = cluster.plan(&req)?;
    check_outputs(a, cluster)?;
    if a.out.is_some() {
        // The PNG's size is known now: refuse an absurd --png-scale before any compute.
        let f = crate::images::pixel_factor(cluster.model())?;
        let [b, _, h, w] = req.noise.shape() else {
            bail!("the request's latent is not [B, C, H, W]");
        };
        let (h, w) = (h * f, w * f);
        let scale = a
            .png_scale
            .unwrap_or_else(|| crate::png_out::auto_scale(h, w));
        crate::png_out::grid_size(*b, h, w, scale)?;
    }
    if a.out.is_none() && a.save_latent.is_none() {
        report.line("note: neither --out nor --save-latent given: the result is only summarised");
    }
    let (steps, batch) = (req.steps, req.noise.dim(0));
    let mut cfg_groups = if plan.cfg_degree > 1 {
        format!(" x {} CFG groups", plan.cfg_degree)
    } else {
        String::new()
    };
    if plan.sp.degree() > 1 {
        cfg_groups += &format!(" x {} {} ranks", plan.sp.degree(), plan.sp.name());
    }
    let bf16 = plan
        .roles()
        .iter()
        .filter(|r| {
            matches!(
                r.device.spec,
                topology::DeviceSpec::Cpu {
                    precision: topology::Precision::Bf16,
                    ..
                }
            )
        })
        .count();
    let precision = match bf16 {
        0 => String::new(),
        n => format!(
            "; linear layers in bf16 on {n} device(s) ({} here)",
            kernels::bf16_gemm_path()
        ),
    };
    report.line(&format!(
        "{} stage(s){cfg_groups}, {} patch(es), {} warmup step(s), {steps} steps{precision}",
        plan.pipeline_len(),
        plan.patches.len(),
        plan.warmup_steps.min(steps)
    ));
    report.start(steps);
    let mut handle = cluster.submit(req).await?;
    report.submitted(handle.id());
    while let Some(p) = handle.progress.recv().await {
        match p {
            Progress::Step { step, .. } => report.step(step + 1, steps),
            Progress::Resumed { steps_done, reason } => report.line(&format!(
                "interrupted: {reason}; resumed from the checkpoint after step {steps_done} of {steps}"
            )),
        }
    }
    let out = handle.result().await;
    report.end();
    let out = out?;
    let secs = out.summary.wall.as_secs_f64();
    report.line(&format!(
        "generated {batch} latent(s) {:?} in {steps} steps: {secs:.2} s ({:.3} s/step)",
        out.latent.shape(),
        secs / steps as f64
    ));
    report.line(out.summary.to_string().trim_end());
    // Both outputs are attempted: one failing does not lose the other. The VAE decode and the
    // file writes run on a blocking thread, so a server's other connections go on meanwhile
    // (and a panic there becomes this request's error).
    let model = cluster.model().clone();
    let (save_latent, png_out, png_scale) = (a.save_latent.clone(), a.out.clone(), a.png_scale);
    let latent = out.latent;
    let written = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        if let Some(path) = &save_latent {
            lines.push(
                write_tensors(path, &[("latent", &latent)])
                    .map(|()| format!("final latent written to {}", path.display())),
            );
        }
        if let Some(path) = &png_out {
            let png = (|| -> Result<usize> {
                let threads = crate::cluster_args::cores();
                let images = crate::images::to_images(&model, &latent, threads)?; // [B, C, H, W] in [0, 1]
                let scale = png_scale
                    .unwrap_or_else(|| crate::png_out::auto_scale(images.dim(2), images.dim(3)));
                crate::png_out::write_grid(path, &images, scale)?;
                Ok(images.dim(0))
            })();
            lines.push(png.map(|n| format!("{n} image(s) written to {}", path.display())));
        }
        lines
    })
    .await
    .context("writing the outputs")?;
    let mut failures = Vec::new();
    for line in written {
        match line {
            Ok(l) => report.line(&l),
            Err(e) => failures.push(e),
        }
    }
    match failures.len() {
        0 => Ok(()),
        1 => Err(failures.pop().expect("one")),
        _ => {
            let all: Vec<String> = failures.iter().map(crate::error_chain).collect();
            bail!("both outputs failed: {}", all.join("; "))
        }
    }
}
