//! `/metrics` of `pipefuse serve`, in the OpenMetrics text format that Prometheus scrapes
//! (through `prometheus-client`): requests by outcome, queue depth, step and request latency,
//! each device's busy / exchange-wait / bubble time and bytes sent, and bytes per link.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use actors::RunSummary;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// How a request ended, as counted in `pipefuse_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Outcome {
    /// Images returned.
    Succeeded,
    /// Failed with a reason (including the cluster breaking).
    Failed,
    /// Did not finish within its deadline.
    TimedOut,
    /// Cancelled (`DELETE`, the client went away, the server stopped).
    Cancelled,
    /// Refused with 429: the queue was full.
    Rejected,
    /// Refused with 400: the request was not valid.
    Invalid,
    /// Refused with 503: the cluster is broken or the server is stopping.
    Unavailable,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::TimedOut => "timed_out",
            Outcome::Cancelled => "cancelled",
            Outcome::Rejected => "rejected",
            Outcome::Invalid => "invalid",
            Outcome::Unavailable => "unavailable",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabel {
    device: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LinkLabel {
    from: String,
    to: String,
}

type Seconds = Counter<f64, AtomicU64>;

/// Every metric the server exports.
pub(crate) struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<OutcomeLabel, Counter>,
    queue_depth: Gauge,
    running: Gauge,
    step_seconds: Histogram,
    request_seconds: Histogram,
    refusal_seconds: Histogram,
    busy: Family<DeviceLabel, Seconds>,
    exchange_wait: Family<DeviceLabel, Seconds>,
    bubble: Family<DeviceLabel, Seconds>,
    sent: Family<DeviceLabel, Counter>,
    link: Family<LinkLabel, Counter>,
}

impl Metrics {
    /// Registers every metric (all outcomes appear from the start, at 0).
    pub(crate) fn new() -> Metrics {
        let mut r = Registry::with_prefix("pipefuse");
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            requests: Family::default(),
            queue_depth: Gauge::default(),
            running: Gauge::default(),
            step_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            request_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
            refusal_seconds: Histogram::new([0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0]),
            busy: Family::default(),
            exchange_wait: Family::default(),
            bubble: Family::default(),
            sent: Family::default(),
            link: Family::default(),
        };
        r.register(
            "requests",
            "Image requests by how they ended",
            m.requests.clone(),
        );
        r.register(
            "queue_depth",
            "Requests waiting for the cluster",
            m.queue_depth.clone(),
        );
        r.register(
            "requests_running",
            "Requests running on the cluster",
            m.running.clone(),
        );
        r.register(
            "step_seconds",
            "Time of one denoising step (all patches, all stages)",
            m.step_seconds.clone(),
        );
        r.register(
            "request_seconds",
            "Time of a request on the cluster, from start to its last step",
            m.request_seconds.clone(),
        );
        r.register(
            "refusal_seconds",
            "Time from a request's arrival to its 429 or 503 answer (queue full, cluster broken, stopping)",
            m.refusal_seconds.clone(),
        );
        r.register(
            "device_busy_seconds",
            "Time each device spent computing",
            m.busy.clone(),
        );
        r.register(
            "device_exchange_wait_seconds",
            "Time each device spent waiting inside exchanges (CFG swap, sequence-parallel collectives)",
            m.exchange_wait.clone(),
        );
        r.register(
            "device_bubble_seconds",
            "Time each device spent idle during requests (pipeline fill and drain, waiting for inputs)",
            m.bubble.clone(),
        );
        r.register(
            "device_sent_bytes",
            "Bytes each device sent to its peers",
            m.sent.clone(),
        );
        r.register(
            "link_sent_bytes",
            "Bytes sent on each link between devices (from, to)",
            m.link.clone(),
        );
        for o in [
            Outcome::Succeeded,
            Outcome::Failed,
            Outcome::TimedOut,
            Outcome::Cancelled,
            Outcome::Rejected,
            Outcome::Invalid,
            Outcome::Unavailable,
        ] {
            let _ = m.requests.get_or_create(&OutcomeLabel {
                outcome: o.label().into(),
            });
        }
        *m.registry.lock().unwrap_or_else(|e| e.into_inner()) = r;
        m
    }

    /// One request ended this way.
    pub(crate) fn count(&self, outcome: Outcome) {
        self.requests
            .get_or_create(&OutcomeLabel {
                outcome: outcome.label().into(),
            })
            .inc();
    }

    /// Requests waiting and running now.
    pub(crate) fn set_queue(&self, waiting: usize, running: usize) {
        self.queue_depth.set(waiting as i64);
        self.running.set(running as i64);
    }

    /// One denoising step took `secs`.
    pub(crate) fn step(&self, secs: f64) {
        self.step_seconds.observe(secs);
    }

    /// A request was refused (429 / 503) `secs` after it arrived.
    pub(crate) fn refusal(&self, secs: f64) {
        self.refusal_seconds.observe(secs);
    }

    /// A request's run on the cluster ended with this summary.
    pub(crate) fn run(&self, summary: &RunSummary) {
        let wall = summary.wall.as_secs_f64();
        self.request_seconds.observe(wall);
        for d in &summary.devices {
            let l = DeviceLabel {
                device: d.device.to_string(),
            };
            let (busy, wait) = (d.busy.as_secs_f64(), d.exchange_wait.as_secs_f64());
            self.busy.get_or_create(&l).inc_by(busy);
            self.exchange_wait.get_or_create(&l).inc_by(wait);
            self.bubble
                .get_or_create(&l)
                .inc_by((wall - busy - wait).max(0.0));
            self.sent.get_or_create(&l).inc_by(d.bytes_sent);
            for &(to, bytes) in &d.sent_to {
                let link = LinkLabel {
                    from: d.device.to_string(),
                    to: to.to_string(),
                };
                self.link.get_or_create(&link).inc_by(bytes);
            }
        }
    }

    /// The text Prometheus scrapes.
    pub(crate) fn encode(&self) -> String {
        let mut s = String::new();
        let r = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &r);
        s
    }
}
