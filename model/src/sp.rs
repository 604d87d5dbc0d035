//! Sequence parallelism (ALGORITHMS.md section 4): the tokens of an image are cut into shards, one
//! per rank of a group, and every rank runs all of its blocks on its shard; only self-attention
//! needs the other shards. [`SequenceAttention`] is that one step, given a [`Collective`] that
//! moves tensors between the ranks: [`Ulysses`] (all-to-all to head shards and back) and
//! [`Ring`] (key/value blocks travel around the ring, merged by log-sum-exp). Both are exact: the
//! group's output equals the single-device forward to rounding.
//!
//! [`local_group`] is an in-process [`Collective`] over channels (ranks on threads), the
//! reference the tests use; a runtime implements the trait over its links.

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};

use kernels::ulysses::{concat_heads, concat_tokens, split_heads, split_tokens};
use kernels::{AttnView, Device, Tensor};

use crate::error::{ModelError, Result};

/// Self-attention of one rank's token shard over the whole sequence.
pub trait SequenceAttention: Send {
    /// `qkv: [B, n_r, 3 * heads * head_dim]` (fused Q, K, V of this rank's tokens, block `layer`
    /// of the ranks' common slice) -> the attention output of these tokens, `[B, n_r, heads *
    /// head_dim]`, over every rank's keys and values.
    fn attend(
        &mut self,
        dev: &Device,
        layer: usize,
        qkv: &Tensor,
        heads: usize,
        head_dim: usize,
    ) -> Result<Tensor>;
}

/// How the ranks of a sequence-parallel group exchange tensors. Every rank makes the same calls
/// in the same order.
pub trait Collective: Send {
    /// This rank, `0..size`.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn size(&self) -> usize;
    /// Sends `parts[j]` to rank j (`parts[rank]` stays here) and returns the part every rank sent
    /// to this one, in rank order.
    fn all_to_all(&mut self, parts: Vec<Tensor>) -> Result<Vec<Tensor>>;
    /// Sends `t` to rank `rank + 1` (mod size) and returns what rank `rank - 1` sent.
    fn ring_shift(&mut self, t: Tensor) -> Result<Tensor>;
}

/// The all-to-all of a [`Collective`] from its two halves: `send(j, part)` for every other rank,
/// then `receive(j)` in rank order; this rank's own part stays here.
pub fn all_to_all_with(
    rank: usize,
    mut parts: Vec<Tensor>,
    mut send: impl FnMut(usize, Tensor) -> Result<()>,
    mut receive: impl FnMut(usize) -> Result<Tensor>,
) -> Result<Vec<Tensor>> {
    let n = parts.len();
    if rank >= n {
        return Err(ModelError::Collective {
            rank,
            message: format!("{n} parts for a group that has this rank"),
        });
    }
    let own = parts.remove(rank);
    for (j, t) in (0..n).filter(|&j| j != rank).zip(parts) {
        send(j, t)?;
    }
    let mut own = Some(own);
    (0..n)
        .map(|j| match j == rank {
            true => Ok(own.take().expect("once")),
            false => receive(j),
        })
        .collect()
}

/// Ulysses: before attention an all-to-all gives each rank all tokens of `heads / U` heads;
/// after it a second all-to-all returns each rank's tokens. Needs `heads % U == 0`. The ranks'
/// shards may differ in length (it learns them from the first exchange).
pub struct Ulysses<C> {
    comm: C,
}

impl<C: Collective> Ulysses<C> {
    /// Ulysses over `comm`'s ranks; rank r's tokens follow rank r - 1's in the sequence.
    pub fn new(comm: C) -> Self {
        Ulysses { comm }
    }
}

impl<C: Collective> SequenceAttention for Ulysses<C> {
    fn attend(
        &mut self,
        dev: &Device,
        _layer: usize,
        qkv: &Tensor,
        heads: usize,
        head_dim: usize,
    ) -> Result<Tensor> {
        let (u, d) = (self.comm.size(), heads * head_dim);
        let [q, k, v] = [0, 1, 2].map(|i| qkv.narrow(2, i * d, d));
        let (q, k, v) = (
            split_heads(&q?, heads, u)?,
            split_heads(&k?, heads, u)?,
            split_heads(&v?, heads, u)?,
        );
        let parts = (0..u)
            .map(|j| Ok(Tensor::cat(&[&q[j], &k[j], &v[j]], 2)?))
            .collect::<Result<Vec<_>>>()?;
        let got = self.comm.all_to_all(parts)?;
        let shard_lens: Vec<usize> = got.iter().map(|t| t.dim(1)).collect();
        let full = concat_tokens(&got)?; // [B, S, 3d/U]
        let w = d / u;
        let o = dev.attention(
            AttnView::of(&full, 0)?,
            AttnView::of(&full, w)?,
            AttnView::of(&full, 2 * w)?,
            None,
            qkv.dim(0),
            heads / u,
            head_dim,
        )?; // [B, S, d/U]
        let back = self.comm.all_to_all(split_tokens(&o, &shard_lens)?)?;
        Ok(concat_heads(&back)?)
    }
}

/// Ring attention: each rank keeps its queries; its keys and values travel around the ring in
/// R - 1 hops, and each block's attention is merged into the running result by log-sum-exp.
pub struct Ring<C> {
    comm: C,
}

impl<C: Collective> Ring<C> {
    /// A ring over `comm`'s ranks.
    pub fn new(comm: C) -> Self {
        Ring { comm }
    }
}

impl<C: Collective> SequenceAttention for Ring<C> {
    fn attend(
        &mut self,
        dev: &Device,
        _layer: usize,
        qkv: &Tensor,
        heads: usize,
        head_dim: usize,
    ) -> Result<Tensor> {
        let (b, d) = (qkv.dim(0), heads * head_dim);
        let q = AttnView::of(qkv, 0)?;
        let mut block = qkv.narrow(2, d, 2 * d)?; // this rank's [B, n_r, 2d] keys and values
        let attend = |kv: &Tensor| {
            dev.attention_with_lse(
                q,
                AttnView::of(kv, 0)?,
                AttnView::of(kv, d)?,
                None,
                b,
                heads,
                head_dim,
            )
        };
        let (mut acc, mut lse) = attend(&block)?;
        for _ in 1..self.comm.size() {
            block = self.comm.ring_shift(block)?;
            let (part, part_lse) = attend(&block)?;
            dev.merge_attention_(&mut acc, &mut lse, &part, &part_lse, heads)?;
        }
        Ok(acc)
    }
}

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
    left: std::collections::HashSet<usize>,
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

    fn all_to_all(&mut self, parts: Vec<Tensor>) -> Result<Vec<Tensor>> {
        if parts.len() != self.size() {
            return Err(self.fail(format!("{} parts for {} ranks", parts.len(), self.size())));
        }
        self.op += 1;
        let rank = self.rank;
        let this = std::cell::RefCell::new(self);
        all_to_all_with(
            rank,
            parts,
            |j, t| this.borrow().send(j, t),
            |j| this.borrow_mut().receive(j),
        )
    }

    fn ring_shift(&mut self, t: Tensor) -> Result<Tensor> {
        let n = self.size();
        self.op += 1;
        if n == 1 {
            return Ok(t);
        }
        self.send((self.rank + 1) % n, t)?;
        self.receive((self.rank + n - 1) % n)
    }
}
