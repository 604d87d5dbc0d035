//! A device's compute thread: it owns the [`StageExecutor`] (layer slice, K/V buffers, sampler)
//! and runs one job at a time, so the async runtime is never blocked by GEMMs. Results go back to
//! the device actor as messages; a panic inside a job is caught and reported as an error.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::Arc;

use kernels::Tensor;
use ractor::ActorRef;
use tokio::sync::oneshot;
use topology::schedule::WorkItem;

use crate::messages::DeviceMessage;
use crate::stage::{RequestSetup, StageExecutor, StageJob};

/// A deliberate failure, for testing how the cluster reports a broken device. It fires in the
/// cluster's first request only, so tests can check that the cluster recovers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The device's compute returns an error at this step.
    ErrorAt {
        /// Device index.
        device: usize,
        /// Step.
        step: usize,
    },
    /// The device's compute thread panics at this step.
    PanicAt {
        /// Device index.
        device: usize,
        /// Step.
        step: usize,
    },
    /// The device *actor* (not its compute thread) panics when it launches this step: exercises
    /// the coordinator's supervision of its linked devices.
    ActorPanicAt {
        /// Device index.
        device: usize,
        /// Step.
        step: usize,
    },
    /// The coordinator sends this device its `Begin` `millis` late (peers that began first may
    /// send it frames before its Begin arrives).
    SlowBegin {
        /// Device index.
        device: usize,
        /// Extra milliseconds.
        millis: u64,
    },
    /// The device's compute hangs for `secs` at this step (a straggler or a wedged device).
    HangAt {
        /// Device index.
        device: usize,
        /// Step.
        step: usize,
        /// How long.
        secs: u64,
    },
}

pub(crate) enum ComputeJob {
    Begin(Arc<RequestSetup>, oneshot::Sender<Result<(), String>>),
    Run {
        request: u64,
        item: WorkItem,
        job: StageJob,
        input: Tensor,
    },
    Finish(oneshot::Sender<Option<Tensor>>),
}

/// What reaches a CFG-parallel last stage's compute thread from the other group (through its
/// device actor), or the actor's word that the request is over.
pub(crate) enum PartnerMsg {
    /// The other group's noise prediction for `item`.
    Prediction {
        request: u64,
        item: WorkItem,
        prediction: Tensor,
    },
    /// Request `request` ended (failed or aborted): stop waiting for its predictions.
    Cancel { request: u64 },
}

/// Waits for the partner's prediction for `item` of `request`; messages of earlier requests are
/// skipped. The partner runs the same items in the same order, so anything else is an error.
fn partner_prediction(
    rx: &mpsc::Receiver<PartnerMsg>,
    request: u64,
    item: WorkItem,
) -> Result<Tensor, String> {
    loop {
        match rx.recv() {
            Ok(PartnerMsg::Prediction {
                request: r,
                item: i,
                prediction,
            }) if r == request => {
                return if i == item {
                    Ok(prediction)
                } else {
                    Err(format!(
                        "the other CFG group sent its prediction for {i} while this stage waits \
                         for {item}"
                    ))
                };
            }
            Ok(PartnerMsg::Cancel { request: r }) if r >= request => {
                return Err("the request ended while waiting for the other CFG group".into())
            }
            Ok(_) => {} // an earlier request's
            Err(_) => return Err("the device stopped".into()),
        }
    }
}

/// Handle to a running compute thread; dropping it ends the thread after its current job.
pub(crate) struct ComputeThread {
    jobs: mpsc::Sender<ComputeJob>,
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl ComputeThread {
    pub(crate) fn spawn(
        device: usize,
        mut exec: StageExecutor,
        actor: ActorRef<DeviceMessage>,
        fault: Option<Fault>,
        partner: Option<mpsc::Receiver<PartnerMsg>>,
        sp_request: Option<Arc<std::sync::atomic::AtomicU64>>,
    ) -> std::io::Result<ComputeThread> {
        let (tx, rx) = mpsc::channel::<ComputeJob>();
        std::thread::Builder::new()
            .name(format!("pipefuse-dev{device}"))
            .spawn(move || {
                for job in rx {
                    match job {
                        ComputeJob::Begin(setup, reply) => {
                            let r = catch_unwind(AssertUnwindSafe(|| exec.begin(setup)))
                                .map_err(|p| format!("compute panicked: {}", panic_message(p)))
                                .and_then(|r| r.map_err(|e| e.to_string()));
                            let _ = reply.send(r);
                        }
                        ComputeJob::Run { request, item, job, input } => {
                            if let Some(r) = &sp_request {
                                r.store(request, std::sync::atomic::Ordering::Relaxed);
                            }
                            let _span = tracing::debug_span!("compute", device, step = item.step, part = ?item.part).entered();
                            let out = catch_unwind(AssertUnwindSafe(|| {
                                match fault.filter(|_| request == 1) {
                                    Some(Fault::ErrorAt { device: d, step }) if d == device && step == item.step => {
                                        return Err(format!("injected error at step {step}"));
                                    }
                                    Some(Fault::PanicAt { device: d, step }) if d == device && step == item.step => {
                                        panic!("injected panic at step {step}");
                                    }
                                    Some(Fault::HangAt { device: d, step, secs }) if d == device && step == item.step => {
                                        std::thread::sleep(std::time::Duration::from_secs(secs));
                                    }
                                    _ => {}
                                }
                                let out = exec.run(&job, &input).map_err(|e| e.to_string())?;
                                let Some(rx) = partner.as_ref().filter(|_| exec.exchanges_predictions()) else {
                                    return Ok(out);
                                };
                                actor
                                    .cast(DeviceMessage::CfgPrediction { request, item, prediction: out.clone() })
                                    .map_err(|_| "the device actor stopped".to_string())?;
                                let theirs = partner_prediction(rx, request, item)?;
                                exec.combine(&job, &out, &theirs).map_err(|e| e.to_string())
                            }))
                            .unwrap_or_else(|p| Err(format!("compute panicked: {}", panic_message(p))));
                            if actor.cast(DeviceMessage::ComputeDone { request, item, output: out }).is_err() {
                                break; // the actor is gone
                            }
                        }
                        ComputeJob::Finish(reply) => {
                            let latent = catch_unwind(AssertUnwindSafe(|| exec.finish())).ok().flatten();
                            let _ = reply.send(latent);
                        }
                    }
                }
            })?;
        Ok(ComputeThread { jobs: tx })
    }

    /// Queues a job; `false` if the thread has ended.
    pub(crate) fn submit(&self, job: ComputeJob) -> bool {
        self.jobs.send(job).is_ok()
    }
}
