//! DiT and PixArt-alpha transformers as diffusers computes them, loaded by block range, plus the
//! samplers that drive them; MMDiT models (Stable Diffusion 3 / 3.5, Flux.1) in [`mmdit`] (whole-model
//! forwards).
//!
//! Key types: [`Transformer`] (a whole model or the slice of blocks one pipeline stage owns, with
//! the forward split into embed / blocks / head), [`ModelConfig`] (from `config.json` or a named
//! preset), [`sampler::Scheduler`] (DDIM, DPM-Solver++ 2M, flow-matching Euler), [`VaeDecoder`]
//! (diffusers' `AutoencoderKL` decoder: sampler latents to images).
//!
//! The model crate knows nothing of clusters: it takes a `Range<usize>` of blocks and a strip of
//! token rows, never a plan. A slice reads only the weights of its blocks (the safetensors shards
//! are memory-mapped and only the tensors it names are touched).

/// The `tracing` target of the per-op spans of a block's forward (`trace` level, named by the
/// op: `modulation`, `norm`, `qkv`, `attend`, `attn_out`, `residual`, `fc1_gelu`, `fc2`;
/// PixArt's `cross_attention`; Flux's single-stream `proj_out`, attention's and the MLP's
/// projections in one product). An MMDiT block's prompt side counts under the same names.
/// `pipefuse bench forward --op-times` sums them.
pub const OP_TARGET: &str = "pipefuse::op";

/// Enters a `trace` span named `$name` under [`OP_TARGET`] for the rest of the scope.
macro_rules! op_span {
    ($name:literal) => {
        tracing::trace_span!(target: "pipefuse::op", $name).entered()
    };
}

mod blocks;
mod cond;
mod config;
mod dit;
mod embedding;
mod error;
mod fields;
mod kv_buffer;
pub mod mmdit;
mod model_index;
mod request;
pub mod sampler;
pub mod sp;
mod vae;
mod weights;

pub use cond::{CondInputs, Conditioning};
pub use config::{Arch, ModelConfig};
pub use dit::Transformer;
pub use embedding::pos_embed_2d;
pub use error::{ModelError, Result};
pub use kv_buffer::{KvBuffer, KvSlot};
pub use model_index::{ModelIndex, KNOWN_PIPELINES};
pub use request::{Caption, PreparedRequest, Request};
pub use vae::{to_unit_range, VaeConfig, VaeDecoder};
pub use weights::{gaussian, RandomWeights, SafetensorsDir, WeightSource, WithLinearDtype};
