//! The topology file: which nodes and devices form the cluster, which model runs, and how it is
//! cut up (`[parallel]`).
//!
//! A file is read once ([`ClusterSpec::from_file`] / [`ClusterSpec::parse`]); afterwards the spec
//! is plain data. Every mistake is a [`TopologyError::Invalid`] that names the file, the 1-based
//! line, the TOML field path (`parallel.num_patches`, `nodes[1].devices[0].threads`) and a hint.
//! The spec remembers the line of each field, so errors found later (by [`ClusterSpec::validate`]
//! after an edit, by [`crate::Plan::new`], or by another crate through [`ClusterSpec::error`])
//! still point into the file.
//!
//! The format is documented in the workspace README ("Topology files").

mod read;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{Result, TopologyError};

/// The `file` of a spec built by [`ClusterSpec::local_cpu`].
const COMMAND_LINE: &str = "<command line>";

/// A parsed and validated topology file.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Name of the file in messages (its path, or `<command line>`).
    pub file: String,
    /// The node that runs the coordinator.
    pub coordinator: String,
    /// Which model to run.
    pub model: ModelSpec,
    /// How the model is split over the devices.
    pub parallel: ParallelSpec,
    /// The nodes, in file order.
    pub nodes: Vec<NodeSpec>,
    /// The cluster CA certificate (PEM) every node's certificate is checked against (`[tls] ca`).
    pub tls_ca: Option<PathBuf>,
    /// 1-based line of each field path that came from the file.
    lines: BTreeMap<String, usize>,
}

/// Equality of the described cluster; where the fields came from (lines) does not count.
impl PartialEq for ClusterSpec {
    fn eq(&self, other: &Self) -> bool {
        self.file == other.file
            && self.coordinator == other.coordinator
            && self.model == other.model
            && self.parallel == other.parallel
            && self.nodes == other.nodes
            && self.tls_ca == other.tls_ca
    }
}

/// Which model a topology runs.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSpec {
    /// A diffusers folder; a relative path in a file is resolved against the file's folder.
    Path(PathBuf),
    /// A named preset (for example `DiT-B/2`) with seeded random weights, for benchmarks.
    Preset {
        /// The preset name, stored as written (the `model` crate knows the valid names).
        name: String,
        /// Seed of the random weights.
        seed: u64,
    },
}

/// One machine of the cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSpec {
    /// Unique, non-empty name.
    pub name: String,
    /// `host:port` where the node listens (multi-node runs); `None` for single-node local runs.
    pub address: Option<String>,
    /// The node's devices, in file order.
    pub devices: Vec<DeviceSpec>,
    /// The node's TLS certificate and private key (PEM), signed by the cluster CA
    /// ([`ClusterSpec::tls_ca`]); required for multi-node clusters.
    pub tls: Option<NodeTls>,
}

/// Where a node's certificate and key are (paths resolved against the topology file's folder).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeTls {
    /// PEM certificate whose subject names the node.
    pub cert: PathBuf,
    /// PEM private key of that certificate.
    pub key: PathBuf,
}

/// The format a device keeps its linear layers' weights in (and rounds their inputs to).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Precision {
    /// f32 weights and products.
    #[default]
    F32,
    /// CPU: bf16 linear weights (packed once at load) and inputs, f32 accumulation; everything
    /// else f32. CUDA: the whole stage in bf16 (weights and activations), f32 accumulation.
    Bf16,
    /// CUDA only: the whole stage in f16, f32 accumulation.
    F16,
}

impl Precision {
    /// The name used in topology files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            "f16" => Ok(Precision::F16),
            other => Err(format!(
                "`{other}` is not a precision; values that work: f32, bf16, f16 (cuda devices)"
            )),
        }
    }
}

/// One compute device of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// A CPU device running on `threads` threads.
    Cpu {
        /// Worker threads (1 ..= [`DeviceSpec::MAX_CPU_THREADS`]).
        threads: usize,
        /// Its linear layers' weight format (`dtype = "bf16"`; default f32).
        precision: Precision,
    },
    /// A CUDA GPU.
    Cuda {
        /// The CUDA device ordinal on its node.
        ordinal: usize,
        /// The dtype the whole stage computes in (`dtype = "bf16"`; default f32).
        precision: Precision,
    },
}

impl DeviceSpec {
    /// The most threads a CPU device may name (the kernels' `CpuDevice::MAX_THREADS`; the CLI
    /// tests check that the two agree).
    pub const MAX_CPU_THREADS: usize = 1024;
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu {
                threads,
                precision: Precision::F32,
            } => write!(f, "cpu(threads={threads})"),
            DeviceSpec::Cpu { threads, precision } => {
                write!(f, "cpu(threads={threads}, {precision})")
            }
            DeviceSpec::Cuda {
                ordinal,
                precision: Precision::F32,
            } => write!(f, "cuda:{ordinal}"),
            DeviceSpec::Cuda { ordinal, precision } => write!(f, "cuda:{ordinal}({precision})"),
        }
    }
}

/// The `[parallel]` table, with defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct ParallelSpec {
    /// Pipeline stages N (default: devices / (cfg * ulysses * ring)).
    pub pipefusion_degree: usize,
    /// Patches M per image (default: `pipefusion_degree`).
    pub num_patches: usize,
    /// Synchronous full-image warmup steps W (default 1; 0 allowed).
    pub warmup_steps: usize,
    /// Explicit layers per stage; `None` splits evenly ([`crate::split_layers`]).
    pub layer_split: Option<Vec<usize>>,
    /// CFG parallel degree (1 or 2).
    pub cfg_degree: usize,
    /// Ulysses sequence-parallel degree.
    pub ulysses_degree: usize,
    /// Ring-attention sequence-parallel degree.
    pub ring_degree: usize,
}

/// A device and where it is: the cluster-wide view used by the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRef {
    /// Position in [`ClusterSpec::devices`] (node order, then device order).
    pub index: usize,
    /// Name of the node that holds the device.
    pub node: String,
    /// The device.
    pub spec: DeviceSpec,
}

impl fmt::Display for DeviceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{} {} on {}", self.index, self.spec, self.node)
    }
}

impl ClusterSpec {
    /// Reads and parses a topology file; relative model paths are resolved against its folder.
    ///
    /// An unreadable file is a [`TopologyError::Io`] naming `path`.
    pub fn from_file(path: &Path) -> Result<ClusterSpec> {
        let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new(""));
        ClusterSpec::parse(&text, &path.display().to_string(), Some(base))
    }

    /// Parses and validates topology TOML. `file` is the name used in messages; `base_dir`
    /// (usually the file's folder) resolves a relative `model.path`, which stays as written
    /// when `base_dir` is `None`.
    pub fn parse(text: &str, file: &str, base_dir: Option<&Path>) -> Result<ClusterSpec> {
        let spec = read::read(text, file, base_dir)?;
        spec.validate()?;
        tracing::debug!(
            file,
            nodes = spec.nodes.len(),
            devices = spec.device_count(),
            "parsed topology"
        );
        Ok(spec)
    }

    /// One node `local` with `devices` CPU devices of `threads` threads each;
    /// `pipefusion_degree = num_patches = devices`, warmup 1, the other degrees 1;
    /// `file` is `<command line>`. Not validated (call [`ClusterSpec::validate`]).
    pub fn local_cpu(devices: usize, threads: usize, model: ModelSpec) -> ClusterSpec {
        ClusterSpec {
            file: COMMAND_LINE.to_string(),
            coordinator: "local".to_string(),
            model,
            parallel: ParallelSpec {
                pipefusion_degree: devices,
                num_patches: devices,
                warmup_steps: 1,
                layer_split: None,
                cfg_degree: 1,
                ulysses_degree: 1,
                ring_degree: 1,
            },
            nodes: vec![NodeSpec {
                name: "local".to_string(),
                address: None,
                devices: vec![
                    DeviceSpec::Cpu {
                        threads,
                        precision: Precision::F32
                    };
                    devices
                ],
                tls: None,
            }],
            tls_ca: None,
            lines: BTreeMap::new(),
        }
    }

    /// Re-checks everything [`ClusterSpec::parse`] checks that the types do not already
    /// guarantee (used after struct edits and command-line overrides). Errors carry the line of
    /// the field when it came from a file.
    pub fn validate(&self) -> Result<()> {
        validate::validate(self)
    }

    /// A 32-byte fingerprint of what the nodes must agree on (nodes with addresses and devices,
    /// coordinator, model, parallel plan; not file names, lines or TLS paths). Nodes exchange it
    /// when they connect, so a node started with another topology is refused. Not a security
    /// measure (mutual TLS is): four FNV-1a-64 lanes over a canonical text.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint_with("")
    }

    /// [`ClusterSpec::fingerprint`] over `extra` as well (what the caller knows beyond the file,
    /// e.g. the model's config); an empty `extra` gives the plain fingerprint.
    pub fn fingerprint_with(&self, extra: &str) -> [u8; 32] {
        let model = match &self.model {
            ModelSpec::Path(p) => format!(
                "path:{}",
                p.file_name()
                    .map_or(String::new(), |n| n.to_string_lossy().into_owned())
            ),
            ModelSpec::Preset { name, seed } => format!("preset:{name}:{seed}"),
        };
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| {
                let devs: Vec<String> = n.devices.iter().map(|d| d.to_string()).collect();
                format!(
                    "{}@{}[{}]",
                    n.name,
                    n.address.as_deref().unwrap_or("-"),
                    devs.join(",")
                )
            })
            .collect();
        let mut text = format!(
            "v1|coord={}|model={model}|parallel={:?}|nodes={}",
            self.coordinator,
            self.parallel,
            nodes.join(";")
        );
        if !extra.is_empty() {
            text += "|extra=";
            text += extra;
        }
        let mut out = [0u8; 32];
        for (lane, chunk) in out.chunks_mut(8).enumerate() {
            let mut h: u64 =
                0xcbf2_9ce4_8422_2325 ^ (lane as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            for b in text.bytes() {
                h ^= b as u64;
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
            chunk.copy_from_slice(&h.to_le_bytes());
        }
        out
    }

    /// All devices in file order (node order, then device order); `index` is the position.
    pub fn devices(&self) -> Vec<DeviceRef> {
        self.nodes
            .iter()
            .flat_map(|n| n.devices.iter().map(move |d| (n, *d)))
            .enumerate()
            .map(|(index, (node, spec))| DeviceRef {
                index,
                node: node.name.clone(),
                spec,
            })
            .collect()
    }

    /// Number of devices over all nodes.
    pub fn device_count(&self) -> usize {
        self.nodes.iter().map(|n| n.devices.len()).sum()
    }

    /// Whether the file itself gives `field` (a TOML path such as `parallel.num_patches`), as
    /// opposed to a default.
    pub fn sets(&self, field: &str) -> bool {
        self.lines.contains_key(field)
    }

    /// 1-based line of `field` (a TOML path such as `parallel.num_patches`) in the file, or of
    /// the nearest enclosing table that is there (a defaulted field reports its table's line).
    pub fn line_of(&self, field: &str) -> Option<usize> {
        let mut path = field;
        loop {
            if let Some(line) = self.lines.get(path) {
                return Some(*line);
            }
            // Strip the last segment: `a.b[2].c` -> `a.b[2]` -> `a.b` -> `a`.
            let cut = path.rfind(['.', '['])?;
            path = &path[..cut];
        }
    }

    /// A [`TopologyError::Invalid`] for `field` with this spec's file and (when known) line:
    /// for mistakes found after parsing (for example a model path that does not load).
    pub fn error(
        &self,
        field: &str,
        message: impl Into<String>,
        hint: Option<String>,
    ) -> TopologyError {
        TopologyError::Invalid {
            file: self.file.clone(),
            line: self.line_of(field),
            field: field.to_string(),
            message: message.into(),
            hint,
        }
    }
}
