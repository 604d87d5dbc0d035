//! The layout of the nodes that remain: when a node is lost (or comes back), the coordinator's
//! node and every other member compute the same plan over the members' devices, in the whole
//! cluster's device indices (the transport's), so each can restart its devices in their new
//! roles without being told more than the member list.
//!
//! Which parallel degrees the remaining devices run: the topology's own, when they still fit
//! (the same CFG, Ulysses and Ring degrees with PipeFusion taking the rest); otherwise the same
//! without sequence parallelism; otherwise PipeFusion over every device (one stage per device:
//! at most as many devices as the model has layers). Patches and warmup steps stay the topology's; an explicit layer split is dropped
//! unless the stage count is unchanged.

use topology::{ClusterSpec, DeviceRole, Plan};

use crate::error::{ClusterError, Result};

/// A plan over some of the cluster's nodes.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    /// The nodes it runs on, in topology order.
    pub(crate) members: Vec<String>,
    /// The part of the topology it plans (its own device numbering).
    pub(crate) spec: ClusterSpec,
    /// Every device's role, in the whole cluster's device indices, in plan order.
    pub(crate) roles: Vec<DeviceRole>,
    /// Plan positions (indices into `roles`) in the order devices begin a request.
    pub(crate) begin_order: Vec<usize>,
    /// The plan (its own numbering).
    pub(crate) plan: Plan,
}

impl Layout {
    /// The layout of the whole topology (global indices = plan ranks).
    pub(crate) fn full(spec: &ClusterSpec, model: &model::ModelConfig) -> Result<Layout> {
        let plan = crate::cluster::startup_plan(spec, model)?;
        Ok(Layout {
            members: spec.nodes.iter().map(|n| n.name.clone()).collect(),
            spec: spec.clone(),
            roles: plan.roles(),
            begin_order: plan.begin_order(),
            plan,
        })
    }

    /// The layout over `members` (node names of `spec`; the coordinator's node among them).
    /// Fails naming why when the devices there cannot run the model.
    pub(crate) fn over(
        spec: &ClusterSpec,
        model: &model::ModelConfig,
        members: &[String],
    ) -> Result<Layout> {
        if members.len() == spec.nodes.len() {
            return Self::full(spec, model);
        }
        if !members.contains(&spec.coordinator) {
            return Err(ClusterError::NotRunning(format!(
                "the coordinator's node {} is not among the remaining nodes",
                spec.coordinator
            )));
        }
        let mut part = spec.clone();
        let mut ids = Vec::new();
        let mut first = 0;
        part.nodes.clear();
        for n in &spec.nodes {
            if members.contains(&n.name) {
                ids.extend(first..first + n.devices.len());
                part.nodes.push(n.clone());
            }
            first += n.devices.len();
        }
        let devices = ids.len();
        let mut tried = Vec::new();
        for p in candidates(spec, devices, model.num_layers) {
            let mut s = part.clone();
            s.parallel = p.clone();
            if p.pipefusion_degree != spec.parallel.pipefusion_degree {
                s.parallel.layer_split = None;
            }
            match s
                .validate()
                .map_err(ClusterError::from)
                .and_then(|()| crate::cluster::startup_plan(&s, model))
            {
                Ok(plan) => {
                    let roles = plan
                        .roles()
                        .iter()
                        .map(|r| r.renumbered(&ids))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| {
                            ClusterError::NotRunning(
                                "a role names a device past the remaining ones".into(),
                            )
                        })?;
                    return Ok(Layout {
                        members: part.nodes.iter().map(|n| n.name.clone()).collect(),
                        spec: s,
                        roles,
                        begin_order: plan.begin_order(),
                        plan,
                    });
                }
                Err(e) => tried.push(format!(
                    "cfg {} x pipefusion {} x ulysses {} x ring {}: {e}",
                    p.cfg_degree, p.pipefusion_degree, p.ulysses_degree, p.ring_degree
                )),
            }
        }
        Err(ClusterError::NotRunning(format!(
            "the {devices} device(s) of nodes {} cannot run the model: {}",
            members.join(", "),
            tried.join("; ")
        )))
    }
}

/// The parallel settings to try over `devices` devices, best first (see the module docs).
fn candidates(spec: &ClusterSpec, devices: usize, layers: usize) -> Vec<topology::ParallelSpec> {
    let p = &spec.parallel;
    let mut out: Vec<topology::ParallelSpec> = Vec::new();
    let mut push = |cfg: usize, u: usize, r: usize, d: usize| {
        let group = cfg * u * r;
        if group == 0 || d % group != 0 || d / group == 0 {
            return;
        }
        let mut q = p.clone();
        (q.cfg_degree, q.ulysses_degree, q.ring_degree) = (cfg, u, r);
        q.pipefusion_degree = d / group;
        if !out.contains(&q) {
            out.push(q);
        }
    };
    push(p.cfg_degree, p.ulysses_degree, p.ring_degree, devices);
    push(p.cfg_degree, 1, 1, devices);
    if devices <= layers {
        push(1, 1, 1, devices);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::Layout;

    /// dit_pf (4 layers, 2 heads) on four one-device nodes with `parallel`.
    fn spec(parallel: &str) -> (topology::ClusterSpec, model::ModelConfig) {
        let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dit_pf");
        let nodes: String = (0..4)
            .map(|i| {
                format!(
                    "[[nodes]]\nname = \"n{i}\"\naddress = \"127.0.0.1:{}\"\ndevices = [{{ kind = \"cpu\", threads = 1 }}]\n",
                    7000 + i
                )
            })
            .collect();
        let text = format!(
            "coordinator = \"n0\"\n[model]\npath = \"{}\"\n[parallel]\n{parallel}\n{nodes}",
            model.display()
        );
        let spec = topology::ClusterSpec::parse(&text, "t.toml", None).unwrap();
        let cfg = model::ModelConfig::from_dir(&model.join("transformer")).unwrap();
        (spec, cfg)
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_remaining_devices_keep_what_degrees_still_fit_in_global_indices() {
        let (s, cfg) = spec("cfg_degree = 2\npipefusion_degree = 2\nnum_patches = 2");
        // n1 lost: 3 devices; CFG 2 does not divide them: PipeFusion over 0, 2, 3.
        let l = Layout::over(&s, &cfg, &names(&["n0", "n2", "n3"])).unwrap();
        assert_eq!(l.plan.pipeline_len(), 3);
        assert_eq!(l.plan.cfg_degree, 1);
        let ranks: Vec<usize> = l.roles.iter().map(|r| r.rank).collect();
        assert_eq!(ranks, [0, 2, 3]);
        assert_eq!(l.roles[0].pipeline, [0, 2, 3]);
        assert_eq!(l.roles[1].device.node, "n2");
        // n1 and n3 lost: CFG 2 x 1 stage still fits two devices.
        let l = Layout::over(&s, &cfg, &names(&["n0", "n2"])).unwrap();
        assert_eq!((l.plan.cfg_degree, l.plan.pipeline_len()), (2, 1));
        assert_eq!(l.roles[0].cfg.partner, Some(2));
        // Everyone: the topology's own plan.
        let all = Layout::over(&s, &cfg, &names(&["n0", "n1", "n2", "n3"])).unwrap();
        assert_eq!(all.roles, Layout::full(&s, &cfg).unwrap().roles);
    }

    #[test]
    fn a_layout_without_the_coordinator_or_beyond_the_layers_is_refused_naming_why() {
        let (s, cfg) = spec("pipefusion_degree = 4\nnum_patches = 4");
        let e = Layout::over(&s, &cfg, &names(&["n1", "n2"])).unwrap_err();
        assert!(e.to_string().contains("coordinator's node n0"), "{e}");
        // Ulysses 2 over 2 heads kept when it fits, dropped when it does not.
        let (s, cfg) = spec("ulysses_degree = 2\npipefusion_degree = 2\nnum_patches = 2");
        let l = Layout::over(&s, &cfg, &names(&["n0", "n1", "n3"])).unwrap();
        assert_eq!((l.plan.sp.degree(), l.plan.pipeline_len()), (1, 3));
        let l = Layout::over(&s, &cfg, &names(&["n0", "n3"])).unwrap();
        assert_eq!((l.plan.sp.degree(), l.plan.pipeline_len()), (2, 1));
        assert_eq!(l.roles[1].sp.members, [0, 3]);
    }
}
