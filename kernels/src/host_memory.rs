//! How much more memory this process can take from its host before an allocation fails: the
//! smallest of what the kernel offers (`MemAvailable`), what this process's cgroup still allows,
//! and what its address-space limit (`ulimit -v`) leaves. Read from `/proc` and `/sys` (Linux);
//! elsewhere nothing is known and callers skip their checks.
//!
//! Requests compare their estimated memory with this figure before they allocate, so that a size
//! that cannot fit is refused naming the flag instead of the process aborting with "memory
//! allocation of N bytes failed".

use std::fmt;
use std::path::Path;

/// The memory this process can still allocate, and which limit says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostMemory {
    /// Bytes that can still be allocated.
    pub available: u64,
    /// The binding limit.
    pub limit: MemoryLimit,
}

/// Which limit bounds [`HostMemory::available`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryLimit {
    /// The host's `MemAvailable` (free plus reclaimable page cache).
    HostAvailable,
    /// The cgroup's `memory.max` less its `memory.current`.
    Cgroup,
    /// The address-space limit (`ulimit -v`, RLIMIT_AS) less this process's virtual size.
    AddressSpace,
}

impl fmt::Display for HostMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.limit {
            MemoryLimit::HostAvailable => "available on this host (MemAvailable)",
            MemoryLimit::Cgroup => "left under this process's cgroup memory.max",
            MemoryLimit::AddressSpace => {
                "left under this process's address-space limit (ulimit -v)"
            }
        };
        write!(
            f,
            "{:.2} GiB {what}",
            self.available as f64 / (1u64 << 30) as f64
        )
    }
}

/// What this process can still allocate on its host, or `None` where that cannot be read
/// (not Linux, or `/proc` not mounted).
pub fn host_memory() -> Option<HostMemory> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let mut best = HostMemory {
        available: meminfo_available(&read("/proc/meminfo")?)?,
        limit: MemoryLimit::HostAvailable,
    };
    let mut consider = |available: Option<u64>, limit| {
        if let Some(a) = available {
            if a < best.available {
                best = HostMemory {
                    available: a,
                    limit,
                };
            }
        }
    };
    consider(cgroup_left(&read("/proc/self/cgroup")), MemoryLimit::Cgroup);
    consider(
        address_space_left(
            &read("/proc/self/limits").unwrap_or_default(),
            &read("/proc/self/status").unwrap_or_default(),
        ),
        MemoryLimit::AddressSpace,
    );
    Some(best)
}

/// `MemAvailable:  23439684 kB` -> bytes.
fn meminfo_available(meminfo: &str) -> Option<u64> {
    kib_field(meminfo, "MemAvailable:")
}

/// A `Name:   123 kB` line of a /proc file, in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line[name.len()..].split_whitespace().next()?.parse().ok()?;
    kib.checked_mul(1024)
}

/// cgroup v2: `memory.max - memory.current` of the process's group (`None` for "max").
fn cgroup_left(proc_cgroup: &Option<String>) -> Option<u64> {
    let group = proc_cgroup
        .as_deref()?
        .lines()
        .find_map(|l| l.strip_prefix("0::"))?;
    let dir = Path::new("/sys/fs/cgroup").join(group.trim_start_matches('/'));
    let value = |name: &str| -> Option<u64> {
        std::fs::read_to_string(dir.join(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    Some(value("memory.max")?.saturating_sub(value("memory.current").unwrap_or(0)))
}

/// `Max address space  <soft> <hard> bytes` of /proc/self/limits less `VmSize` of
/// /proc/self/status; `None` when unlimited.
fn address_space_left(limits: &str, status: &str) -> Option<u64> {
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max address space"))?;
    let soft: u64 = line["Max address space".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(soft.saturating_sub(kib_field(status, "VmSize:").unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_proc_formats() {
        assert_eq!(
            meminfo_available("MemTotal: 10 kB\nMemAvailable:   2048 kB\n"),
            Some(2 << 20)
        );
        assert_eq!(meminfo_available("MemTotal: 10 kB\n"), None);
        let limits = "Limit  Soft Limit Hard Limit Units\n\
                      Max address space         6144000000           unlimited            bytes\n";
        assert_eq!(
            address_space_left(limits, "VmSize:\t 1000 kB\n"),
            Some(6_144_000_000 - 1_024_000)
        );
        let unlimited =
            "Max address space         unlimited            unlimited            bytes\n";
        assert_eq!(address_space_left(unlimited, "VmSize: 1 kB"), None);
        // A process already past its limit has nothing left (no wrap).
        assert_eq!(
            address_space_left(limits, "VmSize: 99999999999 kB"),
            Some(0)
        );
    }

    #[test]
    fn this_host_reports_something_positive() {
        if cfg!(target_os = "linux") {
            let m = host_memory().expect("/proc/meminfo is readable on Linux");
            assert!(m.available > 0, "{m}");
        }
    }
}
