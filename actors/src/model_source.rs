//! Where a cluster's weights come from: a diffusers folder or a named preset with seeded random
//! weights; and how a device loads only its slice of them.

use std::ops::Range;
use std::path::{Path, PathBuf};

use kernels::Device;
use model::sampler::Scheduler;
use model::{Arch, ModelConfig, Transformer};
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
    /// Seed of a preset's random weights.
    pub seed: u64,
}

/// The transformer folder and scheduler config of a diffusers pipeline folder (model_index.json,
/// transformer/, scheduler/) or of a bare transformer folder (config.json).
pub fn locate_model(dir: &Path) -> std::result::Result<(PathBuf, Option<PathBuf>), String> {
    if dir.join("model_index.json").exists() {
        let t = dir.join("transformer");
        if !t.join("config.json").exists() {
            return Err(format!(
                "{}: pipeline folder without transformer/config.json",
                dir.display()
            ));
        }
        let s = dir.join("scheduler/scheduler_config.json");
        Ok((t, s.exists().then_some(s)))
    } else if dir.join("config.json").exists() {
        Ok((dir.to_path_buf(), None))
    } else {
        Err(format!(
            "{}: neither a diffusers pipeline (model_index.json) nor a transformer folder (config.json)",
            dir.display()
        ))
    }
}

impl ModelSource {
    /// Resolves the spec's model; errors name the topology file, line and field.
    pub fn from_spec(spec: &ClusterSpec) -> Result<ModelSource> {
        match &spec.model {
            ModelSpec::Path(dir) => {
                let (t, s) = locate_model(dir).map_err(|m| {
                    spec.error(
                        "model.path",
                        m,
                        Some("point it at a diffusers pipeline or transformer folder".into()),
                    )
                })?;
                let config = ModelConfig::from_dir(&t)
                    .map_err(|e| spec.error("model.path", e.to_string(), None))?;
                Ok(ModelSource {
                    config,
                    transformer_dir: Some(t),
                    scheduler_file: s,
                    seed: 0,
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
                    seed: *seed,
                })
            }
        }
    }

    /// The pipeline's scheduler, or the family default (DDIM for DiT, DPM-Solver++ for PixArt).
    pub fn default_scheduler(&self) -> Result<Scheduler> {
        match &self.scheduler_file {
            Some(f) => Ok(Scheduler::from_file(f)?),
            None => Ok(Scheduler::named(match self.config.arch {
                Arch::Dit => "ddim",
                Arch::PixArt => "dpm",
            })
            .expect("built-in scheduler")),
        }
    }

    /// Opens `device` and loads blocks `layers` onto it (only those weights are read).
    pub fn load_slice(&self, device: DeviceSpec, layers: Range<usize>) -> Result<Transformer> {
        let dev = match device {
            DeviceSpec::Cpu { threads } => Device::cpu(threads)?,
            DeviceSpec::Cuda { ordinal } => Device::cuda(ordinal)?,
        };
        Ok(match &self.transformer_dir {
            Some(dir) => Transformer::load(dir, Some(layers), dev)?,
            None => Transformer::random(self.config.clone(), self.seed, Some(layers), dev)?,
        })
    }
}
