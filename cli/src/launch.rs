//! `pipefuse launch`: one node of a multi-node cluster (`--node NAME`), or every node of the
//! topology as its own process on this machine (`--local`). The coordinator's node runs the
//! request given by the `generate` flags, prints the result, and closes the cluster; the other
//! nodes serve until the coordinator's node closes.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actors::Node;
use anyhow::{bail, Context, Result};
use clap::Args;
use transport::QuicOptions;

use crate::generate::{generate, GenerateArgs};

/// Arguments of `pipefuse launch`.
#[derive(Args, Debug)]
pub(crate) struct LaunchArgs {
    /// The node of the topology this process runs.
    #[arg(long, value_name = "NAME", conflicts_with = "local")]
    node: Option<String>,
    /// Start every node of the topology as its own process on this machine, run the request on
    /// the coordinator's node, then stop them all.
    #[arg(long)]
    local: bool,
    /// Coordinator's node (or a one-node topology): after starting, serve requests until
    /// Ctrl-C / SIGTERM instead of running one request from these flags: over HTTP (OpenAI's
    /// images API, as `pipefuse serve`) when --listen is given, else from
    /// `pipefuse generate --attach SOCKET`.
    #[arg(long)]
    serve: bool,
    /// The Unix socket `--serve` listens on [default: the topology file's path + `.sock`].
    #[arg(long, value_name = "PATH")]
    socket: Option<std::path::PathBuf>,
    /// Seconds to wait for every node to connect (at least 1).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    join_timeout: u64,
    /// Seconds without a packet after which a node counts as lost.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    node_timeout: f64,
    #[command(flatten)]
    generate: GenerateArgs,
    #[command(flatten)]
    http: crate::http::HttpArgs,
}

fn quic_options(a: &LaunchArgs) -> Result<QuicOptions> {
    let idle = Duration::try_from_secs_f64(a.node_timeout)
        .ok()
        .filter(|d| *d >= Duration::from_millis(100))
        .context("--node-timeout must be at least 0.1 s")?;
    Ok(QuicOptions {
        join_timeout: Duration::from_secs(a.join_timeout),
        idle_timeout: idle,
        keep_alive: idle / 4,
        ..QuicOptions::default()
    })
}

/// Child processes that are killed (and waited for) if they are still running when this guard
/// is dropped: no node outlives `launch --local`, whatever path it leaves by.
struct Children(Vec<(String, Child)>);

impl Children {
    /// Kills the children that are still running.
    fn stop_running(&mut self) {
        for (name, c) in &mut self.0 {
            if let Ok(None) = c.try_wait() {
                tracing::warn!(node = %name, "stopping a node that is still running");
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop_running();
    }
}

/// Starts the other nodes as child processes of this binary.
fn spawn_children(a: &LaunchArgs, names: &[String]) -> Result<Children> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let mut children = Children(Vec::new());
    for n in names {
        let mut cmd = Command::new(&exe);
        cmd.arg("launch").arg("--node").arg(n);
        cmd.args(a.generate.cluster.forwarded());
        cmd.args(a.generate.forwarded_timeouts());
        cmd.args(["--join-timeout", &a.join_timeout.to_string()]);
        cmd.args(["--node-timeout", &a.node_timeout.to_string()]);
        cmd.stdin(Stdio::null());
        let child = cmd.spawn().with_context(|| format!("starting node {n}"))?;
        children.0.push((n.clone(), child));
    }
    Ok(children)
}

/// Resolves when one of `children` exits: its name and status. Raced against joining, so a node
/// that fails at once (a port in use, an unreadable file) is reported then, not after the whole
/// join timeout. Pending forever when there are no children.
async fn first_child_exit(children: &mut Children) -> (String, std::process::ExitStatus) {
    loop {
        for (name, c) in &mut children.0 {
            if let Ok(Some(status)) = c.try_wait() {
                return (name.clone(), status);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits up to `limit` for the children to exit after the coordinator closed, then kills them.
fn reap(mut children: Children, limit: Duration) -> Result<()> {
    let t0 = Instant::now();
    let mut failed = Vec::new();
    for (name, mut c) in std::mem::take(&mut children.0) {
        loop {
            match c.try_wait()? {
                Some(status) => {
                    if !status.success() {
                        failed.push(format!("{name} ({status})"));
                    }
                    break;
                }
                None if t0.elapsed() > limit => {
                    let _ = c.kill();
                    let _ = c.wait();
                    failed.push(format!("{name} (did not stop; killed)"));
                    break;
                }
                None => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
    if !failed.is_empty() {
        bail!("node(s) ended badly: {}", failed.join(", "));
    }
    Ok(())
}

/// The socket `--serve` listens on: `--socket`, else the topology file's path + `.sock`.
fn socket_path(a: &LaunchArgs) -> std::path::PathBuf {
    a.socket.clone().unwrap_or_else(|| {
        let topo = a
            .generate
            .cluster
            .topology()
            .expect("launch has a topology");
        let mut s = topo.as_os_str().to_owned();
        s.push(".sock");
        s.into()
    })
}

/// `launch --serve` of a one-node topology: the cluster runs in this process.
fn serve_single_node(a: &LaunchArgs, spec: topology::ClusterSpec) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        if a.http.listens() {
            let config = a.http.config()?;
            let listener = crate::http::bind(&config).await?;
            let model_id = crate::http::model_id(&spec);
            let cluster = actors::Cluster::start(spec, a.generate.options()?).await?;
            return crate::http::serve_on(listener, Arc::new(cluster), config, model_id).await;
        }
        let cluster = actors::Cluster::start(spec, a.generate.options()?).await?;
        let r = crate::serve::serve(&cluster, &socket_path(a)).await;
        cluster.shutdown().await;
        r
    })
}

pub(crate) fn run(a: LaunchArgs) -> Result<()> {
    if a.generate.cluster.topology().is_none() {
        bail!("launch needs --topology FILE (the same file on every node)");
    }
    if a.join_timeout == 0 {
        bail!("--join-timeout 0: the nodes need at least 1 s to connect");
    }
    let spec = a.generate.cluster.spec()?;
    let request_flags = a.generate.request_flags();
    // A non-coordinator node is told that first (below): it runs no requests at all.
    let non_coordinator = a.node.as_ref().is_some_and(|n| *n != spec.coordinator);
    if a.serve && !request_flags.is_empty() && !non_coordinator {
        bail!(
            "{}: --serve takes its requests from `generate --attach` clients, so these flags would be ignored (give them to the client, or drop --serve to run one request)",
            request_flags.join(" ")
        );
    }
    if a.http.listens() && !a.serve {
        bail!("--listen: only with --serve (the server's HTTP address)");
    }
    if a.http.listens() && a.socket.is_some() {
        bail!("--socket and --listen: --serve listens on one of them (HTTP with --listen)");
    }
    // Checked before any node starts.
    let http = if a.serve && a.http.listens() && !non_coordinator {
        Some(a.http.config()?)
    } else {
        None
    };
    if spec.nodes.len() == 1 {
        if a.serve {
            return serve_single_node(&a, spec);
        }
        bail!(
            "{} has a single node: run it with `pipefuse generate --topology FILE`, or serve it with `pipefuse launch --serve --topology FILE` (launch is otherwise for clusters of several nodes)",
            spec.file
        );
    }
    let me = match (&a.node, a.local) {
        (Some(n), false) => n.clone(),
        (None, true) => spec.coordinator.clone(),
        _ => bail!("give --node NAME (this process is that node) or --local (every node here)"),
    };
    if me != spec.coordinator {
        let mut ignored = request_flags;
        if a.serve {
            ignored.push("--serve");
        }
        if a.socket.is_some() {
            ignored.push("--socket");
        }
        if a.http.listens() {
            ignored.push("--listen");
        }
        if !ignored.is_empty() {
            bail!(
                "{}: node {me} is not the coordinator ({}), and only the coordinator's node runs requests (give these flags to `launch --node {1}`)",
                ignored.join(" "),
                spec.coordinator
            );
        }
    }
    // The layout against the model, once, before any process starts: a mistake is reported here
    // instead of by every node.
    let model = actors::ModelSource::from_spec(&spec)?;
    actors::startup_plan(&spec, &model.config)?;
    // Certificates of every node this command starts, likewise checked once.
    let here: Vec<&str> = match (&a.node, a.local) {
        (_, true) => spec.nodes.iter().map(|n| n.name.as_str()).collect(),
        (Some(n), false) => vec![n.as_str()],
        (None, false) => Vec::new(),
    };
    for n in here {
        actors::node_identity(&spec, n)?;
    }
    let mut children = if a.local {
        let others: Vec<String> = spec
            .nodes
            .iter()
            .map(|n| n.name.clone())
            .filter(|n| *n != me)
            .collect();
        spawn_children(&a, &others)?
    } else {
        Children(Vec::new())
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        // Bound before the nodes connect: a taken port is reported at once.
        let listener = match &http {
            Some(config) => Some(crate::http::bind(config).await?),
            None => None,
        };
        let start = Node::start(spec.clone(), &me, a.generate.options()?, quic_options(&a)?);
        let mut node = tokio::select! {
            node = start => node.with_context(|| format!("node {me}"))?,
            (name, status) = first_child_exit(&mut children) => {
                children.stop_running(); // they would wait the whole join timeout for it
                bail!("node {name} ({status}) ended before the cluster formed; its error is above")
            }
        };
        if let (Some(listener), Some(config)) = (listener, http) {
            let cluster = node
                .take_cluster()
                .context("the coordinator's node has no cluster")?;
            eprintln!(
                "node {me}: coordinator; all {} nodes connected",
                spec.nodes.len()
            );
            let model_id = crate::http::model_id(&spec);
            let r = crate::http::serve_on(listener, Arc::new(cluster), config, model_id).await;
            node.shutdown().await;
            return r;
        }
        match node.cluster() {
            Some(cluster) => {
                eprintln!(
                    "node {me}: coordinator; all {} nodes connected",
                    spec.nodes.len()
                );
                let r = if a.serve {
                    crate::serve::serve(cluster, &socket_path(&a)).await
                } else {
                    generate(&a.generate, cluster).await
                };
                node.shutdown().await;
                r
            }
            None => {
                eprintln!(
                    "node {me}: serving until the coordinator ({}) closes",
                    spec.coordinator
                );
                Ok(node.serve().await?)
            }
        }
    });
    drop(rt);
    let reaped = reap(children, Duration::from_secs(10));
    result?;
    reaped
}
