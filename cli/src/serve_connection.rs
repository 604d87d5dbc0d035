//! One client of the `--serve` socket (protocol: `serve.rs`): its request line read within
//! bounds, its request run on the cluster, its progress written back, and what happens when the
//! client goes away.
//!
//! **Cancellation rule** (deterministic, and the log says which case happened): a client that
//! *closes* its connection (its process exits or is killed) cancels its request: one not yet
//! queued never runs, a queued one is dropped, a running one is aborted on every device. A client
//! that only shuts down its sending side (a half-close, as `socat` or `nc -N` do after the
//! request line) keeps its request and gets every line. The close is seen within
//! [`HANGUP_POLL`], or at the first line that cannot be written.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actors::{Cluster, ClusterError};
use anyhow::{bail, Context, Result};
use clap::Parser;
use tokio::io::Interest;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::watch;

use crate::generate::{generate_with, GenerateArgs, Report};

/// The longest request line taken (the generate flags as JSON: a few KiB in practice).
pub(crate) const MAX_REQUEST_LINE: usize = 1 << 20;
/// How long a client may take to send its request line after connecting.
pub(crate) const REQUEST_LINE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a served request checks whether its client closed the connection.
pub(crate) const HANGUP_POLL: Duration = Duration::from_millis(200);

/// The generate flags of one request, as the server parses them.
#[derive(Parser, Debug)]
#[command(name = "generate", no_binary_name = true)]
struct Request {
    #[command(flatten)]
    args: GenerateArgs,
}

/// Messages of a served request, sent to the client connection, and the request's id once the
/// cluster has queued it.
struct Client {
    lines: UnboundedSender<String>,
    queued: Arc<Mutex<Option<u64>>>,
}

impl Report for Client {
    fn line(&self, s: &str) {
        let _ = self.lines.send(s.to_string());
    }
    fn submitted(&self, id: u64) {
        *self.queued.lock().unwrap_or_else(|e| e.into_inner()) = Some(id);
    }
    fn step(&self, done: usize, steps: usize) {
        let _ = self.lines.send(format!("step {done}/{steps}"));
    }
}

/// Serves connection `n`; returns the error of a request that showed a one-process cluster
/// broken (a device down): then serving stops, so the operator sees it and restarts the
/// cluster (a multi-node cluster resumes on the remaining nodes and takes lost ones back). `stopping` turns true when the server stops: the request is cancelled and its client
/// told so.
pub(crate) async fn serve_connection(
    stream: UnixStream,
    n: u64,
    cluster: &Cluster,
    mut stopping: watch::Receiver<bool>,
) -> Option<anyhow::Error> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    // A client still silent when the server stops is told so at once (it would otherwise hold
    // the drain until its line's timeout).
    let read = tokio::select! {
        r = read_request_line(&mut reader) => r,
        _ = stopping.wait_for(|&s| s) => Err("the server is stopping".to_string()),
    };
    let line = match read {
        Ok(Some(line)) => line,
        Ok(None) => {
            tracing::debug!(connection = n, "closed before sending a request");
            return None;
        }
        Err(reason) => {
            tracing::warn!(connection = n, "request refused: {reason}");
            let _ = write
                .write_all(format!("exit: 1 {reason}\n").as_bytes())
                .await;
            return None;
        }
    };
    let (tx, rx) = unbounded_channel::<String>();
    let mut writer = tokio::spawn(write_lines(write, rx));
    let queued = Arc::new(Mutex::new(None));
    let client = Client {
        lines: tx.clone(),
        queued: queued.clone(),
    };
    let mut poll = tokio::time::interval(HANGUP_POLL);
    let mut ended_by: Option<&str> = None; // why this request was cancelled, once it was
    let mut request = Box::pin(run(&line, cluster, &client));
    let outcome = loop {
        let cause = tokio::select! {
            o = &mut request => break o,
            _ = poll.tick(), if ended_by.is_none() => {
                if !closed(reader.get_ref()).await {
                    continue;
                }
                "the client closed the connection"
            }
            _ = &mut writer, if ended_by.is_none() => "the client stopped reading (a reply could not be written)",
            _ = stopping.changed(), if ended_by.is_none() => "the server is stopping",
        };
        ended_by = Some(cause);
        let id = *queued.lock().unwrap_or_else(|e| e.into_inner());
        match id {
            // Not queued yet: dropping the request's future means it never will be.
            None => {
                eprintln!(
                    "connection {n}: {cause}; its request was not queued yet and does not run"
                );
                break Err(anyhow::anyhow!("cancelled before it was queued: {cause}"));
            }
            Some(id) => cluster.cancel(id, cause),
        }
    };
    drop(request);
    let id = *queued.lock().unwrap_or_else(|e| e.into_inner());
    if let (Some(cause), Some(id)) = (ended_by, id) {
        // What happened, as it happened: the request may have ended before the cancel arrived.
        match &outcome {
            Ok(()) => eprintln!("request {id}: {cause}, but it had already finished"),
            Err(e) if cancelled(e) => eprintln!("request {id} cancelled: {cause}"),
            Err(e) => eprintln!("request {id}: {cause}; it ended with: {e:#}"),
        }
    }
    let _ = tx.send(match &outcome {
        Ok(()) => "exit: 0".to_string(),
        Err(e) => format!("exit: 1 {e:#}"),
    });
    drop((tx, client)); // the writer ends after the exit line
    if !writer.is_finished() {
        let _ = writer.await;
    }
    // A multi-node cluster takes a lost node back when it returns: serving goes on.
    let mends = cluster.spec().nodes.len() > 1;
    outcome.err().filter(|e| {
        !mends
            && (matches!(
                e.downcast_ref::<ClusterError>(),
                Some(ClusterError::NodeLost { .. } | ClusterError::NotRunning(_))
            ) || e.to_string().contains("was lost"))
    })
}

/// Reads the request line: `None` when the client closed without sending anything; `Err` (the
/// reason, sent back as `exit: 1 <reason>`) for a line that is too long, not UTF-8, or late.
async fn read_request_line(
    reader: &mut BufReader<OwnedReadHalf>,
) -> std::result::Result<Option<String>, String> {
    let mut bytes = Vec::new();
    let limit = MAX_REQUEST_LINE as u64 + 1;
    let mut bounded = (&mut *reader).take(limit);
    let read = bounded.read_until(b'\n', &mut bytes);
    match tokio::time::timeout(REQUEST_LINE_TIMEOUT, read).await {
        Err(_) => {
            return Err(format!(
                "no request line within {} s of connecting",
                REQUEST_LINE_TIMEOUT.as_secs()
            ))
        }
        Ok(Err(e)) => return Err(format!("reading the request line: {e}")),
        Ok(Ok(0)) => return Ok(None),
        Ok(Ok(_)) => {}
    }
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
    } else if bytes.len() > MAX_REQUEST_LINE {
        return Err(format!(
            "the request line is longer than {} MiB",
            MAX_REQUEST_LINE >> 20
        ));
    } // else: the client half-closed after a line without its newline; it is the request
    String::from_utf8(bytes).map(Some).map_err(|e| {
        format!(
            "the request line is not UTF-8 (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })
}

/// Whether the client closed its connection (not only its sending side): the socket reports a
/// hang-up, which a half-close does not.
async fn closed(read: &OwnedReadHalf) -> bool {
    let ready = tokio::time::timeout(Duration::ZERO, read.ready(Interest::WRITABLE)).await;
    matches!(ready, Ok(Ok(r)) if r.is_write_closed())
}

/// Writes each line to the client; returns when the lines end or a write fails (the client is
/// gone or stopped reading).
async fn write_lines(mut write: OwnedWriteHalf, mut lines: UnboundedReceiver<String>) {
    while let Some(l) = lines.recv().await {
        if write.write_all(format!("{l}\n").as_bytes()).await.is_err() {
            return;
        }
    }
}

fn cancelled(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<ClusterError>(),
        Some(ClusterError::Cancelled { .. })
    )
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
