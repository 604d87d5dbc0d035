//! Sequence parallelism in the actor runtime (ALGORITHMS.md section 4): each device of a group
//! owns a strip of token rows and all layers; self-attention reaches the other strips through
//! the group (Ulysses all-to-all or Ring shifts over the device links). The result equals the
//! plain single-device loop, alone and combined with CFG parallel.

mod common;

use std::time::Duration;

use actors::{Cluster, ClusterOptions, GenerateRequest, Progress};
use common::*;
use model::Transformer;
use topology::{ClusterSpec, ModelSpec};

fn spec(cfg: usize, ulysses: usize, ring: usize) -> ClusterSpec {
    let mut s = ClusterSpec::local_cpu(cfg * ulysses * ring, 1, ModelSpec::Path(dit_pf()));
    s.parallel.pipefusion_degree = 1;
    s.parallel.num_patches = 1;
    s.parallel.cfg_degree = cfg;
    s.parallel.ulysses_degree = ulysses;
    s.parallel.ring_degree = ring;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ulysses_and_ring_groups_equal_the_serial_loop() {
    let dir = dit_pf().join("transformer");
    let full = Transformer::load(&dir, None, cpu()).unwrap();
    // dit_pf: 2 heads, 8 token rows.
    for (cfg, u, r, bound) in [
        (1, 2, 1, 1e-6f64),
        (1, 1, 2, 1e-5),
        (1, 1, 3, 1e-5),
        (2, 2, 1, 1e-6),
        (1, 2, 2, 1e-5),
    ] {
        let cluster = Cluster::start(spec(cfg, u, r), ClusterOptions::default())
            .await
            .unwrap();
        let req = GenerateRequest::class_conditional(&cluster, vec![3, 7], 4, 4.0, 42).unwrap();
        let plan = cluster.plan(&req).unwrap();
        assert_eq!(plan.sp.degree(), u * r);
        let mut handle = cluster.submit(req.clone()).await.unwrap();
        let mut steps = Vec::new();
        let out = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(Progress::Step { step, .. }) = handle.progress.recv().await {
                steps.push(step);
            }
            handle.result().await
        })
        .await
        .expect("the cluster hung")
        .unwrap();
        assert_eq!(steps, (0..4).collect::<Vec<_>>(), "each step reported once");
        let want = serial(&full, &setup_for(&cluster, &req, 1, 1));
        let e = rel_l2(&out.latent, &want);
        eprintln!("cfg {cfg} ulysses {u} ring {r}: relative L2 {e:.2e} vs serial");
        assert!(e <= bound, "cfg {cfg} ulysses {u} ring {r}: {e:.3e}");
        assert_eq!(out.summary.devices.len(), cfg * u * r);
        // Each device sends what the plan predicts (its shard's parts, not the whole image's),
        // plus frame headers.
        for d in &out.summary.devices {
            let predicted: u64 = plan
                .link_bytes()
                .iter()
                .filter(|l| l.from == d.device)
                .map(|l| l.bytes_per_step * 4)
                .sum();
            assert!(
                d.bytes_sent >= predicted && d.bytes_sent <= predicted + predicted / 20 + 8192,
                "cfg {cfg} ulysses {u} ring {r}: device {} sent {} bytes, the plan says {predicted}",
                d.device,
                d.bytes_sent
            );
        }
        cluster.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ulysses_that_does_not_divide_the_heads_is_refused_at_start() {
    let e = Cluster::start(spec(1, 3, 1), ClusterOptions::default())
        .await
        .err()
        .expect("3 ranks cannot split 2 heads")
        .to_string();
    assert!(
        e.contains("must divide the model's 2 attention heads"),
        "{e}"
    );
}

/// A rank failing (error or panic) while the others wait inside a collective fails the request
/// naming device and step; the waiting ranks are released and the next request is exact. A rank
/// whose Begin comes late gets the parts sent to it meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_and_late_begins_in_a_group() {
    let dir = dit_pf().join("transformer");
    let full = Transformer::load(&dir, None, cpu()).unwrap();
    for fault in [
        actors::Fault::ErrorAt { device: 1, step: 2 },
        actors::Fault::PanicAt { device: 0, step: 1 },
        actors::Fault::SlowBegin {
            device: 0,
            millis: 300,
        },
    ] {
        let opts = ClusterOptions {
            fault: Some(fault),
            ..ClusterOptions::default()
        };
        let cluster = Cluster::start(spec(1, 2, 1), opts).await.unwrap();
        let req = GenerateRequest::class_conditional(&cluster, vec![3, 7], 4, 4.0, 42).unwrap();
        let first = tokio::time::timeout(Duration::from_secs(60), cluster.generate(req.clone()))
            .await
            .expect("the first request hung");
        match fault {
            actors::Fault::ErrorAt { device, step } | actors::Fault::PanicAt { device, step } => {
                let e = first.unwrap_err().to_string();
                assert!(
                    e.contains(&format!("device {device}")) && e.contains(&format!("step {step}")),
                    "{fault:?}: {e}"
                );
            }
            _ => assert!(first.is_ok(), "{fault:?}: {:?}", first.err()),
        }
        let out = tokio::time::timeout(Duration::from_secs(60), cluster.generate(req.clone()))
            .await
            .expect("the next request hung")
            .unwrap();
        let want = serial(&full, &setup_for(&cluster, &req, 1, 1));
        let e = rel_l2(&out.latent, &want);
        assert!(
            e <= 1e-6,
            "{fault:?}: the next request: relative L2 {e:.3e}"
        );
        cluster.shutdown().await;
    }
}

/// Sequence parallelism inside PipeFusion stages (Ulysses, Ring, USP), alone and in the full
/// hybrid (CFG x PipeFusion x Ulysses x Ring): each rank runs its sub-strip of every patch with a
/// K/V buffer of its head group. The result equals plain PipeFusion with the same stages, patches
/// and warmup (the in-order reference); with W = T it equals the serial loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequence_parallel_inside_pipefusion_equals_plain_pipefusion() {
    let dir = dit_pf().join("transformer");
    let full = Transformer::load(&dir, None, cpu()).unwrap();
    // DPM-Solver++ is a multistep sampler: its history must follow the rows each rank updates
    // across the warmup -> patch transition.
    for (cfg, n, m, w, sched, u, r) in [
        (1, 2, 2, 1, "ddim", 2, 1),
        (1, 2, 4, 0, "ddim", 2, 1),
        (1, 1, 2, 2, "ddim", 2, 1),
        (2, 2, 2, 1, "ddim", 2, 1),
        (1, 2, 2, 1, "dpm", 2, 1),
        (1, 2, 2, 1, "ddim", 1, 2),
        (1, 2, 4, 0, "dpm", 1, 2),
        (2, 2, 2, 1, "ddim", 1, 2),
        (1, 2, 2, 1, "dpm", 2, 2),
        (1, 2, 2, 4, "ddim", 1, 2),
    ] {
        let mut s = spec(cfg, u, r);
        s.nodes[0].devices = vec![
            topology::DeviceSpec::Cpu {
                threads: 1,
                precision: topology::Precision::F32
            };
            cfg * n * u * r
        ];
        s.parallel.pipefusion_degree = n;
        s.parallel.num_patches = m;
        s.parallel.warmup_steps = w;
        let cluster = Cluster::start(s, ClusterOptions::default()).await.unwrap();
        let mut req = GenerateRequest::class_conditional(&cluster, vec![3, 7], 4, 4.0, 42).unwrap();
        req.scheduler = model::sampler::Scheduler::named(sched).unwrap();
        let out = tokio::time::timeout(Duration::from_secs(60), cluster.generate(req.clone()))
            .await
            .expect("the cluster hung")
            .unwrap();
        let one = setup_for(&cluster, &req, m, w);
        let mut st = stages(4, n, |r| Transformer::load(&dir, Some(r), cpu()).unwrap());
        let want = pipefusion(&mut st, &one);
        let e = rel_l2(&out.latent, &want);
        let case =
            format!("cfg {cfg} x pipefusion {n} x ulysses {u} x ring {r}, M={m} W={w} {sched}");
        eprintln!("{case}: relative L2 {e:.2e} vs plain PipeFusion");
        assert!(e <= 1e-5, "{case}: relative L2 {e:.3e}");
        if w >= 4 {
            let e = rel_l2(&out.latent, &serial(&full, &one));
            assert!(e <= 1e-5, "{case}: relative L2 {e:.3e} vs serial");
        }
        assert_eq!(out.summary.devices.len(), cfg * n * u * r);
        // Each device sends what the plan predicts per step (its rows' share, not the whole
        // latent), plus in whole-image steps the last stage's all-gather of noise predictions.
        let plan = cluster.plan(&req).unwrap();
        let sh = plan.shape;
        let latent_rows = |rows: usize| {
            (sh.latent_batch * sh.latent_channels * rows * sh.patch_size * sh.token_cols) as u64
                * sh.patch_size as u64
                * 4
        };
        for d in &out.summary.devices {
            let role = plan.role(d.device).unwrap();
            let links: Vec<_> = plan
                .link_bytes()
                .into_iter()
                .filter(|l| l.from == d.device)
                .collect();
            let mut predicted: u64 = links.iter().map(|l| l.bytes_per_step).sum::<u64>() * 4;
            if role.is_last_stage() {
                // The final step's latent goes nowhere; each whole-image step all-gathers the
                // ranks' noise predictions (their shards) among the last stage's ranks.
                let hop = links.iter().find(|l| l.kind == topology::LinkKind::Latent);
                predicted -= hop.map_or(0, |l| l.bytes_per_step);
                let shard = plan.sp.rows()[role.sp.rank].len();
                predicted += (w.min(4) * (u * r - 1)) as u64 * latent_rows(shard);
            }
            let sent = d.bytes_sent;
            assert!(
                sent >= predicted && sent <= predicted + predicted / 100 + 8192,
                "{case}: device {} sent {sent} bytes, the plan says {predicted}",
                d.device
            );
        }
        cluster.shutdown().await;
    }
}

/// The run summary separates compute from waiting in exchanges: while one rank of a Ulysses group
/// hangs for a second before an item, the other waits for its parts inside the collective; that
/// second shows up as the waiting rank's exchange wait, not as its compute time. (A lower bound
/// on real time, so a loaded machine cannot make it fail.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_in_an_exchange_is_not_counted_as_compute() {
    let opts = ClusterOptions {
        fault: Some(actors::Fault::HangAt {
            device: 1,
            step: 2,
            secs: 1,
        }),
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(spec(1, 2, 1), opts).await.unwrap();
    let req = GenerateRequest::class_conditional(&cluster, vec![3, 7], 4, 4.0, 42).unwrap();
    let out = tokio::time::timeout(Duration::from_secs(60), cluster.generate(req))
        .await
        .expect("the cluster hung")
        .unwrap();
    let s = &out.summary;
    let waiting = &s.devices[0];
    eprintln!("{s}");
    assert!(
        waiting.exchange_wait >= Duration::from_millis(950),
        "device 0 waited {:?} in exchanges while device 1 hung for 1 s",
        waiting.exchange_wait
    );
    // Compute and waits partition the device's item time, which fits in the wall time (give or
    // take the few milliseconds between the device's clock and the coordinator's).
    assert!(
        waiting.busy + waiting.exchange_wait <= s.wall + Duration::from_millis(100),
        "compute {:?} + exchange wait {:?} exceed the wall time {:?}",
        waiting.busy,
        waiting.exchange_wait,
        s.wall
    );
    let waited: f64 = s
        .devices
        .iter()
        .map(|d| d.exchange_wait.as_secs_f64())
        .sum();
    let share = waited / (2.0 * s.wall.as_secs_f64());
    assert!((s.exchange_fraction - share).abs() < 1e-9, "{s}");
    assert!(s.to_string().contains("waiting in exchanges"), "{s}");
    cluster.shutdown().await;
}
