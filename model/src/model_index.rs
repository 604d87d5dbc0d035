//! [`ModelIndex`]: a diffusers pipeline folder's `model_index.json`, which names the pipeline
//! class. The runtime reads the transformer, scheduler and VAE from their own folders; the index
//! is checked so that a folder of another kind of pipeline (or a broken index) is refused naming
//! the file, not run as if it were one of ours.

use std::path::Path;

use serde_json::Value;

use crate::error::{read_json, ModelError, Result};
use crate::fields::Fields;

/// The pipeline classes whose folders this runtime runs (their transformers are the families of
/// [`crate::Arch`]).
pub const KNOWN_PIPELINES: &[&str] = &[
    "DiTPipeline",
    "PixArtAlphaPipeline",
    "PixArtSigmaPipeline",
    "StableDiffusion3Pipeline",
    "FluxPipeline",
];

/// What the runtime takes from a `model_index.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelIndex {
    /// `_class_name`: one of [`KNOWN_PIPELINES`].
    pub class_name: String,
}

impl ModelIndex {
    /// Reads and checks `path` (a `model_index.json`): valid JSON, an object, and a
    /// `_class_name` this runtime knows.
    pub fn from_file(path: &Path) -> Result<ModelIndex> {
        Self::from_json(&read_json(path)?, path)
    }

    /// Checks a parsed `model_index.json`; `path` is used in error messages.
    pub fn from_json(v: &Value, path: &Path) -> Result<ModelIndex> {
        crate::error::json_object(v, path)?;
        let f = Fields { v, path };
        f.require("_class_name", "the pipeline class, e.g. \"DiTPipeline\"")?;
        let class_name = f.str("_class_name", "")?;
        if !KNOWN_PIPELINES.contains(&class_name.as_str()) {
            return Err(ModelError::config(
                path,
                "_class_name",
                format!(
                    "`{class_name}` is not a pipeline this runtime runs; known: {}",
                    KNOWN_PIPELINES.join(", ")
                ),
            ));
        }
        Ok(ModelIndex { class_name })
    }
}
