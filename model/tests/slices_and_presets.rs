//! Block slices compose to the whole model; presets and the FLOP formula.

mod common;

use kernels::{Device, Tensor};
use model::{Arch, CondInputs, ModelConfig, Transformer};

fn tiny(arch: Arch) -> ModelConfig {
    ModelConfig {
        num_layers: 4,
        ..common::tiny(arch)
    }
}

/// Stage-by-stage execution over random weights (as a pipeline runs it) equals the whole model
/// bitwise: each slice reads the same seeded tensors a whole-model build reads.
#[test]
fn slices_compose_to_the_whole_model() {
    for arch in [Arch::Dit, Arch::PixArt] {
        let cfg = tiny(arch);
        let dev = Device::cpu(1).unwrap();
        let latent = Tensor::from_vec(
            (0..2 * 4 * 8 * 12)
                .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
                .collect(),
            &[2, 4, 8, 12],
        )
        .unwrap();
        let inputs = CondInputs {
            timesteps: vec![999.0, 3.0],
            class_labels: vec![1, 10],
            caption: Some(
                Tensor::from_vec(
                    (0..2 * 5 * 12).map(|i| (i % 7) as f32 * 0.1).collect(),
                    &[2, 5, 12],
                )
                .unwrap(),
            ),
            caption_mask: Some(
                Tensor::from_vec(vec![1., 1., 1., 0., 0., 1., 1., 1., 1., 1.], &[2, 5]).unwrap(),
            ),
            ..Default::default()
        };
        let whole = Transformer::random(cfg.clone(), 7, None, dev.clone())
            .unwrap()
            .forward(&latent, &inputs)
            .unwrap();
        let stages: Vec<Transformer> = [0..1, 1..3, 3..4]
            .into_iter()
            .map(|r| Transformer::random(cfg.clone(), 7, Some(r), dev.clone()).unwrap())
            .collect();
        let cond = stages[0].conditioning(&inputs).unwrap();
        let mut x = stages[0].embed(&latent, 0, 4).unwrap();
        for s in &stages {
            s.run_blocks(&mut x, &s.conditioning(&inputs).unwrap())
                .unwrap();
        }
        let out = stages[2].head(&x, &cond, 4, 12).unwrap();
        assert_eq!(out.as_f32().unwrap(), whole.as_f32().unwrap(), "{arch:?}");
        assert!(
            stages[1].embed(&latent, 0, 4).is_err(),
            "a middle stage has no patch embedding"
        );
        assert!(
            stages[0].head(&x, &cond, 4, 12).is_err(),
            "the first stage has no final layer"
        );
    }
}

/// The FLOP formula agrees with tools/bench_torch.py's independent implementation, which
/// printed 474.660864 GFLOP for DiT-XL/2, 256 px, batch 2.
#[test]
fn presets_and_flop_formula() {
    let xl = ModelConfig::preset("DiT-XL/2").unwrap();
    assert_eq!((xl.hidden(), xl.num_layers, xl.num_heads), (1152, 28, 16));
    assert!((xl.forward_flops(2, 256, 0) / 1e9 - 474.660864).abs() < 1e-6);
    for name in ModelConfig::PRESETS {
        assert!(ModelConfig::preset(name).is_some(), "{name}");
    }
    assert!(
        ModelConfig::preset("PixArt-alpha-1024")
            .unwrap()
            .use_additional_conditions
    );
    assert!(ModelConfig::preset("DiT-XXL/2").is_none());
}
