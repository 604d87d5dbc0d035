//! Helpers shared by the kernels' tests.
#![allow(dead_code, unreachable_pub)]

pub mod cuda_emu;
#[cfg(feature = "cuda")]
pub mod fake_gpu;

use rand::rngs::StdRng;
use rand::Rng;

/// `n` values uniform in `[-scale, scale)`.
pub fn randn(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect()
}

/// Relative L2 distance of `a` from `b` (f64 sums).
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

#[allow(unused_imports)]
pub use cuda_emu::build_cpp;

/// The CPU attention of queries `q: [B, sq, d]` over a K/V buffer `kv: [B, sk, 2d]` (keys in
/// columns `0..d`, values in `d..2d`) with an optional key bias `[B, sk]`: (output, log-sum-exp)
/// as f32 vectors (the reference of the emulated GPU kernels).
pub fn cpu_buffer_attention(
    q: &[f32],
    kv: &[f32],
    bias: Option<&[f32]>,
    (batch, sq, sk, heads, head_dim): (usize, usize, usize, usize, usize),
) -> (Vec<f32>, Vec<f32>) {
    use kernels::{AttnView, Device, Tensor};
    let d = heads * head_dim;
    let qt = Tensor::from_vec(q.to_vec(), &[batch, sq, d]).unwrap();
    let kvt = Tensor::from_vec(kv.to_vec(), &[batch, sk, 2 * d]).unwrap();
    let bt = bias.map(|b| Tensor::from_vec(b.to_vec(), &[batch, sk]).unwrap());
    let (out, lse) = Device::cpu(1)
        .unwrap()
        .attention_with_lse(
            AttnView::of(&qt, 0).unwrap(),
            AttnView::of(&kvt, 0).unwrap(),
            AttnView::of(&kvt, d).unwrap(),
            bt.as_ref(),
            batch,
            heads,
            head_dim,
        )
        .unwrap();
    (
        out.as_f32().unwrap().to_vec(),
        lse.as_f32().unwrap().to_vec(),
    )
}
