//! A mutation fuzzer on the stable toolchain (cargo-fuzz and libFuzzer need nightly; AFL and
//! honggfuzz need their own toolchains, which the README's two set-up commands do not install).
//! Each [`Target`] is one decoder of bytes that come from outside the process (frames, control
//! messages, the handshake, topology TOML, safetensors headers, model and scheduler configs,
//! request payloads); [`Campaign`] feeds it mutations of valid seeds and keeps, as new seeds,
//! inputs that end in an error not seen before (a cheap stand-in for coverage feedback). A
//! finding is a panic, or one allocation above [`alloc_limit`] for the input (an unbounded
//! allocation driven by a length field); both name the input, which is kept for a regression
//! test.

mod alloc;
mod mutate;
pub mod targets;

pub use alloc::{take_largest_allocation, GuardedAlloc};
pub use mutate::Mutator;

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

/// A decoder: `Ok` (accepted) or `Err` (refused with a reason).
pub type Decoder = Box<dyn Fn(&[u8]) -> Result<(), String> + Send + Sync>;

/// One decoder under test.
pub struct Target {
    /// Short name (the command line selects targets by it).
    pub name: &'static str,
    /// Valid inputs to mutate.
    pub seeds: Vec<Vec<u8>>,
    /// Whether the input is text (TOML, JSON): text mutations are added.
    pub text: bool,
    /// Mutate only the first this many bytes (a file's header; 0: anywhere).
    pub focus: usize,
    /// The decoder: `Ok` (accepted) or `Err` (refused with a reason). A panic is a finding.
    pub run: Decoder,
}

/// The largest single allocation allowed while decoding `input_len` bytes: 64 MiB, or 64 times
/// the input (a decoder may allocate in proportion to what it was given, never to what a length
/// field claims).
pub fn alloc_limit(input_len: usize) -> usize {
    (64 << 20).max(64 * input_len)
}

/// Something wrong that a fuzz input provoked.
#[derive(Debug, Clone)]
pub struct Finding {
    /// The target.
    pub target: &'static str,
    /// What happened.
    pub what: String,
    /// The input.
    pub input: Vec<u8>,
}

/// What a campaign on one target did.
#[derive(Debug, Clone)]
pub struct Report {
    /// The target.
    pub target: &'static str,
    /// Inputs run.
    pub inputs: u64,
    /// Of those, accepted by the decoder (the rest were refused with a reason).
    pub accepted: u64,
    /// Distinct refusal reasons seen (first words of each message).
    pub reasons: usize,
    /// Seeds at the end (the given ones and those kept).
    pub corpus: usize,
    /// Wall time.
    pub elapsed: Duration,
    /// Panics and oversized allocations.
    pub findings: Vec<Finding>,
}

impl Report {
    /// Inputs per second.
    pub fn rate(&self) -> f64 {
        self.inputs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// How long a campaign runs.
#[derive(Debug, Clone, Copy)]
pub enum Budget {
    /// This many inputs.
    Inputs(u64),
    /// This long.
    Time(Duration),
}

/// Runs mutated inputs through one target.
pub struct Campaign {
    /// The mutator (its seed makes a campaign repeatable).
    pub mutator: Mutator,
    /// Most seeds kept.
    pub max_corpus: usize,
}

impl Campaign {
    /// A campaign whose inputs follow from `seed`.
    pub fn new(seed: u64) -> Campaign {
        Campaign {
            mutator: Mutator::new(seed),
            max_corpus: 256,
        }
    }

    /// Runs `target` for `budget`. Every seed runs first, unmutated.
    pub fn run(&mut self, target: &Target, budget: Budget) -> Report {
        let t0 = Instant::now();
        let mut corpus = target.seeds.clone();
        let mut reasons = HashSet::new();
        let (mut inputs, mut accepted) = (0u64, 0u64);
        let mut findings = Vec::new();
        let done = |inputs: u64| match budget {
            Budget::Inputs(n) => inputs >= n,
            Budget::Time(d) => inputs % 64 == 0 && t0.elapsed() >= d,
        };
        let mut next_seed = 0;
        while !done(inputs) {
            let input = if next_seed < target.seeds.len() {
                next_seed += 1;
                target.seeds[next_seed - 1].clone()
            } else {
                self.mutator.mutate(&corpus, target.text, target.focus)
            };
            inputs += 1;
            take_largest_allocation();
            let limit = alloc_limit(input.len());
            let _armed = alloc::arm(limit);
            let r = catch_unwind(AssertUnwindSafe(|| (target.run)(&input)));
            drop(_armed);
            let largest = take_largest_allocation();
            if largest > limit {
                findings.push(Finding {
                    target: target.name,
                    what: format!(
                        "allocated {largest} bytes at once for a {}-byte input",
                        input.len()
                    ),
                    input: input.clone(),
                });
            }
            match r {
                Ok(Ok(())) => accepted += 1,
                Ok(Err(reason)) => {
                    // The reason without its numbers: one kind per message, whatever the
                    // values in it.
                    let key: String = reason
                        .chars()
                        .filter(|c| !c.is_ascii_digit())
                        .take(80)
                        .collect();
                    if reasons.insert(key) && corpus.len() < self.max_corpus {
                        corpus.push(input);
                    }
                }
                Err(p) => {
                    let msg = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".into());
                    findings.push(Finding {
                        target: target.name,
                        what: format!("panicked: {msg}"),
                        input,
                    });
                }
            }
        }
        Report {
            target: target.name,
            inputs,
            accepted,
            reasons: reasons.len(),
            corpus: corpus.len(),
            elapsed: t0.elapsed(),
            findings,
        }
    }
}
