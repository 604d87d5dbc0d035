//! CFG parallel (ALGORITHMS.md section 3): two device groups, one per guidance branch, each a
//! PipeFusion pipeline; their last stages swap noise predictions after every patch. The in-order
//! reference of the split equals PipeFusion on one group of the doubled batch, and the actor
//! runtime reproduces the reference bitwise, reporting each step once.

mod common;

use std::time::Duration;

use actors::{Cluster, ClusterOptions, GenerateRequest, Progress};
use common::*;
use model::Transformer;
use topology::{ClusterSpec, ModelSpec};

fn spec(cfg: usize, n: usize, m: usize, w: usize) -> ClusterSpec {
    let mut s = ClusterSpec::local_cpu(cfg * n, 1, ModelSpec::Path(dit_pf()));
    s.parallel.cfg_degree = cfg;
    s.parallel.pipefusion_degree = n;
    s.parallel.num_patches = m;
    s.parallel.warmup_steps = w;
    s
}

#[test]
fn split_reference_equals_one_group_of_the_doubled_batch() {
    let dir = dit_pf().join("transformer");
    let load = |r| Transformer::load(&dir, Some(r), cpu()).unwrap();
    for (n, m, w) in [(1, 2, 1), (2, 4, 1), (2, 2, 0)] {
        let cfg = Transformer::load(&dir, Some(0..1), cpu())
            .unwrap()
            .config()
            .clone();
        let req = model::Request {
            class_labels: vec![3, 7],
            caption: None,
            guidance_scale: 4.0,
            latent_size: [32, 32],
            embedded_guidance: None,
        };
        let sched = model::sampler::Scheduler::named("ddim").unwrap();
        let noise = model::gaussian(&[2, 4, 32, 32], 42);
        let one = setup(&cfg, &req, &sched, 5, &noise, m, w);
        let want = pipefusion(&mut stages(4, n, load), &one);
        let got = cfg_pipefusion(4, n, load, split_cfg(&one, &cfg));
        let e = rel_l2(&got, &want);
        eprintln!("N={n} M={m} W={w}: rel L2 {e:.2e} vs one group");
        assert!(e <= 1e-5, "N={n} M={m} W={w}: rel L2 {e:.3e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_reproduce_the_split_reference_bitwise() {
    let dir = dit_pf().join("transformer");
    let load = |r| Transformer::load(&dir, Some(r), cpu()).unwrap();
    for (n, m, w) in [(1, 2, 1), (2, 4, 1)] {
        let cluster = Cluster::start(spec(2, n, m, w), ClusterOptions::default())
            .await
            .unwrap();
        let req = GenerateRequest::class_conditional(&cluster, vec![3, 7], 5, 4.0, 42).unwrap();
        let plan = cluster.plan(&req).unwrap();
        assert_eq!((plan.cfg_degree, plan.pipeline_len()), (2, n));
        let mut handle = cluster.submit(req.clone()).await.unwrap();
        let mut steps = Vec::new();
        let out = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(Progress::Step { step, .. }) = handle.progress.recv().await {
                steps.push(step);
            }
            handle.result().await.unwrap()
        })
        .await
        .expect("the cluster hung");
        assert_eq!(steps, (0..5).collect::<Vec<_>>(), "each step reported once");

        let one = setup_for(&cluster, &req, m, w);
        let want = cfg_pipefusion(4, n, load, split_cfg(&one, &cluster.model().config));
        assert_eq!(
            out.latent.as_f32().unwrap(),
            want.as_f32().unwrap(),
            "N={n} M={m} W={w}"
        );
        assert_eq!(out.summary.devices.len(), 2 * n);
        // The last stages swap one latent-sized prediction per step (+ headers): [B, C, H, W].
        let prediction = (2 * 4 * 16 * 16 * 4 * 5) as u64;
        let last = &out.summary.devices[n - 1];
        // With N > 1 also the latent rows to stage 0, in every step but the last.
        let expect = if n == 1 {
            prediction
        } else {
            prediction + prediction * 4 / 5
        };
        assert!(
            last.bytes_sent >= expect && last.bytes_sent < expect + 8192,
            "device {} sent {} bytes, expected ~{expect}",
            last.device,
            last.bytes_sent
        );
        cluster.shutdown().await;
    }
}

/// A failure in one group while the other group's last stage waits for its prediction: the
/// request fails naming the device and step, the waiting compute thread is released, and the
/// next request is exact again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_group_releases_its_partner_and_the_next_request_is_exact() {
    let dir = dit_pf().join("transformer");
    let load = |r| Transformer::load(&dir, Some(r), cpu()).unwrap();
    for fault in [
        actors::Fault::ErrorAt { device: 1, step: 2 },
        actors::Fault::PanicAt { device: 0, step: 3 },
    ] {
        let opts = ClusterOptions {
            fault: Some(fault),
            ..ClusterOptions::default()
        };
        let cluster = Cluster::start(spec(2, 1, 1, 1), opts).await.unwrap();
        let req = GenerateRequest::class_conditional(&cluster, vec![3, 7], 5, 4.0, 42).unwrap();
        let err = tokio::time::timeout(Duration::from_secs(60), cluster.generate(req.clone()))
            .await
            .expect("the failed request hung")
            .unwrap_err()
            .to_string();
        let (device, step) = match fault {
            actors::Fault::ErrorAt { device, step } | actors::Fault::PanicAt { device, step } => {
                (device, step)
            }
            _ => unreachable!(),
        };
        assert!(
            err.contains(&format!("device {device}")) && err.contains(&format!("step {step}")),
            "{fault:?}: {err}"
        );
        let out = tokio::time::timeout(Duration::from_secs(60), cluster.generate(req.clone()))
            .await
            .expect("the next request hung")
            .unwrap();
        let want = cfg_pipefusion(
            4,
            1,
            load,
            split_cfg(&setup_for(&cluster, &req, 1, 1), &cluster.model().config),
        );
        assert_eq!(
            out.latent.as_f32().unwrap(),
            want.as_f32().unwrap(),
            "{fault:?}"
        );
        cluster.shutdown().await;
    }
}

/// With one stage per group both devices are stage 0s, so one group can start, finish its first
/// forward and send its prediction before the other has begun: the frame is kept until the Begin
/// and the result is still exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prediction_that_arrives_before_begin_is_kept() {
    let dir = dit_pf().join("transformer");
    let load = |r| Transformer::load(&dir, Some(r), cpu()).unwrap();
    let opts = ClusterOptions {
        fault: Some(actors::Fault::SlowBegin {
            device: 0,
            millis: 400,
        }),
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(spec(2, 1, 1, 1), opts).await.unwrap();
    let req = GenerateRequest::class_conditional(&cluster, vec![3, 7], 3, 4.0, 42).unwrap();
    let out = tokio::time::timeout(Duration::from_secs(60), cluster.generate(req.clone()))
        .await
        .expect("hung")
        .unwrap();
    let one = setup_for(&cluster, &req, 1, 1);
    let want = cfg_pipefusion(4, 1, load, split_cfg(&one, &cluster.model().config));
    assert_eq!(out.latent.as_f32().unwrap(), want.as_f32().unwrap());
    cluster.shutdown().await;
}
