//! The device actor's message handling: start-up (load the layers, the peer groups, the compute
//! thread, the inbox router), and one handler per message.

use std::collections::HashMap;
use std::sync::mpsc::Sender;
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use transport::{Endpoint, FrameLabel, PeerGroupKind};

use topology::schedule::DeviceCore;

use super::{DeviceActor, DeviceArgs, DeviceState};
use crate::compute::ComputeThread;
use crate::messages::DeviceMessage;
use crate::peer_group::{ExchangeClock, GroupMsg, GroupSpec, PeerGroup};

impl Actor for DeviceActor {
    type Msg = DeviceMessage;
    type State = DeviceState;
    type Arguments = DeviceArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<DeviceMessage>,
        args: DeviceArgs,
    ) -> Result<DeviceState, ActorProcessingErr> {
        let exec = tokio::task::spawn_blocking(args.load).await??;
        let role = args.role;
        let Endpoint {
            links, mut inbox, ..
        } = args.endpoint;
        let clock = Arc::new(ExchangeClock::default());
        let runtime = tokio::runtime::Handle::current();
        let group = |kind, members: Vec<usize>| {
            let spec = GroupSpec {
                kind,
                me: role.rank,
                members,
            };
            PeerGroup::new(spec, links.clone(), runtime.clone(), clock.clone())
        };
        let mut routes: HashMap<PeerGroupKind, Sender<GroupMsg>> = HashMap::new();
        let sp = &role.sp;
        let exec = if sp.degree() > 1 {
            let (comm, tx) = group(PeerGroupKind::SequenceParallel, sp.members.clone())?;
            routes.insert(PeerGroupKind::SequenceParallel, tx);
            let attention: Box<dyn model::sp::SequenceAttention> = match (sp.ulysses, sp.ring) {
                (1, _) => Box::new(model::sp::Ring::new(comm)),
                (_, 1) => Box::new(model::sp::Ulysses::new(comm)),
                (u, _) => Box::new(model::sp::Usp::new(comm, u)?),
            };
            // Inside PipeFusion a rank keeps a K/V buffer of its head group (all heads for Ring).
            let kv_head_groups = match sp.inside_pipefusion {
                true => sp.ulysses,
                false => 0,
            };
            exec.with_sequence_parallel(attention, kv_head_groups)
        } else {
            exec
        };
        let cfg = match role.cfg.partner {
            Some(partner) => {
                let mut members = vec![role.rank, partner];
                if role.cfg.group == 1 {
                    members.reverse();
                }
                let (comm, tx) = group(PeerGroupKind::Cfg, members)?;
                routes.insert(PeerGroupKind::Cfg, tx);
                Some(comm)
            }
            None => None,
        };
        let compute = ComputeThread::spawn(
            role.rank,
            exec,
            myself.clone(),
            args.fault,
            cfg,
            clock.clone(),
            role.is_last_stage() && role.cfg.group == 0,
        )?;
        let groups = routes.values().cloned().collect();
        let me = myself.clone();
        // Work-item inputs go to the actor; collective parts straight to the compute thread.
        let inbox_task = tokio::spawn(async move {
            while let Some(frame) = inbox.recv().await {
                if let FrameLabel::Collective { group, .. } = frame.header.label {
                    if let Some(tx) = routes.get(&group) {
                        if tx.send(GroupMsg::Frame(frame)).is_err() {
                            break;
                        }
                        continue;
                    }
                }
                if me.cast(DeviceMessage::Frame(frame)).is_err() {
                    break;
                }
            }
        });
        tracing::debug!(device = role.rank, stage = role.stage, "device ready");
        Ok(DeviceState {
            core: DeviceCore::new(
                role.rank,
                role.stage,
                args.stall_timeout,
                args.compute_timeout,
            )
            .with_floor(args.floor),
            role,
            epoch: tokio::time::Instant::now(),
            setup: None,
            bytes_at_start: 0,
            link_bytes_at_start: Vec::new(),
            timer_for: None,
            lost_stages: Vec::new(),
            lost_peer: None,
            groups,
            clock,
            links,
            compute,
            coordinator: args.coordinator,
            inbox_task,
            fault: args.fault,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<DeviceMessage>,
        state: &mut DeviceState,
    ) -> Result<(), ActorProcessingErr> {
        state.inbox_task.abort();
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<DeviceMessage>,
        msg: DeviceMessage,
        st: &mut DeviceState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            DeviceMessage::Begin {
                setup,
                schedule,
                reply,
            } => {
                let r = st.begin(setup, schedule).await;
                let ok = r.is_ok();
                let _ = reply.send(r);
                if ok {
                    st.drain(&myself).await;
                }
            }
            DeviceMessage::Frame(frame) => st.on_frame(&myself, frame).await,
            DeviceMessage::ComputeDone {
                request,
                item,
                output,
                waited,
            } => {
                st.on_compute_done(&myself, request, item, output, waited)
                    .await
            }
            DeviceMessage::Tick => {
                st.timer_for = None;
                let now = st.now();
                st.core.handle_timeout(now);
                st.drain(&myself).await;
            }
            DeviceMessage::Checkpoint {
                request,
                step,
                latent,
                history,
            } => st
                .coordinator
                .report(crate::messages::CoordinatorMessage::Checkpoint {
                    request,
                    device: st.role.rank,
                    step,
                    latent,
                    history,
                }),
            DeviceMessage::PeerLost { device, why } => st.on_peer_lost(&myself, device, why).await,
            DeviceMessage::Abort { request } => st.abort(request),
        }
        Ok(())
    }
}
