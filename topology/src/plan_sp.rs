//! The sequence-parallel part of a [`Plan`](crate::Plan) (ALGORITHMS.md section 4): which kind,
//! how many ranks, and the token rows each rank owns.

use std::ops::Range;

use crate::error::Result;
use crate::shape::{patch_rows, ModelShape};
use crate::spec::ClusterSpec;

/// How the tokens of each pipeline stage are spread over devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SequenceParallel {
    /// One device per stage.
    None,
    /// Ulysses over `degree` ranks: all-to-all to head shards around attention.
    Ulysses {
        /// Ranks U.
        degree: usize,
        /// Token rows of each rank.
        rows: Vec<Range<usize>>,
    },
    /// Ring attention over `degree` ranks: key/value blocks travel around the ring.
    Ring {
        /// Ranks R.
        degree: usize,
        /// Token rows of each rank.
        rows: Vec<Range<usize>>,
    },
    /// USP: Ulysses among the `ulysses` ranks of each row of ranks, Ring across the `ring` rows
    /// (rank = u + U r: Ulysses neighbours are adjacent devices, on the fastest links).
    Usp {
        /// Ulysses degree U.
        ulysses: usize,
        /// Ring degree R.
        ring: usize,
        /// Token rows of each of the U x R ranks.
        rows: Vec<Range<usize>>,
    },
}

impl SequenceParallel {
    /// From `parallel.ulysses_degree` / `ring_degree`; errors name the field and say what works.
    pub(crate) fn new(spec: &ClusterSpec, shape: &ModelShape) -> Result<SequenceParallel> {
        let p = &spec.parallel;
        let (u, r) = (p.ulysses_degree, p.ring_degree);
        if u == 1 && r == 1 {
            return Ok(SequenceParallel::None);
        }
        let (field, degree) = if u > 1 {
            ("parallel.ulysses_degree", u * r)
        } else {
            ("parallel.ring_degree", r)
        };
        #[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; the MSRV is 1.85
        if u > 1 && shape.heads % u != 0 {
            let valid: Vec<String> = (1..=shape.heads)
                .filter(|d| shape.heads % d == 0)
                .map(|d| d.to_string())
                .collect();
            return Err(spec.error(
                field,
                format!(
                    "ulysses_degree = {u} must divide the model's {} attention heads",
                    shape.heads
                ),
                Some(format!("ulysses degrees that work: {}", valid.join(", "))),
            ));
        }
        let Some(rows) = patch_rows(shape.token_rows, degree) else {
            return Err(spec.error(
                field,
                format!(
                    "{} token rows cannot be cut into {degree} sequence-parallel shards",
                    shape.token_rows
                ),
                Some("use a smaller degree or a larger image".into()),
            ));
        };
        // Inside PipeFusion: each patch is cut into U x R sub-strips, one per rank.
        if let Some(patches) = patch_rows(shape.token_rows, p.num_patches) {
            if let Some(small) = patches
                .iter()
                .find(|r| patch_rows(r.len(), degree).is_none())
            {
                return Err(spec.error(
                    field,
                    format!(
                        "a patch of {} token rows cannot be cut into {degree} sequence-parallel \
                         sub-strips",
                        small.len()
                    ),
                    Some("use fewer patches or a smaller degree".into()),
                ));
            }
        }
        Ok(match (u > 1, r > 1) {
            (true, true) => SequenceParallel::Usp {
                ulysses: u,
                ring: r,
                rows,
            },
            (true, false) => SequenceParallel::Ulysses { degree, rows },
            _ => SequenceParallel::Ring { degree, rows },
        })
    }

    /// Ranks per sequence-parallel group (1 without).
    pub fn degree(&self) -> usize {
        match self {
            SequenceParallel::None => 1,
            SequenceParallel::Ulysses { degree, .. } | SequenceParallel::Ring { degree, .. } => {
                *degree
            }
            SequenceParallel::Usp { ulysses, ring, .. } => ulysses * ring,
        }
    }

    /// Token rows of each rank (empty without sequence parallelism).
    pub fn rows(&self) -> &[Range<usize>] {
        match self {
            SequenceParallel::None => &[],
            SequenceParallel::Ulysses { rows, .. }
            | SequenceParallel::Ring { rows, .. }
            | SequenceParallel::Usp { rows, .. } => rows,
        }
    }

    /// `"Ulysses"`, `"Ring"` or `"none"`.
    pub fn name(&self) -> &'static str {
        match self {
            SequenceParallel::None => "none",
            SequenceParallel::Ulysses { .. } => "Ulysses",
            SequenceParallel::Ring { .. } => "Ring",
            SequenceParallel::Usp { .. } => "USP",
        }
    }
}
