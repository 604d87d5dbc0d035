//! A `pipefuse serve` process for the HTTP tests: started on a free loopback port (the port is
//! read from its first line), its stderr kept in a log, killed when dropped; and a real HTTP
//! client (ureq) that returns every status instead of failing on 4xx / 5xx.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::time::{Duration, Instant};

/// A hang guard, not a speed expectation: every wait below ends long before on any machine.
pub const HANG: Duration = Duration::from_secs(120);

pub struct Served {
    pub dir: PathBuf,
    pub child: Child,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    pub agent: ureq::Agent,
}

/// An HTTP answer: status, headers we look at, body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<String>,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(HANG))
        .build()
        .into()
}

impl Served {
    /// `pipefuse serve --listen 127.0.0.1:0 <flags>` (the bundled demo unless flags say
    /// otherwise), once it listens.
    pub fn start(tag: &str, flags: &[&str]) -> Served {
        let dir =
            std::env::temp_dir().join(format!("pipefuse-served-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log = std::fs::File::create(dir.join("server.log")).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_pipefuse"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(flags)
            .env_remove("PIPEFUSE_API_KEY")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The first line names the address; the rest of stderr goes to the log file.
        let (base, _, mut err) = read_address(&mut child);
        std::thread::spawn(move || {
            let mut log = log;
            let _ = std::io::copy(&mut err, &mut log);
        });
        Served {
            dir,
            child,
            base,
            agent: agent(),
        }
    }

    /// Queues a job from `body` (202) and waits until the cluster runs it; its id.
    pub fn running_job(&self, body: &str) -> String {
        let a = self.post("/v1/jobs", body);
        assert_eq!(a.status, 202, "{}", a.body);
        let id = a.json()["id"].as_str().unwrap().to_string();
        self.wait_until("the job runs", |s| {
            s.get(&format!("/v1/jobs/{id}")).json()["status"] == "running"
        });
        id
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    pub fn get(&self, path: &str) -> Answer {
        let r = self.agent.get(format!("{}{path}", self.base)).call();
        answer(r)
    }

    pub fn delete(&self, path: &str) -> Answer {
        answer(self.agent.delete(format!("{}{path}", self.base)).call())
    }

    pub fn post(&self, path: &str, body: &str) -> Answer {
        let r = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .send(body);
        answer(r)
    }

    /// The value of a metric line (`name{labels}` exactly as written) in `/metrics`.
    pub fn metric(&self, series: &str) -> f64 {
        let text = self.get("/metrics").body;
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no `{series}` in\n{text}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// Waits until `ok` holds (checked every 20 ms), failing after [`HANG`].
    pub fn wait_until(&self, what: &str, mut ok: impl FnMut(&Served) -> bool) {
        let t0 = Instant::now();
        while !ok(self) {
            assert!(t0.elapsed() < HANG, "never: {what}\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(t0.elapsed() < HANG, "the server did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Reads `child`'s stderr until the line naming its HTTP address (`pipefuse serve`, `launch
/// --serve --listen`): the address (`http://...`), what was read, and the rest of stderr.
pub fn read_address(child: &mut Child) -> (String, String, BufReader<ChildStderr>) {
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let (mut line, mut seen) = (String::new(), String::new());
    let t0 = Instant::now();
    loop {
        line.clear();
        if err.read_line(&mut line).unwrap() == 0 {
            let _ = child.wait();
            panic!("exited before listening:\n{seen}");
        }
        seen.push_str(&line);
        if let Some(at) = line.find("http://") {
            let addr = line[at..].split_whitespace().next().unwrap();
            return (addr.trim_end_matches('/').to_string(), seen, err);
        }
        assert!(t0.elapsed() < HANG, "never listened:\n{seen}");
    }
}

/// Runs `pipefuse generate <args> --png-scale 1 --out <dir>/grid.png` and returns the grid: one
/// tile per image, each followed by a one-pixel gap.
pub fn generate_grid(dir: &std::path::Path, args: &[&str]) -> image::RgbImage {
    let out = dir.join("grid.png");
    let o = Command::new(env!("CARGO_BIN_EXE_pipefuse"))
        .arg("generate")
        .args(args)
        .args(["--png-scale", "1", "--out", out.to_str().unwrap()])
        .env_remove("PIPEFUSE_API_KEY")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    image::open(&out).unwrap().to_rgb8()
}

/// Requires `img` to equal tile `i` of a [`generate_grid`] grid, pixel for pixel.
pub fn assert_is_tile(img: &image::DynamicImage, grid: &image::RgbImage, i: u32) {
    let img = img.to_rgb8();
    let w = img.width();
    for (x, y, p) in img.enumerate_pixels() {
        assert_eq!(
            p,
            grid.get_pixel(i * (w + 1) + x, y),
            "image {i} pixel ({x}, {y})"
        );
    }
}

pub fn answer(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Answer {
    let mut r = r.unwrap_or_else(|e| panic!("HTTP request failed: {e}"));
    let retry_after = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    Answer {
        status: r.status().as_u16(),
        retry_after,
        body: r.body_mut().read_to_string().unwrap(),
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
