//! Matrix products on the `gemm` crate: `linear` (x W^T + b, torch's layout, no transpose copy)
//! and the strided product that attention uses.

use gemm::Parallelism;
use rayon::prelude::*;

/// `y[m, n] = x[m, k] · w[n, k]^T + b[n]`; `y` is overwritten.
pub(crate) fn linear(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
    threads: usize,
) {
    assert!(
        y.len() == m * n && x.len() == m * k && w.len() == n * k,
        "linear: operand lengths"
    );
    if m == 0 || n == 0 {
        return;
    }
    if let Some(b) = b {
        y.par_chunks_mut(n.max(4096 / n.max(1) * n))
            .for_each(|rows| {
                rows.chunks_mut(n).for_each(|r| r.copy_from_slice(b));
            });
    }
    // Small products (conditioning vectors) are memory-bound: more threads only add overhead
    // below a few MFLOP.
    let par = if threads > 1 && m * n * k > 1 << 20 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the slices cover m×k, n×k and m×n elements with the strides given (checked above in
    // debug builds and by the callers' shape checks); `y` does not alias `x` or `w`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            n as isize,
            b.is_some(),
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// A strided matrix view for [`matmul_strided`]: element (r, c) is at `ptr + r*rs + c*cs`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef {
    pub(crate) ptr: *const f32,
    pub(crate) rs: isize,
    pub(crate) cs: isize,
}

/// `dst[m, n] (row stride dst_rs) = alpha·dst + lhs[m, k] · rhs[k, n]`, single-threaded.
///
/// # Safety
/// Every addressed element must be in bounds of live allocations, and `dst` must not alias the inputs.
pub(crate) unsafe fn matmul_strided(
    dst: *mut f32,
    dst_rs: isize,
    m: usize,
    n: usize,
    k: usize,
    lhs: MatRef,
    rhs: MatRef,
    accumulate: bool,
) {
    // SAFETY: forwarded to the caller's contract.
    unsafe {
        matmul_strided_par(
            dst,
            dst_rs,
            m,
            n,
            k,
            lhs,
            rhs,
            accumulate,
            Parallelism::None,
        )
    }
}

/// [`matmul_strided`] with the gemm crate's own parallelism (`Parallelism::Rayon(n)` runs on the
/// current rayon pool: call it inside the device's `install`).
///
/// # Safety
/// As [`matmul_strided`].
pub(crate) unsafe fn matmul_strided_par(
    dst: *mut f32,
    dst_rs: isize,
    m: usize,
    n: usize,
    k: usize,
    lhs: MatRef,
    rhs: MatRef,
    accumulate: bool,
    par: Parallelism,
) {
    // SAFETY: forwarded to the caller's contract.
    unsafe {
        gemm::gemm(
            m, n, k, dst, 1, dst_rs, accumulate, lhs.ptr, lhs.cs, lhs.rs, rhs.ptr, rhs.cs, rhs.rs,
            1.0, 1.0, false, false, false, par,
        );
    }
}

/// Reference `x W^T + b` with `f64` accumulation.
pub fn linear_slow(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = b.map_or(0.0, |b| b[j] as f64);
            for t in 0..k {
                acc += x[i * k + t] as f64 * w[j * k + t] as f64;
            }
            y[i * n + j] = acc as f32;
        }
    }
    y
}
