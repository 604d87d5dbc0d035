//! The transformer against diffusers 0.42.1 (fixtures from tools/make_fixtures.py):
//! relative L2 <= 1e-4 in f32 for DiT and PixArt, with and without a caption mask, square and
//! non-square latents, intermediates included; weights from single, sharded, f16, bf16 and legacy
//! `Transformer2DModel` folders; slices read only their own blocks.

mod common;

use common::{fixtures, Fixture};
use kernels::{Device, Tensor};
use model::{CondInputs, ModelConfig, SafetensorsDir, Transformer, WeightSource};

const TOL: f64 = 1e-4;

fn dit_inputs(io: &Fixture) -> CondInputs {
    CondInputs {
        timesteps: io.i("timestep").iter().map(|&t| t as f32).collect(),
        class_labels: io.i("class_labels").iter().map(|&c| c as usize).collect(),
        ..Default::default()
    }
}

fn check(name: &str, got: &Tensor, want: &Tensor) {
    common::check_close(name, got, want, TOL);
}

#[test]
fn dit_matches_diffusers_with_intermediates() {
    let io = Fixture::load("dit_tiny_io.safetensors");
    let dev = Device::cpu(2).unwrap();
    let model = Transformer::load(&fixtures().join("dit_tiny"), None, dev).unwrap();
    let inputs = dit_inputs(&io);
    let latent = io.f("latent");
    let cond = model.conditioning(&inputs).unwrap();
    let rows = latent.dim(2) / 2;
    let mut x = model.embed(latent, 0, rows).unwrap();
    check("patch_embed", &x, io.f("patch_embed"));
    for i in 0..3 {
        let one = Transformer::load(
            &fixtures().join("dit_tiny"),
            Some(i..i + 1),
            Device::cpu(1).unwrap(),
        )
        .unwrap();
        one.run_blocks(&mut x, &cond).unwrap();
        check(&format!("block{i}"), &x, io.f(&format!("block{i}")));
    }
    check(
        "output",
        &model.head(&x, &cond, rows, latent.dim(3)).unwrap(),
        io.f("output"),
    );
    check(
        "output (forward)",
        &model.forward(latent, &inputs).unwrap(),
        io.f("output"),
    );
}

#[test]
fn dit_loads_sharded_half_and_legacy_folders() {
    let io = Fixture::load("dit_tiny_io.safetensors");
    let inputs = dit_inputs(&io);
    for (folder, want) in [
        ("dit_tiny_sharded", "output"),
        ("dit_tiny_legacy", "output"),
        ("dit_tiny_f16", "output_f16"),
        ("dit_tiny_bf16", "output_bf16"),
    ] {
        let model =
            Transformer::load(&fixtures().join(folder), None, Device::cpu(1).unwrap()).unwrap();
        check(
            folder,
            &model.forward(io.f("latent"), &inputs).unwrap(),
            io.f(want),
        );
    }
}

#[test]
fn a_block_slice_reads_only_its_own_weights() {
    let dir = fixtures().join("dit_tiny_sharded");
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let src = SafetensorsDir::open(&dir).unwrap();
    Transformer::from_source(cfg, &src, Some(1..2), Device::cpu(1).unwrap()).unwrap();
    let read = src.tensors_read();
    assert!(!read.is_empty());
    for name in &read {
        assert!(
            name.starts_with("transformer_blocks.1."),
            "middle slice read {name}"
        );
    }
    assert!(
        src.files_opened().len() < 4,
        "opened {:?}",
        src.files_opened()
    );
    // The last slice also needs block 0's conditioning embedder (diffusers' final layer uses it),
    // but nothing else of block 0.
    let src = SafetensorsDir::open(&dir).unwrap();
    Transformer::from_source(
        ModelConfig::from_dir(&dir).unwrap(),
        &src,
        Some(2..3),
        Device::cpu(1).unwrap(),
    )
    .unwrap();
    for name in src.tensors_read() {
        let ok = name.starts_with("transformer_blocks.2.")
            || name.starts_with("transformer_blocks.0.norm1.emb.")
            || name.starts_with("proj_out");
        assert!(ok, "last slice read {name}");
    }
}

#[test]
fn pixart_matches_diffusers_square_nonsquare_masked_unmasked() {
    let io = Fixture::load("pixart_tiny_io.safetensors");
    let model = Transformer::load(
        &fixtures().join("pixart_tiny"),
        None,
        Device::cpu(2).unwrap(),
    )
    .unwrap();
    for p in ["sq.", "nonsq."] {
        for masked in [true, false] {
            let (inputs, out) = common::pixart_case(&io, p, masked);
            check(
                &format!("{p}{out}"),
                &model.forward(io.f(&format!("{p}latent")), &inputs).unwrap(),
                io.f(&format!("{p}{out}")),
            );
        }
    }
    let (inputs, _) = common::pixart_case(&io, "sq.", true);
    let latent = io.f("sq.latent");
    let cond = model.conditioning(&inputs).unwrap();
    let mut x = model.embed(latent, 0, 4).unwrap();
    check("sq.patch_embed", &x, io.f("sq.patch_embed"));
    for i in 0..3 {
        let one = Transformer::load(
            &fixtures().join("pixart_tiny"),
            Some(i..i + 1),
            Device::cpu(1).unwrap(),
        )
        .unwrap();
        one.run_blocks(&mut x, &cond).unwrap();
        check(&format!("sq.block{i}"), &x, io.f(&format!("sq.block{i}")));
    }
}

/// Running the blocks on two horizontal strips separately must not equal the whole-image result
/// in general (attention mixes strips), but embedding and head are per-token: a strip's embedding
/// equals the matching rows of the whole-image embedding.
#[test]
fn strip_embedding_equals_rows_of_full_embedding() {
    let io = Fixture::load("dit_tiny_io.safetensors");
    let model =
        Transformer::load(&fixtures().join("dit_tiny"), None, Device::cpu(1).unwrap()).unwrap();
    let latent = io.f("latent");
    let full = model.embed(latent, 0, 4).unwrap(); // [2, 16, 32]
    let strip = latent.narrow(2, 2, 4).unwrap(); // token rows 1..3
    let part = model.embed(&strip, 1, 4).unwrap();
    assert_eq!(
        part.as_f32().unwrap(),
        full.narrow(1, 4, 8).unwrap().as_f32().unwrap()
    );
}

#[test]
fn errors_name_the_file_and_field() {
    let tmp = std::env::temp_dir().join(format!("pipefuse-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("config.json"), r#"{"_class_name": "UNet2DModel"}"#).unwrap();
    let err = ModelConfig::from_dir(&tmp).unwrap_err().to_string();
    assert!(
        err.contains("config.json") && err.contains("_class_name"),
        "{err}"
    );
    std::fs::write(
        tmp.join("config.json"),
        r#"{"_class_name": "DiTTransformer2DModel", "num_layers": "two"}"#,
    )
    .unwrap();
    let err = ModelConfig::from_dir(&tmp).unwrap_err().to_string();
    assert!(err.contains("num_layers"), "{err}");
    std::fs::write(tmp.join("config.json"), "{ not json").unwrap();
    let err = ModelConfig::from_dir(&tmp).unwrap_err().to_string();
    assert!(err.contains("line 1"), "{err}");
    // A weight with the wrong shape names the tensor and the file.
    let cfg = ModelConfig {
        num_layers: 3,
        ..ModelConfig::from_dir(&fixtures().join("dit_tiny")).unwrap()
    };
    let wrong = ModelConfig {
        num_heads: 4,
        head_dim: 8,
        ..cfg.clone()
    };
    let src = SafetensorsDir::open(&fixtures().join("dit_tiny")).unwrap();
    let err = Transformer::from_source(
        ModelConfig {
            num_heads: 1,
            head_dim: 64,
            ..wrong
        },
        &src,
        None,
        Device::cpu(1).unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("pos_embed.proj.weight")
            && err.contains("diffusion_pytorch_model.safetensors"),
        "{err}"
    );
    assert!(!src.contains("no.such.tensor"));
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn bad_request_inputs_are_errors_not_panics() {
    let model =
        Transformer::load(&fixtures().join("dit_tiny"), None, Device::cpu(1).unwrap()).unwrap();
    let latent = Tensor::zeros(&[1, 4, 8, 8]);
    let bad_label = CondInputs {
        timesteps: vec![1.0],
        class_labels: vec![11],
        ..Default::default()
    };
    assert!(model
        .forward(&latent, &bad_label)
        .unwrap_err()
        .to_string()
        .contains("class labels"));
    let ok = CondInputs {
        timesteps: vec![1.0],
        class_labels: vec![1],
        ..Default::default()
    };
    assert!(model.forward(&Tensor::zeros(&[1, 3, 8, 8]), &ok).is_err());
    assert!(model.forward(&Tensor::zeros(&[1, 4, 7, 8]), &ok).is_err());
}

#[test]
fn tokens_and_conditioning_of_different_batches_are_an_error() {
    let model =
        Transformer::load(&fixtures().join("dit_tiny"), None, Device::cpu(1).unwrap()).unwrap();
    let cond = model
        .conditioning(&CondInputs {
            timesteps: vec![1.0],
            class_labels: vec![1],
            ..Default::default()
        })
        .unwrap();
    let mut x = model.embed(&Tensor::zeros(&[2, 4, 8, 8]), 0, 4).unwrap();
    assert!(model
        .run_blocks(&mut x, &cond)
        .unwrap_err()
        .to_string()
        .contains("batch"));
    assert!(model.head(&x, &cond, 4, 8).is_err());
}

/// PixArt-Sigma (issue 13): the PixArt-alpha class with Sigma's config keys (sample_size 128
/// without micro-conditions, interpolation_scale 2), on a non-square latent far from the base grid,
/// with and without a caption mask.
#[test]
fn pixart_sigma_matches_diffusers() {
    let io = Fixture::load("pixart_sigma_tiny_io.safetensors");
    let dir = fixtures().join("pixart_sigma_tiny");
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    assert!(!cfg.use_additional_conditions);
    assert_eq!((cfg.sample_size, cfg.interpolation_scale), (128, 2.0));
    let model = Transformer::load(&dir, None, Device::cpu(2).unwrap()).unwrap();
    for masked in [true, false] {
        let inputs = CondInputs {
            timesteps: io.i("timestep").iter().map(|&t| t as f32).collect(),
            caption: Some(io.f("encoder_hidden_states").clone()),
            caption_mask: masked.then(|| io.f("mask").clone()),
            ..Default::default()
        };
        let out = if masked {
            "output_masked"
        } else {
            "output_nomask"
        };
        check(
            &format!("sigma {out}"),
            &model.forward(io.f("latent"), &inputs).unwrap(),
            io.f(out),
        );
    }
}
