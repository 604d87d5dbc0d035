//! Sizes that cannot fit are refused before anything of their size is allocated (issue 16
//! group 2): each command runs under an address-space limit (`ulimit -v`, 3 GB) so that the
//! outcome does not depend on this machine's RAM, and must end with exit 1 and an error naming the
//! flag and the figures, never "memory allocation of N bytes failed" (SIGABRT, exit 134). The
//! demo request itself still runs under the same limit.

mod common;

use std::process::{Command, Output};

use common::bin;

const LIMIT_KIB: u64 = 3_000_000;

fn limited(args: &[&str]) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {LIMIT_KIB} && exec \"$0\" \"$@\""))
        .arg(bin())
        .args(args)
        .output()
        .expect("sh runs")
}

fn refused(args: &[&str], names: &[&str]) {
    let o = limited(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
    assert!(!err.contains("memory allocation"), "{args:?}: {err}");
    for n in names {
        assert!(err.contains(n), "{args:?}: no `{n}` in: {err}");
    }
}

#[test]
fn image_sizes_beyond_memory_are_refused_naming_the_flags() {
    let save = std::env::temp_dir().join(format!("pipefuse-mem-{}.st", std::process::id()));
    let save = save.to_str().unwrap();
    for (h, w) in [
        ("4000", "4000"),
        ("100000", "100000"),
        ("1000000", "1000000"),
        ("4294967296", "64"),
    ] {
        refused(
            &[
                "generate",
                "--height",
                h,
                "--width",
                w,
                "--steps",
                "1",
                "--save-latent",
                save,
            ],
            &["--height", "not enough memory", "ulimit -v"],
        );
    }
    // Sizes whose products overflow 64 bits are refused too, not wrapped.
    let huge = "18446744073709551614";
    refused(
        &[
            "generate", "--height", huge, "--width", huge, "--steps", "1",
        ],
        &["--height", "2^64"],
    );
    // 20,000 images of the demo's 16 x 16 pixels.
    let mut args = vec!["generate", "--steps", "1"];
    for _ in 0..20_000 {
        args.extend(["--class-label", "3"]);
    }
    refused(&args, &["20000 --class-label", "not enough memory"]);
    assert!(!std::path::Path::new(save).exists(), "nothing written");
}

#[test]
fn bench_sizes_beyond_memory_are_refused_naming_the_flags() {
    refused(
        &["bench", "forward", "--resolution", "100000"],
        &["--resolution 100000", "needs about"],
    );
    refused(
        &["bench", "forward", "--batch", "100000"],
        &["--batch 100000", "needs about"],
    );
    refused(
        &[
            "bench",
            "forward",
            "--preset",
            "PixArt-alpha-512",
            "--caption-tokens",
            "100000000",
        ],
        &["--caption-tokens 100000000", "needs about"],
    );
    refused(
        &["bench", "forward", "--preset", "Flux.1-dev"],
        &["weights", "--layers"],
    );
    refused(
        &["bench", "transport", "--sizes-mib", "100000"],
        &["--sizes-mib 100000"],
    );
}

#[test]
fn the_demo_request_fits_under_the_same_limit() {
    let o = limited(&["generate", "--steps", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn a_model_whose_default_size_cannot_fit_is_refused_naming_sample_size() {
    let dir = std::env::temp_dir().join(format!("pipefuse-bigsample-{}", std::process::id()));
    let src = common::root().join("actors/tests/fixtures/dit_pf");
    copy_dir(&src, &dir);
    let cfg = dir.join("transformer/config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        // The largest size the config check admits (1000000 is refused there, naming the range).
        text.replace("\"sample_size\": 16", "\"sample_size\": 65536"),
    )
    .unwrap();
    refused(
        &[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--class-label",
            "1",
            "--steps",
            "1",
        ],
        &["sample_size 65536", "not enough memory"],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// A model whose weights cannot fit is refused before any device loads its slice, naming the
/// figure (SD3.5-Large: about 34 GiB in f32; DiT-XL/2 on two Ulysses ranks, each holding it all).
#[test]
fn weights_beyond_memory_are_refused_before_loading() {
    let dir = common::scratch_dir("bigweights");
    for (preset, extra, devices, format) in [
        ("SD3.5-Large", "", "{ kind = \"cpu\" }", "of weights (f32)"),
        (
            "DiT-XL/2",
            "[parallel]\nulysses_degree = 2\n",
            "{ kind = \"cpu\" }, { kind = \"cpu\" }",
            "of weights (f32)",
        ),
        (
            "SD3.5-Large",
            "",
            "{ kind = \"cpu\", dtype = \"bf16\" }",
            // Without a bf16 kernel (AMX, AVX512-BF16) a bf16 device keeps its weights in f32.
            match kernels::bf16_weight_bytes() {
                2 => "of weights (linear layers in bf16, the rest f32)",
                _ => "of weights (f32)",
            },
        ),
    ] {
        let topo = dir.join("big.toml");
        std::fs::write(
            &topo,
            format!(
                "coordinator = \"n0\"\n[model]\npreset = \"{preset}\"\n{extra}\
                 [[nodes]]\nname = \"n0\"\ndevices = [{devices}]\n"
            ),
        )
        .unwrap();
        refused(
            &[
                "generate",
                "--topology",
                topo.to_str().unwrap(),
                "--steps",
                "1",
                "--save-latent",
                dir.join("x.st").to_str().unwrap(),
            ],
            &["not enough memory", format, "ulimit -v"],
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
