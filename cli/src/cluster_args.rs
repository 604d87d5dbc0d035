//! Where the cluster comes from: a topology file, or a local cluster of N CPU devices described
//! by flags; the xDiT-style flags override the file's values.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use topology::{ClusterSpec, DeviceSpec, ModelSpec};

/// Cluster flags shared by `generate` and `plan`.
#[derive(Args, Debug, Clone)]
pub(crate) struct ClusterArgs {
    /// Topology TOML file (nodes, devices, model, parallel plan); see README "Topology files".
    /// Without it, a local cluster of --pipefusion-degree CPU devices runs --model; with neither,
    /// the bundled demo model (assets/digits-dit) runs on 2 local CPU devices.
    #[arg(long, value_name = "FILE")]
    topology: Option<PathBuf>,
    /// Model folder: a diffusers pipeline (model_index.json, transformer/, scheduler/) or a
    /// transformer folder (config.json + diffusion_pytorch_model*.safetensors). Overrides the
    /// topology's [model].
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// PipeFusion stages N (one device each). Overrides the topology; without one, the number of
    /// local CPU devices per CFG group and sequence-parallel rank [default: 2 for the bundled
    /// demo model without CFG or sequence parallelism, else 1].
    #[arg(long, value_name = "N")]
    pipefusion_degree: Option<usize>,
    /// CFG parallel degree, 1 or 2: with 2, two device groups run the two branches of
    /// classifier-free guidance (each a PipeFusion pipeline of N stages) and swap their noise
    /// predictions after every patch; needs a guidance scale above 1. Overrides the topology; a
    /// local cluster gets C x N x U x R devices [default: the topology's, else 1].
    #[arg(long, value_name = "C")]
    cfg_degree: Option<usize>,
    /// Ulysses sequence-parallel degree U: each stage's tokens are split over U devices that
    /// swap attention inputs all-to-all in every layer (must divide the heads; also inside
    /// PipeFusion stages, each patch cut into U x R sub-strips). Overrides the topology; a local
    /// cluster gets C x N x U x R devices [default: 1].
    #[arg(long, value_name = "U")]
    ulysses_degree: Option<usize>,
    /// Ring-attention sequence-parallel degree R: each stage's tokens are split over R devices
    /// whose keys and values travel around a ring in every layer (also inside PipeFusion stages,
    /// each patch cut into U x R sub-strips); with --ulysses-degree > 1 it is USP (Ulysses among
    /// adjacent devices, Ring across). Overrides the topology; a local cluster gets C x N x U x R
    /// devices [default: 1].
    #[arg(long, value_name = "R")]
    ring_degree: Option<usize>,
    /// Patches M the latent is cut into (horizontal strips of token rows) [default: the topology's,
    /// else N; 1 for a single device].
    #[arg(long, value_name = "M")]
    num_patches: Option<usize>,
    /// Synchronous full-image warmup steps W before patch pipelining [default: the topology's,
    /// else 1].
    #[arg(long, value_name = "W")]
    warmup_steps: Option<usize>,
    /// CPU threads per device, 1 to 1024 [default: the topology's; for a local cluster,
    /// cores / N].
    #[arg(long, value_name = "T", value_parser = thread_count)]
    threads: Option<usize>,
    /// Where a local cluster's devices run: `cpu`, or `cuda` (GPU i for device i; DiT, PixArt,
    /// SD3 and Flux stages; a machine without a driver or GPU, or a build without the `cuda`
    /// feature, ends with an error saying which). Not with --topology (its devices say it).
    #[arg(long, value_name = "KIND", default_value = "cpu", value_parser = ["cpu", "cuda"])]
    device: String,
    /// Precision of every device. CPU: `f32`, or `bf16` linear layers (weights packed once at
    /// load, inputs rounded to bf16, f32 accumulation; AMX tiles or AVX512-BF16 where the CPU
    /// has them, 1.8-4.5x faster on DiT-XL/2; output within ~5e-3 of f32). CUDA: the whole stage in `f32`,
    /// `bf16` or `f16` (f32 accumulation). Overrides the topology's `dtype` [default: the
    /// topology's, else f32].
    #[arg(long, value_name = "DTYPE")]
    dtype: Option<topology::Precision>,
}

/// Cores of this machine (the default thread count of one device).
/// Parses a `--threads` value: 1 ..= the kernels' bound on one CPU device's threads.
pub(crate) fn thread_count(text: &str) -> std::result::Result<usize, String> {
    let max = kernels::CpuDevice::MAX_THREADS;
    match text.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        Ok(n) => Err(format!(
            "{n} threads: a device has 1 to {max} (this machine has {} cores)",
            cores()
        )),
        Err(e) => Err(format!("`{text}` is not a thread count: {e}")),
    }
}

pub(crate) fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The demo model shipped in the repository (a class-conditional pixel-space DiT of digits).
pub(crate) fn bundled_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/digits-dit")
}

impl ClusterArgs {
    /// The topology file, if any.
    pub(crate) fn topology(&self) -> Option<&std::path::Path> {
        self.topology.as_deref()
    }

    /// The numeric flags that override a topology file, with their values when given.
    fn numeric_overrides(&self) -> [(&'static str, Option<usize>); 7] {
        [
            ("--pipefusion-degree", self.pipefusion_degree),
            ("--cfg-degree", self.cfg_degree),
            ("--ulysses-degree", self.ulysses_degree),
            ("--ring-degree", self.ring_degree),
            ("--num-patches", self.num_patches),
            ("--warmup-steps", self.warmup_steps),
            ("--threads", self.threads),
        ]
    }

    /// The flags to repeat for another node's process, so that it builds the same topology.
    pub(crate) fn forwarded(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(t) = &self.topology {
            v.extend(["--topology".to_string(), t.display().to_string()]);
        }
        if let Some(m) = &self.model {
            v.extend(["--model".to_string(), m.display().to_string()]);
        }
        for (flag, val) in self.numeric_overrides() {
            if let Some(x) = val {
                v.extend([flag.to_string(), x.to_string()]);
            }
        }
        if let Some(d) = self.dtype {
            v.extend(["--dtype".to_string(), d.to_string()]);
        }
        v
    }

    /// Whether the request runs the bundled demo model (no --model, no --topology).
    pub(crate) fn uses_bundled_model(&self) -> bool {
        self.model.is_none() && self.topology.is_none()
    }

    /// The cluster these flags describe, validated (errors name the file/flag, line and field).
    pub(crate) fn spec(&self) -> Result<ClusterSpec> {
        if let (Some(path), "cuda") = (&self.topology, self.device.as_str()) {
            bail!(
                "--device cuda: {} names its devices itself (kind = \"cuda\", index = N)",
                path.display()
            );
        }
        let mut spec = match &self.topology {
            Some(path) => {
                let mut s = ClusterSpec::from_file(path)?;
                if let Some(n) = self.pipefusion_degree {
                    s.parallel.pipefusion_degree = n;
                }
                if let Some(u) = self.ulysses_degree {
                    s.parallel.ulysses_degree = u;
                }
                if let Some(r) = self.ring_degree {
                    s.parallel.ring_degree = r;
                }
                if let Some(c) = self.cfg_degree {
                    s.parallel.cfg_degree = c;
                }
                let changed = self.cfg_degree.is_some()
                    || self.ulysses_degree.is_some()
                    || self.ring_degree.is_some();
                // Degrees the file left to their defaults follow the new degrees, as if the file
                // had said them: N = devices / (cfg * ulysses * ring), M = N.
                if changed
                    && self.pipefusion_degree.is_none()
                    && !s.sets("parallel.pipefusion_degree")
                {
                    let p = &s.parallel;
                    let others = (p.cfg_degree * p.ulysses_degree * p.ring_degree).max(1);
                    s.parallel.pipefusion_degree = s.device_count() / others;
                    if !s.sets("parallel.num_patches") {
                        s.parallel.num_patches = s.parallel.pipefusion_degree;
                    }
                }
                if let Some(t) = self.threads {
                    for d in s.nodes.iter_mut().flat_map(|n| n.devices.iter_mut()) {
                        if let DeviceSpec::Cpu { threads, .. } = d {
                            *threads = t;
                        }
                    }
                }
                s
            }
            None => {
                let bundled = bundled_model();
                let model = match &self.model {
                    Some(m) => m,
                    None if bundled.join("model_index.json").exists() => &bundled,
                    None => bail!(
                        "no --model or --topology given, and the bundled demo model is not at {} (run from a pipefuse checkout, or pass --model DIR)",
                        bundled.display()
                    ),
                };
                let (u, r) = (
                    self.ulysses_degree.unwrap_or(1),
                    self.ring_degree.unwrap_or(1),
                );
                if u == 0 || r == 0 {
                    bail!("--ulysses-degree and --ring-degree must be at least 1");
                }
                // The demo runs PipeFusion on 2 devices unless another kind of parallelism is
                // asked for.
                let others = self.cfg_degree.unwrap_or(1) > 1 || u * r > 1;
                let default_n = if self.model.is_none() && !others {
                    2
                } else {
                    1
                };
                let n = self.pipefusion_degree.unwrap_or(default_n);
                if n == 0 {
                    bail!("--pipefusion-degree must be at least 1");
                }
                let c = self.cfg_degree.unwrap_or(1);
                if !(1..=2).contains(&c) {
                    bail!("--cfg-degree must be 1 or 2 (the two branches of classifier-free guidance), found {c}");
                }
                let devices = n * c * u * r;
                let threads = self.threads.unwrap_or((cores() / devices).max(1));
                let mut s =
                    ClusterSpec::local_cpu(devices, threads, ModelSpec::Path(model.clone()));
                if self.device == "cuda" {
                    for (i, d) in s.nodes[0].devices.iter_mut().enumerate() {
                        *d = topology::DeviceSpec::Cuda {
                            ordinal: i,
                            precision: topology::Precision::F32,
                        };
                    }
                }
                s.parallel.pipefusion_degree = n;
                s.parallel.cfg_degree = c;
                s.parallel.ulysses_degree = u;
                s.parallel.ring_degree = r;
                // M defaults to N (the pipeline's length), not to the device count.
                s.parallel.num_patches = n;
                s
            }
        };
        if let Some(p) = self.dtype {
            for d in spec.nodes.iter_mut().flat_map(|n| n.devices.iter_mut()) {
                match d {
                    DeviceSpec::Cpu { precision, .. } | DeviceSpec::Cuda { precision, .. } => {
                        *precision = p
                    }
                }
            }
        }
        if let (Some(m), Some(_)) = (&self.model, &self.topology) {
            spec.model = ModelSpec::Path(m.clone());
        }
        if let Some(m) = self.num_patches {
            spec.parallel.num_patches = m;
        }
        if let Some(w) = self.warmup_steps {
            spec.parallel.warmup_steps = w;
        }
        let overrides: Vec<String> = self
            .numeric_overrides()
            .iter()
            .filter_map(|(flag, v)| v.map(|v| format!("{flag} {v}")))
            .collect();
        match (&self.topology, spec.validate()) {
            (_, Ok(())) => Ok(spec),
            (Some(path), Err(e)) if !overrides.is_empty() => {
                Err(anyhow::Error::new(e).context(format!(
                    "{} with the command-line overrides {}",
                    path.display(),
                    overrides.join(" ")
                )))
            }
            (_, Err(e)) => Err(e.into()),
        }
    }
}
