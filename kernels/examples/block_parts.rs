//! Where a DiT-XL/2 block's time goes on the CPU: each op of one block (256 px, batch 2: 512
//! token rows, d = 1152, 16 heads of 72) timed on its own, in f32 and in bf16 (linear layers and
//! attention's products on AMX or AVX512-BF16 where the CPU has it),
//! same process, medians of 7. Prints ms per op, the share of the block, and the ops' GFLOP/s.
//! Run: `cargo run --release -p kernels --example block_parts [THREADS]`.

use std::time::Instant;

use kernels::{bf16_gemm_path, AttnView, Device, PackedBf16, PackedF32, Tensor};

const B: usize = 2;
const N: usize = 256;
const D: usize = 1152;
const HEADS: usize = 16;

fn tensor(len: usize, shape: &[usize], salt: usize) -> kernels::Result<Tensor> {
    let v = (0..len)
        .map(|i| (((i * 31 + salt) % 97) as f32 - 48.0) * 0.002)
        .collect();
    Tensor::from_vec(v, shape)
}

fn median_ms(mut f: impl FnMut() -> kernels::Result<()>) -> kernels::Result<f64> {
    f()?;
    let mut t = Vec::new();
    for _ in 0..7 {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

fn main() -> kernels::Result<()> {
    let threads = std::env::args()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or(2);
    let dev = Device::cpu(threads)?;
    println!(
        "{threads} threads; bf16 path: {}; f32 path: {}",
        bf16_gemm_path(),
        PackedF32::pack(&[0.0], 1, 1).path()
    );
    let x = tensor(B * N * D, &[B, N, D], 1)?;
    let shift = tensor(B * D, &[B, D], 2)?;
    let scale = tensor(B * D, &[B, D], 3)?;
    let qkv = tensor(B * N * 3 * D, &[B, N, 3 * D], 4)?;
    let h4 = tensor(B * N * 4 * D, &[B, N, 4 * D], 5)?;
    let weights = |n: usize, k: usize, salt| tensor(n * k, &[n, k], salt);
    let (w_qkv, w_proj, w_fc1, w_fc2) = (
        weights(3 * D, D, 6)?,
        weights(D, D, 7)?,
        weights(4 * D, D, 8)?,
        weights(D, 4 * D, 9)?,
    );
    let pack = |w: &Tensor| -> kernels::Result<PackedBf16> {
        Ok(PackedBf16::from_f32(w.as_f32()?, w.dim(0), w.dim(1)))
    };
    let (p_qkv, p_proj, p_fc1, p_fc2) =
        (pack(&w_qkv)?, pack(&w_proj)?, pack(&w_fc1)?, pack(&w_fc2)?);
    // f32 weights as a model keeps them (the AVX-512 kernel's panels where the CPU has it).
    let pack_f32 = |w: &Tensor| -> kernels::Result<PackedF32> {
        Ok(PackedF32::pack(w.as_f32()?, w.dim(0), w.dim(1)))
    };
    let (w_qkv, w_proj, w_fc1, w_fc2) = (
        pack_f32(&w_qkv)?,
        pack_f32(&w_proj)?,
        pack_f32(&w_fc1)?,
        pack_f32(&w_fc2)?,
    );
    let c = tensor(B * D, &[B, D], 10)?;
    let w_mod = weights(6 * D, D, 11)?;
    let p_mod = pack(&w_mod)?;
    let w_mod = pack_f32(&w_mod)?;
    let gemm = |m: usize, n: usize, k: usize| 2.0 * (m * n * k) as f64 / 1e9;
    let rows = B * N;
    let mut parts: Vec<(&str, f64, f64, f64)> = Vec::new(); // name, GFLOP, f32 ms, bf16 ms
    let mut both = |name, gflop, f32_ms, bf16_ms| parts.push((name, gflop, f32_ms, bf16_ms));

    let same = |f: &mut dyn FnMut() -> kernels::Result<()>| median_ms(f);
    let f = same(&mut || dev.linear_packed(&c, &w_mod, None).map(drop))?;
    let b = same(&mut || dev.linear_bf16(&c, &p_mod, None).map(drop))?;
    both("modulation linear", gemm(B, 6 * D, D), f, b);
    let ln = same(&mut || dev.layer_norm_modulate(&x, &shift, &scale, 1e-6).map(drop))?;
    both("layer_norm_modulate x2", 0.0, 2.0 * ln, 2.0 * ln);
    let f = same(&mut || dev.linear_packed(&x, &w_qkv, None).map(drop))?;
    let b = same(&mut || dev.linear_bf16(&x, &p_qkv, None).map(drop))?;
    both("qkv linear", gemm(rows, 3 * D, D), f, b);
    let bf16_dev = dev.clone().with_compute_dtype(kernels::DType::BF16);
    let attention = |dev: &Device| {
        let (q, k, v) = (
            AttnView::of(&qkv, 0)?,
            AttnView::of(&qkv, D)?,
            AttnView::of(&qkv, 2 * D)?,
        );
        dev.attention(q, k, v, None, B, HEADS, D / HEADS).map(drop)
    };
    let att = same(&mut || attention(&dev))?;
    let att_bf16 = same(&mut || attention(&bf16_dev))?;
    both(
        "attention",
        4.0 * (B * N * N * D) as f64 / 1e9,
        att,
        att_bf16,
    );
    let f = same(&mut || dev.linear_packed(&x, &w_proj, None).map(drop))?;
    let b = same(&mut || dev.linear_bf16(&x, &p_proj, None).map(drop))?;
    both("out proj linear", gemm(rows, D, D), f, b);
    let mut acc = x.clone();
    let add = same(&mut || dev.add_gated_(&mut acc, &x, Some(&shift)))?;
    both("add_gated x2", 0.0, 2.0 * add, 2.0 * add);
    let f = same(&mut || dev.linear_packed_gelu(&x, &w_fc1, None).map(drop))?;
    let b = same(&mut || dev.linear_bf16_gelu(&x, &p_fc1, None).map(drop))?;
    both("fc1 linear + gelu", gemm(rows, 4 * D, D), f, b);
    let f = same(&mut || dev.linear_packed(&h4, &w_fc2, None).map(drop))?;
    let b = same(&mut || dev.linear_bf16(&h4, &p_fc2, None).map(drop))?;
    both("fc2 linear", gemm(rows, D, 4 * D), f, b);

    let (tf, tb): (f64, f64) = parts.iter().fold((0.0, 0.0), |a, p| (a.0 + p.2, a.1 + p.3));
    println!(
        "{:<24} {:>9} {:>6} {:>9} {:>6} {:>9}",
        "op", "f32 ms", "share", "bf16 ms", "share", "GFLOP"
    );
    for (name, gflop, f, b) in &parts {
        println!(
            "{name:<24} {f:>9.2} {:>5.1}% {b:>9.2} {:>5.1}% {gflop:>9.3}",
            100.0 * f / tf,
            100.0 * b / tb
        );
    }
    println!(
        "{:<24} {tf:>9.2} {:>6} {tb:>9.2} (x28 blocks: f32 {:.0} ms, bf16 {:.0} ms)",
        "block",
        "",
        28.0 * tf,
        28.0 * tb
    );
    Ok(())
}
