//! TOML text -> [`ClusterSpec`]: syntax, unknown keys, types, required keys and defaults, with
//! the line of every field recorded. The tables of the format are read in `read/sections.rs`;
//! semantic checks live in `validate.rs`.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::ClusterSpec;
use crate::error::{Result, TopologyError};

mod sections;

use sections::TOP_KEYS;

type Value<'i> = Spanned<DeValue<'i>>;

/// Reads `text` into a spec (not yet validated).
pub(super) fn read(text: &str, file: &str, base_dir: Option<&Path>) -> Result<ClusterSpec> {
    let mut r = Reader {
        text,
        file,
        lines: BTreeMap::new(),
        newlines: text
            .bytes()
            .enumerate()
            .filter_map(|(i, b)| (b == b'\n').then_some(i))
            .collect(),
    };
    let root = DeTable::parse(text).map_err(|e| r.syntax(&e))?;
    let root = root.get_ref();
    r.keys(root, "", TOP_KEYS)?;

    let model = match root.get("model") {
        Some(v) => r.model(v, base_dir)?,
        None => {
            return Err(r.err(
                None,
                "model",
                "the [model] table is missing",
                "add `[model]` with `path = \"<diffusers folder>\"` or `preset = \"DiT-B/2\"`",
            ))
        }
    };
    let mut nodes = Vec::new();
    if let Some(v) = root.get("nodes") {
        for (i, node) in r
            .array(v, "nodes", "an array of [[nodes]] tables")?
            .iter()
            .enumerate()
        {
            nodes.push(r.node(node, &format!("nodes[{i}]"), base_dir)?);
        }
    }
    let coordinator = match root.get("coordinator") {
        Some(v) => r.string(v, "coordinator")?.to_string(),
        None if nodes.len() == 1 => nodes[0].name.clone(),
        None if nodes.is_empty() => String::new(), // validate reports the missing nodes
        None => {
            return Err(r.err(
                None,
                "coordinator",
                format!("missing, and required with {} nodes", nodes.len()),
                &format!(
                    "add `coordinator = \"{}\"` at the top of the file",
                    nodes[0].name
                ),
            ))
        }
    };
    let devices = nodes.iter().map(|n| n.devices.len()).sum();
    let parallel = match root.get("parallel") {
        Some(v) => r.parallel(v, devices)?,
        None => r.parallel_table(&DeTable::new(), devices)?,
    };
    let tls_ca = match root.get("tls") {
        Some(v) => {
            let t = r.table(v, "tls")?;
            r.keys(t, "tls", sections::TLS_KEYS)?;
            match t.get("ca") {
                Some(ca) => Some(r.path_value(ca, "tls.ca", base_dir)?),
                None => None,
            }
        }
        None => None,
    };
    Ok(ClusterSpec {
        file: file.to_string(),
        coordinator,
        model,
        parallel,
        nodes,
        tls_ca,
        lines: r.lines,
    })
}

/// Walks the parsed TOML; records the 1-based line of every field path it meets.
struct Reader<'a> {
    text: &'a str,
    file: &'a str,
    lines: BTreeMap<String, usize>,
    /// Byte offsets of the text's newlines (a field's line is a binary search: linear reading
    /// even for 100,000 nodes).
    newlines: Vec<usize>,
}

impl Reader<'_> {
    fn line(&self, span: Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.newlines.partition_point(|&n| n < end) + 1
    }

    fn err(
        &self,
        line: Option<usize>,
        field: &str,
        message: impl Into<String>,
        hint: &str,
    ) -> TopologyError {
        TopologyError::Invalid {
            file: self.file.to_string(),
            line,
            field: field.to_string(),
            message: message.into(),
            hint: (!hint.is_empty()).then(|| hint.to_string()),
        }
    }

    fn syntax(&self, e: &toml::de::Error) -> TopologyError {
        let span = e.span();
        let line = span.clone().map(|s| self.line(s));
        // A duplicate key's span is the key itself: name it.
        let field = match span.and_then(|s| self.text.get(s)) {
            Some(key) if e.message().contains("duplicate key") => key.trim().to_string(),
            _ => "<syntax>".to_string(),
        };
        self.err(line, &field, format!("TOML syntax: {}", e.message()), "")
    }

    /// Records the line of every key of `t` under `prefix`; rejects keys not in `allowed`.
    fn keys(&mut self, t: &DeTable<'_>, prefix: &str, allowed: &[&str]) -> Result<()> {
        for key in t.keys() {
            let name: &str = key.get_ref();
            let path = join(prefix, name);
            let line = self.line(key.span());
            if !allowed.contains(&name) {
                let where_ = if prefix.is_empty() {
                    "at the top level".to_string()
                } else {
                    format!("in `{prefix}`")
                };
                return Err(self.err(
                    Some(line),
                    &path,
                    format!("unknown key `{name}` {where_}"),
                    &format!("allowed keys: {}", allowed.join(", ")),
                ));
            }
            self.lines.insert(path, line);
        }
        Ok(())
    }

    fn type_err(&self, v: &Value<'_>, path: &str, expected: &str) -> TopologyError {
        self.err(
            Some(self.line(v.span())),
            path,
            format!("expected {expected}, found {}", v.get_ref().type_str()),
            "",
        )
    }

    fn table<'v, 'i>(&mut self, v: &'v Value<'i>, path: &str) -> Result<&'v DeTable<'i>> {
        let line = self.line(v.span());
        self.lines.entry(path.to_string()).or_insert(line);
        v.get_ref()
            .as_table()
            .ok_or_else(|| self.type_err(v, path, "a table"))
    }

    fn array<'v, 'i>(&self, v: &'v Value<'i>, path: &str, what: &str) -> Result<&'v [Value<'i>]> {
        match v.get_ref().as_array() {
            Some(a) => Ok(a),
            None => Err(self.type_err(v, path, what)),
        }
    }

    fn string<'v>(&self, v: &'v Value<'_>, path: &str) -> Result<&'v str> {
        v.get_ref()
            .as_str()
            .ok_or_else(|| self.type_err(v, path, "a string"))
    }

    fn uint(&self, v: &Value<'_>, path: &str) -> Result<u64> {
        let Some(i) = v.get_ref().as_integer() else {
            return Err(self.type_err(v, path, "a non-negative integer"));
        };
        match i128::from_str_radix(i.as_str(), i.radix()).map(u64::try_from) {
            Ok(Ok(n)) => Ok(n),
            _ => Err(self.err(
                Some(self.line(v.span())),
                path,
                format!("expected a non-negative integer, found {}", i.as_str()),
                "",
            )),
        }
    }

    fn usize(&self, v: &Value<'_>, path: &str) -> Result<usize> {
        let n = self.uint(v, path)?;
        usize::try_from(n).map_err(|_| {
            self.err(
                Some(self.line(v.span())),
                path,
                format!("{n} is too large"),
                "",
            )
        })
    }

    fn opt_usize(&self, t: &DeTable<'_>, prefix: &str, key: &str) -> Result<Option<usize>> {
        t.get(key)
            .map(|v| self.usize(v, &join(prefix, key)))
            .transpose()
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}
