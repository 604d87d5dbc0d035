//! Changing a multi-node cluster's layout: [`LocalDevices`] (a node's device actors, restarted
//! in new roles when the coordinator asks) and [`NodeReconfigurer`] (the coordinator's node:
//! asks every other member, waits for their answers, and hands the coordinator its own new
//! device slots).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::{Actor, ActorRef};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use topology::{ClusterSpec, DeviceRole};
use transport::{BoxFuture, ControlMessage, Endpoint, QuicNode};

use super::{report_message, PendingAcks, RemoteProxy};
use crate::cluster::device_args;
use crate::coordinator::StageSlot;
use crate::device::{start_error, DeviceActor};
use crate::handles::{CoordinatorHandle, Reconfigurer};
use crate::messages::{CoordinatorMessage, DeviceMessage};
use crate::model_source::ModelSource;
use crate::replan::Layout;
use crate::request::ClusterOptions;

/// Reconfiguration answers the coordinator's node waits for, by (epoch, node).
pub(crate) type ReconfigAcks =
    Arc<Mutex<HashMap<(u64, String), oneshot::Sender<Result<(), String>>>>>;

/// A node was lost: the reconfiguration answers awaited from it fail at once with `why`.
pub(crate) fn fail_reconfig(acks: &ReconfigAcks, node: &str, why: &str) {
    let mut a = acks.lock().unwrap_or_else(|e| e.into_inner());
    let lost: Vec<_> = a.keys().filter(|(_, n)| n == node).cloned().collect();
    for key in lost {
        if let Some(tx) = a.remove(&key) {
            let _ = tx.send(Err(why.to_string()));
        }
    }
}

/// The device actors of a node that is not the coordinator's.
pub(crate) struct LocalDevices {
    quic: Arc<QuicNode>,
    spec: ClusterSpec,
    model: ModelSource,
    options: ClusterOptions,
    /// This node's devices (global indices).
    mine: Vec<usize>,
    actors: Mutex<HashMap<usize, ActorRef<DeviceMessage>>>,
    /// Close this node when one of its device actors stops unexpectedly.
    watchers: Mutex<Vec<JoinHandle<()>>>,
}

impl LocalDevices {
    pub(crate) fn new(
        quic: Arc<QuicNode>,
        spec: ClusterSpec,
        model: ModelSource,
        options: ClusterOptions,
        mine: Vec<usize>,
    ) -> Self {
        LocalDevices {
            quic,
            spec,
            model,
            options,
            mine,
            actors: Mutex::new(HashMap::new()),
            watchers: Mutex::new(Vec::new()),
        }
    }

    /// The running device actors, by device index.
    pub(crate) fn actors(&self) -> HashMap<usize, ActorRef<DeviceMessage>> {
        self.actors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Starts this node's devices of `roles` on `endpoints` (by device index).
    pub(crate) async fn start(
        &self,
        roles: &[DeviceRole],
        mut endpoints: HashMap<usize, Endpoint>,
        floor: u64,
    ) -> crate::Result<()> {
        let coord = self.spec.coordinator.clone();
        for role in roles.iter().filter(|r| self.mine.contains(&r.rank)) {
            let rank = role.rank;
            let endpoint = endpoints.remove(&rank).ok_or_else(|| {
                crate::ClusterError::NotRunning(format!("no endpoint for device {rank}"))
            })?;
            let (q, coord) = (self.quic.clone(), coord.clone());
            let report = CoordinatorHandle::Remote(Arc::new(move |m: CoordinatorMessage| {
                if let Some(c) = report_message(m) {
                    if let Err(e) = q.send_control(&coord, &c) {
                        tracing::warn!(%e, "report to the coordinator lost");
                    }
                }
            }));
            let mut args = device_args(&self.model, role.clone(), endpoint, &self.options)(report);
            args.floor = floor;
            let failed = start_error(&args);
            let (d, join) = Actor::spawn(None, DeviceActor, args)
                .await
                .map_err(failed)?;
            self.actors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(rank, d);
            // A device actor that stops (a panic in its handler) closes this node, so the
            // coordinator sees the node lost, with the reason, instead of a silent gap.
            let q = self.quic.clone();
            self.watchers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(tokio::spawn(async move {
                    let _ = join.await;
                    tracing::error!(device = rank, "device actor stopped; closing this node");
                    q.close_with(&format!("device {rank} stopped unexpectedly"));
                }));
        }
        Ok(())
    }

    /// Stops every device actor and waits for them (on purpose: the watchers go first).
    pub(crate) async fn stop_all(&self) {
        for w in self
            .watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            w.abort();
        }
        let actors: Vec<_> = self
            .actors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        for (rank, d) in actors {
            let why = Some("replaced in a new layout".to_string());
            if let Err(e) = d.stop_and_wait(why, Some(Duration::from_secs(30))).await {
                tracing::warn!(device = rank, %e, "a replaced device did not stop in time");
            }
        }
    }

    /// Restarts this node's devices in the roles of the layout over `members`.
    pub(crate) async fn restart(&self, members: &[String], floor: u64) -> crate::Result<()> {
        let layout = Layout::over(&self.spec, &self.model.config, members)?;
        self.stop_all().await;
        let endpoints = self.quic.endpoints()?;
        let by_device = endpoints.into_iter().map(|e| (e.me, e)).collect();
        self.start(&layout.roles, by_device, floor).await
    }
}

/// The coordinator's node's side of a layout change.
pub(crate) struct NodeReconfigurer {
    pub(crate) quic: Arc<QuicNode>,
    pub(crate) model: ModelSource,
    pub(crate) options: ClusterOptions,
    /// The coordinator's node (this one) and its devices.
    pub(crate) node: String,
    pub(crate) mine: Vec<usize>,
    /// The node of every device (by global index).
    pub(crate) node_of: Vec<String>,
    pub(crate) pending: PendingAcks,
    pub(crate) acks: ReconfigAcks,
    pub(crate) epoch: AtomicU64,
    /// How long a member may take to restart its devices.
    pub(crate) timeout: Duration,
}

impl Reconfigurer for NodeReconfigurer {
    fn reconfigure(
        &self,
        layout: Layout,
        floor: u64,
    ) -> BoxFuture<'_, Result<Vec<StageSlot>, String>> {
        Box::pin(async move {
            let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
            let r = self.reconfigure_epoch(epoch, layout, floor).await;
            // Whatever ended it, nothing waits for this epoch's answers any more.
            self.acks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|(e, _), _| *e != epoch);
            r
        })
    }
}

impl NodeReconfigurer {
    async fn reconfigure_epoch(
        &self,
        epoch: u64,
        layout: Layout,
        floor: u64,
    ) -> Result<Vec<StageSlot>, String> {
        {
            let mut waits = Vec::new();
            for m in layout.members.iter().filter(|m| **m != self.node) {
                let (tx, rx) = oneshot::channel();
                self.acks
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert((epoch, m.clone()), tx);
                let msg = ControlMessage::Reconfigure {
                    epoch,
                    members: layout.members.clone(),
                    floor,
                };
                self.quic
                    .send_control(m, &msg)
                    .map_err(|e| format!("node {m}: {e}"))?;
                waits.push((m.clone(), rx));
            }
            // One deadline for all: a member that answers late does not extend the others'.
            let deadline = tokio::time::Instant::now() + self.timeout;
            for (m, rx) in waits {
                match tokio::time::timeout_at(deadline, rx).await {
                    Ok(Ok(Ok(()))) => {}
                    Ok(Ok(Err(e))) => return Err(format!("node {m}: {e}")),
                    Ok(Err(_)) => return Err(format!("node {m} went away while restarting")),
                    Err(_) => {
                        return Err(format!(
                            "node {m} did not restart its devices within {:.0} s",
                            self.timeout.as_secs_f64()
                        ))
                    }
                }
            }
            let mut endpoints: HashMap<usize, Endpoint> = self
                .quic
                .endpoints()
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|e| (e.me, e))
                .collect();
            let mut slots = Vec::new();
            for role in &layout.roles {
                let rank = role.rank;
                match endpoints.remove(&rank) {
                    Some(endpoint) if self.mine.contains(&rank) => {
                        let args = device_args(&self.model, role.clone(), endpoint, &self.options);
                        slots.push(StageSlot::Local(Box::new(move |c| {
                            let mut a = args(CoordinatorHandle::Local(c));
                            a.floor = floor;
                            a
                        })));
                    }
                    _ => slots.push(StageSlot::Remote(Arc::new(RemoteProxy {
                        node: self.node_of.get(rank).cloned().unwrap_or_default(),
                        device: rank,
                        quic: self.quic.clone(),
                        pending: self.pending.clone(),
                    }))),
                }
            }
            Ok(slots)
        }
    }
}
