//! Where a forward's time goes, op by op: a `tracing` layer that sums the time spent inside the
//! model's per-op spans (target [`model::OP_TARGET`]: `qkv`, `attend`, `fc1_gelu`, ...), for
//! `pipefuse bench forward --op-times`. The spans are `trace` level and cost nothing unless this
//! layer is installed.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::span::Id;
use tracing::Subscriber;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// Calls and time inside each op span since the last [`take`].
static TOTALS: Mutex<BTreeMap<&'static str, (u64, Duration)>> = Mutex::new(BTreeMap::new());

/// The layer; install it with a filter that passes only [`model::OP_TARGET`] at `trace`.
pub(crate) struct OpTimes;

/// When the span was entered.
struct Entered(Instant);

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for OpTimes {
    fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().replace(Entered(Instant::now()));
        }
    }

    fn on_exit(&self, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let Some(Entered(at)) = span.extensions_mut().remove::<Entered>() else {
            return;
        };
        let mut totals = TOTALS.lock().unwrap_or_else(|p| p.into_inner());
        let e = totals.entry(span.name()).or_default();
        e.0 += 1;
        e.1 += at.elapsed();
    }
}

/// The sums since the last call (by op name), and a fresh start.
pub(crate) fn take() -> BTreeMap<&'static str, (u64, Duration)> {
    std::mem::take(&mut *TOTALS.lock().unwrap_or_else(|p| p.into_inner()))
}
