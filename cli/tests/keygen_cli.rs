//! `pipefuse keygen` writes the cluster CA and node certificates where the topology points,
//! keeps keys private, never overwrites silently; `pipefuse bench transport` reports its ratio.

mod common;

use common::{pipefuse, root};

#[test]
fn keygen_writes_what_the_topology_names_and_refuses_to_overwrite() {
    let dir = std::env::temp_dir().join(format!("pipefuse-keygen-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let topo = dir.join("three.toml");
    let src = root().join("examples/topologies/three-nodes-local.toml");
    std::fs::copy(src, &topo).unwrap();
    let o = pipefuse(&["keygen", "--topology", topo.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in ["ca.pem", "ca.key", "n0.pem", "n0.key", "n1.pem", "n2.key"] {
        let p = dir.join("certs").join(f);
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(text.contains("-----BEGIN"), "{f} is not PEM");
        #[cfg(unix)]
        if f.ends_with(".key") {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f} must be private");
        }
    }
    let before = std::fs::read(dir.join("certs/n1.pem")).unwrap();
    let o = pipefuse(&["keygen", "--topology", topo.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    assert_eq!(
        std::fs::read(dir.join("certs/n1.pem")).unwrap(),
        before,
        "nothing overwritten"
    );
    let o = pipefuse(&["keygen", "--topology", topo.to_str().unwrap(), "--force"]);
    assert!(o.status.success());
    assert_ne!(
        std::fs::read(dir.join("certs/n1.pem")).unwrap(),
        before,
        "--force makes new keys"
    );

    let local = root().join("examples/topologies/local_2cpu.toml");
    let o = pipefuse(&["keygen", "--topology", local.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("tls.ca"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Two nodes naming one certificate file: refused naming both fields, nothing written (keygen
/// would otherwise write one node's set and then stop at the other, asking for --force).
#[test]
fn keygen_refuses_a_shared_certificate_path_before_writing() {
    let dir = common::scratch_dir("keygen-shared");
    let topo = dir.join("three.toml");
    let text = std::fs::read_to_string(root().join("examples/topologies/three-nodes-local.toml"))
        .unwrap()
        .replace("certs/n2.pem", "certs/n1.pem");
    std::fs::write(&topo, text).unwrap();
    let o = pipefuse(&["keygen", "--topology", topo.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("nodes[2].cert") && err.contains("also nodes[1].cert"),
        "{err}"
    );
    assert!(!dir.join("certs").exists(), "nothing may be written");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_transport_ends_with_the_ratio_line() {
    let o = pipefuse(&["bench", "transport", "--sizes-mib", "1", "--count", "3"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    let last = out.lines().last().unwrap();
    let r: f64 = last
        .strip_prefix("quic_vs_tcp=")
        .expect(last)
        .parse()
        .unwrap();
    assert!(r > 0.0 && r.is_finite());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("cpu: "), "the benchmark names the CPU: {err}");
}
