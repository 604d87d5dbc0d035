//! f32 `y = x · W^T (+ b)` with the weight packed once at load ([`PackedF32`]) for the kernel
//! this CPU runs ([`f32_kernel`]):
//! - AVX-512 ([`super::f32_tile`]): 8 rows of `x` x 48 output features in 24 zmm accumulators,
//!   each step one broadcast of an `x` element against three 16-wide vectors of the weight;
//! - AVX2 + FMA without AVX-512 (AMD Zen 3, older Intel): [`super::fma_gemm`], 6 x 16 tiles,
//!   `x` packed per call too;
//! - elsewhere the weight keeps torch's `[n, k]` layout and the `gemm` crate runs.
//!
//! Packing: `W` `[n, k]` is cut into panels of `NR` output features (48 or 16; the last one
//! zero-padded); a panel is k-major, element `(kk, c)` = `W[n0 + c][kk]`, so any run of `k` is
//! one contiguous `NR x kc` slab that the kernel streams with aligned loads.

use rayon::prelude::*;

use super::aligned::AlignedVec;
#[cfg(target_arch = "x86_64")]
use super::attention::SendPtr;
#[cfg(target_arch = "x86_64")]
use super::f32_tile::task;

/// Output features per packed panel (three zmm vectors).
pub(crate) const NR: usize = 48;

/// Output features per panel of the AVX2 + FMA kernel ([`super::fma_gemm`]: two ymm vectors).
pub(crate) const AVX2_NR: usize = 16;

/// The kernel that runs f32 linear layers on packed weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum F32Kernel {
    /// 8 x 48 tiles in zmm registers (AVX-512F).
    Avx512,
    /// 6 x 16 tiles in ymm registers, `x` packed per call (AVX2 + FMA).
    Avx2,
    /// The `gemm` crate on the plain `[n, k]` weight.
    GemmCrate,
}

impl F32Kernel {
    /// Output features per packed panel (0: the plain layout).
    fn panel_width(self) -> usize {
        match self {
            F32Kernel::Avx512 => NR,
            F32Kernel::Avx2 => AVX2_NR,
            F32Kernel::GemmCrate => 0,
        }
    }

    /// Whether this CPU can run it.
    fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        return match self {
            F32Kernel::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            F32Kernel::Avx2 => super::fma_math::available(),
            F32Kernel::GemmCrate => true,
        };
        #[cfg(not(target_arch = "x86_64"))]
        return self == F32Kernel::GemmCrate;
    }

    /// Its short name: `"avx512"`, `"avx2"` or `"gemm crate"`.
    pub fn name(self) -> &'static str {
        match self {
            F32Kernel::Avx512 => "avx512",
            F32Kernel::Avx2 => "avx2",
            F32Kernel::GemmCrate => "gemm crate",
        }
    }
}

/// Which kernel runs f32 linear layers here: the best one the CPU has (AVX-512, else AVX2 +
/// FMA, else the gemm crate), or the one `PIPEFUSE_F32_GEMM` names (`avx512`, `avx2` or `gemm`,
/// where the CPU can run it) to compare them; `PIPEFUSE_NO_AVX512_GEMM=1` (the older switch)
/// means `gemm`. Measured: the AVX-512 kernel beat the gemm crate on Intel Emerald Rapids and
/// AMD Zen 4, the AVX2 one on AMD Zen 3 (BENCHMARKS.md).
pub fn f32_kernel() -> F32Kernel {
    static KERNEL: std::sync::OnceLock<F32Kernel> = std::sync::OnceLock::new();
    *KERNEL.get_or_init(|| {
        let off = std::env::var_os("PIPEFUSE_NO_AVX512_GEMM").is_some_and(|v| v != "0");
        let asked = match std::env::var("PIPEFUSE_F32_GEMM").as_deref() {
            Ok("avx512") => Some(F32Kernel::Avx512),
            Ok("avx2") => Some(F32Kernel::Avx2),
            Ok("gemm") => Some(F32Kernel::GemmCrate),
            Ok(other) => {
                tracing::warn!(
                    value = other,
                    "PIPEFUSE_F32_GEMM: expected avx512, avx2 or gemm; choosing by the CPU"
                );
                None
            }
            _ if off => Some(F32Kernel::GemmCrate),
            _ => None,
        };
        if let Some(k) = asked.filter(|k| !k.runs_here()) {
            tracing::warn!(
                kernel = k.name(),
                "PIPEFUSE_F32_GEMM: this CPU cannot run it"
            );
        }
        let kernel = asked.filter(|k| k.runs_here()).unwrap_or_else(|| {
            [F32Kernel::Avx512, F32Kernel::Avx2]
                .into_iter()
                .find(|k| k.runs_here())
                .unwrap_or(F32Kernel::GemmCrate)
        });
        tracing::debug!(?kernel, "f32 linear kernel");
        kernel
    })
}

/// Whether f32 linears run on the AVX-512 kernel here.
pub fn f32_gemm_avx512() -> bool {
    f32_kernel() == F32Kernel::Avx512
}

/// Whether f32 linear weights are worth packing at load here (an own kernel runs them).
pub fn f32_gemm_packed() -> bool {
    f32_kernel() != F32Kernel::GemmCrate
}

/// Which kernel runs f32 linear layers on this CPU, for benchmark headers.
pub fn f32_gemm_path() -> &'static str {
    match f32_kernel() {
        F32Kernel::Avx512 => "avx512 8x48 kernel, weights packed at load",
        F32Kernel::Avx2 => "avx2/fma 6x16 kernel, weights packed at load",
        F32Kernel::GemmCrate => "gemm crate, weights packed per call",
    }
}

/// An f32 weight `[n, k]` packed for [`linear_packed`] (see the module docs).
#[derive(Clone)]
pub struct PackedF32 {
    pub(super) n: usize,
    pub(super) k: usize,
    /// The kernel the layout is for.
    kernel: F32Kernel,
    /// Own kernels: `n.div_ceil(NR)` panels of `k * NR`, on cache lines.
    pub(super) panels: AlignedVec<f32>,
    /// The gemm crate: the weight as it came, `[n, k]`.
    plain: Vec<f32>,
}

impl std::fmt::Debug for PackedF32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedF32[{}, {}]", self.n, self.k)
    }
}

impl PackedF32 {
    /// Packs `w` (`[n, k]`, row-major) for this CPU's kernel ([`f32_kernel`]).
    pub fn pack(w: &[f32], n: usize, k: usize) -> PackedF32 {
        Self::pack_for(w, n, k, f32_kernel())
    }

    /// Packs `w` for `kernel` (the plain layout where this CPU cannot run it: `linear_packed`
    /// relies on that).
    pub(crate) fn pack_for(w: &[f32], n: usize, k: usize, kernel: F32Kernel) -> PackedF32 {
        assert_eq!(w.len(), n * k, "PackedF32::pack: weight length");
        let kernel = if kernel.runs_here() {
            kernel
        } else {
            F32Kernel::GemmCrate
        };
        let nr = kernel.panel_width();
        if nr == 0 {
            return PackedF32 {
                n,
                k,
                kernel,
                panels: AlignedVec::zeroed(0),
                plain: w.to_vec(),
            };
        }
        let mut data = AlignedVec::<f32>::zeroed(n.div_ceil(nr) * nr * k);
        data.par_chunks_mut((nr * k).max(1))
            .enumerate()
            .for_each(|(p, panel)| {
                for c in 0..nr.min(n - p * nr) {
                    let row = &w[(p * nr + c) * k..][..k];
                    for (kk, &v) in row.iter().enumerate() {
                        panel[kk * nr + c] = v;
                    }
                }
            });
        PackedF32 {
            n,
            k,
            kernel,
            panels: data,
            plain: Vec::new(),
        }
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
        (self.panels.len() + self.plain.len()) * 4
    }

    /// Element `(j, kk)` of the weight.
    pub fn get(&self, j: usize, kk: usize) -> f32 {
        let nr = self.kernel.panel_width();
        if nr == 0 {
            return self.plain[j * self.k + kk];
        }
        self.panels[(j / nr) * nr * self.k + kk * nr + j % nr]
    }

    /// Which kernel runs this weight: `"avx512"`, `"avx2"` or `"gemm crate"`.
    pub fn path(&self) -> &'static str {
        self.kernel.name()
    }
}

/// `y[m, n] = x[m, k] · w^T + b`, then `gelu_tanh` if `gelu`, into a fresh vector (on the own
/// kernels without a zeroing pass: every element is written once).
pub(crate) fn linear_packed(
    x: &[f32],
    w: &PackedF32,
    b: Option<&[f32]>,
    m: usize,
    threads: usize,
    gelu: bool,
) -> Vec<f32> {
    let (n, k) = (w.n, w.k);
    assert!(
        x.len() == m * k && b.is_none_or(|b| b.len() == n),
        "linear_packed: operand lengths"
    );
    if w.kernel == F32Kernel::GemmCrate || k == 0 {
        let mut y = vec![0f32; m * n];
        if k == 0 {
            if let Some(b) = b {
                y.chunks_mut(n.max(1)).for_each(|r| r.copy_from_slice(b));
            }
        } else {
            super::matmul::linear(&mut y, x, &w.plain, b, m, k, n, threads);
        }
        if gelu {
            super::activation::gelu_tanh(&mut y);
        }
        return y;
    }
    let mut y = Vec::with_capacity(m * n);
    #[cfg(target_arch = "x86_64")]
    if w.kernel == F32Kernel::Avx2 {
        let out = y.spare_capacity_mut().as_mut_ptr().cast::<f32>();
        // SAFETY: the panels are in the AVX2 layout only where the CPU has AVX2 and FMA
        // (`pack_for`); y has room for m x n elements; the lengths were checked above; k > 0.
        unsafe { super::fma_gemm::linear(out, x, &w.panels, b, (m, k, n), threads, gelu) };
    } else {
        let out = SendPtr(y.spare_capacity_mut().as_mut_ptr().cast::<f32>());
        let mr = super::f32_tile::MR;
        let row_blocks = m.div_ceil(mr);
        for_each_part(threads, n.div_ceil(NR), row_blocks, |panels, (b0, b1)| {
            let rows = ((b0 * mr).min(m), (b1 * mr).min(m));
            // SAFETY: the panels are in the AVX-512 layout (the kernel is neither the gemm
            // crate's nor the AVX2 one), which exists only where the CPU has AVX-512F; the parts
            // write disjoint (row, panel) ranges of y's m x n elements, each element before
            // reading it.
            unsafe { task(out, x, w, b, rows, panels, gelu) };
        });
    }
    // SAFETY: the tasks wrote every element (row ranges cover 0..m, panel ranges 0..n).
    unsafe { y.set_len(m * n) };
    y
}

/// Runs `part(panels, rows)` over `threads` parts of a product with `panels` weight panels and
/// `rows` row blocks: contiguous ranges of panels (each part reads only its share of the
/// weight), the row blocks split too where there are fewer panels than threads. The parts cover
/// every (panel, row block) once.
#[cfg(target_arch = "x86_64")]
pub(super) fn for_each_part(
    threads: usize,
    panels: usize,
    rows: usize,
    part: impl Fn((usize, usize), (usize, usize)) + Sync,
) {
    let row_parts = if panels >= threads { 1 } else { threads };
    let panel_parts = threads.min(panels).max(1);
    let run = |t: usize| {
        let (pt, rt) = (t % panel_parts, t / panel_parts);
        part(
            (panels * pt / panel_parts, panels * (pt + 1) / panel_parts),
            (rows * rt / row_parts, rows * (rt + 1) / row_parts),
        );
    };
    match panel_parts * row_parts {
        1 => run(0),
        parts => (0..parts).into_par_iter().for_each(run),
    }
}

#[cfg(test)]
mod tests {
    use super::{linear_packed, F32Kernel, PackedF32};

    /// A `[m, k]` or `[n, k]` operand of small exact values.
    fn values(len: usize, mul: usize, modulus: usize, scale: f32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * mul % modulus) as f32 - (modulus / 2) as f32) * scale)
            .collect()
    }

    #[test]
    fn every_layout_gives_the_same_products() {
        // The plain layout (the gemm crate) runs on every CPU; the others where the CPU has
        // their instructions (elsewhere `pack_for` falls back to the plain layout).
        let (m, k, n) = (19, 650, 70);
        let x = values(m * k, 7, 23, 0.1);
        let w = values(n * k, 5, 17, 0.01);
        let b: Vec<f32> = (0..n).map(|j| j as f32 * 0.5).collect();
        let plain = PackedF32::pack_for(&w, n, k, F32Kernel::GemmCrate);
        assert_eq!(plain.path(), "gemm crate");
        let want = linear_packed(&x, &plain, Some(&b), m, 2, false);
        for kernel in [F32Kernel::Avx512, F32Kernel::Avx2] {
            let packed = PackedF32::pack_for(&w, n, k, kernel);
            if !kernel.runs_here() {
                assert_eq!(packed.path(), "gemm crate");
                continue;
            }
            assert_eq!(packed.path(), kernel.name());
            let got = linear_packed(&x, &packed, Some(&b), m, 2, false);
            for (g, r) in got.iter().zip(&want) {
                assert!(
                    (g - r).abs() <= 1e-4 * (1.0 + r.abs()),
                    "{kernel:?}: {g} vs {r}"
                );
            }
            // k = 0: the bias alone.
            let empty = PackedF32::pack_for(&[], n, 0, kernel);
            assert_eq!(
                linear_packed(&[], &empty, Some(&b), 3, 2, false),
                b.repeat(3)
            );
        }
    }

    #[test]
    fn a_row_does_not_depend_on_the_rows_beside_it() {
        // The own kernels sum each output over k in order from its bias, whatever the call:
        // each row alone, every prefix of rows and every thread count give the same bits.
        let (m, k, n) = (14, 1300, 37);
        let x = values(m * k, 11, 29, 0.07);
        let w = values(n * k, 3, 31, 0.013);
        let b: Vec<f32> = (0..n).map(|j| j as f32 * -0.25).collect();
        for kernel in [F32Kernel::Avx512, F32Kernel::Avx2] {
            if !kernel.runs_here() {
                continue;
            }
            let packed = PackedF32::pack_for(&w, n, k, kernel);
            let all = linear_packed(&x, &packed, Some(&b), m, 1, true);
            for threads in [1, 2, 3, 5] {
                assert_eq!(linear_packed(&x, &packed, Some(&b), m, threads, true), all);
            }
            for i in 0..m {
                let one = linear_packed(&x[i * k..][..k], &packed, Some(&b), 1, 2, true);
                assert_eq!(one, all[i * n..][..n], "{kernel:?}: row {i} alone");
            }
            for rows in 1..m {
                let some = linear_packed(&x[..rows * k], &packed, Some(&b), rows, 2, true);
                assert_eq!(some, all[..rows * n], "{kernel:?}: the first {rows} rows");
            }
            // More rows than the AVX2 kernel packs at once (1024).
            let many = 1030;
            let xs = values(many * k, 13, 37, 0.05);
            let all = linear_packed(&xs, &packed, Some(&b), many, 2, false);
            for i in [0, 1023, 1024, 1029] {
                let one = linear_packed(&xs[i * k..][..k], &packed, Some(&b), 1, 1, false);
                assert_eq!(one, all[i * n..][..n], "{kernel:?}: row {i} of {many}");
            }
        }
    }
}
