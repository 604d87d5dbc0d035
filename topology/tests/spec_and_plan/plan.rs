//! `Plan::new` checks that need the model, the patch and layer splits, link bytes, `describe`.

use proptest::prelude::*;
use topology::{
    patch_rows, split_layers, ClusterSpec, LinkBytes, LinkKind, ModelShape, ModelSpec, Plan,
};

use crate::{edit, parse, plan_error, shape};

#[test]
fn plan_rejects_more_stages_than_layers() {
    let (field, line, shown) = plan_error(&edit(&[]), &shape(1, 8));
    assert_eq!(
        (field.as_str(), line),
        ("parallel.pipefusion_degree", Some(7)),
        "{shown}"
    );
    assert!(shown.contains("only 1 layers"), "{shown}");
}

#[test]
fn plan_rejects_layer_split_with_wrong_sum() {
    let (field, line, shown) = plan_error(&edit(&[(10, "layer_split = [2, 2]")]), &shape(3, 8));
    assert_eq!(
        (field.as_str(), line),
        ("parallel.layer_split", Some(10)),
        "{shown}"
    );
    assert!(
        shown.contains("sums to 4") && shown.contains("3 layers"),
        "{shown}"
    );
}

#[test]
fn plan_uses_explicit_layer_split() {
    let spec = parse(&edit(&[(10, "layer_split = [1, 2]")])).unwrap();
    let plan = Plan::new(&spec, &shape(3, 8)).unwrap();
    assert_eq!(plan.stages[0].layers, 0..1);
    assert_eq!(plan.stages[1].layers, 1..3);
}

#[test]
fn plan_rejects_patches_that_do_not_fit() {
    let (field, line, shown) = plan_error(&edit(&[(8, "num_patches = 5")]), &shape(4, 8));
    assert_eq!(
        (field.as_str(), line),
        ("parallel.num_patches", Some(8)),
        "{shown}"
    );
    assert!(
        shown.contains("8 token rows") && shown.contains("num_patches = 5"),
        "{shown}"
    );
    assert!(shown.contains("1, 2, 3, 4, 8"), "{shown}");
}

#[test]
fn ring_and_usp_run_inside_a_pipeline() {
    // Ring (and USP) ranks inside PipeFusion stages: each patch cut into sub-strips, one per rank;
    // the ring passes K/V between the ranks of the same stage.
    let mut spec = ClusterSpec::local_cpu(
        4,
        1,
        ModelSpec::Preset {
            name: "DiT-S/2".into(),
            seed: 0,
        },
    );
    spec.parallel.pipefusion_degree = 2;
    spec.parallel.num_patches = 2;
    spec.parallel.ring_degree = 2;
    let plan = Plan::new(&spec, &shape(4, 8)).unwrap();
    assert_eq!((plan.sp.name(), plan.pipeline_len()), ("Ring", 2));
    let roles = plan.roles();
    assert!(roles.iter().all(|r| r.sp.inside_pipefusion));
    assert_eq!(roles[2].sp.members, [2, 3]);
    assert_eq!(roles[2].pipeline, [0, 2]);
    let links: Vec<(usize, usize, u64, LinkKind)> = plan
        .link_bytes()
        .iter()
        .map(|l| (l.from, l.to, l.bytes_per_step, l.kind))
        .collect();
    // Per step each rank computes 2 of every patch's 4 token rows (4 rows, 16 tokens): hidden
    // states [2, 16, 8] to the next stage, K and V of the other rank's 16 tokens per layer (2).
    let hidden = 2 * 16 * 8 * 4;
    let ring = 2 * 16 * 16 * 4 * 2;
    assert!(
        links.contains(&(0, 2, hidden, LinkKind::Hidden)),
        "{links:?}"
    );
    assert!(
        links.contains(&(0, 1, ring, LinkKind::SequenceParallel)),
        "{links:?}"
    );
    assert!(
        links.contains(&(3, 2, ring, LinkKind::SequenceParallel)),
        "{links:?}"
    );
    // One-row patches cannot be cut into 2 sub-strips.
    spec.parallel.num_patches = 8;
    let e = Plan::new(&spec, &shape(4, 8)).unwrap_err().to_string();
    assert!(
        e.contains("cannot be cut into 2 sequence-parallel sub-strips"),
        "{e}"
    );
}

#[test]
fn sequence_parallel_ranks_own_token_rows() {
    let mut spec = ClusterSpec::local_cpu(
        4,
        1,
        ModelSpec::Preset {
            name: "DiT-S/2".into(),
            seed: 0,
        },
    );
    spec.parallel.pipefusion_degree = 1;
    spec.parallel.num_patches = 1;
    spec.parallel.cfg_degree = 2;
    spec.parallel.ulysses_degree = 2;
    let plan = Plan::new(&spec, &shape(4, 8)).unwrap();
    assert_eq!(plan.sp.name(), "Ulysses");
    assert_eq!(plan.sp.rows(), [0..4, 4..8]);
    let layout: Vec<(usize, usize, usize)> = plan
        .stages
        .iter()
        .map(|s| (s.device.index, s.cfg_group, s.sp_rank))
        .collect();
    assert_eq!(layout, [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]);
    assert_eq!(plan.pipeline_len(), 1);
    assert_eq!(plan.pipeline_of(&plan.stages[1]), [1]);
    assert_eq!(plan.cfg_partner(&plan.stages[1]), Some(3));
    let kinds: Vec<(usize, usize, LinkKind)> = plan
        .link_bytes()
        .iter()
        .map(|l| (l.from, l.to, l.kind))
        .collect();
    assert!(
        kinds.contains(&(0, 1, LinkKind::SequenceParallel)),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&(1, 3, LinkKind::CfgPrediction)),
        "{kinds:?}"
    );
    let text = plan.describe();
    assert!(
        text.contains("sequence parallel: Ulysses over 2 ranks"),
        "{text}"
    );

    // USP: Ulysses among adjacent ranks, Ring across the rows of ranks.
    spec.parallel.cfg_degree = 1;
    spec.parallel.ring_degree = 2;
    let usp = Plan::new(&spec, &shape(4, 8)).unwrap();
    assert_eq!((usp.sp.name(), usp.sp.degree()), ("USP", 4));
    let sp_links: Vec<(usize, usize)> = usp
        .link_bytes()
        .iter()
        .filter(|l| l.kind == LinkKind::SequenceParallel)
        .map(|l| (l.from, l.to))
        .collect();
    // Ulysses pairs (0, 1) and (2, 3); rings 0 -> 2 -> 0 and 1 -> 3 -> 1.
    assert_eq!(
        sp_links,
        [
            (0, 1),
            (0, 2),
            (1, 0),
            (1, 3),
            (2, 3),
            (2, 0),
            (3, 2),
            (3, 1)
        ]
    );
    spec.parallel.ring_degree = 1;
    spec.parallel.cfg_degree = 2;

    // Sequence-parallel ranks run PipeFusion patches (each patch cut into U x R sub-strips).
    spec.parallel.num_patches = 2;
    assert!(Plan::new(&spec, &shape(4, 8)).is_ok());
    spec.parallel.num_patches = 8; // one-row patches cannot be cut into 2 sub-strips
    let e = Plan::new(&spec, &shape(4, 8)).unwrap_err().to_string();
    assert!(
        e.contains("cannot be cut into 2 sequence-parallel sub-strips"),
        "{e}"
    );
    spec.parallel.num_patches = 2;
    spec.parallel.ulysses_degree = 1;
    spec.parallel.ring_degree = 2;
    assert!(Plan::new(&spec, &shape(4, 8)).is_ok());
    spec.parallel.ring_degree = 1;
    spec.parallel.ulysses_degree = 2;
    spec.parallel.num_patches = 1;

    // Ulysses must divide the heads (4 in `shape`); Ring over more ranks than token rows fails.
    spec.parallel.cfg_degree = 1;
    spec.parallel.ulysses_degree = 3;
    spec.nodes[0].devices.truncate(3);
    let e = Plan::new(&spec, &shape(4, 8)).unwrap_err().to_string();
    assert!(
        e.contains("must divide the model's 4 attention heads") && e.contains("1, 2, 4"),
        "{e}"
    );
    spec.parallel.ulysses_degree = 1;
    spec.parallel.ring_degree = 3;
    let e = Plan::new(&spec, &shape(4, 2)).unwrap_err().to_string();
    assert!(
        e.contains("cannot be cut into 3 sequence-parallel shards"),
        "{e}"
    );
}

#[test]
fn cfg_parallel_makes_two_groups_of_pipelines() {
    // 4 devices = cfg 2 x pipefusion 2: ranks 0, 1 are group 0's stages, 2, 3 group 1's.
    let mut spec = ClusterSpec::local_cpu(
        4,
        1,
        ModelSpec::Preset {
            name: "DiT-S/2".into(),
            seed: 0,
        },
    );
    spec.parallel.cfg_degree = 2;
    spec.parallel.pipefusion_degree = 2;
    let plan = Plan::new(&spec, &shape(6, 8)).unwrap();
    assert_eq!((plan.cfg_degree, plan.pipeline_len()), (2, 2));
    let layout: Vec<(usize, usize, usize, std::ops::Range<usize>)> = plan
        .stages
        .iter()
        .map(|s| (s.device.index, s.cfg_group, s.index, s.layers.clone()))
        .collect();
    assert_eq!(
        layout,
        [
            (0, 0, 0, 0..3),
            (1, 0, 1, 3..6),
            (2, 1, 0, 0..3),
            (3, 1, 1, 3..6)
        ]
    );
    assert_eq!(plan.group(1)[0].device.index, 2);
    assert!(plan.group(2).is_empty());
    // Each group's forward is half the doubled batch: B'/2 = 1 row of hidden states.
    let hidden = 8 * 4 * 8 * 4;
    let latent = 4 * 16 * 8 * 4;
    let links: Vec<(usize, usize, u64, LinkKind)> = plan
        .link_bytes()
        .iter()
        .map(|l| (l.from, l.to, l.bytes_per_step, l.kind))
        .collect();
    assert_eq!(
        links,
        [
            (0, 1, hidden, LinkKind::Hidden),
            (1, 0, latent, LinkKind::Latent),
            (1, 3, latent, LinkKind::CfgPrediction),
            (2, 3, hidden, LinkKind::Hidden),
            (3, 2, latent, LinkKind::Latent),
            (3, 1, latent, LinkKind::CfgPrediction),
        ]
    );
    let text = plan.describe();
    assert!(
        text.contains("CFG parallel: 2 groups") && text.contains("1/g1"),
        "{text}"
    );
    assert!(text.contains("CFG noise prediction"), "{text}");
}

#[test]
fn cfg_parallel_needs_a_guided_request() {
    let text = edit(&[
        (7, "pipefusion_degree = 1"),
        (8, "num_patches = 1"),
        (10, "cfg_degree = 2"),
    ]);
    let unguided = ModelShape {
        batch: 1,
        ..shape(4, 8)
    };
    let (field, line, shown) = plan_error(&text, &unguided);
    assert_eq!(
        (field.as_str(), line),
        ("parallel.cfg_degree", Some(10)),
        "{shown}"
    );
    assert!(shown.contains("not guided"), "{shown}");
    // The same file with a guided request: one stage per group, nothing but the exchange.
    let plan = Plan::new(&parse(&text).unwrap(), &shape(4, 8)).unwrap();
    let kinds: Vec<LinkKind> = plan.link_bytes().iter().map(|l| l.kind).collect();
    assert_eq!(kinds, [LinkKind::CfgPrediction; 2]);
}

#[test]
fn patch_rows_follow_the_ceil_rule() {
    assert_eq!(patch_rows(8, 3), Some(vec![0..3, 3..6, 6..8]));
    assert_eq!(patch_rows(8, 5), None);
    assert_eq!(patch_rows(8, 0), None);
    assert_eq!(patch_rows(8, 9), None);
    assert_eq!(patch_rows(8, 8).map(|p| p.len()), Some(8));
    assert_eq!(
        patch_rows(8, 1).map(|p| (p.len(), p[0].clone())),
        Some((1, 0..8))
    );
}

#[test]
fn split_layers_is_balanced() {
    assert_eq!(split_layers(28, 3), [0..10, 10..19, 19..28]);
    assert_eq!(split_layers(12, 4), [0..3, 3..6, 6..9, 9..12]);
    assert!(split_layers(5, 0).is_empty());
}

#[test]
fn link_bytes_for_a_small_shape() {
    let spec = ClusterSpec::local_cpu(
        3,
        1,
        ModelSpec::Preset {
            name: "DiT-S/2".into(),
            seed: 0,
        },
    );
    let plan = Plan::new(&spec, &shape(6, 8)).unwrap();
    // hidden: B'=2 * 8 rows * 4 cols * d=8 * 4 bytes = 2048; latent: 1 * 4 * 16 * 8 * 4 = 2048.
    let hidden = 2 * 8 * 4 * 8 * 4;
    let latent = 4 * 16 * 8 * 4;
    assert_eq!(
        plan.link_bytes(),
        [
            LinkBytes {
                from: 0,
                to: 1,
                bytes_per_step: hidden,
                kind: LinkKind::Hidden,
            },
            LinkBytes {
                from: 1,
                to: 2,
                bytes_per_step: hidden,
                kind: LinkKind::Hidden,
            },
            LinkBytes {
                from: 2,
                to: 0,
                bytes_per_step: latent,
                kind: LinkKind::Latent,
            },
        ]
    );
    let one = ClusterSpec::local_cpu(1, 1, ModelSpec::Path("m".into()));
    assert!(Plan::new(&one, &shape(6, 8))
        .unwrap()
        .link_bytes()
        .is_empty());
}

#[test]
fn describe_lists_every_stage_and_warns_when_patches_are_few() {
    let spec = parse(&edit(&[])).unwrap();
    let text = Plan::new(&spec, &shape(5, 8)).unwrap().describe();
    for range in ["0..3", "3..5"] {
        assert!(text.contains(range), "{text}");
    }
    assert!(
        text.contains("cpu(threads=1)") && !text.contains("warning"),
        "{text}"
    );
    let few = parse(&edit(&[(8, "num_patches = 1")])).unwrap();
    let text = Plan::new(&few, &shape(5, 8)).unwrap().describe();
    assert!(
        text.contains("recommend num_patches >= pipefusion_degree"),
        "{text}"
    );
}

proptest! {
    #[test]
    fn patch_rows_cover_the_rows_contiguously(h in 0usize..200, m in 0usize..60) {
        if let Some(strips) = patch_rows(h, m) {
            prop_assert_eq!(strips.len(), m);
            prop_assert_eq!(strips[0].start, 0);
            prop_assert_eq!(strips[m - 1].end, h);
            let first = strips[0].len();
            for (i, s) in strips.iter().enumerate() {
                prop_assert!(!s.is_empty());
                if i > 0 { prop_assert_eq!(strips[i - 1].end, s.start); }
                if i + 1 < m { prop_assert_eq!(s.len(), first); } else { prop_assert!(s.len() <= first); }
            }
        } else {
            prop_assert!(m == 0 || m > h || (m - 1) * h.div_ceil(m) >= h);
        }
    }

    #[test]
    fn split_layers_is_balanced_and_contiguous(layers in 0usize..200, n in 1usize..40) {
        let split = split_layers(layers, n);
        prop_assert_eq!(split.len(), n);
        prop_assert_eq!(split[0].start, 0);
        prop_assert_eq!(split[n - 1].end, layers);
        for w in split.windows(2) {
            prop_assert_eq!(w[0].end, w[1].start);
            prop_assert!(w[0].len() >= w[1].len() && w[0].len() - w[1].len() <= 1);
        }
    }
}

proptest! {
    /// Size arithmetic never wraps: any shape either is refused (`Overflow`, naming the sizes) or
    /// plans with link figures equal to the exact products (computed here in 128 bits) or
    /// saturated at u64::MAX.
    #[test]
    fn plan_sizes_are_exact_or_refused(
        rows_log in 0u32..40,
        cols_log in 0u32..40,
        batch in prop_oneof![1usize..8, 1usize..usize::MAX],
        hidden_log in 3u32..20,
        text in prop_oneof![Just(0usize), 1usize..4096, 1usize..usize::MAX],
    ) {
        let spec = parse(&edit(&[])).unwrap();
        let (rows, cols) = ((1usize << rows_log).max(4), 1usize << cols_log);
        let s = ModelShape {
            token_rows: rows,
            token_cols: cols,
            batch,
            latent_batch: batch.div_ceil(2),
            hidden: 1 << hidden_log,
            text_tokens: text,
            ..shape(4, 8)
        };
        // Exact products in 128 bits, saturating there (far above u64::MAX either way).
        let mul = |xs: &[u128]| xs.iter().fold(1u128, |a, &x| a.saturating_mul(x));
        match Plan::new(&spec, &s) {
            Err(topology::TopologyError::Overflow(m)) => {
                let tokens = mul(&[rows as u128, cols as u128]) + text as u128;
                let exact = mul(&[tokens, batch as u128, s.hidden.max(s.latent_channels) as u128, 4]);
                prop_assert!(exact > u64::MAX as u128, "refused a fitting shape: {m}");
            }
            Err(e) => prop_assert!(false, "unexpected error {e}"),
            Ok(plan) => {
                let m = plan.patches.len() as u128;
                let tokens = mul(&[rows as u128, cols as u128]).saturating_add(mul(&[m, text as u128]));
                let hidden = mul(&[batch as u128, tokens, s.hidden as u128, 4]);
                let p = s.patch_size as u128;
                let latent = mul(&[s.latent_batch as u128, s.latent_channels as u128,
                    rows as u128, p, cols as u128, p, 4]);
                for l in plan.link_bytes() {
                    let want = match l.kind {
                        LinkKind::Hidden => hidden,
                        LinkKind::Latent => latent,
                        _ => continue,
                    };
                    prop_assert_eq!(l.bytes_per_step as u128, want.min(u64::MAX as u128));
                }
            }
        }
    }
}
