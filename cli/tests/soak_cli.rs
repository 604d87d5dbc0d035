//! Soak (issue 15): 200 requests through a served three-process cluster (`launch --serve
//! --listen` on n0, n1 and n2 as their own processes), four clients at a time. Every request is
//! accounted for (200 answers, 200 in `pipefuse_requests_total{outcome="succeeded"}`), and each
//! process's memory and open files after the last request are within bounds of what they were
//! after the first 20 (printed, first vs last). The bounds are about leaks, not speed: a leak of
//! one latent or one connection per request would exceed them.

use std::time::Duration;

mod cluster_common;
mod common;
mod http_common;

use cluster_common::{cluster, http_base, spawn_node};

/// (resident memory in kB, open file descriptors) of process `pid`.
fn usage(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    (rss, fds)
}

#[test]
fn two_hundred_requests_leave_memory_and_open_files_flat() {
    let (dir, topo) = cluster("soak");
    let mut n1 = spawn_node(&topo, "n1", &[]);
    let mut n2 = spawn_node(&topo, "n2", &[]);
    let mut n0 = spawn_node(&topo, "n0", &["--serve", "--listen", "127.0.0.1:0"]);
    let (base, log) = http_base(&mut n0);
    let pids = [n0.id(), n1.id(), n2.id()];
    let send = |count: usize, offset: usize| {
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let base = base.clone();
                std::thread::spawn(move || {
                    let agent = http_common::agent();
                    (0..count / 4)
                        .map(|i| {
                            let body = format!(
                                r#"{{"prompt": "{}", "steps": 2, "seed": {}}}"#,
                                (i + t) % 10,
                                offset + 4 * i + t
                            );
                            let a = http_common::answer(
                                agent
                                    .post(format!("{base}/v1/images/generations"))
                                    .header("content-type", "application/json")
                                    .send(&body),
                            );
                            assert_eq!(a.status, 200, "{}", a.body);
                            1
                        })
                        .sum::<usize>()
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .sum::<usize>()
    };
    let mut answered = send(20, 0);
    let first: Vec<_> = pids.iter().map(|&p| usage(p)).collect();
    answered += send(180, 1000);
    let last: Vec<_> = pids.iter().map(|&p| usage(p)).collect();
    assert_eq!(answered, 200);
    let agent = http_common::agent();
    let metrics = http_common::answer(agent.get(format!("{base}/metrics")).call()).body;
    let succeeded = metrics
        .lines()
        .find_map(|l| l.strip_prefix("pipefuse_requests_total{outcome=\"succeeded\"} "))
        .map(|v| v.trim().parse::<f64>().unwrap());
    assert_eq!(succeeded, Some(200.0), "{metrics}");
    for (i, (f, l)) in first.iter().zip(&last).enumerate() {
        eprintln!(
            "n{i}: resident memory {} kB -> {} kB, open files {} -> {}",
            f.0, l.0, f.1, l.1
        );
        // 180 more requests: a leak of about 200 kB or more per request (a device's K/V buffers,
        // a PNG, a thread's stack) or of one connection or file per request exceeds this.
        assert!(
            l.0 <= f.0 + f.0 / 4 + 16 * 1024,
            "n{i}: memory grew {} -> {} kB",
            f.0,
            l.0
        );
        assert!(l.1 <= f.1 + 4, "n{i}: open files grew {} -> {}", f.1, l.1);
    }
    let status = common::terminate(&mut n0, Duration::from_secs(60));
    assert!(status.success(), "{status}: {}", log.join().unwrap());
    for n in [&mut n1, &mut n2] {
        let t0 = std::time::Instant::now();
        while n.try_wait().unwrap().is_none() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "a node was left behind"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}
