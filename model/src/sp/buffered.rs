//! PipeFusion inside a sequence-parallel group (ALGORITHMS.md section 4, "With PipeFusion"), one
//! procedure for Ulysses, Ring and USP: every rank holds its sub-strip of a patch (or its shard of
//! the image in a whole-image step); the patch's keys and values of the rank's head group reach
//! every rank (a Ulysses all-to-all among its row of ranks, then the rows' blocks passed around the
//! ring); the rank writes them into its K/V buffer at the patch's tokens and its queries attend to
//! the whole buffer: fresh rows of this step's patches, one step stale rows of the others, exactly
//! as one PipeFusion stage does. A Ulysses all-to-all returns each rank's tokens.
//!
//! Every rank keeps the buffer of the whole sequence for its head group (`1 / U` of the heads):
//! the attention over the buffer is then local and equals plain PipeFusion's (no log-sum-exp
//! merge of partial results), at the memory of a plain PipeFusion stage divided by U, not by U x R.
//! The ring carries the patch's fresh K/V (what pure Ring carries per step), not the buffers.

use kernels::{AttnView, Device, Tensor};

use super::{gather_heads, position_in, scatter_tokens, Collective};
use crate::error::Result;
use crate::KvSlot;

/// The procedure of the module documentation for `qkv: [B, n, 3 * heads * head_dim]` (this rank's
/// tokens), with `ulysses` the members of this rank's row (Ulysses) and `ring` those of its column
/// (Ring), both in order and both containing this rank. Returns `[B, n, heads * head_dim]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn attend_patch_with_buffer<C: Collective>(
    comm: &mut C,
    ulysses: &[usize],
    ring: &[usize],
    dev: &Device,
    qkv: &Tensor,
    heads: usize,
    head_dim: usize,
    kv: KvSlot<'_>,
) -> Result<Tensor> {
    let u = ulysses.len();
    let w = heads * head_dim / u;
    // My row's tokens, my head group: [B, n_row, 3w] (without Ulysses, my own tokens).
    let (row, shard_lens) = match u {
        1 => (qkv.clone(), vec![qkv.dim(1)]),
        _ => gather_heads(comm, ulysses, qkv, heads)?,
    };
    let blocks = ring_all_gather(comm, ring, row.narrow(2, w, 2 * w)?)?; // [B, n_row', 2w] each
    let refs: Vec<&Tensor> = blocks.iter().collect();
    let patch_kv = Tensor::cat(&refs, 1)?; // [B, n_patch (+ T), 2w], in token order
                                           // MMDiT: the prompt rows (on one rank's end of the part) go to their own buffer rows.
    let (j, n) = (kv.joint, patch_kv.dim(1));
    let t = j.prompt.min(n);
    let (image, prompt) = match j.prompt_first {
        true => (patch_kv.narrow(1, t, n - t)?, patch_kv.narrow(1, 0, t)?),
        false => (patch_kv.narrow(1, 0, n - t)?, patch_kv.narrow(1, n - t, t)?),
    };
    kv.buf.write_kv(kv.layer, kv.first, &image)?;
    if t > 0 {
        kv.buf.write_kv(kv.layer, j.prompt_at, &prompt)?;
    }
    let keys = (j.keys > 0).then_some(j.keys);
    let o = kv.buf.attend(
        dev,
        kv.layer,
        AttnView::of(&row, 0)?,
        keys,
        (qkv.dim(0), heads / u, head_dim),
    )?; // [B, n_row, w]
    match u {
        1 => Ok(o),
        _ => scatter_tokens(comm, ulysses, &o, &shard_lens),
    }
}

/// Every member's `t` in member order, passed around the ring (`members`, in order) in
/// `len - 1` shifts: after shift h this rank holds the block of the member h places before it.
fn ring_all_gather<C: Collective>(
    comm: &mut C,
    members: &[usize],
    t: Tensor,
) -> Result<Vec<Tensor>> {
    let (n, me) = (members.len(), position_in(comm.rank(), members)?);
    let mut got: Vec<Option<Tensor>> = vec![None; n];
    let mut block = t.clone();
    got[me] = Some(t);
    for hop in 1..n {
        block = comm.ring_shift_in(members, block)?;
        got[(me + n - hop) % n] = Some(block.clone());
    }
    Ok(got
        .into_iter()
        .map(|b| b.expect("every hop filled one"))
        .collect())
}
