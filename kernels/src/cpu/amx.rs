//! Intel AMX (AMX-BF16) tiles for [`super::bf16_gemm`], in inline assembly: AMX intrinsics are
//! nightly-only, the instructions themselves are known to the stable toolchain's assembler.
//!
//! One kernel call computes a 32 x 32 block of `y`: tiles 0-3 hold the four 16 x 16 f32
//! accumulators, tiles 4-5 two 16-row strips of `x` (32 bf16 inputs each), tiles 6-7 the two
//! packed weight tiles of the block's columns; per 32 inputs, four `tdpbf16ps`. Linux hands out
//! the tile state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`), once
//! per process; each thread loads the tile configuration before its first kernel call.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::aligned::AlignedVec;
use super::bf16_gemm::{assert_operands, Epilogue, PackedBf16, CHUNK_K};
use super::bf16_io::{round_rows, Input, OutPtr, Output};

/// Output rows and columns of one kernel call.
const BLOCK: usize = 32;
/// u16 elements of one packed weight tile.
const TILE: usize = 512;

/// Whether this CPU has AMX-BF16 and this process may use the tile state. `PIPEFUSE_NO_AMX=1`
/// turns it off (to compare paths).
pub(crate) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let off = std::env::var_os("PIPEFUSE_NO_AMX").is_some_and(|v| v != "0");
        let ok = !off && detect();
        tracing::debug!(amx = ok, "AMX-BF16 detection");
        ok
    })
}

#[cfg(target_os = "linux")]
fn detect() -> bool {
    use std::arch::x86_64::__cpuid_count;
    // SAFETY: CPUID exists on every x86-64 CPU.
    #[allow(unused_unsafe)]
    let (max_leaf, leaf7) = unsafe { (__cpuid_count(0, 0).eax, __cpuid_count(7, 0)) };
    // CPUID.(7,0):EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE.
    if max_leaf < 7 || leaf7.edx & (1 << 22) == 0 || leaf7.edx & (1 << 24) == 0 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments.
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    r == 0
}

#[cfg(not(target_os = "linux"))]
fn detect() -> bool {
    false
}

/// The 64-byte tile configuration `ldtilecfg` reads (palette 1).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Every tile used (0-7) is 16 rows of 64 bytes.
const CONFIG: TileConfig = {
    let mut colsb = [0u16; 16];
    let mut rows = [0u8; 16];
    let mut t = 0;
    while t < 8 {
        colsb[t] = 64;
        rows[t] = 16;
        t += 1;
    }
    TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb,
        rows,
    }
};

/// Loads [`CONFIG`] on this thread; releases the tiles when dropped. The configuration is
/// per-thread processor state that compiled code never touches (it uses no tile registers), so
/// it stays loaded from `load` to the drop on the same thread; each kernel call is one asm block.
struct Tiles;

impl Tiles {
    /// # Safety
    /// Only when [`available`] returned true.
    unsafe fn load() -> Tiles {
        // SAFETY: AMX is present and permitted (caller); CONFIG is a valid palette-1 config.
        unsafe {
            std::arch::asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly));
        }
        Tiles
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured by `load`.
        unsafe {
            std::arch::asm!("tilerelease", options(nostack, nomem));
        }
    }
}

/// `c[32][32] = a · b` for one block over `chunks` chunks of 32 inputs: `a0` / `a1` point at
/// 16-row strips of `x` and `b0` / `b1` at weight panels, each `chunks` consecutive 1 KiB tiles;
/// `c` (row stride 128 bytes, 64-byte aligned) is overwritten. Each 32-input step also
/// prefetches `pf_lines` cache lines from `pf` on into L2 (the weights a later call reads).
///
/// # Safety
/// Tiles loaded on this thread ([`Tiles::load`]); every pointer covers what it addresses
/// (`pf`: any address, only prefetched); `chunks >= 1`, `pf_lines >= 1`.
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    a0: *const u16,
    a1: *const u16,
    b0: *const u16,
    b1: *const u16,
    chunks: usize,
    c: *mut f32,
    (pf, pf_lines): (*const u8, usize),
) {
    // SAFETY: the caller's contract. One asm block from the accumulators' start to their store,
    // so no tile register has to survive between blocks; tmm0-7 are declared clobbered.
    unsafe {
        std::arch::asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "mov {bs}, 64",
            "2:",
            "tileloadd tmm4, [{a0} + {bs}*1]",
            "tileloadd tmm6, [{b0} + {bs}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{b1} + {bs}*1]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a1} + {bs}*1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "mov {t}, {pfl}",
            "3:",
            "prefetcht1 [{pf}]",
            "add {pf}, 64",
            "dec {t}",
            "jnz 3b",
            "add {a0}, 1024",
            "add {a1}, 1024",
            "add {b0}, 1024",
            "add {b1}, 1024",
            "dec {kc}",
            "jnz 2b",
            "mov {bs}, 128",
            "tilestored [{c} + {bs}*1], tmm0",
            "tilestored [{c} + {bs}*1 + 64], tmm1",
            "tilestored [{c} + {bs}*1 + 2048], tmm2",
            "tilestored [{c} + {bs}*1 + 2112], tmm3",
            a0 = inout(reg) a0 => _,
            a1 = inout(reg) a1 => _,
            b0 = inout(reg) b0 => _,
            b1 = inout(reg) b1 => _,
            kc = inout(reg) chunks => _,
            pf = inout(reg) pf => _,
            pfl = in(reg) pf_lines,
            t = out(reg) _,
            c = in(reg) c,
            bs = out(reg) _,
            out("tmm0") _,
            out("tmm1") _,
            out("tmm2") _,
            out("tmm3") _,
            out("tmm4") _,
            out("tmm5") _,
            out("tmm6") _,
            out("tmm7") _,
            options(nostack),
        );
    }
}

/// `y = epilogue(bf16(x) · W^T + b)` on AMX tiles, the epilogue applied as each 32 x 32 block
/// is written out (still in L1). Requires [`available`].
pub(crate) fn linear(
    mut y: Output<'_>,
    x: Input<'_>,
    w: &PackedBf16,
    b: Option<&[f32]>,
    m: usize,
    threads: usize,
    epilogue: Epilogue,
) {
    assert!(available(), "amx::linear without AMX");
    assert_operands(Some(y.len()), &x, w, b, m);
    let (n, k, chunks) = (w.n(), w.k(), w.chunks());
    let kp = chunks * CHUNK_K;
    let mblocks = m.div_ceil(BLOCK);
    let npairs = n.div_ceil(BLOCK);
    // x in bf16, zero-padded to whole blocks and chunks, tile-major: each 16-row x 32-input
    // tile is 1 KiB of contiguous memory (tile t of 16-row strip s at (s * chunks + t) * TILE),
    // so a tile load reads 16 consecutive cache lines (rows of x a power-of-two apart would
    // all fall in one L1 set). The buffer is this thread's, reused across calls (a call that
    // runs nested in this one, stolen by rayon, finds it taken and allocates its own).
    let mut a = A_SCRATCH.take();
    a.reuse_for(mblocks * 2 * chunks * TILE);
    let convert = |(strip, dst): (usize, &mut [u16])| {
        for r in 0..16 {
            let row = (strip * 16 + r < m).then_some(strip * 16 + r);
            x.row_chunked(row, k, &mut dst[r * CHUNK_K..], (chunks, TILE));
        }
    };
    // One thread (attention's products, run inside its own parallel tasks): no rayon at all.
    if threads == 1 {
        a.chunks_mut(chunks * TILE).enumerate().for_each(convert);
    } else {
        a.par_chunks_mut(chunks * TILE)
            .enumerate()
            .for_each(convert);
    }
    // Tasks: column ranges, several per thread, so that rayon's work stealing evens out a thread
    // that runs slower (a vCPU the host shares: with one static half each, the whole product
    // waited for the slow one); every task reads the same bf16 rows from its own L2. Rows are
    // split only when there are too few column pairs to go round.
    let by_rows = npairs < 2 * threads && mblocks >= threads;
    let tasks = if threads == 1 {
        1
    } else if by_rows {
        threads.min(mblocks)
    } else {
        npairs.min(4 * threads)
    }
    .max(1);
    let span = |units: usize, t: usize| units * t / tasks..units * (t + 1) / tasks;
    let out = y.ptr();
    let task = |t: usize| {
        let (mbs, nps) = if by_rows {
            (span(mblocks, t), 0..npairs)
        } else {
            (0..mblocks, span(npairs, t))
        };
        // SAFETY: AMX is available (asserted above).
        let _tiles = unsafe { Tiles::load() };
        // Row blocks in groups whose bf16 rows (about 1.5 MiB) stay in L2 while every column
        // pair passes them.
        let group = ((3usize << 19) / (BLOCK * kp * 2)).max(1);
        let mut g0 = mbs.start;
        while g0 < mbs.end {
            let g = g0..(g0 + group).min(mbs.end);
            g0 = g.end;
            group_pairs(&a, w, b, m, g, nps.clone(), out, epilogue);
        }
    };
    if tasks == 1 {
        task(0);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
    A_SCRATCH.set(a);
}

thread_local! {
    /// [`linear`]'s bf16 copy of `x`, kept between calls.
    static A_SCRATCH: std::cell::Cell<AlignedVec<u16>> = std::cell::Cell::new(AlignedVec::default());
}

/// Row blocks `mbs` against column pairs `nps`: per pair, each row block's 32 x 32 block over
/// the whole K (accumulators in tiles throughout; both operands stream from L2, the pair's
/// weight panels stay there while the row blocks pass), written out through the epilogue.
#[allow(clippy::too_many_arguments)]
fn group_pairs(
    a: &[u16],
    w: &PackedBf16,
    b: Option<&[f32]>,
    m: usize,
    mbs: std::ops::Range<usize>,
    nps: std::ops::Range<usize>,
    out: OutPtr,
    epilogue: Epilogue,
) {
    let (n, chunks) = (w.n(), w.chunks());
    let mut acc = AlignedVec::<f32>::zeroed(BLOCK * BLOCK);
    // A bf16 output's block after the epilogue, before rounding.
    let mut done = match out {
        OutPtr::Bf16(_) => AlignedVec::<f32>::zeroed(BLOCK * BLOCK),
        OutPtr::F32(_) => AlignedVec::default(),
    };
    // While a pair's row blocks run, they prefetch the next pair's weight panels into L2 (the
    // group's first pair after its last: the next group starts there), spread evenly over the
    // row blocks' steps: a weight streams from DRAM once per forward, and its first row block
    // otherwise waited for it (bf16 fc2 ran 1.3x slower in a forward than timed alone).
    let pair_lines = 2 * chunks * TILE * 2 / 64;
    let pf_lines = pair_lines.div_ceil(mbs.len().max(1) * chunks.max(1)).max(1);
    for np in nps.clone() {
        let (b0, b1) = (w.panel(2 * np).as_ptr(), w.panel(2 * np + 1).as_ptr());
        let next = if np + 1 < nps.end { np + 1 } else { nps.start };
        let next = w.panel(2 * next).as_ptr().cast::<u8>();
        let n0 = np * BLOCK;
        let cols = BLOCK.min(n - n0);
        for (i, mb) in mbs.clone().enumerate() {
            let pf = next.wrapping_add(i * pf_lines * chunks * 64);
            let a0 = a[2 * mb * chunks * TILE..].as_ptr();
            if chunks == 0 {
                acc.fill(0.0); // no inputs: the product is zero (the kernel needs one chunk)
            } else {
                // SAFETY: `a` holds strips 2 mb and 2 mb + 1 of `chunks` tiles; each panel
                // holds `chunks` tiles; `acc` holds 32 x 32.
                unsafe {
                    let a1 = a0.add(chunks * TILE);
                    block(a0, a1, b0, b1, chunks, acc.as_mut_ptr(), (pf, pf_lines));
                };
            }
            let m0 = mb * BLOCK;
            // SAFETY: rows m0.. < m and columns n0..n0 + cols <= n: inside y; no other task
            // writes this region.
            unsafe {
                let bias = b.map(|b| &b[n0..n0 + cols]);
                let rows = BLOCK.min(m - m0);
                match out {
                    OutPtr::F32(y) => {
                        let o = y.add(m0 * n + n0);
                        epilogue.write_block(o, n, &acc, BLOCK, bias, (rows, cols));
                    }
                    OutPtr::Bf16(y) => {
                        let d = done.as_mut_ptr();
                        epilogue.write_block(d, BLOCK, &acc, BLOCK, bias, (rows, cols));
                        round_rows(y, n, (m0, n0), (d, BLOCK), (rows, cols));
                    }
                }
            }
        }
    }
}
