//! The `--serve` socket against hostile and careless clients (issue 16 group 4): a silent client
//! blocks nobody and is timed out, a request line is bounded and must be UTF-8 JSON (each refusal
//! answered with `exit: 1 <reason>`), a half-closed client always gets its request run in full,
//! a client that closes always cancels its request (the server says so), connections beyond the
//! bound are told to come back, and SIGTERM cancels open requests with a reason to their clients.
//! No assertion depends on the machine's speed: waits have generous hang guards only.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::bin;

/// A hang guard, not a speed expectation: every wait below ends long before on any machine.
const HANG: Duration = Duration::from_secs(120);

/// `launch --serve` of a one-node topology running the bundled demo (two stages), its stderr in
/// `server.log`.
struct Server {
    dir: PathBuf,
    socket: PathBuf,
    child: Child,
}

impl Server {
    fn start(tag: &str) -> Server {
        let dir = common::scratch_dir(&format!("serve-{tag}"));
        let text = common::example_topology_with_demo(
            "local_2cpu.toml",
            "../../model/tests/fixtures/dit_tiny_pipeline",
        );
        let topo = dir.join("one.toml");
        std::fs::write(&topo, text).unwrap();
        let socket = dir.join("s.sock");
        let log = std::fs::File::create(dir.join("server.log")).unwrap();
        let child = Command::new(bin())
            .args(["launch", "--serve", "--topology", topo.to_str().unwrap()])
            .args(["--socket", socket.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut s = Server { dir, socket, child };
        let t0 = Instant::now();
        while !s.socket.exists() {
            assert!(t0.elapsed() < HANG, "the server never listened");
            if let Some(status) = s.child.try_wait().unwrap() {
                panic!("the server exited early ({status}): {}", s.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    fn connect(&self) -> UnixStream {
        let c = UnixStream::connect(&self.socket).unwrap();
        c.set_read_timeout(Some(HANG)).unwrap();
        c
    }

    /// Waits until the server's log contains `needle`.
    fn wait_for_log(&self, needle: &str) {
        let t0 = Instant::now();
        while !self.log().contains(needle) {
            assert!(
                t0.elapsed() < HANG,
                "never logged `{needle}`:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then the exit status.
    fn terminate(&mut self) -> std::process::ExitStatus {
        common::terminate(&mut self.child, HANG)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn request(args: &[&str]) -> Vec<u8> {
    format!("{}\n", serde_json::json!({ "args": args })).into_bytes()
}

/// Every line the server sends until it closes; the last must be the `exit:` line. A refusal
/// closes with the client's request unread, so the read after it may end in ECONNRESET, not EOF.
fn reply(c: UnixStream) -> Vec<String> {
    let lines: Vec<String> = BufReader::new(c).lines().map_while(Result::ok).collect();
    assert!(
        lines.last().is_some_and(|l| l.starts_with("exit: ")),
        "no exit line: {lines:?}"
    );
    lines
}

fn exit_line(c: UnixStream) -> String {
    reply(c).pop().unwrap()
}

/// Reads the first line of `c` that contains `needle`.
fn read_until_line(c: &UnixStream, needle: &str) {
    let mut lines = BufReader::new(c).lines();
    let found = lines.any(|l| l.is_ok_and(|l| l.contains(needle)));
    assert!(found, "the connection ended before a line with `{needle}`");
}

#[test]
fn hostile_clients_get_clear_refusals_and_block_nobody() {
    let server = Server::start("hostile");
    // A client that connects and says nothing: the others are served meanwhile.
    let silent = server.connect();

    let mut c = server.connect();
    c.write_all(&request(&["--class-label", "3", "--steps", "2"]))
        .unwrap();
    let lines = reply(c);
    assert_eq!(lines.last().unwrap(), "exit: 0", "{lines:?}");
    assert!(lines.iter().any(|l| l == "step 2/2"), "{lines:?}");

    let mut c = server.connect();
    c.write_all(b"{\"args\": [\"--class-label\", \"\xff\xfe\"]}\n")
        .unwrap();
    assert_eq!(
        exit_line(c),
        "exit: 1 the request line is not UTF-8 (invalid byte at offset 28)"
    );

    let mut c = server.connect();
    c.write_all(b"--class-label 3\n").unwrap();
    let e = exit_line(c);
    assert!(
        e.starts_with("exit: 1 the request is not a JSON line"),
        "{e}"
    );

    // 2 MiB without a newline: refused after 1 MiB, not buffered whole.
    let mut c = server.connect();
    let writer = {
        let mut w = c.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = w.write_all(&vec![b'x'; 2 << 20]); // the server stops reading: EPIPE is fine
        })
    };
    // The server closes with the rest unread, so the read after the reply may end in
    // ECONNRESET instead of EOF: the reply itself is what counts.
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = c.read(&mut buf) {
        text.extend_from_slice(&buf[..n]);
    }
    assert_eq!(
        String::from_utf8_lossy(&text),
        "exit: 1 the request line is longer than 1 MiB\n"
    );
    writer.join().unwrap();

    // The silent client is timed out with a reason.
    let e = exit_line(silent);
    assert_eq!(e, "exit: 1 no request line within 10 s of connecting");
    let log = server.log();
    assert!(
        log.contains("request refused: the request line is not UTF-8"),
        "{log}"
    );
    assert!(
        log.contains("request refused: no request line within 10 s"),
        "{log}"
    );
}

/// Half-close keeps the request (every try: it was cancelled in 4 of 6 before); closing cancels
/// it (every try), and the server's log says which happened.
#[test]
fn half_close_keeps_the_request_and_close_cancels_it() {
    let mut server = Server::start("cancel");
    for _ in 0..4 {
        let mut c = server.connect();
        c.write_all(&request(&["--class-label", "5", "--steps", "6"]))
            .unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let lines = reply(c);
        assert_eq!(lines.last().unwrap(), "exit: 0", "{lines:?}");
        assert!(lines.iter().any(|l| l == "step 6/6"), "{lines:?}");
    }
    assert!(!server.log().contains("cancelled"), "{}", server.log());

    // Requests 5 and 6 run for 1000 steps (seconds; the client reads one line) unless cancelled; each client closes after its
    // first step.
    for id in [5, 6] {
        let mut c = server.connect();
        c.write_all(&request(&["--class-label", "1", "--steps", "1000"]))
            .unwrap();
        read_until_line(&c, "step 1/");
        drop(c);
        // Closed (a hang-up seen) or stopped reading (a write failed): whichever the server
        // noticed first, it cancels.
        server.wait_for_log(&format!("request {id} cancelled: the client "));
    }
    // The cluster is free again: the next request runs to its end.
    let mut c = server.connect();
    c.write_all(&request(&["--class-label", "2", "--steps", "2"]))
        .unwrap();
    assert_eq!(exit_line(c), "exit: 0");

    // SIGTERM while a request runs and another client has sent nothing yet: both are told, and
    // the server exits cleanly.
    // (The silent client connects first: connections are accepted in order, so once the other
    // one reports a step, the silent one is being served.)
    let silent = server.connect();
    let mut c = server.connect();
    c.write_all(&request(&["--class-label", "1", "--steps", "1000"]))
        .unwrap();
    read_until_line(&c, "step 1/");
    let status = server.terminate();
    let e = exit_line(c);
    assert!(
        e.starts_with("exit: 1 ") && e.contains("the server is stopping"),
        "{e}"
    );
    assert_eq!(exit_line(silent), "exit: 1 the server is stopping");
    assert!(status.success(), "{status}: {}", server.log());
    assert!(!server.socket.exists(), "the socket is removed");
}

/// Connections beyond the bound are answered at once instead of piling up.
#[test]
fn connections_beyond_the_bound_are_told_to_come_back() {
    let server = Server::start("bound");
    let held: Vec<UnixStream> = (0..64).map(|_| server.connect()).collect();
    // The server accepts connections in order: once the 64th is in, the 65th is refused.
    let e = exit_line(server.connect());
    assert_eq!(
        e,
        "exit: 1 the server has 64 connections open; try again when one ends"
    );
    drop(held); // closed without a request: nothing to cancel
                // Served again once the server has seen those closes.
    let t0 = Instant::now();
    loop {
        let mut c = server.connect();
        let _ = c.write_all(&request(&["--class-label", "4", "--steps", "2"]));
        let e = exit_line(c);
        if e != "exit: 0" {
            assert!(e.contains("connections open"), "{e}");
            assert!(
                t0.elapsed() < HANG,
                "closed connections were never released"
            );
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        break;
    }
    assert!(Path::new(&server.socket).exists());
}
