//! Every rejected input: the error names the right field and line.

use crate::{edit, parse, rejects};

#[test]
fn syntax_error_reports_its_line() {
    rejects(
        &edit(&[(8, "num_patches = ")]),
        "<syntax>",
        Some(8),
        "TOML syntax",
    );
}

#[test]
fn duplicate_key_names_the_key() {
    rejects(
        &edit(&[(10, "num_patches = 5")]),
        "num_patches",
        Some(10),
        "duplicate key",
    );
}

#[test]
fn unknown_top_level_key_lists_allowed_keys() {
    rejects(
        &edit(&[(2, "colour = 1")]),
        "colour",
        Some(2),
        "allowed keys: coordinator, model",
    );
}

#[test]
fn unknown_parallel_key_is_named() {
    rejects(
        &edit(&[(8, "num_patch = 4")]),
        "parallel.num_patch",
        Some(8),
        "pipefusion_degree",
    );
}

#[test]
fn unknown_device_key_is_named() {
    let text = edit(&[(
        13,
        r#"devices = [ { kind = "cpu" }, { kind = "cpu", gpus = 1 } ]"#,
    )]);
    rejects(
        &text,
        "nodes[0].devices[1].gpus",
        Some(13),
        "allowed keys: kind, threads, dtype",
    );
}

#[test]
fn wrong_type_names_the_expected_type() {
    let text = edit(&[(8, r#"num_patches = "4""#)]);
    rejects(
        &text,
        "parallel.num_patches",
        Some(8),
        "expected a non-negative integer, found string",
    );
}

#[test]
fn negative_integer_is_rejected() {
    rejects(
        &edit(&[(9, "warmup_steps = -1")]),
        "parallel.warmup_steps",
        Some(9),
        "-1",
    );
}

#[test]
fn model_with_path_and_preset_is_rejected() {
    rejects(
        &edit(&[(5, r#"path = "x""#)]),
        "model.preset",
        Some(4),
        "exactly one",
    );
}

#[test]
fn model_with_neither_path_nor_preset_is_rejected() {
    rejects(
        &edit(&[(4, "")]),
        "model",
        Some(3),
        "neither `path` nor `preset`",
    );
}

#[test]
fn missing_model_table_is_rejected() {
    rejects(
        &edit(&[(3, ""), (4, "")]),
        "model",
        None,
        "[model] table is missing",
    );
}

#[test]
fn seed_with_path_is_rejected() {
    rejects(
        &edit(&[(4, r#"path = "x""#), (5, "seed = 3")]),
        "model.seed",
        Some(5),
        "only to `preset`",
    );
}

#[test]
fn file_without_nodes_is_rejected() {
    rejects(
        &edit(&[(1, ""), (11, ""), (12, ""), (13, "")]),
        "nodes",
        None,
        "no nodes",
    );
}

#[test]
fn missing_node_name_is_rejected_at_its_table() {
    rejects(
        &edit(&[(12, "")]),
        "nodes[0].name",
        Some(11),
        "needs a `name`",
    );
}

#[test]
fn empty_node_name_is_rejected() {
    rejects(
        &edit(&[(1, ""), (12, r#"name = """#)]),
        "nodes[0].name",
        Some(12),
        "empty",
    );
}

#[test]
fn duplicate_node_names_are_rejected() {
    let text = edit(&[]) + "[[nodes]]\nname = \"local\"\ndevices = [ { kind = \"cpu\" } ]\n";
    rejects(&text, "nodes[1].name", Some(15), "already used by nodes[0]");
}

/// Two nodes on one host:port could never both listen (issue 16 group 8: it used to pass and
/// fail later at `launch` with a certificate error).
#[test]
fn duplicate_node_addresses_are_rejected() {
    let text = edit(&[(12, "name = \"a\"\naddress = \"127.0.0.1:7000\""), (1, "coordinator = \"a\"")])
        + "[[nodes]]\nname = \"b\"\naddress = \"127.0.0.1:7000\"\ndevices = [ { kind = \"cpu\" } ]\n";
    rejects(
        &text,
        "nodes[1].address",
        Some(17),
        "already used by nodes[0]",
    );
}

#[test]
fn coordinator_must_name_a_node() {
    rejects(
        &edit(&[(1, r#"coordinator = "boss""#)]),
        "coordinator",
        Some(1),
        "`boss`",
    );
}

#[test]
fn coordinator_is_required_with_two_nodes() {
    let text = edit(&[(1, "")]) + "[[nodes]]\nname = \"b\"\ndevices = [ { kind = \"cpu\" } ]\n";
    rejects(&text, "coordinator", None, "required with 2 nodes");
}

#[test]
fn address_needs_a_valid_port() {
    let text = edit(&[(12, "name = \"local\"\naddress = \"host:99999\"")]);
    rejects(&text, "nodes[0].address", Some(13), "not a port");
    let text = edit(&[(12, "name = \"local\"\naddress = \"hostonly\"")]);
    rejects(&text, "nodes[0].address", Some(13), "expected host:port");
    let text = edit(&[(12, "name = \"local\"\naddress = \"[::1]:7000\"")]);
    assert!(parse(&text).is_ok());
}

#[test]
fn node_without_devices_is_rejected() {
    rejects(
        &edit(&[(13, "devices = []")]),
        "nodes[0].devices",
        Some(13),
        "has no devices",
    );
    rejects(
        &edit(&[(13, "")]),
        "nodes[0].devices",
        Some(11),
        "has no devices",
    );
}

#[test]
fn cpu_device_needs_threads() {
    let text = edit(&[(
        13,
        r#"devices = [ { kind = "cpu", threads = 0 }, { kind = "cpu" } ]"#,
    )]);
    rejects(
        &text,
        "nodes[0].devices[0].threads",
        Some(13),
        "threads >= 1",
    );
}

#[test]
fn cpu_device_dtype_is_f32_or_bf16() {
    let text = edit(&[(
        13,
        r#"devices = [ { kind = "cpu", dtype = "bf16" }, { kind = "cpu", dtype = "fp8" } ]"#,
    )]);
    rejects(
        &text,
        "nodes[0].devices[1].dtype",
        Some(13),
        "values that work: f32, bf16",
    );
    // f16 is a GPU dtype: a cpu device refuses it, naming the key and the line.
    let text = edit(&[(13, r#"devices = [ { kind = "cpu", dtype = "f16" } ]"#)]);
    rejects(
        &text,
        "nodes[0].devices[0].dtype",
        Some(13),
        "f16 is for cuda devices",
    );
    let text = edit(&[(
        13,
        r#"devices = [ { kind = "cpu", dtype = "bf16" }, { kind = "cpu" } ]"#,
    )]);
    let spec = parse(&text).unwrap();
    let precisions: Vec<_> = spec.nodes[0]
        .devices
        .iter()
        .map(|d| match d {
            topology::DeviceSpec::Cpu { precision, .. } => *precision,
            topology::DeviceSpec::Cuda { .. } => unreachable!(),
        })
        .collect();
    assert_eq!(
        precisions,
        [topology::Precision::Bf16, topology::Precision::F32]
    );
    // Nodes started with another precision are another cluster.
    let f32_text = edit(&[(13, r#"devices = [ { kind = "cpu" }, { kind = "cpu" } ]"#)]);
    assert_ne!(spec.fingerprint(), parse(&f32_text).unwrap().fingerprint());
}

#[test]
fn cuda_device_dtype_is_f32_bf16_or_f16() {
    let text = edit(&[(
        13,
        r#"devices = [ { kind = "cuda", ordinal = 0, dtype = "bf16" }, { kind = "cuda", ordinal = 1, dtype = "f16" } ]"#,
    )]);
    let spec = parse(&text).unwrap();
    let shown: Vec<String> = spec.nodes[0]
        .devices
        .iter()
        .map(|d| d.to_string())
        .collect();
    assert_eq!(shown, ["cuda:0(bf16)", "cuda:1(f16)"]);
    let text = edit(&[(
        13,
        r#"devices = [ { kind = "cuda", ordinal = 0 }, { kind = "cuda", ordinal = 1 } ]"#,
    )]);
    let shown: Vec<String> = parse(&text).unwrap().nodes[0]
        .devices
        .iter()
        .map(|d| d.to_string())
        .collect();
    assert_eq!(shown, ["cuda:0", "cuda:1"]);
    // Another dtype is another cluster (the fingerprint covers it).
    assert_ne!(spec.fingerprint(), parse(&text).unwrap().fingerprint());
    let text = edit(&[(
        13,
        r#"devices = [ { kind = "cuda", ordinal = 0, dtype = "half" } ]"#,
    )]);
    rejects(
        &text,
        "nodes[0].devices[0].dtype",
        Some(13),
        "values that work",
    );
    // The same GPU twice on a node is refused whatever the dtypes.
    let text = edit(&[(
        13,
        r#"devices = [ { kind = "cuda", ordinal = 0, dtype = "bf16" }, { kind = "cuda", ordinal = 0 } ]"#,
    )]);
    rejects(
        &text,
        "nodes[0].devices[1].ordinal",
        Some(13),
        "listed twice",
    );
}

/// `threads = 100000` used to start 100,000 threads (issue 16 group 6).
#[test]
fn cpu_device_threads_are_bounded() {
    let text = edit(&[(
        13,
        r#"devices = [ { kind = "cpu", threads = 2 }, { kind = "cpu", threads = 100000 } ]"#,
    )]);
    rejects(
        &text,
        "nodes[0].devices[1].threads",
        Some(13),
        "at most 1024 threads",
    );
    let text = edit(&[(
        13,
        r#"devices = [ { kind = "cpu", threads = 1024 }, { kind = "cpu", threads = 1 } ]"#,
    )]);
    parse(&text).expect("1024 threads is allowed");
}

#[test]
fn cuda_device_needs_ordinal() {
    let text = edit(&[(
        13,
        "devices = [\n  { kind = \"cpu\" },\n  { kind = \"cuda\" } ]",
    )]);
    rejects(
        &text,
        "nodes[0].devices[1].ordinal",
        Some(15),
        "needs an `ordinal`",
    );
}

#[test]
fn unknown_device_kind_is_named() {
    let text = edit(&[(13, r#"devices = [ { kind = "tpu" }, { kind = "cpu" } ]"#)]);
    rejects(
        &text,
        "nodes[0].devices[0].kind",
        Some(13),
        "unknown device kind `tpu`",
    );
}

#[test]
fn zero_degree_is_rejected() {
    rejects(
        &edit(&[(10, "ulysses_degree = 0")]),
        "parallel.ulysses_degree",
        Some(10),
        ">= 1",
    );
    rejects(
        &edit(&[(7, "pipefusion_degree = 0")]),
        "parallel.pipefusion_degree",
        Some(7),
        ">= 1",
    );
}

#[test]
fn cfg_degree_must_be_one_or_two() {
    rejects(
        &edit(&[(10, "cfg_degree = 3")]),
        "parallel.cfg_degree",
        Some(10),
        "1 or 2",
    );
}

#[test]
fn degree_product_must_match_device_count() {
    let shown = rejects(
        &edit(&[(7, "pipefusion_degree = 3")]),
        "parallel.pipefusion_degree",
        Some(7),
        "= 3",
    );
    assert!(
        shown.contains("2 devices") && shown.contains("pipefusion_degree = 2"),
        "{shown}"
    );
}

#[test]
fn defaulted_pipefusion_degree_reports_the_product() {
    let text = edit(&[
        (7, "cfg_degree = 2"),
        (
            13,
            r#"devices = [ { kind = "cpu" }, { kind = "cpu" }, { kind = "cpu" } ]"#,
        ),
    ]);
    rejects(&text, "parallel.pipefusion_degree", Some(6), "defaulted");
}

#[test]
fn zero_patches_are_rejected() {
    rejects(
        &edit(&[(8, "num_patches = 0")]),
        "parallel.num_patches",
        Some(8),
        ">= 1",
    );
}

#[test]
fn layer_split_needs_one_entry_per_stage() {
    rejects(
        &edit(&[(10, "layer_split = [3]")]),
        "parallel.layer_split",
        Some(10),
        "1 entries",
    );
    let text = edit(&[(10, "layer_split = [\n  2,\n  0 ]")]);
    rejects(&text, "parallel.layer_split[1]", Some(12), "0 layers");
}

/// A topology of 20,000 nodes is read in one pass (issue 16 group 6: every field's line was found
/// by counting newlines from the file's start, quadratic in the node count), and the error for the
/// last node still names its line exactly.
#[test]
fn many_nodes_are_read_and_the_last_error_names_its_line() {
    const NODES: usize = 20_000;
    let mut text = String::from("coordinator = \"n0\"\n[model]\npreset = \"DiT-S/2\"\n");
    for i in 0..NODES {
        let port = 10_000 + i % 50_000;
        text += &format!(
            "[[nodes]]\nname = \"n{i}\"\naddress = \"10.0.{}.{}:{port}\"\ndevices = [ {{ kind = \"cpu\" }} ]\n",
            i / 256,
            i % 256
        );
    }
    // One more node reusing the first node's address: four lines per node after three header
    // lines, so its address is on line 3 + 4 * NODES + 3.
    text += "[[nodes]]\nname = \"last\"\naddress = \"10.0.0.0:10000\"\ndevices = [ { kind = \"cpu\" } ]\n";
    rejects(
        &text,
        &format!("nodes[{NODES}].address"),
        Some(3 + 4 * NODES + 3),
        "already used by nodes[0]",
    );
}
