//! bf16 linear layers with AVX512-BF16's `vdpbf16ps`, for CPUs that have it but no AMX (AMD
//! Zen 4, Intel Cooper Lake): the same packed weight as AMX ([`PackedBf16`]: a block's panel is
//! a run of input pairs, each 64 bytes = one zmm operand), so weights stay bf16 (half of f32's
//! memory and DRAM traffic) and `vdpbf16ps` does twice the multiply-adds of an f32 FMA.
//!
//! Loops (per task: a contiguous range of block triples, 48 features): groups of [`MC`] rows (a
//! task's weights pass once per group), input pairs in blocks of up to [`KCP`] (one block for
//! DiT-XL/2: the accumulators stay in registers over the whole k), triples (a triple's slab
//! stays in L2 while the group's 8-row blocks of `x` pass over it), row blocks. `x` is rounded
//! to bf16 once per call, rows zero-padded to whole chunks, into a per-thread buffer (bf16 rows
//! of whole chunks are read where they are). A bf16
//! output accumulates in a per-thread f32 staging (one tile where the whole k is one block, as
//! for every DiT-XL/2 product; else the group's rows x the task's columns, kept between calls),
//! each tile rounded into `y` as it is finished (in L1).

use std::sync::OnceLock;

use rayon::prelude::*;

use super::aligned::AlignedVec;
use super::avx512_bf16_tile::{tile, Tile, PAIR};
use super::bf16_gemm::{assert_operands, Epilogue, PackedBf16, BLOCK_N, CHUNK_K};
use super::bf16_io::{round_rows, Input, OutPtr, Output};
use super::f32_tile::Start;

/// Rows of `x` per micro-kernel call.
const MR: usize = 8;
/// Packed blocks (16 features each) per micro-kernel call.
const NB: usize = 3;
/// Most input pairs per block (blocks of even length): DiT-XL/2's products (k = 1152 and 4608)
/// run in one block, the accumulators in registers over the whole k; a triple's slab, up to
/// `KCP * 3 * 64` bytes = 432 KiB, stays in L2 while the group's row blocks pass over it.
/// Against blocks of 128 pairs (a 24 KiB slab in L1, the accumulators stored and reloaded per
/// block): 2-7% faster on those products, 1 and 2 threads, weights cold (measured on Zen 4,
/// one process, variants interleaved, 2026-12-07).
const KCP: usize = 2304;
/// Rows per group. 512 against 128: 1-3% faster on DiT-XL/2's four products (512 rows; 2-4% on
/// fc2, whose task weights of 1.3 MiB leave L2 between groups), 1% on 4096 rows; measured on
/// Zen 4 in one process, variants interleaved (2026-12-07).
const MC: usize = 512;

/// Whether this kernel runs here: AVX-512F and AVX512-BF16 present and `PIPEFUSE_NO_AVX512_BF16`
/// unset or `0` (to compare paths). The bf16 dispatch ([`super::bf16_gemm`]) prefers AMX.
pub(crate) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let off = std::env::var_os("PIPEFUSE_NO_AVX512_BF16").is_some_and(|v| v != "0");
        let ok = !off
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16");
        tracing::debug!(avx512_bf16 = ok, "AVX512-BF16 detection");
        ok
    })
}

thread_local! {
    /// [`linear`]'s bf16 copy of `x`, kept between calls.
    static X_SCRATCH: std::cell::Cell<AlignedVec<u16>> = std::cell::Cell::new(AlignedVec::default());
    /// [`task`]'s f32 staging of a bf16 output, kept between calls.
    static Y_SCRATCH: std::cell::Cell<AlignedVec<f32>> = std::cell::Cell::new(AlignedVec::default());
}

/// `y = epilogue(bf16(x) · W^T + b)` with `vdpbf16ps`, every element of `y` (`[m, n]`) written
/// once. Requires [`available`].
pub(crate) fn linear(
    mut y: Output<'_>,
    x: Input<'_>,
    w: &PackedBf16,
    b: Option<&[f32]>,
    m: usize,
    threads: usize,
    epilogue: Epilogue,
) {
    assert!(available(), "avx512_bf16::linear without AVX512-BF16");
    assert_operands(Some(y.len()), &x, w, b, m);
    let (n, k, chunks) = (w.n(), w.k(), w.chunks());
    if m == 0 || n == 0 {
        return;
    }
    let kp = chunks * CHUNK_K;
    // The buffer is this thread's; a call nested in this one (stolen by rayon) finds it taken
    // and allocates its own.
    let mut a = X_SCRATCH.take();
    let xa: &[u16] = match x {
        // Rows in bf16 that fill whole chunks are read where they are.
        Input::Bf16(bits) if k == kp => bits,
        _ => {
            a.reuse_for(m * kp);
            let convert = |(r, dst): (usize, &mut [u16])| {
                x.row_chunked(Some(r), k, dst, (chunks, CHUNK_K));
            };
            if threads == 1 || kp == 0 {
                a.chunks_mut(kp.max(1))
                    .take(m)
                    .enumerate()
                    .for_each(convert);
            } else {
                a.par_chunks_mut(kp).enumerate().for_each(convert);
            }
            &a
        }
    };
    let triples = n.div_ceil(BLOCK_N).div_ceil(NB);
    // Tasks over triples (each reads only its part of the weight), several per thread where
    // there are enough, so that rayon's work stealing evens out a thread that runs slower (a
    // vCPU the host shares: with one static half each, the product waits for the slow one);
    // rows split too where there are fewer triples than threads.
    let row_tasks = if triples >= threads { 1 } else { threads };
    let triple_tasks = if threads == 1 {
        1
    } else if triples >= 8 * threads {
        4 * threads
    } else {
        threads.min(triples)
    }
    .max(1);
    let rows_per = m.div_ceil(row_tasks).next_multiple_of(MR);
    let out = y.ptr();
    let gelu = epilogue == Epilogue::BiasGeluTanh;
    let run = |t: usize| {
        let (tt, rt) = (t % triple_tasks, t / triple_tasks);
        let ts = triples * tt / triple_tasks..triples * (tt + 1) / triple_tasks;
        let rows = (rt * rows_per).min(m)..((rt + 1) * rows_per).min(m);
        // SAFETY: the CPU has AVX512-BF16 (asserted); tasks write disjoint (rows, triples)
        // regions of y's m x n elements, each element before reading it.
        unsafe { task(out, xa, kp, w, b, rows, ts, gelu) };
    };
    let tasks = triple_tasks * row_tasks;
    if tasks == 1 {
        run(0);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
    X_SCRATCH.set(a);
}

/// One task: `rows` x block triples `ts` of `y`.
///
/// # Safety
/// AVX-512F and AVX512-BF16; `y` has `m * n` elements, `x` holds `m` rows of `kp` bf16 inputs
/// (zero-padded), and no other task writes this region.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn task(
    out: OutPtr,
    x: &[u16],
    kp: usize,
    w: &PackedBf16,
    b: Option<&[f32]>,
    rows: std::ops::Range<usize>,
    ts: std::ops::Range<usize>,
    gelu: bool,
) {
    let n = w.n();
    // Input pairs that hold inputs: the chunks' zero padding past them is skipped (attention's
    // head dim 72 is 36 pairs of 48).
    let pairs = w.k().div_ceil(2);
    let blocks = n.div_ceil(BLOCK_N);
    // Block `nb`'s weights from pair `p` on (for a block past the last, panel 0's start: only
    // prefetched, never read).
    let panel = |nb: usize, p: usize| -> *const u16 {
        if nb < blocks {
            w.panel(nb).as_ptr().wrapping_add(p * PAIR)
        } else {
            w.panel(0).as_ptr()
        }
    };
    // Input pairs in as few blocks as KCP allows, of even length.
    let blocks_k = pairs.div_ceil(KCP).max(1);
    let kcp = pairs.div_ceil(blocks_k);
    // Where the tiles accumulate: y itself (f32), or, for a bf16 y, this thread's f32 staging,
    // each tile rounded into y as it is finished: one tile's worth where the whole k is one
    // block, else the group's rows x the task's columns (kept across the k blocks).
    let c0 = ts.start * NB * BLOCK_N;
    let task_cols = (ts.end * NB * BLOCK_N).min(n) - c0;
    let mut staging = Y_SCRATCH.take();
    let (y, ldy) = match out {
        OutPtr::F32(y) => (y.wrapping_add(c0), n),
        OutPtr::Bf16(_) if blocks_k == 1 => {
            staging.reuse_for(MR * NB * BLOCK_N);
            (staging.as_mut_ptr(), NB * BLOCK_N)
        }
        OutPtr::Bf16(_) => {
            staging.reuse_for(MC.min(rows.len()) * task_cols);
            (staging.as_mut_ptr(), task_cols)
        }
    };
    // Element (row, column) of y from the task's first column, for the group from g0.
    let at = |g0: usize, i: usize, col: usize| -> *mut f32 {
        match out {
            OutPtr::F32(_) => y.wrapping_add(i * ldy + col),
            OutPtr::Bf16(_) if blocks_k == 1 => y,
            OutPtr::Bf16(_) => y.wrapping_add((i - g0) * ldy + col),
        }
    };
    for g0 in rows.clone().step_by(MC) {
        let g1 = (g0 + MC).min(rows.end);
        let calls = (g1 - g0).div_ceil(MR);
        let mut p0 = 0;
        loop {
            let kc = kcp.min(pairs - p0);
            let last = p0 + kc == pairs;
            for t in ts.clone() {
                let nb = (NB * t..NB * t + NB).filter(|&nb| nb < blocks).count();
                let cols = (NB * BLOCK_N).min(n - t * NB * BLOCK_N);
                let start = match (p0, b) {
                    (0, Some(b)) => Start::Bias(&b[t * NB * BLOCK_N..][..cols]),
                    (0, None) => Start::Zero,
                    _ => Start::Load,
                };
                let wp = [
                    panel(NB * t, p0),
                    panel(NB * t + 1, p0),
                    panel(NB * t + 2, p0),
                ];
                // Each call of the group prefetches its share of the next triple's slab.
                let slab_lines = kc.div_ceil(calls);
                for (share, i) in (g0..g1).step_by(MR).enumerate() {
                    let r = MR.min(g1 - i);
                    let (ni, nt) = if i + MR < g1 {
                        (i + MR, t)
                    } else {
                        (g0, t + 1)
                    };
                    let next_slab = std::array::from_fn(|v| {
                        panel(NB * (t + 1) + v, p0).wrapping_add(PAIR * share * slab_lines)
                    });
                    let c = at(g0, i, t * NB * BLOCK_N - c0);
                    let tl = Tile {
                        pairs: kc,
                        x: x.as_ptr().wrapping_add(i * kp + 2 * p0),
                        ldx: kp,
                        w: wp,
                        c,
                        ldc: ldy,
                        cols,
                        next: (
                            x.as_ptr().wrapping_add(ni * kp + 2 * p0),
                            at(g0, ni, (nt * NB * BLOCK_N).wrapping_sub(c0)).cast_const(),
                        ),
                        next_slab,
                        slab_lines,
                    };
                    // SAFETY: rows i..i + r of x hold kp inputs from 2 p0 on; the tile (r rows
                    // x cols at (i, t * 48)) lies in y; each of the nb blocks holds pairs from
                    // p0 on; `next*` are only prefetched.
                    unsafe {
                        dispatch(r, nb, tl, start);
                        if last && gelu {
                            super::vector_math::gelu_tanh_rows_in_place(c, ldy, (r, cols));
                        }
                        if let (true, OutPtr::Bf16(yb)) = (last, out) {
                            // Finished: rounded into y while the tile is in L1.
                            let at_y = (i, t * NB * BLOCK_N);
                            round_rows(yb, n, at_y, (c.cast_const(), ldy), (r, cols));
                        }
                    }
                }
            }
            p0 += kc;
            if last {
                break;
            }
        }
    }
    Y_SCRATCH.set(staging);
}

/// [`tile`] for `rows` x `nb` (1..=8 x 1..=3).
///
/// # Safety
/// [`tile`]'s.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn dispatch(rows: usize, nb: usize, t: Tile, start: Start<'_>) {
    macro_rules! by_rows {
        ($nb:literal) => {
            // SAFETY: the caller's contract.
            unsafe {
                match rows {
                    8 => tile::<8, $nb>(t, start),
                    7 => tile::<7, $nb>(t, start),
                    6 => tile::<6, $nb>(t, start),
                    5 => tile::<5, $nb>(t, start),
                    4 => tile::<4, $nb>(t, start),
                    3 => tile::<3, $nb>(t, start),
                    2 => tile::<2, $nb>(t, start),
                    _ => tile::<1, $nb>(t, start),
                }
            }
        };
    }
    match nb {
        3 => by_rows!(3),
        2 => by_rows!(2),
        _ => by_rows!(1),
    }
}

#[cfg(test)]
mod tests {
    use super::super::aligned::as_uninit;
    use super::super::bf16_gemm::{bf16_bits, linear_bf16_slow, Epilogue, PackedBf16};
    use super::super::bf16_io::{Input, Output};
    use super::super::vector_math::gelu_tanh_in_place;

    /// The kernel run directly (so that an AMX host, whose dispatch prefers AMX, tests it too)
    /// against the f64 reference over the same bf16 operands: relative L2 <= 1e-5 with and
    /// without bias, and through the GELU epilogue; 1 and 2 threads; partial triples, rows in
    /// several groups, inputs in several pair blocks, several tasks per thread. Rows given in
    /// bf16 give bitwise what their f32 values give, and a bf16 output is bitwise the f32
    /// output rounded to nearest even. Where the CPU lacks AVX512-BF16 the dispatch must not
    /// name this kernel.
    #[test]
    fn kernel_matches_the_reference() {
        if !super::available() {
            assert_ne!(
                super::super::bf16_gemm::bf16_gemm_path(),
                "avx512-bf16 8x48 kernel"
            );
            return;
        }
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut randn = |len: usize| super::super::test_values(&mut seed, len, 1.0);
        for (m, k, n) in [
            (1, 1, 1),
            (2, 1152, 100),
            (8, 0, 20),
            (17, 33, 16),
            (140, 300, 48),
            (300, 70, 80),
            (9, 600, 7),
            // 17 triples: several tasks per thread.
            (20, 64, 800),
            // One triple, two threads: rows split, the second task's groups start at row 152.
            (300, 64, 16),
            // Rows in two groups of MC (and, with two threads, split at row 520).
            (1030, 40, 20),
            // Inputs in two pair blocks (2350 pairs: two of 1175).
            (10, 4700, 50),
        ] {
            let (x, w, b) = (randn(m * k), randn(n * k), randn(n));
            let packed = PackedBf16::from_f32(&w, n, k);
            for threads in [1, 2] {
                for (bias, epilogue) in [
                    (Some(&b[..]), Epilogue::Bias),
                    (None, Epilogue::Bias),
                    (Some(&b[..]), Epilogue::BiasGeluTanh),
                ] {
                    let mut want = linear_bf16_slow(&x, &packed, bias, m);
                    if epilogue == Epilogue::BiasGeluTanh {
                        gelu_tanh_in_place(&mut want);
                    }
                    let run = |x: Input<'_>, y: Output<'_>| {
                        super::linear(y, x, &packed, bias, m, threads, epilogue)
                    };
                    let mut got = vec![f32::NAN; m * n];
                    run(Input::F32(&x), Output::F32(as_uninit(&mut got)));
                    let case = format!(
                        "[{m}, {k}] x [{n}, {k}], {threads} threads, {epilogue:?}, bias {}",
                        bias.is_some()
                    );
                    let xb: Vec<u16> = x.iter().map(|&v| bf16_bits(v)).collect();
                    let mut from_bits = vec![f32::NAN; m * n];
                    run(Input::Bf16(&xb), Output::F32(as_uninit(&mut from_bits)));
                    assert!(
                        from_bits
                            .iter()
                            .zip(&got)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{case}: bf16 rows"
                    );
                    let mut bits = vec![std::mem::MaybeUninit::new(0xffffu16); m * n];
                    run(Input::F32(&x), Output::Bf16(&mut bits));
                    // SAFETY: every element was initialised above.
                    let bits: Vec<u16> = bits.iter().map(|b| unsafe { b.assume_init() }).collect();
                    let rounded: Vec<u16> = got.iter().map(|&v| bf16_bits(v)).collect();
                    assert_eq!(bits, rounded, "{case}: bf16 output");
                    let (mut d, mut r) = (0f64, 0f64);
                    for (&g, &e) in got.iter().zip(&want) {
                        d += (g as f64 - e as f64).powi(2);
                        r += (e as f64).powi(2);
                    }
                    let rel = (d / r.max(1e-30)).sqrt();
                    assert!(rel <= 1e-5 || (d == 0.0), "{case}: rel L2 {rel}");
                }
            }
        }
    }
}
