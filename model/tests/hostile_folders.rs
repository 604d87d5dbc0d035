//! Model folders that point outside themselves or at files that are not files (issue 16 groups
//! 6 and 7): a shard index naming `../../..` or an absolute path is refused naming the field; a
//! config, index or shard that is a FIFO or a directory is refused at once (reading a FIFO would
//! block forever), never followed.

mod common;

use std::path::{Path, PathBuf};

use common::fixtures;
use kernels::Device;
use model::{ModelConfig, Transformer};

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pipefuse-hostile-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn mkfifo(p: &Path) -> bool {
    std::process::Command::new("mkfifo")
        .arg(p)
        .status()
        .is_ok_and(|s| s.success())
}

fn index_naming(dir: &Path, shard: &str) {
    let src = fixtures().join("dit_tiny_sharded");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let text = std::fs::read_to_string(src.join("diffusion_pytorch_model.safetensors.index.json"))
        .unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (_, f) in v["weight_map"].as_object_mut().unwrap() {
        *f = serde_json::Value::String(shard.to_string());
    }
    std::fs::write(
        dir.join("diffusion_pytorch_model.safetensors.index.json"),
        v.to_string(),
    )
    .unwrap();
}

#[test]
fn shard_paths_are_confined_to_the_model_folder() {
    for (i, shard) in [
        "../../../../etc/passwd",
        "/etc/passwd",
        "sub/../x.safetensors",
    ]
    .into_iter()
    .enumerate()
    {
        let dir = scratch(&format!("index{i}"));
        index_naming(&dir, shard);
        let e = Transformer::load(&dir, None, Device::cpu(1).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("weight_map.") && e.contains("not a file name inside the model folder"),
            "{shard}: {e}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn fifos_and_directories_are_refused_at_once() {
    let dir = scratch("fifo");
    // config.json as a FIFO: refused, not read (which would block forever).
    if mkfifo(&dir.join("config.json")) {
        let e = ModelConfig::from_dir(&dir).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        std::fs::remove_file(dir.join("config.json")).unwrap();
    }
    // config.json as a folder.
    std::fs::create_dir(dir.join("config.json")).unwrap();
    let e = ModelConfig::from_dir(&dir).unwrap_err().to_string();
    assert!(e.contains("a directory"), "{e}");
    std::fs::remove_dir(dir.join("config.json")).unwrap();
    // A shard that is a FIFO.
    index_naming(&dir, "shard.safetensors");
    if mkfifo(&dir.join("shard.safetensors")) {
        let e = Transformer::load(&dir, None, Device::cpu(1).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
