//! SD3 / SD3.5 MMDiT against diffusers 0.42.1 `SD3Transformer2DModel` (fixtures from
//! tools/make_fixtures.py, section `sd3`, written by tools/fixtures_mmdit.py): relative L2 <= 1e-4
//! in f32 on a non-square latent (a 4 x 3 token grid cropped from the 12 x 12 position table),
//! batch 2, with per-head RMS q/k norm and the MMDiT-X second attention (`sd3_tiny`) and without
//! them (`sd3_tiny_plain`); the image tokens after every block too.

mod common;

use common::{fixtures, Fixture};
use kernels::{Device, Tensor};
use model::mmdit::{FluxConfig, Sd3Config, Sd3Inputs, Sd3Transformer};

const TOL: f64 = 1e-4;

fn check(name: &str, got: &Tensor, want: &Tensor) {
    common::check_close(name, got, want, TOL);
}

#[test]
fn sd3_matches_diffusers_with_and_without_the_sd35_features() {
    let io = Fixture::load("sd3_tiny_io.safetensors");
    for (prefix, dir, qk_norm, dual) in [
        ("x.", "sd3_tiny", true, vec![0]),
        ("plain.", "sd3_tiny_plain", false, vec![]),
    ] {
        let model = Sd3Transformer::load(&fixtures().join(dir), Device::cpu(2).unwrap()).unwrap();
        assert_eq!(
            (
                model.config().qk_norm,
                &model.config().dual_attention_layers
            ),
            (qk_norm, &dual)
        );
        let f = |k: &str| io.f(&format!("{prefix}{k}"));
        let inputs = Sd3Inputs {
            timesteps: f("timestep").as_f32().unwrap().to_vec(),
            prompt_embeds: f("prompt_embeds").clone(),
            pooled: f("pooled").clone(),
        };
        let mut blocks = Vec::new();
        let out = model
            .forward_traced(f("latent"), &inputs, &mut |_, x| blocks.push(x.clone()))
            .unwrap();
        for (i, b) in blocks.iter().enumerate() {
            check(&format!("{dir} block{i}"), b, f(&format!("block{i}")));
        }
        check(&format!("{dir} output"), &out, f("output"));
    }
}

#[test]
fn bad_inputs_and_configs_are_errors_naming_what_is_wrong() {
    let model =
        Sd3Transformer::load(&fixtures().join("sd3_tiny"), Device::cpu(1).unwrap()).unwrap();
    let inputs = |b: usize, t: usize| Sd3Inputs {
        timesteps: vec![500.0; b],
        prompt_embeds: model::gaussian(&[b, t, 12], 1),
        pooled: model::gaussian(&[b, 10], 2),
    };
    // A token grid larger than the 12 x 12 position table.
    let big = model::gaussian(&[1, 4, 26, 8], 3);
    let e = model.forward(&big, &inputs(1, 3)).unwrap_err().to_string();
    assert!(
        e.contains("13 x 4 token grid exceeds") && e.contains("pos_embed_max_size"),
        "{e}"
    );
    let odd = model::gaussian(&[1, 4, 7, 8], 3);
    let e = model.forward(&odd, &inputs(1, 3)).unwrap_err().to_string();
    assert!(e.contains("divisible by the patch size 2"), "{e}");
    let ok = model::gaussian(&[2, 4, 8, 8], 3);
    let e = model.forward(&ok, &inputs(1, 3)).unwrap_err().to_string();
    assert!(e.contains("for a batch of 2"), "{e}");
    // Configs: an unknown qk_norm, a caption width that cannot join the image tokens.
    let path = std::path::Path::new("x/config.json");
    let mut v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("sd3_tiny/config.json")).unwrap(),
    )
    .unwrap();
    v["qk_norm"] = "layer_norm".into();
    let e = Sd3Config::from_json(&v, path).unwrap_err().to_string();
    assert!(e.contains("qk_norm") && e.contains("layer_norm"), "{e}");
    v["qk_norm"] = serde_json::Value::Null;
    v["caption_projection_dim"] = 8.into();
    let e = Sd3Config::from_json(&v, path).unwrap_err().to_string();
    assert!(
        e.contains("caption_projection_dim") && e.contains("must equal"),
        "{e}"
    );
    v["caption_projection_dim"] = 16.into();
    v["dual_attention_layers"] = serde_json::json!([3]);
    let e = Sd3Config::from_json(&v, path).unwrap_err().to_string();
    assert!(e.contains("layer 3 is past"), "{e}");
    // The released shapes are presets (random weights for benches and plans).
    let large = Sd3Config::preset("SD3.5-Large").unwrap();
    assert_eq!(
        (large.num_layers, large.hidden(), large.qk_norm),
        (38, 2432, true)
    );
    let medium = Sd3Config::preset("sd3.5-medium").unwrap();
    assert_eq!(medium.dual_attention_layers.len(), 13);
}

/// Flux.1 against diffusers 0.42.1 `FluxTransformer2DModel` (fixtures: section `flux`): with the
/// guidance embedding (dev) and without (schnell), batch 2, a 3 x 4 packed-token grid with the
/// pipelines' rotary positions, every double and single block's image tokens; the latent packing
/// equals diffusers' and unpacks back exactly.
#[test]
fn flux_matches_diffusers_with_and_without_guidance() {
    use model::mmdit::{
        image_ids, pack_latents, unpack_latents, FluxBlock, FluxInputs, FluxTransformer,
    };
    let io = Fixture::load("flux_tiny_io.safetensors");
    let dev = Device::cpu(2).unwrap();
    for (prefix, dir, guided) in [
        ("dev.", "flux_tiny", true),
        ("schnell.", "flux_tiny_schnell", false),
    ] {
        let model = FluxTransformer::load(&fixtures().join(dir), dev.clone()).unwrap();
        assert_eq!(model.config().guidance_embeds, guided);
        let f = |k: &str| io.f(&format!("{prefix}{k}"));
        let latent = f("latent");
        let packed = pack_latents(&dev, latent).unwrap();
        assert_eq!(
            packed.as_f32().unwrap(),
            f("packed").as_f32().unwrap(),
            "packing"
        );
        let back = unpack_latents(&packed, 6, 8).unwrap();
        assert_eq!(
            back.as_f32().unwrap(),
            latent.as_f32().unwrap(),
            "unpacking"
        );
        let ids = |t: &Tensor| -> Vec<[f32; 3]> {
            t.as_f32()
                .unwrap()
                .chunks(3)
                .map(|c| [c[0], c[1], c[2]])
                .collect()
        };
        assert_eq!(ids(f("img_ids")), image_ids(3, 4));
        let inputs = FluxInputs {
            timesteps: f("timestep").as_f32().unwrap().to_vec(),
            guidance: guided.then(|| f("guidance").as_f32().unwrap().to_vec()),
            prompt_embeds: f("prompt_embeds").clone(),
            pooled: f("pooled").clone(),
            txt_ids: ids(f("txt_ids")),
            img_ids: image_ids(3, 4),
        };
        let mut blocks = Vec::new();
        let out = model
            .forward_traced(&packed, &inputs, &mut |b, x| blocks.push((b, x.clone())))
            .unwrap();
        for (b, x) in &blocks {
            let name = match b {
                FluxBlock::Double(i) => format!("double{i}"),
                FluxBlock::Single(i) => format!("single{i}"),
            };
            check(&format!("{dir} {name}"), x, f(&name));
        }
        assert_eq!(blocks.len(), 4);
        check(&format!("{dir} output"), &out, f("output"));
        // A guidance scale for a model without the embedding, or none for one with it, is refused.
        let mut wrong = inputs.clone();
        wrong.guidance = if guided { None } else { Some(vec![3.5, 3.5]) };
        let e = model.forward(&packed, &wrong).unwrap_err().to_string();
        assert!(e.contains("guidance"), "{e}");
    }
    assert!(FluxConfig::preset("Flux.1-dev").unwrap().guidance_embeds);
    assert_eq!(FluxConfig::preset("flux.1-schnell").unwrap().hidden(), 3072);
}
