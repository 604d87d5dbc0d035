//! Multi-process clusters on loopback: `pipefuse keygen` + `pipefuse launch --local` (three
//! processes joined by QUIC with mutual TLS) reproduce the in-process run of the same plan
//! bitwise, move the bytes the plan predicts, and (with --no-resume) a node killed mid-request is
//! named in the error while the survivors exit cleanly. Resuming around a lost node and its
//! return: node_loss_cli.rs.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod cluster_common;
mod common;
mod http_common;

use cluster_common::{cluster, cluster_with, http_base};
use common::{bin, in_process_demo, latent_bytes as latent, root};

/// `pipefuse launch --local` on `topo` with `args`, the latent saved to `out`; its stderr.
fn launch_local(topo: &Path, args: &[&str], out: &Path) -> String {
    let o = Command::new(bin())
        .args(["launch", "--local", "--topology", topo.to_str().unwrap()])
        .args(args)
        .args(["--save-latent", out.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    err
}

#[test]
fn three_processes_equal_the_in_process_run_bitwise() {
    let (dir, topo) = cluster("bitwise");
    let (remote, local) = (
        dir.join("remote.safetensors"),
        dir.join("local.safetensors"),
    );
    let request = ["--class-label", "3", "--class-label", "8", "--steps", "12"];
    let err = launch_local(&topo, &request, &remote);
    assert!(err.contains("all 3 nodes connected"), "{err}");
    in_process_demo(3, 4, &request.map(String::from), &local);
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

/// A child node that cannot start (its port is taken) is reported when it exits, not after the
/// join timeout (300 s here: the other outcome is "did not join", which the assertion refuses).
#[test]
fn launch_local_reports_a_child_node_that_fails_at_once() {
    let (dir, topo) = cluster("child-fails");
    let text = std::fs::read_to_string(&topo).unwrap();
    let spec = topology::ClusterSpec::parse(&text, "three.toml", None).unwrap();
    let n1 = spec.nodes[1].address.clone().unwrap();
    let _taken = std::net::UdpSocket::bind(&n1).unwrap();
    let o = Command::new(bin())
        .args(["launch", "--local", "--join-timeout", "300"])
        .args(["--topology", topo.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("node n1 (exit status: 1) ended before the cluster formed"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A request that fits the coordinator's host but not another node's (n1 under `ulimit -v`) is
/// refused by that node at Begin, naming it and the figures, before anything of its size is
/// allocated anywhere; every node then exits.
#[test]
fn a_node_short_of_memory_refuses_the_request_naming_itself() {
    let (dir, topo) = cluster("node-memory");
    let t = topo.to_str().unwrap();
    let node = |name: &str, limit: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(format!("{limit} exec \"$0\" \"$@\""))
            .arg(bin())
            .args(["launch", "--topology", t, "--node", name])
            .args(["--join-timeout", "60"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut others = [node("n1", "ulimit -v 3000000 &&"), node("n2", "")];
    let o = Command::new(bin())
        .args(["launch", "--topology", t, "--node", "n0"])
        .args(["--height", "768", "--width", "768", "--class-label", "1"])
        .args(["--steps", "2", "--join-timeout", "60"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("node n1: not enough memory") && err.contains("ulimit -v"),
        "{err}"
    );
    for c in &mut others {
        let status = c.wait().unwrap();
        assert!(status.success(), "a node did not end cleanly: {status}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_killed_node_is_named_and_the_others_exit() {
    use std::io::BufRead;
    let (dir, topo) = cluster("kill");
    let t = topo.to_str().unwrap();
    let spawn = |node: &str, extra: &[&str]| {
        Command::new(bin())
            .args([
                "launch",
                "--topology",
                t,
                "--node",
                node,
                "--join-timeout",
                "15",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Only n1 asks for a 1 s idle timeout: a connection uses the smaller of its two ends' values.
    let mut n1 = spawn("n1", &["--node-timeout", "1"]);
    let mut n2 = spawn("n2", &[]);
    // --no-resume: the request fails naming the node instead of finishing on n0 and n2.
    let mut n0 = spawn(
        "n0",
        &["--class-label", "1", "--steps", "1000", "--no-resume"],
    );
    // Kill n1 once n0 reports the cluster connected and the request running.
    let stderr = n0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("stage(s)") {
                let _ = tx.send(());
            }
            all += &line;
            all.push('\n');
        }
        all
    });
    let started = rx.recv_timeout(Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    n1.kill().unwrap();
    let _ = n1.wait();
    let wait = |c: &mut std::process::Child, limit: Duration| -> Option<std::process::ExitStatus> {
        let t0 = Instant::now();
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return Some(s);
            }
            if t0.elapsed() > limit {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let s0 = wait(&mut n0, Duration::from_secs(20));
    let s2 = wait(&mut n2, Duration::from_secs(20));
    let err = reader.join().unwrap();
    assert!(started.is_ok(), "the request never started: {err}");
    let s0 = s0.unwrap_or_else(|| panic!("the coordinator hung: {err}"));
    assert!(!s0.success(), "the coordinator must fail: {err}");
    let error = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default();
    assert!(
        error.contains("node n1 was lost"),
        "the error must name the lost node: {err}"
    );
    let s2 = s2.expect("n2 did not exit");
    let mut e2 = String::new();
    let _ = std::io::Read::read_to_string(&mut n2.stderr.take().unwrap(), &mut e2);
    assert!(
        s2.success(),
        "n2 must exit cleanly once the coordinator closes: {e2}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A served cluster (`launch --local --serve`) takes requests from `generate --attach`: the
/// result equals a fresh in-process run bitwise, a bad request gets its error back, cluster flags
/// are refused, and SIGTERM stops every node and removes the socket.
#[test]
fn a_served_cluster_takes_attached_requests_until_terminated() {
    let (dir, topo) = cluster("serve");
    let socket = dir.join("s.sock");
    let mut server = Command::new(bin())
        .args([
            "launch",
            "--local",
            "--serve",
            "--topology",
            topo.to_str().unwrap(),
        ])
        .args(["--socket", socket.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("server.log")).unwrap())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !socket.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the server never listened"
        );
        assert!(
            server.try_wait().unwrap().is_none(),
            "the server exited early"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let attach = |args: &[&str]| {
        Command::new(bin())
            .args(["generate", "--attach", socket.to_str().unwrap()])
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap()
    };
    let request = ["--class-label", "3", "--class-label", "8", "--steps", "12"];
    let o = attach(&[&request[..], &["--save-latent", "served.safetensors"]].concat());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("step 12/12") && err.contains("device 2: busy"),
        "progress and summary reach the client: {err}"
    );
    let o = attach(&["--class-label", "99"]);
    assert!(
        !o.status.success()
            && String::from_utf8_lossy(&o.stderr).contains("--class-label 99 out of range")
    );
    let o = attach(&["--class-label", "1", "--num-patches", "2"]);
    assert!(
        !o.status.success()
            && String::from_utf8_lossy(&o.stderr).contains("cannot change a running cluster")
    );

    let local = dir.join("local.safetensors");
    in_process_demo(3, 4, &request.map(String::from), &local);
    assert_eq!(latent(&dir.join("served.safetensors")), latent(&local));

    // A client that goes away (killed after its first step) takes its request with it instead of
    // leaving 1000 steps nobody will read in front of the next client.
    let mut gone = Command::new(bin())
        .args(["generate", "--attach", socket.to_str().unwrap()])
        .args(["--class-label", "1", "--steps", "1000"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::BufRead;
        let stderr = gone.stderr.take().unwrap();
        let mut lines = std::io::BufReader::new(stderr).lines();
        let first = lines.find(|l| l.as_ref().is_ok_and(|l| l.contains("step ")));
        assert!(first.is_some(), "the long request never reported a step");
    }
    gone.kill().unwrap();
    let _ = gone.wait();
    // The server says it cancelled it; no timing involved.
    let t0 = Instant::now();
    let log = || std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
    while !log().contains(" cancelled: the client ") {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the abandoned request was not cancelled: {}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = attach(&["--class-label", "2", "--steps", "3"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let status = common::terminate(&mut server, Duration::from_secs(20));
    assert!(status.success(), "{status}");
    assert!(!socket.exists(), "the socket is removed");
    std::fs::remove_dir_all(&dir).ok();
}

/// The same three processes run Ring attention when the command line asks for it
/// (`--pipefusion-degree 1 --ring-degree 3`, forwarded to every node): the result equals the
/// in-process run of the same flags bitwise.
#[test]
fn three_processes_run_ring_attention_from_the_command_line() {
    let (dir, topo) = cluster("ring");
    let (remote, local) = (
        dir.join("remote.safetensors"),
        dir.join("local.safetensors"),
    );
    let request = ["--class-label", "3", "--class-label", "8", "--steps", "6"];
    let parallel = [
        "--pipefusion-degree",
        "1",
        "--ring-degree",
        "3",
        "--num-patches",
        "1",
    ];
    let err = launch_local(&topo, &[&parallel[..], &request[..]].concat(), &remote);
    assert!(err.contains("device 2: busy"), "{err}");
    let o = Command::new(bin())
        .args(["generate", "--model"])
        .arg(root().join("assets/digits-dit"))
        .args(parallel)
        .args(["--threads", "1"])
        .args(request)
        .arg("--save-latent")
        .arg(&local)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        latent(&remote),
        latent(&local),
        "3 processes vs one process"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Ring attention (and USP) inside PipeFusion stages over three processes (4 devices: the first
/// node holds stage 0's two ring ranks, the others one rank of stage 1 each, so the ring of stage
/// 1 and the pipeline cross QUIC; USP 2 x 2: 8 devices, stage 1's groups across all three nodes):
/// the result equals the in-process run of the same flags bitwise, and plain PipeFusion with the
/// same patches and warmup within 1e-5.
#[test]
fn three_processes_run_ring_inside_pipefusion() {
    for (tag, first, sp) in [
        ("ring-pf", 2, &["--ring-degree", "2"][..]),
        (
            "usp-pf",
            6,
            &["--ring-degree", "2", "--ulysses-degree", "2"][..],
        ),
    ] {
        let (dir, topo) = cluster_with(tag, first);
        let request = ["--class-label", "3", "--class-label", "8", "--steps", "6"];
        let pipeline = ["--pipefusion-degree", "2", "--num-patches", "2"];
        let flags = [&pipeline[..], sp].concat();
        let remote = dir.join("remote.safetensors");
        let err = launch_local(&topo, &[&flags[..], &request[..]].concat(), &remote);
        let last = format!("device {}: busy", first + 1);
        assert!(err.contains(&last), "{tag}: {err}");
        let (same, plain) = (dir.join("same.safetensors"), dir.join("plain.safetensors"));
        common::in_process_demo_with(&flags, &request, &same);
        common::in_process_demo_with(&pipeline, &request, &plain);
        assert_eq!(
            latent(&remote),
            latent(&same),
            "{tag}: 3 processes vs one process"
        );
        let e = common::rel_l2(
            &common::read_f32(&remote, "latent"),
            &common::read_f32(&plain, "latent"),
        );
        eprintln!("{tag} inside pipefusion 2 over QUIC vs plain PipeFusion: relative L2 {e:.3e}");
        assert!(e <= 1e-5, "{tag}: relative L2 {e:.3e} vs plain PipeFusion");
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// `launch --local --serve --listen`: a three-process cluster behind the HTTP API, every node's
/// device in the request; SIGTERM stops the server and every node.
#[test]
fn a_cluster_of_three_processes_serves_http() {
    let (dir, topo) = cluster("http");
    let mut server = Command::new(bin())
        .args(["launch", "--local", "--serve", "--listen", "127.0.0.1:0"])
        .args(["--topology", topo.to_str().unwrap()])
        .env_remove("PIPEFUSE_API_KEY")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (base, log) = http_base(&mut server);
    let agent = http_common::agent();
    let a = http_common::answer(
        agent
            .post(format!("{base}/v1/images/generations"))
            .header("content-type", "application/json")
            .send(r#"{"prompt": "3, 8", "steps": 12, "seed": 2}"#),
    );
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["data"].as_array().unwrap().len(), 2);
    let metrics = http_common::answer(agent.get(format!("{base}/metrics")).call()).body;
    for d in 0..3 {
        assert!(
            metrics.contains(&format!(
                "pipefuse_device_busy_seconds_total{{device=\"{d}\"}}"
            )),
            "device {d} ran no part of the request:\n{metrics}"
        );
    }
    // Bytes per link add up to each device's bytes, and the pipeline's links carried some.
    let value = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    };
    for from in 0..3 {
        let links: f64 = (0..3)
            .map(|to| {
                value(&format!(
                    "pipefuse_link_sent_bytes_total{{from=\"{from}\",to=\"{to}\"}}"
                ))
            })
            .sum();
        let device = value(&format!(
            "pipefuse_device_sent_bytes_total{{device=\"{from}\"}}"
        ));
        assert_eq!(links, device, "device {from}:\n{metrics}");
    }
    for (from, to) in [(0, 1), (1, 2)] {
        let series = format!("pipefuse_link_sent_bytes_total{{from=\"{from}\",to=\"{to}\"}}");
        assert!(value(&series) > 0.0, "{series}:\n{metrics}");
    }
    let status = common::terminate(&mut server, Duration::from_secs(60));
    let log = log.join().unwrap();
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("stopped serving"), "{log}");
    let _ = std::fs::remove_dir_all(dir);
}
