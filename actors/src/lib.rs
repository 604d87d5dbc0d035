//! The pipefuse cluster runtime: a coordinator actor and one device actor per pipeline stage
//! (ractor), each device owning a contiguous slice of the DiT's layers and their K/V buffers, and
//! running PipeFusion: the latent is cut into patches that flow through the stages as
//! micro-batches, activations going device to device over a [`transport::Link`].
//!
//! Key types: [`Cluster`] (start from a topology, submit requests, observe progress, await
//! results), [`StageExecutor`](stage::StageExecutor) (what one stage computes, no actors), and
//! [`stage::run_in_order`] (the same computation in one thread, the numerical reference the
//! runtime reproduces exactly).
//!
//! Layering: actors are thin drivers around the pure schedule in `topology::schedule`; compute
//! runs on one OS thread per device (never on the async runtime); the coordinator does not carry
//! activations.

mod cluster;
mod codec;
mod compute;
mod coordinator;
mod device;
pub mod error;
mod fault;
mod handles;
pub mod memory;
mod messages;
mod model_source;
mod node;
mod peer_group;
mod remote;
mod replan;
mod request;
pub mod stage;

pub use cluster::{startup_plan, Cluster};
pub use error::{ClusterError, Result};
pub use fault::Fault;
pub use memory::MemoryEstimate;
pub use model_source::{locate_model, ModelFolder, ModelSource};
pub use node::{node_identity, Node};
pub use request::{
    ClusterHealth, ClusterOptions, DeviceSummary, GenerateOutput, GenerateRequest, Progress,
    RequestHandle, Resume, RunSummary,
};
pub use stage::Checkpoint;

/// Decoders of bytes from other nodes, on plain bytes, for the fuzzer (feature `fuzzing`).
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    use std::sync::Arc;

    /// Decodes a request payload (`ControlMessage::Begin::spec`) as a node does for model `cfg`.
    pub fn decode_request(cfg: &model::ModelConfig, bytes: &[u8]) -> Result<(), String> {
        crate::remote::spec::decode_request(cfg, 1, bytes)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Decodes one tensor blob (a final latent or a checkpoint's) as a coordinator does.
    pub fn decode_tensor(bytes: &[u8]) -> Result<(), String> {
        crate::remote::spec::decode_tensor(bytes, "tensor")
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// A valid request payload for `cfg` (a seed for the fuzzer): `labels`, `steps` DDIM steps.
    pub fn sample_request(cfg: &model::ModelConfig, labels: Vec<usize>, steps: usize) -> Vec<u8> {
        let s = cfg.sample_size;
        let request = model::Request {
            class_labels: labels.clone(),
            caption: None,
            guidance_scale: 4.0,
            latent_size: [s, s],
            embedded_guidance: None,
        };
        let noise = model::gaussian(&[labels.len(), cfg.in_channels, s, s], 1);
        let rows = s / cfg.patch_size;
        let patches = topology::patch_rows(rows, 2.min(rows)).expect("patches");
        let scheduler = model::sampler::Scheduler::named("ddim").expect("built in");
        let setup = crate::stage::RequestSetup::new(
            1, cfg, &request, &scheduler, steps, &noise, patches, 1,
        )
        .expect("a valid request");
        let schedule = topology::schedule::ScheduleConfig {
            stages: 2,
            patches: setup.patches.len(),
            warmup: 1,
            steps,
        };
        crate::remote::spec::encode_request(&Arc::new(setup), &schedule).expect("encodes")
    }

    /// A valid tensor blob (a seed for the fuzzer).
    pub fn sample_tensor(shape: &[usize]) -> Vec<u8> {
        crate::remote::spec::encode_latent(&model::gaussian(shape, 2)).expect("encodes")
    }
}
