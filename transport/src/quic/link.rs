//! A link from one local device to one remote device: a bounded queue (frames and bytes) drained
//! by a writer task onto one long-lived unidirectional stream. The payload is handed to quinn as
//! `Bytes` without a copy.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore, TryAcquireError};

use super::wire::{check_encodable, STREAM_FRAMES};
use super::{encode_header, Peer};
use crate::{BoxFuture, Frame, Link, TransportError};

/// A queued frame and the share of the byte budget it holds until written.
struct Queued {
    frame: Frame,
    _bytes: OwnedSemaphorePermit,
}

/// Sent counters, shared by the link and its writer.
#[derive(Debug, Default)]
struct Counters {
    bytes: AtomicU64,
    messages: AtomicU64,
}

/// `from` (local) -> `to` (remote) over the peer node's connection.
pub(crate) struct QuicLink {
    from: usize,
    to: usize,
    peer: Arc<Peer>,
    tx: mpsc::Sender<Queued>,
    budget: Arc<Semaphore>,
    budget_max: usize,
    max_frame_bytes: usize,
    sent: Arc<Counters>,
}

impl std::fmt::Debug for QuicLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicLink")
            .field("from", &self.from)
            .field("to", &self.to)
            .field("node", &self.peer.name)
            .field("sent", &self.sent)
            .finish_non_exhaustive()
    }
}

impl QuicLink {
    /// Creates the link and spawns its writer (the stream opens with the first frame).
    pub(crate) fn spawn(
        from: usize,
        to: usize,
        peer: Arc<Peer>,
        queue_frames: usize,
        queue_bytes: usize,
        max_frame_bytes: usize,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(queue_frames);
        let budget = Arc::new(Semaphore::new(queue_bytes));
        let sent = Arc::new(Counters::default());
        tokio::spawn(write_loop(
            to,
            peer.clone(),
            rx,
            budget.clone(),
            sent.clone(),
        ));
        Arc::new(Self {
            from,
            to,
            peer,
            tx,
            budget,
            budget_max: queue_bytes,
            max_frame_bytes,
            sent,
        })
    }

    fn gone(&self, frame: Frame) -> TransportError {
        TransportError::PeerGone {
            peer: self.to,
            frame: Box::new(frame),
        }
    }

    /// Caller errors, reported before anything is queued.
    fn check(&self, frame: &Frame) -> Result<(), TransportError> {
        if frame.payload.len() > self.max_frame_bytes {
            return Err(TransportError::FrameTooLarge {
                peer: self.to,
                bytes: frame.payload.len(),
                max: self.max_frame_bytes,
            });
        }
        let malformed = |message: String| TransportError::Malformed {
            from: frame.header.from,
            message,
        };
        if frame.header.from != self.from {
            return Err(malformed(format!(
                "frame says it is from device {} but is sent on device {}'s link",
                frame.header.from, self.from
            )));
        }
        check_encodable(&frame.header).map_err(malformed)?;
        frame.validate()
    }

    /// Budget units a frame takes: its size, capped so that any frame fits an empty queue.
    fn cost(&self, frame: &Frame) -> u32 {
        (frame.wire_len().min(self.budget_max)) as u32
    }
}

impl Link for QuicLink {
    fn peer(&self) -> usize {
        self.to
    }

    fn send(&self, frame: Frame) -> Result<(), TransportError> {
        self.check(&frame)?;
        if self.peer.is_lost() {
            return Err(self.gone(frame));
        }
        let permit = match self
            .budget
            .clone()
            .try_acquire_many_owned(self.cost(&frame))
        {
            Ok(p) => p,
            Err(TryAcquireError::NoPermits) => {
                return Err(TransportError::Backpressure {
                    peer: self.to,
                    frame: Box::new(frame),
                })
            }
            Err(TryAcquireError::Closed) => return Err(self.gone(frame)),
        };
        match self.tx.try_send(Queued {
            frame,
            _bytes: permit,
        }) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(q)) => Err(TransportError::Backpressure {
                peer: self.to,
                frame: Box::new(q.frame),
            }),
            Err(TrySendError::Closed(q)) => Err(self.gone(q.frame)),
        }
    }

    fn bytes_sent(&self) -> u64 {
        self.sent.bytes.load(Ordering::Relaxed)
    }

    fn messages_sent(&self) -> u64 {
        self.sent.messages.load(Ordering::Relaxed)
    }

    fn send_async(&self, frame: Frame) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            self.check(&frame)?;
            if self.peer.is_lost() {
                return Err(self.gone(frame));
            }
            let Ok(permit) = self
                .budget
                .clone()
                .acquire_many_owned(self.cost(&frame))
                .await
            else {
                return Err(self.gone(frame));
            };
            self.tx
                .send(Queued {
                    frame,
                    _bytes: permit,
                })
                .await
                .map_err(|e| self.gone(e.0.frame))
        })
    }
}

/// Drains the queue onto one stream until the connection closes or a write fails (which fails
/// the whole connection: a peer is either fully usable or lost). On exit the queue and budget
/// close, so senders get `PeerGone`.
async fn write_loop(
    to: usize,
    peer: Arc<Peer>,
    mut rx: mpsc::Receiver<Queued>,
    budget: Arc<Semaphore>,
    sent: Arc<Counters>,
) {
    let mut stream: Option<quinn::SendStream> = None;
    loop {
        let q = tokio::select! {
            biased;
            _ = peer.conn.closed() => break,
            q = rx.recv() => match q { Some(q) => q, None => break },
        };
        let Queued { frame, _bytes } = q;
        let header = match encode_header(&frame, to) {
            Ok(h) => h,
            Err(m) => {
                // `QuicLink::check` rules this out; never send a frame the peer would refuse.
                tracing::error!(device = to, message = %m, "unencodable frame dropped");
                continue;
            }
        };
        let n = (header.len() + frame.payload.len()) as u64;
        if stream.is_none() {
            match open(&peer).await {
                Ok(s) => stream = Some(s),
                Err(e) => {
                    peer.stream_failed(format!("opening a stream to device {to}: {e}"));
                    break;
                }
            }
        }
        let s = stream.as_mut().expect("opened above");
        let mut chunks = [header, Bytes::from(frame.payload)];
        if let Err(e) = s.write_all_chunks(&mut chunks).await {
            peer.stream_failed(format!("writing to device {to}: {e}"));
            break;
        }
        sent.bytes.fetch_add(n, Ordering::Relaxed);
        sent.messages.fetch_add(1, Ordering::Relaxed);
    }
    budget.close();
    rx.close();
}

/// Opens a frame stream: a new unidirectional stream and its kind byte.
async fn open(peer: &Peer) -> Result<quinn::SendStream, String> {
    let mut s = peer.conn.open_uni().await.map_err(|e| e.to_string())?;
    s.write_all(&[STREAM_FRAMES])
        .await
        .map_err(|e| e.to_string())?;
    Ok(s)
}
