//! The QUIC vs TCP throughput helper and the packet size it reaches.

use transport::{bench_quic_vs_tcp, QuicOptions, ETHERNET_MAX_UDP_PAYLOAD};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_on_small_sizes() {
    let r = bench_quic_vs_tcp(&[4 << 10, 64 << 10], 4, QuicOptions::default())
        .await
        .unwrap();
    assert_eq!(r.rows.len(), 2);
    for row in &r.rows {
        assert!(row.quic_mb_s > 0.0 && row.tcp_mb_s > 0.0, "{r}");
        assert!(!row.quic_p50.is_zero() && !row.tcp_p50.is_zero(), "{r}");
    }
    eprintln!("{r}");
}

/// On loopback, path-MTU discovery must reach datagrams far above Ethernet size: quinn's
/// endpoint default (1472) silently capped it before, and QUIC ran at 0.4x of TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_paths_use_large_datagrams() {
    let r = bench_quic_vs_tcp(&[1 << 20], 4, QuicOptions::default())
        .await
        .unwrap();
    assert!(r.quic_path_mtu > 16_000, "{r}");
}

/// An explicit Ethernet-sized bound holds (segmentation offload stays on below 6550 bytes), and
/// the frames still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_bound_caps_the_datagrams() {
    let options = QuicOptions {
        max_udp_payload: Some(ETHERNET_MAX_UDP_PAYLOAD),
        ..Default::default()
    };
    let r = bench_quic_vs_tcp(&[1 << 20], 4, options).await.unwrap();
    assert!(r.quic_path_mtu <= ETHERNET_MAX_UDP_PAYLOAD, "{r}");
    assert!(r.rows[0].quic_mb_s > 0.0, "{r}");
}

/// A jumbo-frame bound (8952) is reached and kept under load: with segmentation offload on,
/// quinn would hand the kernel 10 x 8952 bytes in one send, the kernel would refuse it, every
/// batch would be lost and black-hole detection would drop the path back to 1200 bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jumbo_bound_survives_bulk_transfer() {
    let options = QuicOptions {
        max_udp_payload: Some(8952),
        ..Default::default()
    };
    let r = bench_quic_vs_tcp(&[4 << 20], 6, options).await.unwrap();
    assert!(r.quic_path_mtu >= 8900, "{r}");
}
