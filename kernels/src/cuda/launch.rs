//! Kernel launches with their parameter lists checked. A kernel launch is an untyped call: a
//! parameter pushed in the wrong order or with the wrong width corrupts memory silently. So each
//! entry point the ops launch is an [`Entry`] naming its parameters' kinds, every launch checks
//! its [`Param`]s against it, and `tests/nvrtc_kernels.rs` checks every entry against the PTX
//! NVRTC produces (`.param .u64`, `.u32`, `.f32`, `.b8[24]` for a view), without a GPU.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::device::CudaDevice;
use super::storage::driver_error;
use crate::{DType, KernelError, Result};

/// What one kernel parameter is, as the CUDA source declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// A device pointer (`T*`, `const float*`; null allowed where the kernel says so).
    Ptr,
    /// `long`.
    I64,
    /// `int`.
    I32,
    /// `float`.
    F32,
    /// `struct View { long batch_stride, row_stride, col_offset; }` by value.
    View,
}

impl ParamKind {
    /// How the PTX declares such a parameter (`.u64`, `.u32`, `.f32`, `.b8[24]`).
    pub fn ptx(self) -> &'static str {
        match self {
            ParamKind::Ptr | ParamKind::I64 => ".u64",
            ParamKind::I32 => ".u32",
            ParamKind::F32 => ".f32",
            ParamKind::View => ".b8[24]",
        }
    }
}

/// One kernel (entry points `{base}_f32`, `{base}_bf16`, `{base}_f16` of `file`).
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    /// The kernel source (one of [`super::SOURCES`]).
    pub file: &'static str,
    /// The name without its dtype suffix.
    pub base: &'static str,
    /// The parameters in order.
    pub params: &'static [ParamKind],
    /// The element types it has entry points for.
    pub dtypes: &'static [DType],
}

/// Entry points in every element type.
const ALL: &[DType] = &[DType::F32, DType::BF16, DType::F16];
/// Entry points for the 16-bit types only (tensor-core kernels).
const HALF: &[DType] = &[DType::BF16, DType::F16];

use ParamKind::{Ptr, View, F32, I32, I64};

/// `gelu_tanh(T* x, long n)`, in place.
pub const GELU_TANH: Entry = Entry {
    file: "elementwise.cu",
    base: "gelu_tanh",
    params: &[Ptr, I64],
    dtypes: ALL,
};
/// `silu(T* x, long n)`, in place.
pub const SILU: Entry = Entry {
    file: "elementwise.cu",
    base: "silu",
    params: &[Ptr, I64],
    dtypes: ALL,
};
/// `add_gated(T* x, const T* y, const T* gate, long batch, long tokens, long channels)`.
pub const ADD_GATED: Entry = Entry {
    file: "elementwise.cu",
    base: "add_gated",
    params: &[Ptr, Ptr, Ptr, I64, I64, I64],
    dtypes: ALL,
};
/// `add_cyclic(T* x, const T* y, long n, long period)`: `x[i] += y[i % period]`.
pub const ADD_CYCLIC: Entry = Entry {
    file: "elementwise.cu",
    base: "add_cyclic",
    params: &[Ptr, Ptr, I64, I64],
    dtypes: ALL,
};
/// `rope(T* x, const float* cos, const float* sin, long pairs, int width, int rows, int offset,
/// int cols, int head_dim)`: rotary embedding in place, f32 tables.
pub const ROPE: Entry = Entry {
    file: "elementwise.cu",
    base: "rope",
    params: &[Ptr, Ptr, Ptr, I64, I32, I32, I32, I32, I32],
    dtypes: ALL,
};
/// `layer_norm_modulate(T* y, const T* x, const T* shift, const T* scale, long tokens,
/// int channels, float eps)`.
pub const LAYER_NORM_MODULATE: Entry = Entry {
    file: "norm.cu",
    base: "layer_norm_modulate",
    params: &[Ptr, Ptr, Ptr, Ptr, I64, I32, F32],
    dtypes: ALL,
};
/// `layer_norm(T* y, const T* x, const T* gamma, const T* beta, int channels, float eps)`.
pub const LAYER_NORM: Entry = Entry {
    file: "norm.cu",
    base: "layer_norm",
    params: &[Ptr, Ptr, Ptr, Ptr, I32, F32],
    dtypes: ALL,
};
/// `merge_attention(T* acc, float* acc_lse, const T* part, const float* part_lse, long rows,
/// int head_dim)`.
pub const MERGE_ATTENTION: Entry = Entry {
    file: "attention.cu",
    base: "merge_attention",
    params: &[Ptr, Ptr, Ptr, Ptr, I64, I32],
    dtypes: ALL,
};
/// `rms_norm_groups(T* x, long rows, int width, int offset, int channels, int group,
/// const T* weight, float eps)`.
pub const RMS_NORM_GROUPS: Entry = Entry {
    file: "norm.cu",
    base: "rms_norm_groups",
    params: &[Ptr, I64, I32, I32, I32, I32, Ptr, F32],
    dtypes: ALL,
};
/// `attention(float* lse, T* out, const T* q, View qv, const T* k, View kv, const T* v, View vv,
/// const float* bias, int batch, int heads, int head_dim, long sq, long sk, float scale)`.
pub const ATTENTION: Entry = Entry {
    file: "attention.cu",
    base: "attention",
    params: &[
        Ptr, Ptr, Ptr, View, Ptr, View, Ptr, View, Ptr, I32, I32, I32, I64, I64, F32,
    ],
    dtypes: ALL,
};

/// `flash_attention_d{DP}(float* lse, T* out, const T* q, View qv, const T* k, View kv,
/// const T* v, View vv, const float* bias, int heads, int head_dim, long sq, long sk,
/// float scale)`: tensor-core attention, bf16 / f16, head_dim padded to DP.
const fn flash(base: &'static str) -> Entry {
    Entry {
        file: "flash_attention.cu",
        base,
        params: &[
            Ptr, Ptr, Ptr, View, Ptr, View, Ptr, View, Ptr, I32, I32, I64, I64, F32,
        ],
        dtypes: HALF,
    }
}
/// The tensor-core attention kernels by padded head dimension (the smallest DP >= head_dim is
/// launched).
pub const FLASH_ATTENTION: [(usize, Entry); 5] = [
    (16, flash("flash_attention_d16")),
    (32, flash("flash_attention_d32")),
    (64, flash("flash_attention_d64")),
    (80, flash("flash_attention_d80")),
    (128, flash("flash_attention_d128")),
];

/// `group_norm(T* y, const T* x, const T* gamma, const T* beta, int channels, int groups,
/// long spatial, float eps)`.
pub const GROUP_NORM: Entry = Entry {
    file: "image.cu",
    base: "group_norm",
    params: &[Ptr, Ptr, Ptr, Ptr, I32, I32, I64, F32],
    dtypes: ALL,
};
/// `upsample_nearest2x(T* y, const T* x, long planes, int h, int w)`.
pub const UPSAMPLE_NEAREST2X: Entry = Entry {
    file: "image.cu",
    base: "upsample_nearest2x",
    params: &[Ptr, Ptr, I64, I32, I32],
    dtypes: ALL,
};
/// `transpose_last2(T* y, const T* x, long batch, int r, int c)`.
pub const TRANSPOSE_LAST2: Entry = Entry {
    file: "image.cu",
    base: "transpose_last2",
    params: &[Ptr, Ptr, I64, I32, I32],
    dtypes: ALL,
};
/// `im2col(T* cols, const T* x, int c_in, int h, int w, int kh, int kw, int pad, int h_out,
/// int w_out)`.
pub const IM2COL: Entry = Entry {
    file: "image.cu",
    base: "im2col",
    params: &[Ptr, Ptr, I32, I32, I32, I32, I32, I32, I32, I32],
    dtypes: ALL,
};

/// Every kernel the ops launch.
pub const ENTRIES: &[Entry] = &[
    GELU_TANH,
    SILU,
    ADD_GATED,
    ADD_CYCLIC,
    ROPE,
    LAYER_NORM_MODULATE,
    LAYER_NORM,
    RMS_NORM_GROUPS,
    ATTENTION,
    MERGE_ATTENTION,
    GROUP_NORM,
    UPSAMPLE_NEAREST2X,
    TRANSPOSE_LAST2,
    IM2COL,
    FLASH_ATTENTION[0].1,
    FLASH_ATTENTION[1].1,
    FLASH_ATTENTION[2].1,
    FLASH_ATTENTION[3].1,
    FLASH_ATTENTION[4].1,
];

/// A strided view's layout as the attention kernel takes it (`struct View` in attention.cu).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelView {
    /// Elements between batches.
    pub batch_stride: i64,
    /// Elements between rows.
    pub row_stride: i64,
    /// Offset of head 0 in a row.
    pub col_offset: i64,
}

// SAFETY: a plain #[repr(C)] struct of three i64, passed by value like the kernel's `View`.
unsafe impl cudarc::driver::DeviceRepr for KernelView {}

/// One parameter value of a launch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Param {
    /// A device address (0: null).
    Ptr(u64),
    /// `long`.
    I64(i64),
    /// `int`.
    I32(i32),
    /// `float`.
    F32(f32),
    /// A strided view's layout.
    View(KernelView),
}

impl Param {
    /// Its kind, as a kernel declares it.
    pub fn kind(&self) -> ParamKind {
        match self {
            Param::Ptr(_) => ParamKind::Ptr,
            Param::I64(_) => ParamKind::I64,
            Param::I32(_) => ParamKind::I32,
            Param::F32(_) => ParamKind::F32,
            Param::View(_) => ParamKind::View,
        }
    }
}

/// The parameter types of entry point `name` in `ptx`, as [`ParamKind::ptx`] spells them, or
/// `None` when the PTX has no such entry.
pub fn ptx_params(ptx: &str, name: &str) -> Option<Vec<String>> {
    let start = ptx.find(&format!(".entry {name}("))?;
    let body = &ptx[start..];
    let end = body.find(')')?;
    let params = body[..end]
        .lines()
        .skip(1)
        .filter_map(|line| {
            let line = line.trim().trim_end_matches(',');
            let rest = line.strip_prefix(".param")?;
            let words: Vec<&str> = rest.split_whitespace().collect();
            let ty = words
                .iter()
                .find(|w| matches!(**w, ".u64" | ".u32" | ".s64" | ".s32" | ".f32" | ".b8"))?;
            Some(match *ty {
                ".b8" => {
                    let n = words.last()?.split('[').nth(1)?.trim_end_matches(']');
                    format!(".b8[{n}]")
                }
                ".s64" => ".u64".to_string(),
                ".s32" => ".u32".to_string(),
                t => t.to_string(),
            })
        })
        .collect();
    Some(params)
}

/// One block of 256 threads per row (norms: the block reduces its row together).
pub fn per_row_config(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The device pointer of an optional operand, or null.
pub(crate) fn ptr_or_null(p: &Option<(u64, cudarc::driver::SyncOnDrop<'_>)>) -> u64 {
    p.as_ref().map_or(0, |p| p.0)
}

/// Grid-stride launch shape for `n` elements.
pub fn elementwise_config(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 65_535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaDevice {
    /// Runs one planned launch (see [`super::plan`]) in `dtype`.
    ///
    /// # Safety
    /// As [`CudaDevice::launch`]: the plan's addresses must be live device memory of this GPU
    /// covering what the kernel touches, their guards kept until this returns.
    pub(crate) unsafe fn run(&self, l: &super::plan::Launch, dtype: DType) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { self.launch(&l.entry, dtype, &l.params, l.cfg) }
    }

    /// Launches `entry`'s `dtype` entry point on this device's stream with `params`, after
    /// checking them against the entry's declaration.
    ///
    /// # Safety
    /// The pointers must be live device memory of this GPU that covers what the kernel reads
    /// and writes for these sizes and `cfg`; the caller keeps their guards until this returns.
    pub(crate) unsafe fn launch(
        &self,
        entry: &Entry,
        dtype: DType,
        params: &[Param],
        cfg: LaunchConfig,
    ) -> Result<()> {
        let kinds: Vec<ParamKind> = params.iter().map(Param::kind).collect();
        if kinds != entry.params {
            return Err(KernelError::Cuda {
                op: entry.base.to_string(),
                message: format!(
                    "launch with parameters {kinds:?}, the kernel takes {:?}",
                    entry.params
                ),
            });
        }
        let f = self.kernel(entry.file, entry.base, dtype)?;
        let mut launch = self.stream().launch_builder(&f);
        for p in params {
            match p {
                Param::Ptr(v) => launch.arg(v),
                Param::I64(v) => launch.arg(v),
                Param::I32(v) => launch.arg(v),
                Param::F32(v) => launch.arg(v),
                Param::View(v) => launch.arg(v),
            };
        }
        // SAFETY: the caller's contract; the parameters match the kernel's declaration.
        unsafe { launch.launch(cfg) }.map_err(|e| driver_error(entry.base, e))?;
        Ok(())
    }
}
