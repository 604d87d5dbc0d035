//! The prepared GPU check (issue 11): on a lent GPU, every CUDA kernel against the CPU backend
//! on the same random inputs, one JSON line per check, exit 1 if any is off. Built here (no GPU
//! needed) and carried to the GPU machine by `tools/gpu_check.sh`:
//!
//!     cargo build --release -p kernels --features cuda --example gpu_check
//!
//! Needs `PIPEFUSE_CUDA_INCLUDE` (the CUDA headers) and NVRTC / the driver on the library path.
//! Tolerances: f32 kernels relative L2 <= 1e-5 (GELU's tanh vs the CPU's exp form: 2e-6).

use std::path::PathBuf;
use std::process::ExitCode;

use kernels::cuda::gpu::GpuKernels;
use kernels::{AttnView, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Uniform values in [-2, 2) of `shape`, from `seed`.
fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = shape.iter().product();
    Tensor::from_vec((0..n).map(|_| rng.random_range(-2.0..2.0)).collect(), shape).unwrap()
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

fn report(check: &str, e: f64, tol: f64, failed: &mut bool) {
    let ok = e <= tol;
    *failed |= !ok;
    println!("{{\"check\":\"{check}\",\"rel_l2\":{e:.3e},\"tolerance\":{tol:e},\"ok\":{ok}}}");
}

fn run() -> Result<bool, String> {
    let include = std::env::var_os("PIPEFUSE_CUDA_INCLUDE")
        .map(PathBuf::from)
        .ok_or("PIPEFUSE_CUDA_INCLUDE is not set (the CUDA headers' folder)")?;
    for d in kernels::cuda_devices()? {
        println!(
            "{{\"device\":{},\"name\":\"{}\",\"memory_gib\":{:.1},\"cc\":\"{}.{}\"}}",
            d.ordinal,
            d.name,
            d.total_memory as f64 / (1u64 << 30) as f64,
            d.compute_capability.0,
            d.compute_capability.1
        );
    }
    let gpu = GpuKernels::new(0, &include).map_err(|e| e.to_string())?;
    let cpu = Device::cpu(4).map_err(|e| e.to_string())?;
    let mut failed = false;
    let t = |shape: &[usize], seed| random(shape, seed);
    let e = |x: kernels::Result<()>| x.map_err(|e| e.to_string());

    // Element-wise ops.
    let x = t(&[1 << 20], 1);
    for (name, reference) in [("gelu_tanh_f32", 0), ("silu_f32", 1)] {
        let mut got = x.as_f32().unwrap().to_vec();
        e(gpu.activation_f32(name, &mut got))?;
        let want = match reference {
            0 => {
                let mut w = x.clone();
                e(cpu.gelu_tanh_(&mut w))?;
                w
            }
            _ => cpu.silu(&x).map_err(|e| e.to_string())?,
        };
        report(
            name,
            rel_l2(&got, want.as_f32().unwrap()),
            1e-5,
            &mut failed,
        );
    }
    let (b, n, c) = (2, 300, 1152);
    let (mut x, y, g) = (t(&[b, n, c], 2), t(&[b, n, c], 3), t(&[b, c], 4));
    let mut got = x.as_f32().unwrap().to_vec();
    e(gpu.add_gated_f32(
        &mut got,
        y.as_f32().unwrap(),
        g.as_f32().unwrap(),
        (b, n, c),
    ))?;
    e(cpu.add_gated_(&mut x, &y, Some(&g)))?;
    report(
        "add_gated_f32",
        rel_l2(&got, x.as_f32().unwrap()),
        1e-6,
        &mut failed,
    );

    // LayerNorm + adaLN modulation.
    let (x, sh, sc) = (t(&[b, n, c], 5), t(&[b, c], 6), t(&[b, c], 7));
    let got = gpu
        .layer_norm_modulate_f32(
            x.as_f32().unwrap(),
            sh.as_f32().unwrap(),
            sc.as_f32().unwrap(),
            n,
            c,
            1e-6,
        )
        .map_err(|e| e.to_string())?;
    let want = cpu
        .layer_norm_modulate(&x, &sh, &sc, 1e-6)
        .map_err(|e| e.to_string())?;
    report(
        "layer_norm_modulate_f32",
        rel_l2(&got, want.as_f32().unwrap()),
        1e-5,
        &mut failed,
    );

    // Attention with a key bias (some keys masked), and its log-sum-exp.
    let (heads, hd, sq, sk) = (4, 72, 77, 300);
    let (q, k, v) = (
        t(&[b, sq, heads * hd], 8),
        t(&[b, sk, heads * hd], 9),
        t(&[b, sk, heads * hd], 10),
    );
    let bias: Vec<f32> = (0..b * sk)
        .map(|i| if i % 7 == 3 { f32::NEG_INFINITY } else { 0.0 })
        .collect();
    let (got, got_lse) = gpu
        .attention_f32(
            q.as_f32().unwrap(),
            k.as_f32().unwrap(),
            v.as_f32().unwrap(),
            Some(&bias),
            b,
            heads,
            hd,
            (sq, sk),
        )
        .map_err(|e| e.to_string())?;
    let bias_t = Tensor::from_vec(bias, &[b, sk]).map_err(|e| e.to_string())?;
    let view = |t| AttnView::of(t, 0).unwrap();
    let (want, want_lse) = cpu
        .attention_with_lse(view(&q), view(&k), view(&v), Some(&bias_t), b, heads, hd)
        .map_err(|e| e.to_string())?;
    report(
        "attention_f32",
        rel_l2(&got, want.as_f32().unwrap()),
        1e-5,
        &mut failed,
    );
    report(
        "attention_f32 lse",
        rel_l2(&got_lse, want_lse.as_f32().unwrap()),
        1e-5,
        &mut failed,
    );
    e(gpu.synchronize())?;
    Ok(!failed)
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
