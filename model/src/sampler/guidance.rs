//! Classifier-free guidance and the generic denoising loop.

use kernels::Tensor;

use super::SamplerState;
use crate::error::{ModelError, Result};

/// Where the conditional half sits in a doubled CFG batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CfgOrder {
    /// `[cond; uncond]` (diffusers' DiTPipeline).
    CondFirst,
    /// `[uncond; cond]` (diffusers' PixArt and SD pipelines).
    UncondFirst,
}

/// From a model output `[2B, C_out, H, W]` of a doubled batch, the guided prediction
/// `uncond + scale * (cond - uncond)` over the first `channels` channels: `[B, channels, H, W]`.
/// Learned-sigma channels beyond `channels` are dropped.
pub fn cfg_combine(out: &Tensor, channels: usize, scale: f32, order: CfgOrder) -> Result<Tensor> {
    let &[b2, c_out, h, w] = out.shape() else {
        return Err(ModelError::Input(format!(
            "model output must be [2B, C, H, W], got {:?}",
            out.shape()
        )));
    };
    if b2 % 2 != 0 || channels > c_out {
        return Err(ModelError::Input(format!(
            "cannot apply guidance to output {:?} with {channels} channels",
            out.shape()
        )));
    }
    let b = b2 / 2;
    let o = out.as_f32()?;
    let plane = channels * h * w;
    let mut res = Vec::with_capacity(b * plane);
    for i in 0..b {
        let (ci, ui) = match order {
            CfgOrder::CondFirst => (i, b + i),
            CfgOrder::UncondFirst => (b + i, i),
        };
        let (cs, us) = (
            &o[ci * c_out * h * w..][..plane],
            &o[ui * c_out * h * w..][..plane],
        );
        res.extend(cs.iter().zip(us).map(|(c, u)| u + scale * (c - u)));
    }
    Ok(Tensor::from_vec(res, &[b, channels, h, w])?)
}

/// The first `channels` channels of `[B, C_out, H, W]` (drops learned-sigma channels).
pub fn take_channels(out: &Tensor, channels: usize) -> Result<Tensor> {
    Ok(out.narrow(1, 0, channels)?)
}

/// Runs the whole sampling loop: `predict(step, timestep, x)` returns the (guided) model output
/// for latent `x`; `on_step(step)` is called after every update.
pub fn denoise(
    state: &mut SamplerState,
    mut x: Tensor,
    mut predict: impl FnMut(usize, f32, &Tensor) -> Result<Tensor>,
    mut on_step: impl FnMut(usize),
) -> Result<Tensor> {
    let steps = state.plan().timesteps.len();
    for i in 0..steps {
        let t = state.plan().timesteps[i];
        let _span = tracing::debug_span!("step", i, t).entered();
        let eps = predict(i, t, &x)?;
        if eps.shape() != x.shape() {
            return Err(ModelError::Input(format!(
                "model output {:?} does not match the latent {:?}",
                eps.shape(),
                x.shape()
            )));
        }
        state.step(x.as_f32_mut()?, eps.as_f32()?)?;
        on_step(i);
    }
    Ok(x)
}
