//! Typed access to the fields of a diffusers JSON config, with errors naming file and field.
//! A field that is absent or `null` takes the given default (diffusers' class default).

use std::path::Path;

use serde_json::Value;

use crate::error::{ModelError, Result};

pub(crate) struct Fields<'a> {
    pub(crate) v: &'a Value,
    pub(crate) path: &'a Path,
}

impl Fields<'_> {
    fn get(&self, k: &str) -> Option<&Value> {
        self.v.get(k).filter(|v| !v.is_null())
    }
    fn bad(&self, k: &str, want: &str) -> ModelError {
        ModelError::config(self.path, k, format!("expected {want}, got {}", self.v[k]))
    }
    pub(crate) fn str(&self, k: &str, d: &str) -> Result<String> {
        self.get(k).map_or(Ok(d.into()), |v| {
            v.as_str()
                .map(String::from)
                .ok_or_else(|| self.bad(k, "a string"))
        })
    }
    pub(crate) fn bool(&self, k: &str, d: bool) -> Result<bool> {
        self.get(k).map_or(Ok(d), |v| {
            v.as_bool().ok_or_else(|| self.bad(k, "true or false"))
        })
    }
    pub(crate) fn opt_usize(&self, k: &str) -> Result<Option<usize>> {
        self.get(k)
            .map(|v| {
                v.as_u64()
                    .map(|x| x as usize)
                    .ok_or_else(|| self.bad(k, "a non-negative integer"))
            })
            .transpose()
    }
    pub(crate) fn usize(&self, k: &str, d: usize) -> Result<usize> {
        Ok(self.opt_usize(k)?.unwrap_or(d))
    }
    pub(crate) fn opt_f64(&self, k: &str) -> Result<Option<f64>> {
        self.get(k)
            .map(|v| v.as_f64().ok_or_else(|| self.bad(k, "a number")))
            .transpose()
    }
    pub(crate) fn f64(&self, k: &str, d: f64) -> Result<f64> {
        Ok(self.opt_f64(k)?.unwrap_or(d))
    }
}

impl Fields<'_> {
    /// A required field: absent or `null` is an error naming it.
    pub(crate) fn require(&self, k: &str, why: &str) -> Result<()> {
        match self.get(k) {
            Some(_) => Ok(()),
            None => Err(ModelError::config(self.path, k, format!("missing ({why})"))),
        }
    }
    pub(crate) fn opt_usize_list(&self, k: &str) -> Result<Option<Vec<usize>>> {
        self.get(k)
            .map(|v| {
                v.as_array()
                    .and_then(|a| {
                        a.iter()
                            .map(|x| x.as_u64().map(|x| x as usize))
                            .collect::<Option<Vec<_>>>()
                    })
                    .ok_or_else(|| self.bad(k, "a list of non-negative integers"))
            })
            .transpose()
    }
    pub(crate) fn opt_str_list(&self, k: &str) -> Result<Option<Vec<String>>> {
        self.get(k)
            .map(|v| {
                v.as_array()
                    .and_then(|a| {
                        a.iter()
                            .map(|x| x.as_str().map(String::from))
                            .collect::<Option<Vec<_>>>()
                    })
                    .ok_or_else(|| self.bad(k, "a list of strings"))
            })
            .transpose()
    }
}
