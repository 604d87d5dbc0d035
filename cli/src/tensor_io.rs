//! Reading and writing tensors as safetensors files, and seeded Gaussian noise.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use kernels::Tensor;

/// All floating-point tensors of a safetensors file, as f32.
pub(crate) fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    // A FIFO would block the read forever; a folder gives an OS error that names nothing.
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_file() {
        bail!(
            "{}: not a regular file (a directory, FIFO or device); give a safetensors file",
            path.display()
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    tensors_from_bytes(&bytes, path)
}

/// All floating-point tensors of a safetensors file held in memory, as f32; `origin` names it
/// in errors (a path, or a request field).
pub(crate) fn tensors_from_bytes(bytes: &[u8], origin: &Path) -> Result<HashMap<String, Tensor>> {
    let path = origin;
    let st = safetensors::SafeTensors::deserialize(bytes)
        .with_context(|| format!("{}: not a valid safetensors file", path.display()))?;
    let mut out = HashMap::new();
    for (name, v) in st.tensors() {
        let d = v.data();
        let data: Vec<f32> = match v.dtype() {
            safetensors::Dtype::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            safetensors::Dtype::F16 => d
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            safetensors::Dtype::BF16 => d
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            safetensors::Dtype::I64 => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect(),
            safetensors::Dtype::BOOL | safetensors::Dtype::U8 => {
                d.iter().map(|&b| b as f32).collect()
            }
            other => bail!(
                "{}: tensor `{name}` has unsupported dtype {other:?}",
                path.display()
            ),
        };
        out.insert(name, Tensor::from_vec(data, v.shape())?);
    }
    Ok(out)
}

/// Writes f32 tensors to a safetensors file.
pub(crate) fn write_tensors(path: &Path, tensors: &[(&str, &Tensor)]) -> Result<()> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(n, t)| {
            Ok((
                n.to_string(),
                t.as_f32()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
                t.shape().to_vec(),
            ))
        })
        .collect::<Result<_>>()?;
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, b, s)| {
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)?,
            ))
        })
        .collect::<Result<_>>()?;
    let data = safetensors::serialize(views, None)
        .with_context(|| format!("cannot encode {}", path.display()))?;
    crate::output_file::write_output(path, &data, "--save-latent")
}

#[cfg(test)]
mod fuzz {
    use pipefuse_fuzz::{Budget, Campaign, GuardedAlloc, Target};

    #[global_allocator]
    static ALLOC: GuardedAlloc = GuardedAlloc;

    /// Latent, noise and prompt files (and `prompt_embeds` in HTTP requests) under a repeatable
    /// fuzz campaign: no panic, no allocation beyond the harness's bound (issue 15).
    #[test]
    fn the_tensor_file_reader_survives_fuzzing() {
        let root = pipefuse_fuzz::targets::root();
        let seeds = ["sd3_prompt", "flux_noise", "pixart_sigma_prompt"]
            .iter()
            .map(|f| {
                std::fs::read(root.join(format!("model/tests/fixtures/{f}.safetensors"))).unwrap()
            })
            .collect::<Vec<_>>();
        let focus = seeds
            .iter()
            .map(|s| 8 + u64::from_le_bytes(s[..8].try_into().unwrap()) as usize)
            .max()
            .unwrap();
        let t = Target {
            name: "tensor_file",
            seeds,
            text: false,
            focus,
            run: Box::new(|b| {
                super::tensors_from_bytes(b, std::path::Path::new("fuzz.safetensors"))
                    .map(|_| ())
                    .map_err(|e| format!("{e:#}"))
            }),
        };
        let r = Campaign::new(11).run(&t, Budget::Inputs(3000));
        eprintln!(
            "{} inputs, {} accepted, {} refusal kinds, {:.0}/s",
            r.inputs,
            r.accepted,
            r.reasons,
            r.rate()
        );
        assert!(
            r.reasons > 1,
            "mutations never reached a second kind of refusal"
        );
        let found: Vec<String> = r.findings.iter().map(|f| f.what.clone()).collect();
        assert!(found.is_empty(), "{found:?}");
    }
}
