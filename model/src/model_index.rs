//! [`ModelIndex`]: a diffusers pipeline folder's `model_index.json`, which names the pipeline
//! class. The runtime reads the transformer, scheduler and VAE from their own folders; the index
//! is checked so that a folder of another kind of pipeline (or a broken index) is refused naming
//! the file, not run as if it were one of ours.

use std::collections::BTreeMap;
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
    /// Class names to class ids, from `id2label` (class-conditional pipelines such as
    /// `DiTPipeline`), built the way diffusers' `DiTPipeline` does: each label value may hold
    /// several comma-separated names for its id, each trimmed. Empty when there is no `id2label`.
    pub labels: BTreeMap<String, usize>,
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
        let labels = match v.get("id2label") {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(map) => labels(map, path)?,
        };
        Ok(ModelIndex { class_name, labels })
    }

    /// The class ids of `names` (diffusers' `DiTPipeline.get_label_ids`); an unknown name is an
    /// error listing the known ones.
    pub fn label_ids(&self, names: &[&str]) -> std::result::Result<Vec<usize>, String> {
        names
            .iter()
            .map(|n| {
                self.labels.get(n.trim()).copied().ok_or_else(|| {
                    let known: Vec<&str> = self.labels.keys().map(String::as_str).collect();
                    format!(
                        "`{n}` is not a label of this model; known labels: {}",
                        known.join(", ")
                    )
                })
            })
            .collect()
    }
}

/// `id2label` (`{"0": "tench, Tinca tinca", ...}`) inverted: every comma-separated name to its id.
fn labels(map: &Value, path: &Path) -> Result<BTreeMap<String, usize>> {
    let bad = |why: String| ModelError::config(path, "id2label", why);
    let Value::Object(map) = map else {
        return Err(bad("must be an object of class id -> label names".into()));
    };
    let mut out = BTreeMap::new();
    for (id, names) in map {
        let id: usize = id.parse().map_err(|_| {
            bad(format!(
                "key `{id}` is not a class id (a non-negative integer)"
            ))
        })?;
        let Value::String(names) = names else {
            return Err(bad(format!(
                "the value of `{id}` is not a string of label names"
            )));
        };
        for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            out.insert(name.to_string(), id);
        }
    }
    Ok(out)
}
