//! Helpers shared by the binary's end-to-end tests.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The model crate's golden fixtures.
pub fn fixtures() -> PathBuf {
    root().join("model/tests/fixtures")
}

/// Runs the `pipefuse` binary with `args`.
pub fn pipefuse(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pipefuse"))
        .args(args)
        .env_remove("PIPEFUSE_API_KEY")
        .output()
        .expect("binary runs")
}

/// The f32 values of tensor `name` in a safetensors file.
pub fn read_f32(path: &Path, name: &str) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor(name)
        .unwrap_or_else(|_| panic!("{} has no `{name}`", path.display()))
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// `||got - want|| / ||want||`.
pub fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// The path of the `pipefuse` binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_pipefuse")
}

/// The raw bytes of the `latent` tensor of a `--save-latent` file (for bitwise comparisons).
pub fn latent_bytes(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor("latent").unwrap().data().to_vec()
}

/// The demo model on `stages` local CPU devices x 1 thread (PipeFusion, `patches`, W = 1), in
/// one process: `request` flags, latent saved to `out`.
pub fn in_process_demo(stages: usize, patches: usize, request: &[String], out: &Path) {
    let (stages, patches) = (stages.to_string(), patches.to_string());
    let request: Vec<&str> = request.iter().map(String::as_str).collect();
    let flags = ["--pipefusion-degree", &stages, "--num-patches", &patches];
    in_process_demo_with(&flags, &request, out);
}

/// The demo model on local CPU devices x 1 thread with W = 1 and the parallel `flags`, in one
/// process: `request` flags, latent saved to `out`.
pub fn in_process_demo_with(flags: &[&str], request: &[&str], out: &Path) {
    let o = Command::new(bin())
        .args(["generate", "--model"])
        .arg(root().join("assets/digits-dit"))
        .args(flags)
        .args(["--warmup-steps", "1", "--threads", "1"])
        .args(request)
        .arg("--save-latent")
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// An empty scratch folder `pipefuse-{tag}-{pid}` under the system's temp folder.
pub fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pipefuse-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The text of `examples/topologies/{name}` with its relative model path (`model`, as the file
/// writes it) made absolute to `assets/digits-dit`, so a copy works from any folder.
pub fn example_topology_with_demo(name: &str, model: &str) -> String {
    std::fs::read_to_string(root().join("examples/topologies").join(name))
        .unwrap()
        .replace(model, root().join("assets/digits-dit").to_str().unwrap())
}

/// Sends SIGTERM to `child` and waits up to `limit` for it to exit (killed and a failed test
/// otherwise); its exit status.
pub fn terminate(
    child: &mut std::process::Child,
    limit: std::time::Duration,
) -> std::process::ExitStatus {
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let t0 = std::time::Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            panic!("the server did not stop on SIGTERM");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Copies the files of folder `from` into `to` (created), following symlinks: the fixtures share
/// weight files through them.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}
