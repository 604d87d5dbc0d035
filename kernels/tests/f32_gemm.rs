//! The f32 linear on weights packed at load (`Device::linear_packed`: the AVX-512 8x48 kernel
//! where the CPU has AVX-512F, the AVX2 6x16 one where it has AVX2 and FMA, the `gemm` crate
//! elsewhere; `PIPEFUSE_F32_GEMM` picks one) against `linear_slow` (f64
//! accumulation). Tolerance per element: 1e-6 x (|b| + sum |x_k w_k|) + 1e-30, the rounding
//! of k f32 products and sums in any order (k <= 1300 here; the bound holds with room). Shapes
//! cover every edge of both kernels: rows that are not whole 8-row blocks, 6-row panels or
//! 128-row groups, features that are not whole 48- or 16-wide panels, inputs that are not whole
//! 384- or 576-element blocks, fewer panels than threads (rows split instead), more rows than
//! the AVX2 kernel packs at once (1024).

mod common;

use common::randn;
use kernels::reference::{gelu_tanh_slow, linear_slow};
use kernels::{f32_kernel, Device, F32Kernel, PackedF32, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// Asserts `got` is within the rounding bound of the f64 reference for every element.
fn check(got: &[f32], x: &[f32], w: &[f32], b: Option<&[f32]>, (m, k, n): (usize, usize, usize)) {
    let want = linear_slow(x, w, b, m, k, n);
    assert_eq!(got.len(), want.len());
    for i in 0..m {
        for j in 0..n {
            let mag: f64 = (0..k)
                .map(|t| (x[i * k + t] as f64 * w[j * k + t] as f64).abs())
                .sum::<f64>()
                + b.map_or(0.0, |b| b[j].abs() as f64);
            let (g, r) = (got[i * n + j] as f64, want[i * n + j] as f64);
            assert!(
                (g - r).abs() <= 1e-6 * mag + 1e-30,
                "[{m}, {k}] x [{n}, {k}]^T at ({i}, {j}): {g} vs {r} (magnitude {mag})"
            );
        }
    }
}

#[test]
fn packed_linear_matches_the_f64_reference_on_every_edge() {
    let mut rng = StdRng::seed_from_u64(11);
    let shapes = [
        (1, 1, 1),
        (1, 300, 47),
        (3, 129, 48),
        (8, 128, 49),
        (9, 127, 96),
        (13, 256, 100),
        (130, 300, 145),
        (257, 1300, 50),
        (1100, 40, 33),
    ];
    for threads in [1, 2, 3] {
        let dev = Device::cpu(threads).unwrap();
        for &(m, k, n) in &shapes {
            let x = randn(&mut rng, m * k, 1.0);
            let w = randn(&mut rng, n * k, 0.1);
            let b = randn(&mut rng, n, 1.0);
            let p = PackedF32::pack(&w, n, k);
            assert_eq!((p.n(), p.k()), (n, k));
            let xt = Tensor::from_vec(x.clone(), &[m, k]).unwrap();
            let bt = Tensor::from_vec(b.clone(), &[n]).unwrap();
            let y = dev.linear_packed(&xt, &p, Some(&bt)).unwrap();
            assert_eq!(y.shape(), &[m, n]);
            check(y.as_f32().unwrap(), &x, &w, Some(&b), (m, k, n));
            let y = dev.linear_packed(&xt, &p, None).unwrap();
            check(y.as_f32().unwrap(), &x, &w, None, (m, k, n));
        }
    }
}

#[test]
fn packed_linear_gelu_is_gelu_of_the_linear() {
    let mut rng = StdRng::seed_from_u64(12);
    let dev = Device::cpu(2).unwrap();
    for (m, k, n) in [(5, 70, 60), (40, 260, 200)] {
        let x = randn(&mut rng, m * k, 1.0);
        let w = randn(&mut rng, n * k, 0.1);
        let b = randn(&mut rng, n, 1.0);
        let p = PackedF32::pack(&w, n, k);
        let xt = Tensor::from_vec(x.clone(), &[m, k]).unwrap();
        let bt = Tensor::from_vec(b.clone(), &[n]).unwrap();
        let got = dev.linear_packed_gelu(&xt, &p, Some(&bt)).unwrap();
        let want = gelu_tanh_slow(&linear_slow(&x, &w, Some(&b), m, k, n));
        for (i, (g, r)) in got.as_f32().unwrap().iter().zip(&want).enumerate() {
            assert!(
                (g - r).abs() <= 2e-5 * (1.0 + r.abs()),
                "[{m}, {k}, {n}] element {i}: {g} vs {r}"
            );
        }
    }
}

#[test]
fn packing_keeps_every_element_and_names_its_kernel() {
    let mut rng = StdRng::seed_from_u64(13);
    for (n, k) in [(1, 1), (47, 3), (48, 130), (97, 20)] {
        let w = randn(&mut rng, n * k, 1.0);
        let p = PackedF32::pack(&w, n, k);
        for j in 0..n {
            for t in 0..k {
                assert_eq!(p.get(j, t), w[j * k + t], "({j}, {t}) of [{n}, {k}]");
            }
        }
        assert_eq!(p.path(), f32_kernel().name());
        // Padding to whole panels costs at most one panel.
        let nr = match f32_kernel() {
            F32Kernel::Avx512 => 48,
            F32Kernel::Avx2 => 16,
            F32Kernel::GemmCrate => 1,
        };
        assert!(p.size_in_bytes() <= (n.div_ceil(nr) * nr) * k * 4);
    }
}

#[test]
fn non_finite_inputs_reach_only_their_own_outputs() {
    // An infinity in row 2 of x makes row 2 non-finite and leaves the other rows exact; the
    // zero padding of the last panel must not turn into NaN in the real columns.
    let (m, k, n) = (10, 40, 50);
    let mut rng = StdRng::seed_from_u64(14);
    let mut x = randn(&mut rng, m * k, 1.0);
    x[2 * k + 7] = f32::INFINITY;
    let w = randn(&mut rng, n * k, 0.1);
    let p = PackedF32::pack(&w, n, k);
    let dev = Device::cpu(2).unwrap();
    let y = dev
        .linear_packed(&Tensor::from_vec(x.clone(), &[m, k]).unwrap(), &p, None)
        .unwrap();
    let y = y.as_f32().unwrap();
    for i in 0..m {
        let row = &y[i * n..][..n];
        assert_eq!(
            row.iter().all(|v| v.is_finite()),
            i != 2,
            "row {i}: {row:?}"
        );
    }
}

#[test]
fn a_weight_of_the_wrong_width_is_refused() {
    let dev = Device::cpu(1).unwrap();
    let p = PackedF32::pack(&[0.0; 12], 3, 4);
    let x = Tensor::from_vec(vec![0.0; 10], &[2, 5]).unwrap();
    let e = dev.linear_packed(&x, &p, None).unwrap_err().to_string();
    assert!(e.contains("linear_packed") && e.contains("[2, 5]"), "{e}");
    let b = Tensor::from_vec(vec![0.0; 2], &[2]).unwrap();
    let x = Tensor::from_vec(vec![0.0; 8], &[2, 4]).unwrap();
    let e = dev.linear_packed(&x, &p, Some(&b)).unwrap_err().to_string();
    assert!(e.contains("bias"), "{e}");
}

#[test]
fn one_device_used_from_two_threads_at_once_gives_each_its_own_product() {
    // Two callers share one device's pool: while one product's thread waits for its tasks, the
    // pool may run the other's on it (the AVX2 kernel's packing buffer must not be shared).
    let mut rng = StdRng::seed_from_u64(15);
    let dev = Device::cpu(2).unwrap();
    let products: Vec<_> = [(200, 300, 100), (90, 700, 40)]
        .into_iter()
        .map(|(m, k, n)| {
            let x = Tensor::from_vec(randn(&mut rng, m * k, 1.0), &[m, k]).unwrap();
            let p = PackedF32::pack(&randn(&mut rng, n * k, 0.1), n, k);
            let want = dev.linear_packed(&x, &p, None).unwrap();
            (x, p, want)
        })
        .collect();
    std::thread::scope(|s| {
        for (x, p, want) in &products {
            let dev = dev.clone();
            s.spawn(move || {
                for _ in 0..30 {
                    let got = dev.linear_packed(x, p, None).unwrap();
                    assert_eq!(got.as_f32().unwrap(), want.as_f32().unwrap());
                }
            });
        }
    });
}
