//! The jobs of `pipefuse serve`: admission into the bounded fair queue, one dispatcher that runs
//! them on the cluster one after another, their state as it changes (a `watch` per job, read by
//! the handlers, the SSE stream and the job table), deadlines and cancellation.
//!
//! Every admitted job ends in exactly one final state: `Succeeded`, `Failed` (with the HTTP
//! status and reason) or `Cancelled` (with the reason); nothing admitted is dropped silently.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actors::{Cluster, ClusterError, GenerateRequest, Progress};
use axum::http::StatusCode;
use tokio::sync::{watch, Notify};

use super::api::ApiError;
use super::metrics::{Metrics, Outcome};
use super::queue::{FairQueue, QueueFull};

/// The 504 of a job whose deadline passed.
fn late(job: &Job, what: &str) -> JobState {
    JobState::Failed {
        status: 504,
        message: format!(
            "the request did not finish within its deadline of {} s ({what})",
            job.timeout.as_secs_f64()
        ),
    }
}

/// Finished jobs kept for `GET /v1/jobs/{id}` (the oldest is forgotten first).
const KEEP_FINISHED: usize = 64;

/// Where a job is.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum JobState {
    /// Waiting for the cluster.
    Queued,
    /// On the cluster: `step` of `steps` done.
    Running { step: usize, steps: usize },
    /// Done: one PNG per image.
    Succeeded {
        images: Arc<Vec<Vec<u8>>>,
        secs: f64,
    },
    /// Ended with an error: the status to answer and why.
    Failed { status: u16, message: String },
    /// Cancelled, and why.
    Cancelled { reason: String },
}

impl JobState {
    /// Whether the job has ended.
    pub(crate) fn is_final(&self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running { .. })
    }

    /// Its name in the API (`queued`, `running`, `succeeded`, `failed`, `cancelled`).
    pub(crate) fn name(&self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running { .. } => "running",
            JobState::Succeeded { .. } => "succeeded",
            JobState::Failed { .. } => "failed",
            JobState::Cancelled { .. } => "cancelled",
        }
    }
}

/// One admitted request.
pub(crate) struct Job {
    /// Its id (`job-N` in the API).
    pub(crate) id: u64,
    /// When it arrived (Unix seconds, OpenAI's `created`).
    pub(crate) created: u64,
    /// Who asked (fair queueing).
    pub(crate) user: String,
    /// It fails with 504 once this passes.
    pub(crate) deadline: Instant,
    /// Its deadline in seconds from arrival (for messages).
    pub(crate) timeout: Duration,
    state: watch::Sender<JobState>,
    cancel: Mutex<Option<String>>,
    cancelled: Notify,
    request: Mutex<Option<GenerateRequest>>,
}

impl Job {
    /// Its state now.
    pub(crate) fn state(&self) -> JobState {
        self.state.borrow().clone()
    }

    /// Its state as it changes.
    pub(crate) fn watch(&self) -> watch::Receiver<JobState> {
        self.state.subscribe()
    }

    /// Waits until it has ended; returns the final state.
    pub(crate) async fn finished(&self) -> JobState {
        let mut rx = self.state.subscribe();
        let s = rx.wait_for(JobState::is_final).await.map(|s| s.clone());
        s.unwrap_or_else(|_| self.state())
    }

    fn set(&self, s: JobState) {
        self.state.send_replace(s);
    }
}

struct Inner {
    jobs: BTreeMap<u64, Arc<Job>>,
    queue: FairQueue<Arc<Job>>,
    running: Option<Arc<Job>>,
    finished: VecDeque<u64>,
    next_id: u64,
    accepting: bool,
}

/// The server's jobs and the cluster they run on.
pub(crate) struct Jobs {
    cluster: Arc<Cluster>,
    metrics: Arc<Metrics>,
    inner: Mutex<Inner>,
    wake: Notify,
    broken: Mutex<Option<String>>,
    /// Recent request time on the cluster (seconds), for `Retry-After`.
    recent_secs: Mutex<f64>,
}

impl Jobs {
    /// No jobs yet; at most `max_queue` wait at once, `per_user` of one user.
    pub(crate) fn new(
        cluster: Arc<Cluster>,
        metrics: Arc<Metrics>,
        max_queue: usize,
        per_user: usize,
    ) -> Jobs {
        Jobs {
            cluster,
            metrics,
            inner: Mutex::new(Inner {
                jobs: BTreeMap::new(),
                queue: FairQueue::new(max_queue, per_user),
                running: None,
                finished: VecDeque::new(),
                next_id: 1,
                accepting: true,
            }),
            wake: Notify::new(),
            broken: Mutex::new(None),
            recent_secs: Mutex::new(1.0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cluster.
    pub(crate) fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Asks the cluster whether it is broken (a node lost while idle is seen here, not only by
    /// the next request); remembers it. `/readyz`: its health, or why it takes no requests.
    pub(crate) async fn check_cluster(&self) -> Result<actors::ClusterHealth, String> {
        let health = self.cluster.health(Duration::from_secs(2)).await;
        let now = health.broken.clone();
        let mut broken = self.broken.lock().unwrap_or_else(|e| e.into_inner());
        match now {
            Some(why) if broken.is_none() => {
                tracing::error!("the cluster is broken: {why}");
                *broken = Some(why);
            }
            // A multi-node cluster mends when a lost node comes back.
            None if broken.is_some() && self.cluster.spec().nodes.len() > 1 => {
                tracing::info!("the cluster runs again");
                *broken = None;
            }
            _ => {}
        }
        drop(broken);
        match self.unavailable() {
            Some(why) => Err(why),
            None => Ok(health),
        }
    }

    /// Why new requests are refused with 503 (a broken cluster, a stopping server), if they are.
    pub(crate) fn unavailable(&self) -> Option<String> {
        if let Some(b) = self
            .broken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Some(format!("the cluster is broken: {b}"));
        }
        (!self.lock().accepting).then(|| "the server is stopping".to_string())
    }

    /// A 429 when the queue is full, else `Ok` (a quick check before the request is built).
    pub(crate) fn check_room(&self) -> Result<(), ApiError> {
        if let Some(why) = self.unavailable() {
            return Err(self.refused(Outcome::Unavailable, StatusCode::SERVICE_UNAVAILABLE, why));
        }
        let inner = self.lock();
        if inner.queue.is_full() {
            let waiting = inner.queue.len();
            drop(inner);
            return Err(self.full(waiting));
        }
        Ok(())
    }

    fn full(&self, waiting: usize) -> ApiError {
        let each = *self.recent_secs.lock().unwrap_or_else(|e| e.into_inner());
        let mut e = self.refused(
            Outcome::Rejected,
            StatusCode::TOO_MANY_REQUESTS,
            format!("the queue is full ({waiting} requests waiting); try again later"),
        );
        e.retry_after = Some((each * (waiting as f64 + 1.0)).ceil().clamp(1.0, 3600.0) as u64);
        e
    }

    fn refused(&self, outcome: Outcome, status: StatusCode, message: String) -> ApiError {
        self.metrics.count(outcome);
        let mut e = ApiError::new(status, "server_error", message);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            e.retry_after = Some(5);
        }
        e
    }

    /// Counts a request refused as invalid.
    pub(crate) fn invalid(&self) {
        self.metrics.count(Outcome::Invalid);
    }

    /// Queues a built request; 429 when the queue is full, 503 when the server is stopping.
    pub(crate) fn admit(
        self: &Arc<Self>,
        user: String,
        request: GenerateRequest,
        timeout: Duration,
    ) -> Result<Arc<Job>, ApiError> {
        let mut inner = self.lock();
        if !inner.accepting {
            drop(inner);
            return Err(self.refused(
                Outcome::Unavailable,
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is stopping".into(),
            ));
        }
        let id = inner.next_id;
        let job = Arc::new(Job {
            id,
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            user: user.clone(),
            deadline: Instant::now() + timeout,
            timeout,
            state: watch::channel(JobState::Queued).0,
            cancel: Mutex::new(None),
            cancelled: Notify::new(),
            request: Mutex::new(Some(request)),
        });
        match inner.queue.push(&user, job.clone()) {
            Ok(()) => {}
            Err(QueueFull::All { waiting }) => {
                drop(inner);
                return Err(self.full(waiting));
            }
            Err(QueueFull::Client { waiting }) => {
                drop(inner);
                let mut e = self.full(waiting);
                e.message = format!(
                    "`{user}` already has {waiting} requests waiting (--max-queue-per-user); \
                     try again when one has run"
                );
                return Err(e);
            }
        }
        inner.next_id += 1;
        inner.jobs.insert(id, job.clone());
        self.publish(&inner);
        drop(inner);
        tracing::info!(job = id, %user, "request queued");
        self.wake.notify_one();
        // A request still waiting at its deadline ends then, not when its turn comes.
        let (jobs, deadline) = (Arc::downgrade(self), job.deadline);
        tokio::spawn(async move {
            tokio::time::sleep_until(deadline.into()).await;
            if let Some(jobs) = jobs.upgrade() {
                jobs.expire_waiting(id);
            }
        });
        Ok(job)
    }

    /// Fails waiting job `id` whose deadline passed (nothing when it runs or has ended).
    fn expire_waiting(&self, id: u64) {
        let mut inner = self.lock();
        if let Some(job) = inner.queue.remove(|j| j.id == id) {
            self.finish(
                &mut inner,
                &job,
                late(&job, "it was still waiting for the cluster"),
            );
        }
    }

    fn publish(&self, inner: &Inner) {
        self.metrics
            .set_queue(inner.queue.len(), usize::from(inner.running.is_some()));
    }

    /// A job still known (running, waiting, or among the last finished).
    pub(crate) fn get(&self, id: u64) -> Option<Arc<Job>> {
        self.lock().jobs.get(&id).cloned()
    }

    /// Jobs ahead of waiting job `id` (None when it is not waiting).
    pub(crate) fn position(&self, id: u64) -> Option<usize> {
        let inner = self.lock();
        let ahead = inner.queue.position(|j| j.id == id)?;
        Some(ahead + usize::from(inner.running.is_some()))
    }

    /// Every known job, newest first.
    pub(crate) fn list(&self) -> Vec<Arc<Job>> {
        self.lock().jobs.values().rev().cloned().collect()
    }

    /// Forgets a finished job whose result was handed over (a synchronous request).
    pub(crate) fn forget(&self, id: u64) {
        let mut inner = self.lock();
        if inner.jobs.get(&id).is_some_and(|j| j.state().is_final()) {
            inner.jobs.remove(&id);
            inner.finished.retain(|&f| f != id);
        }
    }

    /// Cancels job `id`: a waiting one ends at once, a running one is aborted on every device.
    /// Returns false for an unknown or finished job.
    pub(crate) fn cancel(&self, id: u64, reason: &str) -> bool {
        let mut inner = self.lock();
        let Some(job) = inner.jobs.get(&id).cloned() else {
            return false;
        };
        if job.state().is_final() {
            return false;
        }
        if inner.queue.remove(|j| j.id == id).is_some() {
            self.finish(
                &mut inner,
                &job,
                JobState::Cancelled {
                    reason: reason.into(),
                },
            );
            return true;
        }
        drop(inner);
        *job.cancel.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.to_string());
        job.cancelled.notify_one();
        true
    }

    /// Stops taking requests (the server is stopping); those already admitted go on.
    pub(crate) fn stop_accepting(&self) {
        self.lock().accepting = false;
    }

    /// Whether no job waits or runs.
    pub(crate) fn idle(&self) -> bool {
        let inner = self.lock();
        inner.queue.len() == 0 && inner.running.is_none()
    }

    /// Cancels every waiting and running job.
    pub(crate) fn cancel_all(&self, reason: &str) {
        let ids: Vec<u64> = {
            let inner = self.lock();
            inner
                .jobs
                .values()
                .filter(|j| !j.state().is_final())
                .map(|j| j.id)
                .collect()
        };
        for id in ids {
            self.cancel(id, reason);
        }
    }

    fn finish(&self, inner: &mut Inner, job: &Job, state: JobState) {
        self.metrics.count(match &state {
            JobState::Succeeded { .. } => Outcome::Succeeded,
            JobState::Cancelled { .. } => Outcome::Cancelled,
            JobState::Failed { status: 504, .. } => Outcome::TimedOut,
            _ => Outcome::Failed,
        });
        match &state {
            JobState::Failed { message, .. } => {
                tracing::warn!(job = job.id, "request failed: {message}")
            }
            JobState::Cancelled { reason } => {
                tracing::info!(job = job.id, "request cancelled: {reason}")
            }
            _ => tracing::info!(job = job.id, "request done"),
        }
        // A job that never ran still holds its request (noise, embeddings): let it go.
        drop(job.request.lock().unwrap_or_else(|e| e.into_inner()).take());
        inner.finished.push_back(job.id);
        while inner.finished.len() > KEEP_FINISHED {
            if let Some(old) = inner.finished.pop_front() {
                inner.jobs.remove(&old);
            }
        }
        // The gauges first: whoever sees the final state sees them updated.
        self.publish(inner);
        job.set(state);
    }

    /// Runs the waiting jobs on the cluster, one at a time, until the process ends.
    pub(crate) async fn dispatch(self: Arc<Self>) {
        loop {
            let next = {
                let mut inner = self.lock();
                let next = inner.queue.pop().map(|(_, j)| j);
                inner.running = next.clone();
                self.publish(&inner);
                next
            };
            let Some(job) = next else {
                self.wake.notified().await;
                continue;
            };
            // A panic in one job fails that job (and marks the cluster broken), never the
            // dispatcher: every admitted job still ends.
            let run = std::panic::AssertUnwindSafe(self.run(&job));
            let state = match futures_util::FutureExt::catch_unwind(run).await {
                Ok(state) => state,
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    let message = format!("internal error while running the request: {what}");
                    tracing::error!(job = job.id, "{message}");
                    *self.broken.lock().unwrap_or_else(|e| e.into_inner()) = Some(message.clone());
                    JobState::Failed {
                        status: 500,
                        message,
                    }
                }
            };
            let mut inner = self.lock();
            inner.running = None;
            self.finish(&mut inner, &job, state);
        }
    }

    /// Runs one job on the cluster: its final state.
    async fn run(&self, job: &Job) -> JobState {
        if Instant::now() >= job.deadline {
            return late(job, "it was still waiting for the cluster");
        }
        let Some(req) = job.request.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return JobState::Failed {
                status: 500,
                message: "the request was already run".into(),
            };
        };
        if let Some(reason) = job.cancel.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return JobState::Cancelled { reason };
        }
        let steps = req.steps;
        job.set(JobState::Running { step: 0, steps });
        let mut handle = match self.cluster.submit(req).await {
            Ok(h) => h,
            Err(e) => return self.failure(e),
        };
        let cluster_id = handle.id();
        tracing::debug!(job = job.id, cluster_id, "running");
        let deadline = tokio::time::sleep_until(job.deadline.into());
        tokio::pin!(deadline);
        let (mut timed_out, mut last) = (false, Duration::ZERO);
        loop {
            tokio::select! {
                p = handle.progress.recv() => match p {
                    Some(Progress::Step { step, steps, elapsed }) => {
                        self.metrics.step((elapsed.saturating_sub(last)).as_secs_f64());
                        last = elapsed;
                        job.set(JobState::Running { step: step + 1, steps });
                    }
                    Some(Progress::Resumed { steps_done, reason }) => {
                        tracing::warn!(job = job.id, steps_done, %reason, "resumed from a checkpoint");
                        job.set(JobState::Running { step: steps_done, steps });
                    }
                    None => break,
                },
                _ = job.cancelled.notified() => {
                    let reason = job.cancel.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    self.cluster.cancel(cluster_id, reason.as_deref().unwrap_or("cancelled"));
                }
                _ = &mut deadline, if !timed_out => {
                    timed_out = true;
                    self.cluster.cancel(cluster_id, "its deadline passed");
                }
            }
        }
        let out = match handle.result().await {
            Ok(out) => out,
            Err(ClusterError::Cancelled { .. }) if timed_out => {
                return late(job, "cancelled on the cluster")
            }
            Err(ClusterError::Cancelled { .. }) => {
                let reason = job.cancel.lock().unwrap_or_else(|e| e.into_inner()).clone();
                return JobState::Cancelled {
                    reason: reason.unwrap_or_else(|| "cancelled".into()),
                };
            }
            Err(e) => return self.failure(e),
        };
        self.metrics.run(&out.summary);
        let secs = out.summary.wall.as_secs_f64();
        {
            let mut recent = self.recent_secs.lock().unwrap_or_else(|e| e.into_inner());
            *recent = 0.7 * *recent + 0.3 * secs;
        }
        let model = self.cluster.model().clone();
        let latent = out.latent;
        let images = tokio::task::spawn_blocking(move || {
            super::png::encode_each(&model, &latent, crate::cluster_args::cores())
        })
        .await;
        match images {
            Ok(Ok(images)) => JobState::Succeeded {
                images: Arc::new(images),
                secs,
            },
            Ok(Err(e)) => JobState::Failed {
                status: 500,
                message: format!("decoding the images: {}", crate::error_chain(&e)),
            },
            Err(e) => JobState::Failed {
                status: 500,
                message: format!("decoding the images: {e}"),
            },
        }
    }

    /// A request that failed on the cluster; a lost node or a stopped coordinator marks the
    /// cluster broken (then `/readyz` answers 503 and new requests are refused).
    fn failure(&self, e: ClusterError) -> JobState {
        let broken = matches!(
            e,
            ClusterError::NodeLost { .. } | ClusterError::NotRunning(_)
        );
        let message = e.to_string();
        // One process cannot mend; a multi-node cluster can (a lost node that comes back), so
        // there every request asks the cluster again.
        if broken && self.cluster.spec().nodes.len() == 1 {
            tracing::error!("the cluster is broken: {message}");
            *self.broken.lock().unwrap_or_else(|e| e.into_inner()) = Some(message.clone());
        }
        JobState::Failed {
            status: if broken { 503 } else { 500 },
            message,
        }
    }
}
