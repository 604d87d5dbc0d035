//! SD3 and Flux through the binary, from pipeline folders without text encoders or VAE (what a
//! user has before a text encoder runs here): prompt embeddings and noise from files, the final
//! latent equal to diffusers' StableDiffusion3Pipeline / FluxPipeline (relative L2 <= 1e-4, the
//! `mmdit_pipelines` fixtures) on one device and on a PipeFusion x CFG cluster; flags the model
//! cannot use and incomplete prompt files are refused naming what is wrong.

mod common;

use common::{fixtures, pipefuse, read_f32, rel_l2};

/// A fresh scratch folder for one test.
fn scratch(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("pipefuse-mmdit-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &std::path::Path) -> String {
    p.display().to_string()
}

/// Runs `generate` on `folder`'s pipeline with `name`'s prompt and noise and `flags`; returns
/// the final latent.
fn generate(folder: &str, name: &str, flags: &[&str], out: &std::path::Path) -> Vec<f32> {
    let f = fixtures();
    let mut args = vec![
        "generate".to_string(),
        "--model".into(),
        s(&f.join(format!("{folder}_pipeline"))),
        "--prompt-embeds".into(),
        s(&f.join(format!("{name}_prompt.safetensors"))),
        "--latents".into(),
        s(&f.join(format!("{name}_noise.safetensors"))),
        "--steps".into(),
        "4".into(),
        "--save-latent".into(),
        s(out),
    ];
    args.extend(flags.iter().map(|x| x.to_string()));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = pipefuse(&argv);
    assert!(
        o.status.success(),
        "{name} {flags:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    read_f32(out, "latent")
}

#[test]
fn sd3_and_flux_pipelines_match_diffusers_on_one_device_and_on_a_cluster() {
    let tmp = scratch("match");
    let io = fixtures().join("mmdit_pipelines_io.safetensors");
    let pipefusion = [
        "--pipefusion-degree",
        "2",
        "--num-patches",
        "2",
        "--warmup-steps",
        "4",
    ];
    for (folder, name, key, flags) in [
        ("sd3", "sd3", "sd3", vec!["--guidance-scale", "5"]),
        (
            "sd3_plain",
            "sd3",
            "sd3_plain",
            vec!["--guidance-scale", "5"],
        ),
        ("flux", "flux", "flux", vec!["--guidance-scale", "3.5"]),
        (
            "flux",
            "flux",
            "flux_cfg",
            vec!["--guidance-scale", "3.5", "--true-cfg-scale", "2"],
        ),
        ("flux_schnell", "flux", "flux_schnell", vec![]),
    ] {
        let want = read_f32(&io, &format!("{key}.latent"));
        let one = generate(
            folder,
            name,
            &flags,
            &tmp.join(format!("{key}.safetensors")),
        );
        let e = rel_l2(&one, &want);
        eprintln!("{key}: one device, rel L2 {e:.2e} vs diffusers");
        assert!(e <= 1e-4, "{key}: {e:.3e}");
        // PipeFusion 2 with W = T, and CFG parallel where the run is guided.
        let mut more = flags.clone();
        more.extend_from_slice(&pipefusion);
        if !matches!(key, "flux" | "flux_schnell") {
            more.extend_from_slice(&["--cfg-degree", "2"]);
        }
        let par = generate(
            folder,
            name,
            &more,
            &tmp.join(format!("{key}_par.safetensors")),
        );
        let e = rel_l2(&par, &one);
        eprintln!("{key}: {more:?}, rel L2 {e:.2e} vs one device");
        assert!(e <= 1e-5, "{key} on a cluster: {e:.3e}");
    }
}

#[test]
fn flags_and_files_the_model_cannot_use_are_refused() {
    let f = fixtures();
    let tmp = scratch("refuse");
    let run = |name: &str, prompt: &str, extra: &[&str]| {
        let mut args = vec![
            "generate".to_string(),
            "--model".into(),
            s(&f.join(format!("{name}_pipeline"))),
            "--prompt-embeds".into(),
            prompt.to_string(),
            "--steps".into(),
            "1".into(),
            "--save-latent".into(),
            s(&tmp.join("x.safetensors")),
        ];
        args.extend(extra.iter().map(|x| x.to_string()));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = pipefuse(&argv);
        assert!(!o.status.success(), "{name} {extra:?} must fail");
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let sd3_prompt = s(&f.join("sd3_prompt.safetensors"));
    let e = run("sd3", &sd3_prompt, &["--true-cfg-scale", "2"]);
    assert!(e.contains("--true-cfg-scale"), "{e}");
    let e = run("sd3", &sd3_prompt, &["--class-label", "1"]);
    assert!(e.contains("--prompt-embeds"), "{e}");
    // A PNG needs a VAE the folder does not have.
    let e = run("sd3", &sd3_prompt, &["--out", &s(&tmp.join("x.png"))]);
    assert!(e.contains("vae/"), "{e}");
    // A prompt file without the pooled embedding names it.
    let bad = tmp.join("no_pooled.safetensors");
    let pe: Vec<f32> = read_f32(&f.join("sd3_prompt.safetensors"), "prompt_embeds");
    let bytes: Vec<u8> = pe.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 5, 12], &bytes)
            .unwrap();
    safetensors::serialize_to_file([("prompt_embeds", view)], None, &bad).unwrap();
    let e = run("sd3", &s(&bad), &["--guidance-scale", "1"]);
    assert!(e.contains("pooled_prompt_embeds"), "{e}");
    // Guidance without the negative prompt names what is missing.
    let flux_prompt = s(&f.join("flux_prompt.safetensors"));
    let e = run("sd3", &s(&bad), &[]);
    assert!(e.contains("pooled_prompt_embeds"), "{e}");
    let e = run("flux", &flux_prompt, &["--height", "40", "--width", "64"]);
    assert!(e.contains("--height 40"), "{e}");
    // A schnell-style model has no guidance embedding to give a scale to.
    let e = run("flux_schnell", &flux_prompt, &["--guidance-scale", "3.5"]);
    assert!(e.contains("no guidance embedding"), "{e}");
}

/// `pipefuse plan` on the MMDiT presets (random weights are never built): Flux.1-dev's 57
/// layers over 4 stages, every part's frame carrying the 512 prompt tokens; SD3.5-Large on
/// CFG 2 x PipeFusion 2; an SD3 image larger than its position table is refused.
#[test]
fn plans_for_the_mmdit_presets() {
    let topo = common::root().join("examples/topologies");
    let plan = |file: &str, px: &str, extra: &[&str]| {
        let t = s(&topo.join(file));
        let mut args = vec!["plan", "--topology", &t, "--height", px, "--width", px];
        args.extend_from_slice(extra);
        pipefuse(&args)
    };
    let o = plan("flux_dev_4stage.toml", "1024", &["--guidance", "false"]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.contains("57 layers") && out.contains("+ 512 prompt tokens"),
        "{out}"
    );
    assert!(
        out.contains("0..15 (15)") && out.contains("43..57 (14)"),
        "{out}"
    );
    // 8 patches of 512 image tokens, each with the 512 prompt tokens: (4096 + 8 x 512) x 3072 x 4.
    assert!(out.contains("link 0 -> 1: 100663296 bytes/step"), "{out}");
    let o = plan("sd35_large_cfg2_pf2.toml", "1024", &[]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.contains("CFG parallel: 2 groups") && out.contains("0..19 (19)"),
        "{out}"
    );
    let o = plan("sd35_large_cfg2_pf2.toml", "4096", &[]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        !o.status.success() && err.contains("pos_embed_max_size 192"),
        "{err}"
    );
}

/// PixArt-Sigma end to end: `PixArtSigmaPipeline` (4 steps of DPM-Solver++ 2M, CFG 4.5, caption
/// masks with padding, no resolution binning) from the same noise and embeddings; one device and
/// PipeFusion 2 x CFG 2 with W = T.
#[test]
fn pixart_sigma_pipeline_matches_diffusers() {
    let tmp = scratch("sigma");
    let want = read_f32(
        &fixtures().join("mmdit_pipelines_io.safetensors"),
        "pixart_sigma.latent",
    );
    let flags = ["--guidance-scale", "4.5"];
    let one = generate(
        "pixart_sigma",
        "pixart_sigma",
        &flags,
        &tmp.join("one.safetensors"),
    );
    let e = rel_l2(&one, &want);
    eprintln!("pixart_sigma: one device, rel L2 {e:.2e} vs diffusers");
    assert!(e <= 1e-4, "pixart_sigma: {e:.3e}");
    let more = [
        "--guidance-scale",
        "4.5",
        "--pipefusion-degree",
        "2",
        "--cfg-degree",
        "2",
        "--num-patches",
        "2",
        "--warmup-steps",
        "4",
    ];
    let par = generate(
        "pixart_sigma",
        "pixart_sigma",
        &more,
        &tmp.join("par.safetensors"),
    );
    let e = rel_l2(&par, &one);
    eprintln!("pixart_sigma: pf 2 x cfg 2, rel L2 {e:.2e} vs one device");
    assert!(e <= 1e-5, "pixart_sigma on a cluster: {e:.3e}");
}
