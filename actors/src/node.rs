//! One node of a multi-node cluster: its QUIC endpoint (mutual TLS, the topology's address and
//! certificates), its device actors, the control loop, and on the coordinator's node the
//! coordinator with a [`Cluster`] handle. Every node runs the same binary with the same topology
//! (`pipefuse launch --topology FILE --node NAME`).

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};

use ractor::Actor;
use topology::{ClusterSpec, ModelShape, Plan};
use transport::{ClusterMap, NodeAddr, NodeIdentity, PeerEvent, QuicNode, QuicOptions};

use crate::cluster::{device_args, Cluster, ClusterOptions};
use crate::device::DeviceActor;
use crate::error::{ClusterError, Result};
use crate::handles::{CoordinatorHandle, RemoteDevice};
use crate::messages::CoordinatorMessage;
use crate::model_source::ModelSource;
use crate::remote::{report_message, ControlContext, PendingAcks, RemoteProxy};

/// A running node.
pub struct Node {
    name: String,
    coordinator: String,
    quic: Arc<QuicNode>,
    cluster: Option<Cluster>,
    events: tokio::sync::broadcast::Receiver<PeerEvent>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
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
                    "multi-node clusters need mutual TLS: add `cert` and `key`, and `[tls] ca`"
                        .into(),
                ),
            )
        })?;
        let ca = spec
            .tls_ca
            .clone()
            .ok_or_else(|| spec.error("tls.ca", "no CA certificate", None))?;
        let identity = NodeIdentity {
            name: name.to_string(),
            ca_cert_pem: read(&spec, "tls.ca", &ca)?,
            cert_pem: read(&spec, &format!("nodes[{ni}].cert"), &tls.cert)?,
            key_pem: read(&spec, &format!("nodes[{ni}].key"), &tls.key)?,
        };
        let mut map = ClusterMap {
            fingerprint: spec.fingerprint(),
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
        let model = ModelSource::from_spec(&spec)?;
        let cfg = model.config.clone();
        let plan = Plan::new(
            &spec,
            &ModelShape {
                layers: cfg.num_layers,
                hidden: cfg.hidden(),
                token_rows: cfg.sample_size / cfg.patch_size,
                token_cols: cfg.sample_size / cfg.patch_size,
                batch: 2,
                latent_channels: cfg.in_channels,
                latent_batch: 1,
                patch_size: cfg.patch_size,
            },
        )?;
        let quic_node = Arc::new(QuicNode::bind(identity, my_addr, quic)?);
        let events = quic_node.subscribe();
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
        let stage_devices: Vec<usize> = plan.stages.iter().map(|s| s.device.index).collect();
        let is_coordinator = spec.coordinator == name;
        let mut local = HashMap::new();
        let cluster = if is_coordinator {
            let remote = |device: usize| -> Option<Arc<dyn RemoteDevice>> {
                Some(Arc::new(RemoteProxy {
                    node: node_of(device)?,
                    device,
                    quic: quic_node.clone(),
                    pending: pending.clone(),
                }))
            };
            let c = Cluster::start_parts(
                spec.clone(),
                model.clone(),
                options.clone(),
                by_device,
                remote,
            )
            .await?;
            Some(c)
        } else {
            let coord = spec.coordinator.clone();
            for stage in plan
                .stages
                .iter()
                .filter(|s| my_devices.contains(&s.device.index))
            {
                let endpoint = by_device[stage.device.index]
                    .take()
                    .expect("local endpoint");
                let q = quic_node.clone();
                let coord = coord.clone();
                let report = CoordinatorHandle::Remote(Arc::new(move |m: CoordinatorMessage| {
                    if let Some(c) = report_message(m) {
                        if let Err(e) = q.send_control(&coord, &c) {
                            tracing::warn!(%e, "report to the coordinator lost");
                        }
                    }
                }));
                let args =
                    device_args(&model, stage, stage_devices.clone(), endpoint, &options)(report);
                let (d, _) = Actor::spawn(None, DeviceActor, args).await.map_err(|e| {
                    ClusterError::DeviceStart {
                        device: stage.device.index,
                        what: stage.device.to_string(),
                        message: match e {
                            ractor::SpawnErr::StartupFailed(inner) => inner.to_string(),
                            other => other.to_string(),
                        },
                    }
                })?;
                local.insert(stage.device.index, d);
            }
            None
        };
        let ctx = Arc::new(ControlContext {
            quic: quic_node.clone(),
            config: cfg,
            devices: local,
            coordinator: cluster.as_ref().map(|c| c.coordinator_ref().clone()),
            pending,
            begin_timeout: options.compute_timeout,
        });
        let mut tasks = Vec::new();
        let mut inbox = inbox;
        let c2 = ctx.clone();
        tasks.push(tokio::spawn(async move {
            while let Some((from, msg)) = inbox.recv().await {
                c2.handle(&from, msg).await;
            }
        }));
        if let Some(coord) = cluster.as_ref().map(|c| c.coordinator_ref().clone()) {
            let mut ev = quic_node.subscribe();
            tasks.push(tokio::spawn(async move {
                while let Ok(e) = ev.recv().await {
                    if let PeerEvent::Lost { node, reason } = e {
                        let _ = coord.cast(CoordinatorMessage::NodeLost {
                            node,
                            reason: reason.to_string(),
                        });
                    }
                }
            }));
        }
        tracing::info!(node = name, coordinator = is_coordinator, "node ready");
        Ok(Node {
            name: name.to_string(),
            coordinator: spec.coordinator.clone(),
            quic: quic_node,
            cluster,
            events,
            tasks,
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

    /// A non-coordinator node: serves until the coordinator's node goes away. Returns `Ok` when
    /// it closed the connection, an error naming it when it was lost otherwise.
    pub async fn serve(mut self) -> Result<()> {
        loop {
            match self.events.recv().await {
                Ok(PeerEvent::Lost { node, reason }) if node == self.coordinator => {
                    self.shutdown().await;
                    return match reason {
                        transport::LostReason::ClosedByPeer { .. }
                        | transport::LostReason::Closed => Ok(()),
                        other => Err(ClusterError::NodeLost {
                            node,
                            reason: other.to_string(),
                        }),
                    };
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return Ok(()),
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
        self.quic
            .close_and_wait(std::time::Duration::from_secs(2))
            .await;
    }
}
