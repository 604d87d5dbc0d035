//! Resuming a request from its checkpoint (issue 15): the coordinator keeps the latent and the
//! sampler history after every step; a continuation from there on the devices that remain
//! finishes the request. Here the interruption is injected (`Fault::ResumeAfter`) so the whole
//! path (checkpoints from every last stage, their assembly under sequence parallelism,
//! continuation, progress, summary) runs in one process; the multi-node tests lose real nodes.
//! Exact modes (every step synchronous, sequence and CFG parallel) must give the uninterrupted
//! result; a stale PipeFusion run gets one more synchronous step and its drift is measured.

mod common;

use std::time::Duration;

use actors::{Cluster, ClusterOptions, Fault, GenerateRequest, Progress};
use common::*;
use model::sampler::Scheduler;
use topology::{ClusterSpec, ModelSpec};

/// `stages` pipeline stages x `ulysses` x `cfg` devices over dit_pf (4 layers, 8 token rows).
fn spec(stages: usize, ulysses: usize, cfg: usize, patches: usize, warmup: usize) -> ClusterSpec {
    let mut s = ClusterSpec::local_cpu(stages * ulysses * cfg, 1, ModelSpec::Path(dit_pf()));
    s.parallel.pipefusion_degree = stages;
    s.parallel.ulysses_degree = ulysses;
    s.parallel.cfg_degree = cfg;
    s.parallel.num_patches = patches;
    s.parallel.warmup_steps = warmup;
    s
}

struct Resumed {
    latent: kernels::Tensor,
    uninterrupted: kernels::Tensor,
    steps_done: usize,
}

/// Runs `req` with an interruption after step `after` (the fault fires in the first request),
/// then the same request uninterrupted on the same cluster.
async fn resumed_and_uninterrupted(
    spec: ClusterSpec,
    steps: usize,
    sched: &str,
    after: usize,
) -> Resumed {
    let opts = ClusterOptions {
        fault: Some(Fault::ResumeAfter { step: after }),
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(spec, opts).await.unwrap();
    let mut req = GenerateRequest::class_conditional(&cluster, vec![3, 7], steps, 4.0, 11).unwrap();
    req.scheduler = Scheduler::named(sched).unwrap();
    let mut handle = cluster.submit(req.clone()).await.unwrap();
    let mut events = Vec::new();
    let out = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(p) = handle.progress.recv().await {
            events.push(p);
        }
        handle.result().await
    })
    .await
    .expect("the cluster hung")
    .expect("the resumed request finished");
    // Progress: steps up to the interruption, one Resumed, then the rest from the checkpoint.
    let at = events
        .iter()
        .position(|p| matches!(p, Progress::Resumed { .. }))
        .expect("a Resumed event");
    let Progress::Resumed { steps_done, reason } = &events[at] else {
        unreachable!()
    };
    assert!(reason.contains("ResumeAfter"), "{reason}");
    assert!(
        *steps_done <= after + 1,
        "checkpoint after {steps_done} steps, interrupted after step {after}"
    );
    let step = |p: &Progress| match p {
        Progress::Step { step, .. } => *step,
        other => panic!("unexpected {other:?}"),
    };
    let before: Vec<usize> = events[..at].iter().map(step).collect();
    let later: Vec<usize> = events[at + 1..].iter().map(step).collect();
    assert_eq!(before, (0..=after).collect::<Vec<_>>());
    assert_eq!(later, (*steps_done..steps).collect::<Vec<_>>());
    assert_eq!(out.summary.resumes.len(), 1);
    assert_eq!(out.summary.resumes[0].steps_done, *steps_done);
    assert!(
        out.summary.to_string().contains("resumed after step"),
        "{}",
        out.summary
    );
    let again = cluster.generate(req).await.unwrap();
    assert!(again.summary.resumes.is_empty());
    cluster.shutdown().await;
    Resumed {
        latent: out.latent,
        uninterrupted: again.latent,
        steps_done: *steps_done,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_modes_resume_to_the_uninterrupted_result() {
    let steps = 6;
    // (name, stages, ulysses, cfg, patches, warmup, scheduler). PipeFusion with one patch is
    // exact too (ALGORITHMS.md section 2): under Ulysses its patch steps leave each rank only
    // its sub-strip up to date, so the checkpoint is assembled from both ranks' rows.
    for (name, n, u, c, m, w, sched) in [
        ("pipefusion W=T, DDIM", 2, 1, 1, 4, steps, "ddim"),
        (
            "pipefusion W=T, DPM-Solver++ (history)",
            2,
            1,
            1,
            4,
            steps,
            "dpm",
        ),
        (
            "ulysses 2 inside 2 stages, W=T, DPM-Solver++",
            2,
            2,
            1,
            2,
            steps,
            "dpm",
        ),
        (
            "ulysses 2 inside 2 stages, M=1 W=1, DPM-Solver++",
            2,
            2,
            1,
            1,
            1,
            "dpm",
        ),
        ("cfg 2 x 2 stages, DDIM", 2, 1, 2, 2, steps, "ddim"),
        ("ulysses 2 alone, flow", 1, 2, 1, 1, steps, "flow"),
    ] {
        let r = resumed_and_uninterrupted(spec(n, u, c, m, w), steps, sched, 2).await;
        let e = rel_l2(&r.latent, &r.uninterrupted);
        eprintln!(
            "{name}: resumed after {} steps, rel L2 {e:.2e} vs uninterrupted",
            r.steps_done
        );
        assert!(e <= 1e-5, "{name}: {e:.3e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_pipefusion_run_resumes_with_one_more_synchronous_step() {
    // W = 1 of 8 steps, 4 patches: after the interruption the continuation's first step runs
    // synchronously (its K/V buffers are empty), which the uninterrupted run did not: a small
    // drift, measured against the drift of stale PipeFusion itself (vs W = T).
    let steps = 8;
    let r = resumed_and_uninterrupted(spec(2, 1, 1, 4, 1), steps, "ddim", 3).await;
    let exact = resumed_and_uninterrupted(spec(2, 1, 1, 4, steps), steps, "ddim", 3).await;
    let drift = rel_l2(&r.latent, &r.uninterrupted);
    let stale = rel_l2(&r.uninterrupted, &exact.uninterrupted);
    eprintln!(
        "stale PipeFusion: resume drift {drift:.2e} rel L2; stale vs synchronous {stale:.2e}"
    );
    assert!(drift > 0.0, "one more synchronous step changes the numbers");
    assert!(
        drift <= stale,
        "the resume drift {drift:.3e} exceeds PipeFusion's own staleness {stale:.3e}"
    );
}

/// Interrupted after its last step (the loss comes before the stages' final reports): the last
/// checkpoint is the result, nothing runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interruption_after_the_last_step_answers_from_the_checkpoint() {
    let steps = 5;
    for sched in ["ddim", "dpm"] {
        let r = resumed_and_uninterrupted(spec(2, 1, 1, 2, 1), steps, sched, steps - 1).await;
        assert_eq!(
            r.steps_done, steps,
            "{sched}: the checkpoint after the last step"
        );
        assert_eq!(rel_l2(&r.latent, &r.uninterrupted), 0.0, "{sched}");
    }
}
