//! In-process links: one unbounded channel per device inbox. Used by local (single-process)
//! clusters and by actor tests; no sockets.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::{Frame, Link, TransportError};

/// A device's view of the network: a link to every device (index = peer) and its own inbox.
#[derive(Debug)]
pub struct Endpoint {
    /// This device's index.
    pub me: usize,
    /// `links[peer]`, for every device (the entry for `me` loops back).
    pub links: Vec<Arc<dyn Link>>,
    /// Frames sent to this device.
    pub inbox: UnboundedReceiver<Frame>,
}

/// Builds the endpoints of `devices` in-process devices, fully connected.
#[derive(Debug)]
pub struct MemoryNetwork;

/// A link into an in-process inbox (also the QUIC node's link between its own devices).
#[derive(Debug)]
pub(crate) struct MemoryLink {
    peer: usize,
    tx: UnboundedSender<Frame>,
    sent: AtomicU64,
    messages: AtomicU64,
}

impl MemoryLink {
    /// A link to device `peer`, whose inbox receives from `tx`.
    pub(crate) fn new(peer: usize, tx: UnboundedSender<Frame>) -> Self {
        Self {
            peer,
            tx,
            sent: AtomicU64::new(0),
            messages: AtomicU64::new(0),
        }
    }
}

impl Link for MemoryLink {
    fn peer(&self) -> usize {
        self.peer
    }

    fn send(&self, frame: Frame) -> Result<(), TransportError> {
        let n = frame.wire_len() as u64;
        self.tx.send(frame).map_err(|e| TransportError::PeerGone {
            peer: self.peer,
            frame: Box::new(e.0),
        })?;
        self.sent.fetch_add(n, Ordering::Relaxed);
        self.messages.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    fn messages_sent(&self) -> u64 {
        self.messages.load(Ordering::Relaxed)
    }
}

impl MemoryNetwork {
    /// One endpoint per device.
    pub fn build(devices: usize) -> Vec<Endpoint> {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..devices).map(|_| unbounded_channel()).unzip();
        rxs.into_iter()
            .enumerate()
            .map(|(me, inbox)| Endpoint {
                me,
                links: txs
                    .iter()
                    .enumerate()
                    .map(|(peer, tx)| Arc::new(MemoryLink::new(peer, tx.clone())) as Arc<dyn Link>)
                    .collect(),
                inbox,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FrameHeader, FrameLabel, WireDType};

    fn frame(step: u32) -> Frame {
        Frame {
            header: FrameHeader {
                request: 1,
                from: 0,
                label: FrameLabel::Hidden { step, part: 0 },
                dtype: WireDType::F32,
                shape: vec![2],
            },
            payload: vec![0; 8],
        }
    }

    fn step_of(f: &Frame) -> u32 {
        match f.header.label {
            FrameLabel::Hidden { step, .. } => step,
            other => panic!("not a hidden-state frame: {other}"),
        }
    }

    #[test]
    fn frames_arrive_in_order_and_are_counted() {
        let mut eps = MemoryNetwork::build(2);
        let link = eps[0].links[1].clone();
        for s in 0..3 {
            link.send(frame(s)).unwrap();
        }
        let got: Vec<u32> = (0..3)
            .map(|_| step_of(&eps[1].inbox.try_recv().unwrap()))
            .collect();
        assert_eq!(got, [0, 1, 2]);
        assert_eq!(link.bytes_sent(), 3 * frame(0).wire_len() as u64);
        assert_eq!(link.messages_sent(), 3);
    }

    #[test]
    fn send_to_a_dropped_inbox_hands_the_frame_back() {
        let mut eps = MemoryNetwork::build(2);
        drop(eps.remove(1));
        match eps[0].links[1].send(frame(7)) {
            Err(TransportError::PeerGone { peer: 1, frame }) => assert_eq!(step_of(&frame), 7),
            other => panic!("expected PeerGone, got {other:?}"),
        }
    }

    #[test]
    fn payload_length_is_checked() {
        let mut f = frame(0);
        f.payload.pop();
        assert!(f
            .validate()
            .unwrap_err()
            .to_string()
            .contains("needs 8 payload bytes"));
    }
}
