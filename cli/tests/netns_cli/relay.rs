//! A point-to-point link between two network namespaces made of two TUN devices and a userspace
//! delay line: every IP packet one namespace sends into its TUN device comes out of the other's
//! after a fixed delay, in order. The kernel on this machine has no `sch_netem`, so the delay
//! netem would add lives here; the rate limit is the kernel's own (`tc ... tbf` on each TUN).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// `_IOW('T', 202, int)`: attach this file to a (new) TUN/TAP device.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (the rest of the union unused).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens a new TUN device `name` (raw IP packets, no packet-info header). It lives as long as the
/// returned file (or until its namespace is deleted).
pub(crate) fn open_tun(name: &str) -> std::io::Result<File> {
    assert!(
        name.len() < libc::IFNAMSIZ,
        "interface name {name} too long"
    );
    let file = File::options()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `req` is a valid ifreq-shaped buffer for the duration of the call and the fd is
    // open; TUNSETIFF reads the name and flags and writes the final name back into it.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

/// Waits up to `ms` for `file` to become readable.
fn readable(file: &File, ms: i32) -> bool {
    let mut fds = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut fds, 1, ms) };
    n > 0 && fds.revents & libc::POLLIN != 0
}

/// Both directions of the link; dropping it stops the threads.
pub(crate) struct DelayLink {
    stop: Arc<AtomicBool>,
    bytes: Arc<AtomicU64>,
    /// Packets dropped per thousand (1000: the link is cut), both directions.
    drop_per_mille: Arc<AtomicU32>,
    threads: Vec<JoinHandle<()>>,
}

impl DelayLink {
    /// Forwards packets between the two TUN files in both directions, each `delay` late.
    pub(crate) fn start(a: File, b: File, delay: Duration) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let bytes = Arc::new(AtomicU64::new(0));
        let drop_per_mille = Arc::new(AtomicU32::new(0));
        let (a2, b2) = (a.try_clone()?, b.try_clone()?);
        let mut threads = Vec::new();
        for (from, to) in [(a, b2), (b, a2)] {
            let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
            let (s, d) = (stop.clone(), drop_per_mille.clone());
            threads.push(std::thread::spawn(move || {
                read_side(from, tx, delay, &s, &d)
            }));
            let (s, n) = (stop.clone(), bytes.clone());
            threads.push(std::thread::spawn(move || write_side(to, rx, &s, &n)));
        }
        Ok(Self {
            stop,
            bytes,
            drop_per_mille,
            threads,
        })
    }

    /// From now on, drops `per_mille` of every thousand packets in each direction (1000 cuts
    /// the link, 0 restores it).
    pub(crate) fn set_drop(&self, per_mille: u32) {
        self.drop_per_mille
            .store(per_mille.min(1000), Ordering::Relaxed);
    }

    /// IP bytes delivered so far, both directions.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl Drop for DelayLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn read_side(
    mut from: File,
    tx: mpsc::Sender<(Instant, Vec<u8>)>,
    delay: Duration,
    stop: &AtomicBool,
    drop_per_mille: &AtomicU32,
) {
    let mut buf = vec![0u8; 65536];
    // A fixed sequence of pseudo-random drops (xorshift): the same pattern every run.
    let mut x = 0x9E37_79B9u32;
    while !stop.load(Ordering::Relaxed) {
        if !readable(&from, 50) {
            continue;
        }
        match from.read(&mut buf) {
            Ok(n) if n > 0 => {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                if x % 1000 < drop_per_mille.load(Ordering::Relaxed) {
                    continue; // lost on the way
                }
                if tx
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
                {
                    return;
                }
            }
            _ => return, // the device is gone
        }
    }
}

fn write_side(
    mut to: File,
    rx: mpsc::Receiver<(Instant, Vec<u8>)>,
    stop: &AtomicBool,
    bytes: &AtomicU64,
) {
    while !stop.load(Ordering::Relaxed) {
        let (due, packet) = match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(p) => p,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        if to.write(&packet).is_err() {
            return;
        }
        bytes.fetch_add(packet.len() as u64, Ordering::Relaxed);
    }
}
