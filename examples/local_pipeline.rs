//! A two-device PipeFusion cluster in this process, built from a topology file, running one
//! class-conditional request and printing progress and the per-device summary.
//!
//! `cargo run --release -p examples --example local_pipeline [-- TOPOLOGY.toml]`
//! (default: examples/topologies/local_2cpu.toml, the bundled tiny DiT). `RUST_LOG=info` shows
//! the runtime's logs.

use std::path::PathBuf;

use actors::{Cluster, ClusterOptions, GenerateRequest, Progress};
use topology::ClusterSpec;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let path = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("topologies/local_2cpu.toml")
        });

    // 1. The topology: nodes, devices, model, parallel plan (errors name file, line, field).
    let spec = ClusterSpec::from_file(&path)?;
    // 2. Start the cluster: one device actor per stage, each loading only its layers.
    let cluster = Cluster::start(spec, ClusterOptions::default()).await?;
    // 3. A request: classes 3 and 7, 12 DDIM steps, guidance 4, noise from seed 0.
    let req = GenerateRequest::class_conditional(&cluster, vec![3, 7], 12, 4.0, 0)?;
    print!("{}", cluster.plan(&req)?.describe());
    // 4. Submit, watch progress, await the result.
    let mut handle = cluster.submit(req).await?;
    while let Some(Progress::Step {
        step,
        steps,
        elapsed,
    }) = handle.progress.recv().await
    {
        println!(
            "step {}/{steps} after {:.3} s",
            step + 1,
            elapsed.as_secs_f64()
        );
    }
    let out = handle.result().await?;
    println!("final latent {:?}\n{}", out.latent.shape(), out.summary);
    cluster.shutdown().await;
    Ok(())
}
