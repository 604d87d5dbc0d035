//! `pipefuse serve` (issue 14) through a real HTTP client: OpenAI's images API gives the same
//! image as `pipefuse generate`, bad fields get 400s naming them, the jobs API streams progress
//! and cancels, a client that disconnects cancels its request, the API key guards everything
//! but the health checks, and SIGTERM drains then cancels. No assertion depends on the
//! machine's speed: waits have hang guards only.

use std::io::{BufRead, BufReader, Write};
use std::time::Duration;

use base64::Engine as _;

mod common;
mod http_common;

use http_common::{Served, HANG};

fn b64_png(b64: &str) -> image::DynamicImage {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    image::load_from_memory(&bytes).unwrap()
}

#[test]
fn the_images_api_draws_what_generate_draws() {
    let s = Served::start("same", &[]);
    let models = s.get("/v1/models").json();
    assert_eq!(models["data"][0]["id"], "digits-dit");
    assert_eq!(models["data"][0]["labels"][7], "7");
    let a = s.post(
        "/v1/images/generations",
        r#"{"prompt": "7", "n": 2, "seed": 11, "steps": 6, "model": "digits-dit"}"#,
    );
    assert_eq!(a.status, 200, "{}", a.body);
    let data = a.json()["data"].as_array().unwrap().clone();
    assert_eq!(data.len(), 2);
    // The same request from the command line.
    let dir = common::scratch_dir("http-same");
    let args = [
        "--class-label",
        "7",
        "--class-label",
        "7",
        "--seed",
        "11",
        "--steps",
        "6",
    ];
    let grid = http_common::generate_grid(&dir, &args);
    for (i, d) in data.iter().enumerate() {
        let img = b64_png(d["b64_json"].as_str().unwrap());
        assert_eq!((img.width(), img.height()), (16, 16));
        http_common::assert_is_tile(&img, &grid, i as u32);
    }
    // Comma-separated labels: one image each, in order; the size field is honoured.
    let a = s.post(
        "/v1/images/generations",
        r#"{"prompt": "1, 2, 3", "size": "32x16", "steps": 2}"#,
    );
    assert_eq!(a.status, 200, "{}", a.body);
    let data = a.json()["data"].as_array().unwrap().clone();
    assert_eq!(data.len(), 3);
    assert_eq!(b64_png(data[0]["b64_json"].as_str().unwrap()).width(), 32);
    assert_eq!(
        s.metric("pipefuse_requests_total{outcome=\"succeeded\"}"),
        2.0
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_requests_get_400s_naming_the_field() {
    let s = Served::start("bad", &[]);
    for (body, field) in [
        (r#"{"prompt": "12"}"#, "prompt"),
        (r#"{"prompt": "7", "size": "17x16"}"#, "size"),
        (r#"{"prompt": "7", "n": 0}"#, "n"),
        (r#"{"prompt": "1,2,3,4,5,6", "n": 2}"#, "n"),
        (r#"{"prompt": "7", "model": "dall-e-3"}"#, "model"),
        (r#"{"prompt": "7", "steps": "many"}"#, "steps"),
        (
            r#"{"prompt": "7", "prompt_embeds": "AAAA"}"#,
            "prompt_embeds",
        ),
        (
            r#"{"prompt": "7", "response_format": "url"}"#,
            "response_format",
        ),
    ] {
        let a = s.post("/v1/images/generations", body);
        assert_eq!(a.status, 400, "{body}: {}", a.body);
        let e = a.json();
        assert_eq!(e["error"]["param"], field, "{body}: {}", a.body);
        assert!(e["error"]["message"].as_str().unwrap().contains(field));
    }
    assert_eq!(s.post("/v1/images/generations", "{").status, 400);
    assert_eq!(s.get("/v1/jobs/job-99").status, 404);
    assert_eq!(s.get("/v1/jobs/nonsense").status, 404);
    // Beyond the body limit: 413 as soon as the headers say so, nothing more read.
    let mut c = std::net::TcpStream::connect(s.base.trim_start_matches("http://")).unwrap();
    c.set_read_timeout(Some(HANG)).unwrap();
    write!(
        c,
        "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{{",
        65u64 << 20
    )
    .unwrap();
    let mut status = String::new();
    BufReader::new(&c).read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 413"), "{status}");
    assert_eq!(
        s.metric("pipefuse_requests_total{outcome=\"invalid\"}"),
        9.0
    );
    assert_eq!(
        s.metric("pipefuse_requests_total{outcome=\"succeeded\"}"),
        0.0
    );
}

/// Every SSE event of a job until the stream ends: (event name, data).
fn events(s: &Served, id: &str) -> Vec<(String, serde_json::Value)> {
    let mut r = s
        .agent
        .get(format!("{}/v1/jobs/{id}/events", s.base))
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let lines = BufReader::new(r.body_mut().as_reader()).lines();
    let (mut out, mut name) = (Vec::new(), String::new());
    for l in lines {
        let l = l.unwrap();
        if let Some(n) = l.strip_prefix("event: ") {
            name = n.to_string();
        } else if let Some(d) = l.strip_prefix("data: ") {
            out.push((name.clone(), serde_json::from_str(d).unwrap()));
        }
    }
    out
}

#[test]
fn jobs_stream_their_progress_and_can_be_cancelled() {
    let s = Served::start("jobs", &[]);
    let a = s.post("/v1/jobs", r#"{"prompt": "4", "steps": 8, "seed": 3}"#);
    assert_eq!(a.status, 202, "{}", a.body);
    let id = a.json()["id"].as_str().unwrap().to_string();
    let ev = events(&s, &id);
    let (last, rest) = ev.split_last().unwrap();
    assert_eq!(last.0, "succeeded", "{ev:?}");
    let steps: Vec<u64> = rest
        .iter()
        .filter(|e| e.0 == "running")
        .map(|e| e.1["step"].as_u64().unwrap())
        .collect();
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
    assert!(
        rest.iter().all(|e| e.0 == "queued" || e.0 == "running"),
        "{ev:?}"
    );
    let job = s.get(&format!("/v1/jobs/{id}")).json();
    assert_eq!(job["status"], "succeeded");
    b64_png(job["data"][0]["b64_json"].as_str().unwrap());

    // A long job, cancelled while it runs; a queued one behind it, cancelled while it waits.
    let long = s.running_job(r#"{"prompt": "5", "steps": 1000}"#);
    let queued = s
        .post("/v1/jobs", r#"{"prompt": "6", "steps": 1000}"#)
        .json();
    let (long, queued) = (long.as_str(), queued["id"].as_str().unwrap());
    let q = s.get(&format!("/v1/jobs/{queued}")).json();
    assert_eq!(
        (q["status"].as_str(), q["queue_position"].as_u64()),
        (Some("queued"), Some(1))
    );
    for id in [queued, long] {
        let d = s.delete(&format!("/v1/jobs/{id}"));
        assert_eq!(d.status, 200, "{}", d.body);
        assert_eq!(d.json()["status"], "cancelled");
        assert_eq!(s.delete(&format!("/v1/jobs/{id}")).status, 409);
    }
    assert_eq!(events(&s, long).last().unwrap().0, "cancelled");
    assert_eq!(
        s.metric("pipefuse_requests_total{outcome=\"cancelled\"}"),
        2.0
    );
    let list = s.get("/v1/jobs").json();
    assert_eq!(list["data"].as_array().unwrap().len(), 3);
}

#[test]
fn a_client_that_disconnects_cancels_its_request() {
    let s = Served::start("hangup", &[]);
    let addr = s.base.trim_start_matches("http://");
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    let body = r#"{"prompt": "3", "steps": 1000}"#;
    write!(
        c,
        "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s.wait_until("the request runs", |s| {
        s.metric("pipefuse_requests_running") == 1.0
    });
    drop(c);
    s.wait_until("the request is cancelled", |s| {
        s.metric("pipefuse_requests_total{outcome=\"cancelled\"}") == 1.0
    });
    assert_eq!(s.metric("pipefuse_requests_running"), 0.0);
    assert!(
        s.log().is_empty() || !s.log().contains("panicked"),
        "{}",
        s.log()
    );
}

#[test]
fn the_api_key_guards_the_api_but_not_the_health_checks() {
    // Beyond loopback without a key: refused before anything starts.
    let o = common::pipefuse(&["serve", "--listen", "0.0.0.0:0"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--api-key"));
    let s = Served::start("key", &["--api-key", "sesame"]);
    assert_eq!(s.get("/healthz").status, 200);
    assert_eq!(s.get("/readyz").status, 200);
    assert_eq!(s.get("/").status, 200);
    for path in ["/v1/models", "/metrics", "/v1/jobs"] {
        assert_eq!(s.get(path).status, 401, "{path}");
    }
    let with = |key: &str| {
        http_common::answer(
            s.agent
                .get(format!("{}/v1/models", s.base))
                .header("authorization", format!("Bearer {key}"))
                .call(),
        )
        .status
    };
    assert_eq!(with("sesame"), 200);
    assert_eq!(with("sesam"), 401);
}

#[test]
fn sigterm_lets_admitted_requests_finish_then_cancels_the_rest() {
    let mut s = Served::start("drain", &["--drain-timeout", "1"]);
    let long = s.running_job(r#"{"prompt": "8", "steps": 1000}"#);
    // The progress stream stays open across the stop and ends with the cancellation.
    let base = s.base.clone();
    let watcher = std::thread::spawn(move || {
        let mut r = http_common::agent()
            .get(format!("{base}/v1/jobs/{long}/events"))
            .call()
            .unwrap();
        let text = r.body_mut().read_to_string().unwrap();
        text.lines()
            .rev()
            .find(|l| l.starts_with("data: "))
            .unwrap()
            .to_string()
    });
    std::thread::sleep(Duration::from_millis(200));
    let status = s.terminate();
    assert!(status.success(), "{status}: {}", s.log());
    let last = watcher.join().unwrap();
    assert!(
        last.contains("cancelled") && last.contains("the server is stopping"),
        "{last}"
    );
    let log = s.log();
    assert!(log.contains("stopping: no new requests"), "{log}");
    assert!(
        log.contains("stopped serving") && !log.contains("still in use"),
        "{log}"
    );
    let _ = HANG;
}

/// A text-conditioned model (SD3 with a VAE) takes its prompt as base64 safetensors embeddings
/// and draws what `generate --prompt-embeds` draws; without them it answers 400 saying so.
#[test]
fn a_text_model_takes_prompt_embeddings_and_draws_what_generate_draws() {
    let f = common::fixtures();
    let dir = common::scratch_dir("http-sd3");
    for part in ["transformer", "scheduler"] {
        common::copy_dir(&f.join("sd3_pipeline").join(part), &dir.join(part));
    }
    common::copy_dir(&f.join("vae_tiny"), &dir.join("vae"));
    std::fs::copy(
        f.join("sd3_pipeline/model_index.json"),
        dir.join("model_index.json"),
    )
    .unwrap();
    let model = dir.to_str().unwrap();
    let prompt = f.join("sd3_prompt.safetensors");
    let s = Served::start("sd3", &["--model", model]);
    let a = s.post("/v1/images/generations", r#"{"prompt": "a cat"}"#);
    assert_eq!(a.status, 400, "{}", a.body);
    assert_eq!(a.json()["error"]["param"], "prompt_embeds");
    let b64 = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&prompt).unwrap());
    let body = |extra: &str| {
        format!(
            r#"{{"prompt": "a cat", "prompt_embeds": "{b64}", "seed": 4, "steps": 2, "guidance_scale": 5{extra}}}"#
        )
    };
    let a = s.post("/v1/images/generations", &body(r#", "n": 2"#));
    assert_eq!(
        (a.status, a.json()["error"]["param"].as_str()),
        (400, Some("n"))
    );
    let a = s.post("/v1/images/generations", &body(""));
    assert_eq!(a.status, 200, "{}", a.body);
    let data = a.json()["data"].as_array().unwrap().clone();
    let grid = http_common::generate_grid(
        &dir,
        &[
            "--model",
            model,
            "--prompt-embeds",
            prompt.to_str().unwrap(),
            "--seed",
            "4",
            "--steps",
            "2",
            "--guidance-scale",
            "5",
        ],
    );
    assert_eq!(data.len(), 2, "the file holds two prompts");
    for (i, d) in data.iter().enumerate() {
        http_common::assert_is_tile(&b64_png(d["b64_json"].as_str().unwrap()), &grid, i as u32);
    }
    drop(s);
    let _ = std::fs::remove_dir_all(dir);
}
