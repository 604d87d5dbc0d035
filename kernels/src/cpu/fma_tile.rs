//! The micro-kernel of [`super::fma_attention`]: `R <= 4` rows x 24 columns of `c = a · b` in
//! 12 ymm accumulators (AVX2 + FMA: 16 vector registers, so 12 accumulators, three vectors of
//! `b` and one broadcast of `a` per step). `b` is a packed panel, `k`-major: step `kk` reads the
//! 24 floats at `b + 24 kk` (aligned); `a` is read in place, one element per row and step.
//! Every output row's sum runs over `kk` in order whatever `R` is, so a row's result does not
//! depend on which rows share its call.

use std::arch::x86_64::*;

/// Columns per call (three 8-lane vectors): the width of a packed panel.
pub(super) const NR: usize = 24;
/// Rows per call (its largest `R`).
pub(super) const MR: usize = 4;

/// Where one call reads and writes.
#[derive(Clone, Copy)]
pub(super) struct Tile {
    /// Steps (the length of the sums).
    pub(super) kc: usize,
    /// `R` rows of `kc` floats at stride `lda`.
    pub(super) a: *const f32,
    pub(super) lda: usize,
    /// The panel: `kc` rows of [`NR`] floats, 32-byte aligned.
    pub(super) b: *const f32,
    /// `R` rows of `cols <= NR` floats at stride `ldc`.
    pub(super) c: *mut f32,
    pub(super) ldc: usize,
    pub(super) cols: usize,
}

/// `c[r][..cols] = mult[r] * sum_kk a[r][kk] * b[kk][..cols]` for the [`Tile`] `t`, `r < R`.
///
/// # Safety
/// AVX2 and FMA; `t`'s pointers address what [`Tile`] says.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn tile<const R: usize>(t: Tile, mult: [f32; R]) {
    let Tile {
        kc,
        a,
        lda,
        b,
        c,
        ldc,
        cols,
    } = t;
    let mut acc = [[_mm256_setzero_ps(); 3]; R];
    // SAFETY (whole body): the caller's contract; masked stores touch only `cols` columns.
    unsafe {
        for kk in 0..kc {
            let b0 = _mm256_load_ps(b.add(kk * NR));
            let b1 = _mm256_load_ps(b.add(kk * NR + 8));
            let b2 = _mm256_load_ps(b.add(kk * NR + 16));
            for (r, row) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*a.add(r * lda + kk));
                row[0] = _mm256_fmadd_ps(x, b0, row[0]);
                row[1] = _mm256_fmadd_ps(x, b1, row[1]);
                row[2] = _mm256_fmadd_ps(x, b2, row[2]);
            }
        }
        for (r, row) in acc.iter().enumerate() {
            let m = _mm256_set1_ps(mult[r]);
            let dst = c.add(r * ldc);
            if cols == NR {
                for (v, &x) in row.iter().enumerate() {
                    _mm256_storeu_ps(dst.add(8 * v), _mm256_mul_ps(x, m));
                }
            } else {
                for (v, &x) in row.iter().enumerate().take(cols.div_ceil(8)) {
                    let mask = lane_mask(cols - 8 * v);
                    _mm256_maskstore_ps(dst.add(8 * v), mask, _mm256_mul_ps(x, m));
                }
            }
        }
    }
}

/// The store mask of the first `min(n, 8)` lanes.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn lane_mask(n: usize) -> __m256i {
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_cmpgt_epi32(_mm256_set1_epi32(n.min(8) as i32), lanes)
}

/// [`tile`] for `rows` in `1..=MR`.
///
/// # Safety
/// As [`tile`]; `mult` holds at least `rows` values.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn tile_rows(rows: usize, t: Tile, mult: &[f32]) {
    // SAFETY: the caller's contract.
    unsafe {
        match rows {
            4 => tile::<4>(t, [mult[0], mult[1], mult[2], mult[3]]),
            3 => tile::<3>(t, [mult[0], mult[1], mult[2]]),
            2 => tile::<2>(t, [mult[0], mult[1]]),
            _ => tile::<1>(t, [mult[0]]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{tile_rows, Tile, MR, NR};
    use crate::cpu::aligned::AlignedVec;
    use crate::cpu::fma_math::available;

    #[test]
    fn fma_tile_every_row_count_and_width() {
        if !available() {
            eprintln!("no AVX2/FMA on this CPU: nothing to run");
            return;
        }
        let kc = 37;
        let mut seed = 7;
        let a = crate::cpu::test_values(&mut seed, MR * kc, 1.0);
        let mut b = AlignedVec::<f32>::zeroed(kc * NR);
        b.copy_from_slice(&crate::cpu::test_values(&mut seed, kc * NR, 1.0));
        let mult = [1.0, 0.5, -2.0, 0.25];
        for rows in 1..=MR {
            for cols in [1, 7, 8, 9, 16, 23, 24] {
                let ldc = 30;
                let mut c = vec![f32::NAN; MR * ldc];
                let t = Tile {
                    kc,
                    a: a.as_ptr(),
                    lda: kc,
                    b: b.as_ptr(),
                    c: c.as_mut_ptr(),
                    ldc,
                    cols,
                };
                // SAFETY: AVX2/FMA checked; a, b and c hold what Tile says.
                unsafe { tile_rows(rows, t, &mult) };
                for r in 0..MR {
                    for j in 0..ldc {
                        let got = c[r * ldc + j];
                        if r >= rows || j >= cols {
                            assert!(got.is_nan(), "rows {rows} cols {cols}: ({r}, {j}) written");
                            continue;
                        }
                        let want: f64 = (0..kc)
                            .map(|kk| a[r * kc + kk] as f64 * b[kk * NR + j] as f64)
                            .sum::<f64>()
                            * mult[r] as f64;
                        assert!(
                            (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "rows {rows} cols {cols}: ({r}, {j}) {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
