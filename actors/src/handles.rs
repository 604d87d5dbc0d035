//! How the coordinator and the devices reach each other: directly (actors in this process) or
//! through a remote proxy (control messages to another node). The coordinator and device actors
//! are written against these handles only, so a cluster can mix local and remote stages.

use std::sync::Arc;
use std::time::Duration;

use ractor::ActorRef;
use topology::schedule::ScheduleConfig;
use transport::BoxFuture;

use crate::messages::{CoordinatorMessage, DeviceMessage};
use crate::stage::RequestSetup;

/// A device actor on another node, driven by control messages.
pub(crate) trait RemoteDevice: Send + Sync {
    /// Begins `setup` on the remote device; resolves when it has acknowledged (or refused).
    fn begin(
        &self,
        setup: Arc<RequestSetup>,
        schedule: ScheduleConfig,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<(), String>>;
    /// Drops the remote device's current request.
    fn abort(&self, request: u64);
}

/// Restarts the devices of a multi-node cluster in a new layout (after a node was lost or came
/// back): every other member restarts its devices (asked over the control plane, answered when
/// they run), and the coordinator's own devices come back as slots for it to spawn.
pub(crate) trait Reconfigurer: Send + Sync {
    /// Every member's devices in `layout`'s roles; `floor` is the newest run id begun so far.
    /// Returns the coordinator's slots in the layout's order, or why a member could not.
    fn reconfigure(
        &self,
        layout: crate::replan::Layout,
        floor: u64,
    ) -> BoxFuture<'_, Result<Vec<crate::coordinator::StageSlot>, String>>;
}

/// The coordinator's view of one stage's device.
#[derive(Clone)]
pub(crate) enum DeviceHandle {
    /// An actor in this process (spawned linked to the coordinator).
    Local(ActorRef<DeviceMessage>),
    /// A device on another node.
    Remote(Arc<dyn RemoteDevice>),
}

impl DeviceHandle {
    /// Begins a request on the device, within `timeout`.
    pub(crate) async fn begin(
        &self,
        setup: Arc<RequestSetup>,
        schedule: ScheduleConfig,
        timeout: Duration,
    ) -> Result<(), String> {
        match self {
            DeviceHandle::Local(d) => {
                let ms = timeout.as_millis() as u64;
                match ractor::call_t!(
                    d,
                    |reply| DeviceMessage::Begin {
                        setup,
                        schedule,
                        reply
                    },
                    ms
                ) {
                    Ok(r) => r,
                    Err(e) => Err(format!(
                        "no answer within {ms} ms (still busy with an earlier request?): {e}"
                    )),
                }
            }
            DeviceHandle::Remote(r) => r.begin(setup, schedule, timeout).await,
        }
    }

    /// Drops the device's current request (no answer expected).
    pub(crate) fn abort(&self, request: u64) {
        match self {
            DeviceHandle::Local(d) => {
                let _ = d.cast(DeviceMessage::Abort { request });
            }
            DeviceHandle::Remote(r) => r.abort(request),
        }
    }

    /// The local actor, if any (supervision events identify actors).
    pub(crate) fn local(&self) -> Option<&ActorRef<DeviceMessage>> {
        match self {
            DeviceHandle::Local(d) => Some(d),
            DeviceHandle::Remote(_) => None,
        }
    }
}

/// A device's view of the coordinator.
#[derive(Clone)]
pub(crate) enum CoordinatorHandle {
    /// The coordinator actor in this process.
    Local(ActorRef<CoordinatorMessage>),
    /// The coordinator on another node: each report becomes a control message.
    Remote(Arc<dyn Fn(CoordinatorMessage) + Send + Sync>),
}

impl CoordinatorHandle {
    /// Sends a report (progress, completion, failure); never blocks.
    pub(crate) fn report(&self, msg: CoordinatorMessage) {
        match self {
            CoordinatorHandle::Local(c) => {
                let _ = c.cast(msg);
            }
            CoordinatorHandle::Remote(f) => f(msg),
        }
    }
}
