//! Non-finite and absurd inputs are refused naming the flag, file, tensor and element (issue 16
//! group 5): `--latents` holding NaN, inf or 3e38, `--guidance-scale inf` / `nan` / negative.

mod common;

use common::pipefuse;

fn write_latents(path: &std::path::Path, values: &[f32]) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    // The demo model's latent: [B, 1, 16, 16] pixels (pixel space).
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1, 1, 16, 16], &bytes)
            .unwrap();
    safetensors::serialize_to_file([("latents", view)], None, path).unwrap();
}

#[test]
fn non_finite_inputs_are_refused_naming_where() {
    let dir = std::env::temp_dir().join(format!("pipefuse-badvalues-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (tag, bad) in [("nan", f32::NAN), ("inf", f32::INFINITY), ("huge", 3e38)] {
        let mut v = vec![0.5f32; 256];
        v[17] = bad;
        let p = dir.join(format!("{tag}.safetensors"));
        write_latents(&p, &v);
        let o = pipefuse(&[
            "generate",
            "--class-label",
            "3",
            "--steps",
            "1",
            "--latents",
            p.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{tag}: {err}");
        assert!(
            err.contains("`latents` element 17") && err.contains("finite"),
            "{tag}: {err}"
        );
    }
    for scale in ["inf", "NaN", "-2"] {
        let flag = format!("--guidance-scale={scale}");
        let o = pipefuse(&["generate", "--class-label", "3", "--steps", "1", &flag]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("--guidance-scale"),
            "{scale}: {err}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Flags that used to be taken silently (issue 16 groups 2 and 8): `--png-scale 0` acted as 1,
/// `--png-scale 100000` aborted allocating the grid, `bench forward --threads 0` ran.
#[test]
fn zero_and_absurd_scales_and_thread_counts_are_refused() {
    let png = std::env::temp_dir().join(format!("pipefuse-badscale-{}.png", std::process::id()));
    for scale in ["0", "100000"] {
        let o = pipefuse(&[
            "generate",
            "--class-label",
            "3",
            "--steps",
            "1",
            "--png-scale",
            scale,
            "--out",
            png.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("--png-scale"),
            "{scale}: {err}"
        );
        assert!(
            !err.contains("step 1/"),
            "refused before any compute: {err}"
        );
        assert!(!png.exists(), "nothing written");
    }
    // --threads: 0 ran, 100000 spawned them all, 4294967296 failed after 53 s with EAGAIN
    // (issue 16 groups 6 and 8); all are refused by the flag's parser (exit 2).
    for (command, value) in [
        (&["bench", "forward", "--preset", "DiT-S/2"][..], "0"),
        (&["bench", "forward", "--preset", "DiT-S/2"][..], "100000"),
        (&["generate"][..], "4294967296"),
        (&["generate"][..], "100000"),
        (&["bench", "pipeline"][..], "2000"),
    ] {
        let mut args = command.to_vec();
        args.extend(["--threads", value]);
        let o = pipefuse(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("--threads") && err.contains("1 to 1024"),
            "{args:?}: {err}"
        );
    }
}

/// The CLI's bound on threads is the kernels' and the topology's.
#[test]
fn thread_bounds_agree() {
    assert_eq!(
        kernels::CpuDevice::MAX_THREADS,
        topology::DeviceSpec::MAX_CPU_THREADS
    );
    assert!(kernels::Device::cpu(kernels::CpuDevice::MAX_THREADS + 1).is_err());
}

/// Flags a `launch` would ignore are refused (issue 16 group 8): request flags or --serve on a
/// node that is not the coordinator, request flags given to a server, --join-timeout 0.
#[test]
fn launch_refuses_flags_it_would_ignore() {
    let topo = common::root().join("examples/topologies/three-nodes-local.toml");
    let topo = topo.to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (
            &["--node", "n1", "--serve", "--out", "x.png"],
            "--out --serve: node n1 is not the coordinator (n0)",
        ),
        (
            &["--node", "n2", "--class-label", "3"],
            "--class-label: node n2 is not the coordinator (n0)",
        ),
        (
            &["--local", "--serve", "--class-label", "3", "--steps", "4"],
            "--class-label --steps: --serve takes its requests from `generate --attach` clients",
        ),
        (&["--local", "--join-timeout", "0"], "--join-timeout 0"),
    ];
    for (args, want) in cases {
        let mut all = vec!["launch", "--topology", topo];
        all.extend(args);
        let o = pipefuse(&all);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{all:?}: {err}");
        assert!(err.contains(want), "{all:?}: stderr lacks `{want}`: {err}");
    }
}
