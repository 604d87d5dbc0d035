//! The crate's one error type.

use std::fmt;
use std::path::PathBuf;

/// Result with [`TopologyError`].
pub type Result<T, E = TopologyError> = std::result::Result<T, E>;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TopologyError {
    /// Reading a topology file failed.
    #[error("cannot read {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A mistake in a topology (file or struct): where, which field, what is wrong, and a hint.
    #[error("{}", Located { file, line: *line, field, message, hint: hint.as_deref() })]
    Invalid {
        /// The file (or `<struct>` / `<command line>` when not from a file).
        file: String,
        /// 1-based line in the file, when known.
        line: Option<usize>,
        /// The field, as a TOML path (`parallel.num_patches`, `nodes[1].devices[0].threads`).
        field: String,
        /// What is wrong.
        message: String,
        /// How to fix it.
        hint: Option<String>,
    },
    /// A request whose sizes cannot be planned: a per-step activation of more than 2^64 bytes.
    #[error("the request's sizes overflow: {0}")]
    Overflow(String),
    /// An event that does not fit a stage's schedule (a duplicate or unknown input, a completion
    /// for work that was not launched): a bug or a misbehaving peer, never ignored.
    #[error("stage {stage}: {message}")]
    Schedule {
        /// The stage whose schedule refused the event.
        stage: usize,
        /// What was wrong.
        message: String,
    },
}

struct Located<'a> {
    file: &'a str,
    line: Option<usize>,
    field: &'a str,
    message: &'a str,
    hint: Option<&'a str>,
}

impl fmt::Display for Located<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(
                f,
                "{}:{line}: `{}`: {}",
                self.file, self.field, self.message
            )?,
            None => write!(f, "{}: `{}`: {}", self.file, self.field, self.message)?,
        }
        if let Some(h) = self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}
