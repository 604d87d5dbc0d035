//! The command-line side of the HTTP server: `pipefuse serve`'s flags, the HTTP flags it shares
//! with `launch --serve --listen`, and `serve`'s run (start an in-process cluster, serve it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actors::Cluster;
use anyhow::{bail, Context, Result};
use clap::Args;

use crate::cluster_args::ClusterArgs;

/// Where `serve` listens when `--listen` is not given.
const DEFAULT_LISTEN: &str = "127.0.0.1:8000";

/// The HTTP server's flags (`pipefuse serve`, and `launch --serve` with `--listen`).
#[derive(Args, Debug, Clone)]
pub(crate) struct HttpArgs {
    /// HTTP address and port to listen on [serve's default: 127.0.0.1:8000; `launch --serve`
    /// listens on its Unix socket unless this is given]. Anything but a loopback address needs
    /// --api-key.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,
    /// Key clients must send as `Authorization: Bearer KEY` on /v1 and /metrics (also from the
    /// environment variable PIPEFUSE_API_KEY). Required to listen beyond loopback.
    #[arg(
        long,
        value_name = "KEY",
        env = "PIPEFUSE_API_KEY",
        hide_env_values = true
    )]
    api_key: Option<String>,
    /// Requests that may wait for the cluster (beyond the running one); more are answered 429
    /// with Retry-After at once.
    #[arg(long, value_name = "N", default_value_t = 16)]
    max_queue: usize,
    /// Requests one user (the request's `user`, else the client's address) may have waiting; more
    /// are answered 429 [default: --max-queue, no cap of its own].
    #[arg(long, value_name = "N")]
    max_queue_per_user: Option<usize>,
    /// Seconds a request may take from its arrival, waiting included, before it fails with 504
    /// (a request's `timeout` field may ask for less).
    #[arg(long, value_name = "SECS", default_value_t = 600.0)]
    request_timeout: f64,
    /// On SIGTERM / Ctrl-C: seconds to let admitted requests finish before cancelling them.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    drain_timeout: f64,
}

/// The HTTP flags, checked.
#[derive(Debug, Clone)]
pub(crate) struct HttpConfig {
    pub(crate) listen: SocketAddr,
    pub(crate) api_key: Option<String>,
    pub(crate) max_queue: usize,
    pub(crate) per_user: usize,
    pub(crate) request_timeout: Duration,
    pub(crate) drain_timeout: Duration,
}

impl HttpArgs {
    /// Whether `--listen` was given (`launch --serve` then serves HTTP).
    pub(crate) fn listens(&self) -> bool {
        self.listen.is_some()
    }

    /// The checked flags; errors name the flag.
    pub(crate) fn config(&self) -> Result<HttpConfig> {
        let listen = self
            .listen
            .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("a valid address"));
        if !listen.ip().is_loopback() && self.api_key.is_none() {
            bail!(
                "--listen {listen}: listening beyond loopback needs --api-key KEY (or \
                 PIPEFUSE_API_KEY), so that only clients holding the key use the cluster"
            );
        }
        if self.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
            bail!("--api-key: the key is empty");
        }
        if self.max_queue == 0 {
            bail!("--max-queue 0: at least 1 request must be able to wait");
        }
        let per_user = self.max_queue_per_user.unwrap_or(self.max_queue);
        if per_user == 0 {
            bail!("--max-queue-per-user 0: at least 1 request of each user must be able to wait");
        }
        Ok(HttpConfig {
            listen,
            api_key: self.api_key.clone(),
            max_queue: self.max_queue,
            per_user,
            request_timeout: secs(self.request_timeout, "--request-timeout")?,
            drain_timeout: secs(self.drain_timeout, "--drain-timeout")?,
        })
    }
}

/// Arguments of `pipefuse serve`.
#[derive(Args, Debug)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(flatten)]
    http: HttpArgs,
    /// Seconds a stage may wait for its next input before the request fails.
    #[arg(long, value_name = "SECS", default_value_t = 600.0)]
    stall_timeout: f64,
    /// Seconds one patch may compute on a device before the request fails naming the device.
    #[arg(long, value_name = "SECS", default_value_t = 300.0)]
    compute_timeout: f64,
}

/// A positive number of seconds, at most a year.
pub(crate) fn secs(v: f64, flag: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| !d.is_zero() && d.as_secs() <= 366 * 86_400)
        .with_context(|| {
            format!("{flag} {v}: must be a positive number of seconds, at most a year")
        })
}

/// Binds the HTTP listener (before the model loads, so a taken port is reported at once).
pub(crate) async fn bind(config: &HttpConfig) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("--listen {}: cannot listen", config.listen))
}

/// `pipefuse serve`: an in-process cluster from the cluster flags, served over HTTP.
pub(crate) fn run(a: ServeArgs) -> Result<()> {
    let config = a.http.config()?;
    let options = actors::ClusterOptions {
        stall_timeout: secs(a.stall_timeout, "--stall-timeout")?,
        compute_timeout: secs(a.compute_timeout, "--compute-timeout")?,
        ..actors::ClusterOptions::default() // one process: no node to lose
    };
    let spec = a.cluster.spec()?;
    let model_id = model_id(&spec);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = bind(&config).await?;
        let t0 = Instant::now();
        let cluster = Arc::new(Cluster::start(spec, options).await?);
        tracing::info!(secs = t0.elapsed().as_secs_f32(), "cluster started");
        super::serve_on(listener, cluster, config, model_id).await
    })
}

/// The name the API serves the model under: its folder's name, or the preset's.
pub(crate) fn model_id(spec: &topology::ClusterSpec) -> String {
    match &spec.model {
        topology::ModelSpec::Path(dir) => std::fs::canonicalize(dir)
            .unwrap_or_else(|_| dir.clone())
            .file_name()
            .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned()),
        topology::ModelSpec::Preset { name, .. } => name.clone(),
    }
}
