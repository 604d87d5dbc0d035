//! Outputs never clobber what is not a regular file and never lose a write error (issue 16):
//! a symbolic link to a character device is written through (the link and the device stay), a
//! write that fails (`/dev/full`) is an error naming the flag, a FIFO or a directory is refused
//! before any compute (no hang), a regular file is replaced whole, and when one of two outputs
//! fails the other is still written.

mod common;

use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;

use common::pipefuse;

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pipefuse-out-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The demo model, 1 step, one digit: fast.
fn generate(extra: &[&str]) -> std::process::Output {
    let mut args = vec!["generate", "--steps", "1", "--class-label", "3"];
    args.extend_from_slice(extra);
    pipefuse(&args)
}

#[test]
fn special_targets_are_written_through_or_refused_never_replaced() {
    let dir = scratch("special");
    // A link to /dev/null: written through, the link stays a link to the device.
    let null = dir.join("null.safetensors");
    std::os::unix::fs::symlink("/dev/null", &null).unwrap();
    let o = generate(&["--save-latent", null.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = std::fs::symlink_metadata(&null).unwrap();
    assert!(m.file_type().is_symlink(), "the link was replaced");
    assert!(std::fs::metadata("/dev/null")
        .unwrap()
        .file_type()
        .is_char_device());
    // A link to /dev/full: the failed write is an error naming the flag, not "written".
    if std::path::Path::new("/dev/full").exists() {
        let full = dir.join("full.safetensors");
        std::os::unix::fs::symlink("/dev/full", &full).unwrap();
        let o = generate(&["--save-latent", full.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "a write to /dev/full must fail: {err}");
        assert!(
            err.contains("--save-latent") && err.contains("write failed"),
            "{err}"
        );
        assert!(!err.contains("final latent written"), "{err}");
        assert!(std::fs::symlink_metadata(&full)
            .unwrap()
            .file_type()
            .is_symlink());
    }
    // A FIFO and a directory are refused before any compute (a FIFO would hang the run).
    let fifo = dir.join("fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    if made.is_ok_and(|s| s.success()) {
        let o = generate(&["--save-latent", fifo.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("a FIFO"), "{err}");
        assert!(!err.contains("step"), "refused before any compute: {err}");
        assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
        // An input that is a FIFO is refused too (reading it would block forever).
        let o = generate(&["--latents", fifo.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("not a regular file"),
            "{err}"
        );
    }
    let o = generate(&["--save-latent", dir.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("a directory"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_regular_file_is_replaced_whole_and_one_failed_output_keeps_the_other() {
    let dir = scratch("regular");
    let latent = dir.join("latent.safetensors");
    std::fs::write(&latent, vec![7u8; 1 << 20]).unwrap(); // an older, larger file
    let full = dir.join("full.png");
    let have_full = std::path::Path::new("/dev/full").exists();
    if have_full {
        std::os::unix::fs::symlink("/dev/full", &full).unwrap();
    }
    let mut args = vec!["--save-latent", latent.to_str().unwrap()];
    if have_full {
        args.extend_from_slice(&["--out", full.to_str().unwrap()]);
    }
    let o = generate(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.success(), !have_full, "{err}");
    // The latent was written whole although the PNG failed.
    let bytes = std::fs::read(&latent).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("a complete safetensors file");
    assert_eq!(st.tensor("latent").unwrap().shape()[0], 1);
    assert!(bytes.len() < 1 << 20, "the old file's bytes are gone");
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".pipefuse-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind");
    if have_full {
        assert!(
            err.contains("--out") && err.contains("write failed"),
            "{err}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
