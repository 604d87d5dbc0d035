//! The request's result from the stages' reports, and the latent row copies it (and the
//! checkpoints) need.

use kernels::Tensor;
use topology::DeviceRole;

use crate::error::ClusterError;
use crate::messages::StageReport;
use crate::request::{DeviceSummary, GenerateOutput, RunSummary};

/// The request's result from every device's report (`roles` in rank order). Each CFG group's
/// last stages hold the final latent (under sequence parallelism each rank the rows it updated
/// last, over the latent of its group's rank 0); every group must arrive at the same latent, bit
/// for bit.
pub(super) fn finish(
    wall: std::time::Duration,
    reports: Vec<Option<StageReport>>,
    roles: &[DeviceRole],
    setup: &crate::stage::RequestSetup,
) -> Result<GenerateOutput, ClusterError> {
    let shape = setup.prepared.latent_shape();
    let p = shape[2] / setup.token_rows().max(1);
    let mut groups: Vec<Tensor> = Vec::new();
    let mut per_device = Vec::new();
    for (role, rep) in roles.iter().zip(reports) {
        let rep = rep.expect("all reported");
        let device = role.rank;
        let fail = |message: String| ClusterError::DeviceFailed {
            device,
            step: None,
            message,
        };
        if role.is_last_stage() {
            let l = rep
                .latent
                .ok_or_else(|| fail("the last stage finished without a latent".into()))?;
            if l.shape() != shape {
                return Err(fail(format!(
                    "the final latent has shape {:?}, the request's is {shape:?}",
                    l.shape()
                )));
            }
            if role.sp.rank == 0 {
                groups.push(l);
            } else {
                // The rows rank r updated last go into the group's latent.
                let target = groups
                    .get_mut(role.cfg.group)
                    .ok_or_else(|| fail("no rank 0".into()))?;
                for rows in setup.final_rows(role.sp.rank) {
                    copy_rows(target, &l, rows.start * p..rows.end * p)
                        .map_err(|e| fail(e.to_string()))?;
                }
            }
        }
        per_device.push(DeviceSummary {
            device,
            busy: rep.busy.saturating_sub(rep.exchange_wait),
            exchange_wait: rep.exchange_wait,
            items: rep.launched,
            bytes_sent: rep.bytes_sent,
            sent_to: rep.sent_to.clone(),
        });
    }
    for (g, l) in groups.iter().enumerate().skip(1) {
        let same = groups[0].as_f32().ok() == l.as_f32().ok() && l.as_f32().is_ok();
        if !same {
            let last = roles
                .iter()
                .rfind(|r| r.cfg.group == g && r.is_last_stage())
                .map_or(0, |r| r.rank);
            return Err(ClusterError::DeviceFailed {
                device: last,
                step: None,
                message: "the CFG groups' final latents differ".into(),
            });
        }
    }
    let latent = groups.into_iter().next();
    let latent = latent.ok_or_else(|| ClusterError::NotRunning("no devices".into()))?;
    Ok(GenerateOutput {
        latent,
        summary: RunSummary::new(wall, per_device),
    })
}

/// `dst[:, :, rows, :] = src[:, :, rows, :]` for two `[B, C, H, W]` tensors of one shape.
pub(super) fn copy_rows(
    dst: &mut Tensor,
    src: &Tensor,
    rows: std::ops::Range<usize>,
) -> kernels::Result<()> {
    let &[b, c, h, w] = dst.shape() else {
        return Ok(());
    };
    if src.shape() != dst.shape() || rows.end > h {
        return Err(kernels::KernelError::Shape {
            op: "copy_rows",
            detail: format!("rows {rows:?} of {:?} into {:?}", src.shape(), dst.shape()),
        });
    }
    let s = src.as_f32()?.to_vec();
    let d = dst.as_f32_mut()?;
    for plane in 0..b * c {
        let at = plane * h * w;
        d[at + rows.start * w..at + rows.end * w]
            .copy_from_slice(&s[at + rows.start * w..at + rows.end * w]);
    }
    Ok(())
}
