//! What each device does in a [`Plan`]: one [`DeviceRole`] per device, the only place where the
//! device layout of a hybrid (ALGORITHMS.md section 5) is turned into neighbours, groups and
//! partners. Everything that needs to know "who talks to whom" (the runtime's device arguments,
//! the order in which devices begin a request, where the final latent comes from, the bytes on
//! each link) asks the roles instead of redoing the arithmetic.
//!
//! Words, used the same way everywhere: a device's **rank** is its position in the plan
//! ([`ClusterSpec::devices`](crate::ClusterSpec::devices) order, equal to
//! [`DeviceRef::index`]); its **stage** is its position in its pipeline (`0..N`).

use std::ops::Range;

use crate::plan::Plan;
use crate::plan_sp::SequenceParallel;
use crate::spec::DeviceRef;

/// One device's part in a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRole {
    /// The device's rank (see the module documentation).
    pub rank: usize,
    /// The device.
    pub device: DeviceRef,
    /// Its stage: position in its pipeline, `0..pipeline.len()`.
    pub stage: usize,
    /// The transformer blocks it owns.
    pub layers: Range<usize>,
    /// The rank of every stage of its pipeline (same CFG group, same sequence-parallel rank), in
    /// stage order: where its hidden states go (`pipeline[stage + 1]`) and, from the last stage,
    /// the latent (`pipeline[0]`).
    pub pipeline: Vec<usize>,
    /// Its place under CFG parallel.
    pub cfg: CfgRole,
    /// Its place in its stage's sequence-parallel group.
    pub sp: SpRole,
}

/// A device's place under CFG parallel (ALGORITHMS.md section 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CfgRole {
    /// CFG groups in the plan (1, or 2 with CFG parallel).
    pub degree: usize,
    /// Its group: which branch of the guided batch it forwards (0 without CFG parallel).
    pub group: usize,
    /// A last stage under CFG parallel: the rank of the other group's device with the same stage
    /// and sequence-parallel rank, with which it swaps noise predictions after every item.
    pub partner: Option<usize>,
}

/// A device's place in the sequence-parallel group of its stage (ALGORITHMS.md section 4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpRole {
    /// Its rank in the group, `0..members.len()` (= `u + U r`).
    pub rank: usize,
    /// The device rank of every member of the group, in group-rank order (just this device
    /// without sequence parallelism).
    pub members: Vec<usize>,
    /// Ulysses degree U (1: none).
    pub ulysses: usize,
    /// Ring degree R (1: none); the group has U x R members.
    pub ring: usize,
    /// The group runs PipeFusion patches (several stages or patches), so each member keeps K/V
    /// buffers and cuts every patch into sub-strips; otherwise each member runs whole steps on
    /// its shard.
    pub inside_pipefusion: bool,
}

impl SpRole {
    /// Members in the group (1 without sequence parallelism).
    pub fn degree(&self) -> usize {
        self.members.len()
    }
}

impl DeviceRole {
    /// Stage 0: embeds the latent, takes the request's initial latent.
    pub fn is_first_stage(&self) -> bool {
        self.stage == 0
    }

    /// The last stage: applies the head and the scheduler step, holds the sampler and the latent,
    /// and reports its final latent rows.
    pub fn is_last_stage(&self) -> bool {
        self.stage + 1 == self.pipeline.len()
    }

    /// Whether this device reports step progress: under CFG or sequence parallelism several
    /// devices finish every step; group 0's last stage, sequence-parallel rank 0, reports.
    pub fn reports_steps(&self) -> bool {
        self.is_last_stage() && self.cfg.group == 0 && self.sp.rank == 0
    }

    /// The same role with every rank it names (its own, its pipeline's, its CFG partner's, its
    /// sequence-parallel group's, its device's index) replaced by `ids[rank]`: the plan of a part
    /// of a cluster (the nodes that remain after one was lost) speaks in the whole cluster's
    /// device indices, which the transport and every device use. `None` if a rank is past
    /// `ids`.
    pub fn renumbered(&self, ids: &[usize]) -> Option<DeviceRole> {
        let id = |r: usize| ids.get(r).copied();
        let mut role = self.clone();
        role.rank = id(self.rank)?;
        role.device.index = id(self.device.index)?;
        role.pipeline = self
            .pipeline
            .iter()
            .map(|&r| id(r))
            .collect::<Option<_>>()?;
        role.cfg.partner = match self.cfg.partner {
            Some(p) => Some(id(p)?),
            None => None,
        };
        role.sp.members = self
            .sp
            .members
            .iter()
            .map(|&r| id(r))
            .collect::<Option<_>>()?;
        Some(role)
    }

    /// The rank of the device that receives this one's output (the next stage; stage 0 from the
    /// last stage, itself in a one-stage pipeline).
    pub fn next_in_pipeline(&self) -> usize {
        self.pipeline[(self.stage + 1) % self.pipeline.len()]
    }
}

impl Plan {
    /// The role of every device, in rank order.
    pub fn roles(&self) -> Vec<DeviceRole> {
        (0..self.stages.len())
            .filter_map(|r| self.role(r))
            .collect()
    }

    /// The role of the device of rank `rank` (`None` past the last).
    pub fn role(&self, rank: usize) -> Option<DeviceRole> {
        let st = self.stages.get(rank)?;
        let (ulysses, ring) = match self.sp {
            SequenceParallel::None => (1, 1),
            SequenceParallel::Ulysses { degree, .. } => (degree, 1),
            SequenceParallel::Ring { degree, .. } => (1, degree),
            SequenceParallel::Usp { ulysses, ring, .. } => (ulysses, ring),
        };
        let group = self.group(st.cfg_group);
        let pipeline = group
            .iter()
            .filter(|s| s.sp_rank == st.sp_rank)
            .map(|s| s.device.index)
            .collect::<Vec<_>>();
        let is_last = st.index + 1 == pipeline.len();
        let partner = self.cfg_partner(st).filter(|_| is_last);
        Some(DeviceRole {
            rank,
            device: st.device.clone(),
            stage: st.index,
            layers: st.layers.clone(),
            pipeline,
            cfg: CfgRole {
                degree: self.cfg_degree.max(1),
                group: st.cfg_group,
                partner,
            },
            sp: SpRole {
                rank: st.sp_rank,
                members: group
                    .iter()
                    .filter(|s| s.index == st.index)
                    .map(|s| s.device.index)
                    .collect(),
                ulysses,
                ring,
                inside_pipefusion: self.pipeline_len() > 1 || self.patches.len() > 1,
            },
        })
    }

    /// The order in which the coordinator begins a request on the devices: every device that is
    /// not a first stage (last ranks first), then the first stages. A first stage starts work as
    /// soon as it has begun, so its frames must find every later stage, and under CFG parallel
    /// the other group's last stage, already expecting the request.
    pub fn begin_order(&self) -> Vec<usize> {
        let roles = self.roles();
        let later = roles.iter().rev().filter(|r| !r.is_first_stage());
        let first = roles.iter().rev().filter(|r| r.is_first_stage());
        later.chain(first).map(|r| r.rank).collect()
    }
}
