//! The crate's one error type.

/// Result with [`ClusterError`].
pub type Result<T, E = ClusterError> = std::result::Result<T, E>;

/// Why a cluster could not start or a request could not finish.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// The topology or the plan is invalid (file, line, field inside).
    #[error(transparent)]
    Topology(#[from] topology::TopologyError),
    /// The model refused an input or failed to load.
    #[error(transparent)]
    Model(#[from] model::ModelError),
    /// A kernel failed.
    #[error(transparent)]
    Kernel(#[from] kernels::KernelError),
    /// A transport failure.
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
    /// A device could not be started (its layer slice did not load, its device did not open).
    #[error("device {device} ({what}) failed to start: {message}")]
    DeviceStart {
        /// Device index.
        device: usize,
        /// The device, e.g. `cpu(threads=1)`.
        what: String,
        /// Why.
        message: String,
    },
    /// A device failed during a request: an error, a panic, a stall or a lost peer.
    #[error("device {device} failed{}: {message}", step.map_or(String::new(), |s| format!(" at step {s}")))]
    DeviceFailed {
        /// Device index.
        device: usize,
        /// The denoising step it was on, when known.
        step: Option<usize>,
        /// What happened.
        message: String,
    },
    /// A node of the cluster was lost mid-request or before it.
    #[error("node {node} was lost: {reason}")]
    NodeLost {
        /// The node's name in the topology.
        node: String,
        /// Why (idle timeout, closed, refused).
        reason: String,
    },
    /// The request was cancelled (by [`Cluster::cancel`](crate::Cluster::cancel) or
    /// [`Cluster::cancel_running`](crate::Cluster::cancel_running)) before it finished.
    #[error("request {request} was cancelled: {reason}")]
    Cancelled {
        /// The request's id.
        request: u64,
        /// Why.
        reason: String,
    },
    /// The cluster is shut down or its coordinator stopped before answering.
    #[error("the cluster is not running: {0}")]
    NotRunning(String),
    /// A request whose estimated memory exceeds what this process can still allocate, or whose
    /// sizes overflow (checked before anything is allocated).
    #[error("not enough memory: {0}")]
    OutOfMemory(String),
    /// A request that the cluster cannot run as asked.
    #[error("bad request: {0}")]
    BadRequest(String),
}
