//! An in-process [`Collective`]: ranks on threads exchanging tensors over channels.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{channel, Receiver, Sender};

use kernels::Tensor;

use super::{Collective, CollectiveOp};
use crate::error::{ModelError, Result};

/// A message between in-process ranks: (operation, sender, tensor); `None` says the sender left.
type Message = (u64, usize, Option<Tensor>);

/// One rank of an in-process group made by [`local_group`]. Dropping it (a rank that failed)
/// tells the others, whose waits then fail naming it instead of hanging.
pub struct LocalCollective {
    rank: usize,
    peers: Vec<Sender<Message>>,
    inbox: Receiver<Message>,
    /// Messages that arrived for a later operation than the one waited for.
    stash: HashMap<(u64, usize), Tensor>,
    /// Ranks that have left the group.
    left: HashSet<usize>,
    op: u64,
}

/// `size` connected ranks exchanging tensors over channels (move each to its own thread).
pub fn local_group(size: usize) -> Vec<LocalCollective> {
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..size).map(|_| channel()).unzip();
    rxs.into_iter()
        .enumerate()
        .map(|(rank, inbox)| LocalCollective {
            rank,
            peers: txs.clone(),
            inbox,
            stash: HashMap::new(),
            left: Default::default(),
            op: 0,
        })
        .collect()
}

impl LocalCollective {
    fn fail(&self, message: String) -> ModelError {
        ModelError::Collective {
            rank: self.rank,
            message,
        }
    }

    fn send(&self, to: usize, t: Tensor) -> Result<()> {
        self.peers[to]
            .send((self.op, self.rank, Some(t)))
            .map_err(|_| self.fail(format!("rank {to} left the group")))
    }

    fn receive(&mut self, from: usize) -> Result<Tensor> {
        loop {
            if let Some(t) = self.stash.remove(&(self.op, from)) {
                return Ok(t);
            }
            // A rank that left has sent everything it ever will before saying so.
            if self.left.contains(&from) {
                return Err(self.fail(format!("rank {from} left the group")));
            }
            let (op, src, t) = self
                .inbox
                .recv()
                .map_err(|_| self.fail(format!("rank {from} left the group")))?;
            match t {
                Some(t) => {
                    self.stash.insert((op, src), t);
                }
                None => {
                    self.left.insert(src);
                }
            }
        }
    }
}

impl Drop for LocalCollective {
    fn drop(&mut self) {
        for (j, peer) in self.peers.iter().enumerate() {
            if j != self.rank {
                let _ = peer.send((u64::MAX, self.rank, None));
            }
        }
    }
}

impl Collective for LocalCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.peers.len()
    }

    fn next_call(&mut self, _op: CollectiveOp) {
        self.op += 1;
    }

    fn send_to(&mut self, to: usize, t: Tensor) -> Result<()> {
        self.send(to, t)
    }

    fn receive_from(&mut self, from: usize) -> Result<Tensor> {
        self.receive(from)
    }
}
