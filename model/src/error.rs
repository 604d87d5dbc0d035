//! The model crate's error type: every variant names the file, field or tensor at fault.

use std::path::PathBuf;

/// Result alias of the model crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// Everything loading or running a model can refuse.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A JSON file is not valid JSON.
    #[error("{path}: invalid JSON at line {line}: {msg}")]
    Json {
        /// The file.
        path: PathBuf,
        /// Line of the syntax error.
        line: usize,
        /// What the parser said.
        msg: String,
    },
    /// A config field is missing, of the wrong type or unsupported.
    #[error("{path}: field `{field}`: {msg}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// The field.
        field: String,
        /// What is wrong, with a hint.
        msg: String,
    },
    /// A safetensors file is malformed.
    #[error("{path}: not a valid safetensors file: {msg}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        msg: String,
    },
    /// A weight the model needs is not in the checkpoint.
    #[error("tensor `{name}` not found in {path}")]
    MissingTensor {
        /// Tensor name.
        name: String,
        /// The file searched: the weight file, or the shard index when the name is not in it.
        path: PathBuf,
    },
    /// A weight has the wrong shape for the config.
    #[error("{path}: tensor `{name}` has shape {got:?}, the config implies {expected:?}")]
    TensorShape {
        /// The file.
        path: PathBuf,
        /// Tensor name.
        name: String,
        /// Shape implied by config.json.
        expected: Vec<usize>,
        /// Shape in the file.
        got: Vec<usize>,
    },
    /// A weight holds NaN or an infinity (a corrupt or overflowed checkpoint).
    #[error(
        "{path}: tensor `{name}` holds {value} at element {index}; weights must be finite \
         (a corrupt or overflowed checkpoint: re-export it)"
    )]
    NonFiniteWeight {
        /// The file.
        path: PathBuf,
        /// Tensor name.
        name: String,
        /// Flat index of the first non-finite element.
        index: usize,
        /// That element.
        value: f32,
    },
    /// A JSON file holds something other than an object of fields.
    #[error("{path}: the file holds a JSON {found}, expected an object of fields ({{\"_class_name\": ...}})")]
    NotAnObject {
        /// The file.
        path: PathBuf,
        /// What it holds: an array, a string, a number, ...
        found: &'static str,
    },
    /// A weight has an element type the loader does not read.
    #[error("{path}: tensor `{name}` has dtype {dtype}; supported: F32, F16, BF16")]
    UnsupportedDType {
        /// The file.
        path: PathBuf,
        /// Tensor name.
        name: String,
        /// The dtype in the file.
        dtype: String,
    },
    /// A request input does not fit the model.
    #[error("invalid input: {0}")]
    Input(String),
    /// A kernel refused its operands.
    #[error(transparent)]
    Kernel(#[from] kernels::KernelError),
    /// A sequence-parallel exchange with another rank failed.
    #[error("sequence-parallel rank {rank}: {message}")]
    Collective {
        /// This rank.
        rank: usize,
        /// What failed (names the peer rank).
        message: String,
    },
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn config(path: impl Into<PathBuf>, field: &str, msg: impl Into<String>) -> Self {
        ModelError::Config {
            path: path.into(),
            field: field.to_string(),
            msg: msg.into(),
        }
    }
}

/// Reads and parses a JSON file holding an object, with errors that name the file and line.
pub(crate) fn read_json(path: &std::path::Path) -> Result<serde_json::Value> {
    regular_file(path, "a JSON file")?;
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    let v = serde_json::from_str(&text).map_err(|e| ModelError::Json {
        path: path.to_path_buf(),
        line: e.line(),
        msg: e.to_string(),
    })?;
    json_object(&v, path)?;
    Ok(v)
}

/// Errors unless `v` is a JSON object: a config that is an array or a number would otherwise
/// read as an object with every field absent (all defaults) and fail later naming nothing.
pub(crate) fn json_object(v: &serde_json::Value, path: &std::path::Path) -> Result<()> {
    use serde_json::Value;
    let found = match v {
        Value::Object(_) => return Ok(()),
        Value::Array(_) => "array",
        Value::String(_) => "string",
        Value::Number(_) => "number",
        Value::Bool(_) => "boolean",
        Value::Null => "null",
    };
    Err(ModelError::NotAnObject {
        path: path.to_path_buf(),
        found,
    })
}

/// Errors unless `path` is a regular file (after following links): reading a FIFO would block
/// forever, a folder gives the OS's "Is a directory" or, memory-mapped, "No such device".
/// `expected` says what the file should be ("a .safetensors file").
pub(crate) fn regular_file(path: &std::path::Path, expected: &str) -> Result<()> {
    let m = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
    if m.is_file() {
        return Ok(());
    }
    let kind = if m.is_dir() {
        "is a directory"
    } else {
        "is not a regular file (a FIFO, socket or device)"
    };
    Err(ModelError::io(
        path,
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{kind}, expected {expected}"),
        ),
    ))
}
