//! The bf16 linear (`Device::linear_bf16`: AMX tiles or AVX512-BF16 where the CPU has them) against its
//! reference (`bf16(x) · W^T + b` in f64 over the same bf16-rounded operands): the products of
//! bf16 values are exact in f32, so only the summation order differs; tolerance relative L2
//! 1e-5 of the whole output. Shapes cover every edge: rows, columns and inputs that are not
//! whole tiles (1, 15, 17, 33 ...), one row, long inputs, row blocks in several
//! cache groups, and the DiT-XL/2 shapes.

mod common;

use common::{randn, rel_l2};
use kernels::reference::{gelu_tanh_slow, linear_bf16_slow, linear_slow};
use kernels::{bf16_bits, bf16_gemm_path, bf16_to_f32, Device, PackedBf16, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

#[test]
fn bf16_rounding_is_round_to_nearest_even() {
    for x in [
        1.0f32,
        -2.5,
        std::f32::consts::PI,
        1e-30,
        6.5e4,
        f32::MAX,
        f32::INFINITY,
    ] {
        assert_eq!(bf16_bits(x), half::bf16::from_f32(x).to_bits(), "{x}");
    }
    // Ties go to even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7.
    assert_eq!(bf16_to_f32(bf16_bits(1.0 + 1.0 / 256.0)), 1.0);
    assert_eq!(bf16_to_f32(bf16_bits(1.0 + 3.0 / 256.0)), 1.0 + 4.0 / 256.0);
    assert!(bf16_to_f32(bf16_bits(f32::NAN)).is_nan());
}

#[test]
fn packing_keeps_every_element() {
    let mut rng = StdRng::seed_from_u64(3);
    for (n, k) in [(1, 1), (17, 33), (32, 64), (50, 70)] {
        let w = randn(&mut rng, n * k, 1.0);
        let p = PackedBf16::from_f32(&w, n, k);
        let back = p.unpack_f32();
        for (i, (&a, &b)) in w.iter().zip(&back).enumerate() {
            assert_eq!(bf16_to_f32(bf16_bits(a)), b, "element {i} of [{n}, {k}]");
        }
    }
}

#[test]
fn linear_bf16_matches_the_reference_on_every_edge() {
    // This CPU's path is the one tested; on an AMX or AVX512-BF16 host it must be that kernel
    // (not a silent fallback).
    // AMX is Linux-only here (the kernel asks Linux for the tile state); AVX512-BF16 by CPUID.
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let not_off = |off: &str| std::env::var_os(off).is_none_or(|v| v == "0");
    #[cfg(target_arch = "x86_64")]
    let avx512_bf16 = std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bf16");
    #[cfg(not(target_arch = "x86_64"))]
    let avx512_bf16 = false;
    let want = if cpuinfo.contains(" amx_bf16") && not_off("PIPEFUSE_NO_AMX") {
        "amx-bf16"
    } else if avx512_bf16 && not_off("PIPEFUSE_NO_AVX512_BF16") {
        "avx512-bf16 8x48 kernel"
    } else {
        "f32 fallback (no AMX or AVX512-BF16)"
    };
    eprintln!("bf16 GEMM path: {}", bf16_gemm_path());
    assert_eq!(bf16_gemm_path(), want);
    let mut rng = StdRng::seed_from_u64(11);
    let shapes = [
        (1, 1, 1),
        (1, 64, 32),
        (15, 17, 33),
        (33, 95, 31),
        (64, 64, 64),
        // Features in 1, 2, 3, 5 and 7 blocks of 16 (partial triples); fewer triples than
        // threads (rows split between tasks).
        (9, 40, 16),
        (130, 64, 40),
        (300, 70, 80),
        (11, 33, 100),
        (70, 130, 200),
        (512, 1152, 96),
        // Long rows: row blocks in several L2 groups.
        (256, 4608, 40),
    ];
    for dev in [Device::cpu(1).unwrap(), Device::cpu(2).unwrap()] {
        // Up and down again: a small product after a large one reuses the kernel's scratch
        // buffer, whose padding must not keep the larger product's values.
        for &(m, k, n) in shapes.iter().chain(shapes.iter().rev()) {
            let x = randn(&mut rng, m * k, 1.0);
            let w = randn(&mut rng, n * k, 1.0);
            let b = randn(&mut rng, n, 1.0);
            let packed = PackedBf16::from_f32(&w, n, k);
            let want = linear_bf16_slow(&x, &packed, Some(&b), m);
            let xt = Tensor::from_vec(x.clone(), &[m, k]).unwrap();
            let bt = Tensor::from_vec(b.clone(), &[n]).unwrap();
            let got = dev.linear_bf16(&xt, &packed, Some(&bt)).unwrap();
            assert_eq!(got.shape(), &[m, n]);
            let e = rel_l2(got.as_f32().unwrap(), &want);
            assert!(
                e <= 1e-5,
                "{} [{m}, {k}] x [{n}, {k}]: rel L2 {e}",
                dev.name()
            );
            let nobias = dev.linear_bf16(&xt, &packed, None).unwrap();
            let want = linear_bf16_slow(&x, &packed, None, m);
            let e = rel_l2(nobias.as_f32().unwrap(), &want);
            assert!(e <= 1e-5, "no bias, [{m}, {k}] x [{n}, {k}]: rel L2 {e}");
            // And within bf16's rounding of the f32 product (8 bits of mantissa per operand).
            let f32_ref = linear_slow(&x, &w, Some(&b), m, k, n);
            let e = rel_l2(got.as_f32().unwrap(), &f32_ref);
            assert!(e <= 1e-2, "[{m}, {k}] x [{n}, {k}] vs f32: rel L2 {e}");
        }
    }
}

/// The fused GELU epilogue equals the bf16 linear followed by the reference GELU.
#[test]
fn linear_bf16_gelu_fuses_the_activation() {
    let mut rng = StdRng::seed_from_u64(5);
    let dev = Device::cpu(2).unwrap();
    for &(m, k, n) in &[(33, 95, 70), (512, 1152, 64)] {
        let x = randn(&mut rng, m * k, 1.0);
        let w = randn(&mut rng, n * k, 1.0);
        let b = randn(&mut rng, n, 1.0);
        let packed = PackedBf16::from_f32(&w, n, k);
        let want = gelu_tanh_slow(&linear_bf16_slow(&x, &packed, Some(&b), m));
        let xt = Tensor::from_vec(x, &[m, k]).unwrap();
        let bt = Tensor::from_vec(b, &[n]).unwrap();
        let got = dev.linear_bf16_gelu(&xt, &packed, Some(&bt)).unwrap();
        let e = rel_l2(got.as_f32().unwrap(), &want);
        assert!(e <= 1e-5, "[{m}, {k}] x [{n}, {k}]: rel L2 {e}");
    }
}

/// The feed-forward's hand-over in bf16: `linear_bf16_gelu_bf16` gives bitwise the f32 output
/// of `linear_bf16_gelu` rounded to nearest even, and `linear_bf16` of those bf16 rows gives
/// bitwise what it gives for their f32 values (so fc1 -> fc2 in bf16 changes no number). Inputs
/// that are whole 32-input chunks (read in place) and not (copied), one and two threads. An
/// f16 input is refused by name.
#[test]
fn bf16_hand_over_changes_no_number() {
    let mut rng = StdRng::seed_from_u64(8);
    for threads in [1, 2] {
        let dev = Device::cpu(threads).unwrap();
        for &(m, k, n, n2) in &[(33, 95, 70, 17), (512, 1152, 128, 64), (7, 64, 33, 40)] {
            let x = Tensor::from_vec(randn(&mut rng, m * k, 1.0), &[m, k]).unwrap();
            let w1 = PackedBf16::from_f32(&randn(&mut rng, n * k, 1.0), n, k);
            let b1 = Tensor::from_vec(randn(&mut rng, n, 1.0), &[n]).unwrap();
            let w2 = PackedBf16::from_f32(&randn(&mut rng, n2 * n, 1.0), n2, n);
            let f32_out = dev.linear_bf16_gelu(&x, &w1, Some(&b1)).unwrap();
            let bf16_out = dev.linear_bf16_gelu_bf16(&x, &w1, Some(&b1)).unwrap();
            let shape = format!("[{m}, {k}] x [{n}, {k}] x [{n2}, {n}], {threads} threads");
            assert_eq!(bf16_out.dtype(), kernels::DType::BF16, "{shape}");
            assert_eq!(bf16_out.shape(), f32_out.shape(), "{shape}");
            let kernels::Storage::Cpu(kernels::CpuStorage::BF16(bits)) = bf16_out.storage() else {
                panic!("{shape}: a host bf16 tensor");
            };
            let rounded: Vec<u16> = f32_out
                .as_f32()
                .unwrap()
                .iter()
                .map(|&v| bf16_bits(v))
                .collect();
            let bits: Vec<u16> = bits.iter().map(|b| b.to_bits()).collect();
            assert_eq!(bits, rounded, "{shape}: fc1's bf16 output");
            let from_f32 = dev.linear_bf16(&f32_out, &w2, None).unwrap();
            let from_bf16 = dev.linear_bf16(&bf16_out, &w2, None).unwrap();
            let same = from_f32
                .as_f32()
                .unwrap()
                .iter()
                .zip(from_bf16.as_f32().unwrap());
            assert!(
                same.clone().all(|(a, b)| a.to_bits() == b.to_bits()),
                "{shape}: fc2"
            );
        }
    }
    let dev = Device::cpu(1).unwrap();
    let w = PackedBf16::from_f32(&[0.5; 6], 2, 3);
    let x = Tensor::from_vec(vec![1.0; 3], &[1, 3])
        .unwrap()
        .to_dtype(kernels::DType::F16)
        .unwrap();
    let e = dev.linear_bf16(&x, &w, None).unwrap_err().to_string();
    assert!(e.contains("linear_bf16") && e.contains("f16"), "{e}");
}

#[test]
fn linear_bf16_refuses_mismatched_shapes() {
    let dev = Device::cpu(1).unwrap();
    let w = PackedBf16::from_f32(&[0.0; 6], 2, 3);
    let x = Tensor::from_vec(vec![0.0; 4], &[1, 4]).unwrap();
    let e = dev.linear_bf16(&x, &w, None).unwrap_err().to_string();
    assert!(e.contains("linear_bf16"), "{e}");
    let x = Tensor::from_vec(vec![0.0; 3], &[1, 3]).unwrap();
    let b = Tensor::from_vec(vec![0.0; 3], &[3]).unwrap();
    let e = dev.linear_bf16(&x, &w, Some(&b)).unwrap_err().to_string();
    assert!(e.contains("bias"), "{e}");
}

/// A product after one whose inputs were not finite: the kernel's reused bf16 copy of `x` must
/// be zero in its padding (a stale infinity times a zero-padded weight would be NaN).
#[test]
fn linear_bf16_after_non_finite_inputs_is_unaffected() {
    let mut rng = StdRng::seed_from_u64(7);
    let dev = Device::cpu(1).unwrap();
    let (m, k, n) = (64, 128, 32);
    let w = PackedBf16::from_f32(&randn(&mut rng, n * k, 1.0), n, k);
    let inf = Tensor::from_vec(vec![f32::INFINITY; m * k], &[m, k]).unwrap();
    dev.linear_bf16(&inf, &w, None).unwrap();
    let (m, k, n) = (17, 95, 31);
    let x = randn(&mut rng, m * k, 1.0);
    let packed = PackedBf16::from_f32(&randn(&mut rng, n * k, 1.0), n, k);
    let got = dev
        .linear_bf16(
            &Tensor::from_vec(x.clone(), &[m, k]).unwrap(),
            &packed,
            None,
        )
        .unwrap();
    let e = rel_l2(
        got.as_f32().unwrap(),
        &linear_bf16_slow(&x, &packed, None, m),
    );
    assert!(e <= 1e-5, "after a product of infinities: rel L2 {e}");
}
