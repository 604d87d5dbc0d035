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
