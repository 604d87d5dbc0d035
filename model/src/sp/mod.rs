//! Sequence parallelism (ALGORITHMS.md section 4): the tokens of an image are cut into shards, one
//! per rank of a group, and every rank runs all of its blocks on its shard; only self-attention
//! needs the other shards. [`SequenceAttention`] is that one step, given a [`Collective`] that
//! moves tensors between the ranks: [`Ulysses`] (all-to-all to head shards and back) and
//! [`Ring`] (key/value blocks travel around the ring, merged by log-sum-exp). Both are exact: the
//! group's output equals the single-device forward to rounding.
//!
//! [`Usp`] combines them (ALGORITHMS.md section 4): Ulysses inside groups of U ranks, Ring across
//! those groups. [`local_group`] is an in-process [`Collective`] over channels (ranks on
//! threads), the reference the tests use; a runtime implements the trait over its links.

mod buffered;
mod local;

pub use local::{local_group, LocalCollective};

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

    /// PipeFusion with sequence parallelism: `qkv` is this rank's sub-strip of a patch; the
    /// patch's keys and values (of this rank's head group) are written into `kv` at the patch's
    /// tokens and this rank's queries attend to the whole buffer (fresh and stale rows). Ulysses,
    /// Ring and USP share one procedure (`buffered.rs`).
    fn attend_with_buffer(
        &mut self,
        _dev: &Device,
        _qkv: &Tensor,
        _heads: usize,
        _head_dim: usize,
        _kv: crate::KvSlot<'_>,
    ) -> Result<Tensor> {
        Err(ModelError::Input(
            "this kind of sequence parallelism does not run inside PipeFusion stages".into(),
        ))
    }

    /// Every rank's `own` tensor, in rank order (an all-gather over the group): how the ranks
    /// of a last stage share the latent rows they updated in a whole-image step.
    fn all_gather(&mut self, _own: Tensor) -> Result<Vec<Tensor>> {
        Err(ModelError::Input(
            "this kind of sequence parallelism has no all-gather".into(),
        ))
    }
}

/// The operation of a collective call (an implementation may put it on the wire, so that a
/// member that makes another call than its peers is caught by name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CollectiveOp {
    /// Each member sends a different tensor to each other member.
    AllToAll,
    /// Each member sends one tensor to the next member of a ring.
    RingShift,
    /// Each member sends the same tensor to every other member.
    AllGather,
}

/// How the ranks of a group exchange tensors (a sequence-parallel group, or the two CFG groups'
/// last stages). Every rank makes the same calls in the same order. An implementation moves
/// single tensors (`send_to`, `receive_from`, matched by the call they belong to); the collectives
/// are built on them here, once.
pub trait Collective: Send {
    /// This rank, `0..size`.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn size(&self) -> usize;
    /// Starts the next collective call, an `op`: what is sent or received until the next one
    /// belongs to it.
    fn next_call(&mut self, op: CollectiveOp);
    /// Sends `t` to rank `to` as part of the current call.
    fn send_to(&mut self, to: usize, t: Tensor) -> Result<()>;
    /// The tensor rank `from` sent this rank in the current call (waiting for it).
    fn receive_from(&mut self, from: usize) -> Result<Tensor>;

    /// Among `members` (ranks, this one included, the same list on each of them): sends
    /// `parts[i]` to `members[i]` (this rank's own part stays here) and returns the part each
    /// member sent to this one, in member order.
    fn all_to_all_in(&mut self, members: &[usize], mut parts: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let rank = self.rank();
        if parts.len() != members.len() {
            return Err(ModelError::Collective {
                rank,
                message: format!("{} parts for {} members", parts.len(), members.len()),
            });
        }
        let me = position_in(rank, members)?;
        self.next_call(CollectiveOp::AllToAll);
        let own = parts.remove(me);
        let others: Vec<usize> = members.iter().copied().filter(|&m| m != rank).collect();
        for (&m, t) in others.iter().zip(parts) {
            self.send_to(m, t)?;
        }
        let mut own = Some(own);
        members
            .iter()
            .map(|&m| match m == rank {
                true => Ok(own.take().expect("once")),
                false => self.receive_from(m),
            })
            .collect()
    }

    /// Among `members` (a ring in list order): sends `t` to the next member and returns what the
    /// previous one sent.
    fn ring_shift_in(&mut self, members: &[usize], t: Tensor) -> Result<Tensor> {
        let (n, i) = (members.len(), position_in(self.rank(), members)?);
        self.next_call(CollectiveOp::RingShift);
        if n == 1 {
            return Ok(t);
        }
        self.send_to(members[(i + 1) % n], t)?;
        self.receive_from(members[(i + n - 1) % n])
    }

    /// Every rank's `t`, in rank order (this rank's own included): each rank sends the same tensor
    /// to every other.
    fn all_gather(&mut self, t: Tensor) -> Result<Vec<Tensor>> {
        let (rank, n) = (self.rank(), self.size());
        self.next_call(CollectiveOp::AllGather);
        for other in (0..n).filter(|&o| o != rank) {
            self.send_to(other, t.clone())?;
        }
        let shape = t.shape().to_vec();
        let mut own = Some(t);
        (0..n)
            .map(|o| match o == rank {
                true => Ok(own.take().expect("once")),
                false => {
                    let got = self.receive_from(o)?;
                    match got.shape() == shape.as_slice() {
                        true => Ok(got),
                        false => Err(ModelError::Collective {
                            rank,
                            message: format!(
                                "rank {o} gathered a part of shape {:?}, this rank's is {shape:?}",
                                got.shape()
                            ),
                        }),
                    }
                }
            })
            .collect()
    }

    /// [`all_to_all_in`](Self::all_to_all_in) over the whole group, in rank order.
    fn all_to_all(&mut self, parts: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let all: Vec<usize> = (0..self.size()).collect();
        self.all_to_all_in(&all, parts)
    }

    /// [`ring_shift_in`](Self::ring_shift_in) over the whole group: to rank + 1, from rank - 1.
    fn ring_shift(&mut self, t: Tensor) -> Result<Tensor> {
        let all: Vec<usize> = (0..self.size()).collect();
        self.ring_shift_in(&all, t)
    }
}

/// This rank's position in `members`, or an error naming both.
pub fn position_in(rank: usize, members: &[usize]) -> Result<usize> {
    members
        .iter()
        .position(|&m| m == rank)
        .ok_or_else(|| ModelError::Collective {
            rank,
            message: format!("this rank is not among the members {members:?}"),
        })
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
        let u = self.comm.size();
        let all: Vec<usize> = (0..u).collect();
        let (full, shard_lens) = gather_heads(&mut self.comm, &all, qkv, heads)?; // [B, S, 3d/U]
        let w = heads * head_dim / u;
        let o = dev.attention(
            AttnView::of(&full, 0)?,
            AttnView::of(&full, w)?,
            AttnView::of(&full, 2 * w)?,
            None,
            qkv.dim(0),
            heads / u,
            head_dim,
        )?; // [B, S, d/U]
        scatter_tokens(&mut self.comm, &all, &o, &shard_lens)
    }

    fn attend_with_buffer(
        &mut self,
        dev: &Device,
        qkv: &Tensor,
        heads: usize,
        head_dim: usize,
        kv: crate::KvSlot<'_>,
    ) -> Result<Tensor> {
        let (all, me) = (
            (0..self.comm.size()).collect::<Vec<_>>(),
            [self.comm.rank()],
        );
        buffered::attend_patch_with_buffer(&mut self.comm, &all, &me, dev, qkv, heads, head_dim, kv)
    }

    fn all_gather(&mut self, own: Tensor) -> Result<Vec<Tensor>> {
        self.comm.all_gather(own)
    }
}

/// Ulysses' first all-to-all among `members`: every member's tokens of this rank's head group,
/// `[B, S_members, 3 d / U]` (Q, K, V side by side), and the members' token counts.
fn gather_heads<C: Collective>(
    comm: &mut C,
    members: &[usize],
    qkv: &Tensor,
    heads: usize,
) -> Result<(Tensor, Vec<usize>)> {
    let (u, d) = (members.len(), qkv.dim(2) / 3);
    let [q, k, v] = [0, 1, 2].map(|i| qkv.narrow(2, i * d, d));
    let (q, k, v) = (
        split_heads(&q?, heads, u)?,
        split_heads(&k?, heads, u)?,
        split_heads(&v?, heads, u)?,
    );
    let parts = (0..u)
        .map(|j| Ok(Tensor::cat(&[&q[j], &k[j], &v[j]], 2)?))
        .collect::<Result<Vec<_>>>()?;
    let got = comm.all_to_all_in(members, parts)?;
    let shard_lens = got.iter().map(|t| t.dim(1)).collect();
    Ok((concat_tokens(&got)?, shard_lens))
}

/// Ulysses' second all-to-all: this rank's head group of every member's tokens goes back to the
/// members; returns this rank's tokens with all heads.
fn scatter_tokens<C: Collective>(
    comm: &mut C,
    members: &[usize],
    o: &Tensor,
    shard_lens: &[usize],
) -> Result<Tensor> {
    let back = comm.all_to_all_in(members, split_tokens(o, shard_lens)?)?;
    Ok(concat_heads(&back)?)
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
        let all: Vec<usize> = (0..self.comm.size()).collect();
        ring_attention(&mut self.comm, &all, dev, qkv, heads, head_dim)
    }

    fn attend_with_buffer(
        &mut self,
        dev: &Device,
        qkv: &Tensor,
        heads: usize,
        head_dim: usize,
        kv: crate::KvSlot<'_>,
    ) -> Result<Tensor> {
        let (me, all) = (
            [self.comm.rank()],
            (0..self.comm.size()).collect::<Vec<_>>(),
        );
        buffered::attend_patch_with_buffer(&mut self.comm, &me, &all, dev, qkv, heads, head_dim, kv)
    }

    fn all_gather(&mut self, own: Tensor) -> Result<Vec<Tensor>> {
        self.comm.all_gather(own)
    }
}

/// Ring attention among `members` (a ring in list order): the queries of `qkv` (`[B, n, 3w]`,
/// Q, K, V side by side for `heads` heads of `head_dim`) against the keys and values of every
/// member, this one's first, then each block passed on from the previous member, merged by
/// log-sum-exp. Returns `[B, n, w]`.
fn ring_attention<C: Collective>(
    comm: &mut C,
    members: &[usize],
    dev: &Device,
    qkv: &Tensor,
    heads: usize,
    head_dim: usize,
) -> Result<Tensor> {
    let (b, w) = (qkv.dim(0), heads * head_dim);
    let q = AttnView::of(qkv, 0)?;
    let attend = |kv: &Tensor| {
        dev.attention_with_lse(
            q,
            AttnView::of(kv, 0)?,
            AttnView::of(kv, w)?,
            None,
            b,
            heads,
            head_dim,
        )
    };
    let mut block = qkv.narrow(2, w, 2 * w)?; // this member's keys and values
    let (mut acc, mut lse) = attend(&block)?;
    for _ in 1..members.len() {
        block = comm.ring_shift_in(members, block)?;
        let (part, part_lse) = attend(&block)?;
        dev.merge_attention_(&mut acc, &mut lse, &part, &part_lse, heads)?;
    }
    Ok(acc)
}

/// USP: ranks `u + U r` (u in 0..U, r in 0..R). Ulysses runs among the U ranks of each r (their
/// tokens, `heads / U` heads each); Ring runs among the R ranks of each u, passing the
/// Ulysses-gathered K/V blocks; a second Ulysses exchange returns each rank's tokens. Needs
/// `heads % U == 0`.
pub struct Usp<C> {
    comm: C,
    ulysses: usize,
}

impl<C: Collective> Usp<C> {
    /// USP over `comm`'s ranks with Ulysses degree `ulysses` (which must divide the group size).
    pub fn new(comm: C, ulysses: usize) -> Result<Self> {
        if ulysses == 0 || comm.size() % ulysses != 0 {
            return Err(ModelError::Collective {
                rank: comm.rank(),
                message: format!(
                    "Ulysses degree {ulysses} does not divide the group of {}",
                    comm.size()
                ),
            });
        }
        Ok(Usp { comm, ulysses })
    }
}

impl<C: Collective> SequenceAttention for Usp<C> {
    fn attend(
        &mut self,
        dev: &Device,
        _layer: usize,
        qkv: &Tensor,
        heads: usize,
        head_dim: usize,
    ) -> Result<Tensor> {
        let (u_deg, (ulysses, ring)) = (self.ulysses, self.row_and_column());
        // Ulysses inside: all tokens of my row of ranks, for my head group.
        let (mine, shard_lens) = gather_heads(&mut self.comm, &ulysses, qkv, heads)?;
        // Ring across rows: my queries against every row's keys/values of my head group.
        let acc = ring_attention(&mut self.comm, &ring, dev, &mine, heads / u_deg, head_dim)?;
        // Ulysses back: my tokens, all heads.
        scatter_tokens(&mut self.comm, &ulysses, &acc, &shard_lens)
    }

    fn attend_with_buffer(
        &mut self,
        dev: &Device,
        qkv: &Tensor,
        heads: usize,
        head_dim: usize,
        kv: crate::KvSlot<'_>,
    ) -> Result<Tensor> {
        let (ulysses, ring) = self.row_and_column();
        buffered::attend_patch_with_buffer(
            &mut self.comm,
            &ulysses,
            &ring,
            dev,
            qkv,
            heads,
            head_dim,
            kv,
        )
    }

    fn all_gather(&mut self, own: Tensor) -> Result<Vec<Tensor>> {
        self.comm.all_gather(own)
    }
}

impl<C: Collective> Usp<C> {
    /// The members of this rank's row (its Ulysses group: `u + U r` for every u) and of its
    /// column (its ring: `u + U k` for every k).
    fn row_and_column(&self) -> (Vec<usize>, Vec<usize>) {
        let (u_deg, rank) = (self.ulysses, self.comm.rank());
        let r_deg = self.comm.size() / u_deg;
        let (u, r) = (rank % u_deg, rank / u_deg);
        (
            (0..u_deg).map(|j| j + u_deg * r).collect(),
            (0..r_deg).map(|k| u + u_deg * k).collect(),
        )
    }
}
