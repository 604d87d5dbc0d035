//! The web page of `pipefuse serve` (issue 14) in a real headless browser: Debian's Chromium
//! driven through ChromeDriver's WebDriver protocol (tools/test.sh installs both). The test
//! types a class and a step count into the form, clicks Generate, and checks that the page showed
//! the request's progress from the SSE stream and then the image (a decoded 16 x 16 PNG), and
//! that it lists it among the recent results. Speed-independent: it waits for states, never for
//! times, and counts the progress events the page received instead of sampling the bar.

use std::process::{Child, Command, Stdio};
use std::time::Instant;

use serde_json::{json, Value};

mod http_common;

use http_common::{Served, HANG};

struct Driver {
    child: Child,
    base: String,
    agent: ureq::Agent,
    session: String,
    profile: std::path::PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Driver {
    fn start() -> Driver {
        for tool in ["chromium", "chromedriver"] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .unwrap();
            assert!(
                found.status.success(),
                "`{tool}` is not installed: tools/test.sh (the README's test command) installs \
                 Debian's chromium and chromium-driver through tools/install_browser.sh"
            );
        }
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let agent = http_common::agent();
        let t0 = Instant::now();
        while agent.get(format!("{base}/status")).call().is_err() {
            assert!(t0.elapsed() < HANG, "chromedriver never answered");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let profile =
            std::env::temp_dir().join(format!("pipefuse-chromium-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        let mut d = Driver {
            child,
            base,
            agent,
            session: String::new(),
            profile,
        };
        let caps = json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                     "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync",
                     format!("--user-data-dir={}", d.profile.display())],
        }}}});
        let v = d.call("POST", "/session", Some(caps));
        d.session = v["sessionId"].as_str().expect("a session").to_string();
        d
    }

    /// One WebDriver command; its `value`.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.base);
        let r = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            ("DELETE", _) => self.agent.delete(&url).call(),
            (_, b) => self
                .agent
                .post(&url)
                .header("content-type", "application/json")
                .send(b.unwrap_or(json!({})).to_string()),
        };
        let a = http_common::answer(r);
        let v = a.json();
        assert_eq!(a.status, 200, "{method} {path}: {}", a.body);
        v["value"].clone()
    }

    fn session(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    fn element(&self, css: &str) -> String {
        let v = self.session(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        v.as_object()
            .unwrap()
            .values()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_string()
    }

    fn type_into(&self, css: &str, text: &str) {
        let e = self.element(css);
        self.session("POST", &format!("/element/{e}/clear"), None);
        self.session(
            "POST",
            &format!("/element/{e}/value"),
            Some(json!({"text": text})),
        );
    }

    fn script(&self, js: &str) -> Value {
        self.session(
            "POST",
            "/execute/sync",
            Some(json!({"script": js, "args": []})),
        )
    }

    /// Waits until `js` returns true.
    fn wait_for(&self, what: &str, js: &str) {
        let t0 = Instant::now();
        while self.script(js) != json!(true) {
            assert!(
                t0.elapsed() < HANG,
                "the page never showed {what}: {}",
                self.page_text()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    fn page_text(&self) -> String {
        self.script("return document.body.innerText").to_string()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self
                .agent
                .delete(format!("{}/session/{}", self.base, self.session))
                .call();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

#[test]
fn the_page_submits_a_request_shows_its_progress_then_the_image() {
    let s = Served::start("browser", &[]);
    let d = Driver::start();
    d.session("POST", "/url", Some(json!({"url": format!("{}/", s.base)})));
    d.wait_for(
        "the model's name",
        "return document.getElementById('model').textContent.includes('digits-dit')",
    );
    let labels = d.script("return document.querySelectorAll('#labels option').length");
    assert_eq!(labels, json!(10));
    d.type_into("#prompt", "3");
    d.type_into("#steps", "200");
    d.type_into("#seed", "5");
    let go = d.element("#go");
    d.session("POST", &format!("/element/{go}/click"), None);
    d.wait_for("the image", "return document.querySelectorAll('#result img').length === 1 && document.querySelector('#result img').complete");
    let shown = d.script(
        "const img = document.querySelector('#result img'); const bar = document.getElementById('progress');
         return {w: img.naturalWidth, h: img.naturalHeight, alt: img.alt, max: bar.max, value: bar.value,
                 updates: Number(bar.dataset.updates || 0), status: document.getElementById('status').textContent,
                 error: document.getElementById('error').textContent,
                 recent: document.querySelectorAll('#history img').length}",
    );
    assert_eq!(
        (shown["w"].as_u64(), shown["h"].as_u64()),
        (Some(16), Some(16)),
        "{shown}"
    );
    assert_eq!(shown["alt"], "3");
    assert_eq!(
        (shown["max"].as_f64(), shown["value"].as_f64()),
        (Some(200.0), Some(200.0)),
        "{shown}"
    );
    assert!(
        shown["updates"].as_u64().unwrap() >= 2,
        "progress was shown step by step: {shown}"
    );
    assert!(
        shown["status"].as_str().unwrap().contains("done in"),
        "{shown}"
    );
    assert_eq!(shown["error"], "");
    assert_eq!(shown["recent"], 1);
    // A screenshot for the record, next to the test's server log.
    let png = d.session("GET", "/screenshot", None);
    let bytes = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        png.as_str().unwrap(),
    )
    .unwrap();
    std::fs::write(std::env::temp_dir().join("pipefuse-web-page.png"), bytes).unwrap();
    // A bad class shows the server's reason instead of an image.
    d.type_into("#prompt", "eleven");
    d.session("POST", &format!("/element/{go}/click"), None);
    d.wait_for(
        "the error",
        "return document.getElementById('error').textContent.includes('not a class')",
    );
    assert_eq!(
        s.metric("pipefuse_requests_total{outcome=\"succeeded\"}"),
        1.0
    );
}
