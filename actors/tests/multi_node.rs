//! Three nodes in one process joined by real QUIC with mutual TLS (loopback), with the links'
//! queues cut to one frame so back-pressure is exercised on every send: the result equals the
//! in-order reference bitwise.

mod common;

use std::time::Duration;

use actors::{ClusterOptions, GenerateRequest, Node};
use common::*;
use model::Transformer;
use topology::ClusterSpec;
use transport::QuicOptions;

fn topology(dir: &std::path::Path) -> ClusterSpec {
    // Three ports the OS reports free (held together, so distinct).
    let socks: Vec<std::net::UdpSocket> = (0..3)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    let ports: Vec<u16> = socks
        .iter()
        .map(|s| s.local_addr().unwrap().port())
        .collect();
    drop(socks);
    let pki = transport::generate_cluster_pki("test", &["n0", "n1", "n2"]).unwrap();
    std::fs::write(dir.join("ca.pem"), &pki.ca_cert_pem).unwrap();
    let mut nodes = String::new();
    for (i, n) in pki.nodes.iter().enumerate() {
        std::fs::write(dir.join(format!("{}.pem", n.name)), &n.cert_pem).unwrap();
        std::fs::write(dir.join(format!("{}.key", n.name)), &n.key_pem).unwrap();
        nodes += &format!(
            "[[nodes]]\nname = \"{0}\"\naddress = \"127.0.0.1:{1}\"\ncert = \"{0}.pem\"\nkey = \"{0}.key\"\ndevices = [{{ kind = \"cpu\", threads = 1 }}]\n",
            n.name,
            ports[i]
        );
    }
    let text = format!(
        "coordinator = \"n0\"\n[model]\npath = \"{}\"\n[parallel]\npipefusion_degree = 3\nnum_patches = 4\nwarmup_steps = 1\n[tls]\nca = \"ca.pem\"\n{nodes}",
        dit_pf().display()
    );
    ClusterSpec::parse(&text, "multi.toml", Some(dir)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_quic_nodes_with_one_frame_queues_equal_the_reference() {
    let dir = std::env::temp_dir().join(format!("pipefuse-multinode-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let spec = topology(&dir);
    let quic = QuicOptions {
        link_queue_frames: 1,
        join_timeout: Duration::from_secs(20),
        ..QuicOptions::default()
    };
    let start = |name: &'static str| {
        let (spec, quic) = (spec.clone(), quic.clone());
        async move { Node::start(spec, name, ClusterOptions::default(), quic).await }
    };
    let (n0, n1, n2) = tokio::join!(start("n0"), start("n1"), start("n2"));
    let (n0, n1, n2) = (n0.unwrap(), n1.unwrap(), n2.unwrap());
    let cluster = n0.cluster().expect("n0 coordinates");
    let req = GenerateRequest::class_conditional(cluster, vec![3, 7], 5, 4.0, 11).unwrap();
    let out = tokio::time::timeout(Duration::from_secs(60), cluster.generate(req.clone()))
        .await
        .expect("no hang")
        .unwrap();
    let s = setup(
        &cluster.model().config,
        &req.request,
        &req.scheduler,
        5,
        &req.noise,
        4,
        1,
    );
    let d = dit_pf().join("transformer");
    let mut st = stages(4, 3, |r| Transformer::load(&d, Some(r), cpu()).unwrap());
    assert_eq!(
        out.latent.as_f32().unwrap(),
        pipefusion(&mut st, &s).as_f32().unwrap()
    );
    assert!(out.summary.devices.iter().take(2).all(|d| d.bytes_sent > 0));
    let (s1, s2) = (tokio::spawn(n1.serve()), tokio::spawn(n2.serve()));
    n0.shutdown().await;
    for s in [s1, s2] {
        let r = tokio::time::timeout(Duration::from_secs(10), s)
            .await
            .expect("survivors exit");
        r.unwrap().expect("a clean close is not an error");
    }
    std::fs::remove_dir_all(&dir).ok();
}
