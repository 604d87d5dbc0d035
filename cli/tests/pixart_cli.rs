//! PixArt through the binary: caption embeddings from a file (a batch-1 negative prompt is
//! broadcast), the same numbers on 1 device and on a 3-stage all-warmup pipeline, and caption
//! mistakes named by file and tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/pixart_tiny")
}

fn write(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    let data: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(n, s, v)| {
            (
                n.to_string(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                s.clone(),
            )
        })
        .collect();
    let views: HashMap<String, safetensors::tensor::TensorView<'_>> = data
        .iter()
        .map(|(n, b, s)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
        .collect()
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pipefuse"))
        .args(args)
        .output()
        .expect("binary runs")
}

fn latent(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("latent").unwrap();
    assert_eq!(t.shape(), [2, 4, 8, 8]);
    t.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn pixart_with_a_broadcast_negative_prompt_is_the_same_on_one_device_and_a_pipeline() {
    let dir = std::env::temp_dir().join(format!("pipefuse-pixart-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let emb = dir.join("prompt.safetensors");
    let mut mask = vec![1.0; 10];
    mask[9] = 0.0;
    write(
        &emb,
        &[
            ("prompt_embeds", vec![2, 5, 24], values(240, 1)),
            ("prompt_attention_mask", vec![2, 5], mask),
            ("negative_prompt_embeds", vec![1, 5, 24], values(120, 2)),
        ],
    );
    let m = model();
    let mut outs = Vec::new();
    for (tag, extra) in [
        ("one", vec!["--pipefusion-degree", "1"]),
        (
            "three",
            vec![
                "--pipefusion-degree",
                "3",
                "--num-patches",
                "2",
                "--warmup-steps",
                "6",
            ],
        ),
    ] {
        let out = dir.join(format!("{tag}.safetensors"));
        let mut args = vec![
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--prompt-embeds",
            emb.to_str().unwrap(),
            "--steps",
            "6",
        ];
        args.extend(extra);
        args.extend(["--save-latent", out.to_str().unwrap()]);
        let o = run(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        outs.push(latent(&out));
    }
    let num: f64 = outs[0]
        .iter()
        .zip(&outs[1])
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let den: f64 = outs[0].iter().map(|a| (*a as f64).powi(2)).sum();
    let e = (num / den).sqrt();
    assert!(
        e <= 1e-5,
        "1 device vs 3-stage W = T pipeline: rel. L2 {e:.3e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn caption_mistakes_name_the_file_and_tensor() {
    let dir = std::env::temp_dir().join(format!("pipefuse-pixart-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let m = model();
    let cases: [(&[(&str, Vec<usize>, usize)], &str); 4] = [
        (
            &[("prompt_embeds", vec![2, 5, 16], 160)],
            "`prompt_embeds` is [2, 5, 16]",
        ),
        (
            &[
                ("prompt_embeds", vec![2, 5, 24], 240),
                ("negative_prompt_embeds", vec![2, 4, 24], 192),
            ],
            "`negative_prompt_embeds` is [2, 4, 24]",
        ),
        (
            &[
                ("prompt_embeds", vec![2, 5, 24], 240),
                ("prompt_attention_mask", vec![2, 4], 8),
                ("negative_prompt_embeds", vec![1, 5, 24], 120),
            ],
            "`prompt_attention_mask` is [2, 4]",
        ),
        (
            &[
                ("prompt_embeds", vec![1, 5, 24], 120),
                ("negative_prompt_embeds", vec![1, 5, 24], 120),
                ("pooled", vec![1, 4], 4),
            ],
            "unexpected tensor `pooled`",
        ),
    ];
    // A class label means nothing to a text-conditioned model: refused, not ignored.
    let good = dir.join("good.safetensors");
    write(&good, &[("prompt_embeds", vec![1, 5, 24], values(120, 3))]);
    let o = run(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt-embeds",
        good.to_str().unwrap(),
        "--guidance-scale",
        "1",
        "--class-label",
        "3",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("--class-label 3: this is a text-conditioned PixArt model"),
        "{err}"
    );
    for (i, (tensors, want)) in cases.iter().enumerate() {
        let f = dir.join(format!("bad{i}.safetensors"));
        let t: Vec<(&str, Vec<usize>, Vec<f32>)> = tensors
            .iter()
            .map(|(n, s, len)| (*n, s.clone(), values(*len, 3)))
            .collect();
        write(&f, &t);
        let o = run(&[
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--prompt-embeds",
            f.to_str().unwrap(),
            "--steps",
            "2",
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "case {i} succeeded");
        assert!(
            err.contains(want) && err.contains(&format!("bad{i}.safetensors")),
            "case {i}: `{want}` not in: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
