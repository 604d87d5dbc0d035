//! Every kernel launch of the CUDA ops as data: which entry, its parameter values in order, and
//! the launch shape, made from device addresses and sizes only. The ops (`ops.rs`,
//! `image_ops.rs`) take their launches from here, and `tests/cuda_kernels_emulated.rs` runs the
//! same launches on the kernels' sources under a CUDA emulator against the CPU backend, so the
//! values the ops pass (which size goes in which slot, the grid) are checked without a GPU too.

use cudarc::driver::LaunchConfig;

use super::launch::{self as k, elementwise_config, per_row_config, Entry, KernelView, Param};
use crate::reference::ConvGeom;
use crate::DType;

/// One kernel launch.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The kernel (its dtype entry point is picked at launch).
    pub entry: Entry,
    /// The parameter values, in the kernel's order.
    pub params: Vec<Param>,
    /// Grid, block and shared memory.
    pub cfg: LaunchConfig,
}

/// Pointer parameters in order.
fn ptrs(addresses: &[u64]) -> Vec<Param> {
    addresses.iter().map(|&a| Param::Ptr(a)).collect()
}

fn grid_stride(entry: Entry, params: Vec<Param>, n: usize) -> Launch {
    Launch {
        entry,
        params,
        cfg: elementwise_config(n),
    }
}

fn per_row(entry: Entry, params: Vec<Param>, rows: usize) -> Launch {
    Launch {
        entry,
        params,
        cfg: per_row_config(rows),
    }
}

/// tanh-GELU (or SiLU) of the `n` elements at `x`, in place.
pub fn activation(silu: bool, x: u64, n: usize) -> Launch {
    let entry = if silu { k::SILU } else { k::GELU_TANH };
    grid_stride(entry, vec![Param::Ptr(x), Param::I64(n as i64)], n)
}

/// `x += gate[b] * y` over `n` elements of rows `d` wide in `batch` parts; `gate` may be 0.
pub fn add_gated(x: u64, y: u64, gate: u64, n: usize, (batch, d): (usize, usize)) -> Launch {
    let mut params = ptrs(&[x, y, gate]);
    params.extend([
        Param::I64(batch as i64),
        Param::I64((n / (batch * d).max(1)) as i64),
        Param::I64(d as i64),
    ]);
    grid_stride(k::ADD_GATED, params, n)
}

/// `x[i] += y[i % period]` over `n` elements.
pub fn add_cyclic(x: u64, y: u64, n: usize, period: usize) -> Launch {
    let mut params = ptrs(&[x, y]);
    params.extend([Param::I64(n as i64), Param::I64(period as i64)]);
    grid_stride(k::ADD_CYCLIC, params, n)
}

/// Rotary embedding, in place, of the heads of `head_dim` in columns `offset..offset + cols` of
/// `rows` rows `width` wide (`positions` per batch element; f32 tables `[positions, head_dim]`).
pub fn rope(
    x: u64,
    (cos, sin): (u64, u64),
    rows: usize,
    (width, positions, offset, cols): (usize, usize, usize, usize),
    head_dim: usize,
) -> Launch {
    let pairs = rows * (cols / 2);
    let mut params = ptrs(&[x, cos, sin]);
    params.extend([
        Param::I64(pairs as i64),
        Param::I32(width as i32),
        Param::I32(positions as i32),
        Param::I32(offset as i32),
        Param::I32(cols as i32),
        Param::I32(head_dim as i32),
    ]);
    grid_stride(k::ROPE, params, pairs)
}

/// `y = LN(x) (1 + scale[b]) + shift[b]` for `rows` rows of `d`, `tokens` rows per batch element.
pub fn layer_norm_modulate(
    (y, x): (u64, u64),
    (shift, scale): (u64, u64),
    rows: usize,
    (tokens, d): (usize, usize),
    eps: f32,
) -> Launch {
    let mut params = ptrs(&[y, x, shift, scale]);
    params.extend([
        Param::I64(tokens as i64),
        Param::I32(d as i32),
        Param::F32(eps),
    ]);
    per_row(k::LAYER_NORM_MODULATE, params, rows)
}

/// LayerNorm of `rows` rows of `d` with optional affine weights (0: none).
pub fn layer_norm(
    (y, x): (u64, u64),
    (gamma, beta): (u64, u64),
    rows: usize,
    d: usize,
    eps: f32,
) -> Launch {
    let mut params = ptrs(&[y, x, gamma, beta]);
    params.extend([Param::I32(d as i32), Param::F32(eps)]);
    per_row(k::LAYER_NORM, params, rows)
}

/// RMS norm, in place, of every `group`-wide run of columns `offset..offset + cols` of `rows`
/// rows `width` wide: one warp per (row, group), blocks of 8 warps.
pub fn rms_norm_groups(
    x: u64,
    weight: u64,
    rows: usize,
    (width, offset, cols): (usize, usize, usize),
    group: usize,
    eps: f32,
) -> Launch {
    let warps = rows * (cols / group.max(1));
    let params = vec![
        Param::Ptr(x),
        Param::I64(rows as i64),
        Param::I32(width as i32),
        Param::I32(offset as i32),
        Param::I32(cols as i32),
        Param::I32(group as i32),
        Param::Ptr(weight),
        Param::F32(eps),
    ];
    Launch {
        entry: k::RMS_NORM_GROUPS,
        params,
        cfg: LaunchConfig {
            grid_dim: ((warps * 32).div_ceil(256).max(1) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        },
    }
}

/// Ring attention's merge of `rows` rows of `head_dim` (f32 log-sum-exps).
pub fn merge_attention(
    (acc, acc_lse): (u64, u64),
    (part, part_lse): (u64, u64),
    rows: usize,
    head_dim: usize,
) -> Launch {
    let mut params = ptrs(&[acc, acc_lse, part, part_lse]);
    params.extend([Param::I64(rows as i64), Param::I32(head_dim as i32)]);
    grid_stride(k::MERGE_ATTENTION, params, rows)
}

/// An attention launch's operands: device addresses (0 for an absent bias or log-sum-exp) and
/// the views' layouts.
#[derive(Debug, Clone, Copy)]
pub struct AttentionArgs {
    /// f32 `[B, sq, heads]`, or 0.
    pub lse: u64,
    /// `[B, sq, heads * head_dim]`.
    pub out: u64,
    /// Queries: address and layout.
    pub q: (u64, KernelView),
    /// Keys: address and layout.
    pub k: (u64, KernelView),
    /// Values: address and layout.
    pub v: (u64, KernelView),
    /// f32 `[B, sk]`, or 0.
    pub bias: u64,
    /// Batch elements.
    pub batch: usize,
    /// Heads.
    pub heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// Query rows.
    pub sq: usize,
    /// Key rows.
    pub sk: usize,
}

/// Attention in `dtype`: the tensor-core kernel for bf16 / f16 when `tensor_cores` (sm_80 on)
/// and the head dim fits one of its instantiations, else the row kernel.
pub fn attention(a: &AttentionArgs, dtype: DType, tensor_cores: bool) -> Launch {
    let view = |(p, v): (u64, KernelView)| [Param::Ptr(p), Param::View(v)];
    let mut params = vec![Param::Ptr(a.lse), Param::Ptr(a.out)];
    params.extend(view(a.q));
    params.extend(view(a.k));
    params.extend(view(a.v));
    params.push(Param::Ptr(a.bias));
    let flash = k::FLASH_ATTENTION
        .iter()
        .find(|(dp, _)| a.head_dim <= *dp)
        .filter(|_| dtype != DType::F32 && tensor_cores);
    let (entry, cfg) = match flash {
        // One block of 4 warps per (batch, head, 64 query rows); static shared memory.
        Some((_, entry)) => (
            *entry,
            LaunchConfig {
                grid_dim: ((a.batch * a.heads * a.sq.div_ceil(64)) as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            },
        ),
        // One warp per (batch, head, query row), 4 warps per block, head_dim floats of shared
        // memory per warp (the row kernel also takes the batch).
        None => {
            params.push(Param::I32(a.batch as i32));
            let rows = a.batch * a.heads * a.sq;
            let cfg = LaunchConfig {
                grid_dim: (rows.div_ceil(4) as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: (4 * a.head_dim * 4) as u32,
            };
            (k::ATTENTION, cfg)
        }
    };
    params.extend([
        Param::I32(a.heads as i32),
        Param::I32(a.head_dim as i32),
        Param::I64(a.sq as i64),
        Param::I64(a.sk as i64),
        Param::F32(1.0 / (a.head_dim as f32).sqrt()),
    ]);
    Launch { entry, params, cfg }
}

/// GroupNorm of `[batch, channels, spatial]` in `groups` groups, optional affine (0: none):
/// one block per (batch, group).
pub fn group_norm(
    (y, x): (u64, u64),
    (gamma, beta): (u64, u64),
    (batch, groups): (usize, usize),
    (channels, spatial): (usize, usize),
    eps: f32,
) -> Launch {
    let mut params = ptrs(&[y, x, gamma, beta]);
    params.extend([
        Param::I32(channels as i32),
        Param::I32(groups as i32),
        Param::I64(spatial as i64),
        Param::F32(eps),
    ]);
    per_row(k::GROUP_NORM, params, batch * groups)
}

/// `y [planes, 2h, 2w]` from `x [planes, h, w]`.
pub fn upsample_nearest2x((y, x): (u64, u64), planes: usize, (h, w): (usize, usize)) -> Launch {
    let mut params = ptrs(&[y, x]);
    params.extend([
        Param::I64(planes as i64),
        Param::I32(h as i32),
        Param::I32(w as i32),
    ]);
    grid_stride(k::UPSAMPLE_NEAREST2X, params, planes * 4 * h * w)
}

/// `y [b, c, r]` from `x [b, r, c]`.
pub fn transpose_last2((y, x): (u64, u64), (b, r, c): (usize, usize, usize)) -> Launch {
    let mut params = ptrs(&[y, x]);
    params.extend([
        Param::I64(b as i64),
        Param::I32(r as i32),
        Param::I32(c as i32),
    ]);
    grid_stride(k::TRANSPOSE_LAST2, params, b * r * c)
}

/// The column matrix `[h_out w_out, c_in kh kw]` of the image at `image` (of geometry `g`).
pub fn im2col(cols: u64, image: u64, g: &ConvGeom) -> Launch {
    let mut params = ptrs(&[cols, image]);
    params.extend([
        Param::I32(g.c_in as i32),
        Param::I32(g.h as i32),
        Param::I32(g.w as i32),
        Param::I32(g.kh as i32),
        Param::I32(g.kw as i32),
        Param::I32(g.pad as i32),
        Param::I32(g.h_out() as i32),
        Param::I32(g.w_out() as i32),
    ]);
    let n = g.h_out() * g.w_out() * g.c_in * g.kh * g.kw;
    grid_stride(k::IM2COL, params, n)
}
