//! The README's first command on the bundled demo model: `pipefuse generate --out digits.png`
//! writes one PNG with the digits 0-9, made by PipeFusion on two local CPU devices, and an
//! independent classifier (k-nearest neighbours fitted here on the 8x8 digits shipped in
//! assets/digits-dit/eval/) reads every digit back as the one that was asked for.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The classifier's digits, shipped with the model (8x8 images with values 0..16, labels): 2,000
/// rendered apart from the model's training set, then scikit-learn's 1,797 handwritten ones.
fn digits() -> (Vec<[f32; 64]>, Vec<u8>) {
    let path = root().join("assets/digits-dit/eval/digits_8x8.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let images = st.tensor("images").unwrap();
    let labels = st.tensor("labels").unwrap().data().to_vec();
    let x = images
        .data()
        .chunks_exact(64)
        .map(|c| std::array::from_fn(|i| c[i] as f32))
        .collect();
    (x, labels)
}

/// k-NN (k = 5, Euclidean) on 8x8 images scaled 0..16.
fn classify(train: &(Vec<[f32; 64]>, Vec<u8>), x: &[f32; 64]) -> u8 {
    let mut d: Vec<(f32, u8)> = train
        .0
        .iter()
        .zip(&train.1)
        .map(|(t, &l)| (t.iter().zip(x).map(|(a, b)| (a - b) * (a - b)).sum(), l))
        .collect();
    d.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut votes = [0usize; 10];
    for &(_, l) in &d[..5] {
        votes[l as usize] += 1;
    }
    (0..10u8).max_by_key(|&l| votes[l as usize]).unwrap()
}

/// Runs `pipefuse generate` (the demo request) with `args`, reads the PNG back with the k-NN
/// classifier, and requires every digit to be the one asked for. Returns generate's stderr.
fn draws_recognisable_digits(args: &[&str], tag: &str) -> String {
    let out =
        std::env::temp_dir().join(format!("pipefuse-digits-{tag}-{}.png", std::process::id()));
    let o = Command::new(env!("CARGO_BIN_EXE_pipefuse"))
        .args(["generate", "--out", out.to_str().unwrap()])
        .args(args)
        .output()
        .expect("binary runs");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");

    let img = image::open(&out).unwrap().to_luma8();
    let (w, h) = img.dimensions();
    let tile = w as usize / 10; // 10 columns, 1 row: (16 + 1 gap) * scale pixels each
    let scale = tile / 17;
    assert_eq!(h as usize, tile, "one row of ten 16x16 digits");
    let train = digits();
    let mut wrong = Vec::new();
    for digit in 0..10u8 {
        // 16x16 pixels -> 8x8 by 2x2 averaging, 0..255 -> 0..16 (the data set's range).
        let x: [f32; 64] = std::array::from_fn(|i| {
            let (r, c) = (i / 8, i % 8);
            let mut s = 0.0;
            for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                let px = digit as usize * tile + (2 * c + dx) * scale + scale / 2;
                let py = (2 * r + dy) * scale + scale / 2;
                s += img.get_pixel(px as u32, py as u32)[0] as f32;
            }
            s / 4.0 / 255.0 * 16.0
        });
        let got = classify(&train, &x);
        if got != digit {
            wrong.push((digit, got));
        }
    }
    assert!(
        wrong.is_empty(),
        "{args:?}: digits read back as other digits (asked, read): {wrong:?}"
    );
    std::fs::remove_file(out).ok();
    err
}

#[test]
fn the_readme_command_draws_recognisable_digits() {
    let err = draws_recognisable_digits(&[], "readme");
    assert!(
        err.contains("2 stage(s)"),
        "the default runs PipeFusion on two devices: {err}"
    );
}

/// The same request on bf16 devices (linear layers in bf16: AMX tiles or AVX512-BF16 where the CPU has them).
#[test]
fn bf16_devices_draw_recognisable_digits_too() {
    let err = draws_recognisable_digits(&["--dtype", "bf16"], "bf16");
    assert!(
        err.contains("linear layers in bf16 on 2 device(s)"),
        "the run says its precision: {err}"
    );
}

fn latent_of(args: &[&str], tag: &str) -> Vec<f32> {
    let out = std::env::temp_dir().join(format!(
        "pipefuse-demo-{tag}-{}.safetensors",
        std::process::id()
    ));
    let o = Command::new(env!("CARGO_BIN_EXE_pipefuse"))
        .args(["generate", "--save-latent", out.to_str().unwrap()])
        .args(args)
        .output()
        .expect("binary runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let v = st
        .tensor("latent")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    std::fs::remove_file(out).ok();
    v
}

/// The demo request run serially (one device) and with PipeFusion (2 devices, M = 2, W = 1):
/// the images differ by a bounded amount. Measured 45.51 dB PSNR on [0, 1] images with the
/// font-trained demo (2026-12-06, BENCHMARKS.md); the bound leaves 3 dB of margin.
#[test]
fn the_demo_images_of_pipefusion_and_serial_are_close() {
    let serial = latent_of(&["--pipefusion-degree", "1"], "serial");
    let piped = latent_of(&[], "piped");
    let img = |v: f32| (v / 2.0 + 0.5).clamp(0.0, 1.0) as f64;
    let mse = serial
        .iter()
        .zip(&piped)
        .map(|(a, b)| (img(*a) - img(*b)).powi(2))
        .sum::<f64>()
        / serial.len() as f64;
    let psnr = 10.0 * (1.0 / mse).log10();
    eprintln!("PSNR PipeFusion vs serial: {psnr:.2} dB");
    assert!(
        mse > 0.0,
        "W < T with 2 patches cannot equal serial exactly"
    );
    assert!(psnr >= 42.5, "PSNR {psnr:.2} dB below the bound");
}
