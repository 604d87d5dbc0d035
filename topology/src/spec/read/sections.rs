//! The tables of the topology format: `[model]`, `[parallel]`, `[[nodes]]` and their devices.

use std::path::{Path, PathBuf};

use toml::de::DeTable;

use super::{join, Reader, Value};
use crate::error::Result;
use crate::spec::{DeviceSpec, ModelSpec, NodeSpec, NodeTls, ParallelSpec, Precision};

pub(super) const TOP_KEYS: &[&str] = &["coordinator", "model", "parallel", "nodes", "tls"];
pub(super) const TLS_KEYS: &[&str] = &["ca"];
const MODEL_KEYS: &[&str] = &["path", "preset", "seed"];
const PARALLEL_KEYS: &[&str] = &[
    "pipefusion_degree",
    "num_patches",
    "warmup_steps",
    "layer_split",
    "cfg_degree",
    "ulysses_degree",
    "ring_degree",
];
const NODE_KEYS: &[&str] = &["name", "address", "devices", "cert", "key"];
const CPU_KEYS: &[&str] = &["kind", "threads", "dtype"];
const CUDA_KEYS: &[&str] = &["kind", "ordinal", "dtype"];

impl Reader<'_> {
    pub(super) fn model(&mut self, v: &Value<'_>, base_dir: Option<&Path>) -> Result<ModelSpec> {
        let t = self.table(v, "model")?;
        self.keys(t, "model", MODEL_KEYS)?;
        let line = Some(self.line(v.span()));
        let seed = t
            .get("seed")
            .map(|s| self.uint(s, "model.seed"))
            .transpose()?;
        match (t.get("path"), t.get("preset")) {
            (Some(p), None) => {
                if seed.is_some() {
                    return Err(self.err(
                        self.lines.get("model.seed").copied(),
                        "model.seed",
                        "`seed` applies only to `preset` (random weights), not to `path`",
                        "remove `seed`, or use `preset` instead of `path`",
                    ));
                }
                let p = Path::new(self.string(p, "model.path")?);
                Ok(ModelSpec::Path(match base_dir {
                    Some(base) => base.join(p),
                    None => p.to_path_buf(),
                }))
            }
            (None, Some(name)) => Ok(ModelSpec::Preset {
                name: self.string(name, "model.preset")?.to_string(),
                seed: seed.unwrap_or(0),
            }),
            (Some(_), Some(_)) => Err(self.err(
                self.lines.get("model.preset").copied(),
                "model.preset",
                "`path` and `preset` are both set; exactly one is allowed",
                "keep `path` for real weights or `preset` for seeded random weights",
            )),
            (None, None) => Err(self.err(
                line,
                "model",
                "neither `path` nor `preset` is set; exactly one is required",
                "add `path = \"<diffusers folder>\"` or `preset = \"DiT-B/2\"`",
            )),
        }
    }

    pub(super) fn parallel(&mut self, v: &Value<'_>, devices: usize) -> Result<ParallelSpec> {
        let t = self.table(v, "parallel")?;
        self.parallel_table(t, devices)
    }

    pub(super) fn parallel_table(
        &mut self,
        t: &DeTable<'_>,
        devices: usize,
    ) -> Result<ParallelSpec> {
        const P: &str = "parallel";
        self.keys(t, P, PARALLEL_KEYS)?;
        let cfg_degree = self.opt_usize(t, P, "cfg_degree")?.unwrap_or(1);
        let ulysses_degree = self.opt_usize(t, P, "ulysses_degree")?.unwrap_or(1);
        let ring_degree = self.opt_usize(t, P, "ring_degree")?.unwrap_or(1);
        let others = cfg_degree
            .saturating_mul(ulysses_degree)
            .saturating_mul(ring_degree);
        let pipefusion_degree = match self.opt_usize(t, P, "pipefusion_degree")? {
            Some(n) => n,
            None => devices / others.max(1), // validate reports a product that does not match
        };
        let layer_split = match t.get("layer_split") {
            None => None,
            Some(v) => {
                let mut split = Vec::new();
                for (i, e) in self
                    .array(v, "parallel.layer_split", "an array of integers")?
                    .iter()
                    .enumerate()
                {
                    let path = format!("parallel.layer_split[{i}]");
                    let line = self.line(e.span());
                    self.lines.insert(path.clone(), line);
                    split.push(self.usize(e, &path)?);
                }
                Some(split)
            }
        };
        Ok(ParallelSpec {
            pipefusion_degree,
            num_patches: self
                .opt_usize(t, P, "num_patches")?
                .unwrap_or(pipefusion_degree),
            warmup_steps: self.opt_usize(t, P, "warmup_steps")?.unwrap_or(1),
            layer_split,
            cfg_degree,
            ulysses_degree,
            ring_degree,
        })
    }

    /// A path value, resolved against the topology file's folder.
    pub(super) fn path_value(
        &mut self,
        v: &Value<'_>,
        path: &str,
        base_dir: Option<&Path>,
    ) -> Result<PathBuf> {
        let p = Path::new(self.string(v, path)?);
        Ok(match base_dir {
            Some(base) => base.join(p),
            None => p.to_path_buf(),
        })
    }

    pub(super) fn node(
        &mut self,
        v: &Value<'_>,
        path: &str,
        base_dir: Option<&Path>,
    ) -> Result<NodeSpec> {
        let t = self.table(v, path)?;
        self.keys(t, path, NODE_KEYS)?;
        let name = match t.get("name") {
            Some(n) => self.string(n, &join(path, "name"))?.to_string(),
            None => {
                return Err(self.err(
                    Some(self.line(v.span())),
                    &join(path, "name"),
                    "every node needs a `name`",
                    "add `name = \"<node name>\"` to this [[nodes]] table",
                ))
            }
        };
        let address = match t.get("address") {
            Some(a) => Some(self.string(a, &join(path, "address"))?.to_string()),
            None => None,
        };
        let mut devices = Vec::new();
        if let Some(d) = t.get("devices") {
            let path = join(path, "devices");
            for (i, dev) in self
                .array(d, &path, "an array of device tables")?
                .iter()
                .enumerate()
            {
                devices.push(self.device(dev, &format!("{path}[{i}]"))?);
            }
        }
        let tls = match (t.get("cert"), t.get("key")) {
            (None, None) => None,
            (Some(c), Some(k)) => Some(NodeTls {
                cert: self.path_value(c, &join(path, "cert"), base_dir)?,
                key: self.path_value(k, &join(path, "key"), base_dir)?,
            }),
            (c, _) => {
                let (have, missing) = if c.is_some() {
                    ("cert", "key")
                } else {
                    ("key", "cert")
                };
                return Err(self.err(
                    Some(self.line(v.span())),
                    &join(path, missing),
                    format!("`{have}` is set but `{missing}` is not"),
                    "give both `cert` and `key` (PEM files, e.g. from `pipefuse keygen`)",
                ));
            }
        };
        Ok(NodeSpec {
            name,
            address,
            devices,
            tls,
        })
    }

    /// A device's `dtype` key (f32 when absent), errors naming its line.
    fn precision(&mut self, t: &DeTable<'_>, path: &str, help: &str) -> Result<Precision> {
        let Some(d) = t.get("dtype") else {
            return Ok(Precision::F32);
        };
        let dtype_path = join(path, "dtype");
        let text = self.string(d, &dtype_path)?;
        text.parse()
            .map_err(|why: String| self.err(Some(self.line(d.span())), &dtype_path, why, help))
    }

    fn device(&mut self, v: &Value<'_>, path: &str) -> Result<DeviceSpec> {
        let t = self.table(v, path)?;
        let kind_path = join(path, "kind");
        let kind =
            match t.get("kind") {
                Some(k) => self.string(k, &kind_path)?,
                None => return Err(self.err(
                    Some(self.line(v.span())),
                    &kind_path,
                    "every device needs a `kind`",
                    "write `{ kind = \"cpu\", threads = 1 }` or `{ kind = \"cuda\", ordinal = 0 }`",
                )),
            };
        match kind {
            "cpu" => {
                self.keys(t, path, CPU_KEYS)?;
                let threads = self.opt_usize(t, path, "threads")?.unwrap_or(1);
                let precision = self.precision(
                    t,
                    path,
                    "bf16 keeps the linear layers in bf16 (AMX tiles where the CPU has them)",
                )?;
                if precision == Precision::F16 {
                    let d = t.get("dtype").expect("f16 was read from it");
                    return Err(self.err(
                        Some(self.line(d.span())),
                        &join(path, "dtype"),
                        "f16 is for cuda devices: a cpu device computes in f32 or bf16",
                        "write dtype = \"bf16\" or leave it out for f32",
                    ));
                }
                Ok(DeviceSpec::Cpu { threads, precision })
            }
            "cuda" => {
                self.keys(t, path, CUDA_KEYS)?;
                let precision = self.precision(
                    t,
                    path,
                    "bf16 or f16 run the whole stage in that dtype with f32 accumulation",
                )?;
                match self.opt_usize(t, path, "ordinal")? {
                    Some(ordinal) => Ok(DeviceSpec::Cuda { ordinal, precision }),
                    None => Err(self.err(
                        Some(self.line(v.span())),
                        &join(path, "ordinal"),
                        "a cuda device needs an `ordinal`",
                        "write `{ kind = \"cuda\", ordinal = 0 }` (the CUDA device number on the node)",
                    )),
                }
            }
            other => Err(self.err(
                t.get("kind").map(|k| self.line(k.span())),
                &kind_path,
                format!("unknown device kind `{other}`"),
                "kind is \"cpu\" or \"cuda\"",
            )),
        }
    }
}
