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

/// Nodes n0.. on free loopback ports, node i with `devices[i]` CPU devices, and the `parallel`
/// table's body.
fn topology(dir: &std::path::Path, devices: &[usize], parallel: &str) -> ClusterSpec {
    // Three ports the OS reports free (held together, so distinct).
    let socks: Vec<std::net::UdpSocket> = (0..devices.len())
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    let ports: Vec<u16> = socks
        .iter()
        .map(|s| s.local_addr().unwrap().port())
        .collect();
    drop(socks);
    let names: Vec<String> = (0..devices.len()).map(|i| format!("n{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let pki = transport::generate_cluster_pki("test", &names).unwrap();
    std::fs::write(dir.join("ca.pem"), &pki.ca_cert_pem).unwrap();
    let mut nodes = String::new();
    for (i, n) in pki.nodes.iter().enumerate() {
        std::fs::write(dir.join(format!("{}.pem", n.name)), &n.cert_pem).unwrap();
        std::fs::write(dir.join(format!("{}.key", n.name)), &n.key_pem).unwrap();
        let devs = vec!["{ kind = \"cpu\", threads = 1 }"; devices[i]].join(", ");
        nodes += &format!(
            "[[nodes]]\nname = \"{0}\"\naddress = \"127.0.0.1:{1}\"\ncert = \"{0}.pem\"\nkey = \"{0}.key\"\ndevices = [{devs}]\n",
            n.name,
            ports[i]
        );
    }
    let text = format!(
        "coordinator = \"n0\"\n[model]\npath = \"{}\"\n[parallel]\n{parallel}\n[tls]\nca = \"ca.pem\"\n{nodes}",
        dit_pf().display()
    );
    ClusterSpec::parse(&text, "multi.toml", Some(dir)).unwrap()
}

/// Starts nodes n0, n1, n2 of `spec` in this process.
async fn start_three(spec: &ClusterSpec, quic: &QuicOptions) -> [Node; 3] {
    let start = |name: &'static str| {
        let (spec, quic) = (spec.clone(), quic.clone());
        async move { Node::start(spec, name, ClusterOptions::default(), quic).await }
    };
    let (n0, n1, n2) = tokio::join!(start("n0"), start("n1"), start("n2"));
    [n0.unwrap(), n1.unwrap(), n2.unwrap()]
}

/// Shuts the coordinator n0 down; n1 and n2 must then exit cleanly.
async fn stop_three([n0, n1, n2]: [Node; 3]) {
    let (s1, s2) = (tokio::spawn(n1.serve()), tokio::spawn(n2.serve()));
    n0.shutdown().await;
    for s in [s1, s2] {
        let r = tokio::time::timeout(Duration::from_secs(10), s)
            .await
            .expect("survivors exit");
        r.unwrap().expect("a clean close is not an error");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_quic_nodes_with_one_frame_queues_equal_the_reference() {
    let dir = std::env::temp_dir().join(format!("pipefuse-multinode-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let spec = topology(
        &dir,
        &[1, 1, 1],
        "pipefusion_degree = 3\nnum_patches = 4\nwarmup_steps = 1",
    );
    let quic = QuicOptions {
        link_queue_frames: 1,
        join_timeout: Duration::from_secs(20),
        ..QuicOptions::default()
    };
    let [n0, n1, n2] = start_three(&spec, &quic).await;
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
    stop_three([n0, n1, n2]).await;
    std::fs::remove_dir_all(&dir).ok();
}

/// CFG parallel across nodes: cfg 2 x pipefusion 2 on n0 (rank 0), n1 (ranks 1, 2), n2 (rank 3),
/// so hidden states, latents and the last stages' prediction exchange (1 <-> 3) all cross QUIC.
/// The result equals the in-order reference of the split bitwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cfg_groups_across_quic_nodes_equal_the_reference() {
    let dir = std::env::temp_dir().join(format!("pipefuse-multinode-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let spec = topology(
        &dir,
        &[1, 2, 1],
        "cfg_degree = 2\npipefusion_degree = 2\nnum_patches = 2\nwarmup_steps = 1",
    );
    let quic = QuicOptions {
        join_timeout: Duration::from_secs(20),
        ..QuicOptions::default()
    };
    let [n0, n1, n2] = start_three(&spec, &quic).await;
    let cluster = n0.cluster().expect("n0 coordinates");
    let req = GenerateRequest::class_conditional(cluster, vec![3, 7], 5, 4.0, 11).unwrap();
    let mut handle = cluster.submit(req.clone()).await.unwrap();
    let mut steps = Vec::new();
    let out = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(actors::Progress::Step { step, .. }) = handle.progress.recv().await {
            steps.push(step);
        }
        handle.result().await
    })
    .await
    .expect("no hang")
    .unwrap();
    assert_eq!(steps, (0..5).collect::<Vec<_>>(), "each step reported once");
    let one = setup_for(cluster, &req, 2, 1);
    let two = split_cfg(&one, &cluster.model().config);
    let d = dit_pf().join("transformer");
    let want = cfg_pipefusion(
        4,
        2,
        |r| Transformer::load(&d, Some(r), cpu()).unwrap(),
        two,
    );
    assert_eq!(out.latent.as_f32().unwrap(), want.as_f32().unwrap());
    assert_eq!(out.summary.devices.len(), 4);
    assert!(out.summary.devices.iter().all(|d| d.bytes_sent > 0));
    stop_three([n0, n1, n2]).await;
    std::fs::remove_dir_all(&dir).ok();
}

/// Ring attention across three QUIC nodes (one rank each): every layer's key/value blocks cross
/// the network; the result equals the plain single-device loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_attention_across_quic_nodes_equals_the_serial_loop() {
    let dir = std::env::temp_dir().join(format!("pipefuse-multinode-ring-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let spec = topology(
        &dir,
        &[1, 1, 1],
        "pipefusion_degree = 1\nnum_patches = 1\nring_degree = 3",
    );
    let quic = QuicOptions {
        join_timeout: Duration::from_secs(20),
        ..QuicOptions::default()
    };
    let [n0, n1, n2] = start_three(&spec, &quic).await;
    let cluster = n0.cluster().expect("n0 coordinates");
    let req = GenerateRequest::class_conditional(cluster, vec![3, 7], 4, 4.0, 11).unwrap();
    let out = tokio::time::timeout(Duration::from_secs(60), cluster.generate(req.clone()))
        .await
        .expect("no hang")
        .unwrap();
    let full = Transformer::load(&dit_pf().join("transformer"), None, cpu()).unwrap();
    let want = serial(&full, &setup_for(cluster, &req, 1, 1));
    let e = rel_l2(&out.latent, &want);
    assert!(e <= 1e-5, "relative L2 {e:.3e} vs serial");
    assert!(out.summary.devices.iter().all(|d| d.bytes_sent > 0));
    stop_three([n0, n1, n2]).await;
    std::fs::remove_dir_all(&dir).ok();
}
