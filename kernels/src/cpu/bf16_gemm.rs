//! bf16 matrix products with f32 accumulation: `y = x · W^T (+ b)` where `x` is f32 (rounded to
//! bf16 per call, as PyTorch's bf16 autocast rounds activations) or already bf16
//! ([`super::bf16_io`]) and `W` is bf16, packed once at load into [`PackedBf16`]. Intel AMX tiles run it where the CPU has them (`amx.rs`), else
//! AVX512-BF16's `vdpbf16ps` where the CPU has that (`avx512_bf16.rs`: AMD Zen 4); elsewhere the
//! weight is unpacked to f32 once, at packing, into this CPU's f32 kernel's layout
//! ([`PackedF32`]) and that kernel runs (same numbers: the bf16 products are exact in f32, only
//! the summation order differs; f32's speed and memory).
//!
//! Packing (the layout AMX's `tdpbf16ps` reads for its B operand): `W` `[n, k]` is cut into
//! blocks of 16 output columns and chunks of 32 inputs, zero-padded to whole blocks and chunks;
//! each block x chunk is one 1 KiB tile of 16 rows (input pairs) x 16 columns x 2, element
//! `(r, c, e)` = `W[n0 + c][k0 + 2 r + e]`. Tiles are stored block-major, then chunk.

use rayon::prelude::*;

use std::mem::MaybeUninit;

use super::aligned::AlignedVec;
use super::bf16_io::{Input, Output};
use super::f32_gemm::PackedF32;

/// Output columns per packed block (one tile's columns).
pub(crate) const BLOCK_N: usize = 16;
/// Inputs per packed chunk (one tile's bf16 pairs x 2).
pub(crate) const CHUNK_K: usize = 32;
/// u16 elements per packed tile.
pub(crate) const TILE: usize = BLOCK_N * CHUNK_K;

/// `f32 -> bf16` bits, round to nearest even (NaN stays NaN): what `half::bf16::from_f32` and
/// PyTorch's conversion do, written so that it vectorises.
#[inline]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// `dst[i] = bf16_bits(src[i])` for `i < src.len()` (`dst` at least as long): 32 at a time with
/// AVX512-BF16's `vcvtne2ps2bf16` (round to nearest even, as [`bf16_bits`]; NaN stays NaN)
/// where the CPU has it, one by one elsewhere.
pub(crate) fn bf16_bits_into(dst: &mut [u16], src: &[f32]) {
    assert!(
        dst.len() >= src.len(),
        "bf16_bits_into: destination too short"
    );
    #[cfg(target_arch = "x86_64")]
    if avx512_bf16() {
        // SAFETY: the CPU has AVX-512F and AVX512-BF16 (checked); lengths checked above.
        return unsafe { bf16_bits_avx512(dst, src) };
    }
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = bf16_bits(x);
    }
}

/// `src` in bf16 as `CHUNK_K`-wide pieces `stride` elements apart: piece `c` (inputs
/// `32 c..32 c + 32`) goes to `dst[c * stride..][..32]`, the last one zero-padded; `src = None`
/// writes zeros. For one row of AMX's A tiles (x tile-major): one call per row (per 32 inputs,
/// the call and detection overhead cost more than the conversion).
pub(crate) fn bf16_bits_chunked(
    dst: &mut [u16],
    src: Option<&[f32]>,
    chunks: usize,
    stride: usize,
) {
    assert!(
        chunks == 0 || dst.len() >= (chunks - 1) * stride + CHUNK_K,
        "bf16_bits_chunked: destination too short"
    );
    let src = src.unwrap_or(&[]);
    assert!(
        src.len() <= chunks * CHUNK_K,
        "bf16_bits_chunked: source too long"
    );
    #[cfg(target_arch = "x86_64")]
    if avx512_bf16() {
        // SAFETY: the CPU has AVX-512F and AVX512-BF16 (checked); extents checked above.
        return unsafe { bf16_bits_chunked_avx512(dst, src, chunks, stride) };
    }
    for c in 0..chunks {
        let piece = &src[(c * CHUNK_K).min(src.len())..((c + 1) * CHUNK_K).min(src.len())];
        let row = &mut dst[c * stride..][..CHUNK_K];
        for (d, &x) in row.iter_mut().zip(piece) {
            *d = bf16_bits(x);
        }
        row[piece.len()..].fill(0);
    }
}

/// # Safety
/// The CPU has AVX-512F and AVX512-BF16; the extents of [`bf16_bits_chunked`] hold.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn bf16_bits_chunked_avx512(dst: &mut [u16], src: &[f32], chunks: usize, stride: usize) {
    use std::arch::x86_64::*;
    let mask = |from: usize| -> __mmask16 {
        let have = src.len().saturating_sub(from).min(16);
        ((1u32 << have) - 1) as __mmask16
    };
    for c in 0..chunks {
        let i = c * CHUNK_K;
        // SAFETY: masked loads read only below src.len(); the store writes dst[c * stride..]
        // [..32], inside dst (checked by the caller).
        unsafe {
            let lo = _mm512_maskz_loadu_ps(mask(i), src.as_ptr().add(i.min(src.len())));
            let hi = _mm512_maskz_loadu_ps(mask(i + 16), src.as_ptr().add((i + 16).min(src.len())));
            // Result lanes 0..16 from the second operand, 16..32 from the first.
            let packed = _mm512_cvtne2ps_pbh(hi, lo);
            _mm512_storeu_si512(
                dst.as_mut_ptr().add(c * stride).cast(),
                std::mem::transmute::<__m512bh, __m512i>(packed),
            );
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) fn avx512_bf16() -> bool {
    // std caches the detection: one relaxed load per call.
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bf16")
}

/// # Safety
/// The CPU has AVX-512F and AVX512-BF16; `dst.len() >= src.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn bf16_bits_avx512(dst: &mut [u16], src: &[f32]) {
    use std::arch::x86_64::*;
    let whole = src.len() / 32 * 32;
    for i in (0..whole).step_by(32) {
        // SAFETY: i + 32 <= src.len() <= dst.len(); unaligned loads and stores.
        unsafe {
            let lo = _mm512_loadu_ps(src.as_ptr().add(i));
            let hi = _mm512_loadu_ps(src.as_ptr().add(i + 16));
            // Result lanes 0..16 from the second operand, 16..32 from the first.
            let packed = _mm512_cvtne2ps_pbh(hi, lo);
            _mm512_storeu_si512(
                dst.as_mut_ptr().add(i).cast(),
                std::mem::transmute::<__m512bh, __m512i>(packed),
            );
        }
    }
    for (d, &x) in dst[whole..].iter_mut().zip(&src[whole..]) {
        *d = bf16_bits(x);
    }
}

/// The f32 value of bf16 bits.
#[inline]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// A weight `[n, k]` in bf16, packed for [`linear_bf16_alloc`] (see the module docs).
#[derive(Clone)]
pub struct PackedBf16 {
    n: usize,
    k: usize,
    /// The tiles, on cache-line boundaries (AMX loads straddling lines run ~2.5x slower).
    data: AlignedVec<u16>,
    /// Where no bf16 kernel runs: the same bf16 values as f32, packed once for this CPU's f32
    /// kernel ([`PackedF32`]) so that the f32 linear runs without a per-call conversion (f32's
    /// memory and speed; `data` is then empty).
    unpacked: Option<PackedF32>,
}

impl std::fmt::Debug for PackedBf16 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedBf16[{}, {}]", self.n, self.k)
    }
}

impl PackedBf16 {
    /// Packs `w` (`[n, k]`, row-major, bf16 bits).
    pub fn pack(w: &[u16], n: usize, k: usize) -> PackedBf16 {
        assert_eq!(w.len(), n * k, "PackedBf16::pack: weight length");
        // Blocks come in pairs (the AMX kernel computes 32 columns at a time).
        let (blocks, chunks) = (n.div_ceil(2 * BLOCK_N) * 2, k.div_ceil(CHUNK_K));
        let mut data = AlignedVec::<u16>::zeroed(blocks * chunks * TILE);
        data.par_chunks_mut((chunks * TILE).max(1)) // k = 0: no tiles at all
            .enumerate()
            .for_each(|(nb, panel)| {
                for (kc, tile) in panel.chunks_mut(TILE).enumerate() {
                    for c in 0..BLOCK_N.min(n.saturating_sub(nb * BLOCK_N)) {
                        let row = &w[(nb * BLOCK_N + c) * k..][..k];
                        for kk in kc * CHUNK_K..((kc + 1) * CHUNK_K).min(k) {
                            let (r, e) = ((kk % CHUNK_K) / 2, kk % 2);
                            tile[r * 2 * BLOCK_N + 2 * c + e] = row[kk];
                        }
                    }
                }
            });
        let mut packed = PackedBf16 {
            n,
            k,
            data,
            unpacked: None,
        };
        if kernel() == Kernel::F32 {
            packed.unpacked = Some(PackedF32::pack(&packed.unpack_f32(), n, k));
            packed.data = AlignedVec::zeroed(0); // only the bf16 kernels read the tiles
        }
        packed
    }

    /// A weight `[n, k]` from tiles already in the packed layout (see the module docs; `data`
    /// holds `n.div_ceil(32) * 2` blocks of `k.div_ceil(32)` tiles). The bf16 kernels' own
    /// operands (attention's K and V^T); only where [`bf16_kernel`] holds.
    pub(crate) fn from_tiles(n: usize, k: usize, data: AlignedVec<u16>) -> PackedBf16 {
        let want = n.div_ceil(2 * BLOCK_N) * 2 * k.div_ceil(CHUNK_K) * TILE;
        assert_eq!(data.len(), want, "PackedBf16::from_tiles: tile count");
        PackedBf16 {
            n,
            k,
            data,
            unpacked: None,
        }
    }

    /// The tiles back (to reuse the buffer); the inverse of [`PackedBf16::from_tiles`].
    pub(crate) fn into_tiles(self) -> AlignedVec<u16> {
        self.data
    }

    /// Packs an f32 weight `[n, k]`, rounding each element to bf16.
    pub fn from_f32(w: &[f32], n: usize, k: usize) -> PackedBf16 {
        let bits: Vec<u16> = w.par_iter().map(|&x| bf16_bits(x)).collect();
        Self::pack(&bits, n, k)
    }

    /// Output features.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes held.
    pub fn size_in_bytes(&self) -> usize {
        self.data.len() * 2 + self.unpacked.as_ref().map_or(0, PackedF32::size_in_bytes)
    }

    /// K chunks per block.
    pub(crate) fn chunks(&self) -> usize {
        self.k.div_ceil(CHUNK_K)
    }

    /// The tiles of output block `nb` (all chunks, 1 KiB each).
    pub(crate) fn panel(&self, nb: usize) -> &[u16] {
        let len = self.chunks() * TILE;
        &self.data[nb * len..][..len]
    }

    /// Element `(j, kk)` of the weight (bf16 bits).
    pub fn get(&self, j: usize, kk: usize) -> u16 {
        if let Some(u) = &self.unpacked {
            return bf16_bits(u.get(j, kk)); // exact: the values are bf16's
        }
        let (nb, c, kc) = (j / BLOCK_N, j % BLOCK_N, kk / CHUNK_K);
        let (r, e) = ((kk % CHUNK_K) / 2, kk % 2);
        self.panel(nb)[kc * TILE + r * 2 * BLOCK_N + 2 * c + e]
    }

    /// The weight as f32 `[n, k]` (the portable path and the tests).
    pub fn unpack_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n * self.k];
        out.par_chunks_mut(self.k.max(1))
            .enumerate()
            .for_each(|(j, row)| {
                for (kk, v) in row.iter_mut().enumerate() {
                    *v = bf16_to_f32(self.get(j, kk));
                }
            });
        out
    }
}

/// Whether the AMX kernel runs here (x86-64 Linux with AMX-BF16, not `PIPEFUSE_NO_AMX=1`).
fn amx() -> bool {
    #[cfg(target_arch = "x86_64")]
    return super::amx::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The kernel that runs bf16 products on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Amx,
    Avx512Bf16,
    /// The weight unpacked to f32, the f32 GEMM.
    F32,
}

fn kernel() -> Kernel {
    if amx() {
        return Kernel::Amx;
    }
    #[cfg(target_arch = "x86_64")]
    if super::avx512_bf16::available() {
        return Kernel::Avx512Bf16;
    }
    Kernel::F32
}

/// Which path [`linear_bf16_alloc`] takes on this CPU.
pub fn bf16_gemm_path() -> &'static str {
    match kernel() {
        Kernel::Amx => "amx-bf16",
        Kernel::Avx512Bf16 => "avx512-bf16 8x48 kernel",
        Kernel::F32 => "f32 fallback (no AMX or AVX512-BF16)",
    }
}

/// Bytes a [`PackedBf16`] holds per weight on this CPU: 2 where a bf16 kernel runs (AMX or
/// AVX512-BF16), 4 where the weight is kept unpacked as f32 (for memory estimates before
/// loading).
pub fn bf16_weight_bytes() -> usize {
    match kernel() {
        Kernel::Amx | Kernel::Avx512Bf16 => 2,
        Kernel::F32 => 4,
    }
}

/// What is applied to each output as it is written (fused into the GEMM's write-out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Epilogue {
    /// `y = x W^T + b`.
    Bias,
    /// `y = gelu_tanh(x W^T + b)`.
    BiasGeluTanh,
}

impl Epilogue {
    /// Applies the epilogue to `acc` (one row's accumulators) with `bias`, into `out`.
    #[inline]
    pub(crate) fn write(self, out: &mut [MaybeUninit<f32>], acc: &[f32], bias: Option<&[f32]>) {
        match (self, bias) {
            (Epilogue::Bias, Some(b)) => {
                for ((o, &v), &bb) in out.iter_mut().zip(acc).zip(b) {
                    o.write(v + bb);
                }
            }
            (Epilogue::Bias, None) => {
                for (o, &v) in out.iter_mut().zip(acc) {
                    o.write(v);
                }
            }
            (Epilogue::BiasGeluTanh, b) => super::vector_math::gelu_tanh_bias(out, acc, b),
        }
    }

    /// [`Epilogue::write`] for a block: `rows` x `cols`, row `r` from `acc[r * lda..]` to
    /// `out + r * ldo` (GELU over the whole block in one call).
    ///
    /// # Safety
    /// `out` addresses `rows` rows of `cols` at stride `ldo` that nothing else accesses during
    /// the call; `acc` and `bias` hold what they are read for.
    #[inline]
    pub(crate) unsafe fn write_block(
        self,
        out: *mut f32,
        ldo: usize,
        acc: &[f32],
        lda: usize,
        bias: Option<&[f32]>,
        (rows, cols): (usize, usize),
    ) {
        match self {
            // SAFETY: forwarded to the caller's contract.
            Epilogue::BiasGeluTanh => unsafe {
                super::vector_math::gelu_tanh_bias_rows(out, ldo, acc, lda, bias, (rows, cols))
            },
            Epilogue::Bias => {
                for r in 0..rows {
                    // SAFETY: row r of `out` is `cols` values the caller lets us write.
                    let row =
                        unsafe { std::slice::from_raw_parts_mut(out.add(r * ldo).cast(), cols) };
                    self.write(row, &acc[r * lda..][..cols], bias);
                }
            }
        }
    }
}

/// The f32 fallback of [`linear_bf16_alloc`] (no bf16 kernel): `x` as the product sees it
/// (rounded to bf16), the weight's bf16 values on this CPU's f32 kernel.
fn linear_bf16_unpacked(
    x: Input<'_>,
    w: &PackedBf16,
    b: Option<&[f32]>,
    m: usize,
    threads: usize,
    epilogue: Epilogue,
) -> Vec<f32> {
    let xr = x.rounded_f32();
    let gelu = epilogue == Epilogue::BiasGeluTanh;
    match &w.unpacked {
        Some(wf) => super::f32_gemm::linear_packed(&xr, wf, b, m, threads, gelu),
        None => {
            let wf = PackedF32::pack(&w.unpack_f32(), w.n, w.k);
            super::f32_gemm::linear_packed(&xr, &wf, b, m, threads, gelu)
        }
    }
}

/// Panics unless `x` holds `m` rows of the weight's inputs, `b` (if any) one value per output
/// and the output (if given) `m` rows of outputs: what the kernels' raw pointers rely on.
pub(super) fn assert_operands(
    y_len: Option<usize>,
    x: &Input<'_>,
    w: &PackedBf16,
    b: Option<&[f32]>,
    m: usize,
) {
    assert!(
        x.len() == m * w.k
            && b.is_none_or(|b| b.len() == w.n)
            && y_len.is_none_or(|l| l == m * w.n),
        "linear_bf16: operand lengths"
    );
}

/// A new `len`-element vector that `write` fills, every element (never zeroed first).
///
/// # Safety
/// `write` initialises every element of the slice it is given.
unsafe fn written<T>(len: usize, write: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut y = Vec::with_capacity(len);
    write(&mut y.spare_capacity_mut()[..len]);
    // SAFETY: the caller's contract.
    unsafe { y.set_len(len) };
    y
}

/// `y[m, n] = epilogue(bf16(x)[m, k] · W^T + b)`, f32 accumulation, into a new vector, from f32
/// or bf16 rows. The bf16 kernels write each element once, never zeroed first (zeroing the
/// outputs of a DiT-XL/2 forward's linears, ~20 MiB per block, cost ~5% of its time).
pub(crate) fn linear_bf16_alloc(
    x: Input<'_>,
    w: &PackedBf16,
    b: Option<&[f32]>,
    m: usize,
    threads: usize,
    epilogue: Epilogue,
) -> Vec<f32> {
    let n = w.n;
    assert_operands(None, &x, w, b, m);
    if bf16_kernel() && m > 0 && n > 0 {
        let write = |y: &mut [MaybeUninit<f32>]| {
            linear_packed_tiles(Output::F32(y), x, w, b, m, threads, epilogue)
        };
        // SAFETY: both kernels write every element of their [m, n] output (amx: each row < m
        // of each column pair's columns < n; avx512_bf16: each row of each block triple).
        return unsafe { written(m * n, write) };
    }
    if m == 0 || n == 0 {
        return Vec::new(); // not worth unpacking the weight for (a bf16 host's `w` has tiles)
    }
    linear_bf16_unpacked(x, w, b, m, threads, epilogue)
}

/// [`linear_bf16_alloc`] with the outputs rounded to bf16 (nearest even) after the epilogue:
/// for a product whose output feeds another bf16 product only.
pub(crate) fn linear_bf16_alloc_bf16(
    x: Input<'_>,
    w: &PackedBf16,
    b: Option<&[f32]>,
    m: usize,
    threads: usize,
    epilogue: Epilogue,
) -> Vec<half::bf16> {
    if !(bf16_kernel() && m > 0 && w.n > 0) {
        let y = linear_bf16_alloc(x, w, b, m, threads, epilogue);
        return y.into_iter().map(half::bf16::from_f32).collect();
    }
    assert_operands(None, &x, w, b, m);
    let write = |y: &mut [MaybeUninit<half::bf16>]| {
        // SAFETY: bf16 is a transparent u16 (same size, alignment and validity).
        let bits =
            unsafe { &mut *(y as *mut [MaybeUninit<half::bf16>] as *mut [MaybeUninit<u16>]) };
        linear_packed_tiles(Output::Bf16(bits), x, w, b, m, threads, epilogue)
    };
    // SAFETY: both kernels write every element of their [m, n] output (see above).
    unsafe { written(m * w.n, write) }
}

/// Whether a bf16 kernel (AMX or AVX512-BF16) runs here, reading [`PackedBf16`]'s tiles (else
/// bf16 weights are unpacked to f32 and bf16 activations would only add conversions).
pub fn bf16_kernel() -> bool {
    kernel() != Kernel::F32
}

/// Whether the bf16 kernel is AVX512-BF16's (AMX absent or off): attention then runs
/// [`super::avx512_bf16_attention`].
pub(crate) fn avx512_bf16_kernel() -> bool {
    kernel() == Kernel::Avx512Bf16
}

/// [`linear_bf16_alloc`] on this CPU's bf16 kernel, every element of `y` written. Requires
/// [`bf16_kernel`] (attention's products call it with operands packed by
/// [`PackedBf16::from_tiles`]).
pub(crate) fn linear_packed_tiles(
    y: Output<'_>,
    x: Input<'_>,
    w: &PackedBf16,
    b: Option<&[f32]>,
    m: usize,
    threads: usize,
    epilogue: Epilogue,
) {
    match kernel() {
        #[cfg(target_arch = "x86_64")]
        Kernel::Amx => super::amx::linear(y, x, w, b, m, threads, epilogue),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Bf16 => super::avx512_bf16::linear(y, x, w, b, m, threads, epilogue),
        _ => panic!("linear_packed_tiles without a bf16 kernel"),
    }
}

/// Reference: `bf16(x) · W^T + b` with f64 accumulation.
pub fn linear_bf16_slow(x: &[f32], w: &PackedBf16, b: Option<&[f32]>, m: usize) -> Vec<f32> {
    let xr: Vec<f32> = x.iter().map(|&v| bf16_to_f32(bf16_bits(v))).collect();
    super::matmul::linear_slow(&xr, &w.unpack_f32(), b, m, w.k, w.n)
}

#[cfg(test)]
mod tests {
    use super::{bf16_bits, bf16_bits_chunked, bf16_bits_into, CHUNK_K};

    /// The chunked conversion puts each 32-input piece at its stride, zero-pads the last one,
    /// writes zeros for a missing row, and leaves what lies between the pieces alone.
    #[test]
    fn chunked_conversion_lays_out_pieces_at_their_stride() {
        let stride = 48;
        for len in [0usize, 1, 15, 16, 17, 31, 32, 33, 64, 70, 96] {
            let chunks = len.div_ceil(CHUNK_K).max(1);
            let src: Vec<f32> = (0..len).map(|i| i as f32 * 0.75 - 3.0).collect();
            for row in [Some(&src[..]), None] {
                let mut dst = vec![0xabcdu16; (chunks - 1) * stride + CHUNK_K];
                bf16_bits_chunked(&mut dst, row, chunks, stride);
                for c in 0..chunks {
                    for e in 0..CHUNK_K {
                        let i = c * CHUNK_K + e;
                        let want = match row {
                            Some(r) if i < r.len() => bf16_bits(r[i]),
                            _ => 0,
                        };
                        assert_eq!(dst[c * stride + e], want, "len {len} chunk {c} [{e}]");
                    }
                    if c + 1 < chunks {
                        let gap = &dst[c * stride + CHUNK_K..(c + 1) * stride];
                        assert!(gap.iter().all(|&g| g == 0xabcd), "len {len}: gap written");
                    }
                }
            }
        }
    }

    /// The vector conversion equals the scalar one bit for bit (ties to even, NaN, infinities,
    /// every length's tail), except f32 subnormals, which AVX512-BF16 flushes to zero (AMX's
    /// `tdpbf16ps` treats bf16 subnormals as zero either way).
    #[test]
    fn vector_conversion_equals_the_scalar_one() {
        let mut src: Vec<f32> = (0..1000u32)
            .map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761)))
            .collect();
        src.extend([
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            f32::MAX,
            f32::from_bits(0x3f80_8000), // a tie: rounds to even (down)
            f32::from_bits(0x3f81_8000), // a tie: rounds to even (up)
            f32::from_bits(0x7f7f_ffff), // rounds up to infinity
        ]);
        for len in [0, 1, 31, 32, 33, 64, 100, src.len()] {
            let mut got = vec![0u16; len];
            bf16_bits_into(&mut got, &src[..len]);
            for (i, (&g, &x)) in got.iter().zip(&src).enumerate() {
                let want = bf16_bits(x);
                let flushed = x.is_subnormal() && g & 0x7fff == 0;
                assert!(
                    g == want || flushed,
                    "len {len} [{i}] {x:e}: {g:#x} vs {want:#x}"
                );
            }
        }
    }
}
