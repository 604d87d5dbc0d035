//! Fast CPU kernels against their slow references, with stated tolerances (f32: relative L2 of
//! the whole output <= 1e-5 unless said; upsampling and transposes exactly).

mod common;

use common::{randn, rel_l2};
use kernels::reference::*;
use kernels::{exp_fast, AttnView, Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

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
        // Up to 4 rows take the few-rows path (feature blocks of 64, dots in lanes of 16).
        let shapes = [
            (1, 3, 5),
            (2, 100, 130),
            (4, 37, 70),
            (3, 1152, 65),
            (5, 33, 17),
        ];
        for &(m, k, n) in shapes
            .iter()
            .chain(&[(7, 33, 17), (130, 96, 200), (512, 64, 3 * 64)])
        {
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

fn conv_case(rng: &mut StdRng, g: ConvGeom, with_bias: bool) {
    let x = randn(rng, g.batch * g.c_in * g.h * g.w, 2.0);
    let w = randn(rng, g.c_out * g.c_in * g.kh * g.kw, 1.0);
    let b = randn(rng, g.c_out, 1.0);
    let want = conv2d_slow(&x, &w, with_bias.then_some(&b[..]), g);
    let xt = Tensor::from_vec(x, &[g.batch, g.c_in, g.h, g.w]).unwrap();
    let wt = Tensor::from_vec(w, &[g.c_out, g.c_in, g.kh, g.kw]).unwrap();
    let bt = Tensor::from_vec(b, &[g.c_out]).unwrap();
    for dev in devices() {
        let y = dev
            .conv2d(&xt, &wt, with_bias.then_some(&bt), g.pad)
            .unwrap();
        assert_eq!(y.shape(), &[g.batch, g.c_out, g.h_out(), g.w_out()]);
        let e = rel_l2(y.as_f32().unwrap(), &want);
        assert!(e < 1e-5, "{g:?} bias {with_bias}: rel l2 {e}");
    }
}

/// 1x1 (the GEMM reads the input in place) and 3x3 with padding 1 (the VAE's two kernels), plus
/// padding 0 and 2, a non-square kernel, a padded 1x1, and an image large enough to be cut into
/// several bands of output rows.
#[test]
fn conv2d_matches_reference() {
    let mut rng = StdRng::seed_from_u64(5);
    let geom = |batch, c_in, h, w, c_out, kh, kw, pad| ConvGeom {
        batch,
        c_in,
        h,
        w,
        c_out,
        kh,
        kw,
        pad,
    };
    for (g, bias) in [
        (geom(2, 5, 7, 9, 6, 1, 1, 0), true),
        (geom(1, 3, 4, 4, 2, 3, 3, 1), false),
        (geom(2, 8, 13, 11, 7, 3, 3, 1), true),
        (geom(1, 4, 6, 5, 3, 3, 3, 0), true),
        (geom(1, 3, 5, 6, 4, 3, 3, 2), true),
        (geom(2, 3, 9, 7, 5, 5, 3, 1), true),
        (geom(1, 4, 5, 5, 3, 1, 1, 1), true),
        (geom(1, 1, 1, 1, 1, 3, 3, 1), true),
        (geom(1, 40, 37, 29, 33, 3, 3, 1), true),
        (geom(3, 24, 40, 36, 16, 1, 1, 0), true),
        // im2col [576, 128*64] exceeds the 4M-element budget: two row bands, the second partial
        (geom(2, 64, 128, 64, 4, 3, 3, 1), true),
        (geom(1, 64, 128, 64, 4, 3, 3, 1), false),
    ] {
        conv_case(&mut rng, g, bias);
    }
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config::with_cases(48))]
    /// Random small shapes: the banded im2col GEMM equals the direct sum.
    #[test]
    fn conv2d_matches_reference_on_random_shapes(
        batch in 1usize..3, c_in in 1usize..6, h in 1usize..12, w in 1usize..12,
        c_out in 1usize..6, k in proptest::sample::select(vec![1usize, 3]), pad in 0usize..3,
        seed in 0u64..1000,
    ) {
        proptest::prop_assume!(h + 2 * pad >= k && w + 2 * pad >= k);
        let g = ConvGeom { batch, c_in, h, w, c_out, kh: k, kw: k, pad };
        conv_case(&mut StdRng::seed_from_u64(seed), g, seed % 2 == 0);
    }
}

#[test]
fn conv2d_rejects_bad_shapes() {
    let dev = Device::cpu(1).unwrap();
    let x = Tensor::zeros(&[1, 4, 2, 2]);
    let err = dev
        .conv2d(&x, &Tensor::zeros(&[8, 3, 3, 3]), None, 1)
        .unwrap_err();
    assert!(err.to_string().contains("conv2d"), "{err}");
    // kernel larger than the padded input
    assert!(dev
        .conv2d(&x, &Tensor::zeros(&[8, 4, 5, 5]), None, 1)
        .is_err());
    assert!(dev
        .conv2d(
            &x,
            &Tensor::zeros(&[8, 4, 3, 3]),
            Some(&Tensor::zeros(&[7])),
            1
        )
        .is_err());
    assert!(dev
        .conv2d(
            &Tensor::zeros(&[4, 2, 2]),
            &Tensor::zeros(&[8, 4, 1, 1]),
            None,
            0
        )
        .is_err());
}

/// Groups of 1, 3, 4 and 12 channels; a mean far from 0 (the variance must not cancel); one long
/// group (1 group over 4 x 128 x 96 elements) where f32 accumulation would drift.
#[test]
fn group_norm_matches_reference() {
    let mut rng = StdRng::seed_from_u64(6);
    for &(b, c, h, w, groups, offset) in &[
        (2, 12, 5, 7, 4, 5.0),
        (1, 12, 3, 3, 12, 0.0),
        (2, 12, 4, 6, 1, -3.0),
        (1, 12, 9, 2, 3, 50.0),
        (1, 4, 128, 96, 1, 20.0),
    ] {
        let x: Vec<f32> = randn(&mut rng, b * c * h * w, 2.0)
            .iter()
            .map(|v| v + offset)
            .collect();
        let (gamma, beta) = (randn(&mut rng, c, 1.0), randn(&mut rng, c, 1.0));
        let xt = Tensor::from_vec(x.clone(), &[b, c, h, w]).unwrap();
        let (gt, bt) = (
            Tensor::from_vec(gamma.clone(), &[c]).unwrap(),
            Tensor::from_vec(beta.clone(), &[c]).unwrap(),
        );
        for dev in devices() {
            let y = dev
                .group_norm(&xt, groups, Some(&gt), Some(&bt), 1e-6)
                .unwrap();
            let want = group_norm_slow(&x, Some(&gamma), Some(&beta), c, groups, h * w, 1e-6);
            let e = rel_l2(y.as_f32().unwrap(), &want);
            assert!(e < 1e-5, "{b}x{c}x{h}x{w}, {groups} groups: rel l2 {e}");
            let y = dev.group_norm(&xt, groups, None, None, 1e-5).unwrap();
            let want = group_norm_slow(&x, None, None, c, groups, h * w, 1e-5);
            assert!(rel_l2(y.as_f32().unwrap(), &want) < 1e-5);
        }
    }
    let dev = Device::cpu(1).unwrap();
    let x = Tensor::zeros(&[1, 6, 2, 2]);
    assert!(dev.group_norm(&x, 4, None, None, 1e-6).is_err());
    assert!(dev.group_norm(&x, 0, None, None, 1e-6).is_err());
    assert!(dev
        .group_norm(&x, 3, Some(&Tensor::zeros(&[5])), None, 1e-6)
        .is_err());
}

#[test]
fn upsample_and_transpose_match_reference_exactly() {
    let mut rng = StdRng::seed_from_u64(7);
    for &(b, c, h, w) in &[(1, 1, 1, 1), (2, 3, 5, 7), (1, 16, 33, 40)] {
        let x = randn(&mut rng, b * c * h * w, 1.0);
        let xt = Tensor::from_vec(x.clone(), &[b, c, h, w]).unwrap();
        for dev in devices() {
            let y = dev.upsample_nearest2x(&xt).unwrap();
            assert_eq!(y.shape(), &[b, c, 2 * h, 2 * w]);
            assert_eq!(y.as_f32().unwrap(), &upsample_nearest2x_slow(&x, h, w)[..]);
            let planes = xt.clone().reshape(&[b, c, h * w]).unwrap();
            let t = dev.transpose_last2(&planes).unwrap();
            assert_eq!(t.shape(), &[b, h * w, c]);
            assert_eq!(t.as_f32().unwrap(), &transpose_last2_slow(&x, c, h * w)[..]);
            let back = dev.transpose_last2(&t).unwrap();
            assert_eq!(back.as_f32().unwrap(), &x[..]);
        }
    }
    let dev = Device::cpu(1).unwrap();
    assert!(dev.upsample_nearest2x(&Tensor::zeros(&[2, 3, 4])).is_err());
    assert!(dev.transpose_last2(&Tensor::zeros(&[2, 3])).is_err());
    let mut s = Tensor::from_vec(vec![-1.0, 0.0, 2.0], &[3]).unwrap();
    dev.silu_(&mut s).unwrap();
    assert!(rel_l2(s.as_f32().unwrap(), &silu_slow(&[-1.0, 0.0, 2.0])) < 1e-6);
}

/// The residual add works on `[B, C, H, W]` as on `[B, n, d]` (the gate is per batch and last
/// dimension); a rank-1 tensor is refused.
#[test]
fn add_gated_accepts_image_shaped_tensors() {
    let dev = Device::cpu(2).unwrap();
    let (b, c, h, w) = (2, 3, 4, 5);
    let n = b * c * h * w;
    let y: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let mut x = Tensor::from_vec(vec![1.0; n], &[b, c, h, w]).unwrap();
    dev.add_gated_(
        &mut x,
        &Tensor::from_vec(y.clone(), &[b, c, h, w]).unwrap(),
        None,
    )
    .unwrap();
    assert!(x
        .as_f32()
        .unwrap()
        .iter()
        .zip(&y)
        .all(|(a, y)| *a == y + 1.0));
    let gate: Vec<f32> = (0..b * w).map(|i| i as f32).collect();
    let mut x = Tensor::zeros(&[b, c, h, w]);
    dev.add_gated_(
        &mut x,
        &Tensor::from_vec(y.clone(), &[b, c, h, w]).unwrap(),
        Some(&Tensor::from_vec(gate.clone(), &[b, w]).unwrap()),
    )
    .unwrap();
    for (i, v) in x.as_f32().unwrap().iter().enumerate() {
        assert_eq!(*v, gate[(i / (c * h * w)) * w + i % w] * y[i]);
    }
    let mut v = Tensor::zeros(&[4]);
    assert!(dev.add_gated_(&mut v, &Tensor::zeros(&[4]), None).is_err());
}

/// Per-head RMSNorm on the Q and K columns of a fused QKV tensor leaves V untouched.
#[test]
fn rms_norm_groups_matches_reference() {
    let mut rng = StdRng::seed_from_u64(21);
    let (b, n, heads, hd) = (2, 5, 3, 8);
    let width = 3 * heads * hd;
    let x = randn(&mut rng, b * n * width, 2.0);
    let w = randn(&mut rng, hd, 1.0);
    for dev in devices() {
        let mut t = Tensor::from_vec(x.clone(), &[b, n, width]).unwrap();
        let wt = Tensor::from_vec(w.clone(), &[hd]).unwrap();
        dev.rms_norm_groups_(&mut t, 0, 2 * heads * hd, &wt, 1e-6)
            .unwrap();
        let want = rms_norm_groups_slow(&x, width, 0, 2 * heads * hd, &w, 1e-6);
        assert!(rel_l2(t.as_f32().unwrap(), &want) < 1e-6);
        let v = 2 * heads * hd;
        for r in 0..b * n {
            assert_eq!(
                t.as_f32().unwrap()[r * width + v..(r + 1) * width],
                x[r * width + v..(r + 1) * width]
            );
        }
        let e = dev.rms_norm_groups_(&mut t, 40, 2 * heads * hd, &wt, 1e-6);
        assert!(e.unwrap_err().to_string().contains("do not fit"));
    }
}

/// Rotary embedding on the Q and K columns of a fused QKV tensor (interleaved pairs) leaves V
/// untouched; a rotation by angle 0 is the identity.
#[test]
fn rope_matches_reference() {
    let mut rng = StdRng::seed_from_u64(22);
    let (b, s, heads, hd) = (2, 7, 3, 8);
    let width = 3 * heads * hd;
    let x = randn(&mut rng, b * s * width, 1.0);
    let ang = randn(&mut rng, s * hd / 2, 3.0);
    let (cos, sin): (Vec<f32>, Vec<f32>) = ang
        .iter()
        .flat_map(|a| [(a.cos(), a.sin()), (a.cos(), a.sin())])
        .unzip();
    for dev in devices() {
        let mut t = Tensor::from_vec(x.clone(), &[b, s, width]).unwrap();
        let (ct, st) = (
            Tensor::from_vec(cos.clone(), &[s, hd]).unwrap(),
            Tensor::from_vec(sin.clone(), &[s, hd]).unwrap(),
        );
        dev.rope_(&mut t, 0, 2 * heads * hd, &ct, &st).unwrap();
        let want = rope_slow(&x, width, s, 0, 2 * heads * hd, &cos, &sin);
        assert!(rel_l2(t.as_f32().unwrap(), &want) < 1e-6);
        let v = 2 * heads * hd;
        assert_eq!(t.as_f32().unwrap()[v..width], x[v..width]);
        // Norms of each pair are kept.
        let (a, b0) = (x[0], x[1]);
        let (a2, b2) = (t.as_f32().unwrap()[0], t.as_f32().unwrap()[1]);
        assert!(((a * a + b0 * b0) - (a2 * a2 + b2 * b2)).abs() < 1e-4);
        let ones = Tensor::from_vec(vec![1.0; s * hd], &[s, hd]).unwrap();
        let zeros = Tensor::from_vec(vec![0.0; s * hd], &[s, hd]).unwrap();
        let mut id = Tensor::from_vec(x.clone(), &[b, s, width]).unwrap();
        dev.rope_(&mut id, 0, width, &ones, &zeros).unwrap();
        assert_eq!(id.as_f32().unwrap(), &x[..]);
        let e = dev.rope_(&mut id, 8, width, &ones, &zeros).unwrap_err();
        assert!(e.to_string().contains("do not fit"), "{e}");
    }
}
