//! Rotary position embedding on the query and key heads of a fused QKV tensor (Flux's interleaved
//! channel-pair convention), and its f64 reference.

use rayon::prelude::*;

/// Rotary position embedding, in place, on every `cos.len() / rows`-wide head of columns
/// `offset..offset + cols` of each row of `x` (rows of `width` values, `rows` positions per batch
/// element, row r at position `r % rows`): each pair `(a, b)` at channels `(2i, 2i+1)` becomes
/// `(a cos - b sin, b cos + a sin)` with that position's `cos`/`sin` of the channel (the
/// interleaved-pairs convention of Flux).
#[allow(clippy::too_many_arguments)]
pub(crate) fn rope_(
    x: &mut [f32],
    width: usize,
    rows: usize,
    offset: usize,
    cols: usize,
    cos: &[f32],
    sin: &[f32],
) {
    let hd = cos.len() / rows;
    x.par_chunks_mut(width).enumerate().for_each(|(r, row)| {
        let pos = r % rows;
        let (c, s) = (
            &cos[pos * hd..(pos + 1) * hd],
            &sin[pos * hd..(pos + 1) * hd],
        );
        for head in row[offset..offset + cols].chunks_mut(hd) {
            for i in (0..hd).step_by(2) {
                let (a, b) = (head[i], head[i + 1]);
                head[i] = a * c[i] - b * s[i];
                head[i + 1] = b * c[i + 1] + a * s[i + 1];
            }
        }
    });
}

/// Reference [`rope_`] in f64 (returns a copy).
pub fn rope_slow(
    x: &[f32],
    width: usize,
    rows: usize,
    offset: usize,
    cols: usize,
    cos: &[f32],
    sin: &[f32],
) -> Vec<f32> {
    let hd = cos.len() / rows;
    let mut y = x.to_vec();
    for (r, row) in y.chunks_mut(width).enumerate() {
        let pos = r % rows;
        for head in row[offset..offset + cols].chunks_mut(hd) {
            for i in (0..hd).step_by(2) {
                let (a, b) = (head[i] as f64, head[i + 1] as f64);
                let (c0, s0) = (cos[pos * hd + i] as f64, sin[pos * hd + i] as f64);
                let (c1, s1) = (cos[pos * hd + i + 1] as f64, sin[pos * hd + i + 1] as f64);
                head[i] = (a * c0 - b * s0) as f32;
                head[i + 1] = (b * c1 + a * s1) as f32;
            }
        }
    }
    y
}
