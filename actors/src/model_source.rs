//! Where a cluster's weights come from: a diffusers folder or a named preset with seeded random
//! weights; and how a device loads only its slice of them.

use std::ops::Range;
use std::path::{Path, PathBuf};

use kernels::Device;
use model::sampler::Scheduler;
use model::{ModelConfig, Transformer};
use topology::{ClusterSpec, DeviceSpec, ModelSpec};

use crate::error::Result;

/// A model resolved from a topology's `[model]` table.
#[derive(Debug, Clone)]
pub struct ModelSource {
    /// The transformer's config.
    pub config: ModelConfig,
    /// Folder with `config.json` and the safetensors (None for a preset).
    pub transformer_dir: Option<PathBuf>,
    /// The pipeline's `scheduler/scheduler_config.json`, when the folder is a pipeline.
    pub scheduler_file: Option<PathBuf>,
    /// The pipeline's `vae/` folder (latent-space models); `None` for pixel-space models, bare
    /// transformer folders and presets.
    pub vae_dir: Option<PathBuf>,
    /// Seed of a preset's random weights.
    pub seed: u64,
    /// Class names to ids from the pipeline's `model_index.json` `id2label` (empty when none).
    pub labels: std::collections::BTreeMap<String, usize>,
}

/// The parts of a diffusers folder.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelFolder {
    /// `transformer/` (or the folder itself when it is a bare transformer folder).
    pub transformer: PathBuf,
    /// `scheduler/scheduler_config.json`, when present.
    pub scheduler: Option<PathBuf>,
    /// `vae/`, when present (it holds `config.json`).
    pub vae: Option<PathBuf>,
    /// Class names to ids (`model_index.json`'s `id2label`; empty when none).
    pub labels: std::collections::BTreeMap<String, usize>,
}

/// The parts of a diffusers pipeline folder (model_index.json, transformer/, scheduler/, vae/) or
/// of a bare transformer folder (config.json).
pub fn locate_model(dir: &Path) -> std::result::Result<ModelFolder, String> {
    if dir.join("model_index.json").exists() {
        // A broken index or another kind of pipeline is refused naming the file and the classes
        // that work.
        let index = model::ModelIndex::from_file(&dir.join("model_index.json"))
            .map_err(|e| e.to_string())?;
        let t = dir.join("transformer");
        if !t.join("config.json").exists() {
            return Err(format!(
                "{}: pipeline folder without transformer/config.json",
                dir.display()
            ));
        }
        let s = dir.join("scheduler/scheduler_config.json");
        let v = dir.join("vae");
        Ok(ModelFolder {
            transformer: t,
            scheduler: s.exists().then_some(s),
            vae: v.join("config.json").exists().then_some(v),
            labels: index.labels,
        })
    } else if dir.join("config.json").exists() {
        Ok(ModelFolder {
            transformer: dir.to_path_buf(),
            scheduler: None,
            vae: None,
            labels: Default::default(),
        })
    } else {
        Err(format!(
            "{}: neither a diffusers pipeline (model_index.json) nor a transformer folder (config.json)",
            dir.display()
        ))
    }
}

impl ModelSource {
    /// Every weight tensor's name and element count from the checkpoint's headers (nothing is
    /// loaded); `None` for a preset, whose random weights have no file.
    pub fn weight_elements(&self) -> Result<Option<Vec<(String, u64)>>> {
        match &self.transformer_dir {
            Some(dir) => Ok(Some(model::SafetensorsDir::open(dir)?.element_counts()?)),
            None => Ok(None),
        }
    }

    /// Resolves the spec's model; errors name the topology file, line and field.
    pub fn from_spec(spec: &ClusterSpec) -> Result<ModelSource> {
        match &spec.model {
            ModelSpec::Path(dir) => {
                let folder = locate_model(dir).map_err(|m| {
                    spec.error(
                        "model.path",
                        m,
                        Some("point it at a diffusers pipeline or transformer folder".into()),
                    )
                })?;
                let config = ModelConfig::from_dir(&folder.transformer)
                    .map_err(|e| spec.error("model.path", e.to_string(), None))?;
                Ok(ModelSource {
                    config,
                    transformer_dir: Some(folder.transformer),
                    scheduler_file: folder.scheduler,
                    vae_dir: folder.vae,
                    seed: 0,
                    labels: folder.labels,
                })
            }
            ModelSpec::Preset { name, seed } => {
                let config = ModelConfig::preset(name).ok_or_else(|| {
                    spec.error(
                        "model.preset",
                        format!("unknown preset `{name}`"),
                        Some(format!(
                            "known presets: {}",
                            ModelConfig::PRESETS.join(", ")
                        )),
                    )
                })?;
                Ok(ModelSource {
                    config,
                    transformer_dir: None,
                    scheduler_file: None,
                    vae_dir: None,
                    seed: *seed,
                    labels: Default::default(),
                })
            }
        }
    }

    /// The pipeline's scheduler, or the family default (DDIM for DiT, DPM-Solver++ for PixArt,
    /// flow-matching Euler for SD3 (shift 3) and Flux (FLUX.1-dev's dynamic shift)).
    pub fn default_scheduler(&self) -> Result<Scheduler> {
        match &self.scheduler_file {
            Some(f) => Ok(Scheduler::from_file(f)?),
            None => Ok(Scheduler::family_default(self.config.arch)),
        }
    }

    /// Opens `device` and loads blocks `layers` onto it (only those weights are read).
    pub fn load_slice(&self, device: DeviceSpec, layers: Range<usize>) -> Result<Transformer> {
        let (dev, precision) = match device {
            DeviceSpec::Cpu { threads, precision } => (Device::cpu(threads)?, precision),
            // A GPU stage computes entirely in its dtype (weights converted once at load).
            DeviceSpec::Cuda { ordinal, precision } => (
                Device::cuda(ordinal)?.with_compute_dtype(dtype_of(precision)),
                topology::Precision::F32,
            ),
        };
        let dtype = dtype_of(precision);
        Ok(match &self.transformer_dir {
            Some(dir) => Transformer::load_with(dir, Some(layers), dev, dtype)?,
            None => {
                let weights = model::RandomWeights {
                    seed: self.seed,
                    std: 0.02,
                };
                let source = model::WithLinearDtype {
                    inner: &weights,
                    dtype,
                };
                Transformer::from_source(self.config.clone(), &source, Some(layers), dev)?
            }
        })
    }
}

/// The kernels' dtype of a topology precision.
fn dtype_of(p: topology::Precision) -> kernels::DType {
    match p {
        topology::Precision::F32 => kernels::DType::F32,
        topology::Precision::Bf16 => kernels::DType::BF16,
        topology::Precision::F16 => kernels::DType::F16,
    }
}
