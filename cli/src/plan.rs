//! `pipefuse plan`: how a topology splits a model and a request, without running anything.

use anyhow::{bail, Context, Result};
use clap::Args;
use topology::{ModelShape, Plan};

use crate::cluster_args::ClusterArgs;

/// Arguments of `pipefuse plan`.
#[derive(Args, Debug)]
pub(crate) struct PlanArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Images per request (B).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Classifier-free guidance on (doubles the rows of every forward).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    guidance: bool,
    /// Image height in pixels [default: the model's sample size x its VAE factor (1 for a
    /// pixel-space model)].
    #[arg(long)]
    height: Option<usize>,
    /// Image width in pixels [default: the model's sample size x its VAE factor].
    #[arg(long)]
    width: Option<usize>,
    /// SD3 / Flux: prompt tokens in the joint sequence (every part carries them, every K/V
    /// buffer holds them) [default: 333 for SD3 (77 CLIP + 256 T5), 512 for Flux].
    #[arg(long, value_name = "T")]
    prompt_tokens: Option<usize>,
}

pub(crate) fn run(a: PlanArgs) -> Result<()> {
    let spec = a.cluster.spec()?;
    let model = actors::ModelSource::from_spec(&spec)?;
    let cfg = &model.config;
    let f = crate::images::pixel_factor(&model)?;
    let (h, w) = (
        a.height.unwrap_or(cfg.sample_size * f),
        a.width.unwrap_or(cfg.sample_size * f),
    );
    let pf = f * cfg.patch_size;
    if h % pf != 0 || w % pf != 0 || h == 0 || w == 0 || a.batch == 0 {
        bail!("--height {h} / --width {w} must be positive multiples of {pf} (pixels per latent element {f} x patch size {}), --batch at least 1", cfg.patch_size);
    }
    if let Some(model::mmdit::MmditConfig::Sd3(c)) = &cfg.mmdit {
        let max = c.pos_embed_max_size * cfg.patch_size * f;
        if h > max || w > max {
            bail!(
                "--height {h} / --width {w}: this SD3 model's position table \
                 (pos_embed_max_size {}) covers at most {max} x {max} px",
                c.pos_embed_max_size
            );
        }
    }
    let forward_batch = match a.guidance {
        true => a.batch.checked_mul(2).with_context(|| {
            format!(
                "--batch {}: twice that (guidance) does not fit in 64 bits",
                a.batch
            )
        })?,
        false => a.batch,
    };
    let text_tokens = match (cfg.arch, a.prompt_tokens) {
        (model::Arch::Dit | model::Arch::PixArt, Some(t)) => {
            bail!("--prompt-tokens {t}: only SD3 and Flux models put prompt tokens in the sequence")
        }
        (model::Arch::Dit | model::Arch::PixArt, None) => 0,
        (model::Arch::Sd3 | model::Arch::Flux, t) => t.unwrap_or(cfg.typical_text_tokens()),
    };
    let shape = ModelShape {
        layers: cfg.num_layers,
        hidden: cfg.hidden(),
        token_rows: h / f / cfg.patch_size,
        token_cols: w / f / cfg.patch_size,
        batch: forward_batch,
        latent_channels: cfg.in_channels,
        latent_batch: a.batch,
        patch_size: cfg.patch_size,
        heads: cfg.num_heads,
        text_tokens,
        prompt_first: cfg.arch == model::Arch::Flux,
    };
    let plan = Plan::new(&spec, &shape)?;
    println!(
        "model: {:?}, {} layers, hidden {}, {}x{} px -> {}x{} tokens{}, batch {} ({} rows per forward)",
        cfg.arch, cfg.num_layers, cfg.hidden(), h, w, shape.token_rows, shape.token_cols,
        if text_tokens > 0 { format!(" + {text_tokens} prompt tokens") } else { String::new() },
        a.batch, forward_batch
    );
    print!("{}", plan.describe());
    for st in &plan.stages {
        // ALGORITHMS.md §2: 2 B' S d floats per owned layer (B' per CFG group). A Ulysses rank
        // inside PipeFusion keeps 1/U of the width; pure sequence-parallel ranks keep none.
        let width = match &plan.sp {
            topology::SequenceParallel::None => Some(cfg.hidden()),
            topology::SequenceParallel::Ulysses { degree, .. }
                if plan.pipeline_len() > 1 || plan.patches.len() > 1 =>
            {
                Some(cfg.hidden() / degree)
            }
            _ => None,
        };
        // MMDiT: every joint attention's buffer also holds the T prompt rows; SD3.5's image-only
        // second attentions (MMDiT-X) hold the image rows once more.
        let image = shape
            .token_rows
            .checked_mul(shape.token_cols)
            .with_context(|| format!("--height {h} / --width {w}: too many tokens"))?;
        let second = match &cfg.mmdit {
            Some(model::mmdit::MmditConfig::Sd3(c)) => c
                .dual_attention_layers
                .iter()
                .filter(|l| st.layers.contains(l))
                .count(),
            _ => 0,
        };
        // In f64: a batch of 2^40 gives a huge figure, not a wrapped small one.
        let kv = width.map_or(0.0, |w| {
            2.0 * (forward_batch / plan.cfg_degree) as f64
                * w as f64
                * 4.0
                * ((image + text_tokens) as f64 * st.layers.len() as f64
                    + image as f64 * second as f64)
        });
        let mib = kv / (1 << 20) as f64;
        if plan.cfg_degree > 1 || plan.sp.degree() > 1 {
            println!(
                "device {} (stage {}, CFG group {}, SP rank {}) K/V buffers: {mib:.2} MiB",
                st.device.index, st.index, st.cfg_group, st.sp_rank
            );
        } else {
            println!("stage {} K/V buffers: {mib:.2} MiB", st.index);
        }
    }
    Ok(())
}
