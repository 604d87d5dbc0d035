//! Attention on a CPU device computing in bf16 (`Device::with_compute_dtype(BF16)`: Q K^T and
//! P V in bf16 on AMX tiles or with AVX512-BF16, f32 accumulation and softmax) against the f64 reference over the same
//! bf16-rounded Q, K, V. Beyond that rounding the kernel rounds P to bf16 (8 bits of mantissa:
//! relative error up to 2^-9 per weight), so the bound is relative L2 4e-3 (measured 1.0e-3 to
//! 1.3e-3); an index or scale error is O(1). Where the CPU has neither the bf16 device must
//! give exactly the f32 device's numbers.

mod common;

use common::{randn, rel_l2};
use kernels::reference::{attention_slow, SlowAttnInput};
use kernels::{bf16_bits, bf16_gemm_path, bf16_to_f32, AttnView, DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

fn bf16_round(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| bf16_to_f32(bf16_bits(v))).collect()
}

/// `[b, seq, row_stride]` data viewed from column `col_offset`, for the reference.
fn view(data: &[f32], seq: usize, row_stride: usize, col_offset: usize) -> SlowAttnInput<'_> {
    SlowAttnInput {
        data,
        seq,
        batch_stride: seq * row_stride,
        row_stride,
        col_offset,
    }
}

/// One case: queries `[b, sq, d]`, a K/V buffer `[b, sk, 2d]`, an optional key bias.
fn case(
    rng: &mut StdRng,
    (b, sq, sk, heads, dh): (usize, usize, usize, usize, usize),
    masked: bool,
) {
    let d = heads * dh;
    let q = randn(rng, b * sq * d, 2.0);
    let kv = randn(rng, b * sk * 2 * d, 2.0);
    // Batch 0: every other key removed; the last batch: every key removed.
    let bias = masked.then(|| {
        let mut bias = randn(rng, b * sk, 1.0);
        for (i, x) in bias.iter_mut().enumerate() {
            let (bb, s) = (i / sk, i % sk);
            if (bb == 0 && s % 2 == 1) || (b > 1 && bb == b - 1) {
                *x = f32::NEG_INFINITY;
            }
        }
        bias
    });
    let qt = Tensor::from_vec(q.clone(), &[b, sq, d]).unwrap();
    let kvt = Tensor::from_vec(kv.clone(), &[b, sk, 2 * d]).unwrap();
    let bt = bias.clone().map(|x| Tensor::from_vec(x, &[b, sk]).unwrap());
    let run = |dev: &Device| {
        dev.attention_with_lse(
            AttnView::of(&qt, 0).unwrap(),
            AttnView::of(&kvt, 0).unwrap(),
            AttnView::of(&kvt, d).unwrap(),
            bt.as_ref(),
            b,
            heads,
            dh,
        )
        .unwrap()
    };
    let f32_dev = Device::cpu(2).unwrap();
    let bf16_dev = Device::cpu(2).unwrap().with_compute_dtype(DType::BF16);
    let (want_f32, lse_f32) = run(&f32_dev);
    let (got, lse) = run(&bf16_dev);
    let (got, lse) = (got.as_f32().unwrap(), lse.as_f32().unwrap());
    let shape = format!("[{b}, {sq}] over [{b}, {sk}], {heads} heads of {dh}, masked {masked}");
    if sk == 0 {
        assert!(got.iter().all(|&x| x == 0.0), "{shape}: no keys, zeros");
        assert!(
            lse.iter().all(|&l| l == f32::NEG_INFINITY),
            "{shape}: no keys, -inf"
        );
        return;
    }
    if bf16_gemm_path().starts_with("f32 fallback") {
        assert_eq!(
            got,
            want_f32.as_f32().unwrap(),
            "{shape}: no bf16 kernel, so f32"
        );
        return;
    }
    let (qr, kvr) = (bf16_round(&q), bf16_round(&kv));
    let want = attention_slow(
        view(&qr, sq, d, 0),
        view(&kvr, sk, 2 * d, 0),
        view(&kvr, sk, 2 * d, d),
        bias.as_deref(),
        b,
        heads,
        dh,
    );
    let e = rel_l2(got, &want);
    eprintln!("{shape}: rel L2 {e:.2e} vs the reference over bf16 inputs");
    assert!(e <= 4e-3, "{shape}: rel L2 {e}");
    // Rows whose keys are all removed: zeros and a log-sum-exp of -inf, as in f32.
    if masked && b > 1 {
        let last = (b - 1) * sq;
        assert!(got[last * d..].iter().all(|&x| x == 0.0), "{shape}");
        assert!(
            lse[last * heads..].iter().all(|&l| l == f32::NEG_INFINITY),
            "{shape}"
        );
    }
    for (i, (&l, &w)) in lse.iter().zip(lse_f32.as_f32().unwrap()).enumerate() {
        assert!(
            l == w || (l - w).abs() <= 0.05 * w.abs().max(1.0),
            "{shape}: log-sum-exp {i}: {l} vs f32 {w}"
        );
    }
}

#[test]
fn bf16_attention_matches_the_reference_over_bf16_inputs() {
    let mut rng = StdRng::seed_from_u64(3);
    // DiT-like (a fused sequence), a patch of queries over a longer K/V buffer, head dims that
    // are not whole 32-input chunks, query and key counts that are not whole tiles.
    for &(dims, masked) in &[
        ((2, 100, 100, 3, 72), false),
        ((1, 37, 150, 2, 64), false),
        ((3, 70, 45, 2, 40), true),
        ((2, 130, 257, 1, 16), true),
        // No keys at all: zeros and a log-sum-exp of -inf, as in f32.
        ((2, 5, 0, 2, 8), false),
    ] {
        case(&mut rng, dims, masked);
    }
}

#[test]
#[allow(irrefutable_let_patterns)] // irrefutable without the `cuda` feature
fn a_bf16_device_says_so_only_where_it_computes_in_bf16() {
    let Device::Cpu(c) = Device::cpu(1).unwrap().with_compute_dtype(DType::BF16) else {
        panic!("a CPU device stays a CPU device");
    };
    assert_eq!(
        c.bf16_attention(),
        !bf16_gemm_path().starts_with("f32 fallback")
    );
    let Device::Cpu(c) = Device::cpu(1).unwrap().with_compute_dtype(DType::F32) else {
        panic!("a CPU device stays a CPU device");
    };
    assert!(!c.bf16_attention());
}

/// The threads keep their packing buffers between calls: a small problem after a large one
/// whose keys and values were infinite (stale tiles where the small one has padding, and
/// 0 x inf is NaN) gives bitwise what it gives on fresh threads.
#[test]
fn reused_buffers_give_what_fresh_ones_give() {
    let attend =
        |dev: &Device, (b, sq, sk, heads, dh): (usize, usize, usize, usize, usize), inf: bool| {
            let mut rng = StdRng::seed_from_u64(5);
            let d = heads * dh;
            let q = Tensor::from_vec(randn(&mut rng, b * sq * d, 2.0), &[b, sq, d]).unwrap();
            let mut kv = randn(&mut rng, b * sk * 2 * d, 2.0);
            if inf {
                kv.fill(f32::INFINITY);
            }
            let kv = Tensor::from_vec(kv, &[b, sk, 2 * d]).unwrap();
            let (q, k, v) = (
                AttnView::of(&q, 0).unwrap(),
                AttnView::of(&kv, 0).unwrap(),
                AttnView::of(&kv, d).unwrap(),
            );
            dev.attention(q, k, v, None, b, heads, dh)
                .unwrap()
                .as_f32()
                .unwrap()
                .to_vec()
        };
    let (large, small) = ((2, 90, 300, 2, 96), (1, 33, 37, 2, 40));
    let used = Device::cpu(1).unwrap().with_compute_dtype(DType::BF16);
    attend(&used, large, true);
    let after = attend(&used, small, false);
    assert!(after.iter().all(|x| x.is_finite()));
    let fresh = Device::cpu(1).unwrap().with_compute_dtype(DType::BF16);
    assert_eq!(after, attend(&fresh, small, false));
}
