//! A device's peer groups: [`model::sp::Collective`] over the device's links, the one exchange
//! mechanism of the runtime. The sequence-parallel ranks of a stage (Ulysses, Ring, USP) form one
//! group; under CFG parallel the two groups' last stages form another, of two members, whose
//! prediction swap is an all-gather.
//!
//! Data path: the compute thread sends its parts straight into the links
//! ([`Link::send`](transport::Link::send); when a bounded link is full it waits on
//! [`Link::send_async`](transport::Link::send_async): back-pressure); the device's inbox router
//! hands each arriving [`FrameLabel::Collective`] frame straight to the group's channel, which the
//! waiting compute thread reads. Neither direction passes through the device actor's mailbox.
//!
//! Matching: every member makes the same calls in the same order, so a call is named by its
//! sequence number in the request; a frame names its group, operation and sequence number, and a
//! member that makes another operation than its peers fails naming both. Parts of later calls
//! wait in a stash; parts of a later request (a peer that began first) wait until this device
//! runs that request; parts of an earlier request are dropped. The device actor ends a wait by
//! sending [`GroupMsg::Cancel`] when the request ends (failure, abort, watchdog).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kernels::Tensor;
use model::sp::{Collective, CollectiveOp};
use model::ModelError;
use transport::{Frame, FrameLabel, Link, PeerGroupKind, TransportError};

use crate::codec;

/// Frames of later requests a group keeps at most (beyond, the request fails instead of growing
/// without bound).
const LATER_FRAMES_MAX: usize = 4096;

/// What reaches a peer group's compute thread.
pub(crate) enum GroupMsg {
    /// A part from another member (routed from the device's inbox).
    Frame(Frame),
    /// Request `request` ended: stop waiting for its parts.
    Cancel { request: u64 },
}

/// Shared by a device's compute thread and its peer groups: the request being computed (set before
/// every item) and the time spent waiting in exchanges (taken after every item).
#[derive(Debug, Default)]
pub(crate) struct ExchangeClock {
    request: AtomicU64,
    waited_ns: AtomicU64,
    /// 1 + the device the compute thread waits for now; 0 when it waits for nobody.
    waiting_for: AtomicU64,
}

impl ExchangeClock {
    /// The compute thread starts an item of `request`.
    pub(crate) fn start_item(&self, request: u64) {
        self.request.store(request, Ordering::Relaxed);
    }

    /// Time waited in exchanges since the last call.
    pub(crate) fn take_waited(&self) -> Duration {
        Duration::from_nanos(self.waited_ns.swap(0, Ordering::Relaxed))
    }

    /// The device the compute thread is waiting for in an exchange, if it is waiting.
    pub(crate) fn waiting_for(&self) -> Option<usize> {
        match self.waiting_for.load(Ordering::Relaxed) {
            0 => None,
            d => Some(d as usize - 1),
        }
    }

    fn wait_for(&self, device: Option<usize>) {
        let code = device.map_or(0, |d| d as u64 + 1);
        self.waiting_for.store(code, Ordering::Relaxed);
    }

    fn add(&self, d: Duration) {
        self.waited_ns
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// Where a group's members are and how to reach them.
pub(crate) struct GroupSpec {
    /// Which group (frames name it).
    pub(crate) kind: PeerGroupKind,
    /// This device's rank in the plan.
    pub(crate) me: usize,
    /// The plan rank of every member, in group order (this device included).
    pub(crate) members: Vec<usize>,
}

/// One member's end of a peer group (see the module documentation).
pub(crate) struct PeerGroup {
    kind: PeerGroupKind,
    me: usize,
    /// This member's position in `members`.
    rank: usize,
    members: Vec<usize>,
    /// The device's links, by plan rank.
    links: Vec<Arc<dyn Link>>,
    runtime: tokio::runtime::Handle,
    inbox: Receiver<GroupMsg>,
    clock: Arc<ExchangeClock>,
    current: u64,
    seq: u64,
    op: CollectiveOp,
    /// Parts of this request's calls, by (sequence number, member position).
    stash: HashMap<(u64, usize), Frame>,
    /// Parts of later requests.
    later: Vec<Frame>,
    /// A part of this request that was refused when it was filed late (reported at the next wait).
    refused: Option<String>,
}

impl PeerGroup {
    /// This device's end of `spec`'s group; returns it with the sender the inbox router and the
    /// actor use. Fails if this device is not a member.
    pub(crate) fn new(
        spec: GroupSpec,
        links: Vec<Arc<dyn Link>>,
        runtime: tokio::runtime::Handle,
        clock: Arc<ExchangeClock>,
    ) -> Result<(PeerGroup, Sender<GroupMsg>), String> {
        let rank = spec
            .members
            .iter()
            .position(|&m| m == spec.me)
            .ok_or_else(|| {
                format!(
                    "device {} is not a member of its {:?} group {:?}",
                    spec.me, spec.kind, spec.members
                )
            })?;
        if let Some(&m) = spec.members.iter().find(|&&m| m >= links.len()) {
            return Err(format!("group member {m} has no link"));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        Ok((
            PeerGroup {
                kind: spec.kind,
                me: spec.me,
                rank,
                members: spec.members,
                links,
                runtime,
                inbox: rx,
                clock,
                current: 0,
                seq: 0,
                op: CollectiveOp::AllToAll,
                stash: HashMap::new(),
                later: Vec::new(),
                refused: None,
            },
            tx,
        ))
    }

    fn fail(&self, message: String) -> ModelError {
        ModelError::Collective {
            rank: self.rank,
            message: format!("{:?} group, device {}: {message}", self.kind, self.me),
        }
    }

    fn label(&self) -> FrameLabel {
        FrameLabel::Collective {
            group: self.kind,
            op: wire_op(self.op),
            seq: self.seq,
        }
    }

    /// Files a frame that arrived while waiting: stashed for this request, kept for a later one,
    /// dropped for an earlier one.
    fn file(&mut self, frame: Frame) -> Result<(), ModelError> {
        let (from, request) = (frame.header.from, frame.header.request);
        if request < self.current {
            return Ok(()); // an earlier request's
        }
        let Some(pos) = self.members.iter().position(|&m| m == from) else {
            return Err(self.fail(format!(
                "a part from device {from}, which is not a member ({:?})",
                self.members
            )));
        };
        if request > self.current {
            if self.later.len() >= LATER_FRAMES_MAX {
                return Err(self.fail(format!(
                    "more than {LATER_FRAMES_MAX} parts of request {request} arrived before this \
                     device runs it"
                )));
            }
            self.later.push(frame);
            return Ok(());
        }
        let FrameLabel::Collective { seq, .. } = frame.header.label else {
            return Err(self.fail(format!(
                "a {} frame routed to a peer group",
                frame.header.label
            )));
        };
        if seq < self.seq || self.stash.contains_key(&(seq, pos)) {
            return Err(self.fail(format!(
                "device {from} sent call {seq} twice (this member is at call {})",
                self.seq
            )));
        }
        self.stash.insert((seq, pos), frame);
        Ok(())
    }

    fn send(&mut self, to: usize, t: Tensor) -> Result<(), ModelError> {
        let device = self.members[to];
        let frame = codec::encode(self.current, self.me, self.label(), &t)
            .map_err(|e| self.fail(e.to_string()))?;
        let link = self.links[device].clone();
        let sent = match link.send(frame) {
            Err(TransportError::Backpressure { frame, .. }) => {
                let t0 = Instant::now();
                self.clock.wait_for(Some(device));
                let r = self.runtime.block_on(link.send_async(*frame));
                self.clock.wait_for(None);
                self.clock.add(t0.elapsed());
                r
            }
            other => other,
        };
        sent.map_err(|e| self.fail(format!("sending to device {device}: {e}")))
    }

    fn receive(&mut self, from: usize) -> Result<Tensor, ModelError> {
        if let Some(why) = self.refused.take() {
            return Err(self.fail(why));
        }
        let t0 = Instant::now();
        self.clock.wait_for(Some(self.members[from]));
        let got = self.wait_for_part(from);
        self.clock.wait_for(None);
        self.clock.add(t0.elapsed());
        let frame = got?;
        let want = self.label();
        if frame.header.label != want {
            return Err(self.fail(format!(
                "device {} sent {} while this member makes {want}: the members' calls diverged",
                self.members[from], frame.header.label
            )));
        }
        codec::decode(&frame).map_err(|e| self.fail(e.to_string()))
    }
}

impl PeerGroup {
    /// Blocks until member `from`'s part of the current call is here.
    fn wait_for_part(&mut self, from: usize) -> Result<Frame, ModelError> {
        loop {
            if let Some(f) = self.stash.remove(&(self.seq, from)) {
                return Ok(f);
            }
            match self.inbox.recv() {
                Ok(GroupMsg::Frame(f)) => self.file(f)?,
                Ok(GroupMsg::Cancel { request }) if request >= self.current => {
                    return Err(self.fail(format!(
                        "the request ended while waiting for device {}",
                        self.members[from]
                    )));
                }
                Ok(GroupMsg::Cancel { .. }) => {}
                Err(_) => return Err(self.fail("the device stopped".into())),
            }
        }
    }
}

/// The transport's name of a model operation.
fn wire_op(op: CollectiveOp) -> transport::CollectiveOp {
    match op {
        CollectiveOp::AllToAll => transport::CollectiveOp::AllToAll,
        CollectiveOp::RingShift => transport::CollectiveOp::RingShift,
        CollectiveOp::AllGather => transport::CollectiveOp::AllGather,
    }
}

impl Collective for PeerGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.members.len()
    }

    fn next_call(&mut self, op: CollectiveOp) {
        let request = self.clock.request.load(Ordering::Relaxed);
        if request != self.current {
            // A new request restarts the numbering; its parts that came early join the stash.
            self.current = request;
            self.seq = 0;
            self.stash.clear();
            self.refused = None;
            for f in std::mem::take(&mut self.later) {
                if let Err(e) = self.file(f) {
                    self.refused.get_or_insert(e.to_string());
                }
            }
        }
        self.seq += 1;
        self.op = op;
    }

    fn send_to(&mut self, to: usize, t: Tensor) -> Result<(), ModelError> {
        self.send(to, t)
    }

    fn receive_from(&mut self, from: usize) -> Result<Tensor, ModelError> {
        self.receive(from)
    }
}

#[cfg(test)]
mod tests;
