//! `pipefuse bench`: performance measurements, reported as ratios against baselines measured in
//! the same process.

use std::time::Instant;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use kernels::{Device, Tensor};
use model::{Arch, CondInputs, ModelConfig, Transformer};

/// Benchmarks.
#[derive(Subcommand, Debug)]
pub(crate) enum BenchCommand {
    /// One full transformer forward on one CPU device, against a plain large GEMM on the same
    /// device (the GEMM's GFLOP/s is what the forward could reach at best).
    Forward(ForwardArgs),
    /// PipeFusion on N CPU devices vs the plain loop on one device (same threads per device),
    /// and vs one device with all threads; same model and request. Last line:
    /// `speedup_vs_serial=<ratio>`.
    Pipeline(crate::bench_pipeline::PipelineArgs),
    /// Activation-sized messages (1-16 MiB) over QUIC with mutual TLS on loopback vs a plain TCP
    /// stream, same run. Last line: `quic_vs_tcp=<ratio>` (geometric mean over the sizes).
    Transport(crate::bench_transport::TransportArgs),
}

/// Arguments of `pipefuse bench forward`.
#[derive(Args, Debug)]
pub(crate) struct ForwardArgs {
    /// Model preset (DiT-S/2, DiT-B/2, DiT-L/2, DiT-XL/2, PixArt-alpha-256/-512/-1024,
    /// SD3-Medium, SD3.5-Medium, SD3.5-Large, Flux.1-dev, Flux.1-schnell); random weights.
    #[arg(long, default_value = "DiT-XL/2")]
    preset: String,
    /// Keep only this many blocks of the preset (a model too large for this machine's memory
    /// still gives its per-block speed; Flux keeps its 1:2 ratio of double- to single-stream
    /// blocks: N/3 double, the rest single). The same flag of tools/bench_torch_mmdit.py builds
    /// the same shapes.
    #[arg(long, value_name = "N")]
    layers: Option<usize>,
    /// Image size in pixels (latent = resolution / 8).
    #[arg(long, default_value_t = 256)]
    resolution: usize,
    /// Batch size of the forward.
    #[arg(long, default_value_t = 2)]
    batch: usize,
    /// CPU threads.
    #[arg(long, default_value_t = crate::cluster_args::cores(), value_parser = crate::cluster_args::thread_count)]
    threads: usize,
    /// Timed forwards (after one warm-up).
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Text tokens: PixArt's caption (cross-attention) [default 120]; SD3's and Flux's prompt
    /// tokens in the joint sequence [default 333 for SD3 (77 CLIP + 256 T5), 512 for Flux].
    #[arg(long, value_name = "T")]
    caption_tokens: Option<usize>,
    /// CPU: weight format of the linear layers, `f32` or `bf16` (packed once at load;
    /// activations rounded to bf16 per product, f32 accumulation; AMX tiles or AVX512-BF16
    /// where the CPU has them). CUDA: the whole model in `f32`, `bf16` or `f16` (f32 accumulation). The plain GEMM
    /// baseline runs in the same format.
    #[arg(long, default_value = "f32")]
    dtype: kernels::DType,
    /// Where the forward runs: `cpu`, or `cuda:N` (GPU N; `cuda` is GPU 0).
    #[arg(long, default_value = "cpu", value_parser = bench_device)]
    device: BenchDevice,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
    /// Also time each op of the blocks (modulation, norm, qkv, attend, attn_out, residual,
    /// fc1_gelu, fc2; PixArt's cross_attention, Flux's proj_out; every model family) over the
    /// timed forwards and print where the forward's time goes (CPU devices: a GPU runs its ops
    /// asynchronously).
    #[arg(long)]
    op_times: bool,
}

impl ForwardArgs {
    /// Whether `--op-times` was given (the binary installs the op timer for it).
    pub(crate) fn op_times(&self) -> bool {
        self.op_times
    }
}

/// Where `bench forward` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BenchDevice {
    /// The CPU (`--threads`).
    Cpu,
    /// CUDA GPU N.
    Cuda(usize),
}

/// `--device`: `cpu`, `cuda` or `cuda:N`.
fn bench_device(s: &str) -> Result<BenchDevice, String> {
    match s {
        "cpu" => Ok(BenchDevice::Cpu),
        "cuda" => Ok(BenchDevice::Cuda(0)),
        _ => match s.strip_prefix("cuda:").map(str::parse) {
            Some(Ok(n)) => Ok(BenchDevice::Cuda(n)),
            _ => Err(format!("`{s}`: a device is cpu, cuda or cuda:N")),
        },
    }
}

pub(crate) fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Forward(a) => forward(a),
        BenchCommand::Pipeline(a) => crate::bench_pipeline::run(a),
        BenchCommand::Transport(a) => crate::bench_transport::run(a),
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// GFLOP/s of `y = x W^T` with m = k = n = 2048 on `dev` (median of 5), the weight in `dtype`
/// (on a GPU: the device's compute dtype, timed to the end of the product).
fn gemm_gflops(dev: &Device, dtype: kernels::DType) -> Result<f64> {
    let n = 2048;
    let values: Vec<f32> = (0..n * n).map(|i| ((i % 7) as f32 - 3.0) * 0.01).collect();
    // The weight in the form a model's linear layers keep it on this device.
    let cpu = matches!(dev, Device::Cpu(_));
    let bf16 = (cpu && dtype == kernels::DType::BF16)
        .then(|| kernels::PackedBf16::from_f32(&values, n, n));
    let f32_packed =
        (cpu && dtype == kernels::DType::F32).then(|| kernels::PackedF32::pack(&values, n, n));
    let x = dev.import(Tensor::from_vec(values, &[n, n])?)?;
    let mut times: Vec<f64> = (0..6)
        .map(|_| {
            let t = Instant::now();
            match (&bf16, &f32_packed) {
                (Some(w), _) => dev.linear_bf16(&x, w, None),
                (_, Some(w)) => dev.linear_packed(&x, w, None),
                _ => dev.linear(&x, &x, None),
            }
            .and_then(|_| dev.synchronize())
            .map(|_| t.elapsed().as_secs_f64())
        })
        .collect::<Result<_, _>>()?;
    times.remove(0);
    Ok(2.0 * (n * n * n) as f64 / median(&mut times) / 1e9)
}

fn forward(a: ForwardArgs) -> Result<()> {
    let Some(cfg) = ModelConfig::preset(&a.preset) else {
        bail!(
            "unknown --preset {}; known: {}",
            a.preset,
            ModelConfig::PRESETS.join(", ")
        );
    };
    let cfg = match a.layers {
        None => cfg,
        Some(n) => with_layers(cfg, n)?,
    };
    let p8 = 8 * cfg.patch_size;
    if a.resolution % p8 != 0 || a.resolution == 0 || a.batch == 0 || a.iters == 0 {
        bail!("--resolution must be a positive multiple of {p8}; --batch and --iters at least 1");
    }
    let dev = match a.device {
        BenchDevice::Cpu => {
            if a.dtype == kernels::DType::F16 {
                bail!("--dtype f16 has no CPU path; use f32 or bf16 (or --device cuda)");
            }
            check_forward_memory(&a, &cfg)?;
            Device::cpu(a.threads)?
        }
        BenchDevice::Cuda(_) if a.op_times => {
            bail!("--op-times times CPU devices only (a GPU runs its ops asynchronously)")
        }
        BenchDevice::Cuda(n) => Device::cuda(n)?.with_compute_dtype(a.dtype),
    };
    eprintln!("{}", crate::devices::bench_header());
    let path = match (&dev, a.dtype) {
        (Device::Cuda(_), _) => "cuBLASLt, f32 accumulation",
        (_, kernels::DType::BF16) => kernels::bf16_gemm_path(),
        _ => kernels::f32_gemm_path(),
    };
    eprintln!(
        "building {} with random weights, linear layers in {} ({path}) ...",
        a.preset, a.dtype
    );
    let weights = model::RandomWeights { seed: 0, std: 0.02 };
    let source = model::WithLinearDtype {
        inner: &weights,
        // A GPU model is entirely in the device's dtype (no CPU packing).
        dtype: match a.device {
            BenchDevice::Cpu => a.dtype,
            BenchDevice::Cuda(_) => kernels::DType::F32,
        },
    };
    let model = Transformer::from_source(cfg.clone(), &source, None, dev.clone())?;
    let side = a.resolution / 8;
    let latent = model::gaussian(&[a.batch, cfg.in_channels, side, side], 1);
    let text = cfg.arch != Arch::Dit;
    let caption_tokens = a.caption_tokens.unwrap_or(cfg.typical_text_tokens());
    let (pooled, guidance) = match &cfg.mmdit {
        Some(model::mmdit::MmditConfig::Sd3(c)) => (Some(c.pooled_projection_dim), false),
        Some(model::mmdit::MmditConfig::Flux(c)) => {
            (Some(c.pooled_projection_dim), c.guidance_embeds)
        }
        None => (None, false),
    };
    let inputs = CondInputs {
        timesteps: vec![500.0; a.batch],
        class_labels: match cfg.arch {
            Arch::Dit => (0..a.batch).map(|i| i % cfg.num_classes).collect(),
            _ => Vec::new(),
        },
        caption: text.then(|| model::gaussian(&[a.batch, caption_tokens, cfg.caption_channels], 2)),
        caption_mask: None,
        resolution: cfg
            .use_additional_conditions
            .then(|| vec![[a.resolution as f32; 2]; a.batch]),
        aspect_ratio: cfg.use_additional_conditions.then(|| vec![1.0; a.batch]),
        pooled: pooled.map(|p| model::gaussian(&[a.batch, p], 3)),
        guidance: guidance.then(|| vec![3.5; a.batch]),
        latent_size: [side, side],
    };
    let tokens = (side / cfg.patch_size).pow(2);
    let flops = cfg.forward_flops(a.batch, tokens, if text { caption_tokens } else { 0 });
    let gemm_before = gemm_gflops(&dev, a.dtype)?;
    model.forward(&latent, &inputs)?; // warm-up
    crate::op_times::take();
    let mut times = Vec::new();
    for i in 0..a.iters {
        let t = Instant::now();
        model.forward(&latent, &inputs)?;
        let s = t.elapsed().as_secs_f64();
        eprintln!(
            "iter {i}: {:.1} ms ({:.1} GFLOP/s)",
            s * 1e3,
            flops / s / 1e9
        );
        times.push(s);
    }
    let gemm_after = gemm_gflops(&dev, a.dtype)?;
    let (min, max) = (
        times.iter().cloned().fold(f64::MAX, f64::min),
        times.iter().cloned().fold(0.0, f64::max),
    );
    let med = median(&mut times);
    let gflops = flops / med / 1e9;
    let gemm = (gemm_before + gemm_after) / 2.0;
    println!(
        "{} {}px batch {} threads {} {}: {:.1} ms/forward (min {:.1}, max {:.1}), {:.1} GFLOP per forward, {:.1} GFLOP/s; plain 2048^3 {} GEMM {:.1} GFLOP/s (before {:.1}, after {:.1}); forward/GEMM = {:.3}",
        a.preset, a.resolution, a.batch, a.threads, a.dtype, med * 1e3, min * 1e3, max * 1e3, flops / 1e9, gflops, a.dtype, gemm, gemm_before, gemm_after, gflops / gemm
    );
    // Per op: calls and ms per timed forward.
    let ops: Vec<(&str, u64, f64)> = crate::op_times::take()
        .into_iter()
        .map(|(name, (calls, t))| {
            let n = a.iters.max(1);
            (name, calls / n as u64, t.as_secs_f64() * 1e3 / n as f64)
        })
        .collect();
    if a.op_times {
        print_op_times(
            ops.clone(),
            a.iters,
            times.iter().sum::<f64>() / times.len().max(1) as f64,
        );
    }
    if a.json {
        let mut j = serde_json::json!({
            "impl": "pipefuse", "device": dev.name(), "dtype": a.dtype.as_str(), "gemm_path": path, "preset": a.preset, "layers": cfg.num_layers, "resolution": a.resolution, "batch": a.batch, "threads": a.threads,
            "ms_per_forward": med * 1e3, "ms_min": min * 1e3, "ms_max": max * 1e3, "gflop_per_forward": flops / 1e9,
            "gflops": gflops, "gemm_gflops": gemm, "forward_vs_gemm": gflops / gemm,
        });
        if a.op_times {
            let op_ms: serde_json::Map<_, _> = ops
                .iter()
                .map(|&(name, _, ms)| (name.to_string(), ms.into()))
                .collect();
            j["op_ms_per_forward"] = op_ms.into();
        }
        println!("{j}");
    }
    Ok(())
}

/// The per-op table of `--op-times` (name, calls and ms per forward): share of the mean
/// forward (`mean` seconds), largest first, and what the listed ops leave out.
fn print_op_times(mut rows: Vec<(&str, u64, f64)>, iters: usize, mean: f64) {
    rows.sort_by(|a, b| b.2.total_cmp(&a.2));
    let mean_ms = mean * 1e3;
    println!(
        "ops, per forward (mean of {iters} timed forwards):\n{:<16} {:>6} {:>11} {:>7}",
        "op", "calls", "ms", "share"
    );
    for (name, calls, ms) in &rows {
        println!(
            "{name:<16} {calls:>6} {ms:>11.1} {:>6.1}%",
            100.0 * ms / mean_ms
        );
    }
    let listed: f64 = rows.iter().map(|r| r.2).sum();
    println!(
        "{:<16} {:>6} {:>11.1} {:>6.1}%\n{:<16} {:>6} {mean_ms:>11.1} {:>6.1}%",
        "(other)",
        "",
        mean_ms - listed,
        100.0 * (mean_ms - listed) / mean_ms,
        "forward",
        "",
        100.0
    );
}

/// Refuses, naming the flags, a forward whose weights (linear weights read off the FLOP formula
/// at one token: two FLOPs per weight, four bytes each in f32 and two in bf16 where a bf16
/// kernel (AMX, AVX512-BF16) keeps them packed; DiT's class tables in f32; plus 10% for embeddings and norms), inputs and
/// working set (16 floats per token and hidden unit, 24 for MMDiT: see `actors::memory`) cannot
/// fit in what this host can still allocate.
fn check_forward_memory(a: &ForwardArgs, cfg: &ModelConfig) -> Result<()> {
    let Some(host) = kernels::host_memory() else {
        return Ok(());
    };
    let side = (a.resolution / 8) as f64;
    let tokens = (side / cfg.patch_size as f64).powi(2);
    let caption = match cfg.arch {
        Arch::Dit => 0.0,
        _ => a.caption_tokens.unwrap_or(cfg.typical_text_tokens()) as f64,
    };
    let (b, d) = (a.batch as f64, cfg.hidden() as f64);
    // Linear weights in the run's format (bf16: 2 bytes where a bf16 kernel keeps them packed), the
    // DiT blocks' class tables in f32.
    let linear_bytes = match a.dtype {
        kernels::DType::BF16 => kernels::bf16_weight_bytes() as f64,
        _ => 4.0,
    };
    let tables = match cfg.arch {
        Arch::Dit => ((cfg.num_classes + 1) * cfg.hidden() * cfg.num_layers) as f64,
        _ => 0.0,
    };
    let weights = (cfg.forward_flops(1, 1, 0) / 2.0 * linear_bytes + tables * 4.0) * 1.1;
    let per_token = if cfg.mmdit.is_some() { 24.0 } else { 16.0 };
    let inputs = b * (side * side * cfg.in_channels as f64 + caption * cfg.caption_channels as f64);
    let working = b * (tokens + caption) * d * per_token;
    let need = weights + 4.0 * (inputs + working);
    if need > host.available as f64 {
        bail!(
            "--preset {} --resolution {} --batch {}{}: the forward needs about {} (weights {}) \
             but only {host}; use a smaller --resolution, --batch{} or --layers",
            a.preset,
            a.resolution,
            a.batch,
            a.caption_tokens
                .map_or(String::new(), |t| format!(" --caption-tokens {t}")),
            topology::human_bytes(need.min(u64::MAX as f64) as u64),
            topology::human_bytes(weights as u64),
            if caption > 0.0 {
                ", --caption-tokens"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// `cfg` with only `n` blocks (Flux: `n / 3` double-stream, the rest single-stream).
fn with_layers(cfg: ModelConfig, n: usize) -> Result<ModelConfig> {
    use model::mmdit::MmditConfig;
    if n == 0 || n > cfg.num_layers {
        bail!("--layers {n}: the preset has 1..={} blocks", cfg.num_layers);
    }
    Ok(match cfg.mmdit.clone() {
        None => ModelConfig {
            num_layers: n,
            ..cfg
        },
        Some(MmditConfig::Sd3(mut c)) => {
            c.num_layers = n;
            c.dual_attention_layers.retain(|&l| l < n);
            ModelConfig::from_sd3(c)
        }
        Some(MmditConfig::Flux(mut c)) => {
            c.num_layers = n / 3;
            c.num_single_layers = n - n / 3;
            ModelConfig::from_flux(c).map_err(anyhow::Error::msg)?
        }
    })
}
