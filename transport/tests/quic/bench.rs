//! The QUIC vs TCP throughput helper.

use transport::bench_quic_vs_tcp;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_on_small_sizes() {
    let r = bench_quic_vs_tcp(&[4 << 10, 64 << 10], 4).await.unwrap();
    assert_eq!(r.rows.len(), 2);
    for row in &r.rows {
        assert!(row.quic_mb_s > 0.0 && row.tcp_mb_s > 0.0, "{r}");
        assert!(!row.quic_p50.is_zero() && !row.tcp_p50.is_zero(), "{r}");
    }
    eprintln!("{r}");
}

/// The numbers for the docs: `cargo test --release -p transport --test quic -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run in release"]
async fn bench_1_4_16_mib() {
    let r = bench_quic_vs_tcp(&[1 << 20, 4 << 20, 16 << 20], 20)
        .await
        .unwrap();
    println!("{r}");
}
