//! Stages on other nodes: the coordinator's proxy for a remote device ([`RemoteProxy`]), the
//! conversion of device reports into control messages, and the control loop every node runs
//! (Begin / Abort for its local devices; on the coordinator's node, acknowledgements and reports
//! for the coordinator).

pub(crate) mod members;
pub(crate) mod spec;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use model::ModelConfig;
use ractor::ActorRef;
use tokio::sync::oneshot;
use topology::schedule::ScheduleConfig;
use transport::{BoxFuture, ControlMessage, QuicNode};

use crate::handles::RemoteDevice;
use crate::messages::{CoordinatorMessage, DeviceMessage, StageReport};
use crate::stage::RequestSetup;

/// Begin acknowledgements the coordinator's node is waiting for, by (request, device).
pub(crate) type PendingAcks =
    Arc<Mutex<HashMap<(u64, usize), oneshot::Sender<Result<(), String>>>>>;

/// The coordinator's handle on a device of another node.
pub(crate) struct RemoteProxy {
    pub(crate) node: String,
    pub(crate) device: usize,
    pub(crate) quic: Arc<QuicNode>,
    pub(crate) pending: PendingAcks,
}

impl RemoteDevice for RemoteProxy {
    fn begin(
        &self,
        setup: Arc<RequestSetup>,
        schedule: ScheduleConfig,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let spec = spec::encode_request(&setup, &schedule).map_err(|e| e.to_string())?;
            let (tx, rx) = oneshot::channel();
            let key = (setup.id, self.device);
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, tx);
            let msg = ControlMessage::Begin {
                request: setup.id,
                device: self.device as u32,
                spec,
            };
            if let Err(e) = self.quic.send_control(&self.node, &msg) {
                self.pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&key);
                return Err(format!("node {}: {e}", self.node));
            }
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err(format!("node {} went away before acknowledging", self.node)),
                Err(_) => {
                    self.pending
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&key);
                    Err(format!(
                        "node {} did not acknowledge within {:.1} s",
                        self.node,
                        timeout.as_secs_f64()
                    ))
                }
            }
        })
    }

    fn abort(&self, request: u64) {
        let _ = self
            .quic
            .send_control(&self.node, &ControlMessage::Abort { request });
    }
}

/// A device report as a control message for the coordinator's node.
pub(crate) fn report_message(msg: CoordinatorMessage) -> Option<ControlMessage> {
    Some(match msg {
        CoordinatorMessage::StepDone { request, step } => ControlMessage::StepDone {
            request,
            step: step as u32,
        },
        CoordinatorMessage::StageFinished {
            request,
            device,
            report,
        } => ControlMessage::StageFinished {
            request,
            device: device as u32,
            busy_ns: report.busy.as_nanos() as u64,
            exchange_wait_ns: report.exchange_wait.as_nanos() as u64,
            items: report.launched as u32,
            bytes_sent: report.bytes_sent,
            sent_to: report
                .sent_to
                .iter()
                .map(|&(peer, b)| (peer as u32, b))
                .collect(),
            latent: match report.latent.as_ref().map(spec::encode_latent).transpose() {
                Ok(l) => l,
                Err(e) => {
                    return Some(ControlMessage::DeviceFailed {
                        request,
                        device: device as u32,
                        step: None,
                        message: format!("final latent could not be encoded: {e}"),
                        lost_peer: None,
                    })
                }
            },
        },
        CoordinatorMessage::DeviceFailed {
            request,
            device,
            step,
            message,
            lost_peer,
        } => ControlMessage::DeviceFailed {
            request,
            device: device as u32,
            step: step.map(|s| s as u32),
            message,
            lost_peer: lost_peer.map(|d| d as u32),
        },
        CoordinatorMessage::Checkpoint {
            request,
            device,
            step,
            latent,
            history,
        } => {
            let encoded = spec::encode_latent(&latent)
                .and_then(|l| Ok((l, history.as_ref().map(spec::encode_latent).transpose()?)));
            match encoded {
                Ok((latent, history)) => ControlMessage::Checkpoint {
                    request,
                    device: device as u32,
                    step: step as u32,
                    latent,
                    history,
                },
                // A checkpoint is an optimisation: without it a resume starts earlier.
                Err(e) => {
                    tracing::warn!(request, step, %e, "checkpoint not sent");
                    return None;
                }
            }
        }
        _ => return None,
    })
}

/// What a node's control loop serves.
pub(crate) struct ControlContext {
    pub(crate) quic: Arc<QuicNode>,
    pub(crate) config: ModelConfig,
    /// This node's device actors (none on the coordinator's node, whose devices the
    /// coordinator runs).
    pub(crate) devices: Arc<members::LocalDevices>,
    /// On the coordinator's node: reconfiguration answers awaited.
    pub(crate) reconfig_acks: members::ReconfigAcks,
    /// The coordinator, on the coordinator's node.
    pub(crate) coordinator: Option<ActorRef<CoordinatorMessage>>,
    pub(crate) pending: PendingAcks,
    pub(crate) begin_timeout: Duration,
    /// The coordinator's node: the only one whose Begin / Abort are obeyed.
    pub(crate) coordinator_node: String,
    /// On the coordinator's node: which nodes are ready.
    pub(crate) readiness: Arc<Readiness>,
    /// The cluster (for the plan of each request's memory check) and this node's name.
    pub(crate) spec: Arc<topology::ClusterSpec>,
    pub(crate) node: String,
}

impl ControlContext {
    /// Handles one control message from node `from`.
    pub(crate) async fn handle(&self, from: &str, msg: ControlMessage) {
        if matches!(
            msg,
            ControlMessage::Begin { .. }
                | ControlMessage::Abort { .. }
                | ControlMessage::Reconfigure { .. }
        ) && from != self.coordinator_node
        {
            tracing::warn!(
                node = from,
                msg = msg.name(),
                "only the coordinator's node may send this; ignored"
            );
            return;
        }
        match msg {
            ControlMessage::Begin {
                request,
                device,
                spec,
            } => {
                let error = self
                    .begin_local(request, device as usize, &spec)
                    .await
                    .err();
                let ack = ControlMessage::BeginAck {
                    request,
                    device,
                    error,
                };
                if let Err(e) = self.quic.send_control(from, &ack) {
                    tracing::warn!(node = from, %e, "could not acknowledge a begin");
                }
            }
            ControlMessage::BeginAck {
                request,
                device,
                error,
            } => {
                let waiter = self
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&(request, device as usize));
                if let Some(tx) = waiter {
                    let _ = tx.send(error.map_or(Ok(()), Err));
                }
            }
            ControlMessage::NodeReady { node, .. } => {
                if node == from {
                    self.readiness
                        .ready
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(node.clone());
                    self.readiness.changed.notify_waiters();
                    // A node that comes back (the coordinator ignores one it counts already).
                    if let Some(c) = &self.coordinator {
                        let _ = c.cast(CoordinatorMessage::NodeJoined { node });
                    }
                }
            }
            ControlMessage::Abort { request } => {
                for d in self.devices.actors().values() {
                    let _ = d.cast(DeviceMessage::Abort { request });
                }
            }
            ControlMessage::Reconfigure {
                epoch,
                members,
                floor,
            } => {
                let error = self
                    .devices
                    .restart(&members, floor)
                    .await
                    .err()
                    .map(|e| format!("node {}: {e}", self.node));
                if let Some(e) = &error {
                    tracing::error!(%e, "could not restart the devices in the new layout");
                }
                let answer = ControlMessage::Reconfigured { epoch, error };
                if let Err(e) = self.quic.send_control(from, &answer) {
                    tracing::warn!(node = from, %e, "could not answer a reconfiguration");
                }
            }
            ControlMessage::Reconfigured { epoch, error } => {
                let waiter = self
                    .reconfig_acks
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&(epoch, from.to_string()));
                if let Some(tx) = waiter {
                    let _ = tx.send(error.map_or(Ok(()), Err));
                }
            }
            other => self.to_coordinator(from, other),
        }
    }

    async fn begin_local(&self, request: u64, device: usize, spec: &[u8]) -> Result<(), String> {
        let devices = self.devices.actors();
        let d = devices
            .get(&device)
            .ok_or_else(|| format!("device {device} does not run on this node"))?;
        let (setup, schedule) =
            spec::decode_request(&self.config, request, spec).map_err(|e| e.to_string())?;
        // The coordinator checked its own process's share at submit; each other node checks
        // its share here, once per request (at its first device's Begin).
        if devices.keys().min() == Some(&device) {
            self.check_memory(&setup.request)
                .map_err(|e| format!("node {}: {e}", self.node))?;
        }
        let ms = self.begin_timeout.as_millis() as u64;
        ractor::call_t!(
            d,
            |reply| DeviceMessage::Begin {
                setup,
                schedule,
                reply
            },
            ms
        )
        .map_err(|e| format!("device {device} did not begin: {e}"))?
    }

    /// `request`'s memory on this node's devices against what this host can still give.
    fn check_memory(&self, request: &model::Request) -> crate::error::Result<()> {
        let Some(host) = kernels::host_memory() else {
            return Ok(());
        };
        crate::cluster::request_memory(&self.spec, &self.config, request, |r| {
            self.devices.actors().contains_key(&r)
        })?
        .check(&host)
    }

    fn to_coordinator(&self, from: &str, msg: ControlMessage) {
        let Some(c) = &self.coordinator else {
            tracing::warn!(
                node = from,
                "a report reached a node without the coordinator"
            );
            return;
        };
        let m = match msg {
            ControlMessage::StepDone { request, step } => CoordinatorMessage::StepDone {
                request,
                step: step as usize,
            },
            ControlMessage::StageFinished {
                request,
                device,
                busy_ns,
                exchange_wait_ns,
                items,
                bytes_sent,
                sent_to,
                latent,
            } => {
                let latent = match latent.as_deref().map(spec::decode_latent).transpose() {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = c.cast(CoordinatorMessage::DeviceFailed {
                            request,
                            device: device as usize,
                            step: None,
                            message: format!("node {from} sent an unusable final latent: {e}"),
                            lost_peer: None,
                        });
                        return;
                    }
                };
                CoordinatorMessage::StageFinished {
                    request,
                    device: device as usize,
                    report: StageReport {
                        busy: Duration::from_nanos(busy_ns),
                        exchange_wait: Duration::from_nanos(exchange_wait_ns),
                        launched: items as usize,
                        bytes_sent,
                        sent_to: sent_to.into_iter().map(|(p, b)| (p as usize, b)).collect(),
                        latent,
                    },
                }
            }
            ControlMessage::DeviceFailed {
                request,
                device,
                step,
                message,
                lost_peer,
            } => CoordinatorMessage::DeviceFailed {
                request,
                device: device as usize,
                step: step.map(|s| s as usize),
                message: format!("on node {from}: {message}"),
                lost_peer: lost_peer.map(|d| d as usize),
            },
            ControlMessage::Checkpoint {
                request,
                device,
                step,
                latent,
                history,
            } => {
                let decoded = spec::decode_tensor(&latent, "checkpoint latent").and_then(|l| {
                    let h = history.as_deref();
                    Ok((
                        l,
                        h.map(|h| spec::decode_tensor(h, "checkpoint history"))
                            .transpose()?,
                    ))
                });
                match decoded {
                    Ok((latent, history)) => CoordinatorMessage::Checkpoint {
                        request,
                        device: device as usize,
                        step: step as usize,
                        latent,
                        history,
                    },
                    Err(e) => {
                        tracing::warn!(node = from, request, step, %e, "unusable checkpoint ignored");
                        return;
                    }
                }
            }
            other => {
                tracing::debug!(node = from, ?other, "control message ignored");
                return;
            }
        };
        let _ = c.cast(m);
    }
}

/// A node was lost: the Begin acknowledgements awaited from its `devices` fail at once with
/// `why`, instead of waiting out their timeout (those of other nodes wait on).
pub(crate) fn fail_pending(pending: &PendingAcks, devices: &[usize], why: &str) {
    let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
    let lost: Vec<_> = p
        .keys()
        .filter(|(_, d)| devices.contains(d))
        .copied()
        .collect();
    for key in lost {
        if let Some(tx) = p.remove(&key) {
            let _ = tx.send(Err(why.to_string()));
        }
    }
}

/// Nodes that reported their devices ready (`NodeReady`), for the coordinator's node to wait on.
#[derive(Default)]
pub(crate) struct Readiness {
    pub(crate) ready: Mutex<std::collections::HashSet<String>>,
    pub(crate) changed: tokio::sync::Notify,
}
