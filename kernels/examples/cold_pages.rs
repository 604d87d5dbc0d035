//! What reading memory costs once its pages have gone cold, as a model's weights have by the time
//! the next forward reads them (each weight is read once per forward, seconds apart): 1 GiB read
//! right after it was written, again after an idle pause, and once more at once; then one
//! cache line per 4 KiB page (what a page walk costs), warm and after a pause. With `huge`, the
//! buffer is advised to use transparent huge pages first (Linux). Run:
//! `cargo run --release -p kernels --example cold_pages [PAUSE_SECONDS] [huge]`.
//!
//! On the 2-vCPU KVM hosts of BENCHMARKS.md (2026-12-07) a cold 4 KiB page cost ~1.9 us against
//! ~0.06 us warm: streaming cold memory ran at 1.3-2 GB/s on one core, 6-9 GB/s warm.

use std::time::{Duration, Instant};

const BYTES: usize = 1 << 30;
const PAGE_FLOATS: usize = 1024;

fn read_gbps(v: &[f32]) -> f64 {
    let t = Instant::now();
    let s: f32 = v.chunks(16).map(|c| c.iter().sum::<f32>()).sum();
    std::hint::black_box(s);
    v.len() as f64 * 4.0 / t.elapsed().as_secs_f64() / 1e9
}

fn ns_per_page(v: &[f32]) -> f64 {
    let t = Instant::now();
    let s: f32 = v.iter().step_by(PAGE_FLOATS).sum();
    std::hint::black_box(s);
    t.elapsed().as_secs_f64() * 1e9 / (v.len() / PAGE_FLOATS) as f64
}

fn main() {
    let pause: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let huge = std::env::args().nth(2).as_deref() == Some("huge");
    let mut v: Vec<f32> = Vec::with_capacity(BYTES / 4);
    #[cfg(target_os = "linux")]
    if huge {
        // madvise wants a page-aligned start: the allocation's whole pages.
        let start = (v.as_ptr() as usize).next_multiple_of(4096);
        let end = (v.as_ptr() as usize + v.capacity() * 4) / 4096 * 4096;
        // SAFETY: the range lies within the vector's own allocation; advice does not change
        // its contents.
        let r = unsafe { libc::madvise(start as *mut _, end - start, libc::MADV_HUGEPAGE) };
        println!(
            "madvise(MADV_HUGEPAGE): {}",
            if r == 0 { "ok" } else { "refused" }
        );
    }
    v.resize(BYTES / 4, 1.0);
    let sleep = || std::thread::sleep(Duration::from_secs(pause));
    println!(
        "1 GiB, one thread{}: read right after writing {:.1} GB/s, again {:.1} GB/s",
        if huge { ", huge pages advised" } else { "" },
        read_gbps(&v),
        read_gbps(&v)
    );
    sleep();
    let cold = read_gbps(&v);
    println!(
        "after {pause} s idle: {cold:.1} GB/s, again at once {:.1} GB/s",
        read_gbps(&v)
    );
    let warm = ns_per_page(&v);
    sleep();
    println!(
        "one line per 4 KiB page: warm {warm:.0} ns/page, after {pause} s idle {:.0} ns/page",
        ns_per_page(&v)
    );
}
