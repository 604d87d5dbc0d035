//! `pipefuse devices` and `--device cuda` on a machine without a usable GPU (this build, or no
//! driver): a clear error and a non-zero exit, never a panic (issue 11's first step; on a GPU
//! machine with the `cuda` feature the list is printed instead).

mod common;

use common::{pipefuse, root};

#[test]
fn devices_lists_the_cpu_and_says_why_there_is_no_gpu() {
    let o = pipefuse(&["devices"]);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(out.starts_with("cpu: ") && out.contains("cores"), "{out}");
    assert!(!err.contains("panicked"), "{err}");
    if !o.status.success() {
        assert!(err.contains("no CUDA device: "), "{err}");
    } else {
        assert!(out.contains("cuda:0 "), "{out}");
    }
}

#[test]
fn a_cuda_device_that_cannot_run_is_a_clear_error() {
    let gpu = pipefuse(&["devices"]).status.success();
    let o = pipefuse(&["generate", "--device", "cuda", "--steps", "1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    if gpu {
        // With a GPU the demo model runs on it (the prepared GPU check compares the result).
        assert!(o.status.success(), "{err}");
    } else {
        assert!(
            !o.status.success(),
            "no GPU here, yet --device cuda succeeded"
        );
        assert!(err.contains("CUDA device 0 requested: "), "{err}");
    }
    let topo = root().join("examples/topologies/local_2cpu.toml");
    let o = pipefuse(&[
        "generate",
        "--device",
        "cuda",
        "--topology",
        topo.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("names its devices itself"),
        "{err}"
    );
}

#[test]
fn f16_is_refused_for_cpu_devices() {
    let o = pipefuse(&["generate", "--dtype", "f16", "--steps", "1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "f16 on a cpu device was accepted");
    assert!(
        err.contains("devices[0].dtype") && err.contains("f16 is for cuda devices"),
        "{err}"
    );
}
