//! The fault matrix's process-level rows (issue 15; RELIABILITY.md): a hung node (`SIGSTOP`), the
//! coordinator's node killed, a straggler. Every request ends within a bound with a result or an
//! error naming the cause, and no process is left behind. The coordinator's device is a
//! deliberate straggler where a request must still be running when the fault comes.

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod cluster_common;
mod common;
mod http_common;

use cluster_common::{cluster, serve_n0, spawn_node, until_device_runs};
use common::bin;

/// Runs an attached request; calls `at_step_10` once its 10th step is reported. Returns
/// (success, everything the client printed).
fn attach_and(socket: &Path, args: &[&str], mut at_step_10: impl FnMut()) -> (bool, String) {
    let mut client = Command::new(bin())
        .args(["generate", "--attach", socket.to_str().unwrap()])
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = String::new();
    let mut fired = false;
    for line in std::io::BufReader::new(client.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
    {
        if !fired && line.contains("step 10/") {
            at_step_10();
            fired = true;
        }
        seen += &line;
        seen.push('\n');
    }
    let ok = client.wait().unwrap().success();
    assert!(fired, "the request never reached step 10: {seen}");
    (ok, seen)
}

/// Waits (bounded) for `child` to exit; its status.
fn exits(child: &mut Child, what: &str) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{what} was left running"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A node stopped with `SIGSTOP` mid-request is a hung node: after the idle timeout it counts
/// as lost and the request finishes on the others; continued later, it is dialled again by
/// the coordinator's node, rejoins, and the next request runs on all three nodes.
#[test]
fn a_hung_node_is_resumed_around_and_rejoins_when_continued() {
    let (dir, topo) = cluster("sigstop");
    let socket = dir.join("s.sock");
    let mut n1 = spawn_node(&topo, "n1", &["--node-timeout", "1"]);
    let mut n2 = spawn_node(&topo, "n2", &[]);
    let mut n0 = serve_n0(&topo, &socket, "straggler:0:10", &dir.join("n0.log"));
    let pid = n1.id().to_string();
    let (ok, seen) = attach_and(&socket, &["--class-label", "4", "--steps", "200"], || {
        assert!(Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success());
    });
    assert!(ok, "the request must finish on n0 and n2: {seen}");
    assert!(seen.contains("node n1 was lost"), "{seen}");
    assert!(Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    until_device_runs(&socket, 1);
    let status = common::terminate(&mut n0, Duration::from_secs(30));
    assert!(status.success(), "{status}");
    exits(&mut n1, "n1");
    exits(&mut n2, "n2");
    std::fs::remove_dir_all(&dir).ok();
}

/// The coordinator's node killed mid-request: the cluster ends (the coordinator is its single
/// point of failure); the client is told, and the other nodes exit naming the lost
/// coordinator.
#[test]
fn losing_the_coordinators_node_ends_the_cluster_and_every_process() {
    let (dir, topo) = cluster("kill-coordinator");
    let socket = dir.join("s.sock");
    let mut n1 = spawn_node(&topo, "n1", &["--node-timeout", "1"]);
    let mut n2 = spawn_node(&topo, "n2", &["--node-timeout", "1"]);
    let mut n0 = serve_n0(&topo, &socket, "straggler:0:10", &dir.join("n0.log"));
    let (ok, seen) = attach_and(&socket, &["--class-label", "4", "--steps", "200"], || {
        n0.kill().unwrap();
    });
    assert!(!ok, "the client must fail: {seen}");
    let _ = n0.wait();
    for (n, name) in [(&mut n1, "n1"), (&mut n2, "n2")] {
        let s = exits(n, name);
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(&mut n.stderr.take().unwrap(), &mut err);
        assert!(!s.success(), "{name} lost its coordinator: {err}");
        assert!(
            err.contains("n0"),
            "{name} names the lost coordinator: {err}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A straggler (every item on n1's device 30 ms slower, several times the demo's own item
/// time) slows the request but changes nothing in its result.
#[test]
fn a_straggler_slows_a_request_without_changing_its_result() {
    let (dir, topo) = cluster("straggler");
    let socket = dir.join("s.sock");
    let mut n1 = Command::new(bin())
        .args([
            "launch",
            "--topology",
            topo.to_str().unwrap(),
            "--node",
            "n1",
        ])
        .args(["--join-timeout", "15"])
        .env("PIPEFUSE_FAULT", "straggler:1:30")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut n2 = spawn_node(&topo, "n2", &[]);
    let mut n0 = serve_n0(&topo, &socket, "", &dir.join("n0.log"));
    let out = dir.join("slow.safetensors");
    let o = Command::new(bin())
        .args(["generate", "--attach", socket.to_str().unwrap()])
        .args([
            "--class-label",
            "6",
            "--steps",
            "12",
            "--save-latent",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let local = dir.join("local.safetensors");
    common::in_process_demo(
        3,
        4,
        &["--class-label", "6", "--steps", "12"].map(String::from),
        &local,
    );
    assert_eq!(common::latent_bytes(&out), common::latent_bytes(&local));
    let status = common::terminate(&mut n0, Duration::from_secs(30));
    assert!(status.success(), "{status}");
    exits(&mut n1, "n1");
    exits(&mut n2, "n2");
    std::fs::remove_dir_all(&dir).ok();
}

/// The disk fills while a served request saves its outputs: the coordinator's node runs in its
/// own mount namespace where the output folder is a 4 KiB tmpfs. The request's client is told
/// which output failed and why (nothing half-written is left, the output that fit is kept), and
/// the cluster serves the next request.
#[test]
fn a_full_disk_fails_the_output_not_the_cluster() {
    let (dir, topo) = cluster("full-disk");
    let full = dir.join("full");
    std::fs::create_dir_all(&full).unwrap();
    let socket = dir.join("s.sock");
    let mut n1 = spawn_node(&topo, "n1", &[]);
    let mut n2 = spawn_node(&topo, "n2", &[]);
    let script = format!(
        "mount -t tmpfs -o size=4k tmpfs '{}' && exec '{}' launch --topology '{}' --node n0 \
         --join-timeout 15 --serve --socket '{}'",
        full.display(),
        bin(),
        topo.display(),
        socket.display()
    );
    let mut n0 = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("n0.log")).unwrap())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !socket.exists() {
        let log = std::fs::read_to_string(dir.join("n0.log")).unwrap_or_default();
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "never listened: {log}"
        );
        assert!(n0.try_wait().unwrap().is_none(), "n0 exited: {log}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let attach = |args: &[&str]| {
        Command::new(bin())
            .args(["generate", "--attach", socket.to_str().unwrap()])
            .args(["--class-label", "1", "--steps", "2"])
            .args(args)
            .output()
            .unwrap()
    };
    let (png, lat) = (full.join("big.png"), full.join("l.safetensors"));
    let o = attach(&[
        "--png-scale",
        "32",
        "--out",
        png.to_str().unwrap(),
        "--save-latent",
        lat.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("--out") && err.contains("No space left on device"),
        "{err}"
    );
    assert!(
        err.contains("final latent written"),
        "the output that fit is kept: {err}"
    );
    let elsewhere = dir.join("elsewhere.safetensors");
    let o = attach(&["--save-latent", elsewhere.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(elsewhere.exists());
    let status = common::terminate(&mut n0, Duration::from_secs(30));
    assert!(status.success(), "{status}");
    exits(&mut n1, "n1");
    exits(&mut n2, "n2");
    std::fs::remove_dir_all(&dir).ok();
}
