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

use super::bf16_gemm::{bf16_bits, PackedBf16, CHUNK_K};

/// Output rows and columns of one kernel call.
const BLOCK: usize = 32;

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

/// Loads [`CONFIG`] on this thread; releases the tiles when dropped.
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

/// `c[32][32] = a[32 rows, 32 chunks...] · b` for one block: `a0` / `a1` point at 16 rows each
/// (row stride `sa` bytes), `b0` / `b1` at `chunks` consecutive 1 KiB weight tiles.
///
/// # Safety
/// Tiles loaded on this thread ([`Tiles::load`]); every pointer covers what it addresses;
/// `chunks >= 1`.
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    a0: *const u16,
    a1: *const u16,
    sa: usize,
    b0: *const u16,
    b1: *const u16,
    chunks: usize,
    c: *mut f32,
) {
    // SAFETY: the caller's contract; tmm0-7 are not used by compiled code.
    unsafe {
        std::arch::asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "mov {bs}, 64",
            "2:",
            "tileloadd tmm4, [{a0} + {sa}*1]",
            "tileloadd tmm5, [{a1} + {sa}*1]",
            "tileloadd tmm6, [{b0} + {bs}*1]",
            "tileloadd tmm7, [{b1} + {bs}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a0}, 64",
            "add {a1}, 64",
            "add {b0}, 1024",
            "add {b1}, 1024",
            "dec {kc}",
            "jnz 2b",
            "mov {bs}, 128",
            "tilestored [{c} + {bs}*1], tmm0",
            "add {c}, 64",
            "tilestored [{c} + {bs}*1], tmm1",
            "add {c}, 1984",
            "tilestored [{c} + {bs}*1], tmm2",
            "add {c}, 64",
            "tilestored [{c} + {bs}*1], tmm3",
            a0 = inout(reg) a0 => _,
            a1 = inout(reg) a1 => _,
            sa = in(reg) sa,
            b0 = inout(reg) b0 => _,
            b1 = inout(reg) b1 => _,
            kc = inout(reg) chunks => _,
            c = inout(reg) c => _,
            bs = out(reg) _,
            options(nostack),
        );
    }
}

/// A pointer that tasks writing disjoint parts of one buffer share.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: every task writes its own rows x columns region (see `linear`).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

/// `y = bf16(x) · W^T + b` on AMX tiles. Requires [`available`].
pub(crate) fn linear(
    y: &mut [f32],
    x: &[f32],
    w: &PackedBf16,
    b: Option<&[f32]>,
    m: usize,
    threads: usize,
) {
    assert!(available(), "amx::linear without AMX");
    let (n, k, chunks) = (w.n(), w.k(), w.chunks());
    let kp = chunks * CHUNK_K;
    let mblocks = m.div_ceil(BLOCK);
    let npairs = n.div_ceil(BLOCK);
    // x in bf16, zero-padded to whole blocks and chunks.
    let mut a = vec![0u16; mblocks * BLOCK * kp];
    a.par_chunks_mut(kp)
        .zip(x.par_chunks(k))
        .for_each(|(dst, src)| {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = bf16_bits(s);
            }
        });
    // Tasks: row ranges when there are enough row blocks, else column ranges. Within a task the
    // weight panel of a column pair stays in cache while the row blocks stream past it.
    let by_rows = mblocks >= threads;
    let tasks = threads.clamp(1, if by_rows { mblocks } else { npairs });
    let span = |units: usize, t: usize| units * t / tasks..units * (t + 1) / tasks;
    let out = Shared(y.as_mut_ptr());
    (0..tasks).into_par_iter().for_each(|t| {
        let out = out;
        let (mbs, nps) = if by_rows {
            (span(mblocks, t), 0..npairs)
        } else {
            (0..mblocks, span(npairs, t))
        };
        // SAFETY: AMX is available (asserted above).
        let _tiles = unsafe { Tiles::load() };
        let mut c = [0f32; BLOCK * BLOCK];
        for np in nps {
            let (b0, b1) = (w.panel(2 * np).as_ptr(), w.panel(2 * np + 1).as_ptr());
            for mb in mbs.clone() {
                let a0 = a[mb * BLOCK * kp..].as_ptr();
                // SAFETY: `a` holds 32 rows of kp from a0 on; each panel holds `chunks` tiles;
                // `c` is 32 x 32.
                unsafe {
                    block(a0, a0.add(16 * kp), kp * 2, b0, b1, chunks, c.as_mut_ptr());
                }
                let (m0, n0) = (mb * BLOCK, np * BLOCK);
                let cols = BLOCK.min(n - n0);
                for i in 0..BLOCK.min(m - m0) {
                    // SAFETY: row m0 + i < m and columns n0..n0 + cols < n: inside y; no other
                    // task writes this region.
                    let row = unsafe {
                        std::slice::from_raw_parts_mut(out.0.add((m0 + i) * n + n0), cols)
                    };
                    let acc = &c[i * BLOCK..][..cols];
                    match b {
                        Some(b) => {
                            for ((o, &v), &bias) in row.iter_mut().zip(acc).zip(&b[n0..]) {
                                *o = v + bias;
                            }
                        }
                        None => row.copy_from_slice(acc),
                    }
                }
            }
        }
    });
}
