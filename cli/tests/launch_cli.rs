//! Multi-process clusters on loopback: `pipefuse keygen` + `pipefuse launch --local` (three
//! processes joined by QUIC with mutual TLS) reproduce the in-process run of the same plan
//! bitwise, move the bytes the plan predicts, and a node killed mid-request is named in the
//! error while the survivors exit cleanly.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_pipefuse")
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A three-node topology on loopback ports `base..base + 3`, with certificates, in a fresh dir.
fn cluster(tag: &str, base: u16) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("pipefuse-launch-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let text = std::fs::read_to_string(root().join("examples/topologies/three-nodes-local.toml"))
        .unwrap()
        .replace(
            "../../assets/digits-dit",
            root().join("assets/digits-dit").to_str().unwrap(),
        )
        .replace("7100", &base.to_string())
        .replace("7101", &(base + 1).to_string())
        .replace("7102", &(base + 2).to_string());
    let topo = dir.join("three.toml");
    std::fs::write(&topo, text).unwrap();
    let o = Command::new(bin())
        .args(["keygen", "--topology", topo.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (dir, topo)
}

/// Loopback ports for this test process (tests of one binary run in parallel: distinct bases).
fn ports(offset: u16) -> u16 {
    20000 + (std::process::id() % 2000) as u16 * 10 + offset
}

fn latent(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor("latent").unwrap().data().to_vec()
}

#[test]
fn three_processes_equal_the_in_process_run_bitwise() {
    let (dir, topo) = cluster("bitwise", ports(0));
    let (remote, local) = (
        dir.join("remote.safetensors"),
        dir.join("local.safetensors"),
    );
    let request = ["--class-label", "3", "--class-label", "8", "--steps", "12"];
    let o = Command::new(bin())
        .args(["launch", "--local", "--topology", topo.to_str().unwrap()])
        .args(request)
        .args(["--save-latent", remote.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("all 3 nodes connected"), "{err}");
    // The same plan in one process: 3 CPU devices x 1 thread, M = 4, W = 1.
    let o = Command::new(bin())
        .args([
            "generate",
            "--model",
            root().join("assets/digits-dit").to_str().unwrap(),
        ])
        .args([
            "--pipefusion-degree",
            "3",
            "--num-patches",
            "4",
            "--warmup-steps",
            "1",
            "--threads",
            "1",
        ])
        .args(request)
        .args(["--save-latent", local.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        latent(&remote),
        latent(&local),
        "3 processes over QUIC vs one process"
    );

    // Stage 0 -> 1 carries [B' = 4, 64 tokens, 128] f32 per step (plan), plus frame headers.
    let predicted = 12.0 * (4 * 64 * 128 * 4) as f64 / 1e6;
    let line = err
        .lines()
        .find(|l| l.trim_start().starts_with("device 0:"))
        .expect("summary");
    let mb: f64 = line
        .split(", ")
        .find(|p| p.ends_with("MB sent"))
        .unwrap()
        .trim_end_matches(" MB sent")
        .parse()
        .unwrap();
    assert!(
        (mb - predicted).abs() <= 0.05 * predicted,
        "device 0 sent {mb} MB, the plan says {predicted:.3} MB"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_killed_node_is_named_and_the_others_exit() {
    let (dir, topo) = cluster("kill", ports(5));
    let t = topo.to_str().unwrap();
    let spawn = |node: &str, extra: &[&str]| {
        Command::new(bin())
            .args([
                "launch",
                "--topology",
                t,
                "--node",
                node,
                "--node-timeout",
                "1",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut n1 = spawn("n1", &[]);
    let n2 = spawn("n2", &[]);
    let n0 = spawn("n0", &["--class-label", "1", "--steps", "1000"]);
    std::thread::sleep(Duration::from_secs(3));
    n1.kill().unwrap();
    let _ = n1.wait();
    let wait = |mut c: std::process::Child, limit: Duration| -> Output {
        let t0 = Instant::now();
        while c.try_wait().unwrap().is_none() {
            if t0.elapsed() > limit {
                let _ = c.kill();
                panic!("a node did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        c.wait_with_output().unwrap()
    };
    let o0 = wait(n0, Duration::from_secs(20));
    let err = String::from_utf8_lossy(&o0.stderr);
    eprintln!("coordinator: {err}");
    assert!(!o0.status.success(), "the coordinator must fail: {err}");
    assert!(
        err.contains("n1") && (err.contains("lost") || err.contains("gone")),
        "{err}"
    );
    let o2 = wait(n2, Duration::from_secs(20));
    assert!(
        o2.status.success(),
        "n2 must exit cleanly once the coordinator closes: {}",
        String::from_utf8_lossy(&o2.stderr)
    );
    std::fs::remove_dir_all(&dir).ok();
}
