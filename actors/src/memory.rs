//! What a request will allocate on this process's devices, estimated before anything is
//! allocated, and the check against what the host can still give ([`kernels::host_memory`]).
//!
//! The estimate is an upper bound of the request's own memory on top of the loaded weights (they
//! are already allocated when a request arrives): per device, its K/V buffers (2 B' (S + T) w
//! floats per owned layer, ALGORITHMS.md section 2), the working set of its largest work item
//! (a whole-image warmup forward: `ACTIVATION_FLOATS` floats per token and hidden unit, plus the
//! sequence-parallel exchange buffers), the frames it may hold (one step of parts in and out), and
//! the latent state; per request, the noise and the final latent. Every product is checked: a size
//! that overflows 64 bits is an error, not a wrapped figure. `tests/request_memory.rs` measures
//! real peaks with a counting allocator and checks that the estimate covers them.

use std::fmt;

use kernels::HostMemory;
use model::{ModelConfig, PreparedRequest};
use topology::human_bytes;
use topology::{DeviceRole, DeviceSpec, Plan, Precision, SequenceParallel};

use crate::error::{ClusterError, Result};

/// f32 values a block's forward keeps alive per token and hidden unit at its peak: input,
/// normalised and modulated input, Q/K/V and their head-major copies, attention output and
/// projection, the MLP's hidden layer (4 d) and its activation, gates and the residual sum.
/// MMDiT blocks hold both streams' temporaries and the joint Q/K/V concatenation.
/// (The peak measured by `tests/request_memory.rs` is about a third of this on DiT-S/2.)
const ACTIVATION_FLOATS: u64 = 16;
const MMDIT_ACTIVATION_FLOATS: u64 = 24;

/// Per device, whatever the request's size: GEMM packing buffers of its threads, lazily built
/// tables, channels and actor state (measured: 2-3 MiB on the fixture models).
const DEVICE_FIXED: u64 = 8 << 20;

/// The estimated memory of one request on this process's devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// The devices counted (those that run in this process).
    pub devices: usize,
    /// Their K/V buffers.
    pub kv_buffers: u64,
    /// Their peak working sets, exchange buffers and frames in flight.
    pub activations: u64,
    /// Noise, sampler state and final latent.
    pub latents: u64,
    /// Caller-supplied extras (e.g. the VAE decode and the PNG of `pipefuse generate`).
    pub outputs: u64,
}

impl MemoryEstimate {
    /// The whole estimate (saturating).
    pub fn total(&self) -> u64 {
        self.kv_buffers
            .saturating_add(self.activations)
            .saturating_add(self.latents)
            .saturating_add(self.outputs)
    }

    /// `Err` naming the figures when the estimate exceeds `host.available`.
    pub fn check(&self, host: &HostMemory) -> Result<()> {
        if self.total() <= host.available {
            return Ok(());
        }
        Err(ClusterError::OutOfMemory(format!(
            "the request needs about {} ({self}) but only {host}; ask for a smaller image \
             (--height / --width) or fewer images per request, or spread the model over more \
             devices or nodes",
            human_bytes(self.total()),
        )))
    }
}

impl fmt::Display for MemoryEstimate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "K/V buffers {}, activations {} on {} device(s), latents {}",
            human_bytes(self.kv_buffers),
            human_bytes(self.activations),
            self.devices,
            human_bytes(self.latents)
        )?;
        if self.outputs > 0 {
            write!(f, ", outputs {}", human_bytes(self.outputs))?;
        }
        Ok(())
    }
}

/// Bytes per parameter that stays f32 whatever the device's precision (biases, norms, class
/// tables, a CPU's non-linear tensors).
const F32_BYTES: f64 = 4.0;

/// Per device, what starting it allocates besides its weights: actor state, channels, its
/// thread pool's bookkeeping (measured: about 120 KiB).
const LOAD_FIXED: f64 = (512 << 10) as f64;

/// Bytes per linear-layer weight on `device`: a bf16 CPU device packs them to bf16 where a bf16
/// kernel runs (AMX or AVX512-BF16: [`kernels::bf16_weight_bytes`]; f32 elsewhere); f32 devices keep f32; a
/// GPU's weights live in its own memory, and the host holds each tensor as f32 while loading it
/// (counted in full: an upper bound).
fn linear_weight_bytes(device: &DeviceSpec) -> f64 {
    match device {
        DeviceSpec::Cpu {
            precision: Precision::Bf16,
            ..
        } => kernels::bf16_weight_bytes() as f64,
        _ => F32_BYTES,
    }
}

/// Whether a checkpoint tensor is a linear layer's weight (packed in the device's format);
/// biases, norms and embedding tables stay f32. A tensor wrongly counted as f32 only makes the
/// estimate higher.
fn is_linear_weight(name: &str) -> bool {
    name.ends_with(".weight") && !name.contains("norm") && !name.contains("embedding_table")
}

/// Parameters of a slice: linear-layer weights and the rest.
#[derive(Debug, Clone, Copy, Default)]
struct Params {
    linear: f64,
    other: f64,
}

impl Params {
    fn add(self, o: Params) -> Params {
        Params {
            linear: self.linear + o.linear,
            other: self.other + o.other,
        }
    }
    fn bytes(self, device: &DeviceSpec) -> f64 {
        self.linear * linear_weight_bytes(device) + self.other * F32_BYTES
    }
}

/// The weights that the devices for which `local(rank)` hold load for their layer slices, in
/// bytes (linear-layer weights in each device's format, the rest f32), 10% up for the Q/K/V
/// fusion's transient copy, plus `LOAD_FIXED` per device. With the checkpoint's tensors
/// (`elements`: name and element count, [`crate::ModelSource::weight_elements`]) each device
/// counts its blocks' tensors plus every tensor outside the blocks (embedders, head: an upper
/// bound, a middle stage loads none of them). For a preset (`None`) the linear weights are read
/// off the FLOP formula at one token (two FLOPs per weight), each device's blocks plus one
/// block's worth for the parts outside them. `tests/request_memory.rs` compares both with the
/// bytes a cluster's start really allocates.
pub fn estimate_weights(
    cfg: &ModelConfig,
    plan: &Plan,
    elements: Option<&[(String, u64)]>,
    local: impl Fn(usize) -> bool,
) -> u64 {
    let roles = plan.roles();
    let mine: Vec<_> = roles.iter().filter(|r| local(r.rank)).collect();
    let bytes: f64 = match elements {
        Some(tensors) => {
            let families = cfg.block_families();
            let layers: usize = families.iter().map(|f| f.1).sum();
            let mut per_layer = vec![Params::default(); layers];
            let mut outside = Params::default();
            for (name, n) in tensors {
                let p = match is_linear_weight(name) {
                    true => Params {
                        linear: *n as f64,
                        other: 0.0,
                    },
                    false => Params {
                        linear: 0.0,
                        other: *n as f64,
                    },
                };
                match layer_of(name, &families).filter(|&l| l < layers) {
                    Some(l) => per_layer[l] = per_layer[l].add(p),
                    None => outside = outside.add(p),
                }
            }
            mine.iter()
                .map(|r| {
                    let end = r.layers.end.min(layers);
                    per_layer[r.layers.start.min(end)..end]
                        .iter()
                        .fold(outside, |a, &x| a.add(x))
                        .bytes(&r.device.spec)
                })
                .sum()
        }
        None => {
            // One image and one text token, so the text stream's weights (MMDiT) and the
            // caption projections (PixArt) count too.
            let per_block = Params {
                linear: cfg.forward_flops(1, 1, 1) / 2.0 / cfg.num_layers.max(1) as f64,
                // Each DiT block's conditioning embedder has its own class table (a lookup: no
                // FLOPs).
                other: match cfg.arch {
                    model::Arch::Dit => ((cfg.num_classes + 1) * cfg.hidden()) as f64,
                    _ => 0.0,
                },
            };
            mine.iter()
                .map(|r| per_block.bytes(&r.device.spec) * (r.layers.len() + 1) as f64)
                .sum()
        }
    };
    (bytes * 1.1 + mine.len() as f64 * LOAD_FIXED).min(u64::MAX as f64) as u64
}

/// The layer a tensor belongs to: `<family>.<i>.` is layer `i` after the layers of the families
/// before it (Flux: double-stream blocks, then single-stream ones).
fn layer_of(name: &str, families: &[(&str, usize, &str)]) -> Option<usize> {
    let mut first = 0;
    for &(prefix, count, _) in families {
        if let Some(i) = name
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('.'))
            .and_then(|r| r.split_once('.'))
            .and_then(|(i, _)| i.parse::<usize>().ok())
            .filter(|&i| i < count)
        {
            return Some(first + i);
        }
        first += count;
    }
    None
}

/// `Err` naming both figures and the weights' format when `weights` bytes (from
/// [`estimate_weights`] over `devices`, this process's) cannot fit in what `host` can still
/// give.
pub fn check_weights(weights: u64, devices: &[&DeviceSpec], host: &HostMemory) -> Result<()> {
    if weights <= host.available {
        return Ok(());
    }
    let bf16 = devices
        .iter()
        .filter(|d| linear_weight_bytes(d) < F32_BYTES)
        .count();
    let format = match bf16 {
        0 => "f32",
        b if b == devices.len() => "linear layers in bf16, the rest f32",
        _ => "each device's format",
    };
    Err(ClusterError::OutOfMemory(format!(
        "loading the model on this process's {} device(s) needs about {} of weights ({format}) \
         but only {host}; spread its layers over more nodes (pipefusion_degree, one stage per \
         node), or use a smaller model",
        devices.len(),
        human_bytes(weights)
    )))
}

/// Checked product of sizes; `Err` naming `what` on overflow.
fn product(what: &str, xs: &[u64]) -> Result<u64> {
    xs.iter()
        .try_fold(1u64, |a, &x| a.checked_mul(x))
        .ok_or_else(|| {
            ClusterError::OutOfMemory(format!(
                "{what}: the sizes {xs:?} multiply to more than 2^64 bytes"
            ))
        })
}

fn sum(what: &str, xs: &[u64]) -> Result<u64> {
    xs.iter()
        .try_fold(0u64, |a, &x| a.checked_add(x))
        .ok_or_else(|| ClusterError::OutOfMemory(format!("{what}: more than 2^64 bytes")))
}

/// The estimate for `req` under `plan` on the devices for which `local(rank)` holds.
pub fn estimate_request(
    cfg: &ModelConfig,
    plan: &Plan,
    req: &PreparedRequest,
    caption_tokens: usize,
    local: impl Fn(usize) -> bool,
) -> Result<MemoryEstimate> {
    let s = &plan.shape;
    let u = |x: usize| x as u64;
    let image = product("image tokens", &[u(s.token_rows), u(s.token_cols)])?;
    let text = u(req.text_tokens());
    let b = u(s.batch / plan.cfg_degree.max(1));
    let d = u(cfg.hidden());
    let [lb, lc, lh, lw] = req.latent_shape();
    let latent = product("the latent", &[u(lb), u(lc), u(lh), u(lw), 4])?;
    let per_token = match cfg.mmdit {
        Some(_) => MMDIT_ACTIVATION_FLOATS,
        None => ACTIVATION_FLOATS,
    };
    let sp = plan.sp.degree().max(1) as u64;
    let mut est = MemoryEstimate {
        latents: product("noise and final latent", &[latent, 2])?,
        ..MemoryEstimate::default()
    };
    for role in plan.roles().iter().filter(|r| local(r.rank)) {
        est.devices += 1;
        est.kv_buffers = sum(
            "K/V buffers",
            &[est.kv_buffers, kv_bytes(cfg, plan, role, b, image, text)?],
        )?;
        // The largest item: a whole-image forward of this rank's share of the tokens.
        let tokens = sum("tokens", &[image.div_ceil(sp), text])?;
        let working = product("a forward's working set", &[b, tokens, d, per_token, 4])?;
        // Sequence parallel: the full sequence's K/V (and Ulysses' Q) for this rank's heads
        // during an attention, plus PixArt's caption K/V.
        let heads_width = d / u(role.sp.ulysses.max(1));
        let sequence = sum("tokens", &[image, text])?;
        let exchange = product("exchange buffers", &[b, sequence, heads_width, 4, 4])?;
        let caption = product("caption K/V", &[b, u(caption_tokens), d, 2, 4])?;
        // One step of parts received early and sent, and the position tables.
        let prompts = product("prompt tokens", &[text, u(plan.patches.len())])?;
        let frames = product(
            "frames in flight",
            &[b, sum("tokens", &[image, prompts])?, d, 4, 3],
        )?;
        let latent_state = product("sampler state", &[latent, 4])?;
        est.activations = sum(
            "activations",
            &[
                est.activations,
                working,
                exchange,
                caption,
                frames,
                latent_state,
                DEVICE_FIXED,
            ],
        )?;
    }
    Ok(est)
}

/// One device's K/V buffers: 2 B' (S + T) w floats per owned layer (w = d, or d / U for a
/// Ulysses rank inside PipeFusion; pure sequence-parallel ranks keep none), plus SD3.5's
/// image-only second attentions.
fn kv_bytes(
    cfg: &ModelConfig,
    plan: &Plan,
    role: &DeviceRole,
    b: u64,
    image: u64,
    text: u64,
) -> Result<u64> {
    let inside_pipefusion = plan.pipeline_len() > 1 || plan.patches.len() > 1;
    let width = match (&plan.sp, inside_pipefusion) {
        (_, false) => return Ok(0),
        (SequenceParallel::None, true) => cfg.hidden(),
        (_, true) => cfg.hidden() / role.sp.ulysses.max(1),
    } as u64;
    let second = match &cfg.mmdit {
        Some(model::mmdit::MmditConfig::Sd3(c)) => c
            .dual_attention_layers
            .iter()
            .filter(|l| role.layers.contains(l))
            .count() as u64,
        _ => 0,
    };
    let rows = sum(
        "K/V rows",
        &[
            product(
                "K/V rows",
                &[sum("K/V rows", &[image, text])?, role.layers.len() as u64],
            )?,
            product("K/V rows", &[image, second])?,
        ],
    )?;
    product("K/V buffers", &[2, b, width, 4, rows])
}
