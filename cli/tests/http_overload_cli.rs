//! `pipefuse serve` under overload (issue 14): with a small queue and many concurrent clients,
//! every request ends as 200 or 429, the 429s come back at once (while the cluster is still busy
//! with the request ahead of them; their latency is printed) with `Retry-After`, nothing is lost,
//! and `/metrics` counts what the clients saw. Deadlines end requests with 504 whether they wait or run.

use std::time::Instant;

mod http_common;

use http_common::Served;

const CLIENTS: usize = 24;

#[test]
fn overload_ends_every_request_as_200_or_429_and_metrics_agree() {
    let s = Served::start("overload", &["--max-queue", "2"]);
    // A long request holds the cluster while the clients arrive.
    let long = s.running_job(r#"{"prompt": "9", "steps": 1000}"#);
    let (tx, rx) = std::sync::mpsc::channel();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (base, tx) = (s.base.clone(), tx.clone());
            std::thread::spawn(move || {
                let body = format!(r#"{{"prompt": "{}", "steps": 2, "seed": {i}}}"#, i % 10);
                let t0 = Instant::now();
                let a = http_common::answer(
                    http_common::agent()
                        .post(format!("{base}/v1/images/generations"))
                        .header("content-type", "application/json")
                        .send(&body),
                );
                let _ = tx.send((a.status, t0.elapsed()));
                a
            })
        })
        .collect();
    drop(tx);
    // The two requests that fit the queue wait behind the long one; every other is refused,
    // and all those refusals arrive while the long request still runs.
    let mut refused = Vec::new();
    while refused.len() < CLIENTS - 2 {
        let (status, took) = rx.recv_timeout(http_common::HANG).expect("a refusal");
        assert_eq!(
            status, 429,
            "only refusals can end while the cluster is busy"
        );
        refused.push(took);
    }
    assert_eq!(
        s.get(&format!("/v1/jobs/{long}")).json()["status"],
        "running"
    );
    assert_eq!(s.metric("pipefuse_queue_depth"), 2.0);
    assert_eq!(s.delete(&format!("/v1/jobs/{long}")).status, 200);
    let answers: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let ok = answers.iter().filter(|a| a.status == 200).count();
    let rejected: Vec<_> = answers.iter().filter(|a| a.status == 429).collect();
    assert_eq!((ok, rejected.len()), (2, CLIENTS - 2), "{answers:?}");
    for a in &rejected {
        let secs: u64 = a
            .retry_after
            .as_deref()
            .expect("Retry-After")
            .parse()
            .unwrap();
        assert!(secs >= 1, "{a:?}");
        assert!(a.body.contains("queue is full"), "{}", a.body);
    }
    // How fast: the server decides a refusal in microseconds of work (on a quiet 2-vCPU machine
    // all 22 in under 1 ms on its own clock, client round trips median 12 ms: BENCHMARKS.md).
    // Printed, not asserted: with other jobs on the cores (a training run beside this test: 13 of
    // 22 within 50 ms, median round trip 80 ms) any bound in milliseconds depends on the machine.
    // What is asserted above does not: every refusal arrived while the cluster was still busy.
    let within = s.metric("pipefuse_refusal_seconds_bucket{le=\"0.05\"}");
    let total = s.metric("pipefuse_refusal_seconds_count");
    assert_eq!(total, (CLIENTS - 2) as f64);
    eprintln!("refusals decided within 50 ms (server clock): {within} of {total}");
    refused.sort();
    eprintln!(
        "429 round trips seen by {CLIENTS} simultaneous clients: median {:.1} ms, max {:.1} ms",
        refused[refused.len() / 2].as_secs_f64() * 1e3,
        refused.last().unwrap().as_secs_f64() * 1e3
    );
    // The server counted what the clients saw.
    for (outcome, n) in [
        ("succeeded", 2.0),
        ("rejected", (CLIENTS - 2) as f64),
        ("cancelled", 1.0),
        ("failed", 0.0),
        ("timed_out", 0.0),
    ] {
        let series = format!("pipefuse_requests_total{{outcome=\"{outcome}\"}}");
        assert_eq!(s.metric(&series), n, "{series}");
    }
    assert_eq!(s.metric("pipefuse_queue_depth"), 0.0);
}

#[test]
fn deadlines_end_waiting_and_running_requests_with_504() {
    let s = Served::start("deadline", &[]);
    let long = s
        .post(
            "/v1/jobs",
            r#"{"prompt": "9", "steps": 1000, "timeout": 1}"#,
        )
        .json();
    let long = long["id"].as_str().unwrap().to_string();
    // Queued behind it with a deadline shorter than the long job's: it expires while waiting.
    let waiting = s.post(
        "/v1/images/generations",
        r#"{"prompt": "1", "steps": 2, "timeout": 0.5}"#,
    );
    assert_eq!(waiting.status, 504, "{}", waiting.body);
    assert!(waiting.body.contains("still waiting"), "{}", waiting.body);
    s.wait_until("the long job ends", |s| {
        s.get(&format!("/v1/jobs/{long}")).json()["status"] != "running"
    });
    let job = s.get(&format!("/v1/jobs/{long}")).json();
    assert_eq!(job["status"], "failed", "{job}");
    assert!(
        job["error"].as_str().unwrap().contains("deadline of 1 s"),
        "{job}"
    );
    assert_eq!(
        s.metric("pipefuse_requests_total{outcome=\"timed_out\"}"),
        2.0
    );
}

#[test]
fn one_user_cannot_fill_the_queue() {
    let s = Served::start(
        "per-user",
        &["--max-queue", "4", "--max-queue-per-user", "1"],
    );
    s.running_job(r#"{"prompt": "9", "steps": 1000, "user": "a"}"#);
    assert_eq!(
        s.post("/v1/jobs", r#"{"prompt": "1", "user": "a"}"#).status,
        202
    );
    let second = s.post("/v1/jobs", r#"{"prompt": "1", "user": "a"}"#);
    assert_eq!(second.status, 429, "{}", second.body);
    assert!(
        second.body.contains("`a` already has 1 requests waiting"),
        "{}",
        second.body
    );
    assert_eq!(
        s.post("/v1/jobs", r#"{"prompt": "1", "user": "b"}"#).status,
        202
    );
    assert_eq!(s.metric("pipefuse_queue_depth"), 2.0);
}
