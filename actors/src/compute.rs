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

use crate::fault::Fault;
use crate::messages::DeviceMessage;
use crate::peer_group::{ExchangeClock, PeerGroup};
use crate::stage::{RequestSetup, StageExecutor, StageJob};

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

/// CFG parallel, last stage: all-gathers the two groups' noise predictions (group order), then
/// guides with them and steps the scheduler ([`StageExecutor::combine`]).
fn swap_predictions(
    exec: &mut StageExecutor,
    group: &mut PeerGroup,
    job: &StageJob,
    own: Tensor,
) -> Result<Tensor, String> {
    use model::sp::Collective;
    let me = group.rank();
    let both = group.all_gather(own).map_err(|e| e.to_string())?;
    let partner = &both[1 - me];
    exec.combine(job, &both[me], partner)
        .map_err(|e| e.to_string())
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
    /// Starts the thread of `device`. `cfg` is a CFG last stage's peer group with the other
    /// group's last stage (members in group order); `clock` is shared with the device's peer
    /// groups (the request being computed, the time waited in exchanges); with `checkpoints`
    /// (a last stage of CFG group 0) the state after every step goes to the actor.
    pub(crate) fn spawn(
        device: usize,
        mut exec: StageExecutor,
        actor: ActorRef<DeviceMessage>,
        fault: Option<Fault>,
        mut cfg: Option<PeerGroup>,
        clock: Arc<ExchangeClock>,
        checkpoints: bool,
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
                            clock.start_item(request);
                            let _span = tracing::debug_span!("compute", device, step = item.step, part = ?item.part).entered();
                            let out = catch_unwind(AssertUnwindSafe(|| {
                                if let Some(Fault::Straggler { device: d, millis }) = fault {
                                    if d == device {
                                        std::thread::sleep(std::time::Duration::from_millis(millis));
                                    }
                                }
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
                                match cfg.as_mut().filter(|_| exec.exchanges_predictions()) {
                                    Some(group) => swap_predictions(&mut exec, group, &job, out),
                                    None => Ok(out),
                                }
                            }))
                            .unwrap_or_else(|p| Err(format!("compute panicked: {}", panic_message(p))));
                            // The state after a completed step, for the coordinator's
                            // checkpoint (sent before the step's ComputeDone, so it arrives
                            // before the step is reported done).
                            if checkpoints && job.ends_step && out.is_ok() {
                                if let Some((latent, history)) = exec.sampler_snapshot() {
                                    let _ = actor.cast(DeviceMessage::Checkpoint { request, step: item.step, latent, history });
                                }
                            }
                            let waited = clock.take_waited();
                            if actor.cast(DeviceMessage::ComputeDone { request, item, output: out, waited }).is_err() {
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
