//! Cluster topology files, the parallel plan, and the PipeFusion schedule as a pure state machine.
//!
//! Invariant: this crate performs no I/O after parsing and knows no clock, socket or runtime:
//! time enters [`schedule::StageSchedule`] as an explicit `now`, outputs leave through `poll_*`.
//!
//! Key types: [`ClusterSpec`] (a topology TOML file, validated, with file/line/field errors),
//! [`Plan`] (who owns which layers, the patch table) and its [`DeviceRole`]s (each device's
//! stage, pipeline, CFG partner and sequence-parallel group), [`schedule::StageSchedule`] (what one
//! pipeline stage runs next, what it sends where, when a step completes).

mod error;
mod plan;
mod plan_report;
mod plan_sp;
mod role;
pub mod schedule;
mod shape;
mod spec;

pub use error::{Result, TopologyError};
pub use plan::*;
pub use plan_report::human_bytes;
pub use plan_sp::SequenceParallel;
pub use role::{CfgRole, DeviceRole, SpRole};
pub use shape::{patch_rows, split_layers, ModelShape};
pub use spec::*;
