//! Faults of the link between two nodes in their own network namespaces (issue 15's fault
//! matrix): a link that drops packets (QUIC retransmits: the result is unchanged) and a link cut
//! mid-request (the far node is lost; the request resumes on the coordinator's node alone; when
//! the link comes back the node is dialled again and rejoins).

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{bin, in_process_demo, latent_bytes as latent};
use crate::{prerequisites, slow_link, topology};

/// The set-up both tests share: the namespaces and link, the topology, n1 started, n0 serving on
/// a socket (with `fault` in its environment).
struct Served {
    ns: crate::Namespaces,
    link: crate::relay::DelayLink,
    dir: std::path::PathBuf,
    socket: std::path::PathBuf,
    n0: Child,
    n1: Child,
}

fn serve(tag: &str, fault: &str) -> Option<Served> {
    if let Err(why) = prerequisites() {
        if std::env::var_os("PIPEFUSE_SKIP_NETNS").is_some() {
            eprintln!("NOT RUN (PIPEFUSE_SKIP_NETNS set): {why}");
            return None;
        }
        panic!("this test {why}; set PIPEFUSE_SKIP_NETNS=1 to opt out explicitly");
    }
    let tag = format!("{tag}{}", std::process::id() % 10_000);
    let dir = std::env::temp_dir().join(format!("pipefuse-netns-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let topo = topology(&dir);
    let (ns, link) = slow_link(&tag).unwrap_or_else(|e| panic!("setting up the link: {e}"));
    let node = |i: usize, args: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec", &ns.names[i], bin(), "launch", "--topology"])
            .arg(&topo)
            .args([
                "--node",
                &format!("n{i}"),
                "--join-timeout",
                "30",
                "--node-timeout",
                "1",
            ])
            .args(args)
            .env("PIPEFUSE_FAULT", fault)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("n{i}.log"))).unwrap())
            .spawn()
            .unwrap()
    };
    let n1 = node(1, &[]);
    let socket = dir.join("s.sock");
    let mut n0 = node(0, &["--serve", "--socket", socket.to_str().unwrap()]);
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
    Some(Served {
        ns,
        link,
        dir,
        socket,
        n0,
        n1,
    })
}

impl Served {
    fn attach(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin())
            .args(["generate", "--attach", self.socket.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap()
    }

    fn stop(mut self) {
        let status = crate::common::terminate(&mut self.n0, Duration::from_secs(30));
        assert!(status.success(), "{status}");
        let t0 = Instant::now();
        while self.n1.try_wait().unwrap().is_none() {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "n1 was left running"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        drop(self.link);
        drop(self.ns);
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

/// 10% of the packets in each direction are lost: QUIC resends them; the request's latent is
/// the in-process run's, bitwise.
#[test]
fn a_link_that_drops_packets_changes_nothing_in_the_result() {
    let Some(s) = serve("drop", "") else { return };
    s.link.set_drop(100);
    let out = s.dir.join("lossy.safetensors");
    let request = ["--class-label", "2", "--class-label", "9", "--steps", "6"];
    let o = s.attach(&[&request[..], &["--save-latent", out.to_str().unwrap()]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let local = s.dir.join("local.safetensors");
    in_process_demo(2, 4, &request.map(String::from), &local);
    assert_eq!(latent(&out), latent(&local));
    s.link.set_drop(0);
    s.stop();
}

/// The link is cut while a request runs: n1 is lost after the idle timeout and the request ends
/// on n0 alone; the link comes back, n0 dials n1 again, and the next request runs on both.
#[test]
fn a_cut_link_loses_the_node_and_a_mended_one_brings_it_back() {
    // n0's device a straggler: the request is still running when the link is cut.
    let Some(s) = serve("cut", "straggler:0:20") else {
        return;
    };
    let mut client = Command::new(bin())
        .args(["generate", "--attach", s.socket.to_str().unwrap()])
        .args(["--class-label", "5", "--steps", "120"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = String::new();
    let mut cut = false;
    for line in std::io::BufReader::new(client.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
    {
        if !cut && line.contains("step 10/") {
            s.link.set_drop(1000);
            cut = true;
        }
        seen += &line;
        seen.push('\n');
    }
    assert!(
        client.wait().unwrap().success(),
        "finished on n0 alone: {seen}"
    );
    assert!(cut && seen.contains("node n1 was lost"), "{seen}");
    assert!(seen.contains("on 1 stage(s)"), "{seen}");
    s.link.set_drop(0);
    let t0 = Instant::now();
    loop {
        let o = s.attach(&["--class-label", "1", "--steps", "2"]);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{err}");
        if err.contains("device 1: busy") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "n1 never came back: {err}\n{}",
            log(&s.dir, "n1")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    s.stop();
}

fn log(dir: &Path, node: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{node}.log"))).unwrap_or_default()
}
