//! `pipefuse bench pipeline`: PipeFusion on N CPU devices against the plain single-device loop on
//! one device of the same thread count per device (the serial baseline), and against one device
//! with all N x threads, same model (random weights of a preset) and request, in one process.

use std::sync::Arc;
use std::time::Instant;

use actors::stage::{run_serial, RequestSetup};
use actors::{Cluster, ClusterOptions, GenerateRequest};
use anyhow::{Context, Result};
use clap::Args;
use kernels::{Device, Tensor};
use model::sampler::Scheduler;
use model::{ModelConfig, Request, Transformer};
use topology::{ClusterSpec, ModelSpec};

/// Arguments of `pipefuse bench pipeline`.
#[derive(Args, Debug)]
pub(crate) struct PipelineArgs {
    /// Model preset (random weights, seed 0): DiT-*, PixArt-alpha-*, SD3-Medium, SD3.5-Medium,
    /// SD3.5-Large, Flux.1-dev, Flux.1-schnell.
    #[arg(long, default_value = "DiT-B/2")]
    preset: String,
    /// Image size in pixels (latent = resolution / 8).
    #[arg(long, default_value_t = 256)]
    resolution: usize,
    /// Images per request (guidance doubles the rows; text models get random prompt
    /// embeddings).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Denoising steps (DDIM); 50 = `pipefuse generate`'s DiT default. The warmup step runs one
    /// stage at a time, so the speedup ceiling is T / (W + (T - W) / N + 1 / M) ideal step times.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Guidance scale (> 1: classifier-free guidance).
    #[arg(long, default_value_t = 4.0)]
    guidance_scale: f32,
    /// PipeFusion stages N per CFG group.
    #[arg(long, default_value_t = 2)]
    pipefusion_degree: usize,
    /// CFG parallel degree C (1 or 2): C x N CPU devices.
    #[arg(long, default_value_t = 1)]
    cfg_degree: usize,
    /// Ulysses degree U (also inside PipeFusion stages): C x N x U x R devices.
    #[arg(long, default_value_t = 1)]
    ulysses_degree: usize,
    /// Ring-attention degree R (also inside PipeFusion stages): C x N x U x R devices.
    #[arg(long, default_value_t = 1)]
    ring_degree: usize,
    /// Patches M [default: N: with equal stages the pipeline stays full across steps, and
    /// larger patches keep the GEMMs efficient].
    #[arg(long)]
    num_patches: Option<usize>,
    /// Warmup steps W.
    #[arg(long, default_value_t = 1)]
    warmup_steps: usize,

    /// CPU threads per device (the serial baseline gets the same).
    #[arg(long, default_value_t = 1, value_parser = crate::cluster_args::thread_count)]
    threads: usize,
    /// Skip the one-device-with-all-threads comparison.
    #[arg(long)]
    no_multithread_baseline: bool,
    /// Interleaved rounds (serial, PipeFusion, all-threads); medians are reported.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
}

/// The benchmark's request, noise from seed 0: DiT `batch` class labels and DDIM; text models
/// random prompt embeddings (PixArt 120 caption tokens and DPM-Solver++; SD3 333 prompt tokens and
/// pooled embeddings, flow matching; Flux 512, FLUX.1-dev's scheduler and embedded guidance 3.5),
/// with negative ones under guidance (Flux: true CFG).
fn bench_request(cfg: &ModelConfig, a: &PipelineArgs) -> GenerateRequest {
    use model::mmdit::MmditConfig;
    let side = a.resolution / 8;
    let b = a.batch;
    let guided = a.guidance_scale > 1.0;
    let tokens = cfg.typical_text_tokens();
    let (pooled, embedded) = match &cfg.mmdit {
        None => (None, None),
        Some(MmditConfig::Sd3(c)) => (Some(c.pooled_projection_dim), None),
        Some(MmditConfig::Flux(c)) => (
            Some(c.pooled_projection_dim),
            c.guidance_embeds.then_some(3.5),
        ),
    };
    let embeds = |seed| model::gaussian(&[b, tokens, cfg.caption_channels], seed);
    let caption = (tokens > 0).then(|| model::Caption {
        embeds: embeds(1),
        mask: None,
        negative: guided.then(|| (embeds(2), None)),
        pooled: pooled.map(|p| model::gaussian(&[b, p], 3)),
        negative_pooled: pooled
            .filter(|_| guided)
            .map(|p| model::gaussian(&[b, p], 4)),
    });
    GenerateRequest {
        request: Request {
            class_labels: match cfg.arch {
                model::Arch::Dit => (0..b).map(|i| (7 * i + 1) % cfg.num_classes).collect(),
                _ => Vec::new(),
            },
            caption,
            guidance_scale: a.guidance_scale,
            latent_size: [side, side],
            embedded_guidance: embedded,
        },
        steps: a.steps,
        scheduler: Scheduler::family_default(cfg.arch),
        noise: model::gaussian(&[b, cfg.in_channels, side, side], 0),
    }
}

/// The same request as the serial loop sees it.
fn setup(
    cfg: &ModelConfig,
    req: &GenerateRequest,
    patches: Vec<std::ops::Range<usize>>,
    warmup: usize,
) -> Result<Arc<RequestSetup>> {
    Ok(Arc::new(RequestSetup::new(
        0,
        cfg,
        &req.request,
        &req.scheduler,
        req.steps,
        &req.noise,
        patches,
        warmup,
    )?))
}

fn timed_serial(model: &Transformer, setup: &RequestSetup) -> Result<(f64, Tensor)> {
    let t = Instant::now();
    let out = run_serial(model, setup, |_| {})?;
    Ok((t.elapsed().as_secs_f64(), out))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn rel_l2(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (a.as_f32()?, b.as_f32()?);
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    Ok((num / den).sqrt())
}

pub(crate) fn run(a: PipelineArgs) -> Result<()> {
    eprintln!("{}", crate::devices::bench_header());
    let cfg = ModelConfig::preset(&a.preset).with_context(|| {
        format!(
            "--preset {}: unknown; known: {}",
            a.preset,
            ModelConfig::PRESETS.join(", ")
        )
    })?;
    let (n, c, sp) = (
        a.pipefusion_degree,
        a.cfg_degree,
        a.ulysses_degree * a.ring_degree,
    );
    let m = a.num_patches.unwrap_or(n);
    let mut spec = ClusterSpec::local_cpu(
        n * c * sp,
        a.threads,
        ModelSpec::Preset {
            name: a.preset.clone(),
            seed: 0,
        },
    );
    spec.parallel.pipefusion_degree = n;
    spec.parallel.cfg_degree = c;
    spec.parallel.ulysses_degree = a.ulysses_degree;
    spec.parallel.ring_degree = a.ring_degree;
    spec.parallel.num_patches = m;
    spec.parallel.warmup_steps = a.warmup_steps;
    spec.validate()?;
    eprintln!(
        "{} {}px batch {} ({} steps, guidance {}): CFG {c} x PipeFusion N={n} x Ulysses {} x Ring {} x {} thread(s), M={m}, W={} vs serial",
        a.preset, a.resolution, a.batch, a.steps, a.guidance_scale, a.ulysses_degree, a.ring_degree, a.threads, a.warmup_steps
    );

    let serial_model = Transformer::random(cfg.clone(), 0, None, Device::cpu(a.threads)?)?;
    let mt_threads = n * c * sp * a.threads;
    let mt_model = if a.no_multithread_baseline {
        None
    } else {
        Some(Transformer::random(
            cfg.clone(),
            0,
            None,
            Device::cpu(mt_threads)?,
        )?)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (mut serial_t, mut pipe_t, mut mt_t) = (Vec::new(), Vec::new(), Vec::new());
    let mut last = None;
    rt.block_on(async {
        let cluster = Cluster::start(spec, ClusterOptions::default()).await?;
        let req = bench_request(&cfg, &a);
        let plan = cluster.plan(&req)?;
        let s = setup(&cfg, &req, plan.patches.clone(), a.warmup_steps)?;
        for round in 0..a.rounds {
            let (secs, serial_out) = timed_serial(&serial_model, &s)?;
            eprintln!(
                "round {round}: serial (1 device x {} thread(s)): {secs:.2} s",
                a.threads
            );
            serial_t.push(secs);
            let req = req.clone();
            let t = Instant::now();
            let out = cluster.generate(req).await?;
            let secs = t.elapsed().as_secs_f64();
            eprintln!("round {round}: cluster: {secs:.2} s\n{}", out.summary);
            pipe_t.push(secs);
            if let Some(m) = &mt_model {
                let (secs, _) = timed_serial(m, &s)?;
                eprintln!("round {round}: serial (1 device x {mt_threads} threads): {secs:.2} s");
                mt_t.push(secs);
            }
            last = Some((
                rel_l2(&out.latent, &serial_out)?,
                out.summary.bubble_fraction,
                out.summary.exchange_fraction,
            ));
        }
        cluster.shutdown().await;
        anyhow::Ok(())
    })?;
    let (drift, bubble, exchange) = last.context("--rounds must be at least 1")?;
    let (serial_secs, pipe_secs) = (median(serial_t), median(pipe_t));
    eprintln!("medians: serial {serial_secs:.2} s, cluster {pipe_secs:.2} s; drift of the cluster vs serial: relative L2 {drift:.3e}");
    if !mt_t.is_empty() {
        println!("speedup_vs_multithread={:.3}", median(mt_t) / pipe_secs);
    }
    println!("bubble_fraction={bubble:.3}");
    println!("exchange_fraction={exchange:.3}");
    println!("speedup_vs_serial={:.3}", serial_secs / pipe_secs);
    Ok(())
}
