//! `SimCluster`: N stage schedules driven on a virtual clock, with deterministic knobs for
//! compute times, link latency, jitter, a straggler, dropped messages and lost stages.

use std::collections::BTreeMap;
use std::time::Duration;

use super::rng::XorShift;
use crate::schedule::{
    Part, ScheduleConfig, ScheduleFailure, StageAction, StageSchedule, WorkItem,
};

/// Compute time of `item` on `stage`.
pub(super) type ComputeFn = Box<dyn Fn(usize, WorkItem) -> Duration>;
/// Latency of the link `from -> to`.
pub(super) type LatencyFn = Box<dyn Fn(usize, usize) -> Duration>;

#[derive(Debug, Clone, Copy)]
enum Event {
    /// An input arrives at `to`; `send` indexes `sends` (`None`: from the request).
    Deliver {
        to: usize,
        label: WorkItem,
        send: Option<usize>,
    },
    ComputeDone {
        stage: usize,
        item: WorkItem,
    },
    Timer {
        stage: usize,
    },
    /// `stage` dies; every other stage is told.
    Kill {
        stage: usize,
    },
    PeerLost {
        stage: usize,
        peer: usize,
    },
}

/// One launch: `end` is set when its compute completes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Launch {
    pub(super) stage: usize,
    pub(super) item: WorkItem,
    pub(super) start: Duration,
    pub(super) end: Option<Duration>,
}

/// One `Send` action (or a request input, `from: None`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Sent {
    pub(super) from: Option<usize>,
    pub(super) to: usize,
    pub(super) label: WorkItem,
    pub(super) at: Duration,
    pub(super) delivered: Option<Duration>,
    pub(super) dropped: bool,
}

/// N stage schedules, a virtual clock and an event queue ordered by (time, sequence number).
pub(super) struct SimCluster {
    pub(super) cfg: ScheduleConfig,
    pub(super) stages: Vec<StageSchedule>,
    pub(super) now: Duration,
    queue: BTreeMap<(Duration, u64), Event>,
    seq: u64,
    started: bool,
    compute: ComputeFn,
    latency: LatencyFn,
    straggler: Option<(usize, u32)>,
    jitter: Option<(XorShift, u64)>,
    drops: Vec<(usize, WorkItem)>,
    whole_request: bool,
    dead: Vec<bool>,
    armed: Vec<Option<Duration>>,
    pub(super) launches: Vec<Launch>,
    pub(super) sends: Vec<Sent>,
    pub(super) step_done: Vec<(usize, Duration)>,
    pub(super) finished: Vec<(usize, Duration)>,
    pub(super) failures: Vec<(usize, ScheduleFailure, Duration)>,
    pub(super) events: usize,
}

pub(super) fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

impl SimCluster {
    /// Every item takes 1 ms, links are instant, the stall timeout is an hour.
    pub(super) fn new(cfg: ScheduleConfig) -> Self {
        Self::with_timeout(cfg, Duration::from_secs(3600))
    }

    pub(super) fn with_timeout(cfg: ScheduleConfig, stall_timeout: Duration) -> Self {
        let stages = (0..cfg.stages)
            .map(|s| StageSchedule::new(cfg, s, stall_timeout).expect("valid config"))
            .collect();
        Self {
            cfg,
            stages,
            now: Duration::ZERO,
            queue: BTreeMap::new(),
            seq: 0,
            started: false,
            compute: Box::new(|_, _| ms(1)),
            latency: Box::new(|_, _| Duration::ZERO),
            straggler: None,
            jitter: None,
            drops: Vec::new(),
            whole_request: false,
            dead: vec![false; cfg.stages],
            armed: vec![None; cfg.stages],
            launches: Vec::new(),
            sends: Vec::new(),
            step_done: Vec::new(),
            finished: Vec::new(),
            failures: Vec::new(),
            events: 0,
        }
    }

    pub(super) fn compute(mut self, f: impl Fn(usize, WorkItem) -> Duration + 'static) -> Self {
        self.compute = Box::new(f);
        self
    }

    pub(super) fn latency(mut self, f: impl Fn(usize, usize) -> Duration + 'static) -> Self {
        self.latency = Box::new(f);
        self
    }

    /// `stage` computes `factor` times slower.
    pub(super) fn straggler(mut self, stage: usize, factor: u32) -> Self {
        self.straggler = Some((stage, factor));
        self
    }

    /// Adds `0..=max_us` microseconds to every message, so messages can overtake each other.
    pub(super) fn jitter(mut self, seed: u64, max_us: u64) -> Self {
        self.jitter = Some((XorShift::new(seed), max_us + 1));
        self
    }

    /// The message to `to` labelled `(step, part)` is lost.
    pub(super) fn drop_message(mut self, to: usize, step: usize, part: Part) -> Self {
        self.drops.push((to, WorkItem { step, part }));
        self
    }

    /// The request hands stage 0 one whole-latent input for step 0 (even if it is patched).
    pub(super) fn whole_request_input(mut self) -> Self {
        self.whole_request = true;
        self
    }

    /// Stage `stage` dies at `at`; the others get `handle_peer_lost` at the same time.
    pub(super) fn kill_at(mut self, at: Duration, stage: usize) -> Self {
        self.push(at, Event::Kill { stage });
        self
    }

    pub(super) fn link_latency(&self, from: usize, to: usize) -> Duration {
        (self.latency)(from, to)
    }

    fn push(&mut self, at: Duration, ev: Event) {
        self.queue.insert((at, self.seq), ev);
        self.seq += 1;
    }

    fn start(&mut self) {
        self.started = true;
        let parts = if self.whole_request {
            vec![Part::Whole]
        } else {
            self.cfg.parts(0)
        };
        for part in parts {
            let label = WorkItem { step: 0, part };
            self.sends.push(Sent {
                from: None,
                to: 0,
                label,
                at: Duration::ZERO,
                delivered: None,
                dropped: false,
            });
            let send = Some(self.sends.len() - 1);
            self.push(Duration::ZERO, Event::Deliver { to: 0, label, send });
        }
    }

    /// Whether every live stage has finished or failed.
    pub(super) fn all_done(&self) -> bool {
        self.stages
            .iter()
            .zip(&self.dead)
            .all(|(s, dead)| *dead || s.is_finished() || s.is_failed())
    }

    /// Processes one event; `false` if the queue was empty.
    pub(super) fn step(&mut self) -> bool {
        if !self.started {
            self.start();
        }
        let Some(((at, _), ev)) = self.queue.pop_first() else {
            return false;
        };
        assert!(at >= self.now, "virtual clock went backwards");
        self.now = at;
        self.events += 1;
        let now = at;
        let stage = match ev {
            Event::Deliver { to, .. } | Event::Timer { stage: to } => to,
            Event::ComputeDone { stage, .. } | Event::PeerLost { stage, .. } => stage,
            Event::Kill { stage } => stage,
        };
        if self.dead[stage] {
            return true;
        }
        match ev {
            Event::Deliver { to, label, send } => {
                if let Some(i) = send {
                    self.sends[i].delivered = Some(now);
                }
                self.stages[to]
                    .handle_input(now, label.step, label.part)
                    .unwrap_or_else(|e| panic!("input {label} at stage {to}: {e}"));
            }
            Event::ComputeDone { stage, item } => {
                let launch = self.launches.iter_mut().rev().find(|l| l.stage == stage);
                launch.expect("a launch").end = Some(now);
                self.stages[stage]
                    .handle_compute_done(now, item)
                    .unwrap_or_else(|e| panic!("compute done {item} at stage {stage}: {e}"));
            }
            Event::Timer { stage } => {
                if self.armed[stage] == Some(now) {
                    self.armed[stage] = None;
                }
                if self.stages[stage].poll_timeout().is_some_and(|d| d <= now) {
                    self.stages[stage].handle_timeout(now);
                }
            }
            Event::Kill { stage } => {
                self.dead[stage] = true;
                for peer in (0..self.cfg.stages).filter(|&s| s != stage) {
                    self.push(
                        now,
                        Event::PeerLost {
                            stage: peer,
                            peer: stage,
                        },
                    );
                }
                return true;
            }
            Event::PeerLost { stage, peer } => self.stages[stage].handle_peer_lost(now, peer),
        }
        self.drain(stage);
        true
    }

    /// Runs until every stage has finished or failed, or no event is left.
    pub(super) fn drive(&mut self) {
        while !self.all_done() && self.step() {}
    }

    /// Like `drive`, but at most `max_events` events; returns whether all stages are done.
    pub(super) fn drive_bounded(&mut self, max_events: usize) -> bool {
        for _ in 0..max_events {
            if self.all_done() || !self.step() {
                break;
            }
        }
        self.all_done()
    }

    /// Carries out every action of `stage`, checking the documented poll order, then re-arms
    /// its stall timer.
    fn drain(&mut self, stage: usize) {
        let now = self.now;
        let mut last_rank = 0;
        while let Some(action) = self.stages[stage].poll_action() {
            let rank = match action {
                StageAction::Send { .. } => 1,
                StageAction::StepDone { .. } => 2,
                StageAction::Finished => 3,
                StageAction::Launch(_) => 4,
                StageAction::Failed(_) => 5,
            };
            assert!(
                rank > last_rank,
                "stage {stage}: {action:?} out of poll order"
            );
            last_rank = rank;
            match action {
                StageAction::Launch(item) => {
                    let factor = match self.straggler {
                        Some((s, f)) if s == stage => f,
                        _ => 1,
                    };
                    let end = now + (self.compute)(stage, item) * factor;
                    self.launches.push(Launch {
                        stage,
                        item,
                        start: now,
                        end: None,
                    });
                    self.push(end, Event::ComputeDone { stage, item });
                }
                StageAction::Send { to, step, part } => {
                    self.send(stage, to, WorkItem { step, part })
                }
                StageAction::StepDone { step } => self.step_done.push((step, now)),
                StageAction::Finished => self.finished.push((stage, now)),
                StageAction::Failed(f) => self.failures.push((stage, f, now)),
            }
        }
        if let Some(deadline) = self.stages[stage].poll_timeout() {
            if self.armed[stage] != Some(deadline) {
                self.armed[stage] = Some(deadline);
                self.push(deadline, Event::Timer { stage });
            }
        }
    }

    fn send(&mut self, from: usize, to: usize, label: WorkItem) {
        let dropped = self.drops.contains(&(to, label));
        self.sends.push(Sent {
            from: Some(from),
            to,
            label,
            at: self.now,
            delivered: None,
            dropped,
        });
        if dropped {
            return;
        }
        let extra = match &mut self.jitter {
            Some((rng, span)) => Duration::from_micros(rng.below(*span)),
            None => Duration::ZERO,
        };
        let at = self.now + (self.latency)(from, to) + extra;
        let send = Some(self.sends.len() - 1);
        self.push(at, Event::Deliver { to, label, send });
    }

    /// Time the last stage finished (the request's latency).
    pub(super) fn makespan(&self) -> Duration {
        self.finished.iter().map(|f| f.1).max().unwrap_or_default()
    }

    /// Fraction of stage-time spent idle over the makespan: `1 - sum(busy) / (N * makespan)`.
    pub(super) fn bubble_fraction(&self) -> f64 {
        let busy: Duration = self.stages.iter().map(|s| s.stats().busy).sum();
        let total = self.makespan().as_secs_f64() * self.cfg.stages as f64;
        1.0 - busy.as_secs_f64() / total
    }
}
