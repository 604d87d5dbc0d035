//! Three-node clusters of `pipefuse launch` processes on loopback: the topology (the example
//! `three-nodes-local.toml` on free ports, with certificates) and how to start a node.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::common::{self, bin};
use crate::http_common;

/// A three-node topology on free loopback ports, with certificates, in a fresh dir.
pub fn cluster(tag: &str) -> (PathBuf, PathBuf) {
    cluster_with(tag, 1)
}

/// [`cluster`] with `first` CPU devices on the first node (one on each other node).
pub fn cluster_with(tag: &str, first: usize) -> (PathBuf, PathBuf) {
    let [p0, p1, p2] = free_ports();
    let dir = common::scratch_dir(&format!("launch-{tag}"));
    let text =
        common::example_topology_with_demo("three-nodes-local.toml", "../../assets/digits-dit")
            // Whole quoted addresses, so a new port that contains "7101" or "7102" (say 57102)
            // is not rewritten by the next replacement.
            .replace("\"127.0.0.1:7100\"", &format!("\"127.0.0.1:{p0}\""))
            .replace("\"127.0.0.1:7101\"", &format!("\"127.0.0.1:{p1}\""))
            .replace("\"127.0.0.1:7102\"", &format!("\"127.0.0.1:{p2}\""))
            .replace(
                "pipefusion_degree = 3",
                &format!("pipefusion_degree = {}", 2 + first),
            )
            .replacen(
                r#"devices = [{ kind = "cpu", threads = 1 }]"#,
                &format!(
                    "devices = [{}]",
                    vec![r#"{ kind = "cpu", threads = 1 }"#; first].join(", ")
                ),
                1,
            );
    for p in [p0, p1, p2] {
        let addr = format!("\"127.0.0.1:{p}\"");
        assert!(text.contains(&addr), "the example topology lost {addr}");
    }
    let topo = dir.join("three.toml");
    std::fs::write(&topo, text).unwrap();
    let o = Command::new(bin())
        .args(["keygen", "--topology", topo.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (dir, topo)
}

/// Three UDP ports the OS reports free right now (held together, so they are distinct).
pub fn free_ports() -> [u16; 3] {
    let s: Vec<std::net::UdpSocket> = (0..3)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| s[i].local_addr().unwrap().port())
}

/// Reads `child`'s stderr until the line naming its HTTP address; the address (`http://...`) and
/// everything read so far. The rest of stderr is drained into the returned thread's string.
pub fn http_base(child: &mut std::process::Child) -> (String, std::thread::JoinHandle<String>) {
    let (base, seen, mut err) = http_common::read_address(child);
    let rest = std::thread::spawn(move || {
        let mut rest = seen;
        let _ = std::io::Read::read_to_string(&mut err, &mut rest);
        rest
    });
    (base, rest)
}

/// A node process that is killed when dropped (a failing test leaves nothing running).
pub struct Proc(pub std::process::Child);

impl std::ops::Deref for Proc {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `launch --topology T --node NODE --join-timeout 15 <extra>`, stderr piped; killed if the test
/// ends with it still running.
pub fn spawn_node(topo: &Path, node: &str, extra: &[&str]) -> Proc {
    Proc(
        Command::new(bin())
            .args([
                "launch",
                "--topology",
                topo.to_str().unwrap(),
                "--node",
                node,
            ])
            .args(["--join-timeout", "15"])
            .args(extra)
            .env_remove("PIPEFUSE_API_KEY")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

/// The coordinator's node `n0` of `topo` serving on the Unix socket `socket` (`launch --node n0
/// --join-timeout 15 --serve --socket S`) with `PIPEFUSE_FAULT=fault` (a straggler keeps a
/// request running long enough to meet a fault), its stderr in `log`; returned once listening,
/// killed if the test ends with it still running.
pub fn serve_n0(topo: &Path, socket: &Path, fault: &str, log: &Path) -> Proc {
    let mut n0 = Proc(
        Command::new(bin())
            .args(["launch", "--topology", topo.to_str().unwrap()])
            .args([
                "--node",
                "n0",
                "--join-timeout",
                "15",
                "--serve",
                "--socket",
            ])
            .arg(socket)
            .env("PIPEFUSE_FAULT", fault)
            .env_remove("PIPEFUSE_API_KEY")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for_socket(socket, &mut n0);
    n0
}

/// Waits (at most 60 s) for a served cluster's socket at `path` while `child` (the coordinator's
/// node) runs.
pub fn wait_for_socket(path: &Path, child: &mut std::process::Child) {
    let t0 = std::time::Instant::now();
    while !path.exists() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(60),
            "the server never listened"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the server exited early"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Sends 2-step requests to the served cluster at `socket` until device `device` runs in one
/// (a node taken back), at most 60 s; every request must succeed.
pub fn until_device_runs(socket: &Path, device: usize) {
    let t0 = std::time::Instant::now();
    loop {
        let o = Command::new(bin())
            .args(["generate", "--attach", socket.to_str().unwrap()])
            .args(["--class-label", "1", "--steps", "2"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        if err.contains(&format!("device {device}: busy")) {
            return;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(60),
            "device {device} never ran again: {err}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
