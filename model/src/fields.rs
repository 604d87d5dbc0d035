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
    /// A finite number. JSON numbers are always finite (serde_json refuses `1e400`); Python's
    /// bare `NaN` / `Infinity` / `-Infinity`, which `json.dump` writes and
    /// [`python_json`] turns into strings, are refused here naming the field.
    pub(crate) fn opt_f64(&self, k: &str) -> Result<Option<f64>> {
        self.get(k)
            .map(|v| match v {
                Value::String(s) if NON_FINITE.contains(&s.as_str()) => Err(ModelError::config(
                    self.path,
                    k,
                    format!(
                        "{s} is not a finite number; give a finite value or null (the default)"
                    ),
                )),
                _ => v
                    .as_f64()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| self.bad(k, "a number")),
            })
            .transpose()
    }
    pub(crate) fn f64(&self, k: &str, d: f64) -> Result<f64> {
        Ok(self.opt_f64(k)?.unwrap_or(d))
    }
    /// A finite number > 0.
    pub(crate) fn positive_f64(&self, k: &str, d: f64) -> Result<f64> {
        let x = self.f64(k, d)?;
        if x > 0.0 {
            Ok(x)
        } else {
            Err(ModelError::config(
                self.path,
                k,
                format!("{x} is out of range; values that work: a finite number > 0"),
            ))
        }
    }
    /// A non-negative integer in `lo..=hi`.
    pub(crate) fn usize_in(&self, k: &str, d: usize, lo: usize, hi: usize) -> Result<usize> {
        let x = self.usize(k, d)?;
        in_range(self.path, k, x, lo, hi, "")?;
        Ok(x)
    }
}

/// The non-finite values Python's `json.dump` writes as bare words (not JSON).
const NON_FINITE: [&str; 3] = ["NaN", "Infinity", "-Infinity"];

/// Python-written JSON: the bare words `NaN`, `Infinity` and `-Infinity` outside strings (what
/// `json.dump` writes for non-finite floats, e.g. a scheduler's `lambda_min_clipped`) become the
/// strings `"NaN"`, `"Infinity"`, `"-Infinity"`, so that the text parses and each field decides
/// what a non-finite value means: [`Fields::opt_f64`] refuses it naming the field.
pub(crate) fn python_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let (mut in_str, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_str {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_str = false,
                _ => {}
            }
        } else if c == '"' {
            in_str = true;
        } else if let Some(w) = NON_FINITE.iter().find(|w| rest.starts_with(**w)) {
            out.push('"');
            out.push_str(w);
            out.push('"');
            rest = &rest[w.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// The widest hidden size, channel count, embedding width or latent side a config may state:
/// 16x the widest released model's (Flux.1: hidden 3072, T5 4096), and small enough that every
/// size the runtime computes from them (`hidden^2 x 12 x 4` bytes per block, token counts)
/// fits in 64 bits.
pub(crate) const MAX_WIDTH: usize = 1 << 16;
/// The most transformer blocks a config may state (released models have <= 57).
pub(crate) const MAX_LAYERS: usize = 10_000;

/// Errors unless `lo <= v <= hi`; `why` (may be empty) is appended to the message.
pub(crate) fn in_range(
    path: &Path,
    field: &str,
    v: usize,
    lo: usize,
    hi: usize,
    why: &str,
) -> Result<()> {
    if (lo..=hi).contains(&v) {
        return Ok(());
    }
    Err(ModelError::config(
        path,
        field,
        format!("{v} is out of range; values that work: {lo}..={hi}{why}"),
    ))
}

/// `heads x head_dim`, each in `1..=MAX_WIDTH` and their product too (checked: a product that
/// overflows is refused, never wrapped).
pub(crate) fn hidden_size(path: &Path, heads: usize, head_dim: usize) -> Result<usize> {
    in_range(path, "num_attention_heads", heads, 1, MAX_WIDTH, "")?;
    in_range(path, "attention_head_dim", head_dim, 1, MAX_WIDTH, "")?;
    match heads.checked_mul(head_dim) {
        Some(d) if d <= MAX_WIDTH => Ok(d),
        _ => Err(ModelError::config(
            path,
            "attention_head_dim",
            format!(
                "the hidden size num_attention_heads x attention_head_dim = {heads} x {head_dim} \
                 is over {MAX_WIDTH}; values that work: a product in 1..={MAX_WIDTH}"
            ),
        )),
    }
}

/// The latent side and patch size: `sample_size` in `1..=MAX_WIDTH`, `patch_size` >= 1 and
/// dividing it (diffusers' position grid is `sample_size / patch_size` tokens a side).
pub(crate) fn sample_and_patch(path: &Path, sample: usize, patch: usize) -> Result<()> {
    in_range(path, "sample_size", sample, 1, MAX_WIDTH, "")?;
    #[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; the MSRV is 1.85
    if patch == 0 || patch > sample || sample % patch != 0 {
        let divisors: Vec<String> = (1..=sample)
            .filter(|p| sample % p == 0)
            .take(8)
            .map(|p| p.to_string())
            .collect();
        return Err(ModelError::config(
            path,
            "patch_size",
            format!(
                "{patch} does not divide sample_size {sample} (the latent side); values that \
                 work: {}{}",
                divisors.join(", "),
                if divisors.len() == 8 { ", ..." } else { "" }
            ),
        ));
    }
    Ok(())
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
