//! The client side of requests to a running cluster: `pipefuse generate --attach SOCKET <flags>`
//! sends the request flags (paths made absolute) to the coordinator's `launch --serve` socket and
//! prints what the request reports (protocol: `serve.rs`).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Flags whose values are paths: the client makes them absolute (the server has another cwd).
const PATH_FLAGS: &[&str] = &["--out", "--save-latent", "--latents", "--prompt-embeds"];

/// The client side: sends `args` (the generate flags, without `--attach`) and prints the reply.
pub(crate) fn attach(socket: &Path, args: Vec<String>) -> Result<()> {
    let cwd = std::env::current_dir()?;
    let abs = |p: &str| -> String {
        let p = PathBuf::from(p);
        if p.is_absolute() { p } else { cwd.join(p) }
            .display()
            .to_string()
    };
    let mut out = Vec::new();
    let mut it = args.into_iter().peekable();
    while let Some(a) = it.next() {
        if let Some((flag, val)) = a.split_once('=').filter(|(f, _)| PATH_FLAGS.contains(f)) {
            out.push(format!("{flag}={}", abs(val)));
        } else if PATH_FLAGS.contains(&a.as_str()) {
            out.push(a);
            if let Some(v) = it.next() {
                out.push(abs(&v));
            }
        } else {
            out.push(a);
        }
    }
    {
        use std::os::unix::fs::FileTypeExt;
        match std::fs::metadata(socket) {
            Ok(m) if !m.file_type().is_socket() => bail!(
                "{} is not a socket (the coordinator's `pipefuse launch --serve` creates it)",
                socket.display()
            ),
            Err(_) => bail!(
                "{} does not exist: is `pipefuse launch --serve` running on this machine?",
                socket.display()
            ),
            Ok(_) => {}
        }
    }
    let mut s = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to {} (is `pipefuse launch --serve` running?)",
            socket.display()
        )
    })?;
    // A server that refuses at once (too many connections) may close before the request is
    // written: its reason, read below, says more than the broken pipe.
    let sent = writeln!(s, "{}", serde_json::json!({ "args": out }));
    for line in BufReader::new(s).lines() {
        let line = match line {
            Ok(line) => line,
            Err(e) => {
                sent.context("sending the request")?;
                return Err(e).context("reading the cluster's reply");
            }
        };
        if let Some(code) = line.strip_prefix("exit: ") {
            return match code.split_once(' ') {
                None if code == "0" => Ok(()),
                Some((_, msg)) => bail!("{msg}"),
                None => bail!("the cluster reported failure"),
            };
        }
        let _ = writeln!(std::io::stderr(), "{line}"); // a closed stderr must not stop the client
    }
    sent.context("sending the request")?;
    bail!("the cluster closed the connection before the request ended")
}
