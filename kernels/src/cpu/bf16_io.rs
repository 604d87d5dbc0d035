//! What a bf16 product ([`super::bf16_gemm`]) reads and writes: f32 rows, which the product
//! rounds to bf16 as it reads them, or rows already in bf16; f32 outputs, or bf16 outputs rounded
//! (to nearest even) once the epilogue has run. A product whose output only feeds another bf16
//! product (the feed-forward's fc1 + GELU -> fc2) hands it over in bf16: the second product
//! rounds its input to bf16 anyway, so the numbers are the same, with half the bytes written and
//! read, and no conversion pass over the input. (Where AVX512-BF16 converts, f32 subnormals
//! round to zero, `vcvtne2ps2bf16` treats them so, in either place; the bf16 products treat
//! bf16 subnormals as zero anyway.)

use std::mem::MaybeUninit;

use super::bf16_gemm::{bf16_bits, bf16_bits_chunked, bf16_to_f32, CHUNK_K};

/// A product's input rows (`[m, k]`, row-major).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Input<'a> {
    /// f32 values, rounded to bf16 by the product.
    F32(&'a [f32]),
    /// bf16 bits.
    Bf16(&'a [u16]),
}

impl Input<'_> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Input::F32(x) => x.len(),
            Input::Bf16(x) => x.len(),
        }
    }

    /// Row `row` (`k` inputs) in bf16 as `chunks` pieces of [`CHUNK_K`] inputs `stride`
    /// elements apart in `dst`, the last piece zero-padded; `None` writes zeros (a padding row).
    pub(crate) fn row_chunked(
        &self,
        row: Option<usize>,
        k: usize,
        dst: &mut [u16],
        (chunks, stride): (usize, usize),
    ) {
        match self {
            Input::F32(x) => {
                bf16_bits_chunked(dst, row.map(|r| &x[r * k..][..k]), chunks, stride);
            }
            Input::Bf16(x) => {
                let src = row.map_or(&[][..], |r| &x[r * k..][..k]);
                for c in 0..chunks {
                    let piece =
                        &src[(c * CHUNK_K).min(src.len())..((c + 1) * CHUNK_K).min(src.len())];
                    let d = &mut dst[c * stride..][..CHUNK_K];
                    d[..piece.len()].copy_from_slice(piece);
                    d[piece.len()..].fill(0);
                }
            }
        }
    }

    /// The values as the product sees them (rounded to bf16), in f32: the f32 fallback's input.
    pub(crate) fn rounded_f32(&self) -> Vec<f32> {
        use rayon::prelude::*;
        match self {
            Input::F32(x) => x.par_iter().map(|&v| bf16_to_f32(bf16_bits(v))).collect(),
            Input::Bf16(x) => x.par_iter().map(|&v| bf16_to_f32(v)).collect(),
        }
    }
}

/// Where a product writes its `[m, n]` outputs (row-major; every element written once).
pub(crate) enum Output<'a> {
    F32(&'a mut [MaybeUninit<f32>]),
    /// Rounded to bf16 after the epilogue.
    Bf16(&'a mut [MaybeUninit<u16>]),
}

impl Output<'_> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Output::F32(y) => y.len(),
            Output::Bf16(y) => y.len(),
        }
    }

    /// The output as a pointer that tasks writing disjoint regions share.
    pub(crate) fn ptr(&mut self) -> OutPtr {
        match self {
            Output::F32(y) => OutPtr::F32(y.as_mut_ptr().cast()),
            Output::Bf16(y) => OutPtr::Bf16(y.as_mut_ptr().cast()),
        }
    }
}

/// [`Output`]'s buffer, shared by tasks that write disjoint regions of it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum OutPtr {
    F32(*mut f32),
    Bf16(*mut u16),
}
// SAFETY: every task writes its own rows x columns region (the kernels' contracts).
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

/// Rounds `rows x cols` finished f32 values (row `r` at `src + r * lds`) to bf16 into rows
/// `row..`, columns `col..` of the `[.., n]` bf16 output `y`.
///
/// # Safety
/// The region lies inside the output and nothing else accesses it; `src` holds what is read.
pub(crate) unsafe fn round_rows(
    y: *mut u16,
    n: usize,
    (row, col): (usize, usize),
    (src, lds): (*const f32, usize),
    (rows, cols): (usize, usize),
) {
    for r in 0..rows {
        // SAFETY: the caller's contract.
        let s = unsafe { std::slice::from_raw_parts(src.add(r * lds), cols) };
        let d = y.wrapping_add((row + r) * n + col);
        #[cfg(target_arch = "x86_64")]
        if super::bf16_gemm::avx512_bf16() {
            // SAFETY: the CPU has AVX512-BF16 (checked); the caller's contract.
            unsafe { round_row_avx512(d, s) };
            continue;
        }
        // Rounded into a stack buffer, then copied: the output may be uninitialised.
        let mut bits = [0u16; 64];
        for (j, piece) in s.chunks(64).enumerate() {
            super::bf16_gemm::bf16_bits_into(&mut bits, piece);
            // SAFETY: the caller's contract.
            unsafe { std::ptr::copy_nonoverlapping(bits.as_ptr(), d.add(64 * j), piece.len()) };
        }
    }
}

/// `dst[i] = bf16(src[i])` (round to nearest even, `vcvtneps2bf16`), 16 at a time, the last 16
/// masked: one finished tile row (48 values) in three steps.
///
/// # Safety
/// AVX-512F and AVX512-BF16; `dst` addresses `src.len()` writable u16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn round_row_avx512(dst: *mut u16, src: &[f32]) {
    use std::arch::x86_64::*;
    for i in (0..src.len()).step_by(16) {
        let k = ((1u32 << (src.len() - i).min(16)) - 1) as __mmask16;
        // SAFETY: the mask covers only elements below src.len(); the caller's contract.
        unsafe {
            let v = _mm512_maskz_loadu_ps(k, src.as_ptr().add(i));
            let b: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
            // Widened to 32-bit lanes, stored as 16-bit ones through the mask.
            _mm512_mask_cvtepi32_storeu_epi16(dst.add(i).cast(), k, _mm512_cvtepu16_epi32(b));
        }
    }
}
