//! Sequence parallelism (ALGORITHMS.md section 4) on the real blocks: U ranks on threads, each
//! embedding its strip of token rows, running every block with Ulysses or Ring attention over an
//! in-process collective, and applying the head to its rows, give the single-device forward.

mod common;

use kernels::{Device, Tensor};
use model::sp::{local_group, Ring, SequenceAttention, Ulysses, Usp};
use model::{Arch, CondInputs, ModelConfig, Transformer};

fn tiny(arch: Arch) -> ModelConfig {
    ModelConfig {
        sample_size: 16,
        num_layers: 3,
        num_heads: 4,
        ..common::tiny(arch)
    }
}

fn inputs() -> CondInputs {
    CondInputs {
        timesteps: vec![500.0, 20.0],
        class_labels: vec![1, 10],
        caption: Some(model::gaussian(&[2, 5, 12], 3)),
        caption_mask: Some(
            Tensor::from_vec(vec![1., 1., 1., 0., 0., 1., 1., 1., 1., 1.], &[2, 5]).unwrap(),
        ),
        ..Default::default()
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Ulysses,
    Ring,
    /// Ulysses degree U inside, Ring across.
    Usp(usize),
}

/// Runs the group: rank r owns token rows `rows[r]`; returns the outputs concatenated by rows.
fn sequence_parallel(cfg: &ModelConfig, latent: &Tensor, rows: &[usize], kind: Kind) -> Tensor {
    let p = cfg.patch_size;
    let grid_rows = latent.dim(2) / p;
    let outs: Vec<Tensor> = std::thread::scope(|s| {
        let handles: Vec<_> = local_group(rows.len())
            .into_iter()
            .enumerate()
            .map(|(r, comm)| {
                let cfg = cfg.clone();
                let first: usize = rows[..r].iter().sum();
                let n = rows[r];
                s.spawn(move || {
                    let model = Transformer::random(cfg, 7, None, Device::cpu(1).unwrap()).unwrap();
                    let cond = model.conditioning(&inputs()).unwrap();
                    let strip = latent.narrow(2, first * p, n * p).unwrap();
                    let mut x = model.embed(&strip, first, grid_rows).unwrap();
                    let mut attn: Box<dyn SequenceAttention> = match kind {
                        Kind::Ulysses => Box::new(Ulysses::new(comm)),
                        Kind::Ring => Box::new(Ring::new(comm)),
                        Kind::Usp(u) => Box::new(Usp::new(comm, u).unwrap()),
                    };
                    model
                        .run_blocks_sequence_parallel(&mut x, &cond, attn.as_mut(), 0)
                        .unwrap();
                    model.head(&x, &cond, n, latent.dim(3)).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let refs: Vec<&Tensor> = outs.iter().collect();
    Tensor::cat(&refs, 2).unwrap()
}

#[test]
fn ulysses_and_ring_groups_equal_the_single_device_forward() {
    for arch in [Arch::Dit, Arch::PixArt] {
        let cfg = tiny(arch);
        let latent = model::gaussian(&[2, 4, 16, 12], 5); // 8 x 6 tokens
        let model = Transformer::random(cfg.clone(), 7, None, Device::cpu(1).unwrap()).unwrap();
        let want = model.forward(&latent, &inputs()).unwrap();
        for (kind, rows) in [
            (Kind::Ulysses, vec![8]),
            (Kind::Ulysses, vec![4, 4]),
            (Kind::Ulysses, vec![3, 2, 2, 1]),
            (Kind::Ring, vec![5, 3]),
            (Kind::Ring, vec![3, 3, 2]),
            (Kind::Usp(2), vec![2, 2, 2, 2]),
            (Kind::Usp(2), vec![2, 1, 2, 1, 1, 1]),
            (Kind::Usp(4), vec![2, 2, 2, 2]),
        ] {
            let got = sequence_parallel(&cfg, &latent, &rows, kind);
            assert_eq!(got.shape(), want.shape());
            let e = common::max_abs(&got, &want);
            eprintln!("{arch:?} {kind:?} rows {rows:?}: max abs {e:.2e}");
            assert!(e <= 1e-4, "{arch:?} {kind:?} rows {rows:?}: max abs {e}");
        }
    }
}

#[test]
fn ulysses_needs_heads_divisible_by_the_degree() {
    let comm = local_group(3).into_iter().next().unwrap();
    let mut u = Ulysses::new(comm);
    let qkv = Tensor::from_vec(vec![0.0; 2 * 2 * 96], &[2, 2, 96]).unwrap();
    let e = u
        .attend(&Device::cpu(1).unwrap(), 0, &qkv, 4, 8)
        .unwrap_err()
        .to_string();
    assert!(e.contains("multiple of the degree"), "{e}");
}

/// A rank that fails (drops out) makes its peers' next exchange fail naming it, not hang.
#[test]
fn a_rank_that_leaves_is_named_by_the_others() {
    use model::sp::Collective;
    let mut ranks = local_group(3);
    let mut r0 = ranks.remove(0);
    drop(ranks.remove(1)); // rank 2 leaves
    let r1 = ranks.remove(0);
    let t = || Tensor::from_vec(vec![1.0], &[1, 1, 1]).unwrap();
    // Rank 1 is handed back, not dropped, when its call fails: rank 0 must find rank 2 gone,
    // not rank 1 (which, dropped early, would have left too).
    let h = std::thread::spawn(move || {
        let mut r1 = r1;
        let res = r1.all_to_all(vec![t(), t(), t()]);
        (res, r1)
    });
    let e = r0.all_to_all(vec![t(), t(), t()]).unwrap_err().to_string();
    assert!(e.contains("rank 2 left"), "{e}");
    let e1 = h.join().unwrap().0.unwrap_err().to_string();
    assert!(e1.contains("left the group"), "{e1}");
}

/// Rank `rank`'s rows of `rows` cut over `ranks` ranks by the patch rule (ceil rows each, the last
/// the rest).
fn sub_strip(rows: &std::ops::Range<usize>, ranks: usize, rank: usize) -> std::ops::Range<usize> {
    let k = rows.len().div_ceil(ranks);
    rows.start + rank * k..(rows.start + (rank + 1) * k).min(rows.end)
}

/// Sequence parallelism inside PipeFusion (Ulysses, Ring, USP): each rank runs its sub-strip of
/// every patch against a K/V buffer of its head group; a warmup step over the whole image, then a
/// patch step at another timestep (patches see fresh and stale rows), give the single device's
/// patch outputs.
#[test]
fn ranks_with_kv_buffers_equal_one_device_running_patches() {
    for (arch, kind, ranks) in [
        (Arch::Dit, Kind::Ulysses, 2),
        (Arch::PixArt, Kind::Ulysses, 2),
        (Arch::Dit, Kind::Ring, 2),
        (Arch::PixArt, Kind::Ring, 4),
        (Arch::Dit, Kind::Usp(2), 4),
        (Arch::PixArt, Kind::Usp(2), 4),
    ] {
        let cfg = tiny(arch);
        let latent = model::gaussian(&[2, 4, 16, 12], 5); // 8 x 6 tokens
        let (p, cols, grid) = (cfg.patch_size, 6, 8);
        let patches = [0..4, 4..8];
        let steps: [(f32, Vec<std::ops::Range<usize>>); 2] =
            [(700.0, vec![0..8]), (300.0, patches.to_vec())];
        let inputs_at = |t: f32| CondInputs {
            timesteps: vec![t; 2],
            ..inputs()
        };
        // One device.
        let model = Transformer::random(cfg.clone(), 7, None, Device::cpu(1).unwrap()).unwrap();
        let mut kv = model.kv_buffer(2, grid * cols).unwrap();
        let mut want = Vec::new();
        for (t, parts) in &steps {
            let cond = model.conditioning(&inputs_at(*t)).unwrap();
            for rows in parts {
                let strip = latent.narrow(2, rows.start * p, rows.len() * p).unwrap();
                let mut x = model.embed(&strip, rows.start, grid).unwrap();
                model
                    .run_blocks_with_kv(&mut x, &cond, &mut kv, rows.start * cols)
                    .unwrap();
                want.push(x);
            }
        }
        // The ranks, each its share of every part's rows (the patch rule: 4 rows over 4 ranks
        // are 1 each).
        let u = match kind {
            Kind::Ulysses => ranks,
            Kind::Ring => 1,
            Kind::Usp(u) => u,
        };
        let got: Vec<Vec<Tensor>> = std::thread::scope(|s| {
            let handles: Vec<_> = local_group(ranks)
                .into_iter()
                .enumerate()
                .map(|(rank, comm)| {
                    let (cfg, steps, latent) = (cfg.clone(), steps.clone(), &latent);
                    s.spawn(move || {
                        let model =
                            Transformer::random(cfg, 7, None, Device::cpu(1).unwrap()).unwrap();
                        let mut kv = model.kv_buffer_for_heads(2, grid * cols, u).unwrap();
                        let mut attn: Box<dyn SequenceAttention> = match kind {
                            Kind::Ulysses => Box::new(Ulysses::new(comm)),
                            Kind::Ring => Box::new(Ring::new(comm)),
                            Kind::Usp(u) => Box::new(Usp::new(comm, u).unwrap()),
                        };
                        let mut outs = Vec::new();
                        for (t, parts) in &steps {
                            let cond = model.conditioning(&inputs_at(*t)).unwrap();
                            for rows in parts {
                                let sub = sub_strip(rows, ranks, rank);
                                let strip = latent.narrow(2, sub.start * p, sub.len() * p).unwrap();
                                let mut x = model.embed(&strip, sub.start, grid).unwrap();
                                model
                                    .run_blocks_sequence_parallel_with_kv(
                                        &mut x,
                                        &cond,
                                        attn.as_mut(),
                                        &mut kv,
                                        rows.start * cols,
                                        rows.len() * cols,
                                        sub.start * cols,
                                    )
                                    .unwrap();
                                outs.push(x);
                            }
                        }
                        outs
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, w) in want.iter().enumerate() {
            let parts: Vec<&Tensor> = got.iter().map(|g| &g[i]).collect();
            let joined = Tensor::cat(&parts, 1).unwrap();
            let e = common::max_abs(&joined, w);
            eprintln!("{arch:?} {kind:?} x {ranks} call {i}: max abs {e:.2e}");
            assert!(
                e <= 1e-5,
                "{arch:?} {kind:?} x {ranks} call {i}: max abs {e}"
            );
        }
    }
}
