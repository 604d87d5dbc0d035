//! The message enums of the two actors. Requests that need an answer carry an [`RpcReplyPort`];
//! everything else is a `cast`.

use std::sync::Arc;
use std::time::Duration;

use kernels::Tensor;
use ractor::RpcReplyPort;
use topology::schedule::{ScheduleConfig, WorkItem};
use transport::Frame;

use crate::error::ClusterError;
use crate::request::{GenerateOutput, Progress};
use crate::stage::RequestSetup;

/// What a stage reports when it has run its last item of a request.
#[derive(Debug, Clone)]
pub(crate) struct StageReport {
    /// Time spent running items, including `exchange_wait`.
    pub(crate) busy: Duration,
    /// Of `busy`: time the compute thread waited in exchanges (CFG swap, sequence-parallel
    /// collectives) for its peers' parts or for room on a link.
    pub(crate) exchange_wait: Duration,
    /// Items run.
    pub(crate) launched: usize,
    /// Bytes this device sent during the request.
    pub(crate) bytes_sent: u64,
    /// Of those, per peer device: (peer rank, bytes); peers sent nothing are left out.
    pub(crate) sent_to: Vec<(usize, u64)>,
    /// The final latent (last stage only).
    pub(crate) latent: Option<Tensor>,
}

/// Messages of a device actor.
#[derive(Debug)]
pub(crate) enum DeviceMessage {
    /// Start a request: allocate K/V buffers, build the stage's schedule; stage 0 seeds its
    /// step-0 input with the initial latent. Answers once ready.
    Begin {
        setup: Arc<RequestSetup>,
        schedule: ScheduleConfig,
        reply: RpcReplyPort<Result<(), String>>,
    },
    /// A work item's input from a peer (forwarded from the transport inbox; collective parts go
    /// straight to the compute thread's peer groups).
    Frame(Frame),
    /// The compute thread finished an item (`waited`: of its time, spent in exchanges).
    ComputeDone {
        request: u64,
        item: WorkItem,
        output: Result<Tensor, String>,
        waited: Duration,
    },
    /// Last stage of CFG group 0: the latent and sampler history after step `step` of
    /// `request` (from the compute thread; forwarded to the coordinator).
    Checkpoint {
        request: u64,
        step: usize,
        latent: Tensor,
        history: Option<Tensor>,
    },
    /// The timer armed at the core's deadline fired (stall or compute deadline).
    Tick,
    /// Device `device` of the cluster is gone (its node was lost, for `why`).
    PeerLost { device: usize, why: String },
    /// Drop request `request` (another device failed, or it was cancelled).
    Abort { request: u64 },
}

/// Messages of the coordinator actor.
#[derive(Debug)]
pub(crate) enum CoordinatorMessage {
    /// Run a request (queued behind the running one); progress goes to `progress`.
    Submit {
        /// The request's id (its runs get their own: `setup.id` is set when it starts).
        id: u64,
        setup: Box<RequestSetup>,
        schedule: ScheduleConfig,
        progress: Option<tokio::sync::mpsc::UnboundedSender<Progress>>,
        reply: RpcReplyPort<Result<GenerateOutput, ClusterError>>,
    },
    /// Cancel request `request` (queued or running), or with `None` the running one.
    Cancel {
        request: Option<u64>,
        reason: String,
    },
    /// The last stage finished step `step` of request `request`.
    StepDone { request: u64, step: usize },
    /// A last stage of CFG group 0 after step `step` of `request`: its latent and sampler
    /// history (under sequence parallelism only its rows are up to date).
    Checkpoint {
        request: u64,
        device: usize,
        step: usize,
        latent: Tensor,
        history: Option<Tensor>,
    },
    /// A device finished its part of request `request`.
    StageFinished {
        request: u64,
        device: usize,
        report: StageReport,
    },
    /// A node of the cluster was lost (connection closed or silent past the idle timeout).
    NodeLost {
        node: String,
        reason: String,
        /// The devices (ranks) it held.
        devices: Vec<usize>,
    },
    /// Node `node` (lost earlier, or not yet counted) reported its devices ready: the next
    /// layout includes it.
    NodeJoined { node: String },
    /// A device gave up on request `request`.
    DeviceFailed {
        request: u64,
        device: usize,
        step: Option<usize>,
        message: String,
        /// The failure was losing this peer device (its node gone, as the device's node saw).
        lost_peer: Option<usize>,
    },
    /// Why the cluster takes no more requests (a node lost, a device actor down), or `None`.
    Health {
        reply: RpcReplyPort<crate::request::ClusterHealth>,
    },
}
