//! The transformer (DiT or PixArt-alpha), whole or as a slice of blocks for one pipeline stage.
//! The forward is split into [`Transformer::embed`] (stage 0), [`Transformer::run_blocks`] (every
//! stage, any token subset) and [`Transformer::head`] (last stage), each working on a horizontal
//! strip of the latent so that PipeFusion can run patch by patch.
//! Reference: diffusers 0.42.1 `DiTTransformer2DModel.forward`, `PixArtTransformer2DModel.forward`.

mod sequence;

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};

use kernels::{Device, Tensor};

use crate::blocks::{AttnMode, Block, DitEmbedder};
use crate::cond::{conditioning, CondInputs, Conditioning, PixArtEmbedders};
use crate::config::{Arch, ModelConfig};
use crate::embedding::{pos_embed_2d, Linear, PatchEmbed};
use crate::error::{ModelError, Result};
use crate::kv_buffer::KvBuffer;
use crate::mmdit::MmditSlice;
use crate::weights::{RandomWeights, SafetensorsDir, WeightSource};

#[derive(Debug, Clone)]
enum FinalLayer {
    /// `proj_out_1` gives `[shift | scale]` from block 0's conditioning; `proj_out_2` projects.
    Dit {
        emb: DitEmbedder,
        proj1: Linear,
        proj2: Linear,
    },
    /// `scale_shift_table [2, d]` + embedded timestep; `proj_out` projects.
    PixArt { table: Tensor, proj: Linear },
}

/// A DiT / PixArt transformer holding blocks `range` (and the patch embedding if the range starts
/// at 0, the final layer if it ends at L).
pub struct Transformer {
    cfg: ModelConfig,
    device: Device,
    range: Range<usize>,
    patch_embed: Option<PatchEmbed>,
    blocks: Vec<Block>,
    head: Option<FinalLayer>,
    pixart: Option<PixArtEmbedders>,
    pos_tables: Mutex<HashMap<(usize, usize), Arc<Vec<f32>>>>,
    /// SD3 / Flux: the slice does everything (the fields above stay empty).
    mmdit: Option<MmditSlice>,
}

impl std::fmt::Debug for Transformer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Transformer({:?}, blocks {:?}, on {})",
            self.cfg.arch,
            self.range,
            self.device.name()
        )
    }
}

impl Transformer {
    /// Loads blocks `range` of the diffusers model in `dir` (`config.json` + safetensors).
    pub fn load(dir: &Path, range: Option<Range<usize>>, device: Device) -> Result<Transformer> {
        Self::load_with(dir, range, device, kernels::DType::F32)
    }

    /// [`Transformer::load`] with the linear layers' weights in `linear_dtype` (f32, or bf16
    /// packed once for the bf16 GEMM: [`crate::WithLinearDtype`]).
    pub fn load_with(
        dir: &Path,
        range: Option<Range<usize>>,
        device: Device,
        linear_dtype: kernels::DType,
    ) -> Result<Transformer> {
        let cfg = ModelConfig::from_dir(dir)?;
        let src = SafetensorsDir::open(dir)?;
        src.check_block_counts(&dir.join("config.json"), &cfg.block_families())?;
        let src = crate::WithLinearDtype {
            inner: &src,
            dtype: linear_dtype,
        };
        Self::from_source(cfg, &src, range, device)
    }

    /// Random weights (std `0.02`) for a config, deterministic in `seed` for any block range.
    pub fn random(
        cfg: ModelConfig,
        seed: u64,
        range: Option<Range<usize>>,
        device: Device,
    ) -> Result<Transformer> {
        Self::from_source(cfg, &RandomWeights { seed, std: 0.02 }, range, device)
    }

    /// Builds blocks `range` (all when `None`) from any weight source.
    pub fn from_source(
        cfg: ModelConfig,
        src: &dyn WeightSource,
        range: Option<Range<usize>>,
        device: Device,
    ) -> Result<Transformer> {
        let range = range.unwrap_or(0..cfg.num_layers);
        if range.start > range.end || range.end > cfg.num_layers {
            return Err(ModelError::Input(format!(
                "block range {range:?} is not within the model's {} blocks",
                cfg.num_layers
            )));
        }
        let d = cfg.hidden();
        let _span = tracing::info_span!("load", blocks = ?range, arch = ?cfg.arch).entered();
        // A CPU model with bf16 linear layers runs its attention's products in bf16 too (AMX or AVX512-BF16),
        // as the bf16 model it stands for does.
        let device = match device {
            Device::Cpu(_) if src.linear_dtype() == kernels::DType::BF16 => {
                device.with_compute_dtype(kernels::DType::BF16)
            }
            other => other,
        };
        // A GPU stage's weights go to the GPU as they are read, in its compute dtype.
        let placed = crate::weights::placed(src, &device);
        let src = placed.source();
        if let Some(m) = &cfg.mmdit {
            let slice = MmditSlice::load(m, src, range.clone())?;
            tracing::debug!(blocks = range.len(), "model slice loaded");
            return Ok(Transformer {
                cfg,
                device,
                range,
                patch_embed: None,
                blocks: Vec::new(),
                head: None,
                pixart: None,
                pos_tables: Mutex::new(HashMap::new()),
                mmdit: Some(slice),
            });
        }
        let patch_embed = (range.start == 0)
            .then(|| PatchEmbed::load(src, d, cfg.in_channels, cfg.patch_size))
            .transpose()?;
        let blocks = range
            .clone()
            .map(|i| Block::load(src, i, &cfg))
            .collect::<Result<Vec<_>>>()?;
        let out = cfg.patch_size * cfg.patch_size * cfg.out_channels;
        let head = if range.end == cfg.num_layers {
            Some(match cfg.arch {
                Arch::Dit => FinalLayer::Dit {
                    emb: DitEmbedder::load(src, 0, &cfg)?,
                    proj1: Linear::load(src, "proj_out_1", 2 * d, d)?,
                    proj2: Linear::load(src, "proj_out_2", out, d)?,
                },
                Arch::PixArt => FinalLayer::PixArt {
                    table: src.tensor("scale_shift_table", &[2, d])?,
                    proj: Linear::load(src, "proj_out", out, d)?,
                },
                Arch::Sd3 | Arch::Flux => unreachable!("MMDiT slices return above"),
            })
        } else {
            None
        };
        let pixart = (cfg.arch == Arch::PixArt)
            .then(|| PixArtEmbedders::load(src, &cfg))
            .transpose()?;
        tracing::debug!(blocks = blocks.len(), "model slice loaded");
        Ok(Transformer {
            cfg,
            device,
            range,
            patch_embed,
            blocks,
            head,
            pixart,
            pos_tables: Mutex::new(HashMap::new()),
            mmdit: None,
        })
    }

    /// The config.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The blocks this instance holds.
    pub fn block_range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// The device its ops run on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Conditioning for one forward (every stage computes its own).
    pub fn conditioning(&self, inputs: &CondInputs) -> Result<Conditioning> {
        if let Some(m) = &self.mmdit {
            return m.conditioning(&self.device, inputs);
        }
        self.device
            .install(|| conditioning(&self.device, &self.cfg, self.pixart.as_ref(), inputs))
    }

    fn pos_table(&self, grid_h: usize, grid_w: usize) -> Arc<Vec<f32>> {
        let mut cache = self.pos_tables.lock().expect("pos table cache poisoned");
        let (d, base, interp) = (
            self.cfg.hidden(),
            self.cfg.sample_size / self.cfg.patch_size,
            self.cfg.interpolation_scale,
        );
        let interp = if self.cfg.arch == Arch::Dit {
            1.0
        } else {
            interp
        };
        cache
            .entry((grid_h, grid_w))
            .or_insert_with(|| Arc::new(pos_embed_2d(d, grid_h, grid_w, base, interp)))
            .clone()
    }

    /// Stage 0 of any family: the stage frame of a latent strip `[B, C, rows*p, W]` whose first
    /// token row is `first_row` of an image `grid_rows` token rows high: DiT / PixArt its tokens
    /// (see [`embed`](Self::embed)), MMDiT its tokens and the embedded prompt tokens from `cond`,
    /// `[B, rows*w + T, d]` (see `mmdit/slice.rs`).
    pub fn embed_with(
        &self,
        strip: &Tensor,
        first_row: usize,
        grid_rows: usize,
        cond: &Conditioning,
    ) -> Result<Tensor> {
        match &self.mmdit {
            Some(m) => self
                .device
                .install(|| m.embed(&self.device, strip, first_row, grid_rows, cond)),
            None => self.embed(strip, first_row, grid_rows),
        }
    }

    /// Stage 0: tokens `[B, rows*w, d]` of a latent strip `[B, C, rows*p, W]` whose first token
    /// row is `first_row` of an image `grid_rows` token rows high (position embedding added).
    /// DiT and PixArt only (MMDiT frames also hold the prompt: [`embed_with`](Self::embed_with)).
    pub fn embed(&self, strip: &Tensor, first_row: usize, grid_rows: usize) -> Result<Tensor> {
        if self.mmdit.is_some() {
            return Err(ModelError::Input(
                "an MMDiT stage frame also holds the prompt tokens: use embed_with".into(),
            ));
        }
        let pe = self.patch_embed.as_ref().ok_or_else(|| {
            ModelError::Input(format!(
                "blocks {:?} do not include the patch embedding (stage 0)",
                self.range
            ))
        })?;
        let p = self.cfg.patch_size;
        let &[_, c, h, w] = strip.shape() else {
            return Err(ModelError::Input(format!(
                "latent must be [B, C, H, W], got {:?}",
                strip.shape()
            )));
        };
        if c != self.cfg.in_channels || h % p != 0 || w % p != 0 || first_row + h / p > grid_rows {
            return Err(ModelError::Input(format!(
                "latent strip {:?} at token row {first_row} does not fit: needs {} channels, H and W divisible by patch size {p}, rows within {grid_rows}",
                strip.shape(), self.cfg.in_channels
            )));
        }
        self.device.install(|| {
            let mut x = pe.forward(&self.device, strip)?; // [B, n, d]
            let table = self.pos_table(grid_rows, w / p);
            let d = self.cfg.hidden();
            let rows = &table[first_row * (w / p) * d..(first_row + h / p) * (w / p) * d];
            let pos = self
                .device
                .import(Tensor::from_vec(rows.to_vec(), &[x.dim(1), d])?)?;
            self.device.add_broadcast_(&mut x, &pos)?;
            Ok(x)
        })
    }

    /// Runs this instance's blocks on tokens `x: [B, n, d]` (any subset of the image's tokens).
    pub fn run_blocks(&self, x: &mut Tensor, cond: &Conditioning) -> Result<()> {
        if let Some(m) = &self.mmdit {
            return m.run(&self.device, x, cond, crate::mmdit::PartMode::Whole);
        }
        cond.check_tokens(x, self.cfg.hidden())?;
        bring(&self.device, x)?;
        self.device.install(|| {
            for (i, block) in self.range.clone().zip(&self.blocks) {
                let _span = tracing::trace_span!("block", i).entered();
                block.forward(&self.device, x, cond, &self.cfg, AttnMode::Local)?;
            }
            Ok(())
        })
    }

    /// A K/V buffer for this instance's blocks: batch `batch` (B'), `tokens` rows: the image
    /// tokens S, plus for MMDiT the prompt tokens T.
    pub fn kv_buffer(&self, batch: usize, tokens: usize) -> Result<KvBuffer> {
        self.kv_buffer_for_heads(batch, tokens, 1)
    }

    /// PipeFusion: runs this instance's blocks on the tokens `x: [B', n, d]` of one patch that
    /// starts at image token `first`. Each self-attention writes the patch's K/V into `kv` and
    /// attends to the whole buffer (fresh rows for patches already run this step, stale for the
    /// rest, masked for tokens never written in this request). With one patch covering the whole
    /// image this equals [`Transformer::run_blocks`].
    pub fn run_blocks_with_kv(
        &self,
        x: &mut Tensor,
        cond: &Conditioning,
        kv: &mut KvBuffer,
        first: usize,
    ) -> Result<()> {
        let patch_tokens = x.dim(1);
        self.run_on_buffer(x, cond, None, kv, first, patch_tokens)
    }

    /// Last stage: final norm, projection and unpatchify of tokens `[B, rows*w, d]` of a strip
    /// `token_rows` high and `width` latent pixels wide -> `[B, out_channels, rows*p, width]`.
    pub fn head(
        &self,
        x: &Tensor,
        cond: &Conditioning,
        token_rows: usize,
        width: usize,
    ) -> Result<Tensor> {
        if let Some(m) = &self.mmdit {
            return m.head(&self.device, x, cond, token_rows, width);
        }
        let head = self.head.as_ref().ok_or_else(|| {
            ModelError::Input(format!(
                "blocks {:?} do not include the final layer (last stage)",
                self.range
            ))
        })?;
        let dev = &self.device;
        cond.check_tokens(x, self.cfg.hidden())?;
        let (b, d) = (x.dim(0), self.cfg.hidden());
        let x = &*on_device(dev, x)?;
        dev.install(|| {
            let (shift, scale, proj) = match (head, cond) {
                (
                    FinalLayer::Dit { emb, proj1, proj2 },
                    Conditioning::Dit { t_features, labels },
                ) => {
                    let c0 = emb.forward(dev, t_features, labels)?;
                    let ss = proj1.forward(dev, &dev.silu(&c0)?)?.reshape(&[b, 2 * d])?; // [B, 2d]
                    (ss.narrow(1, 0, d)?, ss.narrow(1, d, d)?, proj2)
                }
                (
                    FinalLayer::PixArt { table, proj },
                    Conditioning::PixArt {
                        embedded_timestep, ..
                    },
                ) => {
                    // shift = table[0] + e, scale = table[1] + e, per batch row.
                    let plus_row = |j: usize| -> Result<Tensor> {
                        let mut m = embedded_timestep.clone().reshape(&[b, 1, d])?;
                        dev.add_broadcast_(&mut m, &table.narrow(0, j, 1)?)?;
                        Ok(m.reshape(&[b, d])?)
                    };
                    (plus_row(0)?, plus_row(1)?, proj)
                }
                _ => {
                    return Err(ModelError::Input(
                        "conditioning of the wrong model family".into(),
                    ))
                }
            };
            let h = dev.layer_norm_modulate(x, &shift, &scale, 1e-6)?;
            // The latent lives in host memory as f32 (the sampler's): unpatchify there.
            let tok = proj
                .forward(dev, &h)?
                .to_host()?
                .to_dtype(kernels::DType::F32)?;
            Ok(dev.unpatchify(
                &tok,
                self.cfg.out_channels,
                token_rows,
                width,
                self.cfg.patch_size,
            )?)
        })
    }

    /// Whole forward of a full model: `latent [B, C, H, W]` -> `[B, out_channels, H, W]`.
    pub fn forward(&self, latent: &Tensor, inputs: &CondInputs) -> Result<Tensor> {
        let cond = self.conditioning(inputs)?;
        self.forward_with(latent, &cond)
    }

    /// Whole forward with precomputed conditioning.
    pub fn forward_with(&self, latent: &Tensor, cond: &Conditioning) -> Result<Tensor> {
        let p = self.cfg.patch_size;
        if latent.shape().len() != 4 {
            return Err(ModelError::Input(format!(
                "latent must be [B, C, H, W], got {:?}",
                latent.shape()
            )));
        }
        let rows = latent.dim(2) / p;
        let mut x = self.embed_with(latent, 0, rows, cond)?;
        self.run_blocks(&mut x, cond)?;
        self.head(&x, cond, rows, latent.dim(3))
    }
}

/// Moves `x` to `dev` (its memory and compute dtype) if it is not there: a stage's input may
/// arrive from the wire or another device in host memory.
pub(crate) fn bring(dev: &Device, x: &mut Tensor) -> Result<()> {
    if !is_on(dev, x) {
        let taken = std::mem::replace(x, Tensor::zeros(&[0]));
        *x = dev.import(taken)?;
    }
    Ok(())
}

/// Whether `x` is in `dev`'s memory and compute dtype.
fn is_on(dev: &Device, x: &Tensor) -> bool {
    x.dtype() == dev.compute_dtype() && dev.holds(x)
}

/// `x` on `dev` (see [`bring`]), borrowed when it is there already.
pub(crate) fn on_device<'a>(dev: &Device, x: &'a Tensor) -> Result<std::borrow::Cow<'a, Tensor>> {
    Ok(if is_on(dev, x) {
        std::borrow::Cow::Borrowed(x)
    } else {
        std::borrow::Cow::Owned(dev.import(x.clone())?)
    })
}
