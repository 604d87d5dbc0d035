//! One node of a multi-node cluster: its QUIC endpoint (mutual TLS, the topology's address and
//! certificates), its device actors, the control loop, and on the coordinator's node the
//! coordinator with a [`Cluster`] handle. Every node runs the same binary with the same topology
//! (`pipefuse launch --topology FILE --node NAME`).

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use topology::{ClusterSpec, Plan};
use transport::{ClusterMap, NodeAddr, NodeIdentity, PeerEvent, QuicNode, QuicOptions};

use crate::cluster::Cluster;
use crate::error::{ClusterError, Result};
use crate::handles::RemoteDevice;
use crate::messages::{CoordinatorMessage, DeviceMessage};
use crate::model_source::ModelSource;
use crate::remote::members::{fail_reconfig, LocalDevices, NodeReconfigurer, ReconfigAcks};
use crate::remote::{fail_pending, ControlContext, PendingAcks, Readiness, RemoteProxy};
use crate::request::ClusterOptions;

/// A running node.
pub struct Node {
    name: String,
    coordinator: String,
    quic: Arc<QuicNode>,
    cluster: Option<Cluster>,
    events: tokio::sync::broadcast::Receiver<PeerEvent>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// This node's device actors (not the coordinator's node's: the coordinator runs those).
    devices: Arc<LocalDevices>,
    /// This node's devices (global indices), as its `NodeReady` names them.
    my_devices: Vec<usize>,
    /// How long a node waits for a lost coordinator to come back ([`QuicOptions::join_timeout`]).
    rejoin_grace: std::time::Duration,
}

fn read(spec: &ClusterSpec, field: &str, path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| {
        spec.error(
            field,
            format!("cannot read {}: {e}", path.display()),
            Some("create the certificates with `pipefuse keygen --topology FILE`".into()),
        )
        .into()
    })
}

/// Node `name`'s place in `spec` and its TLS identity (CA, certificate and key read from the files
/// the topology names); errors name the file, line and field.
pub fn node_identity(spec: &ClusterSpec, name: &str) -> Result<(usize, NodeIdentity)> {
    let (ni, node) = spec
        .nodes
        .iter()
        .enumerate()
        .find(|(_, n)| n.name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = spec.nodes.iter().map(|n| n.name.as_str()).collect();
            spec.error(
                "nodes",
                format!("no node named `{name}`"),
                Some(format!("the topology's nodes: {}", names.join(", "))),
            )
        })?;
    let tls = node.tls.clone().ok_or_else(|| {
        spec.error(
            &format!("nodes[{ni}].cert"),
            format!("node `{name}` names no certificate"),
            Some(
                "multi-node clusters need mutual TLS: add `cert` and `key`, and `[tls] ca`".into(),
            ),
        )
    })?;
    let ca = spec
        .tls_ca
        .clone()
        .ok_or_else(|| spec.error("tls.ca", "no CA certificate", None))?;
    let identity = NodeIdentity {
        name: name.to_string(),
        ca_cert_pem: read(spec, "tls.ca", &ca)?,
        cert_pem: read(spec, &format!("nodes[{ni}].cert"), &tls.cert)?,
        key_pem: read(spec, &format!("nodes[{ni}].key"), &tls.key)?,
    };
    Ok((ni, identity))
}

impl Node {
    /// Starts node `name` of `spec`: binds its address, loads its devices' layers, waits for
    /// every other node (up to `quic.join_timeout`, naming the missing ones), and on the
    /// coordinator's node starts the coordinator.
    pub async fn start(
        spec: ClusterSpec,
        name: &str,
        options: ClusterOptions,
        quic: QuicOptions,
    ) -> Result<Node> {
        spec.validate()?;
        let (ni, identity) = node_identity(&spec, name)?;
        let model = ModelSource::from_spec(&spec)?;
        let mut map = ClusterMap {
            // The model's config counts too: nodes that would load different models (another config
            // under the same folder name) refuse each other at the handshake.
            fingerprint: spec.fingerprint_with(&format!("{:?}", model.config)),
            nodes: Vec::new(),
        };
        let mut first = 0;
        for (i, n) in spec.nodes.iter().enumerate() {
            let field = format!("nodes[{i}].address");
            let text = n.address.as_deref().ok_or_else(|| {
                spec.error(
                    &field,
                    format!("node `{}` has no address", n.name),
                    Some("multi-node clusters need `address = \"host:port\"` on every node".into()),
                )
            })?;
            let addr: SocketAddr = text
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| spec.error(&field, format!("`{text}` does not resolve"), None))?;
            map.nodes.push(NodeAddr {
                name: n.name.clone(),
                addr,
                devices: (first..first + n.devices.len()).collect(),
            });
            first += n.devices.len();
        }
        let my_addr = map.nodes[ni].addr;
        let plan = crate::cluster::startup_plan(&spec, &model.config)?;
        crate::cluster::warn_if_oversubscribed(&spec.nodes[ni].devices);
        let mine = &map.nodes[ni].devices;
        crate::cluster::check_weights_fit(&model, &plan, |rank| mine.contains(&rank))?;
        let rejoin_grace = quic.join_timeout;
        let quic_node = Arc::new(QuicNode::bind(identity, my_addr, quic)?);
        let events = quic_node.subscribe();
        let lost_events = quic_node.subscribe();
        let started = Self::start_bound(
            spec,
            name,
            options,
            model,
            plan,
            map,
            quic_node.clone(),
            events,
            lost_events,
        )
        .await
        .map(|mut node| {
            node.rejoin_grace = rejoin_grace;
            node
        });
        if let Err(e) = &started {
            // Tell the peers why, instead of letting them time out.
            quic_node.close_with(&e.to_string());
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
                quic_node
                    .close_and_wait(std::time::Duration::from_secs(1))
                    .await
            })
            .await;
        }
        started
    }

    #[allow(clippy::too_many_arguments)]
    async fn start_bound(
        spec: ClusterSpec,
        name: &str,
        options: ClusterOptions,
        model: ModelSource,
        plan: Plan,
        map: ClusterMap,
        quic_node: Arc<QuicNode>,
        events: tokio::sync::broadcast::Receiver<PeerEvent>,
        mut lost_events: tokio::sync::broadcast::Receiver<PeerEvent>,
    ) -> Result<Node> {
        let ni = map
            .nodes
            .iter()
            .position(|n| n.name == name)
            .expect("checked");
        let my_addr = map.nodes[ni].addr;
        let cfg = model.config.clone();
        tracing::info!(node = name, addr = %my_addr, "waiting for the other nodes");
        let endpoints = quic_node.join(&map).await?;
        let inbox = quic_node
            .control_inbox()
            .ok_or_else(|| ClusterError::NotRunning("control inbox already taken".into()))?;
        let my_devices = map.nodes[ni].devices.clone();
        let mut by_device: Vec<Option<transport::Endpoint>> =
            (0..spec.device_count()).map(|_| None).collect();
        for (d, e) in my_devices.iter().zip(endpoints) {
            by_device[*d] = Some(e);
        }
        let pending: PendingAcks = Arc::new(Mutex::new(HashMap::new()));
        let node_of = |device: usize| {
            map.nodes
                .iter()
                .find(|n| n.devices.contains(&device))
                .map(|n| n.name.clone())
        };
        let is_coordinator = spec.coordinator == name;
        let local_devices = Arc::new(LocalDevices::new(
            quic_node.clone(),
            spec.clone(),
            model.clone(),
            options.clone(),
            match is_coordinator {
                true => Vec::new(), // the coordinator runs this node's devices
                false => my_devices.clone(),
            },
        ));
        let reconfig_acks: ReconfigAcks = Arc::new(Mutex::new(HashMap::new()));
        let mut tasks_early = Vec::new();
        let cluster = if is_coordinator {
            let remote = |device: usize| -> Option<Arc<dyn RemoteDevice>> {
                Some(Arc::new(RemoteProxy {
                    node: node_of(device)?,
                    device,
                    quic: quic_node.clone(),
                    pending: pending.clone(),
                }))
            };
            let reconfigurer = Arc::new(NodeReconfigurer {
                quic: quic_node.clone(),
                model: model.clone(),
                options: options.clone(),
                node: name.to_string(),
                mine: my_devices.clone(),
                node_of: (0..spec.device_count())
                    .map(|d| node_of(d).unwrap_or_default())
                    .collect(),
                pending: pending.clone(),
                acks: reconfig_acks.clone(),
                epoch: AtomicU64::new(0),
                timeout: options.compute_timeout,
            });
            let c = Cluster::start_parts(
                spec.clone(),
                model.clone(),
                options.clone(),
                by_device,
                remote,
                Some(reconfigurer),
            )
            .await?;
            Some(c)
        } else {
            let endpoints = by_device
                .into_iter()
                .enumerate()
                .filter_map(|(d, e)| e.map(|e| (d, e)))
                .collect();
            local_devices.start(&plan.roles(), endpoints, 0).await?;
            // The local devices hear of a lost node at once: a pipeline neighbour or an exchange
            // partner there ends their wait, naming it (the coordinator aborts the request too).
            let (mut events, nodes) = (quic_node.subscribe(), map.nodes.clone());
            let devices = local_devices.clone();
            tasks_early.push(tokio::spawn(async move {
                loop {
                    let (node, reason) = match events.recv().await {
                        Ok(PeerEvent::Lost { node, reason }) => (node, reason),
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            continue; // (a missed loss still reaches them as the coordinator's abort)
                        }
                        Err(_) => break,
                    };
                    for lost in devices_of(&nodes, &node) {
                        for d in devices.actors().values() {
                            let why = format!("node {node} was lost: {reason}");
                            let _ = d.cast(DeviceMessage::PeerLost { device: lost, why });
                        }
                    }
                }
            }));
            None
        };
        let ctx = Arc::new(ControlContext {
            quic: quic_node.clone(),
            config: cfg,
            devices: local_devices.clone(),
            reconfig_acks,
            coordinator: cluster.as_ref().map(|c| c.coordinator_ref().clone()),
            pending: pending.clone(),
            begin_timeout: options.compute_timeout,
            coordinator_node: spec.coordinator.clone(),
            readiness: Arc::new(Readiness::default()),
            spec: Arc::new(spec.clone()),
            node: name.to_string(),
        });
        let mut tasks = tasks_early;
        let mut inbox = inbox;
        let c2 = ctx.clone();
        tasks.push(tokio::spawn(async move {
            while let Some((from, msg)) = inbox.recv().await {
                c2.handle(&from, msg).await;
            }
        }));
        if let Some(coord) = cluster.as_ref().map(|c| c.coordinator_ref().clone()) {
            let (q, nodes) = (quic_node.clone(), map.nodes.clone());
            let reconfig = ctx.reconfig_acks.clone();
            tasks.push(tokio::spawn(async move {
                let lost = |node: String, reason: String| {
                    let devices = devices_of(&nodes, &node);
                    let why = format!("node {node} was lost: {reason}");
                    fail_pending(&pending, &devices, &why);
                    fail_reconfig(&reconfig, &node, &why);
                    let _ = coord.cast(CoordinatorMessage::NodeLost {
                        node,
                        reason,
                        devices,
                    });
                };
                loop {
                    match lost_events.recv().await {
                        Ok(PeerEvent::Lost { node, reason }) => lost(node, reason.to_string()),
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            // Missed events: look at every peer's state instead.
                            for n in nodes.iter().filter(|n| n.name != q.name()) {
                                if let Some(r) = q.peer_stats(&n.name).and_then(|s| s.lost) {
                                    lost(n.name.clone(), r.to_string());
                                }
                            }
                        }
                        Err(_) => break,
                    }
                }
            }));
        }
        if is_coordinator {
            wait_ready(&spec, name, &ctx, &quic_node, quic_join_timeout(&options)).await?;
        } else {
            let ready = transport::ControlMessage::NodeReady {
                node: name.to_string(),
                devices: my_devices.iter().map(|&d| d as u32).collect(),
            };
            quic_node.send_control(&spec.coordinator, &ready)?;
        }
        tracing::info!(node = name, coordinator = is_coordinator, "node ready");
        Ok(Node {
            name: name.to_string(),
            coordinator: spec.coordinator.clone(),
            quic: quic_node,
            cluster,
            events,
            tasks,
            devices: local_devices,
            my_devices,
            rejoin_grace: std::time::Duration::from_secs(30),
        })
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The cluster handle, on the coordinator's node.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.as_ref()
    }

    /// Takes the cluster handle out of the node (on the coordinator's node), for a server that
    /// shares it between tasks; the taker then shuts it down ([`Cluster::shutdown`]) before
    /// [`Node::shutdown`] closes the rest.
    pub fn take_cluster(&mut self) -> Option<Cluster> {
        self.cluster.take()
    }

    /// A non-coordinator node: serves until the coordinator's node goes away. Returns `Ok` when
    /// it closed the connection. A coordinator lost otherwise (silent, crashed, a network cut)
    /// may come back: the node waits up to its join timeout for the coordinator to connect
    /// again (it dials lost nodes), tells it its devices are ready and serves on; only then is
    /// the loss an error naming it. (A pause of this process, `SIGSTOP`, ends the same way.)
    pub async fn serve(mut self) -> Result<()> {
        use tokio::sync::broadcast::error::RecvError;
        let coordinator = self.coordinator.clone();
        // Since when, and why, the coordinator is away.
        let mut away: Option<(tokio::time::Instant, String)> = None;
        loop {
            let event = match &away {
                Some((since, _)) => {
                    match tokio::time::timeout_at(*since + self.rejoin_grace, self.events.recv())
                        .await
                    {
                        Ok(e) => e,
                        Err(_) => {
                            let (_, reason) = away.take().expect("away");
                            let waited = self.rejoin_grace.as_secs_f64();
                            self.shutdown().await;
                            return Err(ClusterError::NodeLost {
                                node: coordinator,
                                reason: format!(
                                    "{reason}; it did not come back within {waited:.0} s"
                                ),
                            });
                        }
                    }
                }
                None => self.events.recv().await,
            };
            let lost = match event {
                Ok(PeerEvent::Lost { node, reason }) if node == coordinator => Some(reason),
                Ok(PeerEvent::Rejoined { node, .. }) if node == coordinator => {
                    tracing::info!(%node, "the coordinator's node is back");
                    away = None;
                    // Its layout has no devices of this node any more: say they are ready.
                    let ready = transport::ControlMessage::NodeReady {
                        node: self.name.clone(),
                        devices: self.my_devices.iter().map(|&d| d as u32).collect(),
                    };
                    if let Err(e) = self.quic.send_control(&coordinator, &ready) {
                        tracing::warn!(%e, "could not tell the coordinator this node is ready");
                    }
                    None
                }
                Ok(_) => None,
                Err(RecvError::Lagged(_)) => {
                    self.quic.peer_stats(&coordinator).and_then(|s| s.lost)
                }
                Err(RecvError::Closed) => return Ok(()),
            };
            match lost {
                Some(
                    transport::LostReason::ClosedByPeer { .. } | transport::LostReason::Closed,
                ) => {
                    self.shutdown().await;
                    return Ok(());
                }
                // A new connection replaced the old one: `Rejoined` follows.
                Some(transport::LostReason::Superseded) | None => {}
                Some(other) if away.is_none() => {
                    tracing::warn!(node = %coordinator, reason = %other, "the coordinator's node is lost; waiting for it to come back");
                    away = Some((tokio::time::Instant::now(), other.to_string()));
                }
                Some(_) => {}
            }
        }
    }

    /// Stops the coordinator (if here), the control tasks and the QUIC endpoint.
    pub async fn shutdown(mut self) {
        if let Some(c) = self.cluster.take() {
            c.shutdown().await;
        }
        for t in &self.tasks {
            t.abort();
        }
        self.devices.stop_all().await;
        self.quic
            .close_and_wait(std::time::Duration::from_secs(2))
            .await;
    }
}

/// The devices (ranks) of node `node`.
fn devices_of(nodes: &[NodeAddr], node: &str) -> Vec<usize> {
    nodes
        .iter()
        .find(|n| n.name == node)
        .map_or_else(Vec::new, |n| n.devices.clone())
}

/// How long the coordinator's node waits for the others to report ready after joining.
fn quic_join_timeout(options: &ClusterOptions) -> std::time::Duration {
    options.compute_timeout
}

/// The coordinator's node: waits until every other node reported its devices ready (they load
/// their layers after joining), failing with the nodes that did not, or that were lost.
async fn wait_ready(
    spec: &ClusterSpec,
    me: &str,
    ctx: &ControlContext,
    quic: &QuicNode,
    limit: std::time::Duration,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let notified = ctx.readiness.changed.notified();
        let missing: Vec<String> = {
            let ready = ctx
                .readiness
                .ready
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            spec.nodes
                .iter()
                .map(|n| n.name.clone())
                .filter(|n| n != me && !ready.contains(n))
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        for n in &missing {
            if let Some(reason) = quic.peer_stats(n).and_then(|s| s.lost) {
                return Err(ClusterError::NodeLost {
                    node: n.clone(),
                    reason: format!("before it was ready: {reason}"),
                });
            }
        }
        // Wake on a report, or every 200 ms to notice lost nodes.
        let _ = tokio::time::timeout(std::time::Duration::from_millis(200), notified).await;
        if tokio::time::Instant::now() >= deadline {
            return Err(ClusterError::NotRunning(format!(
                "node(s) {} joined but did not report ready within {:.0} s",
                missing.join(", "),
                limit.as_secs_f64()
            )));
        }
    }
}
