//! The public values of a request's life: what is asked ([`GenerateRequest`]), how the cluster
//! runs ([`ClusterOptions`]), what comes back while it runs ([`Progress`], [`RequestHandle`]) and
//! at the end ([`GenerateOutput`], [`RunSummary`]). Kept apart from the code that produces them, so
//! the actors and the API import this module and not each other.

use std::fmt;
use std::time::Duration;

use kernels::Tensor;
use model::sampler::Scheduler;
use model::Request;
use tokio::sync::mpsc;

use crate::error::{ClusterError, Result};
use crate::fault::Fault;

/// Knobs of a running cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// A stage waiting longer than this for its next input fails the request (default 10 min).
    /// Keep it above `compute_timeout`, so that a wedged device is named by its own watchdog
    /// before the stages waiting for it time out.
    pub stall_timeout: Duration,
    /// One work item computing longer than this fails the request, naming the device
    /// (default 5 min).
    pub compute_timeout: Duration,
    /// A deliberate failure (tests and chaos drills).
    pub fault: Option<Fault>,
    /// Multi-node clusters: a request running when a node is lost resumes from its checkpoint
    /// on the nodes that remain (default); `false` fails it naming the node. Either way the
    /// cluster re-plans over the remaining nodes for later requests.
    pub resume: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            stall_timeout: Duration::from_secs(600),
            compute_timeout: Duration::from_secs(300),
            fault: None,
            resume: true,
        }
    }
}

/// One generation request.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Labels / caption, guidance, latent size.
    pub request: Request,
    /// Denoising steps T.
    pub steps: usize,
    /// The sampler.
    pub scheduler: Scheduler,
    /// Initial noise `[B, C, H, W]` (scaled by the scheduler's initial sigma here).
    pub noise: Tensor,
}

/// Progress of a running request.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// Step `step` (0-based) of `steps` is complete on every patch.
    Step {
        /// The step just completed.
        step: usize,
        /// Total steps.
        steps: usize,
        /// Time since the request started.
        elapsed: Duration,
    },
    /// The request was interrupted (a node was lost) and continues from its checkpoint after
    /// `steps_done` steps, on the devices that remain; `Step` events follow from there.
    Resumed {
        /// Steps done before the interruption that are not run again.
        steps_done: usize,
        /// Why it was interrupted.
        reason: String,
    },
}

/// How the cluster stands (see [`crate::Cluster::health`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterHealth {
    /// Why it takes no requests (a device actor down, a node lost that the others cannot make
    /// up for, the coordinator not answering), or `None` while it takes them.
    pub broken: Option<String>,
    /// The nodes its devices run on now, in topology order.
    pub nodes: Vec<String>,
    /// The topology's nodes that are not among them (lost, not yet back).
    pub missing: Vec<String>,
}

/// A resume during a request (see [`Progress::Resumed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    /// Steps kept from before the interruption.
    pub steps_done: usize,
    /// Why it was interrupted.
    pub reason: String,
    /// Pipeline stages of the run that continued it (0: none ran; every step was done and the
    /// last checkpoint is the result).
    pub stages: usize,
}

/// One device's share of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceSummary {
    /// Device rank.
    pub device: usize,
    /// Time spent computing (running items, not counting `exchange_wait`).
    pub busy: Duration,
    /// Time spent inside items waiting in exchanges (the CFG prediction swap, sequence-parallel
    /// collectives) for peers' parts or for room on a link.
    pub exchange_wait: Duration,
    /// Work items run.
    pub items: usize,
    /// Bytes sent to peers.
    pub bytes_sent: u64,
    /// Of those, per link: (peer device, bytes); links that carried nothing are left out.
    pub sent_to: Vec<(usize, u64)>,
}

/// What a run cost: each device's time is computing (`busy`), waiting in exchanges
/// (`exchange_wait`) or idle between items (the bubble).
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    /// Wall time of the request.
    pub wall: Duration,
    /// Per device.
    pub devices: Vec<DeviceSummary>,
    /// `1 - sum(busy + exchange_wait) / (devices * wall)`: the share of device time spent idle
    /// between items (pipeline fill and drain, waiting for inputs).
    pub bubble_fraction: f64,
    /// `sum(exchange_wait) / (devices * wall)`: the share spent waiting inside exchanges.
    pub exchange_fraction: f64,
    /// Where the request was resumed after an interruption (a lost node), in order; empty for
    /// an uninterrupted run. After a resume, `devices` describe the run that finished it and
    /// `wall` the whole request.
    pub resumes: Vec<Resume>,
}

impl RunSummary {
    pub(crate) fn new(wall: Duration, devices: Vec<DeviceSummary>) -> RunSummary {
        let sum = |f: fn(&DeviceSummary) -> Duration| -> f64 {
            devices.iter().map(|d| f(d).as_secs_f64()).sum()
        };
        let (busy, waited) = (sum(|d| d.busy), sum(|d| d.exchange_wait));
        let cap = wall.as_secs_f64() * devices.len() as f64;
        let share = |x: f64| {
            if cap > 0.0 {
                (x / cap).clamp(0.0, 1.0)
            } else {
                0.0
            }
        };
        RunSummary {
            wall,
            bubble_fraction: if cap > 0.0 {
                (1.0 - (busy + waited) / cap).max(0.0)
            } else {
                0.0
            },
            exchange_fraction: share(waited),
            devices,
            resumes: Vec::new(),
        }
    }
}

impl fmt::Display for RunSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "wall {:.3} s, bubble fraction {:.1}%, waiting in exchanges {:.1}%",
            self.wall.as_secs_f64(),
            100.0 * self.bubble_fraction,
            100.0 * self.exchange_fraction
        )?;
        for r in &self.resumes {
            match r.stages {
                0 => writeln!(
                    f,
                    "  resumed after step {}, the last: the result is its checkpoint ({})",
                    r.steps_done, r.reason
                )?,
                n => writeln!(
                    f,
                    "  resumed after step {} of the request on {n} stage(s): {}",
                    r.steps_done, r.reason
                )?,
            }
        }
        let pct = |d: Duration| 100.0 * d.as_secs_f64() / self.wall.as_secs_f64().max(1e-9);
        for d in &self.devices {
            writeln!(
                f,
                "  device {}: busy {:.3} s ({:.0}%) computing, {:.3} s ({:.0}%) waiting in exchanges, {} items, {:.2} MB sent",
                d.device,
                d.busy.as_secs_f64(),
                pct(d.busy),
                d.exchange_wait.as_secs_f64(),
                pct(d.exchange_wait),
                d.items,
                d.bytes_sent as f64 / 1e6
            )?;
        }
        Ok(())
    }
}

/// The result of a request.
#[derive(Debug, Clone)]
pub struct GenerateOutput {
    /// The final latent `[B, C, H, W]`.
    pub latent: Tensor,
    /// Timing and traffic.
    pub summary: RunSummary,
}

/// A submitted request: progress events, then the result.
#[derive(Debug)]
pub struct RequestHandle {
    /// Progress events; the channel closes when the request ends.
    pub progress: mpsc::UnboundedReceiver<Progress>,
    pub(crate) result: ractor::concurrency::OneshotReceiver<Result<GenerateOutput>>,
    pub(crate) id: u64,
}

impl RequestHandle {
    /// The request's id (for [`Cluster::cancel`]).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Waits for the result.
    pub async fn result(self) -> Result<GenerateOutput> {
        self.result.await.map_err(|_| {
            ClusterError::NotRunning("the coordinator stopped before answering".into())
        })?
    }
}
