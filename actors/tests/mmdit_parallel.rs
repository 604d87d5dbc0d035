//! SD3 and Flux (MMDiT) under the parallel methods (issue 13; semantics in ARCHITECTURE.md "MMDiT
//! under PipeFusion"): every part carries the prompt tokens, the K/V buffers hold image and prompt
//! rows. Exact modes equal the serial run (PipeFusion with W = T, one patch, CFG parallel);
//! stale PipeFusion's drift is measured and bounded; the actor runtime reproduces the in-order
//! reference bitwise and sends what the plan predicts.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actors::stage::RequestSetup;
use actors::{Cluster, ClusterOptions, GenerateRequest};
use common::*;
use kernels::Tensor;
use model::sampler::Scheduler;
use model::{Caption, ModelConfig, Request, Transformer};
use topology::{ClusterSpec, ModelSpec};

/// `model/tests/fixtures/{name}_pipeline` (tools/fixtures_flow_pipelines.py).
fn pipeline(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../model/tests/fixtures/{name}_pipeline"))
}

fn tensors(path: PathBuf) -> std::collections::HashMap<String, Tensor> {
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let data = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (name, Tensor::from_vec(data, v.shape()).unwrap())
        })
        .collect()
}

/// The fixture's guided request: SD3 with CFG 5; Flux-dev with its embedded guidance 3.5 and
/// true CFG 2 (both with negative prompt and pooled embeddings).
fn request(name: &str) -> (Request, Tensor) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures");
    let mut p = tensors(dir.join(format!("{name}_prompt.safetensors")));
    let noise = tensors(dir.join(format!("{name}_noise.safetensors")))
        .remove("latents")
        .unwrap();
    let mut take = |k: &str| p.remove(k).unwrap();
    let caption = Caption {
        embeds: take("prompt_embeds"),
        mask: None,
        pooled: Some(take("pooled_prompt_embeds")),
        negative: Some((take("negative_prompt_embeds"), None)),
        negative_pooled: Some(take("negative_pooled_prompt_embeds")),
    };
    let flux = name == "flux";
    let req = Request {
        class_labels: vec![],
        caption: Some(caption),
        guidance_scale: if flux { 2.0 } else { 5.0 },
        latent_size: [noise.dim(2), noise.dim(3)],
        embedded_guidance: flux.then_some(3.5),
    };
    (req, noise)
}

struct Model {
    dir: PathBuf,
    cfg: ModelConfig,
    sched: Scheduler,
    req: Request,
    noise: Tensor,
}

fn model(name: &str) -> Model {
    let p = pipeline(name);
    let (req, noise) = request(name);
    Model {
        cfg: ModelConfig::from_dir(&p.join("transformer")).unwrap(),
        sched: Scheduler::from_file(&p.join("scheduler/scheduler_config.json")).unwrap(),
        dir: p.join("transformer"),
        req,
        noise,
    }
}

impl Model {
    fn setup(&self, steps: usize, m: usize, w: usize) -> Arc<RequestSetup> {
        setup(&self.cfg, &self.req, &self.sched, steps, &self.noise, m, w)
    }
    fn load(&self) -> impl FnMut(std::ops::Range<usize>) -> Transformer + '_ {
        |r| Transformer::load(&self.dir, Some(r), cpu()).unwrap()
    }
    fn serial(&self, steps: usize) -> Tensor {
        let full = Transformer::load(&self.dir, None, cpu()).unwrap();
        serial(&full, &self.setup(steps, 1, steps))
    }
}

#[test]
fn exact_modes_equal_the_serial_run() {
    for name in ["sd3", "flux"] {
        let m = model(name);
        let layers = m.cfg.num_layers;
        let want = m.serial(4);
        let check = |what: String, got: Tensor| {
            let e = rel_l2(&got, &want);
            eprintln!("{name} {what}: rel L2 {e:.2e} vs serial");
            assert!(e <= 1e-5, "{name} {what}: rel L2 {e:.3e} vs serial");
        };
        let rows = m.noise.dim(2) / m.cfg.patch_size;
        for n in [2, layers] {
            for patches in [2, rows] {
                // W = T: every step is a whole-image step.
                let got = pipefusion(&mut stages(layers, n, m.load()), &m.setup(4, patches, 4));
                check(format!("N={n} M={patches} W=T"), got);
            }
            // M = 1: one patch is the whole image, whatever W.
            let got = pipefusion(&mut stages(layers, n, m.load()), &m.setup(4, 1, 0));
            check(format!("N={n} M=1 W=0"), got);
            // CFG parallel: two groups of N stages, W = T.
            let one = m.setup(4, 2, 4);
            let got = cfg_pipefusion(layers, n, m.load(), split_cfg(&one, &m.cfg));
            check(format!("cfg 2 x N={n} M=2 W=T"), got);
        }
        // CFG parallel with stale patches equals PipeFusion on one group of the doubled batch.
        let one = m.setup(4, 2, 1);
        let a = pipefusion(&mut stages(layers, 2, m.load()), &one);
        let b = cfg_pipefusion(layers, 2, m.load(), split_cfg(&one, &m.cfg));
        let e = rel_l2(&a, &b);
        assert!(e <= 1e-5, "{name} cfg 2 x pf 2, W=1: {e:.3e} vs one group");
    }
}

/// Stale PipeFusion (W = 1, M = 2 and one patch per token row, N = 2) drifts from the serial run; the drift is
/// printed and bounded. Bound: relative L2 <= 0.1 over 8 steps on these tiny random models (the
/// measured values are printed; see BENCHMARKS.md "MMDiT").
#[test]
fn stale_pipefusion_drift_is_measured_and_bounded() {
    for name in ["sd3", "flux"] {
        let m = model(name);
        let layers = m.cfg.num_layers;
        let want = m.serial(8);
        let rows = m.noise.dim(2) / m.cfg.patch_size;
        for patches in [2, rows] {
            let got = pipefusion(&mut stages(layers, 2, m.load()), &m.setup(8, patches, 1));
            let e = rel_l2(&got, &want);
            eprintln!("{name} N=2 M={patches} W=1, 8 steps: drift rel L2 {e:.3e} vs serial");
            assert!(e > 0.0, "{name}: stale K/V must change the result");
            assert!(e <= 0.1, "{name} M={patches}: drift {e:.3e}");
        }
    }
}

fn spec(dir: PathBuf, cfg: usize, n: usize, m: usize, w: usize) -> ClusterSpec {
    let mut s = ClusterSpec::local_cpu(cfg * n, 1, ModelSpec::Path(dir));
    s.parallel.cfg_degree = cfg;
    s.parallel.pipefusion_degree = n;
    s.parallel.num_patches = m;
    s.parallel.warmup_steps = w;
    s
}

/// The actor runtime (in-process cluster) reproduces the in-order references bitwise: SD3 on
/// CFG 2 x PipeFusion 2, Flux on PipeFusion 3 with true CFG in the batch; and the last stage's
/// bytes are its latent rows, a hidden stage's are the plan's (each part: image rows + prompt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_reproduces_the_in_order_reference() {
    for (name, cfg_degree, n) in [("sd3", 2, 2), ("flux", 1, 3)] {
        let m = model(name);
        let (patches, warmup, steps) = (2, 1, 4);
        let cluster = Cluster::start(
            spec(pipeline(name), cfg_degree, n, patches, warmup),
            ClusterOptions::default(),
        )
        .await
        .unwrap();
        let req = GenerateRequest {
            request: m.req.clone(),
            steps,
            scheduler: cluster.model().default_scheduler().unwrap(),
            noise: m.noise.clone(),
        };
        let plan = cluster.plan(&req).unwrap();
        let out = tokio::time::timeout(Duration::from_secs(60), cluster.generate(req.clone()))
            .await
            .expect("the cluster hung")
            .unwrap();
        let one = m.setup(steps, patches, warmup);
        let want = match cfg_degree {
            1 => pipefusion(&mut stages(m.cfg.num_layers, n, m.load()), &one),
            _ => cfg_pipefusion(m.cfg.num_layers, n, m.load(), split_cfg(&one, &m.cfg)),
        };
        assert_eq!(
            out.latent.as_f32().unwrap(),
            want.as_f32().unwrap(),
            "{name}: cluster vs in-order reference"
        );
        // Stage 0 of group 0 sends hidden states: per patch step each part's image rows plus
        // the prompt tokens (the plan's figure), per warmup step the whole image plus them once.
        let t = one.prepared.text_tokens() as u64;
        let per_patch_step = plan
            .link_bytes()
            .iter()
            .find(|l| l.from == 0 && matches!(l.kind, topology::LinkKind::Hidden))
            .unwrap()
            .bytes_per_step;
        let b = (one.forward_of(0).unwrap().forward_batch() * m.cfg.hidden() * 4) as u64;
        let warm = per_patch_step - (patches as u64 - 1) * t * b;
        let predicted = per_patch_step * (steps - warmup) as u64 + warm * warmup as u64;
        let sent = out.summary.devices[0].bytes_sent;
        assert!(
            sent >= predicted && sent <= predicted + 8192,
            "{name}: stage 0 sent {sent} bytes, predicted {predicted}"
        );
        cluster.shutdown().await;
    }
}

/// Ulysses, Ring and CFG x Ulysses over the joint sequence through the actor runtime (one rank
/// of each group holds the prompt tokens) equal the serial run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequence_parallel_over_the_joint_sequence_through_the_cluster() {
    for (name, cfg_degree, u, r) in [
        ("sd3", 1, 2, 1),
        ("sd3", 2, 1, 2),
        ("flux", 1, 1, 3),
        ("flux", 2, 2, 1),
    ] {
        let m = model(name);
        let mut s = spec(pipeline(name), cfg_degree, 1, 1, 1);
        s = ClusterSpec::local_cpu(cfg_degree * u * r, 1, s.model.clone());
        s.parallel.pipefusion_degree = 1;
        s.parallel.cfg_degree = cfg_degree;
        s.parallel.ulysses_degree = u;
        s.parallel.ring_degree = r;
        s.parallel.num_patches = 1;
        let (cluster, out) = run(s, &m, 4).await;
        assert_eq!(out.summary.devices.len(), cfg_degree * u * r);
        assert!(out.summary.devices.iter().all(|d| d.bytes_sent > 0));
        let e = rel_l2(&out.latent, &m.serial(4));
        eprintln!("{name} cfg {cfg_degree} ulysses {u} ring {r}: rel L2 {e:.2e} vs serial");
        assert!(
            e <= 1e-5,
            "{name} cfg {cfg_degree} ulysses {u} ring {r}: {e:.3e}"
        );
        cluster.shutdown().await;
    }
}

/// Sequence parallelism inside PipeFusion stages (each part cut into sub-strips, the prompt on
/// the rank at its end of the part, every rank a full-sequence buffer of its head group) equals
/// plain PipeFusion with the same patches and warmup (the in-order reference), stale steps
/// included: SD3 pf 2 x Ulysses 2 (M = 2), SD3 pf 2 x USP 2x2 (M = 1), Flux pf 2 x Ring 2
/// (M = 1, uneven sub-strips), Flux cfg 2 x pf 2 x Ulysses 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequence_parallel_inside_pipefusion_equals_plain_pipefusion() {
    for (name, cfg_degree, u, r, patches) in [
        ("sd3", 1, 2, 1, 2),
        ("sd3", 1, 2, 2, 1),
        ("flux", 1, 1, 2, 1),
        ("flux", 2, 2, 1, 1),
    ] {
        let m = model(name);
        let (n, warmup, steps) = (2, 1, 4);
        let devices = cfg_degree * n * u * r;
        let mut s = ClusterSpec::local_cpu(devices, 1, ModelSpec::Path(pipeline(name)));
        s.parallel.pipefusion_degree = n;
        s.parallel.cfg_degree = cfg_degree;
        s.parallel.ulysses_degree = u;
        s.parallel.ring_degree = r;
        s.parallel.num_patches = patches;
        s.parallel.warmup_steps = warmup;
        let (cluster, out) = run(s, &m, steps).await;
        assert_eq!(out.summary.devices.len(), devices);
        let want = pipefusion(
            &mut stages(m.cfg.num_layers, n, m.load()),
            &m.setup(steps, patches, warmup),
        );
        let e = rel_l2(&out.latent, &want);
        eprintln!("{name} cfg {cfg_degree} x pf {n} x U {u} x R {r}, M={patches}: rel L2 {e:.2e} vs plain PipeFusion");
        assert!(
            e <= 1e-5,
            "{name} cfg {cfg_degree} U {u} R {r} M {patches}: {e:.3e}"
        );
        cluster.shutdown().await;
    }
}

/// Starts a cluster for `spec` and runs `m`'s request for `steps` steps on it (the pipeline's
/// own scheduler).
async fn run(spec: ClusterSpec, m: &Model, steps: usize) -> (Cluster, actors::GenerateOutput) {
    let cluster = Cluster::start(spec, ClusterOptions::default())
        .await
        .unwrap();
    let req = GenerateRequest {
        request: m.req.clone(),
        steps,
        scheduler: cluster.model().default_scheduler().unwrap(),
        noise: m.noise.clone(),
    };
    let out = tokio::time::timeout(Duration::from_secs(60), cluster.generate(req))
        .await
        .expect("the cluster hung")
        .unwrap();
    (cluster, out)
}
