//! Linear layers and the embeddings of a DiT: sinusoidal timestep features, the timestep MLP, the
//! 2-D sin-cos position table and the patch embedding.
//! Reference: diffusers 0.42.1 `embeddings.py` (`Timesteps`, `TimestepEmbedding`,
//! `get_2d_sincos_pos_embed`, `PatchEmbed`), restated in shared/reference/LAYOUT.md §3.

use kernels::{DType, Device, PackedBf16, PackedF32, Tensor};

use crate::error::Result;
use crate::weights::WeightSource;

/// `y = x W^T + b` with torch's `[out, in]` weight layout. The weight is kept in the format its
/// source asks for ([`WeightSource::linear_dtype`]): f32, or bf16 packed once for
/// `Device::linear_bf16` (activations rounded to bf16, f32 accumulation).
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    w: LinearWeight,
    b: Tensor, // [out]
}

#[derive(Debug, Clone)]
enum LinearWeight {
    /// `[out, in]`: on a GPU, and on CPUs without AVX-512 (the `gemm` crate packs per call).
    F32(Tensor),
    /// f32, packed once for the AVX-512 kernel.
    F32Packed(PackedF32),
    Bf16(PackedBf16),
}

impl Linear {
    /// `w` `[out, in]` (f32) and `b` in the format `dtype` names.
    pub(crate) fn new(w: Tensor, b: Tensor, dtype: DType) -> Result<Linear> {
        let &[out, inp] = w.shape() else {
            unreachable!("linear weights are loaded as [out, in]")
        };
        let w = match dtype {
            DType::BF16 => LinearWeight::Bf16(PackedBf16::from_f32(w.as_f32()?, out, inp)),
            DType::F32 | DType::F16
                if w.is_host() && w.dtype() == DType::F32 && kernels::f32_gemm_packed() =>
            {
                LinearWeight::F32Packed(PackedF32::pack(w.as_f32()?, out, inp))
            }
            DType::F32 | DType::F16 => LinearWeight::F32(w),
        };
        Ok(Linear { w, b })
    }

    /// Loads `{name}.weight` `[out, inp]` and `{name}.bias` `[out]`.
    pub(crate) fn load(
        src: &dyn WeightSource,
        name: &str,
        out: usize,
        inp: usize,
    ) -> Result<Linear> {
        Linear::new(
            src.tensor(&format!("{name}.weight"), &[out, inp])?,
            src.tensor(&format!("{name}.bias"), &[out])?,
            src.linear_dtype(),
        )
    }

    /// Loads several projections of the same input and stacks them into one (e.g. Q, K, V into
    /// one `[3d, d]` GEMM).
    pub(crate) fn load_fused(
        src: &dyn WeightSource,
        names: &[String],
        out: usize,
        inp: usize,
    ) -> Result<Linear> {
        let mut ws = Vec::new();
        let mut bs = Vec::new();
        for n in names {
            ws.push(src.tensor(&format!("{n}.weight"), &[out, inp])?);
            bs.push(src.tensor(&format!("{n}.bias"), &[out])?);
        }
        Linear::new(
            Tensor::cat(&ws.iter().collect::<Vec<_>>(), 0)?,
            Tensor::cat(&bs.iter().collect::<Vec<_>>(), 0)?,
            src.linear_dtype(),
        )
    }

    pub(crate) fn forward(&self, dev: &Device, x: &Tensor) -> Result<Tensor> {
        Ok(match &self.w {
            LinearWeight::F32(w) => dev.linear(x, w, Some(&self.b))?,
            LinearWeight::F32Packed(w) => dev.linear_packed(x, w, Some(&self.b))?,
            LinearWeight::Bf16(w) => dev.linear_bf16(x, w, Some(&self.b))?,
        })
    }

    /// `gelu_tanh(x W^T + b)`: fused into the GEMM's write-out for bf16 weights on a CPU and for
    /// every weight on a GPU (cuBLASLt's epilogue).
    pub(crate) fn forward_gelu(&self, dev: &Device, x: &Tensor) -> Result<Tensor> {
        Ok(match &self.w {
            LinearWeight::F32(w) => dev.linear_gelu(x, w, Some(&self.b))?,
            LinearWeight::F32Packed(w) => dev.linear_packed_gelu(x, w, Some(&self.b))?,
            LinearWeight::Bf16(w) => dev.linear_bf16_gelu(x, w, Some(&self.b))?,
        })
    }

    /// [`Linear::forward_gelu`] for an output that only `next` reads: where both hold bf16
    /// weights and a bf16 kernel runs (a CPU computing in bf16 with AMX or AVX512-BF16), the
    /// output is bf16 (`Device::linear_bf16_gelu_bf16`): `next` rounds its input to bf16 anyway,
    /// so the numbers are the same, with half the bytes and no conversion pass. Elsewhere f32,
    /// as [`Linear::forward_gelu`].
    pub(crate) fn forward_gelu_for(
        &self,
        next: &Linear,
        dev: &Device,
        x: &Tensor,
    ) -> Result<Tensor> {
        match (&self.w, &next.w) {
            (LinearWeight::Bf16(w), LinearWeight::Bf16(_)) if kernels::bf16_kernel() => {
                Ok(dev.linear_bf16_gelu_bf16(x, w, Some(&self.b))?)
            }
            _ => self.forward_gelu(dev, x),
        }
    }
}

/// Sinusoidal timestep features `[B, 256]` as `[cos | sin]` (diffusers `Timesteps(256,
/// flip_sin_to_cos=True, downscale_freq_shift=shift)`), in f32 like torch. DiT uses shift 1,
/// PixArt shift 0.
pub(crate) fn timestep_features(t: &[f32], shift: f32) -> Result<Tensor> {
    const DIM: usize = 256;
    let half = DIM / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((-(10000f32.ln()) * i as f32) / (half as f32 - shift)).exp())
        .collect();
    let mut out = Vec::with_capacity(t.len() * DIM);
    for &tv in t {
        out.extend(freqs.iter().map(|f| (tv * f).cos()));
        out.extend(freqs.iter().map(|f| (tv * f).sin()));
    }
    Ok(Tensor::from_vec(out, &[t.len(), DIM])?)
}

/// `linear_2(silu(linear_1(x)))` (diffusers `TimestepEmbedding`).
#[derive(Debug, Clone)]
pub(crate) struct TimestepEmbedding {
    l1: Linear,
    l2: Linear,
}

impl TimestepEmbedding {
    pub(crate) fn load(src: &dyn WeightSource, name: &str, inp: usize, out: usize) -> Result<Self> {
        Ok(TimestepEmbedding {
            l1: Linear::load(src, &format!("{name}.linear_1"), out, inp)?,
            l2: Linear::load(src, &format!("{name}.linear_2"), out, out)?,
        })
    }
    pub(crate) fn forward(&self, dev: &Device, x: &Tensor) -> Result<Tensor> {
        let h = dev.silu(&self.l1.forward(dev, x)?)?;
        self.l2.forward(dev, &h)
    }
}

/// The 2-D sin-cos position table `[gh*gw, d]` for a grid of `gh x gw` tokens, normalised to the
/// `base x base` grid of the config and divided by `interp` (x/column half first), computed in f64
/// and rounded to f32 as diffusers does.
pub fn pos_embed_2d(d: usize, gh: usize, gw: usize, base: usize, interp: f32) -> Vec<f32> {
    pos_embed_2d_window(d, (gh, gw), base, interp, 0..gh, 0..gw)
}

/// Rows `rows` x columns `cols` of [`pos_embed_2d`]'s table for a `grid` of `(gh, gw)` tokens,
/// `[rows.len() * cols.len(), d]`, computed without the rest of the table (SD3 crops its
/// `pos_embed_max_size`^2 table to the image's token grid).
pub(crate) fn pos_embed_2d_window(
    d: usize,
    (gh, gw): (usize, usize),
    base: usize,
    interp: f32,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
) -> Vec<f32> {
    let quarter = d / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64))
        .collect();
    let coord = |i: usize, n: usize| (i as f32 / (n as f64 / base as f64) as f32 / interp) as f64;
    let mut out = Vec::with_capacity(rows.len() * cols.len() * d);
    for r in rows {
        let y = coord(r, gh);
        for c in cols.clone() {
            let x = coord(c, gw);
            out.extend(omega.iter().map(|o| (x * o).sin() as f32));
            out.extend(omega.iter().map(|o| (x * o).cos() as f32));
            out.extend(omega.iter().map(|o| (y * o).sin() as f32));
            out.extend(omega.iter().map(|o| (y * o).cos() as f32));
        }
    }
    out
}

/// Patch embedding: conv with kernel = stride = p as a patch gather plus one GEMM.
#[derive(Debug, Clone)]
pub(crate) struct PatchEmbed {
    proj: Linear, // weight [d, C*p*p] (the conv weight [d, C, p, p], flattened)
    patch: usize,
}

impl PatchEmbed {
    pub(crate) fn load(
        src: &dyn WeightSource,
        d: usize,
        channels: usize,
        patch: usize,
    ) -> Result<Self> {
        let w = src
            .tensor("pos_embed.proj.weight", &[d, channels, patch, patch])?
            .reshape(&[d, channels * patch * patch])?;
        let b = src.tensor("pos_embed.proj.bias", &[d])?;
        Ok(PatchEmbed {
            proj: Linear::new(w, b, src.linear_dtype())?,
            patch,
        })
    }

    /// Tokens `[B, rows*w, d]` of a latent strip `[B, C, rows*p, W]` (without position embedding).
    pub(crate) fn forward(&self, dev: &Device, strip: &Tensor) -> Result<Tensor> {
        let rows = strip.dim(2) / self.patch;
        // The latent lives in host memory: gather the patches there, then bring them over.
        let patches = dev.patchify(strip, self.patch, 0..rows)?; // [B, n, C*p*p]
        self.proj.forward(dev, &dev.import(patches)?)
    }
}
