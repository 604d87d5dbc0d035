//! Writing an output file the way a user expects (issue 16): a regular file (or a new one) is
//! replaced atomically (a temporary file in the same folder, written, flushed and synced, then
//! renamed over it); a symbolic link is followed, never replaced; a character device such as
//! `/dev/null` or `/dev/stdout` is written through in place; a FIFO, a directory or a socket is
//! refused (a FIFO with no reader would hang the run). Every write, flush and sync is checked, so
//! `/dev/full` is an error, not a silent loss.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// What kind of target `path` is, after following symbolic links.
enum Target {
    /// Absent, or a regular file: replaced atomically at this (resolved) path.
    Replace(PathBuf),
    /// A character device: written through.
    Device,
}

fn target(path: &Path, flag: &str) -> Result<Target> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A dangling symbolic link would be replaced by the rename: refuse it.
            if std::fs::symlink_metadata(path).is_ok() {
                bail!(
                    "{flag} {}: a symbolic link to a missing file; give the file itself",
                    path.display()
                );
            }
            Ok(Target::Replace(path.to_path_buf()))
        }
        Err(e) => Err(e).with_context(|| format!("{flag} {}", path.display())),
        Ok(m) => {
            let t = m.file_type();
            if t.is_file() {
                // Replace the link's target, not the link.
                let resolved = std::fs::canonicalize(path)
                    .with_context(|| format!("{flag} {}", path.display()))?;
                Ok(Target::Replace(resolved))
            } else if t.is_char_device() {
                Ok(Target::Device)
            } else {
                let kind = if t.is_dir() {
                    "a directory"
                } else if t.is_fifo() {
                    "a FIFO (with no reader the run would hang)"
                } else if t.is_socket() {
                    "a socket"
                } else {
                    "not a regular file"
                };
                bail!("{flag} {}: {kind}; give a file name", path.display())
            }
        }
    }
}

/// Checks, before any compute, that `path` can be written as `flag`'s output: its kind (see the
/// module documentation), and for a file that its folder exists and takes a new file.
pub(crate) fn check_writable(path: &Path, flag: &str) -> Result<()> {
    match target(path, flag)? {
        Target::Device => {
            OpenOptions::new().write(true).open(path).with_context(|| {
                format!("{flag} {}: cannot open it for writing", path.display())
            })?;
        }
        Target::Replace(p) => {
            let folder = folder_of(&p);
            if !folder.is_dir() {
                bail!("{flag} {}: the folder does not exist", path.display());
            }
            let probe = temp_name(&p, "probe");
            File::create(&probe).with_context(|| {
                format!(
                    "{flag} {}: cannot create a file in {}",
                    path.display(),
                    folder.display()
                )
            })?;
            std::fs::remove_file(&probe).ok();
        }
    }
    Ok(())
}

fn folder_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn temp_name(p: &Path, tag: &str) -> PathBuf {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    folder_of(p).join(format!(".{name}.pipefuse-{tag}-{}", std::process::id()))
}

/// Writes `bytes` to `path` (`flag` names the option in errors).
pub(crate) fn write_output(path: &Path, bytes: &[u8], flag: &str) -> Result<()> {
    let err = |what: &str| format!("{flag} {}: {what}", path.display());
    match target(path, flag)? {
        Target::Device => {
            let mut f = OpenOptions::new()
                .write(true)
                .open(path)
                .with_context(|| err("cannot open it for writing"))?;
            f.write_all(bytes).with_context(|| err("write failed"))?;
            f.flush().with_context(|| err("flush failed"))?;
        }
        Target::Replace(p) => {
            let tmp = temp_name(&p, "tmp");
            let written = (|| -> std::io::Result<()> {
                let mut f = File::create(&tmp)?;
                f.write_all(bytes)?;
                f.flush()?;
                f.sync_all()
            })();
            if let Err(e) = written {
                std::fs::remove_file(&tmp).ok();
                return Err(e).with_context(|| err("write failed (nothing was replaced)"));
            }
            std::fs::rename(&tmp, &p).map_err(|e| {
                std::fs::remove_file(&tmp).ok();
                anyhow::Error::new(e).context(err("cannot move the new file into place"))
            })?;
        }
    }
    Ok(())
}
