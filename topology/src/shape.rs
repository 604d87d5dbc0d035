//! The shapes every plan is made of: what the plan knows of the model and the request
//! ([`ModelShape`]), and the two splitting rules ([`patch_rows`], [`split_layers`]) shared by the
//! pipeline and the sequence-parallel plans.

use std::ops::Range;

/// What the plan needs to know about the model and the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    /// Transformer blocks L.
    pub layers: usize,
    /// Hidden size d.
    pub hidden: usize,
    /// Token rows h = H / P (latent height over patch size).
    pub token_rows: usize,
    /// Token columns w = W / P.
    pub token_cols: usize,
    /// Rows B' of one forward on one device, including the CFG doubling (2B under guidance, B
    /// without).
    pub batch: usize,
    /// Latent channels C.
    pub latent_channels: usize,
    /// Latents B in the request.
    pub latent_batch: usize,
    /// Patch size P of the patch embedding.
    pub patch_size: usize,
    /// Attention heads (Ulysses splits them over its ranks).
    pub heads: usize,
    /// MMDiT (SD3, Flux): prompt tokens every part carries besides its image tokens (and every
    /// K/V buffer holds); 0 for DiT and PixArt. Under sequence parallelism only the rank at the
    /// prompt's end of the sequence carries them.
    pub text_tokens: usize,
    /// The prompt precedes the image tokens (Flux: sequence-parallel rank 0 carries it; SD3: the
    /// last rank).
    pub prompt_first: bool,
}

/// ALGORITHMS.md rule: every strip but the last has `ceil(h / m)` token rows, the last takes the
/// remainder. `None` when that yields fewer than `m` strips (h = 8, m = 5), or `m == 0`, or
/// `m > h`.
pub fn patch_rows(token_rows: usize, m: usize) -> Option<Vec<Range<usize>>> {
    if m == 0 || m > token_rows {
        return None;
    }
    let rows = token_rows.div_ceil(m);
    if (m - 1) * rows >= token_rows {
        return None;
    }
    Some(
        (0..m)
            .map(|i| i * rows..((i + 1) * rows).min(token_rows))
            .collect(),
    )
}

/// Balanced contiguous split of `layers` over `n` stages; earlier stages take the extra layer
/// (28 / 3 -> 10, 9, 9). Stages get empty ranges when `layers < n`; empty for `n == 0`.
pub fn split_layers(layers: usize, n: usize) -> Vec<Range<usize>> {
    if n == 0 {
        return Vec::new();
    }
    let (base, extra) = (layers / n, layers % n);
    let mut start = 0;
    (0..n)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect()
}
