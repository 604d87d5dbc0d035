//! [`Fault`]: deliberate failures for tests and chaos drills (they fire in a cluster's first
//! request only, so a test can check that the cluster recovers).

/// A deliberate failure, for testing how the cluster reports a broken device. It fires in the
/// cluster's first request only, so tests can check that the cluster recovers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The device's compute returns an error at this step.
    ErrorAt {
        /// Device index.
        device: usize,
        /// Step.
        step: usize,
    },
    /// The device's compute thread panics at this step.
    PanicAt {
        /// Device index.
        device: usize,
        /// Step.
        step: usize,
    },
    /// The device *actor* (not its compute thread) panics when it launches this step: exercises
    /// the coordinator's supervision of its linked devices.
    ActorPanicAt {
        /// Device index.
        device: usize,
        /// Step.
        step: usize,
    },
    /// The coordinator sends this device its `Begin` `millis` late (peers that began first may
    /// send it frames before its Begin arrives).
    SlowBegin {
        /// Device index.
        device: usize,
        /// Extra milliseconds.
        millis: u64,
    },
    /// The coordinator interrupts the request after step `step` (0-based) is done and resumes
    /// it from its newest checkpoint on the same devices, as after a node loss but without
    /// re-planning: exercises checkpoints and continuations in one process.
    ResumeAfter {
        /// The step after which to interrupt.
        step: usize,
    },
    /// The device's compute hangs for `secs` at this step (a straggler or a wedged device).
    HangAt {
        /// Device index.
        device: usize,
        /// Step.
        step: usize,
        /// How long.
        secs: u64,
    },
}
