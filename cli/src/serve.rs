//! Requests to a running cluster: the coordinator's node (`pipefuse launch --node <coordinator>
//! --serve`) listens on a Unix socket (a local file with mode 0600: no network port beyond the
//! topology's), and `pipefuse generate --attach SOCKET <flags>` sends it the request flags and
//! prints what the request reports. Protocol: one JSON line `{"args": [...]}` from the client
//! (at most 1 MiB, within 10 s of connecting); then text lines from the server, the last one
//! `exit: 0` or `exit: 1 <error>`. Connections are served side by side (up to
//! [`MAX_CONNECTIONS`]); their requests queue on the cluster in the order they arrive. What a
//! client that goes away cancels: `serve_connection.rs`.

use std::path::Path;
use std::time::Duration;

use actors::Cluster;
use anyhow::{bail, Context, Result};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::serve_connection::serve_connection;

/// Connections served at once; one more is told to try again later and closed.
pub(crate) const MAX_CONNECTIONS: usize = 64;
/// How long stopping waits for the open connections to report their cancelled requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves requests on `socket` until Ctrl-C / SIGTERM (then every open request is cancelled and
/// its client told so), or until a request shows the cluster is broken.
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
    use tokio::signal::unix::{signal, SignalKind};
    // Both made once: a signal between two loop passes is kept, not dropped.
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let (stop, stopping) = watch::channel(false);
    let mut open = FuturesUnordered::new();
    let mut count = 0u64;
    let result = loop {
        tokio::select! {
            _ = interrupt.recv() => break Ok(()),
            _ = term.recv() => break Ok(()),
            Some(broken) = open.next(), if !open.is_empty() => {
                if let Some(broken) = broken {
                    break Err(broken);
                }
            }
            acc = listener.accept() => match acc {
                Ok((stream, _)) if open.len() >= MAX_CONNECTIONS => {
                    tracing::warn!(open = open.len(), "connection refused: too many open");
                    tokio::spawn(refuse(stream));
                }
                Ok((stream, _)) => {
                    count += 1;
                    tracing::debug!(connection = count, open = open.len() + 1, "client connected");
                    open.push(serve_connection(stream, count, cluster, stopping.clone()));
                }
                Err(e) => {
                    // Out of file descriptors, an aborted connection: passing, not a reason to
                    // drop every open request.
                    tracing::warn!(%e, "accepting a connection failed; going on");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    };
    drop(listener);
    let _ = std::fs::remove_file(socket);
    if !open.is_empty() {
        eprintln!(
            "stopping: cancelling {} open request(s) and telling their clients",
            open.len()
        );
        let _ = stop.send(true);
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while open.next().await.is_some() {}
        });
        if drained.await.is_err() {
            tracing::warn!(
                open = open.len(),
                "connections still open after {} s: closed without their last line",
                DRAIN_TIMEOUT.as_secs()
            );
        }
    }
    eprintln!("stopped serving");
    result
}

/// Tells a connection beyond [`MAX_CONNECTIONS`] to come back later.
async fn refuse(mut stream: UnixStream) {
    let line = format!(
        "exit: 1 the server has {MAX_CONNECTIONS} connections open; try again when one ends\n"
    );
    let _ = stream.write_all(line.as_bytes()).await;
}
