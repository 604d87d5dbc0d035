//! The bf16 linear (`Device::linear_bf16`: AMX tiles or AVX512-BF16 where present), the f32 linear on a plain
//! weight (`Device::linear`: the gemm crate) and on a weight packed at load
//! (`Device::linear_packed`: the AVX-512 kernel where present) at DiT-XL/2's shapes (256 px,
//! batch 2: 512 token rows) and a square 2048^3, same process, same inputs, interleaved;
//! prints GFLOP/s of each and the ratios per shape. Run:
//! `cargo run --release -p kernels --example gemm_shapes [THREADS] [bf16]` (`bf16`: skip the
//! f32 products, e.g. to profile the bf16 kernel alone).

use std::time::Instant;

use kernels::{bf16_gemm_path, Device, PackedBf16, PackedF32, Tensor};

fn main() -> kernels::Result<()> {
    let threads = std::env::args()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or(2);
    let bf16_only = std::env::args().nth(2).as_deref() == Some("bf16");
    let dev = Device::cpu(threads)?;
    println!("{threads} threads; bf16 path: {}", bf16_gemm_path());
    let shapes = [
        ("qkv", 512, 1152, 3456),
        ("proj", 512, 1152, 1152),
        ("fc1", 512, 1152, 4608),
        ("fc2", 512, 4608, 1152),
        ("square", 2048, 2048, 2048),
    ];
    for (name, m, k, n) in shapes {
        let x: Vec<f32> = (0..m * k).map(|i| ((i % 13) as f32 - 6.0) * 0.01).collect();
        let x = Tensor::from_vec(x, &[m, k])?;
        let w: Vec<f32> = (0..n * k).map(|i| ((i % 7) as f32 - 3.0) * 0.01).collect();
        let packed = PackedBf16::from_f32(&w, n, k);
        let packed_f32 = PackedF32::pack(&w, n, k);
        let w = Tensor::from_vec(w, &[n, k])?;
        let flops = 2.0 * (m * n * k) as f64;
        // Median of 7 after one warm-up, the two formats interleaved.
        let (mut tb, mut tf, mut tp) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..8 {
            let t = Instant::now();
            dev.linear_bf16(&x, &packed, None)?;
            let b = t.elapsed().as_secs_f64();
            let t = Instant::now();
            if !bf16_only {
                dev.linear(&x, &w, None)?;
            }
            let f = t.elapsed().as_secs_f64();
            let t = Instant::now();
            if !bf16_only {
                dev.linear_packed(&x, &packed_f32, None)?;
            }
            let p = t.elapsed().as_secs_f64();
            if i > 0 {
                tb.push(b);
                tf.push(f);
                tp.push(p);
            }
        }
        tb.sort_by(f64::total_cmp);
        tf.sort_by(f64::total_cmp);
        tp.sort_by(f64::total_cmp);
        let (b, f, p) = (tb[tb.len() / 2], tf[tf.len() / 2], tp[tp.len() / 2]);
        if bf16_only {
            println!(
                "{name} [{m}, {k}] x [{n}, {k}]^T: bf16 {:.0} GFLOP/s",
                flops / b / 1e9
            );
            continue;
        }
        println!(
            "{name} [{m}, {k}] x [{n}, {k}]^T: bf16 {:.0} GFLOP/s, f32 {:.0} GFLOP/s, \
             f32 packed ({}) {:.0} GFLOP/s, bf16/f32 speed {:.2}, packed/f32 speed {:.2}",
            flops / b / 1e9,
            flops / f / 1e9,
            packed_f32.path(),
            flops / p / 1e9,
            f / b,
            f / p
        );
    }
    Ok(())
}
