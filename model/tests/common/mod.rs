//! Fixture reading for the golden tests. Fixtures are written by `tools/make_fixtures.py` from
//! diffusers (see tools/README.md); they are committed so tests need no Python.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::path::PathBuf;

use kernels::Tensor;

/// The fixtures folder (`PIPEFUSE_FIXTURES` overrides it: the prepared GPU check runs its
/// binary from another checkout).
pub fn fixtures() -> PathBuf {
    match std::env::var_os("PIPEFUSE_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    }
}

/// All tensors of a safetensors file, floats as f32 tensors, integers as i64 vectors.
pub struct Fixture {
    pub floats: HashMap<String, Tensor>,
    pub ints: HashMap<String, Vec<i64>>,
    pub doubles: HashMap<String, Vec<f64>>,
}

impl Fixture {
    pub fn load(name: &str) -> Fixture {
        let path = fixtures().join(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let (mut floats, mut ints, mut doubles) = (HashMap::new(), HashMap::new(), HashMap::new());
        for (name, view) in st.tensors() {
            let d = view.data();
            match view.dtype() {
                safetensors::Dtype::F32 => {
                    let v = d
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                        .collect();
                    floats.insert(name, Tensor::from_vec(v, view.shape()).unwrap());
                }
                safetensors::Dtype::F64 => {
                    doubles.insert(
                        name,
                        d.chunks_exact(8)
                            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                            .collect(),
                    );
                }
                safetensors::Dtype::I64 => {
                    ints.insert(
                        name,
                        d.chunks_exact(8)
                            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                            .collect(),
                    );
                }
                other => panic!("fixture {name}: unexpected dtype {other:?}"),
            }
        }
        Fixture {
            floats,
            ints,
            doubles,
        }
    }

    pub fn f(&self, name: &str) -> &Tensor {
        self.floats.get(name).unwrap_or_else(|| {
            panic!(
                "fixture tensor {name} missing; have {:?}",
                self.floats.keys()
            )
        })
    }

    pub fn i(&self, name: &str) -> &[i64] {
        self.ints
            .get(name)
            .unwrap_or_else(|| panic!("fixture int tensor {name} missing"))
    }
}

pub fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// A tiny model config of either family (random weights in tests): 8x8 latents, 2 blocks of
/// 2 heads x 8; tests override what they need with struct update syntax.
pub fn tiny(arch: model::Arch) -> model::ModelConfig {
    model::ModelConfig {
        arch,
        in_channels: 4,
        out_channels: 8,
        patch_size: 2,
        sample_size: 8,
        num_layers: 2,
        num_heads: 2,
        head_dim: 8,
        norm_eps: 1e-6,
        num_classes: 10,
        caption_channels: 12,
        interpolation_scale: 1.0,
        use_additional_conditions: false,
        mmdit: None,
    }
}

/// Largest absolute difference of two tensors' values.
pub fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    a.as_f32()
        .unwrap()
        .iter()
        .zip(b.as_f32().unwrap())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Asserts `got` has `want`'s shape and is within relative L2 `tol` of it (printing the figure).
#[allow(dead_code)]
pub fn check_close(name: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.shape(), want.shape(), "{name}: shape");
    let e = rel_l2(got.as_f32().unwrap(), want.as_f32().unwrap());
    eprintln!("{name}: relative L2 {e:.2e}");
    assert!(e <= tol, "{name}: relative L2 {e:.3e} > {tol:e}");
}

/// The PixArt fixture's inputs for case `p` (`sq.` or `nonsq.`), with or without the caption
/// mask, and the name of the matching diffusers output.
pub fn pixart_case(io: &Fixture, p: &str, masked: bool) -> (model::CondInputs, &'static str) {
    let inputs = model::CondInputs {
        timesteps: io
            .i(&format!("{p}timestep"))
            .iter()
            .map(|&t| t as f32)
            .collect(),
        caption: Some(io.f(&format!("{p}encoder_hidden_states")).clone()),
        caption_mask: masked.then(|| io.f(&format!("{p}mask")).clone()),
        ..Default::default()
    };
    (
        inputs,
        if masked {
            "output_masked"
        } else {
            "output_nomask"
        },
    )
}

/// One SD3 / Flux fixture model: its folder, its key prefix in the io file, its family.
pub struct MmditCase {
    pub dir: &'static str,
    pub prefix: &'static str,
    pub flux: bool,
}

/// The SD3 (with and without the SD3.5 features) and Flux (dev, schnell) fixture models.
pub const MMDIT_CASES: [MmditCase; 4] = [
    MmditCase {
        dir: "sd3_tiny",
        prefix: "x.",
        flux: false,
    },
    MmditCase {
        dir: "sd3_tiny_plain",
        prefix: "plain.",
        flux: false,
    },
    MmditCase {
        dir: "flux_tiny",
        prefix: "dev.",
        flux: true,
    },
    MmditCase {
        dir: "flux_tiny_schnell",
        prefix: "schnell.",
        flux: true,
    },
];

/// A case's latent (unpacked), the runtime's conditioning inputs and diffusers' output
/// (unpacked).
pub fn mmdit_inputs(case: &MmditCase) -> (Tensor, model::CondInputs, Tensor) {
    let file = if case.flux {
        "flux_tiny_io.safetensors"
    } else {
        "sd3_tiny_io.safetensors"
    };
    let io = Fixture::load(file);
    let f = |k: &str| io.f(&format!("{}{k}", case.prefix)).clone();
    let latent = f("latent");
    let (h, w) = (latent.dim(2), latent.dim(3));
    let t = f("timestep").as_f32().unwrap().to_vec();
    let (timesteps, guidance, out) = if case.flux {
        // The fixture holds the model's input sigma; the runtime takes scheduler units.
        let g = (case.prefix == "dev.").then(|| f("guidance").as_f32().unwrap().to_vec());
        let out = model::mmdit::unpack_latents(&f("output"), h, w).unwrap();
        (t.iter().map(|s| s * 1000.0).collect(), g, out)
    } else {
        (t, None, f("output"))
    };
    let inputs = model::CondInputs {
        timesteps,
        caption: Some(f("prompt_embeds")),
        pooled: Some(f("pooled")),
        guidance,
        latent_size: [h, w],
        ..Default::default()
    };
    (latent, inputs, out)
}
