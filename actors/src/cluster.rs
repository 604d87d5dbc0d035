//! The programmatic API: build a cluster from a topology, submit requests, observe progress,
//! await results.
//!
//! ```no_run
//! # async fn demo() -> Result<(), actors::ClusterError> {
//! use actors::{Cluster, ClusterOptions, GenerateRequest};
//! let spec = topology::ClusterSpec::from_file("examples/topologies/local_2cpu.toml".as_ref())?;
//! let cluster = Cluster::start(spec, ClusterOptions::default()).await?;
//! let req = GenerateRequest::class_conditional(&cluster, vec![3], 12, 4.0, 0)?;
//! let mut handle = cluster.submit(req).await?;
//! while let Some(p) = handle.progress.recv().await {
//!     println!("{p:?}");
//! }
//! let out = handle.result().await?;
//! println!("{:?}\n{}", out.latent.shape(), out.summary);
//! cluster.shutdown().await;
//! # Ok(()) }
//! ```

use model::{PreparedRequest, Request};
use ractor::{Actor, ActorRef};
use tokio::sync::mpsc;
use topology::schedule::ScheduleConfig;
use topology::{ClusterSpec, DeviceRole, ModelShape, Plan};
use transport::MemoryNetwork;

use crate::coordinator::{CoordinatorActor, CoordinatorArgs, StageSlot};
use crate::device::DeviceArgs;
use crate::error::{ClusterError, Result};
use crate::handles::CoordinatorHandle;
use crate::memory::MemoryEstimate;
use crate::messages::CoordinatorMessage;
use crate::model_source::ModelSource;
use crate::request::{ClusterOptions, GenerateOutput, GenerateRequest, RequestHandle};
use crate::stage::{RequestSetup, StageExecutor};

impl GenerateRequest {
    /// A DiT request at the model's default size with the cluster's default scheduler and noise
    /// from `seed`.
    pub fn class_conditional(
        cluster: &Cluster,
        labels: Vec<usize>,
        steps: usize,
        guidance_scale: f32,
        seed: u64,
    ) -> Result<GenerateRequest> {
        let cfg = &cluster.model.config;
        let s = cfg.sample_size;
        Ok(GenerateRequest {
            noise: model::gaussian(&[labels.len(), cfg.in_channels, s, s], seed),
            request: Request {
                class_labels: labels,
                caption: None,
                guidance_scale,
                latent_size: [s, s],
                embedded_guidance: None,
            },
            steps,
            scheduler: cluster.model.default_scheduler()?,
        })
    }
}

/// A running cluster: a coordinator actor and one device actor per pipeline stage, connected by
/// in-process links.
pub struct Cluster {
    coordinator: ActorRef<CoordinatorMessage>,
    join: tokio::task::JoinHandle<()>,
    spec: ClusterSpec,
    model: ModelSource,
    /// The next request's id. Held while a request is prepared and queued, so ids reach the
    /// coordinator in increasing order (devices rely on ids only growing).
    next_id: std::sync::Mutex<u64>,
    /// Ranks whose devices run in this process (their memory is this host's).
    local: Vec<bool>,
}

impl Cluster {
    /// Validates `spec`, then starts the devices; each loads only its layers. Fails (naming the
    /// device) if a device cannot open or load.
    pub async fn start(spec: ClusterSpec, options: ClusterOptions) -> Result<Cluster> {
        spec.validate()?;
        if spec.nodes.len() > 1 {
            return Err(spec
                .error(
                    "nodes",
                    format!("{} nodes: a multi-node cluster runs one process per node", spec.nodes.len()),
                    Some("start it with `pipefuse launch --topology FILE --node NAME` on each machine, or `pipefuse launch --local` on this one".into()),
                )
                .into());
        }
        let model = ModelSource::from_spec(&spec)?;
        // Check the layout against the model before building anything per device: the
        // in-process network has a link per pair of devices (N^2 of them).
        let plan = startup_plan(&spec, &model.config)?;
        warn_if_oversubscribed(&spec.nodes[0].devices);
        // Every device runs here. (`Node::start` checks a node's own devices the same way.)
        check_weights_fit(&model, &plan, |_| true)?;
        let endpoints = MemoryNetwork::build(spec.device_count())
            .into_iter()
            .map(Some)
            .collect();
        Self::start_parts(spec, model, options, endpoints, |_| None, None).await
    }

    /// Starts the coordinator with the stages of `spec`: a stage whose device has an endpoint
    /// in `endpoints` (indexed by device) runs here; the others come from `remote(device)`.
    pub(crate) async fn start_parts(
        spec: ClusterSpec,
        model: ModelSource,
        options: ClusterOptions,
        mut endpoints: Vec<Option<transport::Endpoint>>,
        remote: impl Fn(usize) -> Option<std::sync::Arc<dyn crate::handles::RemoteDevice>>,
        reconfigurer: Option<std::sync::Arc<dyn crate::handles::Reconfigurer>>,
    ) -> Result<Cluster> {
        let plan = startup_plan(&spec, &model.config)?;
        let local = endpoints.iter().map(Option::is_some).collect();
        let mut devices: Vec<StageSlot> = Vec::new();
        for role in plan.roles() {
            let rank = role.rank;
            let Some(endpoint) = endpoints.get_mut(rank).and_then(Option::take) else {
                let proxy = remote(rank).ok_or_else(|| {
                    ClusterError::NotRunning(format!("no route to device {}", role.device))
                })?;
                devices.push(StageSlot::Remote(proxy));
                continue;
            };
            devices.push(StageSlot::Local(local_device(
                &model, role, endpoint, &options,
            )));
        }
        let (coordinator, join) = Actor::spawn(
            None,
            CoordinatorActor,
            CoordinatorArgs {
                layout: crate::replan::Layout::full(&spec, &model.config)?,
                spec: spec.clone(),
                reconfigurer,
                devices,
                fault: options.fault,
                begin_timeout: options.compute_timeout,
                resume: options.resume,
                model: model.config.clone(),
            },
        )
        .await
        .map_err(|e| match e {
            ractor::SpawnErr::StartupFailed(inner) => match inner.downcast::<ClusterError>() {
                Ok(e) => *e,
                Err(other) => {
                    ClusterError::NotRunning(format!("the coordinator failed to start: {other}"))
                }
            },
            other => ClusterError::NotRunning(format!("the coordinator failed to start: {other}")),
        })?;
        tracing::info!(stages = plan.stages.len(), "cluster started");
        Ok(Cluster {
            coordinator,
            join,
            spec,
            model,
            next_id: std::sync::Mutex::new(1),
            local,
        })
    }

    /// The coordinator actor (the node runtime forwards remote reports to it).
    pub(crate) fn coordinator_ref(&self) -> &ActorRef<CoordinatorMessage> {
        &self.coordinator
    }

    /// The topology.
    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    /// The model the cluster serves.
    pub fn model(&self) -> &ModelSource {
        &self.model
    }

    /// The plan a request runs under (layer owners, patch table); errors say why it cannot run.
    pub fn plan(&self, req: &GenerateRequest) -> Result<Plan> {
        self.plan_of(&req.request)
    }

    fn plan_of(&self, request: &Request) -> Result<Plan> {
        plan_of(&self.spec, &self.model.config, request)
    }

    /// What `request` would allocate on this process's devices (K/V buffers, working sets,
    /// latents; see [`crate::memory`]), before anything is allocated.
    pub fn memory_estimate(&self, request: &Request) -> Result<MemoryEstimate> {
        request_memory(&self.spec, &self.model.config, request, |r| {
            self.local.get(r).copied().unwrap_or(false)
        })
    }

    /// [`Cluster::memory_estimate`] plus `outputs` bytes (what the caller allocates for the
    /// result), checked against what this host can still allocate: `Err`
    /// ([`ClusterError::OutOfMemory`]) naming both figures when it does not fit. Hosts where
    /// that cannot be read pass.
    pub fn check_memory(&self, request: &Request, outputs: u64) -> Result<MemoryEstimate> {
        let mut est = self.memory_estimate(request)?;
        est.outputs = outputs;
        match kernels::host_memory() {
            Some(host) => est.check(&host)?,
            None => tracing::debug!("this host's free memory is unknown: memory check skipped"),
        }
        Ok(est)
    }

    /// Submits a request; it runs after the ones before it.
    pub async fn submit(&self, req: GenerateRequest) -> Result<RequestHandle> {
        let plan = self.plan(&req)?;
        self.check_memory(&req.request, 0)?;
        let schedule = ScheduleConfig {
            stages: plan.pipeline_len(),
            patches: plan.patches.len(),
            warmup: plan.warmup_steps,
            steps: req.steps,
        };
        if schedule.patches < schedule.stages && schedule.warmup < schedule.steps {
            tracing::warn!(patches = schedule.patches, stages = schedule.stages, "fewer patches than stages: the pipeline cannot stay full (recommend num_patches >= pipefusion_degree)");
        }
        let mut next_id = self.next_id.lock().unwrap_or_else(|e| e.into_inner());
        let id = *next_id;
        let setup = RequestSetup::new(
            0, // the run's id, set by the coordinator when it starts
            &self.model.config,
            &req.request,
            &req.scheduler,
            req.steps,
            &req.noise,
            plan.patches.clone(),
            plan.warmup_steps,
        )?
        .with_cfg_degree(plan.cfg_degree)?
        .with_sp_degree(plan.sp.degree())?;
        let (ptx, prx) = mpsc::unbounded_channel();
        let (tx, rx) = ractor::concurrency::oneshot();
        self.coordinator
            .cast(CoordinatorMessage::Submit {
                id,
                setup: Box::new(setup),
                schedule,
                progress: Some(ptx),
                reply: tx.into(),
            })
            .map_err(|e| ClusterError::NotRunning(e.to_string()))?;
        *next_id += 1;
        drop(next_id);
        Ok(RequestHandle {
            progress: prx,
            result: rx,
            id,
        })
    }

    /// Submits a request and waits for its result.
    pub async fn generate(&self, req: GenerateRequest) -> Result<GenerateOutput> {
        self.submit(req).await?.result().await
    }

    /// Cancels request `id` (see [`RequestHandle::id`]): a queued one is dropped, a running one
    /// is aborted on every device; its result is [`ClusterError::Cancelled`]. Unknown or finished
    /// ids are ignored.
    pub fn cancel(&self, id: u64, reason: &str) {
        let _ = self.coordinator.cast(CoordinatorMessage::Cancel {
            request: Some(id),
            reason: reason.to_string(),
        });
    }

    /// Why the cluster can take no more requests: a node was lost and the others cannot make up
    /// for it, or a device actor went down (also while idle), or the coordinator does not answer
    /// within `wait`; `None` while it can. A server's readiness check.
    pub async fn broken(&self, wait: std::time::Duration) -> Option<String> {
        self.health(wait).await.broken
    }

    /// Whether the cluster takes requests, and on which nodes it runs now (a multi-node cluster
    /// runs on fewer nodes while one is lost, and on all again when it is back).
    pub async fn health(&self, wait: std::time::Duration) -> crate::request::ClusterHealth {
        let stopped = |why: String| crate::request::ClusterHealth {
            broken: Some(why),
            ..Default::default()
        };
        let (tx, rx) = ractor::concurrency::oneshot();
        if self
            .coordinator
            .cast(CoordinatorMessage::Health { reply: tx.into() })
            .is_err()
        {
            return stopped("the coordinator has stopped".into());
        }
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(h)) => h,
            Ok(Err(_)) => stopped("the coordinator has stopped".into()),
            Err(_) => stopped(format!(
                "the coordinator did not answer within {} ms",
                wait.as_millis()
            )),
        }
    }

    /// Cancels whatever request is running now (queued ones stay).
    pub fn cancel_running(&self, reason: &str) {
        let _ = self.coordinator.cast(CoordinatorMessage::Cancel {
            request: None,
            reason: reason.to_string(),
        });
    }

    /// Stops the devices and the coordinator; queued requests fail.
    pub async fn shutdown(self) {
        self.coordinator.stop(None);
        let _ = self.join.await;
    }
}

/// How to spawn the device actor of `role` in this process, reporting to the local coordinator.
/// Refuses, before any device loads its slice, weights that this host cannot hold (the devices
/// for which `local(rank)` holds are this process's). Called by `Cluster::start` and
/// `Node::start`, before the devices are built.
pub(crate) fn check_weights_fit(
    model: &ModelSource,
    plan: &Plan,
    local: impl Fn(usize) -> bool,
) -> Result<()> {
    let Some(host) = kernels::host_memory() else {
        return Ok(());
    };
    let roles = plan.roles();
    let devices: Vec<_> = roles
        .iter()
        .filter(|r| local(r.rank))
        .map(|r| &r.device.spec)
        .collect();
    let elements = model.weight_elements()?;
    let weights = crate::memory::estimate_weights(&model.config, plan, elements.as_deref(), local);
    crate::memory::check_weights(weights, &devices, &host)
}

fn local_device(
    model: &ModelSource,
    role: DeviceRole,
    endpoint: transport::Endpoint,
    options: &ClusterOptions,
) -> crate::coordinator::DeviceArgsFactory {
    let args = device_args(model, role, endpoint, options);
    Box::new(move |coordinator| args(CoordinatorHandle::Local(coordinator)))
}

/// The arguments of the device actor of `role`, given how it reaches the coordinator.
pub(crate) fn device_args(
    model: &ModelSource,
    role: DeviceRole,
    endpoint: transport::Endpoint,
    options: &ClusterOptions,
) -> impl FnOnce(CoordinatorHandle) -> DeviceArgs + Send + 'static {
    let (model, layers, spec_dev) = (model.clone(), role.layers.clone(), role.device.spec);
    let cfg_group = (role.cfg.degree > 1).then_some(role.cfg.group);
    let (stall_timeout, compute_timeout, fault) = (
        options.stall_timeout,
        options.compute_timeout,
        options.fault,
    );
    move |coordinator| DeviceArgs {
        role,
        load: Box::new(move || {
            let exec = StageExecutor::new(model.load_slice(spec_dev, layers)?);
            Ok(match cfg_group {
                Some(g) => exec.with_cfg_group(g),
                None => exec,
            })
        }),
        endpoint,
        coordinator,
        stall_timeout,
        compute_timeout,
        fault,
        floor: 0,
    }
}

/// The device layout of `spec` for `model` (which device runs which layers, CFG group and
/// sequence-parallel rank), checked against the model before anything starts. It does not depend
/// on the request: a guided request of the model's native size stands for all of them.
pub fn startup_plan(spec: &ClusterSpec, model: &model::ModelConfig) -> Result<Plan> {
    let side = model.sample_size;
    let plan = Plan::new(spec, &shape_of(model, 2, 1, [side, side], 0))?;
    Ok(plan)
}

/// Warns when the CPU devices of this process have more threads than the machine has cores
/// (issue 16 group 6: 1000 threads on 2 cores turned 0.03 s into 13.2 s without a word).
pub(crate) fn warn_if_oversubscribed(devices: &[topology::DeviceSpec]) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if let Some(warning) = oversubscription(devices, cores) {
        tracing::warn!(cores, "{warning}");
    }
}

/// What to say when `devices` together have more CPU threads than `cores`: they then contend
/// for them (slower, results unchanged).
pub(crate) fn oversubscription(devices: &[topology::DeviceSpec], cores: usize) -> Option<String> {
    let threads: usize = devices
        .iter()
        .map(|d| match d {
            topology::DeviceSpec::Cpu { threads, .. } => *threads,
            topology::DeviceSpec::Cuda { .. } => 0,
        })
        .sum();
    (threads > cores).then(|| {
        format!(
            "the CPU devices of this process have {threads} threads in all on {cores} cores: they will contend (slower, results unchanged); give each of the {} devices about {} thread(s)",
            devices.len(),
            (cores / devices.len().max(1)).max(1)
        )
    })
}

/// The plan of `request` on the cluster `spec` describes.
pub(crate) fn plan_of(
    spec: &ClusterSpec,
    cfg: &model::ModelConfig,
    request: &Request,
) -> Result<Plan> {
    let prepared = PreparedRequest::new(cfg, request)?;
    Ok(Plan::new(
        spec,
        &shape_of(
            cfg,
            prepared.forward_batch(),
            prepared.batch(),
            request.latent_size,
            prepared.text_tokens(),
        ),
    )?)
}

/// What `request` would allocate on the devices for which `local(rank)` holds (see
/// [`crate::memory`]): the coordinator's process at submit, each other node at Begin.
pub(crate) fn request_memory(
    spec: &ClusterSpec,
    cfg: &model::ModelConfig,
    request: &Request,
    local: impl Fn(usize) -> bool,
) -> Result<MemoryEstimate> {
    let plan = plan_of(spec, cfg, request)?;
    let prepared = PreparedRequest::new(cfg, request)?;
    let caption = request.caption.as_ref().map_or(0, |c| c.embeds.dim(1));
    crate::memory::estimate_request(cfg, &plan, &prepared, caption, local)
}

/// The plan's view of a request on this model.
fn shape_of(
    cfg: &model::ModelConfig,
    forward_batch: usize,
    batch: usize,
    latent: [usize; 2],
    text_tokens: usize,
) -> ModelShape {
    let p = cfg.patch_size;
    ModelShape {
        layers: cfg.num_layers,
        hidden: cfg.hidden(),
        token_rows: latent[0] / p,
        token_cols: latent[1] / p,
        batch: forward_batch,
        latent_channels: cfg.in_channels,
        latent_batch: batch,
        patch_size: p,
        heads: cfg.num_heads,
        text_tokens,
        prompt_first: cfg.arch == model::Arch::Flux,
    }
}

#[cfg(test)]
mod tests {
    use topology::DeviceSpec;

    #[test]
    fn oversubscription_is_named_only_beyond_the_cores() {
        let cpu = |threads| DeviceSpec::Cpu {
            threads,
            precision: topology::Precision::F32,
        };
        assert_eq!(super::oversubscription(&[cpu(1), cpu(1)], 2), None);
        assert_eq!(
            super::oversubscription(
                &[
                    cpu(8),
                    DeviceSpec::Cuda {
                        ordinal: 0,
                        precision: topology::Precision::F32,
                    }
                ],
                8
            ),
            None
        );
        let said = super::oversubscription(&[cpu(1000), cpu(1)], 2).expect("warned");
        assert!(said.contains("1001 threads in all on 2 cores"), "{said}");
        assert!(said.contains("about 1 thread"), "{said}");
    }
}
