//! `Plan::role`: each device's stage, pipeline, CFG partner and sequence-parallel group, and the
//! order in which devices begin a request, for the full hybrid layout (ALGORITHMS.md section 5).

use topology::{ClusterSpec, ModelSpec, Plan};

use crate::shape;

fn hybrid(cfg: usize, pipefusion: usize, ulysses: usize, ring: usize, patches: usize) -> Plan {
    let devices = cfg * pipefusion * ulysses * ring;
    let mut spec = ClusterSpec::local_cpu(
        devices,
        1,
        ModelSpec::Preset {
            name: "DiT-S/2".into(),
            seed: 0,
        },
    );
    spec.parallel.cfg_degree = cfg;
    spec.parallel.pipefusion_degree = pipefusion;
    spec.parallel.ulysses_degree = ulysses;
    spec.parallel.ring_degree = ring;
    spec.parallel.num_patches = patches;
    Plan::new(&spec, &shape(4, 8)).unwrap()
}

#[test]
fn roles_of_cfg_x_pipefusion_x_ulysses() {
    // rank = u + U (stage + N group): U = 2, N = 2, 2 groups.
    let plan = hybrid(2, 2, 2, 1, 2);
    let roles = plan.roles();
    assert_eq!(roles.len(), 8);
    let layout: Vec<(usize, usize, usize, usize)> = roles
        .iter()
        .map(|r| (r.rank, r.stage, r.cfg.group, r.sp.rank))
        .collect();
    assert_eq!(
        layout,
        [
            (0, 0, 0, 0),
            (1, 0, 0, 1),
            (2, 1, 0, 0),
            (3, 1, 0, 1),
            (4, 0, 1, 0),
            (5, 0, 1, 1),
            (6, 1, 1, 0),
            (7, 1, 1, 1),
        ]
    );
    // Rank 3: stage 1 of group 0, Ulysses rank 1.
    let r = &roles[3];
    assert_eq!(r.pipeline, [1, 3]);
    assert_eq!(r.sp.members, [2, 3]);
    assert_eq!(
        (r.sp.ulysses, r.sp.ring, r.sp.inside_pipefusion),
        (2, 1, true)
    );
    assert_eq!(r.cfg.partner, Some(7));
    assert_eq!(r.next_in_pipeline(), 1);
    assert!(r.is_last_stage() && !r.reports_steps());
    assert!(roles[2].reports_steps());
    assert_eq!(roles.iter().filter(|r| r.reports_steps()).count(), 1);
    // Only last stages swap CFG predictions.
    assert_eq!(roles[1].cfg.partner, None);
    assert_eq!(roles[6].cfg.partner, Some(2));
    assert_eq!(roles[0].layers, 0..2);
    assert_eq!(roles[6].layers, 2..4);
    // Every later stage begins before any first stage, last ranks first.
    assert_eq!(plan.begin_order(), [7, 6, 3, 2, 5, 4, 1, 0]);
    // The roles agree with the plan's own helpers.
    for (r, st) in roles.iter().zip(&plan.stages) {
        assert_eq!(r.pipeline, plan.pipeline_of(st));
        assert_eq!(r.device, st.device);
    }
}

#[test]
fn roles_of_usp_without_a_pipeline() {
    // USP U = 2 x R = 2 in one stage, no CFG: one group of four, nothing to pipeline.
    let plan = hybrid(1, 1, 2, 2, 1);
    for r in plan.roles() {
        assert_eq!(r.sp.members, [0, 1, 2, 3]);
        assert_eq!(r.sp.rank, r.rank);
        assert_eq!(
            (r.sp.ulysses, r.sp.ring, r.sp.inside_pipefusion),
            (2, 2, false)
        );
        assert_eq!(r.pipeline, [r.rank]);
        assert_eq!(r.next_in_pipeline(), r.rank);
        assert!(r.is_first_stage() && r.is_last_stage());
        assert_eq!(r.cfg.partner, None);
    }
    assert_eq!(plan.begin_order(), [3, 2, 1, 0]);
    assert!(plan.role(4).is_none());
}
