//! The CUDA backend's types in a build without the `cuda` feature: `CudaStorage` and
//! `CudaDevice` are uninhabited, so every `match` arm on them is statically dead and their methods
//! (the same names as the real backend's in `cuda/`) can never run; `CudaDevice::new` reports
//! why no CUDA device can be used (this build has no CUDA backend, or the probe's reason).

use crate::{AttnView, CpuStorage, DType, KernelError, Result, Tensor};

/// Device memory of a CUDA tensor (cannot exist in this build).
#[derive(Debug, Clone)]
pub enum CudaStorage {}

/// A CUDA GPU (cannot exist in this build).
#[derive(Debug, Clone)]
pub enum CudaDevice {}

/// See the `cuda` build's `on_gpu`.
pub(crate) fn on_gpu(_op: &'static str, s: &CudaStorage) -> KernelError {
    match *s {}
}

#[allow(clippy::unused_self, dead_code)]
impl CudaStorage {
    pub(crate) fn dtype(&self) -> DType {
        match *self {}
    }
    pub(crate) fn len(&self) -> usize {
        match *self {}
    }
    pub(crate) fn ordinal(&self) -> usize {
        match *self {}
    }
    pub(crate) fn download(&self) -> Result<CpuStorage> {
        match *self {}
    }
    pub(crate) fn upload_beside(&self, _host: &CpuStorage) -> Result<CudaStorage> {
        match *self {}
    }
    pub(crate) fn zeros_beside(&self, _dtype: DType, _len: usize) -> Result<CudaStorage> {
        match *self {}
    }
    pub(crate) fn uninit_beside(&self, _dtype: DType, _len: usize) -> Result<CudaStorage> {
        match *self {}
    }
    pub(crate) fn copy_block_from(
        &mut self,
        _src: &CudaStorage,
        _copy: &crate::BlockCopy,
    ) -> Result<()> {
        match *self {}
    }
}

#[allow(clippy::unused_self)]
impl CudaDevice {
    /// Always fails, saying why; never panics.
    pub(crate) fn new(ordinal: usize) -> Result<CudaDevice> {
        let reason = crate::cuda_probe::cuda_devices()
            .err()
            .unwrap_or_else(|| "this build has no CUDA backend".into());
        Err(KernelError::CudaNotAvailable { ordinal, reason })
    }
    pub(crate) fn ordinal(&self) -> usize {
        match *self {}
    }
    pub(crate) fn synchronize(&self) -> Result<()> {
        match *self {}
    }
    pub(crate) fn upload(&self, _t: &Tensor) -> Result<Tensor> {
        match *self {}
    }
    pub(crate) fn unsupported(&self, _op: &'static str) -> KernelError {
        match *self {}
    }
    pub(crate) fn linear(
        &self,
        _x: &Tensor,
        _w: &Tensor,
        _b: Option<&Tensor>,
        _mkn: (usize, usize, usize),
        _shape: &[usize],
        _gelu: bool,
    ) -> Result<Tensor> {
        match *self {}
    }
    pub(crate) fn activation_(&self, _base: &'static str, _x: &mut Tensor) -> Result<()> {
        match *self {}
    }
    pub(crate) fn layer_norm_modulate(
        &self,
        _x: &Tensor,
        _shift: &Tensor,
        _scale: &Tensor,
        _td: (usize, usize),
        _eps: f32,
    ) -> Result<Tensor> {
        match *self {}
    }
    pub(crate) fn rms_norm_groups_(
        &self,
        _x: &mut Tensor,
        _woc: (usize, usize, usize),
        _weight: &Tensor,
        _eps: f32,
    ) -> Result<()> {
        match *self {}
    }
    pub(crate) fn add_gated_(
        &self,
        _x: &mut Tensor,
        _y: &Tensor,
        _gate: Option<&Tensor>,
        _bd: (usize, usize),
    ) -> Result<()> {
        match *self {}
    }
    pub(crate) fn group_norm(
        &self,
        _x: &Tensor,
        _groups: usize,
        _gamma: Option<&Tensor>,
        _beta: Option<&Tensor>,
        _cs: (usize, usize),
        _eps: f32,
    ) -> Result<Tensor> {
        match *self {}
    }
    pub(crate) fn upsample_nearest2x(&self, _x: &Tensor, _shape: &[usize; 4]) -> Result<Tensor> {
        match *self {}
    }
    pub(crate) fn transpose_last2(
        &self,
        _x: &Tensor,
        _brc: (usize, usize, usize),
    ) -> Result<Tensor> {
        match *self {}
    }
    pub(crate) fn conv2d(
        &self,
        _x: &Tensor,
        _w: &Tensor,
        _bias: Option<&Tensor>,
        _g: crate::reference::ConvGeom,
    ) -> Result<Tensor> {
        match *self {}
    }
    pub(crate) fn layer_norm(
        &self,
        _x: &Tensor,
        _gamma: Option<&Tensor>,
        _beta: Option<&Tensor>,
        _d: usize,
        _eps: f32,
    ) -> Result<Tensor> {
        match *self {}
    }
    pub(crate) fn merge_attention_(
        &self,
        _acc: &mut Tensor,
        _acc_lse: &mut Tensor,
        _part: &Tensor,
        _part_lse: &Tensor,
        _head_dim: usize,
    ) -> Result<()> {
        match *self {}
    }
    pub(crate) fn add_cyclic_(&self, _x: &mut Tensor, _rows: &Tensor) -> Result<()> {
        match *self {}
    }
    pub(crate) fn rope_(
        &self,
        _x: &mut Tensor,
        _geometry: (usize, usize, usize, usize),
        _cos: &Tensor,
        _sin: &Tensor,
    ) -> Result<()> {
        match *self {}
    }
    pub(crate) fn compute_dtype(&self) -> DType {
        match *self {}
    }
    pub(crate) fn with_dtype(&self, _dtype: DType) -> CudaDevice {
        match *self {}
    }
    pub(crate) fn attention(
        &self,
        _q: AttnView<'_>,
        _k: AttnView<'_>,
        _v: AttnView<'_>,
        _key_bias: Option<&Tensor>,
        _bhd: (usize, usize, usize),
        _with_lse: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        match *self {}
    }
}
