//! Fast CPU kernels against their slow references, with stated tolerances (f32: relative L2 of
//! the whole output <= 1e-5 unless said).

use kernels::reference::*;
use kernels::{exp_fast, AttnView, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn randn(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect()
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

fn devices() -> Vec<Device> {
    vec![Device::cpu(1).unwrap(), Device::cpu(2).unwrap()]
}

#[test]
fn exp_fast_matches_std_exp() {
    let mut worst = 0f64;
    for i in 0..200_000 {
        let x = -87.0 + i as f32 * (175.0 / 200_000.0);
        let (a, b) = (exp_fast(x) as f64, (x as f64).exp());
        worst = worst.max(((a - b) / b).abs());
    }
    assert!(worst < 4e-7, "worst relative error {worst}");
    assert_eq!(exp_fast(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp_fast(-100.0), 0.0);
}

#[test]
fn linear_matches_reference() {
    let mut rng = StdRng::seed_from_u64(1);
    for dev in devices() {
        for &(m, k, n) in &[(1, 3, 5), (7, 33, 17), (130, 96, 200), (512, 64, 3 * 64)] {
            let (x, w, b) = (
                randn(&mut rng, m * k, 1.0),
                randn(&mut rng, n * k, 1.0),
                randn(&mut rng, n, 1.0),
            );
            let xt = Tensor::from_vec(x.clone(), &[m, k]).unwrap();
            let wt = Tensor::from_vec(w.clone(), &[n, k]).unwrap();
            let bt = Tensor::from_vec(b.clone(), &[n]).unwrap();
            let y = dev.linear(&xt, &wt, Some(&bt)).unwrap();
            assert!(rel_l2(y.as_f32().unwrap(), &linear_slow(&x, &w, Some(&b), m, k, n)) < 1e-5);
            let y = dev.linear(&xt, &wt, None).unwrap();
            assert!(rel_l2(y.as_f32().unwrap(), &linear_slow(&x, &w, None, m, k, n)) < 1e-5);
        }
    }
}

#[test]
fn linear_rejects_mismatched_shapes() {
    let dev = Device::cpu(1).unwrap();
    let err = dev
        .linear(&Tensor::zeros(&[2, 3]), &Tensor::zeros(&[4, 5]), None)
        .unwrap_err();
    assert!(err.to_string().contains("linear"), "{err}");
}

#[test]
fn activations_match_reference() {
    let mut rng = StdRng::seed_from_u64(2);
    let x = randn(&mut rng, 50_000, 12.0);
    for dev in devices() {
        let mut t = Tensor::from_vec(x.clone(), &[x.len()]).unwrap();
        dev.gelu_tanh_(&mut t).unwrap();
        let max_abs = t
            .as_f32()
            .unwrap()
            .iter()
            .zip(gelu_tanh_slow(&x))
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max_abs < 5e-6, "gelu max abs err {max_abs}");
        let s = dev
            .silu(&Tensor::from_vec(x.clone(), &[x.len()]).unwrap())
            .unwrap();
        assert!(rel_l2(s.as_f32().unwrap(), &silu_slow(&x)) < 1e-6);
    }
}

#[test]
fn layer_norms_match_reference() {
    let mut rng = StdRng::seed_from_u64(3);
    let (b, n, d) = (3, 17, 96);
    let x: Vec<f32> = randn(&mut rng, b * n * d, 3.0)
        .iter()
        .map(|v| v + 5.0)
        .collect();
    let (sh, sc) = (randn(&mut rng, b * d, 1.0), randn(&mut rng, b * d, 1.0));
    for dev in devices() {
        let xt = Tensor::from_vec(x.clone(), &[b, n, d]).unwrap();
        let y = dev
            .layer_norm_modulate(
                &xt,
                &Tensor::from_vec(sh.clone(), &[b, d]).unwrap(),
                &Tensor::from_vec(sc.clone(), &[b, d]).unwrap(),
                1e-6,
            )
            .unwrap();
        assert!(
            rel_l2(
                y.as_f32().unwrap(),
                &layer_norm_modulate_slow(&x, &sh, &sc, b, d, 1e-6)
            ) < 1e-5
        );
        let y = dev.layer_norm(&xt, None, None, 1e-5).unwrap();
        assert!(rel_l2(y.as_f32().unwrap(), &layer_norm_slow(&x, d, 1e-5)) < 1e-5);
    }
}

/// Q is a strided slice of a fused QKV tensor; K/V are a separate, longer buffer (PipeFusion's
/// patch-against-full-buffer case); sequence lengths are not multiples of the tile sizes.
#[test]
fn attention_matches_reference_on_strided_views_and_long_keys() {
    let mut rng = StdRng::seed_from_u64(4);
    let (batch, heads, dh) = (2, 3, 24);
    let d = heads * dh;
    for &(sq, sk) in &[(1, 1), (37, 37), (70, 300), (129, 700)] {
        let qkv = Tensor::from_vec(
            randn(&mut rng, batch * sq * 3 * d, 2.0),
            &[batch, sq, 3 * d],
        )
        .unwrap();
        let kv = Tensor::from_vec(
            randn(&mut rng, batch * sk * 2 * d, 2.0),
            &[batch, sk, 2 * d],
        )
        .unwrap();
        let q = AttnView::of(&qkv, d).unwrap();
        let (k, v) = (AttnView::of(&kv, 0).unwrap(), AttnView::of(&kv, d).unwrap());
        let mut bias = randn(&mut rng, batch * sk, 3.0);
        bias[sk - 1] = f32::NEG_INFINITY; // a removed key
        let bias_t = Tensor::from_vec(bias.clone(), &[batch, sk]).unwrap();
        let want = attention_slow(
            kernels_input(&q),
            kernels_input(&k),
            kernels_input(&v),
            Some(&bias),
            batch,
            heads,
            dh,
        );
        for dev in devices() {
            let got = dev
                .attention(q, k, v, Some(&bias_t), batch, heads, dh)
                .unwrap();
            let e = rel_l2(got.as_f32().unwrap(), &want);
            assert!(e < 1e-5, "sq={sq} sk={sk}: rel l2 {e}");
        }
    }
}

#[test]
fn attention_with_every_key_masked_gives_zeros() {
    let (batch, heads, dh, s) = (1, 2, 8, 5);
    let x = Tensor::from_vec(
        vec![0.5; batch * s * 2 * heads * dh],
        &[batch, s, 2 * heads * dh],
    )
    .unwrap();
    let bias = Tensor::from_vec(vec![f32::NEG_INFINITY; s], &[1, s]).unwrap();
    let v = AttnView::of(&x, 0).unwrap();
    let out = Device::cpu(1)
        .unwrap()
        .attention(v, v, v, Some(&bias), batch, heads, dh)
        .unwrap();
    assert!(out.as_f32().unwrap().iter().all(|&o| o == 0.0));
}

fn kernels_input<'a>(v: &AttnView<'a>) -> kernels::reference::SlowAttnInput<'a> {
    kernels::reference::SlowAttnInput {
        data: v.tensor.as_f32().unwrap(),
        seq: v.seq,
        batch_stride: v.batch_stride,
        row_stride: v.row_stride,
        col_offset: v.col_offset,
    }
}

#[test]
fn patchify_unpatchify_round_trip_layouts() {
    // With C*p*p == p*p*C channels and an identity "projection", patchify followed by a
    // channel permutation then unpatchify must return the input strip.
    let dev = Device::cpu(1).unwrap();
    let (b, c, h, w, p) = (2, 3, 8, 12, 2);
    let x: Vec<f32> = (0..b * c * h * w).map(|i| i as f32).collect();
    let lat = Tensor::from_vec(x.clone(), &[b, c, h, w]).unwrap();
    let rows = 1..3;
    let patches = dev.patchify(&lat, p, rows.clone()).unwrap(); // [B, 2*6, C*p*p] in (c, ky, kx)
    let pv = patches.as_f32().unwrap();
    let feat = c * p * p;
    let mut permuted = vec![0f32; pv.len()];
    for (t, chunk) in pv.chunks(feat).enumerate() {
        for ch in 0..c {
            for ky in 0..p {
                for kx in 0..p {
                    permuted[t * feat + (ky * p + kx) * c + ch] = chunk[(ch * p + ky) * p + kx];
                }
            }
        }
    }
    let tok = Tensor::from_vec(permuted, patches.shape()).unwrap();
    let strip = dev.unpatchify(&tok, c, rows.len(), w, p).unwrap();
    let want = lat.narrow(2, rows.start * p, rows.len() * p).unwrap();
    assert_eq!(strip.as_f32().unwrap(), want.as_f32().unwrap());
}

#[test]
fn embedding_rejects_out_of_range_ids() {
    let dev = Device::cpu(1).unwrap();
    let table = Tensor::from_vec((0..6).map(|i| i as f32).collect(), &[3, 2]).unwrap();
    assert_eq!(
        dev.embedding(&table, &[2, 0]).unwrap().as_f32().unwrap(),
        &[4.0, 5.0, 0.0, 1.0]
    );
    assert!(dev.embedding(&table, &[3]).is_err());
}

#[test]
fn cuda_device_reports_missing_backend() {
    let err = Device::cuda(0).unwrap_err();
    assert!(err.to_string().contains("no CUDA backend"), "{err}");
}

#[test]
fn degenerate_shapes_and_views_are_errors_not_panics() {
    let dev = Device::cpu(2).unwrap();
    let empty = Tensor::zeros(&[2, 3, 0]);
    assert!(dev.layer_norm(&empty, None, None, 1e-5).is_err());
    assert!(dev
        .layer_norm_modulate(&empty, &Tensor::zeros(&[0]), &Tensor::zeros(&[0]), 1e-5)
        .is_err());
    let mut e2 = empty.clone();
    assert!(dev.add_gated_(&mut e2, &empty, None).is_err());
    assert!(dev
        .patchify(&Tensor::zeros(&[1, 0, 4, 4]), 2, 0..2)
        .is_err());
    assert!(dev
        .linear(&Tensor::zeros(&[2, 0]), &Tensor::zeros(&[3, 0]), None)
        .is_err());
    // A view whose strides overflow or exceed its tensor is refused before any kernel runs.
    let t = Tensor::zeros(&[1, 4, 8]);
    let mut v = AttnView::of(&t, 0).unwrap();
    v.row_stride = usize::MAX / 2;
    assert!(dev.attention(v, v, v, None, 1, 2, 4).is_err());
    let mut v = AttnView::of(&t, 0).unwrap();
    v.col_offset = 1;
    assert!(dev.attention(v, v, v, None, 1, 2, 4).is_err());
}
