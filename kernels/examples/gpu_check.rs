//! The prepared GPU check (issue 11): on a lent GPU, every `Device` op the CUDA backend has, on
//! CUDA tensors of each dtype, against the CPU backend on the same inputs (rounded to that dtype
//! first), one JSON line per check, exit 1 if any is off. Built here (no GPU needed) and carried
//! to the GPU machine by `tools/gpu_check.sh`:
//!
//!     cargo build --release -p kernels --features cuda --example gpu_check
//!
//! Needs `PIPEFUSE_CUDA_INCLUDE` (the CUDA headers) and NVRTC / the driver on the library path.
//! `--on-cpu`: a CPU device stands in for the GPU (the harness itself); `--small`: smaller
//! problems (what `tests/cuda_fake_gpu.rs` runs on the fake GPU, whose emulator is slow).
//! Tolerances (relative L2 to the CPU's f32 result): f32 1e-5 (GELU's tanh vs the CPU's exp
//! form: 2e-6; GEMMs in f32 compute, no TF32), bf16 1e-2, f16 2e-3 (the output's own rounding
//! and f32 accumulation in another order).

#[path = "shared/guarded.rs"]
mod guarded;

use std::process::ExitCode;

use guarded::guarded;

use kernels::{AttnView, DType, Device, Tensor};
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

fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::BF16 => 1e-2,
        DType::F16 => 2e-3,
    }
}

/// Compares a GPU result with the CPU's, one JSON line.
struct Checks {
    failed: bool,
}

impl Checks {
    fn compare(
        &mut self,
        check: &str,
        dtype: DType,
        got: &Tensor,
        want: &Tensor,
    ) -> Result<(), String> {
        let got = got.to_vec_f32().map_err(|e| e.to_string())?;
        let want = want.to_vec_f32().map_err(|e| e.to_string())?;
        if got.len() != want.len() {
            return Err(format!("{check}: {} vs {} elements", got.len(), want.len()));
        }
        let e = rel_l2(&got, &want);
        let (tol, ok) = (tolerance(dtype), got.iter().all(|v| v.is_finite()));
        let ok = ok && e <= tol;
        self.failed |= !ok;
        println!("{{\"check\":\"{check}\",\"dtype\":\"{dtype}\",\"rel_l2\":{e:.3e},\"tolerance\":{tol:e},\"ok\":{ok}}}");
        Ok(())
    }
}

/// `t` rounded to `dtype` (the CPU reference's input) and its copy on the GPU.
fn pair(t: &Tensor, dtype: DType, gpu: &Device) -> Result<(Tensor, Tensor), String> {
    let rounded = t.to_dtype(dtype).map_err(|e| e.to_string())?;
    let host = rounded.to_dtype(DType::F32).map_err(|e| e.to_string())?;
    let dev = rounded.to_device(gpu).map_err(|e| e.to_string())?;
    Ok((host, dev))
}

/// The problem sizes of the checks: DiT-XL/2's on a GPU, smaller ones on the fake GPU (`--small`:
/// the same ops and launches, tiled the same way, but the emulator runs every CUDA thread on the
/// host).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shapes {
    /// Token rows of the element-wise and norm checks: batch, tokens, channels.
    tokens: (usize, usize, usize),
    /// Elements of the element-wise activations.
    elements: usize,
    /// (rows, in, out) of the two linear checks and the GELU one (which has 2 x rows).
    fc1: (usize, usize, usize),
    qkv: (usize, usize, usize),
    /// Sequence of the attention checks (head dim 72), where Ring's split cuts it, and of the
    /// head-dim-64 / 128 checks.
    seq: usize,
    split: usize,
    long_seq: usize,
}

const FULL: Shapes = Shapes {
    tokens: (2, 300, 1152),
    elements: 1 << 20,
    fc1: (512, 1152, 4608),
    qkv: (300, 1152, 3456),
    seq: 300,
    split: 120,
    long_seq: 1000,
};

pub(crate) const SMALL: Shapes = Shapes {
    tokens: (2, 40, 160),
    elements: 1 << 14,
    fc1: (72, 160, 320),
    qkv: (40, 160, 480),
    seq: 90,
    split: 40,
    long_seq: 150,
};

/// What every section works with: the GPU (or the stand-in CPU), the CPU reference, the dtype.
struct Ctx {
    gpu: Device,
    cpu: Device,
    dtype: DType,
    shapes: Shapes,
}

fn s(e: kernels::KernelError) -> String {
    e.to_string()
}

/// GELU, SiLU (and copy on write), the gated residual, uploads past the staging ring.
fn elementwise(ctx: &Ctx, checks: &mut Checks) -> Result<(), String> {
    let (gpu, cpu, dtype) = (&ctx.gpu, &ctx.cpu, ctx.dtype);
    // Element-wise ops.
    let (x, dx) = pair(&random(&[ctx.shapes.elements], 1), dtype, gpu)?;
    let mut want = x.clone();
    cpu.gelu_tanh_(&mut want).map_err(s)?;
    let mut got = dx.clone();
    gpu.gelu_tanh_(&mut got).map_err(s)?;
    checks.compare("gelu_tanh", dtype, &got, &want)?;
    let want = cpu.silu(&x).map_err(s)?;
    checks.compare("silu", dtype, &gpu.silu(&dx).map_err(s)?, &want)?;
    // The input must be unchanged (copy on write of a shared buffer).
    checks.compare("copy on write", dtype, &dx, &x)?;

    let (b, n, c) = ctx.shapes.tokens;
    let (x, dx) = pair(&random(&[b, n, c], 2), dtype, gpu)?;
    let (y, dy) = pair(&random(&[b, n, c], 3), dtype, gpu)?;
    let (g, dg) = pair(&random(&[b, c], 4), dtype, gpu)?;
    let (mut want, mut got) = (x.clone(), dx.clone());
    cpu.add_gated_(&mut want, &y, Some(&g)).map_err(s)?;
    gpu.add_gated_(&mut got, &dy, Some(&dg)).map_err(s)?;
    checks.compare("add_gated", dtype, &got, &want)?;

    // More uploads than the page-locked staging ring has slots, with no synchronisation in
    // between: a slot must not be refilled before the GPU has copied what it held. One size,
    // smaller than the uploads above, so no slot grows (freeing page-locked memory syncs).
    let uploads = (0..9)
        .map(|i| pair(&random(&[ctx.shapes.elements / 8], 20 + i), dtype, gpu))
        .collect::<Result<Vec<_>, String>>()?;
    for (i, (host, dev)) in uploads.iter().enumerate() {
        checks.compare(&format!("upload {i} of 9 before a sync"), dtype, dev, host)?;
    }
    Ok(())
}
/// LayerNorm (modulated, affine), periodic adds, narrow, embedding rows, cat.
fn norms_and_copies(ctx: &Ctx, checks: &mut Checks) -> Result<(), String> {
    let (gpu, cpu, dtype) = (&ctx.gpu, &ctx.cpu, ctx.dtype);
    let (b, n, c) = ctx.shapes.tokens;
    let (x, dx) = pair(&random(&[b, n, c], 2), dtype, gpu)?;
    let (y, dy) = pair(&random(&[b, n, c], 3), dtype, gpu)?;
    let (g, dg) = pair(&random(&[b, c], 4), dtype, gpu)?;
    // LayerNorm + adaLN modulation.
    let (sh, dsh) = pair(&random(&[b, c], 6), dtype, gpu)?;
    let want = cpu.layer_norm_modulate(&x, &sh, &g, 1e-6).map_err(s)?;
    let got = gpu.layer_norm_modulate(&dx, &dsh, &dg, 1e-6).map_err(s)?;
    checks.compare("layer_norm_modulate", dtype, &got, &want)?;

    // LayerNorm with affine weights, and a [n, d] block added to every batch row.
    let (gm, dgm) = pair(&random(&[c], 16), dtype, gpu)?;
    let (bt, dbt) = pair(&random(&[c], 17), dtype, gpu)?;
    let want = cpu.layer_norm(&x, Some(&gm), Some(&bt), 1e-6).map_err(s)?;
    let got = gpu
        .layer_norm(&dx, Some(&dgm), Some(&dbt), 1e-6)
        .map_err(s)?;
    checks.compare("layer_norm affine", dtype, &got, &want)?;
    let (rows, drows) = (
        y.narrow(0, 0, 1).map_err(s)?,
        dy.narrow(0, 0, 1).map_err(s)?,
    );
    let rows = rows.reshape(&[n, c]).map_err(s)?;
    let drows = drows.reshape(&[n, c]).map_err(s)?;
    let (mut want, mut got) = (x.clone(), dx.clone());
    cpu.add_broadcast_(&mut want, &rows).map_err(s)?;
    gpu.add_broadcast_(&mut got, &drows).map_err(s)?;
    checks.compare("add_broadcast (and narrow on the GPU)", dtype, &got, &want)?;
    // Rows of a table by id, and a concatenation.
    let want = cpu
        .embedding(
            &x.clone().reshape(&[b * n, c]).map_err(s)?,
            &[5, 0, b * n - 1, 5],
        )
        .map_err(s)?;
    let got = gpu
        .embedding(
            &dx.clone().reshape(&[b * n, c]).map_err(s)?,
            &[5, 0, b * n - 1, 5],
        )
        .map_err(s)?;
    checks.compare("embedding (row copies)", dtype, &got, &want)?;
    let want = Tensor::cat(&[&x, &y], 2).map_err(s)?;
    let got = Tensor::cat(&[&dx, &dy], 2).map_err(s)?;
    checks.compare("cat on the GPU", dtype, &got, &want)?;
    Ok(())
}
/// The VAE decoder's ops.
fn image_ops(ctx: &Ctx, checks: &mut Checks) -> Result<(), String> {
    let (gpu, cpu, dtype) = (&ctx.gpu, &ctx.cpu, ctx.dtype);
    // The VAE's image ops: GroupNorm, upsampling, transpose, a padded 3x3 conv (im2col).
    let (img, dimg) = pair(&random(&[2, 32, 12, 10], 18), dtype, gpu)?;
    let (gw, dgw) = pair(&random(&[32], 19), dtype, gpu)?;
    let want = cpu
        .group_norm(&img, 8, Some(&gw), Some(&gw), 1e-6)
        .map_err(s)?;
    let got = gpu
        .group_norm(&dimg, 8, Some(&dgw), Some(&dgw), 1e-6)
        .map_err(s)?;
    checks.compare("group_norm", dtype, &got, &want)?;
    let want = cpu.upsample_nearest2x(&img).map_err(s)?;
    checks.compare(
        "upsample_nearest2x",
        dtype,
        &gpu.upsample_nearest2x(&dimg).map_err(s)?,
        &want,
    )?;
    let flat = |t: &Tensor| t.clone().reshape(&[2, 32, 120]);
    let want = cpu.transpose_last2(&flat(&img).map_err(s)?).map_err(s)?;
    let got = gpu.transpose_last2(&flat(&dimg).map_err(s)?).map_err(s)?;
    checks.compare("transpose_last2", dtype, &got, &want)?;
    let (cw, dcw) = pair(&random(&[16, 32, 3, 3], 20), dtype, gpu)?;
    let (cb, dcb) = pair(&random(&[16], 21), dtype, gpu)?;
    let want = cpu.conv2d(&img, &cw, Some(&cb), 1).map_err(s)?;
    let got = gpu.conv2d(&dimg, &dcw, Some(&dcb), 1).map_err(s)?;
    checks.compare("conv2d 3x3 pad 1", dtype, &got, &want)?;
    Ok(())
}
/// Per-head RMS norm and the rotary embedding on a fused QKV.
fn qkv_ops(ctx: &Ctx, checks: &mut Checks) -> Result<(), String> {
    let (gpu, cpu, dtype) = (&ctx.gpu, &ctx.cpu, ctx.dtype);
    let (b, n, _) = ctx.shapes.tokens;
    // Per-head RMS norm of the keys of a fused QKV (columns c..2c, heads of 64).
    let (qkv, dqkv) = pair(&random(&[b, n, 3 * 256], 11), dtype, gpu)?;
    let (w, dw) = pair(&random(&[64], 12), dtype, gpu)?;
    let (mut want, mut got) = (qkv.clone(), dqkv.clone());
    cpu.rms_norm_groups_(&mut want, 256, 256, &w, 1e-6)
        .map_err(s)?;
    gpu.rms_norm_groups_(&mut got, 256, 256, &dw, 1e-6)
        .map_err(s)?;
    checks.compare("rms_norm_groups", dtype, &got, &want)?;

    // Rotary embedding of the keys of the same QKV (heads of 64, f32 tables, 300 positions).
    let (cos, sin) = (random(&[n, 64], 13), random(&[n, 64], 14));
    let (mut want, mut got) = (qkv.clone(), dqkv.clone());
    cpu.rope_(&mut want, 256, 256, &cos, &sin).map_err(s)?;
    gpu.rope_(&mut got, 256, 256, &cos, &sin).map_err(s)?;
    checks.compare("rope", dtype, &got, &want)?;
    Ok(())
}
/// cuBLASLt GEMMs.
fn linear(ctx: &Ctx, checks: &mut Checks) -> Result<(), String> {
    let (gpu, cpu, dtype) = (&ctx.gpu, &ctx.cpu, ctx.dtype);
    // Linear layers of DiT-XL/2's shapes (fc1 with bias; qkv without).
    for (name, (m, k, nn), bias) in [
        ("linear fc1", ctx.shapes.fc1, true),
        ("linear qkv", ctx.shapes.qkv, false),
    ] {
        let (x, dx) = pair(&random(&[1, m, k], 13), dtype, gpu)?;
        let (w, dw) = pair(&random(&[nn, k], 14), dtype, gpu)?;
        let (bb, dbb) = pair(&random(&[nn], 15), dtype, gpu)?;
        let want = cpu.linear(&x, &w, bias.then_some(&bb)).map_err(s)?;
        let got = gpu.linear(&dx, &dw, bias.then_some(&dbb)).map_err(s)?;
        checks.compare(name, dtype, &got, &want)?;
    }
    // fc1 with GELU in cuBLASLt's epilogue, weights scaled so that the outputs are of order 1
    // where GELU bends (its tanh form; the erf form would be ~2e-4 off in f32).
    let (m, k, nn) = ctx.shapes.fc1;
    let (x, dx) = pair(&random(&[2, m / 2, k], 16), dtype, gpu)?;
    let w = random(&[nn, k], 17).to_vec_f32().map_err(s)?;
    let scale = 1.18 * (k as f32).sqrt();
    let w = Tensor::from_vec(w.iter().map(|v| v / scale).collect(), &[nn, k]).map_err(s)?;
    let (w, dw) = pair(&w, dtype, gpu)?;
    let (bb, dbb) = pair(&random(&[nn], 18), dtype, gpu)?;
    let want = cpu.linear_gelu(&x, &w, Some(&bb)).map_err(s)?;
    let got = gpu.linear_gelu(&dx, &dw, Some(&dbb)).map_err(s)?;
    checks.compare("linear gelu (epilogue)", dtype, &got, &want)?;
    // The same shape again (its prepared plan, another bias pointer) and without a bias.
    let (bb, dbb) = pair(&random(&[nn], 19), dtype, gpu)?;
    let want = cpu.linear_gelu(&x, &w, Some(&bb)).map_err(s)?;
    let got = gpu.linear_gelu(&dx, &dw, Some(&dbb)).map_err(s)?;
    checks.compare("linear gelu (cached plan, new bias)", dtype, &got, &want)?;
    let want = cpu.linear_gelu(&x, &w, None).map_err(s)?;
    let got = gpu.linear_gelu(&dx, &dw, None).map_err(s)?;
    checks.compare("linear gelu (no bias)", dtype, &got, &want)?;
    Ok(())
}
/// Attention (row and tensor-core kernels), the log-sum-exp, Ring's merge.
fn attention(ctx: &Ctx, checks: &mut Checks) -> Result<(), String> {
    let (gpu, cpu, dtype) = (&ctx.gpu, &ctx.cpu, ctx.dtype);
    let (b, _, _) = ctx.shapes.tokens;
    // Attention: queries, keys and values as column views of one fused QKV (head dim 72,
    // PixArt's), a key bias masking some keys, and the log-sum-exp.
    let (heads, hd, seq, cut) = (4, 72, ctx.shapes.seq, ctx.shapes.split);
    let (qkv, dqkv) = pair(&random(&[b, seq, 3 * heads * hd], 8), dtype, gpu)?;
    let bias: Vec<f32> = (0..b * seq)
        .map(|i| if i % 7 == 3 { f32::NEG_INFINITY } else { 0.0 })
        .collect();
    let bias = Tensor::from_vec(bias, &[b, seq]).map_err(s)?;
    let dbias = bias.to_device(gpu).map_err(s)?;
    let views = |t| -> Result<_, String> {
        Ok((
            AttnView::of(t, 0).map_err(s)?,
            AttnView::of(t, heads * hd).map_err(s)?,
            AttnView::of(t, 2 * heads * hd).map_err(s)?,
        ))
    };
    let (q, k, v) = views(&qkv)?;
    let (want, want_lse) = cpu
        .attention_with_lse(q, k, v, Some(&bias), b, heads, hd)
        .map_err(s)?;
    let (q, k, v) = views(&dqkv)?;
    let (got, got_lse) = gpu
        .attention_with_lse(q, k, v, Some(&dbias), b, heads, hd)
        .map_err(s)?;
    checks.compare("attention", dtype, &got, &want)?;
    // Ring attention: two key blocks attended separately and merged equal the whole.
    let split = |t: &Tensor, r: std::ops::Range<usize>| t.narrow(1, r.start, r.len());
    let (kv1, kv2) = (
        split(&dqkv, 0..cut).map_err(s)?,
        split(&dqkv, cut..seq).map_err(s)?,
    );
    let (b1, b2) = (
        dbias.narrow(1, 0, cut).map_err(s)?,
        dbias.narrow(1, cut, seq - cut).map_err(s)?,
    );
    let (q, _, _) = views(&dqkv)?;
    let (_, k1, v1) = views(&kv1)?;
    let (_, k2, v2) = views(&kv2)?;
    let (mut acc, mut acc_lse) = gpu
        .attention_with_lse(q, k1, v1, Some(&b1), b, heads, hd)
        .map_err(s)?;
    let (part, part_lse) = gpu
        .attention_with_lse(q, k2, v2, Some(&b2), b, heads, hd)
        .map_err(s)?;
    gpu.merge_attention_(&mut acc, &mut acc_lse, &part, &part_lse, heads)
        .map_err(s)?;
    checks.compare("ring merge (narrow on the GPU)", dtype, &acc, &want)?;

    // SD3's and Flux's head dims (64, 128) over several query and key tiles, no bias (bf16 /
    // f16: the tensor-core kernel's d64 and d128 instantiations).
    for hd in [64, 128] {
        let (qkv, dqkv) = pair(
            &random(&[1, ctx.shapes.long_seq, 3 * 2 * hd], 16),
            dtype,
            gpu,
        )?;
        let at = |c: usize| AttnView::of(&qkv, c * 2 * hd).map_err(s);
        let want = cpu
            .attention(at(0)?, at(1)?, at(2)?, None, 1, 2, hd)
            .map_err(s)?;
        let at = |c: usize| AttnView::of(&dqkv, c * 2 * hd).map_err(s);
        let got = gpu
            .attention(at(0)?, at(1)?, at(2)?, None, 1, 2, hd)
            .map_err(s)?;
        checks.compare(&format!("attention head_dim {hd}"), dtype, &got, &want)?;
    }

    // The log-sum-exp is f32 whatever the inputs' dtype.
    let name = format!("attention lse, {dtype} inputs");
    checks.compare(&name, DType::F32, &got_lse, &want_lse)?;
    Ok(())
}
/// The sections, run for each dtype; one that fails (an error, or a panic) is reported and the
/// rest still run, so one GPU session learns as much as it can.
type Section = fn(&Ctx, &mut Checks) -> Result<(), String>;
const SECTIONS: &[(&str, Section)] = &[
    ("elementwise", elementwise),
    ("norms and copies", norms_and_copies),
    ("image ops", image_ops),
    ("qkv ops", qkv_ops),
    ("linear", linear),
    ("attention", attention),
];

/// The check with the command line's options: `--on-cpu`, `--small`.
fn run() -> Result<bool, String> {
    let on_cpu = std::env::args().any(|a| a == "--on-cpu");
    let small = std::env::args().any(|a| a == "--small");
    run_with(on_cpu, if small { SMALL } else { FULL })
}

/// Every section in every dtype on GPU 0 (a CPU device if `on_cpu`, f32 only): whether all
/// checks passed.
pub(crate) fn run_with(on_cpu: bool, shapes: Shapes) -> Result<bool, String> {
    for d in kernels::cuda_devices().unwrap_or_default() {
        println!(
            "{{\"device\":{},\"name\":\"{}\",\"memory_gib\":{:.1},\"cc\":\"{}.{}\"}}",
            d.ordinal,
            d.name,
            d.total_memory as f64 / (1u64 << 30) as f64,
            d.compute_capability.0,
            d.compute_capability.1
        );
    }
    let gpu = match on_cpu {
        true => Device::cpu(2),
        false => Device::cuda(0),
    }
    .map_err(s)?;
    let name = gpu.name().replace('"', "'");
    println!("{{\"opened\":\"{name}\"}}");
    let dtypes: &[DType] = match on_cpu {
        true => &[DType::F32],
        false => &[DType::F32, DType::BF16, DType::F16],
    };
    let mut checks = Checks { failed: false };
    for &dtype in dtypes {
        let ctx = Ctx {
            gpu: gpu.clone().with_compute_dtype(dtype),
            cpu: Device::cpu(4).map_err(s)?,
            dtype,
            shapes,
        };
        for (name, section) in SECTIONS {
            let label = format!("\"check\":\"{name}\",\"dtype\":\"{dtype}\"");
            if !guarded(&label, || section(&ctx, &mut checks)) {
                checks.failed = true;
            }
        }
    }
    Ok(!checks.failed)
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
