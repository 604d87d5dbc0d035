//! What a [`Plan`] costs and looks like: bytes per step on every link, and the table for people.

use std::fmt::Write as _;

use crate::plan::{LinkBytes, LinkKind, Plan};

impl Plan {
    /// Per-step f32 bytes on each link, from every device: stage s -> s+1 carries the hidden
    /// states of its rows once per step, `batch / cfg_degree * rows * token_cols * hidden * 4`
    /// (M patches); last -> 0 carries the latent rows, `latent_batch * latent_channels * (rows *
    /// patch_size) * (token_cols * patch_size) * 4`. With CFG parallel the groups' last stages
    /// also swap their noise predictions (latent-sized). With sequence parallelism, rows are the
    /// rank's shard (inside PipeFusion: its sub-strips of the patches), and each rank exchanges
    /// attention inputs with the others in every layer (Ulysses: Q, K, V of its tokens for the
    /// other ranks' heads, then their outputs back; Ring: K and V of every other rank's tokens
    /// once per layer). Empty for one device.
    pub fn link_bytes(&self) -> Vec<LinkBytes> {
        let s = &self.shape;
        // Saturating: Plan::new refuses shapes whose step activations exceed 2^64 bytes, and a
        // figure beyond that (many layers of exchanges) reads as u64::MAX, never wrapped.
        let product = |xs: &[usize]| xs.iter().fold(1u64, |a, &x| a.saturating_mul(x as u64));
        let b = s.batch / self.cfg_degree.max(1);
        let all_rows = 0..s.token_rows;
        // Token rows a sequence-parallel rank computes per step: its shard, or inside PipeFusion
        // its sub-strip of every patch (ALGORITHMS.md section 4).
        let degree = self.sp.degree();
        let inside_pipefusion = self.pipeline_len() > 1 || self.patches.len() > 1;
        let rows_of = |sp_rank: usize| match (degree, inside_pipefusion) {
            (1, _) => all_rows.len(),
            (_, false) => self.sp.rows().get(sp_rank).map_or(0, |r| r.len()),
            (_, true) => self
                .patches
                .iter()
                .filter_map(|p| crate::shape::patch_rows(p.len(), degree))
                .map(|sub| sub.get(sp_rank).map_or(0, |r| r.len()))
                .sum(),
        };
        let latent = |rows: usize| {
            product(&[
                s.latent_batch,
                s.latent_channels,
                rows,
                s.patch_size,
                s.token_cols,
                s.patch_size,
                4,
            ])
        };
        let mut links = Vec::new();
        for role in self.roles() {
            let rank = role.rank;
            let rows = rows_of(role.sp.rank);
            let (pipe, stage) = (&role.pipeline, role.stage);
            let link = |to: usize, bytes: u64, kind: LinkKind| LinkBytes {
                from: rank,
                to,
                bytes_per_step: bytes,
                kind,
            };
            if pipe.len() > 1 {
                links.push(if !role.is_last_stage() {
                    // MMDiT: every part also carries the prompt tokens (under sequence
                    // parallelism, on the rank at the prompt's end of the part).
                    let holder = match s.prompt_first {
                        true => 0,
                        false => degree - 1,
                    };
                    let text = match degree == 1 || role.sp.rank == holder {
                        true => s.text_tokens,
                        false => 0,
                    };
                    let tokens = product(&[rows, s.token_cols])
                        .saturating_add(product(&[self.patches.len(), text]));
                    let hidden = product(&[b, s.hidden, 4]).saturating_mul(tokens);
                    link(pipe[stage + 1], hidden, LinkKind::Hidden)
                } else {
                    link(pipe[0], latent(rows), LinkKind::Latent)
                });
            }
            if let Some(p) = role.cfg.partner {
                links.push(link(p, latent(rows), LinkKind::CfgPrediction));
            }
            let layers = role.layers.len();
            let members = &role.sp.members;
            // Ulysses among the members of my row of ranks, then Ring among same-column ranks.
            let (u_deg, r_deg) = (role.sp.ulysses, role.sp.ring);
            let (u, r) = (role.sp.rank % u_deg, role.sp.rank / u_deg);
            let w = s.hidden / u_deg;
            for (o, &other) in members.iter().enumerate() {
                if o / u_deg != r || o == role.sp.rank {
                    continue;
                }
                // Q, K, V of my tokens for its heads; my heads' output for its tokens.
                let tokens = product(&[3, rows, s.token_cols])
                    .saturating_add(product(&[rows_of(o), s.token_cols]));
                let bytes = product(&[b, w, 4, layers]).saturating_mul(tokens);
                links.push(link(other, bytes, LinkKind::SequenceParallel));
            }
            if r_deg > 1 {
                let next_row = (r + 1) % r_deg;
                // K and V of my head group for every row of ranks' tokens but the next's own.
                let row_tokens: usize = (0..members.len())
                    .filter(|o| o / u_deg == next_row)
                    .map(rows_of)
                    .sum();
                let tokens = product(&[s.token_rows.saturating_sub(row_tokens), s.token_cols]);
                let bytes = product(&[b, 2, w, 4, layers]).saturating_mul(tokens);
                links.push(link(
                    members[u + u_deg * next_row],
                    bytes,
                    LinkKind::SequenceParallel,
                ));
            }
        }
        links
    }

    /// A multi-line table for people: the stages (device, node, layers), the patches (token
    /// rows, tokens), bytes per step on each link, the warmup steps, and a warning line when
    /// M < N.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let (n, m) = (self.pipeline_len(), self.num_patches());
        let _ = writeln!(
            out,
            "PipeFusion plan: {n} stages, {m} patches, {} warmup steps",
            self.warmup_steps
        );
        if self.cfg_degree > 1 {
            let _ = writeln!(
                out,
                "CFG parallel: {} groups (group 0: first half of the guided batch, group 1: \
                 second), each a {n}-stage pipeline",
                self.cfg_degree
            );
        }
        if self.sp.degree() > 1 {
            let rows: Vec<String> = self
                .sp
                .rows()
                .iter()
                .map(|r| format!("{}..{}", r.start, r.end))
                .collect();
            let _ = writeln!(
                out,
                "sequence parallel: {} over {} ranks per stage, token rows {}",
                self.sp.name(),
                self.sp.degree(),
                rows.join(", ")
            );
        }
        let _ = writeln!(out, "{:<6} {:<18} {:<12} layers", "stage", "device", "node");
        for s in &self.stages {
            let mut stage = s.index.to_string();
            if self.cfg_degree > 1 {
                stage += &format!("/g{}", s.cfg_group);
            }
            if self.sp.degree() > 1 {
                stage += &format!("/r{}", s.sp_rank);
            }
            let _ = writeln!(
                out,
                "{:<6} {:<18} {:<12} {}..{} ({})",
                stage,
                s.device.spec.to_string(),
                s.device.node,
                s.layers.start,
                s.layers.end,
                s.layers.len()
            );
        }
        let _ = writeln!(out, "{:<6} {:<18} tokens", "patch", "token rows");
        for (i, rows) in self.patches.iter().enumerate() {
            let tokens = rows.len() * self.shape.token_cols;
            let _ = writeln!(
                out,
                "{i:<6} {:<18} {tokens}",
                format!("{}..{}", rows.start, rows.end)
            );
        }
        for l in self.link_bytes() {
            if l.bytes_per_step == u64::MAX {
                let _ = writeln!(
                    out,
                    "link {} -> {}: more than 2^64 bytes/step (the sizes overflow)",
                    l.from, l.to
                );
                continue;
            }
            let _ = writeln!(
                out,
                "link {} -> {}: {} bytes/step ({}, {})",
                l.from,
                l.to,
                l.bytes_per_step,
                human_bytes(l.bytes_per_step),
                match l.kind {
                    LinkKind::Hidden => "hidden states",
                    LinkKind::Latent => "latent",
                    LinkKind::CfgPrediction => "CFG noise prediction",
                    LinkKind::SequenceParallel => "sequence-parallel attention",
                }
            );
        }
        if m < n {
            let _ = writeln!(
                out,
                "warning: num_patches = {m} < pipefusion_degree = {n}: recommend num_patches >= pipefusion_degree"
            );
        }
        out
    }
}

/// `1536` -> `1.5 KiB`; `3 << 30` -> `3.0 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    let mut value = bytes as f64;
    let mut unit = "B";
    for next in ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"] {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = next;
    }
    if unit == "B" {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {unit}")
    }
}
