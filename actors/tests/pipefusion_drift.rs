//! How far PipeFusion's stale K/V drift the result from serial, for the typical settings of
//! ALGORITHMS.md §2 (N = 2..4, M = N..2N, W = 1, 20 steps) on the diffusers-initialised DiT fixture
//! (`dit_pf`: 4 layers, 8x8 tokens, DDIM, guidance 4). The result depends only on M and W (tested
//! in pipefusion_exact.rs), so each M is run once with N = min(M, 4) stages.
//!
//! The bounds are the values measured on 2026-11-25 (BENCHMARKS.md, "PipeFusion drift") with a
//! 1.5x margin on relative L2 and 3 dB on PSNR; rerun with
//! `cargo test -p actors --test pipefusion_drift -- --nocapture` to print the table.

mod common;

use common::*;
use model::sampler::Scheduler;
use model::{ModelConfig, Request, Transformer};

/// (M, measured relative L2, measured PSNR dB) at W = 1, T = 20.
const MEASURED: [(usize, f64, f64); 4] = [
    (2, 3.406e-2, 45.0),
    (3, 3.982e-2, 43.7),
    (4, 4.270e-2, 43.1),
    (8, 4.762e-2, 42.1),
];

#[test]
fn drift_of_typical_settings_is_measured_and_bounded() {
    let dir = dit_pf().join("transformer");
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let sched = Scheduler::from_file(&dit_pf().join("scheduler/scheduler_config.json")).unwrap();
    let req = Request {
        class_labels: vec![3, 7],
        caption: None,
        guidance_scale: 4.0,
        latent_size: [16, 16],
        embedded_guidance: None,
    };
    let noise = model::gaussian(&[2, 4, 16, 16], 2026);
    let steps = 20;
    let full = Transformer::load(&dir, None, cpu()).unwrap();
    let want = serial(&full, &setup(&cfg, &req, &sched, steps, &noise, 1, steps));
    eprintln!("M  N  W  rel_L2      PSNR_dB");
    for (m, l2_measured, psnr_measured) in MEASURED {
        let n = m.min(4);
        let s = setup(&cfg, &req, &sched, steps, &noise, m, 1);
        let mut st = stages(4, n, |r| Transformer::load(&dir, Some(r), cpu()).unwrap());
        let got = pipefusion(&mut st, &s);
        let (e, p) = (rel_l2(&got, &want), psnr(&got, &want));
        eprintln!("{m}  {n}  1  {e:.3e}  {p:.1}");
        assert!(e > 0.0, "M={m}, W=1 cannot equal serial exactly");
        assert!(
            e <= 1.5 * l2_measured,
            "M={m}: rel L2 {e:.3e} above the bound {:.3e}",
            1.5 * l2_measured
        );
        assert!(
            p >= psnr_measured - 3.0,
            "M={m}: PSNR {p:.1} dB below the bound {:.1}",
            psnr_measured - 3.0
        );
    }
    // Context for BENCHMARKS.md (not bounded here): how warmup trades speed for drift at M = 4.
    for w in [0, 2, 4] {
        let s = setup(&cfg, &req, &sched, steps, &noise, 4, w);
        let mut st = stages(4, 4, |r| Transformer::load(&dir, Some(r), cpu()).unwrap());
        let got = pipefusion(&mut st, &s);
        eprintln!(
            "4  4  {w}  {:.3e}  {:.1}",
            rel_l2(&got, &want),
            psnr(&got, &want)
        );
    }
}
