//! The image-shaped ops of [`Device`] that a VAE decoder needs: convolution, GroupNorm, nearest
//! 2x upsampling, the batched transpose (channels-first planes <-> token rows) and in-place SiLU.
//! Same contract as the rest of `Device`: shapes are checked here, one `match` per op.

use super::check_len;
use crate::cpu::conv::ConvGeom;
use crate::cpu::{self};
use crate::{Device, KernelError, Result, Tensor};

fn dims4(op: &'static str, what: &str, t: &Tensor) -> Result<[usize; 4]> {
    match *t.shape() {
        [a, b, c, d] => Ok([a, b, c, d]),
        _ => Err(KernelError::shape(
            op,
            format!("{what} must be [B, C, H, W], got {:?}", t.shape()),
        )),
    }
}

impl Device {
    /// Stride-1 2-D convolution with `padding` zeros on every side (torch `Conv2d`):
    /// `x: [B, C, H, W]`, `w: [O, C, kh, kw]`, `bias: [O]`
    /// -> `[B, O, H + 2p - kh + 1, W + 2p - kw + 1]`.
    pub fn conv2d(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        padding: usize,
    ) -> Result<Tensor> {
        let [batch, c_in, h, wd] = dims4("conv2d", "input", x)?;
        let [c_out, wc, kh, kw] = dims4("conv2d", "weight", w)?;
        if wc != c_in || c_in == 0 || c_out == 0 || kh == 0 || kw == 0 || h == 0 || wd == 0 {
            return Err(KernelError::shape(
                "conv2d",
                format!("input {:?} vs weight {:?}", x.shape(), w.shape()),
            ));
        }
        if h + 2 * padding < kh || wd + 2 * padding < kw {
            return Err(KernelError::shape(
                "conv2d",
                format!(
                    "kernel {kh}x{kw} larger than the padded input {:?} (padding {padding})",
                    x.shape()
                ),
            ));
        }
        if let Some(b) = bias {
            check_len("conv2d", "bias", b, c_out)?;
        }
        let g = ConvGeom {
            batch,
            c_in,
            h,
            w: wd,
            c_out,
            kh,
            kw,
            pad: padding,
        };
        let shape = [batch, c_out, g.h_out(), g.w_out()];
        match self {
            Device::Cpu(c) => {
                let mut y = vec![0f32; shape.iter().product()];
                let (xs, ws) = (x.as_f32()?, w.as_f32()?);
                let bs = bias.map(|b| b.as_f32()).transpose()?;
                c.install(|| cpu::conv::conv2d(&mut y, xs, ws, bs, g, c.threads()));
                Tensor::from_vec(y, &shape)
            }
            Device::Cuda(c) => c.conv2d(x, w, bias, g),
        }
    }

    /// GroupNorm (torch `GroupNorm`) of `x: [B, C, ...]`: `groups` groups of `C / groups`
    /// consecutive channels, each normalised over its channels and all positions (biased
    /// variance), then the optional affine `gamma`, `beta` (`[C]`) per channel.
    pub fn group_norm(
        &self,
        x: &Tensor,
        groups: usize,
        gamma: Option<&Tensor>,
        beta: Option<&Tensor>,
        eps: f32,
    ) -> Result<Tensor> {
        let (channels, spatial) = match x.shape() {
            [_, c, rest @ ..] => (*c, rest.iter().product::<usize>()),
            _ => (0, 0),
        };
        if channels == 0 || spatial == 0 || groups == 0 || channels % groups != 0 {
            return Err(KernelError::shape(
                "group_norm",
                format!(
                    "x must be [B, C, ...] with C divisible by {groups} groups, got {:?}",
                    x.shape()
                ),
            ));
        }
        for (what, t) in [("gamma", gamma), ("beta", beta)] {
            if let Some(t) = t {
                check_len("group_norm", what, t, channels)?;
            }
        }
        match self {
            Device::Cpu(c) => {
                let mut y = vec![0f32; x.elem_count()];
                let xs = x.as_f32()?;
                let g = gamma.map(|t| t.as_f32()).transpose()?;
                let b = beta.map(|t| t.as_f32()).transpose()?;
                c.install(|| {
                    cpu::norm::group_norm(&mut y, xs, g, b, channels, groups, spatial, eps)
                });
                Tensor::from_vec(y, x.shape())
            }
            Device::Cuda(c) => c.group_norm(x, groups, gamma, beta, (channels, spatial), eps),
        }
    }

    /// Nearest-neighbour upsampling by 2 (torch `F.interpolate(scale_factor=2, mode="nearest")`):
    /// `x: [B, C, H, W]` -> `[B, C, 2H, 2W]`.
    pub fn upsample_nearest2x(&self, x: &Tensor) -> Result<Tensor> {
        let [b, c, h, w] = dims4("upsample_nearest2x", "x", x)?;
        if h == 0 || w == 0 {
            return Err(KernelError::shape(
                "upsample_nearest2x",
                format!("empty image {:?}", x.shape()),
            ));
        }
        let shape = [b, c, 2 * h, 2 * w];
        match self {
            Device::Cpu(cd) => {
                let mut y = vec![0f32; 4 * x.elem_count()];
                let xs = x.as_f32()?;
                cd.install(|| cpu::conv::upsample_nearest2x(&mut y, xs, w));
                Tensor::from_vec(y, &shape)
            }
            Device::Cuda(c) => c.upsample_nearest2x(x, &shape),
        }
    }

    /// Swaps the last two dimensions: `x: [B, R, C]` -> `[B, C, R]` (e.g. channel planes
    /// `[B, C, H*W]` to token rows `[B, H*W, C]` and back).
    pub fn transpose_last2(&self, x: &Tensor) -> Result<Tensor> {
        let &[b, r, c] = x.shape() else {
            return Err(KernelError::shape(
                "transpose_last2",
                format!("x must be [B, R, C], got {:?}", x.shape()),
            ));
        };
        if r == 0 || c == 0 {
            return Ok(Tensor::zeros(&[b, c, r]));
        }
        match self {
            Device::Cpu(cd) => {
                let mut y = vec![0f32; x.elem_count()];
                let xs = x.as_f32()?;
                cd.install(|| cpu::conv::transpose_last2(&mut y, xs, r, c));
                Tensor::from_vec(y, &[b, c, r])
            }
            Device::Cuda(cd) => cd.transpose_last2(x, (b, r, c)),
        }
    }

    /// SiLU in place.
    pub fn silu_(&self, x: &mut Tensor) -> Result<()> {
        match self {
            Device::Cpu(c) => {
                let xs = x.as_f32_mut()?;
                c.install(|| cpu::activation::silu(xs));
                Ok(())
            }
            Device::Cuda(c) => c.activation_("silu", x),
        }
    }
}
