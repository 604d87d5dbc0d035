//! [`Fault`]: deliberate failures for tests and chaos drills (they fire in a cluster's first
//! run only, so a test can check that the cluster recovers; a straggler stays slow). A process
//! reads one from the `PIPEFUSE_FAULT` environment variable ([`Fault::from_env`]).

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
    /// Every work item on this device takes `millis` longer, in every run (a straggler: a slower
    /// or overloaded device).
    Straggler {
        /// Device index.
        device: usize,
        /// Extra milliseconds per item.
        millis: u64,
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

impl Fault {
    /// A fault from the `PIPEFUSE_FAULT` environment variable, for chaos drills on real
    /// processes: `straggler:DEVICE:MILLIS`, `hang:DEVICE:STEP:SECS`, `error:DEVICE:STEP` or
    /// `panic:DEVICE:STEP`. `Ok(None)` when unset; an error names what is wrong.
    pub fn from_env() -> Result<Option<Fault>, String> {
        match std::env::var("PIPEFUSE_FAULT") {
            Ok(v) if !v.is_empty() => Self::parse(&v).map(Some),
            _ => Ok(None),
        }
    }

    /// Parses the `PIPEFUSE_FAULT` syntax (see [`Fault::from_env`]).
    pub fn parse(text: &str) -> Result<Fault, String> {
        let bad = || {
            format!(
                "PIPEFUSE_FAULT={text:?}: expected straggler:DEVICE:MILLIS, hang:DEVICE:STEP:SECS, \
                 error:DEVICE:STEP or panic:DEVICE:STEP"
            )
        };
        let parts: Vec<&str> = text.split(':').collect();
        let n = |i: usize| -> Result<u64, String> {
            parts.get(i).and_then(|p| p.parse().ok()).ok_or_else(bad)
        };
        let fault = match (parts[0], parts.len()) {
            ("straggler", 3) => Fault::Straggler {
                device: n(1)? as usize,
                millis: n(2)?,
            },
            ("hang", 4) => Fault::HangAt {
                device: n(1)? as usize,
                step: n(2)? as usize,
                secs: n(3)?,
            },
            ("error", 3) => Fault::ErrorAt {
                device: n(1)? as usize,
                step: n(2)? as usize,
            },
            ("panic", 3) => Fault::PanicAt {
                device: n(1)? as usize,
                step: n(2)? as usize,
            },
            _ => return Err(bad()),
        };
        Ok(fault)
    }
}

#[cfg(test)]
mod tests {
    use super::Fault;

    #[test]
    fn the_environment_syntax_parses_and_bad_text_is_named() {
        assert_eq!(
            Fault::parse("straggler:1:20"),
            Ok(Fault::Straggler {
                device: 1,
                millis: 20
            })
        );
        assert_eq!(
            Fault::parse("hang:0:3:2"),
            Ok(Fault::HangAt {
                device: 0,
                step: 3,
                secs: 2
            })
        );
        for bad in ["straggler:1", "slow:1:2", "hang:a:1:1", "error:1:2:3", ""] {
            let e = Fault::parse(bad).unwrap_err();
            assert!(e.contains("PIPEFUSE_FAULT"), "{e}");
        }
    }
}
