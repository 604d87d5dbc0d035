//! The actor runtime end to end over in-process links: it reproduces the in-order reference
//! bitwise, reports progress and a summary, and turns device errors, panics and stalls into a
//! failed request that names the device and the step (never a hang).

mod common;

use std::time::Duration;

use actors::{Cluster, ClusterError, ClusterOptions, Fault, GenerateRequest, Progress};
use common::*;
use model::{Caption, Request, Transformer};
use topology::{ClusterSpec, DeviceSpec, ModelSpec};

fn spec(n: usize, m: usize, w: usize) -> ClusterSpec {
    let mut s = ClusterSpec::local_cpu(n, 1, ModelSpec::Path(dit_pf()));
    s.parallel.num_patches = m;
    s.parallel.warmup_steps = w;
    s
}

fn request(cluster: &Cluster, steps: usize) -> GenerateRequest {
    GenerateRequest::class_conditional(cluster, vec![3, 7], steps, 4.0, 42).unwrap()
}

/// Bounded wait: a request that hangs fails the test instead of the CI job.
async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("the cluster hung")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_reproduces_the_in_order_reference_bitwise() {
    let dir = dit_pf().join("transformer");
    for (n, m, w) in [(2, 4, 1), (3, 2, 0), (4, 3, 2), (1, 4, 1)] {
        let cluster = Cluster::start(spec(n, m, w), ClusterOptions::default())
            .await
            .unwrap();
        let req = request(&cluster, 6);
        let plan = cluster.plan(&req).unwrap();
        let mut handle = cluster.submit(req.clone()).await.unwrap();
        let mut steps = Vec::new();
        let out = within(async {
            while let Some(Progress::Step {
                step, steps: of, ..
            }) = handle.progress.recv().await
            {
                assert_eq!(of, 6);
                steps.push(step);
            }
            handle.result().await.unwrap()
        })
        .await;
        assert_eq!(steps, (0..6).collect::<Vec<_>>(), "progress in step order");

        let s = setup(
            &cluster.model().config,
            &req.request,
            &req.scheduler,
            6,
            &req.noise,
            m,
            w,
        );
        assert_eq!(s.patches, plan.patches);
        let mut st = stages(4, n, |r| Transformer::load(&dir, Some(r), cpu()).unwrap());
        let want = pipefusion(&mut st, &s);
        assert_eq!(
            out.latent.as_f32().unwrap(),
            want.as_f32().unwrap(),
            "N={n} M={m} W={w}"
        );

        let items = w.min(6) + (6 - w.min(6)) * m;
        assert_eq!(out.summary.devices.len(), n);
        for d in &out.summary.devices {
            assert_eq!(d.items, items, "device {} ran every item once", d.device);
            assert!(d.busy > Duration::ZERO);
            if n > 1 {
                assert!(d.bytes_sent > 0, "device {} sent its activations", d.device);
            }
        }
        // Stage s -> s+1 carries the whole hidden state [B', S, d] once per step (plus headers).
        if n > 1 {
            let hidden = (4 * 64 * 32 * 4 * 6) as u64;
            let sent = out.summary.devices[0].bytes_sent;
            assert!(
                sent >= hidden && sent < hidden + 4096,
                "stage 0 sent {sent} bytes"
            );
        }
        cluster.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_queue_and_each_gets_its_own_result() {
    let cluster = Cluster::start(spec(2, 2, 1), ClusterOptions::default())
        .await
        .unwrap();
    let a = request(&cluster, 4);
    let mut b = request(&cluster, 4);
    b.noise = model::gaussian(b.noise.shape(), 7);
    let (ha, hb) = (
        cluster.submit(a.clone()).await.unwrap(),
        cluster.submit(b.clone()).await.unwrap(),
    );
    let (ra, rb) = within(async { (ha.result().await.unwrap(), hb.result().await.unwrap()) }).await;
    let again = within(cluster.generate(a)).await.unwrap();
    assert_eq!(
        ra.latent.as_f32().unwrap(),
        again.latent.as_f32().unwrap(),
        "no state leaks between requests"
    );
    assert_ne!(ra.latent.as_f32().unwrap(), rb.latent.as_f32().unwrap());
    cluster.shutdown().await;
}

/// Requests submitted from several tasks at once all run (request ids reach the devices in
/// increasing order, which they rely on), each with its own result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submissions_all_run() {
    let cluster = std::sync::Arc::new(
        Cluster::start(spec(2, 2, 1), ClusterOptions::default())
            .await
            .unwrap(),
    );
    let tasks: Vec<_> = (0..6u64)
        .map(|seed| {
            let cluster = cluster.clone();
            tokio::spawn(async move {
                let mut r = request(&cluster, 3);
                r.noise = model::gaussian(r.noise.shape(), seed);
                cluster.generate(r).await
            })
        })
        .collect();
    let outs = within(async {
        let mut outs = Vec::new();
        for t in tasks {
            outs.push(t.await.unwrap());
        }
        outs
    })
    .await;
    for (i, o) in outs.iter().enumerate() {
        assert!(o.is_ok(), "request of task {i}: {:?}", o.as_ref().err());
    }
    let first = outs[0].as_ref().unwrap().latent.as_f32().unwrap();
    assert_ne!(first, outs[1].as_ref().unwrap().latent.as_f32().unwrap());
    std::sync::Arc::try_unwrap(cluster)
        .ok()
        .expect("tasks done")
        .shutdown()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pixart_through_the_cluster_with_all_warmup_equals_serial() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../model/tests/fixtures/pixart_tiny");
    let mut s = ClusterSpec::local_cpu(3, 1, ModelSpec::Path(dir.clone()));
    s.parallel.num_patches = 2;
    s.parallel.warmup_steps = 5;
    let cluster = Cluster::start(s, ClusterOptions::default()).await.unwrap();
    let cfg = cluster.model().config.clone();
    let req = GenerateRequest {
        request: Request {
            class_labels: vec![],
            caption: Some(Caption {
                embeds: model::gaussian(&[1, 6, cfg.caption_channels], 1),
                mask: None,
                negative: Some((model::gaussian(&[1, 6, cfg.caption_channels], 2), None)),
                pooled: None,
                negative_pooled: None,
            }),
            guidance_scale: 4.5,
            latent_size: [8, 12],
            embedded_guidance: None,
        },
        steps: 5,
        scheduler: cluster.model().default_scheduler().unwrap(),
        noise: model::gaussian(&[1, 4, 8, 12], 3),
    };
    let out = within(cluster.generate(req.clone())).await.unwrap();
    let full = Transformer::load(&dir, None, cpu()).unwrap();
    let want = serial(
        &full,
        &setup(&cfg, &req.request, &req.scheduler, 5, &req.noise, 1, 5),
    );
    let e = rel_l2(&out.latent, &want);
    assert!(e <= 1e-5, "rel L2 {e:.3e}");
    cluster.shutdown().await;
}

/// Runs a request under `fault`, returns its error, then checks that the cluster recovered: the
/// next request (the fault fires in the first only) equals the in-order reference bitwise.
/// A 5-step request on a cluster of `n` stages and `m` patches (W = 1) equals the in-order
/// reference bitwise (after a failure or a cancellation: nothing stale leaks in).
async fn next_request_is_exact(cluster: &Cluster, n: usize, m: usize) {
    let req = request(cluster, 5);
    let out = within(cluster.generate(req.clone())).await.unwrap();
    let dir = dit_pf().join("transformer");
    let mut st = stages(4, n, |r| Transformer::load(&dir, Some(r), cpu()).unwrap());
    let want = pipefusion(&mut st, &setup_for(cluster, &req, m, 1));
    assert_eq!(
        out.latent.as_f32().unwrap(),
        want.as_f32().unwrap(),
        "the request after a failure or a cancellation"
    );
}

async fn failing_run(fault: Fault, opts: ClusterOptions, pause: Duration) -> ClusterError {
    let opts = ClusterOptions {
        fault: Some(fault),
        ..opts
    };
    let cluster = Cluster::start(spec(3, 3, 1), opts).await.unwrap();
    let err = within(cluster.generate(request(&cluster, 5)))
        .await
        .unwrap_err();
    tokio::time::sleep(pause).await;
    next_request_is_exact(&cluster, 3, 3).await;
    cluster.shutdown().await;
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_error_fails_the_request_naming_device_and_step() {
    let e = failing_run(
        Fault::ErrorAt { device: 1, step: 2 },
        ClusterOptions::default(),
        Duration::ZERO,
    )
    .await;
    let msg = e.to_string();
    eprintln!("{msg}");
    assert!(
        msg.contains("device 1") && msg.contains("step 2") && msg.contains("injected error"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_panic_fails_the_request_naming_device_and_step() {
    let e = failing_run(
        Fault::PanicAt { device: 2, step: 3 },
        ClusterOptions::default(),
        Duration::ZERO,
    )
    .await;
    let msg = e.to_string();
    eprintln!("{msg}");
    assert!(
        msg.contains("device 2") && msg.contains("step 3") && msg.contains("panicked"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_actor_that_dies_fails_the_request_and_the_cluster_says_so() {
    let opts = ClusterOptions {
        fault: Some(Fault::ActorPanicAt { device: 1, step: 2 }),
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(spec(3, 3, 1), opts).await.unwrap();
    let msg = within(cluster.generate(request(&cluster, 5)))
        .await
        .unwrap_err()
        .to_string();
    eprintln!("{msg}");
    assert!(
        msg.contains("device 1") && msg.contains("injected actor panic"),
        "{msg}"
    );
    // Supervision policy: no silent restart; later requests are refused with the reason.
    let msg = within(cluster.generate(request(&cluster, 5)))
        .await
        .unwrap_err()
        .to_string();
    assert!(msg.contains("device 1"), "{msg}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_device_is_named_by_its_compute_watchdog() {
    // Timeouts far above a tiny model's step (milliseconds) even on a loaded machine, and a
    // hang far above the timeouts: only the injected hang can trip them.
    let opts = ClusterOptions {
        stall_timeout: Duration::from_millis(2500),
        compute_timeout: Duration::from_millis(1500),
        ..ClusterOptions::default()
    };
    let hang = Fault::HangAt {
        device: 1,
        step: 2,
        secs: 4,
    };
    let e = failing_run(hang, opts, Duration::from_millis(4500)).await;
    let msg = e.to_string();
    eprintln!("{msg}");
    assert!(
        msg.contains("device 1") && msg.contains("step 2") && msg.contains("compute timeout"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_left_waiting_is_detected_by_the_stall_timer() {
    // The stall timer alone (a huge compute timeout): a wedged device 0 leaves device 1 waiting.
    // A stall timeout far above a tiny model's step even on a loaded machine, a hang above it.
    let opts = ClusterOptions {
        stall_timeout: Duration::from_millis(1500),
        compute_timeout: Duration::from_secs(30),
        fault: Some(Fault::HangAt {
            device: 0,
            step: 2,
            secs: 4,
        }),
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(spec(3, 3, 1), opts).await.unwrap();
    let msg = within(cluster.generate(request(&cluster, 5)))
        .await
        .unwrap_err()
        .to_string();
    eprintln!("{msg}");
    assert!(msg.contains("stalled") && msg.contains("step 2"), "{msg}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_cannot_open_fails_the_start_naming_it() {
    let mut s = spec(2, 2, 1);
    s.nodes[0].devices[1] = DeviceSpec::Cuda {
        ordinal: 0,
        precision: topology::Precision::F32,
    };
    let e = Cluster::start(s, ClusterOptions::default())
        .await
        .err()
        .expect("start must fail");
    let msg = e.to_string();
    eprintln!("{msg}");
    assert!(msg.contains("device 1") && msg.contains("cuda"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_plan_cannot_cut_is_refused_before_it_runs() {
    let cluster = Cluster::start(spec(2, 5, 1), ClusterOptions::default()).await;
    // 8 token rows cannot be cut into 5 strips of ceil(8/5) = 2 rows: refused at start already.
    let msg = cluster.err().expect("refused").to_string();
    eprintln!("{msg}");
    assert!(msg.contains("num_patches"), "{msg}");
}

/// A running request cancelled after its first step ends with `Cancelled` (every device drops it),
/// a queued one is dropped before it starts, and the next request is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_requests_end_and_the_next_one_is_exact() {
    let cluster = Cluster::start(spec(2, 2, 1), ClusterOptions::default())
        .await
        .unwrap();
    let mut long = cluster.submit(request(&cluster, 1000)).await.unwrap();
    let queued = cluster.submit(request(&cluster, 1000)).await.unwrap();
    let first = within(long.progress.recv()).await;
    assert!(
        matches!(first, Some(Progress::Step { step: 0, .. })),
        "{first:?}"
    );
    cluster.cancel(queued.id(), "not needed");
    cluster.cancel_running("the client left");
    let e = within(long.result()).await.unwrap_err();
    assert!(
        matches!(e, ClusterError::Cancelled { .. }) && e.to_string().contains("the client left"),
        "{e}"
    );
    let e = within(queued.result()).await.unwrap_err();
    assert!(e.to_string().contains("not needed"), "{e}");
    next_request_is_exact(&cluster, 2, 2).await;
    cluster.shutdown().await;
}

/// A layout the model cannot take is refused before anything per device is built (issue 16
/// group 3: the in-process network has a link per pair of devices, so 100,000 devices built
/// first would take ~10^10 links).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impossible_layout_is_refused_before_building_devices() {
    let s = ClusterSpec::local_cpu(100_000, 1, ModelSpec::Path(dit_pf()));
    let e = Cluster::start(s, ClusterOptions::default())
        .await
        .err()
        .expect("100,000 stages for 4 layers")
        .to_string();
    assert!(
        e.contains("pipefusion_degree") && e.contains("layers"),
        "{e}"
    );
}
