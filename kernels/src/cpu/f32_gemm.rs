//! f32 `y = x · W^T (+ b)` with the weight packed once at load ([`PackedF32`]) and an AVX-512
//! micro-kernel: 8 rows of `x` x 48 output features in 24 zmm accumulators, each step one
//! broadcast of an `x` element against three 16-wide vectors of the packed weight. Where the CPU
//! has no AVX-512 the weight keeps torch's `[n, k]` layout and the `gemm` crate runs (its AVX2
//! kernels; on Zen 3 that is the fastest path measured).
//!
//! Packing: `W` `[n, k]` is cut into panels of [`NR`] output features (the last one zero-padded);
//! a panel is k-major, element `(kk, c)` = `W[n0 + c][kk]`, so any run of `k` is one contiguous
//! `48 x kc` slab that the kernel streams with aligned loads.
//!
//! Loops (per task: a contiguous range of panels): groups of [`MC`] rows (their `y` tiles stay
//! in L2), `k` in blocks of [`KC`], panels (a panel's 72 KiB slab stays in L2 while the group's
//! 8-row blocks of `x` pass over it), row blocks. `y` tiles are re-read once per `k` block (the
//! first starts from the bias); each call prefetches the next call's `x` rows and `y` tile.

use rayon::prelude::*;

use super::aligned::AlignedVec;
#[cfg(target_arch = "x86_64")]
use super::attention::SendPtr;
#[cfg(target_arch = "x86_64")]
use super::f32_tile::{tile, Start, Tile};

/// Output features per packed panel (three zmm vectors).
pub(crate) const NR: usize = 48;
/// Rows of `x` per micro-kernel call.
pub(super) const MR: usize = 8;
/// `k` per block: a panel's slab is `KC * NR * 4` = 72 KiB (in L2). Against 128 (a 24 KiB slab
/// in L1, the `y` tiles re-read three times as often): 3-7% faster on DiT-XL/2's products with
/// 2 threads, 2% with 1; 256 to 1152 all alike (Zen 4, one process, variants interleaved,
/// 2026-12-07).
const KC: usize = 384;
/// Rows per group: a group's `y` tiles (`MC` x a task's panels) stay in L2 across `k` blocks,
/// and each slab is reused by `MC / MR` micro-kernel calls.
const MC: usize = 128;

/// An f32 weight `[n, k]` packed for [`linear_packed`] (see the module docs).
#[derive(Clone)]
pub struct PackedF32 {
    n: usize,
    k: usize,
    /// AVX-512 hosts: `n.div_ceil(NR)` panels of `k * NR`, on cache lines.
    panels: AlignedVec<f32>,
    /// Elsewhere: the weight as it came, `[n, k]`.
    plain: Vec<f32>,
}

impl std::fmt::Debug for PackedF32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedF32[{}, {}]", self.n, self.k)
    }
}

/// Whether this CPU runs the AVX-512 kernel (else [`PackedF32`] keeps the plain layout and the
/// gemm crate runs): AVX-512F present and `PIPEFUSE_NO_AVX512_GEMM` unset or `0` (to compare
/// the paths, or on a host where the gemm crate's kernels are faster: on Intel Emerald Rapids
/// and AMD Zen 4 the AVX-512 kernel was the faster one, BENCHMARKS.md).
pub fn f32_gemm_avx512() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        let off = std::env::var_os("PIPEFUSE_NO_AVX512_GEMM").is_some_and(|v| v != "0");
        let has = has_avx512f();
        tracing::debug!(avx512_gemm = has && !off, "f32 linear kernel");
        has && !off
    })
}

/// Whether the CPU has AVX-512F (the kernel's requirement, whatever the switch says).
fn has_avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Which kernel runs f32 linear layers on this CPU, for benchmark headers.
pub fn f32_gemm_path() -> &'static str {
    if f32_gemm_avx512() {
        "avx512 8x48 kernel, weights packed at load"
    } else {
        "gemm crate, weights packed per call"
    }
}

impl PackedF32 {
    /// Packs `w` (`[n, k]`, row-major) for this CPU.
    pub fn pack(w: &[f32], n: usize, k: usize) -> PackedF32 {
        Self::pack_for(w, n, k, f32_gemm_avx512())
    }

    /// Packs `w` in the AVX-512 panel layout (`panels`) or keeps it plain.
    pub(crate) fn pack_for(w: &[f32], n: usize, k: usize, panels: bool) -> PackedF32 {
        assert_eq!(w.len(), n * k, "PackedF32::pack: weight length");
        // The panels exist only where the kernel can run (`linear_packed` relies on it).
        let panels = panels && has_avx512f();
        if !panels {
            return PackedF32 {
                n,
                k,
                panels: AlignedVec::zeroed(0),
                plain: w.to_vec(),
            };
        }
        let mut data = AlignedVec::<f32>::zeroed(n.div_ceil(NR) * NR * k);
        data.par_chunks_mut((NR * k).max(1))
            .enumerate()
            .for_each(|(p, panel)| {
                for c in 0..NR.min(n - p * NR) {
                    let row = &w[(p * NR + c) * k..][..k];
                    for (kk, &v) in row.iter().enumerate() {
                        panel[kk * NR + c] = v;
                    }
                }
            });
        PackedF32 {
            n,
            k,
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
        if self.panels.is_empty() {
            return self.plain[j * self.k + kk];
        }
        self.panels[(j / NR) * NR * self.k + kk * NR + j % NR]
    }

    /// Which kernel runs this weight: `"avx512"` or `"gemm crate"`.
    pub fn path(&self) -> &'static str {
        if self.plain.is_empty() && self.n * self.k > 0 {
            "avx512"
        } else {
            "gemm crate"
        }
    }
}

/// `y[m, n] = x[m, k] · w^T + b`, then `gelu_tanh` if `gelu`, into a fresh vector (on the
/// AVX-512 path without a zeroing pass: every element is written once).
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
    if w.panels.is_empty() || k == 0 {
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
    {
        let panels = n.div_ceil(NR);
        // Tasks over panels (each reads only its part of the weight); rows split too where there
        // are fewer panels than threads.
        let row_tasks = if panels >= threads { 1 } else { threads };
        let panel_tasks = threads.min(panels).max(1);
        let rows_per = m.div_ceil(row_tasks).next_multiple_of(MR);
        let out = SendPtr(y.spare_capacity_mut().as_mut_ptr().cast::<f32>());
        let tasks = panel_tasks * row_tasks;
        let run = |t: usize| {
            let (pt, rt) = (t % panel_tasks, t / panel_tasks);
            let (p0, p1) = (panels * pt / panel_tasks, panels * (pt + 1) / panel_tasks);
            let (r0, r1) = ((rt * rows_per).min(m), ((rt + 1) * rows_per).min(m));
            // SAFETY: the CPU has AVX-512F (the panels exist only then); tasks write disjoint
            // (row, panel) ranges of y's m x n elements, each element before reading it.
            unsafe { task(out, x, w, b, (r0, r1), (p0, p1), gelu) };
        };
        if tasks == 1 {
            run(0);
        } else {
            (0..tasks).into_par_iter().for_each(run);
        }
    }
    // SAFETY: the tasks wrote every element (row ranges cover 0..m, panel ranges 0..n).
    unsafe { y.set_len(m * n) };
    y
}

/// One task: rows `r0..r1` x panels `p0..p1` of `y`.
///
/// # Safety
/// AVX-512F; `y` has `m * n` elements (checked by the caller) and no other task writes this
/// region.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn task(
    y: SendPtr,
    x: &[f32],
    w: &PackedF32,
    b: Option<&[f32]>,
    (r0, r1): (usize, usize),
    (p0, p1): (usize, usize),
    gelu: bool,
) {
    let (n, k) = (w.n, w.k);
    for g0 in (r0..r1).step_by(MC) {
        let g1 = (g0 + MC).min(r1);
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            let last = k0 + kc == k;
            for p in p0..p1 {
                let cols = NR.min(n - p * NR);
                let slab = &w.panels[p * NR * k + k0 * NR..][..kc * NR];
                let start = match (k0, b) {
                    (0, Some(b)) => Start::Bias(&b[p * NR..][..cols]),
                    (0, None) => Start::Zero,
                    _ => Start::Load,
                };
                // Each call of the group prefetches its share of the next panel's slab.
                let slab_lines = (kc * NR / 16).div_ceil((g1 - g0).div_ceil(MR));
                for (share, i) in (g0..g1).step_by(MR).enumerate() {
                    let rows = MR.min(g1 - i);
                    // The next tile's rows of x and of y, for prefetching (the next row block,
                    // or the group's first one in the next panel).
                    let (ni, np) = if i + MR < g1 {
                        (i + MR, p)
                    } else {
                        (g0, p + 1)
                    };
                    let next = (
                        x.as_ptr().wrapping_add(ni * k + k0),
                        y.get().wrapping_add(ni * n + np * NR).cast_const(),
                    );
                    // SAFETY: rows i..i+rows of x hold k elements each; the tile (rows x cols
                    // at (i, p*NR)) lies in y; AVX-512F per the caller. `next` is only
                    // prefetched (never dereferenced).
                    unsafe {
                        let xs = x.as_ptr().add(i * k + k0);
                        let c = y.get().add(i * n + p * NR);
                        let t = Tile {
                            kc,
                            x: xs,
                            ldx: k,
                            c,
                            ldc: n,
                            cols,
                            next,
                            next_slab: w
                                .panels
                                .as_ptr()
                                .wrapping_add((p + 1) * NR * k + k0 * NR + share * 16 * slab_lines),
                            slab_lines,
                        };
                        match rows {
                            8 => tile::<8>(t, slab, start),
                            7 => tile::<7>(t, slab, start),
                            6 => tile::<6>(t, slab, start),
                            5 => tile::<5>(t, slab, start),
                            4 => tile::<4>(t, slab, start),
                            3 => tile::<3>(t, slab, start),
                            2 => tile::<2>(t, slab, start),
                            _ => tile::<1>(t, slab, start),
                        }
                        // GELU on the finished tile (in L1); applying it to the
                        // accumulators before the store slowed every call by ~10% (codegen).
                        if last && gelu {
                            super::vector_math::gelu_tanh_rows_in_place(c, n, (rows, cols));
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{f32_gemm_avx512, linear_packed, PackedF32};

    #[test]
    fn both_layouts_give_the_same_products() {
        // The plain layout (the gemm crate) runs on every CPU; the panels only with AVX-512.
        let (m, k, n) = (19, 150, 70);
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7 % 23) as f32 - 11.0) * 0.1)
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 5 % 17) as f32 - 8.0) * 0.01)
            .collect();
        let b: Vec<f32> = (0..n).map(|j| j as f32 * 0.5).collect();
        let plain = PackedF32::pack_for(&w, n, k, false);
        assert_eq!(plain.path(), "gemm crate");
        let want = linear_packed(&x, &plain, Some(&b), m, 2, false);
        if !f32_gemm_avx512() {
            return;
        }
        let panels = PackedF32::pack_for(&w, n, k, true);
        assert_eq!(panels.path(), "avx512");
        let got = linear_packed(&x, &panels, Some(&b), m, 2, false);
        for (g, r) in got.iter().zip(&want) {
            assert!((g - r).abs() <= 1e-4 * (1.0 + r.abs()), "{g} vs {r}");
        }
        // k = 0: the bias alone, on both layouts.
        let empty = PackedF32::pack_for(&[], n, 0, true);
        assert_eq!(
            linear_packed(&[], &empty, Some(&b), 3, 2, false),
            b.repeat(3)
        );
    }
}
