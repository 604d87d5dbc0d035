//! A diffusers pipeline folder with a `vae/`: `pipefuse generate --out` decodes the final latents
//! through the VAE decoder (golden-tested against diffusers in model/tests/golden_vae.rs) and
//! writes exactly those pixels.

use std::path::{Path, PathBuf};
use std::process::Command;

use kernels::{Device, Tensor};
use model::{to_unit_range, VaeDecoder};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        // Follow symlinks: the fixtures share weight files through them.
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
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
    let bytes = std::fs::read(&lat).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let v = st.tensor("latent").unwrap();
    let data = v
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let latent = Tensor::from_vec(data, v.shape()).unwrap(); // [2, 4, 8, 8]
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
