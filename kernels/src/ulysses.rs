//! The data movement of Ulysses sequence parallelism (ALGORITHMS.md section 4), as pure tensor
//! functions: each of U ranks holds a token shard `[B, S_r, heads * head_dim]`; before attention
//! an all-to-all gives rank j every token for heads `j * H/U .. (j + 1) * H/U`; after attention a
//! second all-to-all brings the tokens back. Rank r computes the parts it sends with a `split_*`
//! function and assembles what it receives, in rank order, with the matching `concat_*` one, so a
//! transport only moves the parts.

use crate::{KernelError, Result, Tensor};

fn shape3(op: &'static str, t: &Tensor) -> Result<[usize; 3]> {
    match *t.shape() {
        [b, s, w] => Ok([b, s, w]),
        _ => Err(KernelError::shape(
            op,
            format!("expected [B, S, width], got {:?}", t.shape()),
        )),
    }
}

/// Before attention, on each rank: its token shard `x: [B, S_r, heads * head_dim]` cut into `u`
/// head groups; part j (`[B, S_r, heads / u * head_dim]`) goes to rank j. Needs `heads % u == 0`.
pub fn split_heads(x: &Tensor, heads: usize, u: usize) -> Result<Vec<Tensor>> {
    let [_, _, width] = shape3("ulysses split_heads", x)?;
    #[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; the MSRV is 1.85
    if u == 0 || heads == 0 || heads % u != 0 || width % heads != 0 {
        return Err(KernelError::shape(
            "ulysses split_heads",
            format!(
                "{heads} heads of width {width} cannot be split over ulysses degree {u} \
                 (heads must be a multiple of the degree)"
            ),
        ));
    }
    let part = width / u;
    (0..u).map(|j| x.narrow(2, j * part, part)).collect()
}

/// Before attention, on rank j: the parts received from ranks 0..U (their token shards of head
/// group j), in rank order, joined into the whole sequence `[B, S, heads / u * head_dim]`.
pub fn concat_tokens(parts: &[Tensor]) -> Result<Tensor> {
    let refs: Vec<&Tensor> = parts.iter().collect();
    Tensor::cat(&refs, 1)
}

/// After attention, on rank j: its head group over the whole sequence `[B, S, w]` cut back into
/// the ranks' token shards (`shard_lens[r]` tokens each); part r goes to rank r.
pub fn split_tokens(y: &Tensor, shard_lens: &[usize]) -> Result<Vec<Tensor>> {
    let [_, s, _] = shape3("ulysses split_tokens", y)?;
    if shard_lens.iter().sum::<usize>() != s {
        return Err(KernelError::shape(
            "ulysses split_tokens",
            format!("shards {shard_lens:?} do not add up to {s} tokens"),
        ));
    }
    let mut start = 0;
    shard_lens
        .iter()
        .map(|&len| {
            let t = y.narrow(1, start, len);
            start += len;
            t
        })
        .collect()
}

/// After attention, on rank r: the parts received from ranks 0..U (head groups of its tokens),
/// in rank order, joined into `[B, S_r, heads * head_dim]`.
pub fn concat_heads(parts: &[Tensor]) -> Result<Tensor> {
    let refs: Vec<&Tensor> = parts.iter().collect();
    Tensor::cat(&refs, 2)
}
