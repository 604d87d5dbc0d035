//! TLS paths in topology files and the topology fingerprint nodes compare when they connect.

use std::path::Path;

use topology::{ClusterSpec, NodeTls};

const THREE: &str = r#"
coordinator = "a"
[model]
preset = "DiT-S/2"
[parallel]
pipefusion_degree = 3
[tls]
ca = "certs/ca.pem"
[[nodes]]
name = "a"
address = "127.0.0.1:7000"
cert = "certs/a.pem"
key = "certs/a.key"
devices = [{ kind = "cpu" }]
[[nodes]]
name = "b"
address = "127.0.0.1:7001"
cert = "certs/b.pem"
key = "certs/b.key"
devices = [{ kind = "cpu" }]
[[nodes]]
name = "c"
address = "127.0.0.1:7002"
devices = [{ kind = "cpu" }]
"#;

#[test]
fn tls_paths_resolve_against_the_file_folder() {
    let s = ClusterSpec::parse(THREE, "t.toml", Some(Path::new("/etc/pf"))).unwrap();
    assert_eq!(s.tls_ca.as_deref(), Some(Path::new("/etc/pf/certs/ca.pem")));
    assert_eq!(
        s.nodes[1].tls,
        Some(NodeTls {
            cert: "/etc/pf/certs/b.pem".into(),
            key: "/etc/pf/certs/b.key".into()
        })
    );
    assert_eq!(s.nodes[2].tls, None);
}

#[test]
fn a_cert_without_its_key_names_the_node_and_line() {
    let text = THREE.replace("key = \"certs/b.key\"\n", "");
    let e = ClusterSpec::parse(&text, "t.toml", None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("t.toml:") && e.contains("nodes[1].key"), "{e}");
    let text = THREE.replace("[tls]\nca", "[tls]\ncert_authority");
    let e = ClusterSpec::parse(&text, "t.toml", None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("cert_authority"), "{e}");
}

#[test]
fn the_fingerprint_changes_with_the_cluster_not_with_the_file() {
    let a = ClusterSpec::parse(THREE, "one.toml", None).unwrap();
    let b = ClusterSpec::parse(
        &THREE.replace("certs/", "other/"),
        "two.toml",
        Some(Path::new("/x")),
    )
    .unwrap();
    assert_eq!(
        a.fingerprint(),
        b.fingerprint(),
        "file names and TLS paths do not count"
    );
    for (from, to) in [
        ("7001", "7005"),
        ("DiT-S/2", "DiT-B/2"),
        (
            "pipefusion_degree = 3",
            "pipefusion_degree = 3\nnum_patches = 6",
        ),
    ] {
        let c = ClusterSpec::parse(&THREE.replace(from, to), "one.toml", None).unwrap();
        assert_ne!(a.fingerprint(), c.fingerprint(), "{from} -> {to}");
    }
}

#[test]
fn the_shipped_three_node_topology_parses() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/topologies/three-nodes-local.toml");
    let s = ClusterSpec::from_file(&path).unwrap();
    assert_eq!((s.nodes.len(), s.parallel.pipefusion_degree), (3, 3));
    assert!(s.nodes.iter().all(|n| n.tls.is_some()) && s.tls_ca.is_some());
}

#[test]
fn two_nodes_sharing_a_certificate_or_key_file_are_refused() {
    let cases = [
        // b's certificate is a's.
        (
            THREE.replace("cert = \"certs/b.pem\"", "cert = \"certs/a.pem\""),
            "nodes[1].cert",
            "also nodes[0].cert",
        ),
        // b's key is its own certificate.
        (
            THREE.replace("key = \"certs/b.key\"", "key = \"certs/b.pem\""),
            "nodes[1].key",
            "also nodes[1].cert",
        ),
        // a's key is where keygen writes the CA's key.
        (
            THREE.replace("key = \"certs/a.key\"", "key = \"certs/ca.key\""),
            "nodes[0].key",
            "also tls.ca's key",
        ),
    ];
    for (text, field, why) in cases {
        let e = ClusterSpec::parse(&text, "t.toml", None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("t.toml:") && e.contains(field) && e.contains(why),
            "{field}: {e}"
        );
    }
    // Same file names in different folders are different files.
    let text = THREE.replace("\"certs/b.pem\"", "\"other/a.pem\"");
    ClusterSpec::parse(&text, "t.toml", None).unwrap();
}
