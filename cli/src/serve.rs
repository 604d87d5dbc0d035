//! Requests to a running cluster: the coordinator's node (`pipefuse launch --node <coordinator>
//! --serve`) listens on a Unix socket (a local file with mode 0600: no network port beyond the
//! topology's), and `pipefuse generate --attach SOCKET <flags>` sends it the request flags and
//! prints what the request reports. Protocol: one JSON line `{"args": [...]}` from the client;
//! then text lines from the server, the last one `exit: 0` or `exit: 1 <error>`.

use std::path::Path;

use actors::Cluster;
use anyhow::{bail, Context, Result};
use clap::Parser;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

use crate::generate::{generate_with, GenerateArgs, Report};

/// The generate flags of one request, as the server parses them.
#[derive(Parser, Debug)]
#[command(name = "generate", no_binary_name = true)]
struct Request {
    #[command(flatten)]
    args: GenerateArgs,
}

/// Messages of a served request, sent to the client connection.
struct Client(UnboundedSender<String>);

impl Report for Client {
    fn line(&self, s: &str) {
        let _ = self.0.send(s.to_string());
    }
    fn step(&self, done: usize, steps: usize) {
        let _ = self.0.send(format!("step {done}/{steps}"));
    }
}

/// Serves requests on `socket` until Ctrl-C / SIGTERM.
pub(crate) async fn serve(cluster: &Cluster, socket: &Path) -> Result<()> {
    if socket.exists() {
        if UnixStream::connect(socket).await.is_ok() {
            bail!("{} is in use by another running cluster", socket.display());
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("removing stale {}", socket.display()))?;
    }
    let listener =
        UnixListener::bind(socket).with_context(|| format!("listening on {}", socket.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    }
    eprintln!(
        "serving requests on {} (pipefuse generate --attach {0} ...)",
        socket.display()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let result = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break Ok(()),
            _ = term.recv() => break Ok(()),
            acc = listener.accept() => match acc {
                Ok((stream, _)) => {
                    tokio::select! {
                        r = handle(stream, cluster) => match r {
                            Ok(None) => {}
                            Ok(Some(broken)) => break Err(broken),
                            Err(e) => tracing::warn!(%e, "client connection failed"),
                        },
                        _ = tokio::signal::ctrl_c() => break Ok(()),
                        _ = term.recv() => break Ok(()),
                    }
                }
                Err(e) => break Err(e.into()),
            },
        }
    };
    let _ = std::fs::remove_file(socket);
    eprintln!("stopped serving");
    result
}

/// Serves one connection; `Some(error)` when the request showed the cluster is broken (a node
/// lost, a device down): then serving stops, so the operator sees it and restarts the cluster.
async fn handle(stream: UnixStream, cluster: &Cluster) -> Result<Option<anyhow::Error>> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(read);
    reader.read_line(&mut line).await?;
    let (tx, mut rx) = unbounded_channel::<String>();
    let writer = tokio::spawn(async move {
        while let Some(l) = rx.recv().await {
            if write.write_all(format!("{l}\n").as_bytes()).await.is_err() {
                break;
            }
        }
    });
    // The client sends nothing after its request: end of input means it went away (Ctrl-C), and
    // its request is cancelled instead of occupying the cluster.
    let outcome = {
        let client = Client(tx.clone());
        let request = run(&line, cluster, &client);
        tokio::pin!(request);
        let mut rest = String::new();
        tokio::select! {
            o = &mut request => o,
            _ = reader.read_line(&mut rest) => {
                cluster.cancel_running("the client disconnected");
                eprintln!("client disconnected: its request is cancelled");
                request.await
            }
        }
    }; // the client's sender is dropped here, so the writer ends after the exit line
    let _ = tx.send(match &outcome {
        Ok(()) => "exit: 0".to_string(),
        Err(e) => format!("exit: 1 {e:#}"),
    });
    drop(tx);
    let _ = writer.await;
    Ok(outcome.err().filter(|e| {
        matches!(
            e.downcast_ref::<actors::ClusterError>(),
            Some(actors::ClusterError::NodeLost { .. } | actors::ClusterError::NotRunning(_))
        ) || e.to_string().contains("was lost")
    }))
}

async fn run(line: &str, cluster: &Cluster, report: &Client) -> Result<()> {
    let v: serde_json::Value =
        serde_json::from_str(line).context("the request is not a JSON line")?;
    let args: Vec<String> = v
        .get("args")
        .and_then(|a| a.as_array())
        .context("the request has no `args` list")?
        .iter()
        .map(|x| {
            x.as_str()
                .map(str::to_string)
                .context("`args` must be strings")
        })
        .collect::<Result<_>>()?;
    let req = Request::try_parse_from(&args).map_err(|e| anyhow::anyhow!("{e}"))?;
    let fixed = req.args.cluster.forwarded();
    if !fixed.is_empty() {
        bail!("{} cannot change a running cluster", fixed.join(" "));
    }
    generate_with(&req.args, cluster, report).await
}
