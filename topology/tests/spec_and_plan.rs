//! Topology files (every mistake names file, line and field) and the parallel plan.
//!
//! This file: helpers, the example files, defaults and struct-built specs. `errors.rs`: one test
//! per rejected input, each checking field and line. `plan.rs`: `Plan`, `patch_rows`,
//! `split_layers`, with proptests.

#[path = "spec_and_plan/errors.rs"]
mod errors;
#[path = "spec_and_plan/plan.rs"]
mod plan;
#[path = "spec_and_plan/roles.rs"]
mod roles;

use std::path::{Path, PathBuf};

use topology::{ClusterSpec, DeviceSpec, ModelShape, ModelSpec, Plan, TopologyError};

/// A valid file; tests replace one numbered line (1-based) to make it wrong at a known line.
pub(crate) const BASE: &[&str] = &[
    r#"coordinator = "local""#,                                         // 1
    "",                                                                 // 2
    "[model]",                                                          // 3
    r#"preset = "DiT-S/2""#,                                            // 4
    "",                                                                 // 5
    "[parallel]",                                                       // 6
    "pipefusion_degree = 2",                                            // 7
    "num_patches = 4",                                                  // 8
    "warmup_steps = 1",                                                 // 9
    "",                                                                 // 10
    "[[nodes]]",                                                        // 11
    r#"name = "local""#,                                                // 12
    r#"devices = [ { kind = "cpu", threads = 1 }, { kind = "cpu" } ]"#, // 13
];

/// BASE with the given lines replaced.
pub(crate) fn edit(changes: &[(usize, &str)]) -> String {
    let mut lines: Vec<&str> = BASE.to_vec();
    for &(n, text) in changes {
        lines[n - 1] = text;
    }
    lines.join("\n") + "\n"
}

pub(crate) fn parse(text: &str) -> topology::Result<ClusterSpec> {
    ClusterSpec::parse(text, "t.toml", None)
}

/// The error of a file that must be rejected: (field, line, whole message).
pub(crate) fn invalid(err: TopologyError) -> (String, Option<usize>, String) {
    let shown = err.to_string();
    match err {
        TopologyError::Invalid { field, line, .. } => (field, line, shown),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

/// Asserts `text` is rejected at `field`, `line`, with a message containing `needle`.
pub(crate) fn rejects(text: &str, field: &str, line: Option<usize>, needle: &str) -> String {
    let err = match parse(text) {
        Ok(spec) => panic!("accepted:\n{text}\n{spec:?}"),
        Err(e) => e,
    };
    let (f, l, shown) = invalid(err);
    assert_eq!((f.as_str(), l), (field, line), "{shown}");
    if let Some(l) = line {
        assert!(shown.contains(&format!("t.toml:{l}: `{field}`")), "{shown}");
    }
    assert!(shown.contains(needle), "{shown}");
    shown
}

pub(crate) fn shape(layers: usize, token_rows: usize) -> ModelShape {
    ModelShape {
        layers,
        hidden: 8,
        token_rows,
        token_cols: 4,
        batch: 2,
        latent_channels: 4,
        latent_batch: 1,
        patch_size: 2,
        heads: 4,
        text_tokens: 0,
        prompt_first: false,
    }
}

pub(crate) fn plan_error(text: &str, shape: &ModelShape) -> (String, Option<usize>, String) {
    let spec = parse(text).expect("valid spec");
    invalid(Plan::new(&spec, shape).expect_err("plan must fail"))
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/topologies")
}

#[test]
fn base_file_parses_with_defaults() {
    let spec = parse(&edit(&[])).unwrap();
    assert_eq!(spec.coordinator, "local");
    assert_eq!(
        spec.model,
        ModelSpec::Preset {
            name: "DiT-S/2".into(),
            seed: 0
        }
    );
    assert_eq!(
        spec.nodes[0].devices,
        vec![
            DeviceSpec::Cpu {
                threads: 1,
                precision: topology::Precision::F32
            };
            2
        ]
    );
    assert_eq!(
        (spec.parallel.cfg_degree, spec.parallel.ring_degree),
        (1, 1)
    );
    assert_eq!(spec.parallel.layer_split, None);
}

#[test]
fn defaults_fill_parallel_when_table_is_absent() {
    let spec = parse(&edit(&[(6, ""), (7, ""), (8, ""), (9, "")])).unwrap();
    let p = &spec.parallel;
    assert_eq!(
        (p.pipefusion_degree, p.num_patches, p.warmup_steps),
        (2, 2, 1)
    );
}

#[test]
fn missing_file_error_names_the_path() {
    let err = ClusterSpec::from_file(Path::new("/no/such/topology.toml")).unwrap_err();
    assert!(matches!(err, TopologyError::Io { .. }));
    assert!(err.to_string().contains("/no/such/topology.toml"), "{err}");
}

#[test]
fn validate_after_edit_keeps_the_line() {
    let mut spec = parse(&edit(&[])).unwrap();
    spec.parallel.num_patches = 0;
    let (field, line, _) = invalid(spec.validate().unwrap_err());
    assert_eq!((field.as_str(), line), ("parallel.num_patches", Some(8)));
    let (field, line, shown) = invalid(spec.error("model.preset", "does not load", None));
    assert_eq!((field.as_str(), line), ("model.preset", Some(4)), "{shown}");
    // A field that is not in the file reports its table.
    assert_eq!(
        spec.error("parallel.ring_degree", "x", None).to_string(),
        "t.toml:6: `parallel.ring_degree`: x"
    );
}

#[test]
fn example_files_all_parse() {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(examples_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let spec = ClusterSpec::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
            names.push((
                path.file_name().unwrap().to_string_lossy().into_owned(),
                spec,
            ));
        }
    }
    names.sort_by(|a, b| a.0.cmp(&b.0));
    let names: Vec<&str> = names.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "flux_dev_4stage.toml",
            "local_2cpu.toml",
            "local_4cpu_dit_b.toml",
            "sd35_large_cfg2_pf2.toml",
            "three-nodes-local.toml",
            "two_nodes.toml"
        ]
    );
}

#[test]
fn example_local_2cpu_resolves_the_bundled_model() {
    let spec = ClusterSpec::from_file(&examples_dir().join("local_2cpu.toml")).unwrap();
    let ModelSpec::Path(path) = &spec.model else {
        panic!("{:?}", spec.model)
    };
    assert!(
        path.join("model_index.json").is_file(),
        "{}",
        path.display()
    );
    let p = &spec.parallel;
    assert_eq!(
        (p.pipefusion_degree, p.num_patches, p.warmup_steps),
        (2, 4, 1)
    );
    // The tiny DiT: 3 layers, 8x8 latent, patch 2 -> 4 token rows.
    let plan = Plan::new(&spec, &shape(3, 4)).unwrap();
    assert_eq!(
        plan.stages
            .iter()
            .map(|s| s.layers.clone())
            .collect::<Vec<_>>(),
        [0..2, 2..3]
    );
}

#[test]
fn example_two_nodes_defaults_the_pipeline_to_the_device_count() {
    let spec = ClusterSpec::from_file(&examples_dir().join("two_nodes.toml")).unwrap();
    assert_eq!(spec.parallel.pipefusion_degree, 2);
    let devices = spec.devices();
    assert_eq!(
        (devices[0].node.as_str(), devices[1].node.as_str()),
        ("a", "b")
    );
    assert_eq!(devices[1].index, 1);
    assert_eq!(spec.nodes[1].address.as_deref(), Some("10.0.0.2:7000"));
}

#[test]
fn device_spec_display() {
    assert_eq!(
        DeviceSpec::Cpu {
            threads: 1,
            precision: topology::Precision::F32
        }
        .to_string(),
        "cpu(threads=1)"
    );
    assert_eq!(
        DeviceSpec::Cpu {
            threads: 2,
            precision: topology::Precision::Bf16
        }
        .to_string(),
        "cpu(threads=2, bf16)"
    );
    assert_eq!(
        DeviceSpec::Cuda {
            ordinal: 0,
            precision: topology::Precision::F32,
        }
        .to_string(),
        "cuda:0"
    );
}

#[test]
fn local_cpu_validates_and_plans() {
    let spec = ClusterSpec::local_cpu(
        3,
        2,
        ModelSpec::Preset {
            name: "DiT-S/2".into(),
            seed: 1,
        },
    );
    spec.validate().unwrap();
    assert_eq!(spec.file, "<command line>");
    assert_eq!(spec.devices().len(), 3);
    let plan = Plan::new(&spec, &shape(12, 6)).unwrap();
    assert_eq!(plan.num_patches(), 3);
    assert_eq!(
        plan.stages[2].device.spec,
        DeviceSpec::Cpu {
            threads: 2,
            precision: topology::Precision::F32
        }
    );
    let err = ClusterSpec::local_cpu(0, 1, ModelSpec::Path("m".into()))
        .validate()
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("<command line>: `nodes[0].devices`"),
        "{err}"
    );
}
