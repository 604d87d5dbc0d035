//! The pipefuse handshake on a new connection's first bidirectional stream, after mutual TLS:
//!
//! 1. the dialer sends its [`Hello`];
//! 2. the acceptor checks that the dialer's certificate is valid for the name it claims, then its
//!    version, fingerprint and name; on a mismatch it closes the connection with the reason,
//!    otherwise it answers with its own hello;
//! 3. the dialer checks the acceptor's hello the same way and closes with the reason on a
//!    mismatch, otherwise it sends one ack byte.
//!
//! A refusal reaches the other side as the connection's close reason, so both sides report which
//! check failed.

use std::net::SocketAddr;
use std::time::Duration;

use quinn::{ConnectionError, Incoming};
use tokio::time::{timeout_at, Instant};

use super::hello::{short_hex, Hello};
use super::peer::{close_with, peer_close_reason};
use super::{close_code, tls, NodeAddr, NodeInner};
use crate::TransportError;

/// Checks the peer's hello against ours; `expected` says whether a node name may connect here.
fn check_hello(ours: &Hello, theirs: &Hello, expected: &[&str]) -> Result<(), String> {
    if theirs.version != ours.version {
        return Err(format!(
            "other wire version: node {} speaks version {}, node {} speaks version {}",
            theirs.name, theirs.version, ours.name, ours.version
        ));
    }
    if theirs.fingerprint != ours.fingerprint {
        return Err(format!(
            "other topology: node {} has topology fingerprint {}, node {} has {}",
            theirs.name,
            short_hex(&theirs.fingerprint),
            ours.name,
            short_hex(&ours.fingerprint)
        ));
    }
    if !expected.contains(&theirs.name.as_str()) {
        return Err(format!(
            "unexpected node name {:?}: node {} expects {:?} here",
            theirs.name, ours.name, expected
        ));
    }
    Ok(())
}

/// The error for a handshake step that failed with `io`: the peer's refusal if it closed the
/// connection with a reason, otherwise a connection failure (e.g. TLS refused our certificate).
fn step_failed(conn: &quinn::Connection, node: &str, io: impl std::fmt::Display) -> TransportError {
    let addr = conn.remote_address();
    match conn.close_reason() {
        Some(e) if peer_close_reason(&e).is_some() => TransportError::Handshake {
            node: node.to_string(),
            addr,
            message: format!(
                "refused by the peer: {}",
                peer_close_reason(&e).unwrap_or_default()
            ),
        },
        Some(e) => TransportError::Connect {
            node: node.to_string(),
            addr,
            message: format!("the peer ended the connection: {e}"),
        },
        None => TransportError::Connect {
            node: node.to_string(),
            addr,
            message: io.to_string(),
        },
    }
}

/// Refuses: closes the connection with the reason and returns the local error.
fn refuse(conn: &quinn::Connection, ours: &Hello, node: &str, m: String) -> TransportError {
    close_with(
        conn,
        close_code::HANDSHAKE,
        &format!("node {} refuses node {node}: {m}", ours.name),
    );
    TransportError::Handshake {
        node: node.to_string(),
        addr: conn.remote_address(),
        message: m,
    }
}

/// Dials `peer` until it answers (retrying while it is not listening yet), then runs the
/// dialer's side of the handshake.
pub(crate) async fn dial(
    inner: &NodeInner,
    peer: &NodeAddr,
    ours: &Hello,
    deadline: Instant,
    waited: Duration,
) -> Result<quinn::Connection, TransportError> {
    let timeout = || TransportError::JoinTimeout {
        node: peer.name.clone(),
        addr: peer.addr,
        others: Vec::new(),
        waited,
    };
    let connect_err = |message: String| TransportError::Connect {
        node: peer.name.clone(),
        addr: peer.addr,
        message,
    };
    let conn = loop {
        let connecting = inner
            .endpoint
            .connect_with(inner.client.clone(), peer.addr, &peer.name)
            .map_err(|e| connect_err(e.to_string()))?;
        match timeout_at(deadline, connecting).await {
            Err(_) => return Err(timeout()),
            Ok(Ok(conn)) => break conn,
            Ok(Err(ConnectionError::TimedOut)) => {
                tracing::debug!(node = %inner.name, peer = %peer.name, "no answer yet; dialing again");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(Err(e)) => return Err(connect_err(format!("TLS/QUIC handshake failed: {e}"))),
        }
    };
    match timeout_at(deadline, dialer_exchange(&conn, peer, ours)).await {
        Err(_) => {
            close_with(&conn, close_code::HANDSHAKE, "handshake timed out");
            Err(timeout())
        }
        Ok(r) => r.map(|()| conn),
    }
}

async fn dialer_exchange(
    conn: &quinn::Connection,
    peer: &NodeAddr,
    ours: &Hello,
) -> Result<(), TransportError> {
    let name = peer.name.as_str();
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| step_failed(conn, name, e))?;
    send.write_all(&ours.encode())
        .await
        .map_err(|e| step_failed(conn, name, e))?;
    let theirs = match Hello::read(&mut recv).await {
        Ok(h) => h,
        Err(Ok(m)) => return Err(refuse(conn, ours, name, m)),
        Err(Err(io)) => return Err(step_failed(conn, name, io)),
    };
    check_hello(ours, &theirs, &[name]).map_err(|m| refuse(conn, ours, name, m))?;
    send.write_all(&[1])
        .await
        .map_err(|e| step_failed(conn, name, e))?;
    let _ = send.finish();
    Ok(())
}

/// What became of an incoming connection.
pub(crate) enum Accepted {
    /// An expected node completed the handshake.
    Joined {
        /// Its name.
        name: String,
        /// The connection.
        conn: quinn::Connection,
    },
    /// Refused before it proved to be a cluster member (TLS, bad hello, wrong certificate name).
    Refused {
        /// Where it came from.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// A member's handshake failed (other version / topology / name): the join fails.
    Failed(TransportError),
}

/// Runs the acceptor's side for one incoming connection. `expected` are the names allowed to
/// dial this node.
pub(crate) async fn accept(
    incoming: Incoming,
    ours: &Hello,
    expected: &[&str],
    deadline: Instant,
) -> Accepted {
    let addr = incoming.remote_address();
    let refused = |reason: String| Accepted::Refused { addr, reason };
    let conn = match timeout_at(deadline, incoming).await {
        Err(_) => return refused("TLS handshake timed out".into()),
        Ok(Err(e)) => return refused(format!("TLS/QUIC handshake failed: {e}")),
        Ok(Ok(c)) => c,
    };
    match timeout_at(deadline, acceptor_exchange(&conn, ours, expected)).await {
        Err(_) => {
            close_with(&conn, close_code::HANDSHAKE, "handshake timed out");
            refused("handshake timed out".into())
        }
        Ok(Ok(name)) => Accepted::Joined { name, conn },
        Ok(Err(a)) => a,
    }
}

async fn acceptor_exchange(
    conn: &quinn::Connection,
    ours: &Hello,
    expected: &[&str],
) -> Result<String, Accepted> {
    let addr = conn.remote_address();
    let refused = |reason: String| Accepted::Refused { addr, reason };
    let (mut send, mut recv) = conn
        .accept_bi()
        .await
        .map_err(|e| refused(format!("no handshake stream: {e}")))?;
    let theirs = match Hello::read(&mut recv).await {
        Ok(h) => h,
        Err(Ok(m)) => {
            close_with(conn, close_code::HANDSHAKE, &m);
            return Err(refused(m));
        }
        Err(Err(io)) => return Err(refused(format!("reading the hello: {io}"))),
    };
    if let Err(m) = tls::check_peer_name(conn, &theirs.name) {
        close_with(conn, close_code::HANDSHAKE, &m);
        return Err(refused(m));
    }
    let name = theirs.name.clone();
    check_hello(ours, &theirs, expected)
        .map_err(|m| Accepted::Failed(refuse(conn, ours, &name, m)))?;
    let failed = |e: &dyn std::fmt::Display| Accepted::Failed(step_failed(conn, &name, e));
    send.write_all(&ours.encode())
        .await
        .map_err(|e| failed(&e))?;
    let mut ack = [0u8; 1];
    recv.read_exact(&mut ack).await.map_err(|e| failed(&e))?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(name: &str, version: u32, fp: u8) -> Hello {
        Hello {
            version,
            fingerprint: [fp; 32],
            name: name.into(),
        }
    }

    #[test]
    fn hello_checks_say_which_check_failed() {
        let a = hello("a", 1, 0);
        assert!(check_hello(&a, &hello("b", 1, 0), &["b"]).is_ok());
        let m = check_hello(&a, &hello("b", 2, 0), &["b"]).unwrap_err();
        assert!(
            m.contains("other wire version") && m.contains("version 2"),
            "{m}"
        );
        let m = check_hello(&a, &hello("b", 1, 9), &["b"]).unwrap_err();
        assert!(m.contains("other topology"), "{m}");
        let m = check_hello(&a, &hello("c", 1, 0), &["b"]).unwrap_err();
        assert!(m.contains("unexpected node name \"c\""), "{m}");
    }
}
