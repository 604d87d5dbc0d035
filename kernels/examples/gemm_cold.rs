//! What cold weights cost the linear layers: DiT-XL/2's four block products (256 px, batch 2:
//! 512 token rows) run as a forward runs them, 28 layers each with its own weights (so every
//! weight comes from DRAM, as in `pipefuse bench forward`), against the same products with one
//! layer's weights repeated (warm in the caches, as `gemm_shapes` measures). Same process, the
//! two alternating, medians of 5 passes; prints GFLOP/s and the cold / warm ratio per product.
//! Run: `cargo run --release -p kernels --example gemm_cold [THREADS] [f32|bf16]`.

use std::time::Instant;

use kernels::{bf16_gemm_path, Device, PackedBf16, PackedF32, Tensor};

const LAYERS: usize = 28;
const ROWS: usize = 512;
const D: usize = 1152;

/// One layer's weight in the run's format.
enum Weight {
    F32(PackedF32),
    Bf16(PackedBf16),
}

fn main() -> kernels::Result<()> {
    let threads = std::env::args()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or(2);
    let bf16 = std::env::args().nth(2).as_deref() != Some("f32");
    let dev = Device::cpu(threads)?;
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(str::to_owned)
        })
        .unwrap_or_default();
    println!(
        "{cpu}; {threads} threads; {}",
        if bf16 { bf16_gemm_path() } else { "f32 packed" }
    );
    let shapes = [
        ("qkv", D, 3 * D),
        ("proj", D, D),
        ("fc1", D, 4 * D),
        ("fc2", 4 * D, D),
    ];
    // Per shape: its input and LAYERS weights.
    let mut sets = Vec::new();
    for (s, &(name, k, n)) in shapes.iter().enumerate() {
        let x: Vec<f32> = (0..ROWS * k)
            .map(|i| (((i * 31 + s) % 97) as f32 - 48.0) * 0.002)
            .collect();
        let weights: Vec<Weight> = (0..LAYERS)
            .map(|l| {
                let w: Vec<f32> = (0..n * k)
                    .map(|i| (((i * 17 + l) % 89) as f32 - 44.0) * 0.001)
                    .collect();
                if bf16 {
                    Weight::Bf16(PackedBf16::from_f32(&w, n, k))
                } else {
                    Weight::F32(PackedF32::pack(&w, n, k))
                }
            })
            .collect();
        sets.push((name, Tensor::from_vec(x, &[ROWS, k])?, weights, k, n));
    }
    let run = |x: &Tensor, w: &Weight| -> kernels::Result<()> {
        match w {
            Weight::F32(w) => dev.linear_packed(x, w, None).map(drop),
            Weight::Bf16(w) => dev.linear_bf16(x, w, None).map(drop),
        }
    };
    // Seconds per product, summed over passes: [shape][cold, warm].
    let mut times = vec![[Vec::new(), Vec::new()]; shapes.len()];
    for pass in 0..6 {
        for cold in [true, false] {
            let mut t = vec![0.0; shapes.len()];
            for l in 0..LAYERS {
                for (s, (_, x, weights, _, _)) in sets.iter().enumerate() {
                    let w = &weights[if cold { l } else { 0 }];
                    let start = Instant::now();
                    run(x, w)?;
                    t[s] += start.elapsed().as_secs_f64();
                }
            }
            if pass > 0 {
                for (s, ts) in t.into_iter().enumerate() {
                    times[s][usize::from(!cold)].push(ts);
                }
            }
        }
    }
    for (s, (name, _, _, k, n)) in sets.iter().enumerate() {
        let flops = 2.0 * (ROWS * k * n * LAYERS) as f64;
        let [cold, warm] = times[s].clone().map(|mut v| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        });
        println!(
            "{name} [{ROWS}, {k}] x [{n}, {k}]^T x {LAYERS} layers: cold {:.0} GFLOP/s, warm {:.0} GFLOP/s, cold/warm speed {:.2}",
            flops / cold / 1e9,
            flops / warm / 1e9,
            warm / cold
        );
    }
    Ok(())
}
