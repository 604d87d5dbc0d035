//! CPU devices with bf16 linear layers (`dtype = "bf16"` in a topology, `--dtype bf16`): where
//! PipeFusion is exact (every step a warmup step), three bf16 stages give one bf16 device's
//! result (the bf16 GEMM computes each output row the same way whatever rows come with it), and
//! that result differs from f32 by bf16's rounding only.

mod common;

use std::time::Duration;

use actors::{Cluster, ClusterOptions, GenerateRequest};
use common::*;
use kernels::DType;
use model::Transformer;
use topology::{ClusterSpec, DeviceSpec, ModelSpec, Precision};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bf16_pipefusion_with_all_warmup_equals_one_bf16_device() {
    let steps = 5;
    let mut s = ClusterSpec::local_cpu(3, 1, ModelSpec::Path(dit_pf()));
    for d in &mut s.nodes[0].devices {
        *d = DeviceSpec::Cpu {
            threads: 1,
            precision: Precision::Bf16,
        };
    }
    s.parallel.num_patches = 2;
    s.parallel.warmup_steps = steps;
    let cluster = Cluster::start(s, ClusterOptions::default()).await.unwrap();
    let cfg = cluster.model().config.clone();
    let req = GenerateRequest::class_conditional(&cluster, vec![3, 7], steps, 4.0, 42).unwrap();
    let out = tokio::time::timeout(Duration::from_secs(60), cluster.generate(req.clone()))
        .await
        .expect("the cluster hung")
        .unwrap();
    cluster.shutdown().await;

    let dir = dit_pf().join("transformer");
    let setup = setup(
        &cfg,
        &req.request,
        &req.scheduler,
        steps,
        &req.noise,
        1,
        steps,
    );
    let one_bf16 = Transformer::load_with(&dir, None, cpu(), DType::BF16).unwrap();
    let want = serial(&one_bf16, &setup);
    let e = rel_l2(&out.latent, &want);
    assert!(
        e <= 1e-5,
        "3 bf16 stages vs one bf16 device: rel L2 {e:.3e}"
    );

    let f32_model = Transformer::load(&dir, None, cpu()).unwrap();
    let f32_result = serial(&f32_model, &setup);
    let e = rel_l2(&out.latent, &f32_result);
    eprintln!("bf16 cluster vs f32 serial after {steps} steps: rel L2 {e:.3e}");
    assert!(
        e > 1e-6 && e <= 2e-2,
        "bf16 vs f32: rel L2 {e:.3e} (expected bf16 rounding: above 1e-6, at most 2e-2)"
    );
}
