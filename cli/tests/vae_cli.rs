//! A diffusers pipeline folder with a `vae/`: `pipefuse generate --out` decodes the final latents
//! through the VAE decoder (golden-tested against diffusers in model/tests/golden_vae.rs) and
//! writes exactly those pixels.

use std::path::PathBuf;
use std::process::Command;

use kernels::{Device, Tensor};
use model::{to_unit_range, VaeDecoder};

mod common;

use common::copy_dir;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures")
}

#[test]
fn generate_decodes_through_the_pipelines_vae_into_the_png() {
    let f = fixtures();
    let dir = std::env::temp_dir().join(format!("pipefuse-vae-pipeline-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(
        &f.join("dit_tiny_pipeline/transformer"),
        &dir.join("transformer"),
    );
    copy_dir(
        &f.join("dit_tiny_pipeline/scheduler"),
        &dir.join("scheduler"),
    );
    copy_dir(&f.join("vae_tiny"), &dir.join("vae"));
    std::fs::copy(
        f.join("dit_tiny_pipeline/model_index.json"),
        dir.join("model_index.json"),
    )
    .unwrap();
    let (png, lat) = (dir.join("out.png"), dir.join("latent.safetensors"));
    let o = Command::new(env!("CARGO_BIN_EXE_pipefuse"))
        .args([
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--pipefusion-degree",
            "2",
        ])
        .args([
            "--class-label",
            "3",
            "--class-label",
            "5",
            "--steps",
            "4",
            "--png-scale",
            "2",
        ])
        .args([
            "--out",
            png.to_str().unwrap(),
            "--save-latent",
            lat.to_str().unwrap(),
        ])
        .output()
        .expect("binary runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // The same latent decoded here: the PNG holds exactly these pixels.
    let latent = read_latent(&lat); // [2, 4, 8, 8]
    let vae = VaeDecoder::load(&dir.join("vae"), Device::cpu(1).unwrap()).unwrap();
    let image = to_unit_range(&vae.decode(&latent).unwrap()).unwrap(); // [2, 3, 16, 16]
    assert_eq!(image.shape(), [2, 3, 16, 16], "vae_tiny upscales by 2");
    let img = image::open(&png).unwrap().to_rgb8();
    assert_eq!(
        img.dimensions(),
        (2 * 17 * 2, 17 * 2),
        "two tiles of (16 + 1) x 2 pixels"
    );
    let px = image.as_f32().unwrap();
    for b in 0..2 {
        for y in 0..16 {
            for x in 0..16 {
                let got = img.get_pixel((b * 34 + x * 2) as u32, (y * 2) as u32);
                for c in 0..3 {
                    let want = (px[((b * 3 + c) * 16 + y) * 16 + x] * 255.0).round();
                    assert!(
                        (got[c] as f32 - want).abs() <= 1.0,
                        "image {b} ({x}, {y}) channel {c}"
                    );
                }
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// SD3 with a VAE that has a `shift_factor` (SD3 / Flux VAEs do): the PNG is the decode of the
/// final latent as `latent / scaling_factor + shift_factor` (VaeDecoder, golden-tested).
#[test]
fn sd3_decodes_through_a_shifted_vae_into_the_png() {
    let f = fixtures();
    let dir = std::env::temp_dir().join(format!("pipefuse-sd3-vae-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for part in ["transformer", "scheduler"] {
        copy_dir(&f.join("sd3_pipeline").join(part), &dir.join(part));
    }
    copy_dir(&f.join("vae_tiny"), &dir.join("vae"));
    std::fs::copy(
        f.join("sd3_pipeline/model_index.json"),
        dir.join("model_index.json"),
    )
    .unwrap();
    // SD3's VAE latent scale and shift.
    let cfg_path = dir.join("vae/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["scaling_factor"] = serde_json::json!(1.5305);
    cfg["shift_factor"] = serde_json::json!(0.0609);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let (png, lat) = (dir.join("out.png"), dir.join("latent.safetensors"));
    let arg = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let o = Command::new(env!("CARGO_BIN_EXE_pipefuse"))
        .args(["generate", "--model", &arg(&dir), "--steps", "2"])
        .args([
            "--prompt-embeds",
            &arg(&f.join("sd3_prompt.safetensors")),
            "--latents",
            &arg(&f.join("sd3_noise.safetensors")),
            "--guidance-scale",
            "5",
            "--png-scale",
            "1",
        ])
        .args(["--out", &arg(&png), "--save-latent", &arg(&lat)])
        .output()
        .expect("binary runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let latent = read_latent(&lat); // [2, 4, 8, 6]
    let vae = VaeDecoder::load(&dir.join("vae"), Device::cpu(1).unwrap()).unwrap();
    let image = to_unit_range(&vae.decode(&latent).unwrap()).unwrap(); // [2, 3, 16, 12]
    assert_eq!(image.shape(), [2, 3, 16, 12]);
    let img = image::open(&png).unwrap().to_rgb8();
    assert_eq!(
        img.dimensions(),
        (2 * 13, 17),
        "two tiles of (12 + 1) x (16 + 1) pixels"
    );
    let px = image.as_f32().unwrap();
    for b in 0..2 {
        for y in 0..16 {
            for x in 0..12 {
                let got = img.get_pixel((b * 13 + x) as u32, y as u32);
                for c in 0..3 {
                    let want = (px[((b * 3 + c) * 16 + y) * 12 + x] * 255.0).round();
                    assert!(
                        (got[c] as f32 - want).abs() <= 1.0,
                        "image {b} ({x}, {y}) c {c}"
                    );
                }
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The `latent` tensor of a `--save-latent` file.
fn read_latent(path: &std::path::Path) -> Tensor {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let v = st.tensor("latent").unwrap();
    let data = v
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    Tensor::from_vec(data, v.shape()).unwrap()
}
