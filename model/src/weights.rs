//! Weight sources. A model is built from names (the diffusers checkpoint keys) and expected
//! shapes; a source answers with f32 tensors. [`SafetensorsDir`] reads a diffusers folder (single
//! or sharded `diffusion_pytorch_model*.safetensors`, F32 / F16 / BF16), memory-mapping each shard
//! only when one of its tensors is first asked for, so a pipeline stage touches only the bytes of
//! the blocks it owns. [`RandomWeights`] makes deterministic random tensors for presets.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use half::{bf16, f16};
use kernels::{DType, Device, Tensor};
use safetensors::tensor::{Metadata, SafeTensors};
use safetensors::Dtype;

use crate::error::{read_json, ModelError, Result};

/// Where a model's weights come from.
pub trait WeightSource: Send + Sync {
    /// The f32 tensor `name`, which must have `shape`.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor>;
    /// Whether the source has `name`.
    fn contains(&self, name: &str) -> bool;
    /// The format linear layers built from this source keep their weights in: f32 (the default)
    /// or bf16 ([`WithLinearDtype`]).
    fn linear_dtype(&self) -> DType {
        DType::F32
    }
}

/// A weight source whose linear layers keep their weights in `dtype` (bf16: packed once at load
/// for the bf16 GEMM, half the memory); every other weight stays f32.
pub struct WithLinearDtype<'a> {
    /// The weights.
    pub inner: &'a dyn WeightSource,
    /// The linear layers' weight format.
    pub dtype: DType,
}

impl WeightSource for WithLinearDtype<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.inner.tensor(name, shape)
    }
    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }
    fn linear_dtype(&self) -> DType {
        self.dtype
    }
}

/// A weight source whose tensors are moved to `device` as they are read, converted once to its
/// compute dtype (a GPU stage's weights live on the GPU from load on). Linear layers then take
/// those tensors as they are ([`DType::F32`] here means "no CPU bf16 packing"; the tensors'
/// own dtype is the device's).
pub(crate) struct OnDevice<'a> {
    /// The weights.
    pub(crate) inner: &'a dyn WeightSource,
    /// Where they go.
    pub(crate) device: Device,
}

impl WeightSource for OnDevice<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        Ok(self.device.import(self.inner.tensor(name, shape)?)?)
    }
    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }
    fn linear_dtype(&self) -> DType {
        DType::F32
    }
}

/// `src` as a model on `device` reads it: itself on a CPU, [`OnDevice`] on a GPU.
pub(crate) fn placed<'a>(src: &'a dyn WeightSource, device: &Device) -> Placed<'a> {
    match device {
        Device::Cpu(_) => Placed::Host(src),
        Device::Cuda(_) => Placed::Device(OnDevice {
            inner: src,
            device: device.clone(),
        }),
    }
}

/// See [`placed`].
pub(crate) enum Placed<'a> {
    Host(&'a dyn WeightSource),
    Device(OnDevice<'a>),
}

impl Placed<'_> {
    pub(crate) fn source(&self) -> &dyn WeightSource {
        match self {
            Placed::Host(s) => *s,
            Placed::Device(d) => d,
        }
    }
}

struct MappedFile {
    map: memmap2::Mmap,
    data_start: usize,
    meta: Metadata,
}

/// The weights of a diffusers model folder.
pub struct SafetensorsDir {
    dir: PathBuf,
    /// tensor name -> shard file, for sharded checkpoints; `None` for a single file.
    index: Option<HashMap<String, PathBuf>>,
    single: PathBuf,
    open: Mutex<HashMap<PathBuf, Arc<MappedFile>>>,
    read_log: Mutex<Vec<String>>,
}

const SINGLE: &str = "diffusion_pytorch_model.safetensors";
const INDEX: &str = "diffusion_pytorch_model.safetensors.index.json";

impl SafetensorsDir {
    /// Opens a model folder (reads the shard index if present; maps nothing yet).
    pub fn open(dir: &Path) -> Result<SafetensorsDir> {
        let index_path = dir.join(INDEX);
        let index = if index_path.exists() {
            let v = read_json(&index_path)?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    ModelError::config(
                        &index_path,
                        "weight_map",
                        "missing or not an object of name -> file",
                    )
                })?;
            let mut index = HashMap::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    ModelError::config(
                        &index_path,
                        &format!("weight_map.{name}"),
                        "expected a file name",
                    )
                })?;
                // Confined to the model folder: one plain file name, no `..`, no absolute path.
                let mut parts = Path::new(file).components();
                if !matches!(
                    (parts.next(), parts.next()),
                    (Some(std::path::Component::Normal(_)), None)
                ) {
                    return Err(ModelError::config(
                        &index_path,
                        &format!("weight_map.{name}"),
                        format!(
                            "`{file}` is not a file name inside the model folder (shards must sit \
                             beside the index)"
                        ),
                    ));
                }
                index.insert(name.clone(), dir.join(file));
            }
            Some(index)
        } else if dir.join(SINGLE).exists() {
            None
        } else {
            return Err(ModelError::io(
                dir.join(SINGLE),
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no diffusion_pytorch_model.safetensors or its .index.json in the model folder",
                ),
            ));
        };
        Ok(SafetensorsDir {
            dir: dir.to_path_buf(),
            index,
            single: dir.join(SINGLE),
            open: Mutex::new(HashMap::new()),
            read_log: Mutex::new(Vec::new()),
        })
    }

    /// Names of the tensors read so far, in order (lets tests check that a stage reads only its
    /// own blocks).
    pub fn tensors_read(&self) -> Vec<String> {
        self.read_log.lock().expect("read log poisoned").clone()
    }

    /// Shard files mapped so far.
    pub fn files_opened(&self) -> Vec<PathBuf> {
        let mut v: Vec<_> = self
            .open
            .lock()
            .expect("file table poisoned")
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// The names of every tensor in the checkpoint: the shard index's keys (no shard is mapped),
    /// or the single file's header. Returns the file that lists them too.
    pub fn names(&self) -> Result<(PathBuf, Vec<String>)> {
        Ok(match &self.index {
            Some(ix) => (self.dir.join(INDEX), ix.keys().cloned().collect()),
            None => (
                self.single.clone(),
                self.mapped(&self.single)?.meta.offset_keys(),
            ),
        })
    }

    /// Every tensor's name and element count, read from the file headers (shards are mapped,
    /// no tensor is read): what a slice will hold, before it is loaded.
    pub fn element_counts(&self) -> Result<Vec<(String, u64)>> {
        let mut files: Vec<PathBuf> = match &self.index {
            Some(ix) => ix.values().cloned().collect(),
            None => vec![self.single.clone()],
        };
        files.sort();
        files.dedup();
        let mut out = Vec::new();
        for f in files {
            let meta = &self.mapped(&f)?.meta;
            out.extend(meta.tensors().into_iter().map(|(name, info)| {
                let n = info
                    .shape
                    .iter()
                    .fold(1u64, |a, &d| a.saturating_mul(d as u64));
                (name, n)
            }));
        }
        Ok(out)
    }

    /// Refuses a checkpoint with blocks the config does not count: `blocks` lists each block
    /// family as (name prefix, blocks in the config, config field), e.g.
    /// `("transformer_blocks", 3, "num_layers")`. A `transformer_blocks.3.*` tensor with
    /// `num_layers` 3 would otherwise be silently dropped. `config` is the config file named in
    /// the error.
    pub fn check_block_counts(&self, config: &Path, blocks: &[(&str, usize, &str)]) -> Result<()> {
        let (file, names) = self.names()?;
        for &(prefix, count, field) in blocks {
            let mut extra: Vec<(usize, &str)> = names
                .iter()
                .filter_map(|n| {
                    let rest = n.strip_prefix(prefix)?.strip_prefix('.')?;
                    let (i, _) = rest.split_once('.')?;
                    let i: usize = i.parse().ok()?;
                    (i >= count).then_some((i, n.as_str()))
                })
                .collect();
            if extra.is_empty() {
                continue;
            }
            extra.sort_unstable();
            let top = extra.last().map_or(0, |e| e.0);
            let shown: Vec<&str> = extra.iter().take(3).map(|e| e.1).collect();
            let more = match extra.len() - shown.len() {
                0 => String::new(),
                n => format!(" and {n} more"),
            };
            return Err(ModelError::config(
                config,
                field,
                format!(
                    "is {count}, but {} has blocks up to {prefix}.{top} ({}{more}), which would be \
                     silently dropped; set {field} to {} to match the weights",
                    file.display(),
                    shown.join(", "),
                    top + 1,
                ),
            ));
        }
        Ok(())
    }

    fn file_of(&self, name: &str) -> Option<PathBuf> {
        match &self.index {
            Some(ix) => ix.get(name).cloned(),
            None => Some(self.single.clone()),
        }
    }

    fn mapped(&self, path: &Path) -> Result<Arc<MappedFile>> {
        let mut open = self.open.lock().expect("file table poisoned");
        if let Some(f) = open.get(path) {
            return Ok(f.clone());
        }
        crate::error::regular_file(path, "a .safetensors file")?;
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the file is opened read-only; like every mmap-based loader (candle, safetensors'
        // own Python loader) we assume it is not truncated while the model is loading.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let (n, meta) = SafeTensors::read_metadata(&map).map_err(|e| ModelError::Safetensors {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        let f = Arc::new(MappedFile {
            map,
            data_start: 8 + n,
            meta,
        });
        open.insert(path.to_path_buf(), f.clone());
        Ok(f)
    }
}

impl WeightSource for SafetensorsDir {
    fn contains(&self, name: &str) -> bool {
        match &self.index {
            Some(ix) => ix.contains_key(name),
            None => self
                .mapped(&self.single)
                .map(|f| f.meta.info(name).is_some())
                .unwrap_or(false),
        }
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let missing = |path: PathBuf| ModelError::MissingTensor {
            name: name.to_string(),
            path,
        };
        // Not in the shard index: name the index; in no shard: name the file searched.
        let path = self
            .file_of(name)
            .ok_or_else(|| missing(self.dir.join(INDEX)))?;
        let f = self.mapped(&path)?;
        let info = f.meta.info(name).ok_or_else(|| missing(path.clone()))?;
        if info.shape != shape {
            return Err(ModelError::TensorShape {
                path,
                name: name.into(),
                expected: shape.to_vec(),
                got: info.shape.clone(),
            });
        }
        let bytes = &f.map[f.data_start + info.data_offsets.0..f.data_start + info.data_offsets.1];
        let data: Vec<f32> = match info.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(ModelError::UnsupportedDType {
                    path,
                    name: name.into(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        if let Some(index) = first_non_finite(&data) {
            return Err(ModelError::NonFiniteWeight {
                path,
                name: name.into(),
                index,
                value: data[index],
            });
        }
        self.read_log
            .lock()
            .expect("read log poisoned")
            .push(name.to_string());
        Ok(Tensor::from_vec(data, shape)?)
    }
}

/// The index of the first NaN or infinity in `data`, if any. Branch-free over chunks (so it
/// vectorises: one pass at memory speed), then a scan of the one chunk that has one.
fn first_non_finite(data: &[f32]) -> Option<usize> {
    const CHUNK: usize = 4096;
    let exp = 0x7f80_0000u32;
    data.chunks(CHUNK).enumerate().find_map(|(k, c)| {
        let bad = c
            .iter()
            .fold(0u32, |m, x| m | ((x.to_bits() & exp == exp) as u32));
        (bad != 0).then(|| k * CHUNK + c.iter().position(|x| !x.is_finite()).unwrap_or(0))
    })
}

/// Deterministic random weights for benchmarks and tests: every tensor is uniform with standard
/// deviation `std` (0 for nothing: biases too are random), seeded by `(seed, name)` so that any
/// stage building any block range gets the same values as a whole-model build.
#[derive(Debug, Clone)]
pub struct RandomWeights {
    /// Base seed.
    pub seed: u64,
    /// Standard deviation of every element.
    pub std: f32,
}

impl WeightSource for RandomWeights {
    fn contains(&self, _name: &str) -> bool {
        true
    }
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        // FNV-1a of the name, mixed with the seed, drives a splitmix64 stream.
        let mut state = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        }) ^ self.seed;
        let half_width = self.std * 3f32.sqrt();
        let n: usize = shape.iter().product();
        let data = (0..n)
            .map(|_| {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * half_width
            })
            .collect();
        Ok(Tensor::from_vec(data, shape)?)
    }
}

/// Standard-normal noise of `shape`, deterministic in `seed` (`StdRng` + `StandardNormal`): the
/// initial latent of a request given a seed.
pub fn gaussian(shape: &[usize], seed: u64) -> Tensor {
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = shape.iter().product();
    let data = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
    Tensor::from_vec(data, shape).expect("length matches shape")
}
