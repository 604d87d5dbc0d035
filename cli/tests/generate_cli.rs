//! The `pipefuse` binary end to end: `generate` reproduces diffusers' DiTPipeline final latent from
//! the same noise (relative L2 <= 1e-4), and bad input gives an error naming the file or flag.

mod common;

use common::{fixtures, pipefuse, read_f32, rel_l2};

#[test]
fn generate_matches_diffusers_dit_pipeline() {
    let out = std::env::temp_dir().join(format!("pipefuse-gen-{}.safetensors", std::process::id()));
    let f = fixtures();
    let o = pipefuse(&[
        "generate",
        "--model",
        f.join("dit_tiny_pipeline").to_str().unwrap(),
        "--class-label",
        "3",
        "--class-label",
        "7",
        "--steps",
        "12",
        "--guidance-scale",
        "4",
        "--threads",
        "2",
        "--latents",
        f.join("dit_pipeline_noise.safetensors").to_str().unwrap(),
        "--save-latent",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = read_f32(&out, "latent");
    let want = read_f32(&f.join("dit_pipeline_ddim.safetensors"), "final_latent");
    let e = rel_l2(&got, &want);
    assert!(e <= 1e-4, "relative L2 {e:.3e}");
    std::fs::remove_file(out).ok();
}

#[test]
fn bad_input_is_a_clear_error() {
    let f = fixtures();
    let model = f.join("dit_tiny_pipeline");
    let m = model.to_str().unwrap();
    let io = f.join("dit_tiny_io.safetensors");
    let cases: [(&[&str], &str); 6] = [
        (
            &["generate", "--model", "/nonexistent", "--class-label", "1"],
            "/nonexistent",
        ),
        (
            &[
                "generate",
                "--model",
                m,
                "--class-label",
                "1",
                "--prompt-embeds",
                "caption.safetensors",
            ],
            "--prompt-embeds caption.safetensors: this is a class-conditioned DiT",
        ),
        (&["generate", "--model", m], "--class-label"),
        (
            &["generate", "--model", m, "--class-label", "10"],
            "out of range",
        ),
        (
            &[
                "generate",
                "--model",
                m,
                "--class-label",
                "1",
                "--height",
                "60",
            ],
            "--height",
        ),
        (
            &[
                "generate",
                "--model",
                m,
                "--class-label",
                "1",
                "--latents",
                io.to_str().unwrap(),
            ],
            "exactly one tensor",
        ),
    ];
    for (args, want) in cases {
        let o = pipefuse(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: stderr lacks `{want}`: {err}");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
}

#[test]
fn help_lists_every_generate_flag() {
    let o = pipefuse(&["generate", "--help"]);
    let help = String::from_utf8_lossy(&o.stdout);
    for flag in [
        "--model",
        "--class-label",
        "--prompt-embeds",
        "--steps",
        "--guidance-scale",
        "--scheduler",
        "--seed",
        "--height",
        "--width",
        "--threads",
        "--latents",
        "--save-latent",
    ] {
        assert!(help.contains(flag), "help lacks {flag}");
    }
}
