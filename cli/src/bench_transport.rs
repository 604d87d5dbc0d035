//! `pipefuse bench transport`: activation-sized messages over QUIC (mutual TLS, loopback) against
//! a plain TCP stream with the same framing, in the same run.

use anyhow::{bail, Result};
use clap::Args;

/// Arguments of `pipefuse bench transport`.
#[derive(Args, Debug)]
pub(crate) struct TransportArgs {
    /// Message sizes in MiB.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4, 16])]
    sizes_mib: Vec<usize>,
    /// Messages per size.
    #[arg(long, default_value_t = 20)]
    count: usize,
    /// Largest UDP payload for QUIC (1200-65527; default: 65527, what nodes use on loopback).
    /// 1472 measures the Ethernet-sized packets nodes use on other addresses.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1200..=65527))]
    max_udp_payload: Option<u16>,
}

pub(crate) fn run(a: TransportArgs) -> Result<()> {
    eprintln!("{}", crate::devices::cpu_summary());
    if a.sizes_mib.is_empty() || a.sizes_mib.contains(&0) || a.count == 0 {
        bail!("--sizes-mib needs positive sizes and --count at least 1");
    }
    // Each message exists about three times at once (sent, in flight, received), on top of the
    // TCP run's copies: refuse sizes the host cannot hold before allocating any.
    let largest = a.sizes_mib.iter().copied().max().unwrap_or(0);
    let bytes = (largest as u64).checked_mul(4 << 20);
    if let Some(host) = kernels::host_memory() {
        if bytes.is_none_or(|b| b > host.available) {
            bail!(
                "--sizes-mib {largest}: a message of {largest} MiB needs about four times that \
                 in memory, but only {host}"
            );
        }
    }
    let sizes: Vec<usize> = a.sizes_mib.iter().map(|m| m << 20).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let options = transport::QuicOptions {
        max_udp_payload: a.max_udp_payload,
        ..Default::default()
    };
    let report = rt.block_on(transport::bench_quic_vs_tcp(&sizes, a.count, options))?;
    print!("{report}");
    // Geometric mean over the sizes of QUIC / TCP throughput.
    let ln: f64 = report
        .rows
        .iter()
        .map(|r| (r.quic_mb_s / r.tcp_mb_s).ln())
        .sum::<f64>();
    println!("quic_vs_tcp={:.3}", (ln / report.rows.len() as f64).exp());
    Ok(())
}
