//! Losing a node of a served three-process cluster, and getting it back (issue 15): a request
//! running when `kill -9` takes node n1 finishes on n0 and n2 from its last checkpoint with the
//! uninterrupted result, and a restarted n1 is admitted again so that the next request runs on
//! three stages; over HTTP, a node lost while idle leaves the cluster ready on the others.
//! Nothing here depends on the machine's speed: the coordinator's device is a deliberate
//! straggler (`PIPEFUSE_FAULT`), so the request is still running when n1 dies, however fast the
//! machine, and every wait is for an event, bounded generously.

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod cluster_common;
mod common;
mod http_common;

use cluster_common::{cluster, http_base, serve_n0, spawn_node, until_device_runs};
use common::{bin, read_f32, rel_l2};

/// `generate --attach SOCKET args`, run to the end: (success, stderr).
fn attach(socket: &Path, args: &[&str]) -> (bool, String) {
    let o = Command::new(bin())
        .args(["generate", "--attach", socket.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The done-when of issue 15: `launch --serve` over the example three-node topology with every
/// step synchronous, a 200-step request from `generate --attach`, `kill -9` of n1 mid-request.
#[test]
fn a_request_survives_kill_9_of_a_node_and_the_node_rejoins() {
    let steps = 200;
    let (dir, topo) = cluster("resume");
    // Every step synchronous (W = T): an exact mode, so the resumed run must equal the
    // uninterrupted one.
    let text = std::fs::read_to_string(&topo).unwrap();
    std::fs::write(
        &topo,
        text.replace("warmup_steps = 1", &format!("warmup_steps = {steps}")),
    )
    .unwrap();
    let socket = dir.join("s.sock");
    let mut n1 = spawn_node(&topo, "n1", &["--node-timeout", "1"]);
    let mut n2 = spawn_node(&topo, "n2", &[]);
    // 10 ms per item on n0's device: the request takes >= 2 s, so n1 dies while it runs.
    let mut n0 = serve_n0(&topo, &socket, "straggler:0:10", &dir.join("n0.log"));
    let request = [
        "--class-label",
        "3",
        "--class-label",
        "8",
        "--steps",
        "200",
        "--seed",
        "5",
    ];

    let mut client = Command::new(bin())
        .args(["generate", "--attach", socket.to_str().unwrap()])
        .args(request)
        .args([
            "--save-latent",
            dir.join("resumed.safetensors").to_str().unwrap(),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = String::new();
    let mut killed = false;
    for line in std::io::BufReader::new(client.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
    {
        if !killed && line.contains("step 10/200") {
            n1.kill().unwrap(); // SIGKILL
            n1.wait().unwrap();
            killed = true;
        }
        seen += &line;
        seen.push('\n');
    }
    let status = client.wait().unwrap();
    assert!(killed, "the request never reached step 10: {seen}");
    assert!(status.success(), "the client must get its image: {seen}");
    assert!(
        seen.contains("node n1 was lost")
            && seen.contains("resumed from the checkpoint after step"),
        "the client is told where it resumed: {seen}"
    );
    assert!(
        seen.contains("resumed after step") && seen.contains("on 2 stage(s)"),
        "{seen}"
    );

    // n1 comes back (same certificate): requests run on three stages again.
    let mut n1 = spawn_node(&topo, "n1", &["--node-timeout", "1"]);
    until_device_runs(&socket, 1);
    let uninterrupted = dir.join("uninterrupted.safetensors");
    let (ok, err) = attach(
        &socket,
        &[
            &request[..],
            &["--save-latent", uninterrupted.to_str().unwrap()],
        ]
        .concat(),
    );
    assert!(ok && !err.contains("resumed"), "{err}");
    assert!(
        err.contains("device 0: busy") && err.contains("device 2: busy"),
        "{err}"
    );
    let (a, b) = (
        read_f32(&dir.join("resumed.safetensors"), "latent"),
        read_f32(&uninterrupted, "latent"),
    );
    let e = rel_l2(&a, &b);
    eprintln!("resumed vs uninterrupted: rel L2 {e:.2e}");
    assert!(e <= 1e-5, "{e:.3e}");

    let status = common::terminate(&mut n0, Duration::from_secs(30));
    assert!(status.success(), "{status}");
    for n in [&mut n1, &mut n2] {
        let t0 = Instant::now();
        while n.try_wait().unwrap().is_none() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "a node was left behind"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A served cluster whose node dies while no request runs stays ready on the others (`/readyz`
/// 200 naming the missing node once the loss is seen), requests succeed meanwhile, and the node
/// is taken back when it returns.
#[test]
fn a_node_lost_while_idle_leaves_the_cluster_ready_and_returns() {
    let (dir, topo) = cluster("http-idle-loss");
    // n1's 1 s idle timeout applies to its connections (the smaller of the two ends' values).
    let mut n1 = spawn_node(&topo, "n1", &["--node-timeout", "1"]);
    let mut n2 = spawn_node(&topo, "n2", &[]);
    let mut n0 = spawn_node(&topo, "n0", &["--serve", "--listen", "127.0.0.1:0"]);
    let (base, _log) = http_base(&mut n0);
    let agent = http_common::agent();
    let get = |path: &str| http_common::answer(agent.get(format!("{base}{path}")).call());
    let generate = || {
        http_common::answer(
            agent
                .post(format!("{base}/v1/images/generations"))
                .header("content-type", "application/json")
                .send(r#"{"prompt": "3", "steps": 2}"#),
        )
    };
    let until = |what: &str, pred: &dyn Fn(&str) -> bool| {
        let t0 = Instant::now();
        loop {
            let r = get("/readyz");
            assert_eq!(r.status, 200, "{what}: {}", r.body);
            if pred(&r.body) {
                return r.body;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "{what}: {}", r.body);
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert_eq!(until("all ready", &|b| b == "ready\n"), "ready\n");
    n1.kill().unwrap();
    n1.wait().unwrap();
    let body = until("the loss is seen", &|b| b.contains("waiting for n1"));
    assert!(body.contains("ready on nodes n0, n2"), "{body}");
    let a = generate();
    assert_eq!(a.status, 200, "{}", a.body);
    let mut n1 = spawn_node(&topo, "n1", &["--node-timeout", "1"]);
    until("n1 back", &|b| b == "ready\n");
    let a = generate();
    assert_eq!(a.status, 200, "{}", a.body);
    let status = common::terminate(&mut n0, Duration::from_secs(60));
    assert!(status.success(), "{status}");
    for n in [&mut n1, &mut n2] {
        let _ = n.kill();
        let _ = n.wait();
    }
    let _ = std::fs::remove_dir_all(dir);
}
