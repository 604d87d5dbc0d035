//! The building blocks of sequence parallelism (ALGORITHMS.md section 4), checked against the
//! dense attention they replace: Ring attention = attention over key blocks, each with its
//! log-sum-exp, merged in any order; Ulysses = an all-to-all from token shards to head shards and
//! back around attention on the full sequence.

use kernels::reference::merge_partial_slow;
use kernels::{AttnView, Device, Tensor};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn randn(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.random::<f32>() - 0.5) * scale)
        .collect()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `[batch, seq, width]` tensors q, k, v with random values.
fn qkv(seed: u64, batch: usize, sq: usize, sk: usize, width: usize) -> [Tensor; 3] {
    let mut rng = StdRng::seed_from_u64(seed);
    let t = |rng: &mut StdRng, s: usize| {
        Tensor::from_vec(randn(rng, batch * s * width, 4.0), &[batch, s, width]).unwrap()
    };
    [t(&mut rng, sq), t(&mut rng, sk), t(&mut rng, sk)]
}

/// Attention of all of `q` over keys `range` of `k`/`v`, with its log-sum-exp.
fn block(
    dev: &Device,
    [q, k, v]: &[Tensor; 3],
    range: std::ops::Range<usize>,
    bias: Option<&[f32]>,
    heads: usize,
) -> (Tensor, Tensor) {
    let (batch, width) = (q.dim(0), q.dim(2));
    let kb = k.narrow(1, range.start, range.len()).unwrap();
    let vb = v.narrow(1, range.start, range.len()).unwrap();
    let bias = bias.map(|b| {
        let sk = k.dim(1);
        let rows: Vec<f32> = (0..batch)
            .flat_map(|i| b[i * sk + range.start..i * sk + range.end].to_vec())
            .collect();
        Tensor::from_vec(rows, &[batch, range.len()]).unwrap()
    });
    dev.attention_with_lse(
        AttnView::of(q, 0).unwrap(),
        AttnView::of(&kb, 0).unwrap(),
        AttnView::of(&vb, 0).unwrap(),
        bias.as_ref(),
        batch,
        heads,
        width / heads,
    )
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// Ring attention over R blocks (uneven sizes, merged starting at any rank, as the ring
    /// delivers them) equals dense attention, and so does its log-sum-exp.
    #[test]
    fn ring_blocks_merge_to_dense_attention(
        seed in 0u64..1000,
        sq in 1usize..40,
        cuts in proptest::collection::vec(1usize..30, 1..5),
        start in 0usize..4,
        masked_block in proptest::option::of(0usize..4),
    ) {
        let (batch, heads, dh) = (2, 2, 8);
        let sk: usize = cuts.iter().sum();
        let data = qkv(seed, batch, sq, sk, heads * dh);
        let dev = Device::cpu(1).unwrap();
        let mut bounds = vec![0];
        for c in &cuts {
            bounds.push(bounds.last().unwrap() + c);
        }
        let blocks: Vec<std::ops::Range<usize>> =
            bounds.windows(2).map(|w| w[0]..w[1]).collect();
        // Optionally mask every key of one block (a PipeFusion buffer part never written).
        let mut bias = vec![0f32; batch * sk];
        if let Some(mb) = masked_block.filter(|&m| m < blocks.len() && blocks.len() > 1) {
            for b in 0..batch {
                for c in blocks[mb].clone() {
                    bias[b * sk + c] = f32::NEG_INFINITY;
                }
            }
        }
        let (want, want_lse) = block(&dev, &data, 0..sk, Some(&bias), heads);
        let r = blocks.len();
        let order: Vec<usize> = (0..r).map(|i| (start + i) % r).collect();
        let (mut acc, mut acc_lse) = block(&dev, &data, blocks[order[0]].clone(), Some(&bias), heads);
        for &i in &order[1..] {
            let (part, part_lse) = block(&dev, &data, blocks[i].clone(), Some(&bias), heads);
            let (slow, slow_lse) = merge_partial_slow(
                acc.as_f32().unwrap(),
                acc_lse.as_f32().unwrap(),
                part.as_f32().unwrap(),
                part_lse.as_f32().unwrap(),
                dh,
            );
            dev.merge_attention_(&mut acc, &mut acc_lse, &part, &part_lse, heads).unwrap();
            prop_assert!(max_abs(acc.as_f32().unwrap(), &slow) <= 1e-5);
            prop_assert!(max_abs(acc_lse.as_f32().unwrap(), &slow_lse) <= 1e-4);
        }
        let e = max_abs(acc.as_f32().unwrap(), want.as_f32().unwrap());
        prop_assert!(e <= 2e-5, "R={r}: max abs {e}");
        let el = max_abs(acc_lse.as_f32().unwrap(), want_lse.as_f32().unwrap());
        prop_assert!(el <= 1e-4, "R={r}: lse max abs {el}");
    }
}

#[test]
fn merging_a_fully_masked_block_changes_nothing() {
    let (batch, heads, dh, s) = (1, 2, 4, 6);
    let data = qkv(3, batch, s, s, heads * dh);
    let dev = Device::cpu(1).unwrap();
    let (mut acc, mut lse) = block(&dev, &data, 0..3, None, heads);
    let before = (
        acc.as_f32().unwrap().to_vec(),
        lse.as_f32().unwrap().to_vec(),
    );
    let masked = vec![f32::NEG_INFINITY; batch * s];
    let (part, part_lse) = block(&dev, &data, 3..6, Some(&masked), heads);
    assert!(part_lse
        .as_f32()
        .unwrap()
        .iter()
        .all(|l| *l == f32::NEG_INFINITY));
    dev.merge_attention_(&mut acc, &mut lse, &part, &part_lse, heads)
        .unwrap();
    assert_eq!(acc.as_f32().unwrap(), &before.0[..]);
    assert_eq!(lse.as_f32().unwrap(), &before.1[..]);
}

#[test]
fn merge_refuses_mismatched_shapes() {
    let dev = Device::cpu(1).unwrap();
    let mut a = Tensor::from_vec(vec![0.0; 8], &[1, 1, 8]).unwrap();
    let mut al = Tensor::from_vec(vec![0.0; 2], &[1, 1, 2]).unwrap();
    let p = Tensor::from_vec(vec![0.0; 4], &[1, 1, 4]).unwrap();
    let pl = Tensor::from_vec(vec![0.0; 2], &[1, 1, 2]).unwrap();
    assert!(dev.merge_attention_(&mut a, &mut al, &p, &pl, 2).is_err());
    let p = Tensor::from_vec(vec![0.0; 8], &[1, 1, 8]).unwrap();
    assert!(dev.merge_attention_(&mut a, &mut al, &p, &pl, 3).is_err());
}

/// Ulysses over U ranks: token shards -> all-to-all -> attention on each head group over the
/// whole sequence -> all-to-all back equals dense attention of every rank's tokens.
#[test]
fn ulysses_all_to_all_around_attention_equals_dense_attention() {
    use kernels::ulysses::{concat_heads, concat_tokens, split_heads, split_tokens};
    let (batch, heads, dh) = (2, 4, 8);
    let dev = Device::cpu(1).unwrap();
    for (u, shard_lens) in [(1, vec![7]), (2, vec![5, 4]), (4, vec![3, 3, 3, 2])] {
        let s: usize = shard_lens.iter().sum();
        let [q, k, v] = qkv(u as u64, batch, s, s, heads * dh);
        let dense = dev
            .attention(
                AttnView::of(&q, 0).unwrap(),
                AttnView::of(&k, 0).unwrap(),
                AttnView::of(&v, 0).unwrap(),
                None,
                batch,
                heads,
                dh,
            )
            .unwrap();
        // Each rank's token shard of q, k, v.
        let shard = |t: &Tensor, r: usize| {
            let start: usize = shard_lens[..r].iter().sum();
            t.narrow(1, start, shard_lens[r]).unwrap()
        };
        // All-to-all 1: sent[r][j] = rank r's part for rank j.
        let to_heads = |t: &Tensor| -> Vec<Tensor> {
            let sent: Vec<Vec<Tensor>> = (0..u)
                .map(|r| split_heads(&shard(t, r), heads, u).unwrap())
                .collect();
            (0..u)
                .map(|j| {
                    let got: Vec<Tensor> = (0..u).map(|r| sent[r][j].clone()).collect();
                    concat_tokens(&got).unwrap()
                })
                .collect()
        };
        let (qh, kh, vh) = (to_heads(&q), to_heads(&k), to_heads(&v));
        let local: Vec<Tensor> = (0..u)
            .map(|j| {
                dev.attention(
                    AttnView::of(&qh[j], 0).unwrap(),
                    AttnView::of(&kh[j], 0).unwrap(),
                    AttnView::of(&vh[j], 0).unwrap(),
                    None,
                    batch,
                    heads / u,
                    dh,
                )
                .unwrap()
            })
            .collect();
        // All-to-all 2: back to token shards.
        let back: Vec<Vec<Tensor>> = local
            .iter()
            .map(|y| split_tokens(y, &shard_lens).unwrap())
            .collect();
        for r in 0..u {
            let got: Vec<Tensor> = (0..u).map(|j| back[j][r].clone()).collect();
            let out = concat_heads(&got).unwrap();
            let e = max_abs(out.as_f32().unwrap(), shard(&dense, r).as_f32().unwrap());
            assert!(e <= 1e-6, "U={u} rank {r}: max abs {e}");
        }
    }
    let x = Tensor::from_vec(vec![0.0; 2 * 3 * 24], &[2, 3, 24]).unwrap();
    let e = kernels::ulysses::split_heads(&x, 3, 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("multiple of the degree"), "{e}");
}
