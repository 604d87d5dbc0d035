//! The VAE decoder against diffusers 0.42.1 `AutoencoderKL.decode` (fixtures `vae_tiny/` and
//! `vae_tiny_io.safetensors` from `tools/make_fixtures.py --only vae`): relative L2 <= 1e-4 in
//! f32 for the output and every traced stage; only decoder weights are read; config, weight and
//! input errors name what is wrong instead of panicking.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::{fixtures, rel_l2, Fixture};
use kernels::{Device, Tensor};
use model::{to_unit_range, SafetensorsDir, VaeConfig, VaeDecoder, WeightSource};
use serde_json::json;

const TOL: f64 = 1e-4;
const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

fn check(name: &str, got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.shape(), want.shape(), "{name}: shape");
    let e = rel_l2(got.as_f32().unwrap(), want.as_f32().unwrap());
    eprintln!("{name}: relative L2 {e:.2e}");
    assert!(e <= TOL, "{name}: relative L2 {e:.3e} > {TOL:e}");
    e
}

fn vae_dir() -> PathBuf {
    fixtures().join("vae_tiny")
}

/// A scratch folder unique to this test process and `tag`.
fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pipefuse-vae-{tag}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Every tensor of the fixture's weight file, as (name, dtype, shape, bytes).
fn weight_entries() -> Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(vae_dir().join(WEIGHTS)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                v.dtype(),
                v.shape().to_vec(),
                v.data().to_vec(),
            )
        })
        .collect()
}

/// Writes a VAE folder: `config` as config.json and the fixture's weights, renamed by `rename`
/// (`None` drops a tensor).
fn write_folder(dir: &Path, config: &str, rename: impl Fn(&str) -> Option<String>) {
    std::fs::write(dir.join("config.json"), config).unwrap();
    let entries = weight_entries();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = entries
        .iter()
        .filter_map(|(n, dt, shape, data)| {
            let view = safetensors::tensor::TensorView::new(*dt, shape.clone(), data).unwrap();
            rename(n).map(|new| (new, view))
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, None, &dir.join(WEIGHTS)).unwrap();
}

fn fixture_config() -> serde_json::Value {
    let text = std::fs::read_to_string(vae_dir().join("config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn vae_decode_matches_diffusers_with_intermediates() {
    let io = Fixture::load("vae_tiny_io.safetensors");
    let vae = VaeDecoder::load(&vae_dir(), Device::cpu(2).unwrap()).unwrap();
    assert_eq!(vae.config().upscale_factor(), 2);
    let mut stages = Vec::new();
    let out = vae
        .decode_inspect(io.f("latent"), |name, t| {
            stages.push(name.to_string());
            if let Some(want) = io.floats.get(name) {
                check(name, t, want);
            }
        })
        .unwrap();
    assert_eq!(
        stages,
        [
            "decode_input",
            "post_quant_conv",
            "conv_in",
            "mid_block",
            "up_blocks.0",
            "up_blocks.1"
        ]
    );
    assert_eq!(out.shape(), &[2, 3, 16, 16]);
    let e = check("output", &out, io.f("output"));
    assert!(e <= TOL);
    // One thread gives the same result within rounding.
    let one = VaeDecoder::load(&vae_dir(), Device::cpu(1).unwrap()).unwrap();
    check(
        "output (1 thread)",
        &one.decode(io.f("latent")).unwrap(),
        io.f("output"),
    );
    // The pipelines' post-processing.
    let img = to_unit_range(&out).unwrap();
    check("image", &img, io.f("image"));
    assert!(img
        .as_f32()
        .unwrap()
        .iter()
        .all(|v| (0.0..=1.0).contains(v)));
    let exact = to_unit_range(io.f("output")).unwrap();
    assert_eq!(exact.as_f32().unwrap(), io.f("image").as_f32().unwrap());
}

#[test]
fn vae_reads_all_and_only_decoder_weights() {
    let src = SafetensorsDir::open(&vae_dir()).unwrap();
    let cfg = VaeConfig::from_dir(&vae_dir()).unwrap();
    VaeDecoder::from_source(cfg, &src, Device::cpu(1).unwrap()).unwrap();
    let read: BTreeSet<String> = src.tensors_read().into_iter().collect();
    let decoder: BTreeSet<String> = weight_entries()
        .into_iter()
        .map(|e| e.0)
        .filter(|n| n.starts_with("decoder.") || n.starts_with("post_quant_conv."))
        .collect();
    assert_eq!(read, decoder);
    assert!(src.contains("encoder.conv_in.weight"));
}

/// Old hub VAEs name the mid-block attention `query` / `key` / `value` / `proj_attn`; diffusers
/// renames them on load, and so does the loader here.
#[test]
fn vae_loads_legacy_attention_names() {
    let dir = scratch("legacy");
    let config = std::fs::read_to_string(vae_dir().join("config.json")).unwrap();
    write_folder(&dir, &config, |n| {
        let p = "decoder.mid_block.attentions.0.";
        Some(match n.strip_prefix(p) {
            Some(rest) => {
                let rest = rest
                    .replace("to_q.", "query.")
                    .replace("to_k.", "key.")
                    .replace("to_v.", "value.")
                    .replace("to_out.0.", "proj_attn.");
                format!("{p}{rest}")
            }
            None => n.to_string(),
        })
    });
    let io = Fixture::load("vae_tiny_io.safetensors");
    let vae = VaeDecoder::load(&dir, Device::cpu(1).unwrap()).unwrap();
    check(
        "legacy names",
        &vae.decode(io.f("latent")).unwrap(),
        io.f("output"),
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// `shift_factor` adds after the division; without `post_quant_conv` the decoder starts at
/// `conv_in`; without the mid-block attention no attention weight is read.
#[test]
fn vae_config_variants_follow_diffusers_formula() {
    let io = Fixture::load("vae_tiny_io.safetensors");
    let dev = Device::cpu(1).unwrap();
    let src = SafetensorsDir::open(&vae_dir()).unwrap();
    let cfg = VaeConfig::from_dir(&vae_dir()).unwrap();
    let sf = cfg.scaling_factor as f32;
    // decode with shift s of L == decode without shift of L + s * sf
    let shifted = VaeDecoder::from_source(
        VaeConfig {
            shift_factor: Some(0.25),
            ..cfg.clone()
        },
        &src,
        dev.clone(),
    )
    .unwrap();
    let lat = io.f("latent");
    let moved: Vec<f32> = lat
        .as_f32()
        .unwrap()
        .iter()
        .map(|v| v + 0.25 * sf)
        .collect();
    let moved = Tensor::from_vec(moved, lat.shape()).unwrap();
    let plain = VaeDecoder::from_source(cfg.clone(), &src, dev.clone()).unwrap();
    let e = rel_l2(
        shifted.decode(lat).unwrap().as_f32().unwrap(),
        plain.decode(&moved).unwrap().as_f32().unwrap(),
    );
    assert!(e < 1e-5, "shift_factor: {e}");
    // no post_quant_conv: feeding sf * post_quant_conv(latent / sf) gives diffusers' output
    let no_pq = VaeDecoder::from_source(
        VaeConfig {
            use_post_quant_conv: false,
            ..cfg.clone()
        },
        &src,
        dev.clone(),
    )
    .unwrap();
    let pq = io.f("post_quant_conv");
    let rescaled: Vec<f32> = pq.as_f32().unwrap().iter().map(|v| v * sf).collect();
    let rescaled = Tensor::from_vec(rescaled, pq.shape()).unwrap();
    check(
        "no post_quant_conv",
        &no_pq.decode(&rescaled).unwrap(),
        io.f("output"),
    );
    let src = SafetensorsDir::open(&vae_dir()).unwrap();
    let no_attn = VaeDecoder::from_source(
        VaeConfig {
            mid_block_add_attention: false,
            ..cfg
        },
        &src,
        dev,
    )
    .unwrap();
    assert!(src.tensors_read().iter().all(|n| !n.contains("attentions")));
    assert_eq!(no_attn.decode(lat).unwrap().shape(), &[2, 3, 16, 16]);
}

#[test]
fn vae_config_errors_name_the_file_and_field() {
    let dir = scratch("badcfg");
    let base = fixture_config();
    // (field, new value; None removes it): missing required fields, wrong types, unsupported
    // values; each error names config.json and the field.
    let cases = [
        ("block_out_channels", None),
        ("norm_num_groups", Some(json!(null))),
        ("latent_channels", None),
        ("layers_per_block", Some(json!("two"))),
        ("block_out_channels", Some(json!([16, "x"]))),
        ("norm_num_groups", Some(json!(7))),
        (
            "up_block_types",
            Some(json!(["UpDecoderBlock2D", "AttnUpDecoderBlock2D"])),
        ),
        ("up_block_types", Some(json!(["UpDecoderBlock2D"]))),
        ("act_fn", Some(json!("gelu"))),
        ("scaling_factor", Some(json!(0))),
        ("shift_factor", Some(json!("none"))),
        ("use_post_quant_conv", Some(json!(1))),
        ("_class_name", Some(json!("DiTTransformer2DModel"))),
    ];
    for (field, value) in cases {
        let mut v = base.clone();
        match value {
            Some(x) => v[field] = x,
            None => drop(v.as_object_mut().unwrap().remove(field)),
        }
        std::fs::write(dir.join("config.json"), v.to_string()).unwrap();
        let err = VaeConfig::from_dir(&dir).unwrap_err().to_string();
        assert!(
            err.contains("config.json") && err.contains(&format!("`{field}`")),
            "{field}: {err}"
        );
    }
    // Optional fields take diffusers' defaults when absent.
    let mut v = base.clone();
    for k in [
        "scaling_factor",
        "shift_factor",
        "use_post_quant_conv",
        "mid_block_add_attention",
    ] {
        v.as_object_mut().unwrap().remove(k);
    }
    std::fs::write(dir.join("config.json"), v.to_string()).unwrap();
    assert_eq!(
        VaeConfig::from_dir(&dir).unwrap(),
        VaeConfig::from_dir(&vae_dir()).unwrap()
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn vae_missing_or_misshapen_weight_names_the_file_and_tensor() {
    let dir = scratch("badweights");
    let config = fixture_config();
    write_folder(&dir, &config.to_string(), |n| {
        (n != "decoder.up_blocks.0.resnets.1.conv2.bias").then(|| n.to_string())
    });
    let err = VaeDecoder::load(&dir, Device::cpu(1).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("decoder.up_blocks.0.resnets.1.conv2.bias") && err.contains(WEIGHTS),
        "{err}"
    );
    // latent_channels 8 in the config: post_quant_conv.weight in the file is [4, 4, 1, 1].
    let mut v = config.clone();
    v["latent_channels"] = 8.into();
    write_folder(&dir, &v.to_string(), |n| Some(n.to_string()));
    let err = VaeDecoder::load(&dir, Device::cpu(1).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("post_quant_conv.weight") && err.contains(WEIGHTS),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn vae_bad_latents_are_errors_not_panics() {
    let vae = VaeDecoder::load(&vae_dir(), Device::cpu(1).unwrap()).unwrap();
    for shape in [
        &[2, 3, 8, 8][..],
        &[1, 8, 8, 8],
        &[4, 8, 8],
        &[0, 4, 8, 8],
        &[1, 4, 0, 8],
    ] {
        let err = vae.decode(&Tensor::zeros(shape)).unwrap_err().to_string();
        assert!(err.contains("latent"), "{shape:?}: {err}");
    }
    let half = Tensor::zeros(&[1, 4, 2, 2])
        .to_dtype(kernels::DType::F16)
        .unwrap();
    assert!(vae.decode(&half).is_err());
    // The smallest latent works: 1x1 -> 2x2.
    assert_eq!(
        vae.decode(&Tensor::zeros(&[1, 4, 1, 1])).unwrap().shape(),
        &[1, 3, 2, 2]
    );
}
