//! The cuBLASLt call behind `Device::linear` on CUDA, checked without a GPU: the row-major
//! linear layer `Y = X W^T + b` becomes a column-major cuBLASLt product (`blas::linear_plan`:
//! which operand is A, which is transposed, the leading dimensions, the bias as cuBLASLt's
//! per-row bias). An emulation of cuBLASLt's definition (column-major storage, `op()` by the
//! transpose flags, `D = op(A) op(B) + bias[row]`) applied to that plan must give the CPU's
//! reference linear layer for any shape; with the GELU epilogue, the reference linear layer
//! followed by the reference tanh GELU. The epilogue chosen for each bias / activation and the
//! operand alignment the plan cache keys on are checked against cuBLASLt's documented values.
#![cfg(feature = "cuda")]

use cudarc::cublaslt::sys::cublasLtEpilogue_t as E;
use kernels::cuda::blas::{common_alignment, epilogue, linear_plan, Activation, ColumnMajorGemm};
use kernels::reference::{gelu_tanh_slow, linear_slow};
use proptest::prelude::*;

/// cuBLASLt's `D = epilogue(op(A) op(B))` on column-major buffers, from its documented
/// definition: the epilogue's bias (`bias[row]`) and GELU as `epilogue` names them.
fn emulate_epilogue(
    plan: ColumnMajorGemm,
    a: &[f32],
    b: &[f32],
    bias: Option<&[f32]>,
    epilogue: E,
) -> Vec<f32> {
    let takes_bias = matches!(
        epilogue,
        E::CUBLASLT_EPILOGUE_BIAS | E::CUBLASLT_EPILOGUE_GELU_BIAS
    );
    assert_eq!(
        takes_bias,
        bias.is_some(),
        "{epilogue:?} with bias {:?}",
        bias.is_some()
    );
    let mut d = emulate(plan, a, b, bias);
    if matches!(
        epilogue,
        E::CUBLASLT_EPILOGUE_GELU | E::CUBLASLT_EPILOGUE_GELU_BIAS
    ) {
        d = gelu_tanh_slow(&d);
    }
    d
}

/// cuBLASLt's `D = op(A) op(B) + bias` on column-major buffers, from its documented definition.
fn emulate(plan: ColumnMajorGemm, a: &[f32], b: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let (m, n, k) = (plan.m as usize, plan.n as usize, plan.k as usize);
    let (lda, ldb, ldc) = (plan.lda as usize, plan.ldb as usize, plan.ldc as usize);
    let (ar, ac) = plan.a_stored();
    let (br, bc) = plan.b_stored();
    assert!(
        lda >= ar as usize && ldb >= br as usize && ldc >= m,
        "leading dimensions"
    );
    assert!(a.len() >= lda * (ac as usize - 1) + ar as usize, "A buffer");
    assert!(b.len() >= ldb * (bc as usize - 1) + br as usize, "B buffer");
    // Element (i, j) of a stored column-major matrix with leading dimension ld.
    let at = |buf: &[f32], ld: usize, i: usize, j: usize| buf[i + j * ld];
    let op_a = |i: usize, p: usize| {
        if plan.transa {
            at(a, lda, p, i)
        } else {
            at(a, lda, i, p)
        }
    };
    let op_b = |p: usize, j: usize| {
        if plan.transb {
            at(b, ldb, j, p)
        } else {
            at(b, ldb, p, j)
        }
    };
    let mut d = vec![f32::NAN; ldc * n];
    for j in 0..n {
        for i in 0..m {
            let mut acc = bias.map_or(0.0, |b| b[i] as f64);
            for p in 0..k {
                acc += op_a(i, p) as f64 * op_b(p, j) as f64;
            }
            d[i + j * ldc] = acc as f32;
        }
    }
    d
}

fn values(len: usize, seed: u64) -> Vec<f32> {
    (0..len)
        .map(|i| ((((i as u64 + 1) * 2654435761) ^ seed) % 1000) as f32 / 250.0 - 2.0)
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn linear_plan_computes_the_row_major_linear_layer(
        rows in 1usize..9, k in 1usize..9, n in 1usize..9, bias in any::<bool>(), seed in 0u64..1000,
    ) {
        let (x, w, b) = (values(rows * k, seed), values(n * k, seed + 1), values(n, seed + 2));
        let b = bias.then_some(&b[..]);
        let want = linear_slow(&x, &w, b, rows, k, n);
        // A = W, B = X, as Device::linear passes them; D is Y's buffer.
        let got = emulate_epilogue(linear_plan(rows, k, n), &w, &x, b, epilogue(bias, Activation::Identity));
        prop_assert_eq!(got.len(), want.len());
        for (g, e) in got.iter().zip(&want) {
            prop_assert!((g - e).abs() <= 1e-5 * (1.0 + e.abs()), "{:?} vs {:?}", got, want);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    /// `Device::linear_gelu` on a GPU: the same plan with the GELU epilogue is the linear layer
    /// followed by the tanh GELU.
    #[test]
    fn gelu_epilogue_computes_gelu_of_the_linear_layer(
        rows in 1usize..7, k in 1usize..7, n in 1usize..7, bias in any::<bool>(), seed in 0u64..1000,
    ) {
        let (x, w, b) = (values(rows * k, seed), values(n * k, seed + 1), values(n, seed + 2));
        let b = bias.then_some(&b[..]);
        let want = gelu_tanh_slow(&linear_slow(&x, &w, b, rows, k, n));
        let plan = linear_plan(rows, k, n);
        let got = emulate_epilogue(plan, &w, &x, b, epilogue(bias, Activation::GeluTanh));
        for (g, e) in got.iter().zip(&want) {
            prop_assert!((g - e).abs() <= 1e-5 * (1.0 + e.abs()), "{:?} vs {:?}", got, want);
        }
    }
}

/// The epilogues are cuBLASLt's documented values (cublasLt.h: DEFAULT 1, BIAS 4, GELU 32,
/// GELU_BIAS 36).
#[test]
fn epilogues_are_cublaslt_values() {
    assert_eq!(epilogue(false, Activation::Identity) as u32, 1);
    assert_eq!(epilogue(true, Activation::Identity) as u32, 4);
    assert_eq!(epilogue(false, Activation::GeluTanh) as u32, 32);
    assert_eq!(epilogue(true, Activation::GeluTanh) as u32, 36);
}

/// The plan cache keys on the operands' common alignment: 256 for fresh allocations, less for an
/// operand at an odd offset (which needs an algorithm chosen for it).
#[test]
fn common_alignment_is_the_largest_shared_power_of_two() {
    assert_eq!(common_alignment(&[0x7f00_0000_0000, 0x7f00_0000_0100]), 256);
    assert_eq!(common_alignment(&[0x7f00_0000_1000, 0x7f00_0000_0080]), 128);
    assert_eq!(common_alignment(&[0x7f00_0000_1000, 0x7f00_0000_0202]), 2);
    assert_eq!(common_alignment(&[]), 256);
}

/// The emulation can tell a wrong plan: without A's transpose, a non-square product differs
/// (or is refused as out of bounds).
#[test]
fn a_plan_without_the_weight_transpose_is_caught() {
    let (rows, k, n) = (3, 4, 5);
    let (x, w) = (values(rows * k, 7), values(n * k, 8));
    let want = linear_slow(&x, &w, None, rows, k, n);
    let wrong = ColumnMajorGemm {
        transa: false,
        lda: n as i64,
        ..linear_plan(rows, k, n)
    };
    let got = std::panic::catch_unwind(|| emulate(wrong, &w, &x, None));
    assert!(got.map_or(true, |g| g != want));
}
