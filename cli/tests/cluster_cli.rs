//! `pipefuse generate --topology`, the xDiT-style overrides and `pipefuse plan`, end to end.

mod common;

use common::{pipefuse, read_f32, rel_l2, root};

/// The bundled 2-device topology with W = T reproduces diffusers' DiTPipeline; with W = 1 it runs
/// PipeFusion and reports its summary.
#[test]
fn generate_on_a_topology_matches_diffusers_when_all_steps_are_warmup() {
    let f = root().join("model/tests/fixtures");
    let topo = root().join("examples/topologies/local_2cpu.toml");
    let want = read_f32(&f.join("dit_pipeline_ddim.safetensors"), "final_latent");
    for (warmup, limit) in [("12", 1e-4), ("1", 0.2)] {
        let out = std::env::temp_dir().join(format!(
            "pipefuse-topo-{}-{warmup}.safetensors",
            std::process::id()
        ));
        let o = pipefuse(&[
            "generate",
            "--topology",
            topo.to_str().unwrap(),
            "--warmup-steps",
            warmup,
            "--class-label",
            "3",
            "--class-label",
            "7",
            "--steps",
            "12",
            "--guidance-scale",
            "4",
            "--latents",
            f.join("dit_pipeline_noise.safetensors").to_str().unwrap(),
            "--save-latent",
            out.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        assert!(err.contains("2 stage(s), 4 patch(es)"), "{err}");
        assert!(
            err.contains("bubble fraction") && err.contains("device 1: busy"),
            "{err}"
        );
        let e = rel_l2(&read_f32(&out, "latent"), &want);
        assert!(e <= limit, "W={warmup}: relative L2 {e:.3e} vs diffusers");
        std::fs::remove_file(out).ok();
    }
}

#[test]
fn plan_prints_owners_patches_and_link_bytes() {
    let topo = root().join("examples/topologies/local_2cpu.toml");
    let o = pipefuse(&[
        "plan",
        "--topology",
        topo.to_str().unwrap(),
        "--num-patches",
        "2",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for want in [
        "0..2",
        "2..3",
        "2 patches",
        "link 0 -> 1",
        "link 1 -> 0",
        "K/V buffers",
    ] {
        assert!(out.contains(want), "plan lacks `{want}`:\n{out}");
    }
}

#[test]
fn topology_mistakes_name_file_line_and_field() {
    let dir = std::env::temp_dir().join(format!("pipefuse-badtopo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[model]\npreset = \"DiT-S/2\"\n\n[parallel]\npipefusion_degree = 3\n\n[[nodes]]\nname = \"a\"\ndevices = [{ kind = \"cpu\" }, { kind = \"cpu\" }]\n",
    )
    .unwrap();
    let cases: [(Vec<&str>, &str); 3] = [
        (
            vec!["plan", "--topology", bad.to_str().unwrap()],
            "bad.toml:5",
        ),
        (
            vec![
                "generate",
                "--topology",
                bad.to_str().unwrap(),
                "--class-label",
                "1",
            ],
            "pipefusion_degree",
        ),
        (
            vec!["plan", "--topology", "/nonexistent.toml"],
            "/nonexistent.toml",
        ),
    ];
    for (args, want) in cases {
        let o = pipefuse(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: stderr lacks `{want}`: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn help_lists_the_cluster_flags() {
    for cmd in ["generate", "plan"] {
        let o = pipefuse(&[cmd, "--help"]);
        let help = String::from_utf8_lossy(&o.stdout);
        for flag in [
            "--topology",
            "--model",
            "--pipefusion-degree",
            "--num-patches",
            "--warmup-steps",
            "--threads",
        ] {
            assert!(help.contains(flag), "{cmd} --help lacks {flag}");
        }
    }
}

/// `bench pipeline` runs end to end on a small case; its last line is the speedup.
/// `bench forward --op-times`: every op of a PixArt block (cross-attention included) is timed,
/// and the ops add up to no more than the forward they ran in.
#[test]
fn bench_forward_op_times_account_for_the_forward() {
    let o = pipefuse(&[
        "bench",
        "forward",
        "--preset",
        "PixArt-alpha-256",
        "--layers",
        "1",
        "--resolution",
        "64",
        "--batch",
        "1",
        "--caption-tokens",
        "8",
        "--iters",
        "1",
        "--op-times",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("ops, per forward"), "{out}");
    let j: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let ops = j["op_ms_per_forward"]
        .as_object()
        .expect("op times in the JSON");
    let want = [
        "modulation",
        "norm",
        "qkv",
        "attend",
        "attn_out",
        "residual",
        "cross_attention",
        "fc1_gelu",
        "fc2",
    ];
    for op in want {
        let ms = ops.get(op).and_then(|v| v.as_f64());
        assert!(ms.is_some_and(|ms| ms > 0.0), "{op}: {ms:?} in {ops:?}");
    }
    assert_eq!(ops.len(), want.len(), "{ops:?}");
    let sum: f64 = ops.values().filter_map(|v| v.as_f64()).sum();
    let forward = j["ms_per_forward"].as_f64().unwrap();
    assert!(
        sum <= forward * 1.0001,
        "ops {sum} ms > forward {forward} ms"
    );
    // A GPU's ops are asynchronous: refused, naming the flag.
    let o = pipefuse(&["bench", "forward", "--device", "cuda", "--op-times"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--op-times"), "{err}");
}

#[test]
fn bench_pipeline_ends_with_the_speedup_line() {
    let o = pipefuse(&[
        "bench",
        "pipeline",
        "--preset",
        "DiT-S/2",
        "--resolution",
        "64",
        "--steps",
        "3",
        "--num-patches",
        "2",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    let last = out.lines().last().expect("output");
    let ratio: f64 = last
        .strip_prefix("speedup_vs_serial=")
        .unwrap_or_else(|| panic!("last line `{last}`"))
        .parse()
        .unwrap();
    assert!(ratio > 0.0 && ratio.is_finite());
    assert!(out.contains("speedup_vs_multithread="), "{out}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("drift of the cluster vs serial"), "{err}");
    // Every benchmark names the CPU and the kernels it dispatched to.
    assert!(
        err.contains("cpu: ")
            && err.contains("f32 linears: ")
            && err.contains("other f32 products: gemm crate")
            && err.contains("bf16 GEMM: "),
        "{err}"
    );
}

/// Mistakes on the command line are named before anything runs.
#[test]
fn flag_mistakes_are_named_before_any_compute() {
    let local = root().join("examples/topologies/local_2cpu.toml");
    let readme = root().join("README.md");
    let cases: [(Vec<&str>, &str); 7] = [
        (
            vec!["generate", "--steps", "0"],
            "--steps must be at least 1",
        ),
        (vec!["generate", "--threads", "0"], "1 to 1024"),
        (vec!["generate", "--out", "digits.jpg"], "only PNG"),
        (
            vec!["generate", "--out", "/nonexistent-dir/d.png"],
            "the folder does not exist",
        ),
        (
            vec![
                "generate",
                "--model",
                "../model/tests/fixtures/dit_tiny_pipeline",
                "--class-label",
                "1",
                "--out",
                "x.png",
            ],
            "no vae/",
        ),
        (
            vec![
                "launch",
                "--local",
                "--topology",
                local.to_str().unwrap(),
                "--class-label",
                "1",
            ],
            "single node",
        ),
        (
            vec!["generate", "--attach", readme.to_str().unwrap()],
            "is not a socket",
        ),
    ];
    for (args, want) in cases {
        let o = pipefuse(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: stderr lacks `{want}`: {err}");
        assert!(
            !err.contains("generated"),
            "{args:?} ran the request before failing: {err}"
        );
    }
}

/// The demo model on one node with two CPU devices, the parallel degrees left to defaults.
fn two_device_demo_topology(dir: &std::path::Path) -> std::path::PathBuf {
    let topo = dir.join("two.toml");
    std::fs::write(
        &topo,
        format!(
            "[model]\npath = \"{}\"\n[[nodes]]\nname = \"local\"\ndevices = [{{ kind = \"cpu\", threads = 1 }}, {{ kind = \"cpu\", threads = 1 }}]\n",
            root().join("assets/digits-dit").display()
        ),
    )
    .unwrap();
    topo
}

/// `--class-label 0 ... --class-label 9`: the demo's default request spelled out.
fn demo_labels() -> Vec<String> {
    (0..10)
        .flat_map(|l| ["--class-label".into(), l.to_string()])
        .collect()
}

/// `--cfg-degree 2`: the two guidance branches on two device groups give the one-device result
/// (bound 1e-5; identical on this machine), `plan` shows the prediction exchange, and a request
/// CFG parallel cannot split is refused naming the field.
#[test]
fn cfg_parallel_from_the_command_line() {
    let dir = std::env::temp_dir().join(format!("pipefuse-cfg-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |extra: &[&str], out: &str| {
        let path = dir.join(out);
        let mut args = vec!["generate", "--threads", "1", "--steps", "8"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--save-latent", path.to_str().unwrap()]);
        let o = pipefuse(&args);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{err}");
        (read_f32(&path, "latent"), err)
    };
    let (one, _) = run(&["--pipefusion-degree", "1"], "one.safetensors");
    let (two, err) = run(
        &["--cfg-degree", "2", "--pipefusion-degree", "1"],
        "two.safetensors",
    );
    assert!(err.contains("1 stage(s) x 2 CFG groups"), "{err}");
    assert!(err.contains("device 1: busy"), "{err}");
    let e = rel_l2(&two, &one);
    eprintln!("CFG parallel vs one device: relative L2 {e:.3e}");
    assert!(e <= 1e-5, "relative L2 {e:.3e}");
    let (four, _) = run(
        &[
            "--cfg-degree",
            "2",
            "--pipefusion-degree",
            "2",
            "--warmup-steps",
            "8",
        ],
        "four.safetensors",
    );
    let e = rel_l2(&four, &one);
    assert!(
        e <= 1e-5,
        "CFG 2 x PipeFusion 2, all warmup: relative L2 {e:.3e}"
    );

    // A topology that leaves the pipeline degree to its default follows --cfg-degree.
    let topo = two_device_demo_topology(&dir);
    let labels = demo_labels();
    let mut args = vec!["--topology", topo.to_str().unwrap(), "--cfg-degree", "2"];
    args.extend(labels.iter().map(String::as_str)); // the demo's default request, spelled out
    let (from_file, err) = run(&args, "file.safetensors");
    assert!(err.contains("1 stage(s) x 2 CFG groups"), "{err}");
    assert_eq!(from_file, two, "the same plan from a file");

    let o = pipefuse(&["plan", "--cfg-degree", "2", "--pipefusion-degree", "2"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.contains("CFG parallel: 2 groups") && out.contains("link 3 -> 1"),
        "{out}"
    );
    assert!(out.contains("CFG noise prediction"), "{out}");

    for (args, want) in [
        (
            &["generate", "--cfg-degree", "2", "--guidance-scale", "1"][..],
            "not guided",
        ),
        (
            &["generate", "--cfg-degree", "3"][..],
            "--cfg-degree must be 1 or 2",
        ),
    ] {
        let o = pipefuse(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{args:?}: {err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `--ulysses-degree` / `--ring-degree`: the demo's tokens split over devices give the one-device
/// result (bound 1e-5), alone, with CFG parallel, as USP; inside PipeFusion stages (Ulysses, Ring,
/// USP) they give PipeFusion's result; a Ulysses degree that does not divide the heads is refused
/// naming the field.
#[test]
fn sequence_parallel_from_the_command_line() {
    let dir = std::env::temp_dir().join(format!("pipefuse-sp-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |extra: &[&str], out: &str| {
        let path = dir.join(out);
        let mut args = vec!["generate", "--threads", "1", "--steps", "6"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--save-latent", path.to_str().unwrap()]);
        let o = pipefuse(&args);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{extra:?}: {err}");
        read_f32(&path, "latent")
    };
    let one = run(&["--pipefusion-degree", "1"], "one.safetensors");
    for (i, extra) in [
        &["--ulysses-degree", "2"][..],
        &["--ulysses-degree", "4"][..],
        &["--ring-degree", "2", "--cfg-degree", "2"][..],
        &["--ulysses-degree", "2", "--ring-degree", "2"][..],
    ]
    .into_iter()
    .enumerate()
    {
        let got = run(extra, &format!("sp{i}.safetensors"));
        let e = rel_l2(&got, &one);
        eprintln!("{extra:?}: relative L2 {e:.3e} vs one device");
        assert!(e <= 1e-5, "{extra:?}: relative L2 {e:.3e}");
    }
    // Sequence parallelism inside PipeFusion stages: the same as PipeFusion alone (same M, W).
    let pf = run(&["--pipefusion-degree", "2"], "pf.safetensors");
    for (i, sp) in [
        &["--ulysses-degree", "2"][..],
        &["--ring-degree", "2"][..],
        &["--ulysses-degree", "2", "--ring-degree", "2"][..],
    ]
    .into_iter()
    .enumerate()
    {
        let mut args = vec!["--pipefusion-degree", "2"];
        args.extend_from_slice(sp);
        let got = run(&args, &format!("pf-sp{i}.safetensors"));
        let e = rel_l2(&got, &pf);
        eprintln!("PipeFusion x {sp:?}: relative L2 {e:.3e} vs PipeFusion");
        assert!(
            e <= 1e-5,
            "PipeFusion x {sp:?} vs PipeFusion: relative L2 {e:.3e}"
        );
    }

    // A topology that leaves the pipeline degree to its default follows --ring-degree.
    let topo = two_device_demo_topology(&dir);
    let labels = demo_labels();
    let mut args = vec!["--topology", topo.to_str().unwrap(), "--ring-degree", "2"];
    args.extend(labels.iter().map(String::as_str));
    let e = rel_l2(&run(&args, "file.safetensors"), &one);
    assert!(e <= 1e-5, "ring from a file: relative L2 {e:.3e}");
    // The demo with only --cfg-degree 2 runs one stage per group (2 devices).
    let o = pipefuse(&["generate", "--cfg-degree", "2", "--steps", "2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("1 stage(s) x 2 CFG groups"), "{err}");

    let o = pipefuse(&["generate", "--ulysses-degree", "3"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("must divide the model's 4 attention heads"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
