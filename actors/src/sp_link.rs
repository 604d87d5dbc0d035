//! Sequence parallelism over the device actors' links: a [`model::sp::Collective`] for a
//! device's compute thread. Parts go out through the device actor
//! ([`DeviceMessage::SpSend`], sent as `FrameKind::SpPart` frames); parts from the other ranks
//! come back from the actor over a channel ([`SpMsg`]). Every rank makes the same collective calls
//! in the same order, so a per-request sequence number matches parts to calls; parts that arrive
//! early wait in a stash. The actor cancels a request's waits when it ends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use kernels::Tensor;
use model::sp::Collective;
use model::ModelError;
use ractor::ActorRef;

use crate::messages::DeviceMessage;

/// What reaches a sequence-parallel rank's compute thread from its device actor.
pub(crate) enum SpMsg {
    /// Rank `from`'s part of collective `op` of `request`.
    Part {
        request: u64,
        op: u64,
        from: usize,
        tensor: Tensor,
    },
    /// Request `request` ended: stop waiting for its parts.
    Cancel { request: u64 },
}

/// One rank's end of a sequence-parallel group (see the module documentation).
pub(crate) struct LinkCollective {
    rank: usize,
    /// Device index of every rank.
    devices: Vec<usize>,
    actor: ActorRef<DeviceMessage>,
    inbox: Receiver<SpMsg>,
    /// The request the compute thread runs (set before every item).
    request: Arc<AtomicU64>,
    current: u64,
    op: u64,
    stash: HashMap<(u64, usize), Tensor>,
}

impl LinkCollective {
    pub(crate) fn new(
        rank: usize,
        devices: Vec<usize>,
        actor: ActorRef<DeviceMessage>,
        inbox: Receiver<SpMsg>,
        request: Arc<AtomicU64>,
    ) -> Self {
        LinkCollective {
            rank,
            devices,
            actor,
            inbox,
            request,
            current: 0,
            op: 0,
            stash: HashMap::new(),
        }
    }

    fn fail(&self, message: String) -> ModelError {
        ModelError::Collective {
            rank: self.rank,
            message,
        }
    }

    /// Starts the next collective call: a new request restarts the numbering.
    fn next_op(&mut self) {
        let request = self.request.load(Ordering::Relaxed);
        if request != self.current {
            self.current = request;
            self.op = 0;
            self.stash.retain(|_, _| false);
        }
        self.op += 1;
    }

    fn send(&self, to_rank: usize, tensor: Tensor) -> Result<(), ModelError> {
        self.actor
            .cast(DeviceMessage::SpSend {
                request: self.current,
                op: self.op,
                to: self.devices[to_rank],
                tensor,
            })
            .map_err(|_| self.fail("the device actor stopped".into()))
    }

    fn receive(&mut self, from: usize) -> Result<Tensor, ModelError> {
        loop {
            if let Some(t) = self.stash.remove(&(self.op, from)) {
                return Ok(t);
            }
            match self.inbox.recv() {
                Ok(SpMsg::Part {
                    request,
                    op,
                    from: src,
                    tensor,
                }) if request == self.current => {
                    self.stash.insert((op, src), tensor);
                }
                Ok(SpMsg::Part { .. }) => {} // an earlier request's
                Ok(SpMsg::Cancel { request }) if request >= self.current => {
                    return Err(self.fail(format!(
                        "the request ended while waiting for rank {from} (device {})",
                        self.devices[from]
                    )))
                }
                Ok(SpMsg::Cancel { .. }) => {}
                Err(_) => return Err(self.fail("the device stopped".into())),
            }
        }
    }
}

impl Collective for LinkCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.devices.len()
    }

    fn next_call(&mut self) {
        self.next_op();
    }

    fn send_to(&mut self, to: usize, t: Tensor) -> Result<(), ModelError> {
        self.send(to, t)
    }

    fn receive_from(&mut self, from: usize) -> Result<Tensor, ModelError> {
        self.receive(from)
    }
}
