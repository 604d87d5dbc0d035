//! The device actor's message handling: start-up (load the layers, the compute thread, the
//! sequence-parallel collective), and one handler per message.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::{DeviceActor, DeviceArgs, DeviceState};
use crate::compute::ComputeThread;
use crate::messages::DeviceMessage;
use crate::sp_link::LinkCollective;
use transport::Endpoint;

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
        let (partner_tx, partner_rx) = match args.cfg.and_then(|c| c.partner) {
            Some(_) => {
                let (tx, rx) = std::sync::mpsc::channel();
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let (exec, sp_tx, sp_request) = match &args.sp {
            Some(sp) => {
                let (tx, rx) = std::sync::mpsc::channel();
                let request = Arc::new(std::sync::atomic::AtomicU64::new(0));
                let comm = LinkCollective::new(
                    sp.rank,
                    sp.devices.clone(),
                    myself.clone(),
                    rx,
                    request.clone(),
                );
                let attention: Box<dyn model::sp::SequenceAttention> =
                    match (sp.ulysses > 1, sp.ring > 1) {
                        (true, true) => Box::new(model::sp::Usp::new(comm, sp.ulysses)?),
                        (false, true) => Box::new(model::sp::Ring::new(comm)),
                        _ => Box::new(model::sp::Ulysses::new(comm)),
                    };
                (
                    exec.with_sequence_parallel(
                        attention,
                        if sp.buffered { sp.ulysses } else { 0 },
                    ),
                    Some(tx),
                    Some(request),
                )
            }
            None => (exec, None, None),
        };
        let compute = ComputeThread::spawn(
            args.index,
            exec,
            myself.clone(),
            args.fault,
            partner_rx,
            sp_request,
        )?;
        let Endpoint {
            links, mut inbox, ..
        } = args.endpoint;
        let me = myself.clone();
        let inbox_task = tokio::spawn(async move {
            while let Some(frame) = inbox.recv().await {
                if me.cast(DeviceMessage::Frame(frame)).is_err() {
                    break;
                }
            }
        });
        tracing::debug!(device = args.index, stage = args.stage, "device ready");
        Ok(DeviceState {
            index: args.index,
            stage: args.stage,
            stage_devices: args.stage_devices,
            cfg: args.cfg,
            partner_tx,
            sp: args.sp,
            sp_tx,
            links,
            compute,
            coordinator: args.coordinator,
            stall_timeout: args.stall_timeout,
            compute_timeout: args.compute_timeout,
            inbox_task,
            fault: args.fault,
            active: None,
            last_request: 0,
            early: Vec::new(),
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
                    st.replay_early(&myself).await;
                }
            }
            DeviceMessage::Frame(frame) => st.on_frame(&myself, frame).await,
            DeviceMessage::ComputeDone {
                request,
                item,
                output,
            } => st.on_compute_done(&myself, request, item, output).await,
            DeviceMessage::CfgPrediction {
                request,
                item,
                prediction,
            } => st.send_prediction(request, item, prediction).await,
            DeviceMessage::SpSend {
                request,
                op,
                to,
                tensor,
            } => st.send_sp_part(request, op, to, tensor).await,
            DeviceMessage::Tick { request } => {
                if let Some(a) = st.active.as_mut().filter(|a| a.setup.id == request) {
                    a.timer_for = None;
                    a.schedule.handle_timeout(a.started.elapsed());
                    st.drain(&myself).await;
                }
            }
            DeviceMessage::ComputeWatchdog { request, item } => {
                let late = st
                    .active
                    .as_ref()
                    .is_some_and(|a| a.setup.id == request && a.running == Some(item));
                if late {
                    let secs = st.compute_timeout.as_secs_f64();
                    let waiting = st
                        .active
                        .as_ref()
                        .is_some_and(|a| a.awaiting_partner == Some(item));
                    let partner = st.cfg.and_then(|c| c.partner);
                    let message = match (partner.filter(|_| waiting), &st.sp) {
                        (Some(p), _) => format!("waited longer than the compute timeout ({secs:.1} s) for device {p}'s CFG prediction of {item}: device {p} is wedged or far too slow"),
                        (None, Some(sp)) => format!("computing {item} took longer than the compute timeout ({secs:.1} s): this device or another rank of its sequence-parallel group (devices {:?}) is wedged or far too slow", sp.devices),
                        (None, None) => format!("computing {item} took longer than the compute timeout ({secs:.1} s): the device is wedged or far too slow"),
                    };
                    st.fail(Some(item.step), message);
                }
            }
            DeviceMessage::Abort => {
                if let Some(a) = st.active.take() {
                    st.cancel_partner(a.setup.id);
                }
            }
        }
        Ok(())
    }
}
