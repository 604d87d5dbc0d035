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
    if m <= FEW_ROWS {
        return linear_few_rows(y, x, w, b, m, k, n);
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

/// Up to this many rows, [`linear`] reads each weight row once for all rows of `x` instead of
/// calling the GEMM (which packs the whole weight first): conditioning vectors (`m` = batch) of
/// DiT's modulation linears, where the product is bound by reading `w` (DiT-XL/2's
/// `[6912, 1152]`: 6.1 -> 1.0 ms on Emerald Rapids, 2 threads).
const FEW_ROWS: usize = 4;

/// [`linear`] for `m <= FEW_ROWS`: tasks over blocks of output features, each computing its
/// features for every row; `y` is overwritten.
fn linear_few_rows(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
) {
    const FEATURES: usize = 64;
    // Transposed result [n, m], then copied into y [m, n] (m is at most FEW_ROWS).
    let mut yt = vec![0f32; n * m];
    yt.par_chunks_mut(FEATURES * m)
        .enumerate()
        .for_each(|(blk, out)| {
            for (jj, o) in out.chunks_mut(m).enumerate() {
                let j = blk * FEATURES + jj;
                let wr = &w[j * k..][..k];
                for (i, o) in o.iter_mut().enumerate() {
                    *o = super::math::dot_lanes(&x[i * k..][..k], wr) + b.map_or(0.0, |b| b[j]);
                }
            }
        });
    for (i, row) in y.chunks_mut(n).enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = yt[j * m + i];
        }
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
