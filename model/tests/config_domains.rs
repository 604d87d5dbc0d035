//! Every out-of-domain model input gets a clear refusal at load (issue 16 groups 5, 8 and 10):
//! transformer configs (sizes, eps, not an object), scheduler configs (betas, timesteps, offsets,
//! shifts, Python's NaN / Infinity), weights (NaN / inf, more blocks than the config counts, a
//! shard that is a directory) and `model_index.json`. Each refusal names the file and the field
//! (or tensor); a property test checks that every scheduler config is either refused or gives a
//! finite schedule.

mod common;

use std::path::{Path, PathBuf};

use common::fixtures;
use kernels::Device;
use model::mmdit::FluxTransformer;
use model::sampler::{PipelineTimesteps, Scheduler};
use model::{ModelConfig, ModelIndex, Transformer};
use proptest::prelude::*;
use serde_json::{json, Value};

fn scratch(tag: &str) -> PathBuf {
    // Tests run in parallel threads and call this many times: every call gets its own folder.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("pipefuse-domains-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A copy of fixture folder `name` (files only) in a fresh scratch folder.
fn copy_fixture(name: &str, tag: &str) -> PathBuf {
    let dir = scratch(tag);
    for e in std::fs::read_dir(fixtures().join(name)).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
    }
    dir
}

fn read_value(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Rewrites `dir/config.json` with `edits` applied (a `null` edit removes the key).
fn edit_config(dir: &Path, edits: &Value) {
    let path = dir.join("config.json");
    let mut v = read_value(&path);
    for (k, x) in edits.as_object().unwrap() {
        match x {
            Value::Null => v.as_object_mut().unwrap().remove(k),
            x => v.as_object_mut().unwrap().insert(k.clone(), x.clone()),
        };
    }
    std::fs::write(&path, v.to_string()).unwrap();
}

/// Asserts that `err` names `file` and the field `field` (as `field`), and says what works.
fn assert_names(err: &str, file: &str, field: &str) {
    assert!(
        err.contains(file) && err.contains(&format!("`{field}`")),
        "expected an error naming {file} and `{field}`, got: {err}"
    );
}

/// The error `ModelConfig::from_dir` gives for fixture `base`'s config with `edits`.
fn config_error(base: &str, edits: Value) -> String {
    let dir = scratch("cfg");
    std::fs::copy(
        fixtures().join(base).join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    edit_config(&dir, &edits);
    let e = match ModelConfig::from_dir(&dir) {
        Ok(c) => panic!("{base} with {edits} was accepted: {c:?}"),
        Err(e) => e.to_string(),
    };
    std::fs::remove_dir_all(&dir).ok();
    e
}

#[test]
fn transformer_config_fields_out_of_domain_are_refused() {
    let big = 1u64 << 40;
    let cases = [
        ("dit_tiny", json!({"norm_eps": 0.0}), "norm_eps"),
        ("dit_tiny", json!({"norm_eps": -1e-5}), "norm_eps"),
        ("dit_tiny", json!({"norm_eps": 1e-50}), "norm_eps"), // 0 in f32
        ("dit_tiny", json!({"norm_eps": 1e39}), "norm_eps"),  // inf in f32
        ("dit_tiny", json!({"sample_size": 0}), "sample_size"),
        ("dit_tiny", json!({"patch_size": 0}), "patch_size"),
        ("dit_tiny", json!({"patch_size": 1000}), "patch_size"),
        ("dit_tiny", json!({"patch_size": 3}), "patch_size"), // does not divide 8
        ("dit_tiny", json!({"num_layers": 0}), "num_layers"),
        ("dit_tiny", json!({"num_layers": 20_000}), "num_layers"),
        (
            "dit_tiny",
            json!({"num_attention_heads": 0}),
            "num_attention_heads",
        ),
        (
            "dit_tiny",
            json!({"attention_head_dim": 0}),
            "attention_head_dim",
        ),
        (
            "dit_tiny",
            json!({"num_attention_heads": big}),
            "num_attention_heads",
        ),
        (
            "dit_tiny",
            // Each within bounds, the product (the hidden size) over them: never multiplied
            // unchecked.
            json!({"num_attention_heads": 65536, "attention_head_dim": 65536}),
            "attention_head_dim",
        ),
        ("dit_tiny", json!({"in_channels": 0}), "in_channels"),
        ("dit_tiny", json!({"out_channels": big}), "out_channels"),
        (
            "dit_tiny",
            json!({"num_embeds_ada_norm": 0}),
            "num_embeds_ada_norm",
        ),
        (
            "pixart_tiny",
            json!({"interpolation_scale": 0.0}),
            "interpolation_scale",
        ),
        (
            "pixart_tiny",
            json!({"interpolation_scale": -2.0}),
            "interpolation_scale",
        ),
        (
            "pixart_tiny",
            json!({"caption_channels": 0}),
            "caption_channels",
        ),
        ("sd3_tiny", json!({"sample_size": 0}), "sample_size"),
        ("sd3_tiny", json!({"patch_size": 16}), "patch_size"),
        ("sd3_tiny", json!({"num_layers": 0}), "num_layers"),
        (
            "sd3_tiny",
            json!({"pos_embed_max_size": big}),
            "pos_embed_max_size",
        ),
        (
            "sd3_tiny",
            json!({"num_attention_heads": 65536, "attention_head_dim": 65536}),
            "attention_head_dim",
        ),
        (
            "flux_tiny",
            json!({"num_layers": 0, "num_single_layers": 0}),
            "num_layers",
        ),
        (
            "flux_tiny",
            json!({"num_single_layers": 20_000}),
            "num_single_layers",
        ),
        (
            "flux_tiny",
            json!({"axes_dims_rope": [big, big, big]}),
            "axes_dims_rope",
        ),
        (
            "flux_tiny",
            json!({"joint_attention_dim": 0}),
            "joint_attention_dim",
        ),
    ];
    for (base, edits, field) in cases {
        let e = config_error(base, edits.clone());
        assert_names(&e, "config.json", field);
        assert!(
            e.contains("values that work") || e.contains("must"),
            "{base} {edits}: the error should say what works: {e}"
        );
    }
    // The fixtures themselves still load.
    for base in [
        "dit_tiny",
        "dit_tiny_legacy",
        "pixart_tiny",
        "sd3_tiny",
        "flux_tiny",
    ] {
        ModelConfig::from_dir(&fixtures().join(base)).unwrap();
    }
    ModelConfig::from_dir(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/digits-dit/transformer"),
    )
    .unwrap();
}

#[test]
fn a_config_error_comes_before_any_plan_error() {
    // Before: `sample_size 0` or `patch_size 1000` loaded and failed later at the plan ("0 token
    // rows"); `num_layers 0` suggested `pipefusion_degree <= 0`.
    for (edits, field) in [
        (json!({"sample_size": 0}), "sample_size"),
        (json!({"patch_size": 1000}), "patch_size"),
        (json!({"num_layers": 0}), "num_layers"),
    ] {
        let dir = copy_fixture("dit_tiny", "plan");
        edit_config(&dir, &edits);
        let e = Transformer::load(&dir, None, Device::cpu(1).unwrap())
            .unwrap_err()
            .to_string();
        assert_names(&e, "config.json", field);
        assert!(!e.contains("token rows"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
    let e = config_error("dit_tiny", json!({"patch_size": 3}));
    assert!(e.contains("values that work: 1, 2, 4, 8"), "{e}");
}

#[test]
fn a_config_that_is_not_an_object_is_refused() {
    let dir = scratch("notobj");
    for (text, found) in [
        ("[1, 2, 3]", "array"),
        ("42", "number"),
        ("\"DiT\"", "string"),
    ] {
        std::fs::write(dir.join("config.json"), text).unwrap();
        let e = ModelConfig::from_dir(&dir).unwrap_err().to_string();
        assert!(
            e.contains("config.json")
                && e.contains(&format!("holds a JSON {found}, expected an object")),
            "{text}: {e}"
        );
    }
    // A number too large for a double is a JSON error naming the file and line.
    std::fs::write(
        dir.join("config.json"),
        "{\"_class_name\": \"DiTTransformer2DModel\",\n\"norm_eps\": 1e400}",
    )
    .unwrap();
    let e = ModelConfig::from_dir(&dir).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("line 2"), "{e}");
    // A scheduler config and a model index too.
    std::fs::write(dir.join("scheduler_config.json"), "[1, 2, 3]").unwrap();
    let e = Scheduler::from_file(&dir.join("scheduler_config.json"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("scheduler_config.json") && e.contains("JSON array"),
        "{e}"
    );
    std::fs::write(dir.join("model_index.json"), "[]").unwrap();
    let e = ModelIndex::from_file(&dir.join("model_index.json"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model_index.json") && e.contains("JSON array"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// The error `Scheduler::from_file` gives for `text` (a whole scheduler_config.json).
fn scheduler_result(text: &str) -> Result<Scheduler, String> {
    let dir = scratch("sched");
    let path = dir.join("scheduler_config.json");
    std::fs::write(&path, text).unwrap();
    let r = Scheduler::from_file(&path).map_err(|e| e.to_string());
    std::fs::remove_dir_all(&dir).ok();
    r
}

/// Fixture scheduler `kind` (ddim, dpm, flow) with `edits` applied, as text.
fn scheduler_text(kind: &str, edits: &Value) -> String {
    let text = std::fs::read_to_string(
        fixtures()
            .join("schedulers")
            .join(kind)
            .join("scheduler_config.json"),
    )
    .unwrap();
    // The DPM fixture holds Python's `-Infinity` (not JSON): edit the text around it.
    let mut v: Value = serde_json::from_str(&text.replace("-Infinity", "\"-Infinity\"")).unwrap();
    for (k, x) in edits.as_object().unwrap() {
        v[k] = x.clone();
    }
    v.to_string().replace("\"-Infinity\"", "-Infinity")
}

#[test]
fn scheduler_fields_out_of_domain_are_refused() {
    for kind in ["ddim", "dpm"] {
        for (edits, field) in [
            (json!({"beta_end": 2.0}), "beta_end"),
            (json!({"beta_end": 1.0}), "beta_end"),
            (json!({"beta_start": -0.5}), "beta_start"),
            (json!({"beta_start": 0.0}), "beta_start"),
            (json!({"beta_start": 1e-12}), "beta_start"), // 1 - beta is 1 in f32
            (
                json!({"beta_start": 0.02, "beta_end": 0.0001}),
                "beta_start",
            ),
            // All signal gone: alphas_cumprod underflows f32.
            (json!({"beta_end": 0.9}), "beta_end"),
            (json!({"num_train_timesteps": 0}), "num_train_timesteps"),
            (json!({"num_train_timesteps": 1}), "num_train_timesteps"),
            (
                json!({"num_train_timesteps": 1_000_000}),
                "num_train_timesteps",
            ),
            (
                json!({"num_train_timesteps": 1000.5}),
                "num_train_timesteps",
            ),
            (json!({"steps_offset": 1_000_000}), "steps_offset"),
            (json!({"steps_offset": 1000}), "steps_offset"),
        ] {
            let e = scheduler_result(&scheduler_text(kind, &edits))
                .map(|s| format!("accepted: {s:?}"))
                .unwrap_err();
            assert_names(&e, "scheduler_config.json", field);
            assert!(
                e.contains("values that work") || e.contains("lower ") || e.contains("expected"),
                "{kind} {edits}: {e}"
            );
        }
        // The largest offset that works, and a constant beta schedule, are accepted.
        scheduler_result(&scheduler_text(kind, &json!({"steps_offset": 999}))).unwrap();
        scheduler_result(&scheduler_text(
            kind,
            &json!({"beta_start": 0.01, "beta_end": 0.01}),
        ))
        .unwrap();
    }
    for (edits, field) in [
        (json!({"shift": 0.0}), "shift"),
        (json!({"shift": -3.0}), "shift"),
        (json!({"shift": 1e-9}), "shift"),
        (json!({"shift": 1e-3}), "shift"),
        (json!({"shift": 1e300}), "shift"),
        (json!({"num_train_timesteps": 0}), "num_train_timesteps"),
        (
            json!({"num_train_timesteps": 1_000_000}),
            "num_train_timesteps",
        ),
    ] {
        let e = scheduler_result(&scheduler_text("flow", &edits))
            .map(|s| format!("accepted: {s:?}"))
            .unwrap_err();
        assert_names(&e, "scheduler_config.json", field);
    }
}

#[test]
fn python_nan_and_infinity_in_a_scheduler_are_refused_naming_the_field() {
    // Python's json writes bare NaN / Infinity; they used to be read as null (the default).
    for (kind, field, word) in [
        ("ddim", "beta_end", "NaN"),
        ("dpm", "beta_start", "Infinity"),
        ("flow", "shift", "NaN"),
        ("flow", "shift", "-Infinity"),
    ] {
        let text = scheduler_text(kind, &json!({ field: "@@" })).replace("\"@@\"", word);
        let e = scheduler_result(&text)
            .map(|s| format!("accepted: {s:?}"))
            .unwrap_err();
        assert_names(&e, "scheduler_config.json", field);
        assert!(e.contains(&format!("{word} is not a finite number")), "{e}");
    }
    let dynamic = json!({"use_dynamic_shifting": true, "base_shift": "@@"});
    let e = scheduler_result(&scheduler_text("flow", &dynamic).replace("\"@@\"", "Infinity"))
        .unwrap_err();
    assert_names(&e, "scheduler_config.json", "base_shift");
    // DPM-Solver++'s `lambda_min_clipped: -Infinity` (the diffusers default) still loads, a
    // finite clip is still refused, and the words inside strings are left alone.
    scheduler_result(&scheduler_text(
        "dpm",
        &json!({"note": "NaN, Infinity and -Infinity"}),
    ))
    .unwrap();
    let e =
        scheduler_result(&scheduler_text("dpm", &json!({"lambda_min_clipped": -5.1}))).unwrap_err();
    assert_names(&e, "scheduler_config.json", "lambda_min_clipped");
}

/// Sets element `index` of tensor `name` in the safetensors file `path` to the raw
/// little-endian `bytes` (in place: the header is unchanged).
fn poke(path: &Path, name: &str, index: usize, bytes: &[u8]) {
    let mut data = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&data[8..8 + n]).unwrap();
    let start = header[name]["data_offsets"][0].as_u64().unwrap() as usize;
    let at = 8 + n + start + index * bytes.len();
    data[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, data).unwrap();
}

#[test]
fn non_finite_weights_are_refused_naming_file_and_tensor() {
    let name = "transformer_blocks.1.attn1.to_k.weight";
    for (fixture, bytes, shown) in [
        ("dit_tiny", f32::NAN.to_le_bytes().to_vec(), "NaN"),
        ("dit_tiny", f32::NEG_INFINITY.to_le_bytes().to_vec(), "-inf"),
        ("dit_tiny_bf16", vec![0x80, 0x7f], "inf"), // bf16 +inf
    ] {
        let dir = copy_fixture(fixture, "nan");
        let file = dir.join("diffusion_pytorch_model.safetensors");
        poke(&file, name, 5, &bytes);
        let e = Transformer::load(&dir, None, Device::cpu(1).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("diffusion_pytorch_model.safetensors")
                && e.contains(&format!("`{name}`"))
                && e.contains(&format!("holds {shown} at element 5")),
            "{fixture}: {e}"
        );
        // A stage that does not own block 1 never reads the tensor (and is not refused).
        Transformer::load(&dir, Some(0..1), Device::cpu(1).unwrap()).unwrap();
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn weights_with_more_blocks_than_the_config_are_refused() {
    // dit_tiny has 3 blocks; a config of 2 used to drop the third silently.
    for fixture in ["dit_tiny", "dit_tiny_sharded"] {
        let dir = copy_fixture(fixture, "extra");
        edit_config(&dir, &json!({"num_layers": 2}));
        for range in [None, Some(0..1)] {
            let e = Transformer::load(&dir, range.clone(), Device::cpu(1).unwrap())
                .unwrap_err()
                .to_string();
            assert_names(&e, "config.json", "num_layers");
            assert!(
                e.contains("transformer_blocks.2.") && e.contains("set num_layers to 3"),
                "{fixture} {range:?}: {e}"
            );
        }
        std::fs::remove_dir_all(&dir).ok();
    }
    // Flux: double- and single-stream blocks are counted apart.
    let dir = copy_fixture("flux_tiny", "extra-flux");
    edit_config(&dir, &json!({"num_single_layers": 1}));
    let e = Transformer::load(&dir, None, Device::cpu(1).unwrap())
        .unwrap_err()
        .to_string();
    assert_names(&e, "config.json", "num_single_layers");
    assert!(e.contains("single_transformer_blocks.1."), "{e}");
    let e = FluxTransformer::load(&dir, Device::cpu(1).unwrap())
        .unwrap_err()
        .to_string();
    assert_names(&e, "config.json", "num_single_layers");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_weights_path_that_is_a_directory_is_refused() {
    let dir = scratch("weightsdir");
    std::fs::copy(
        fixtures().join("dit_tiny/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    std::fs::create_dir(dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    let e = Transformer::load(&dir, None, Device::cpu(1).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("diffusion_pytorch_model.safetensors")
            && e.contains("is a directory, expected a .safetensors file"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn model_index_must_be_json_naming_a_known_pipeline() {
    // Every bundled pipeline's index loads.
    let mut indexes = vec![
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/digits-dit/model_index.json")
    ];
    for e in std::fs::read_dir(fixtures()).unwrap() {
        let p = e.unwrap().path().join("model_index.json");
        if p.exists() {
            indexes.push(p);
        }
    }
    assert!(indexes.len() >= 6, "{indexes:?}");
    for p in &indexes {
        ModelIndex::from_file(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    let dir = scratch("index");
    let path = dir.join("model_index.json");
    for (text, want) in [
        ("{\"_class_name\": \"DiTPipeline\",", "invalid JSON"),
        (
            "{\"_class_name\": \"StableDiffusionPipeline\"}",
            "known: DiTPipeline, PixArtAlphaPipeline",
        ),
        ("{\"_class_name\": 7}", "expected a string"),
        (
            "{\"transformer\": [\"diffusers\", \"DiTTransformer2DModel\"]}",
            "missing",
        ),
    ] {
        std::fs::write(&path, text).unwrap();
        let e = ModelIndex::from_file(&path).unwrap_err().to_string();
        assert!(
            e.contains("model_index.json") && e.contains(want),
            "{text}: {e}"
        );
        if want != "invalid JSON" {
            assert_names(&e, "model_index.json", "_class_name");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A JSON value for a number field: anything a hostile or careless file could hold, and often
/// a value near `typical` (log-uniform within 1000x either way), so that configs get accepted
/// and their schedules checked.
fn number(typical: f64) -> impl Strategy<Value = Value> {
    prop_oneof![
        1 => any::<f64>().prop_map(|x| json!(x)), // non-finite becomes null (the default)
        1 => (-1.0..2.0f64).prop_map(|x| json!(x)),
        1 => (0u64..200_000).prop_map(|x| json!(x)),
        1 => prop::sample::select(vec![0.0, 1.0, 5.960_464_5e-8, 0.999_999]).prop_map(|x| json!(x)),
        6 => (-3.0..3.0f64).prop_map(move |e| json!(typical * 10f64.powf(e))),
    ]
}

/// An integer field: mostly integers up to `2 x typical` (so that configs get past the type
/// check), some large ones and some floats.
fn count(typical: u64) -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (0u64..2 * typical).prop_map(|x| json!(x)),
        1 => (0u64..200_000).prop_map(|x| json!(x)),
        1 => any::<f64>().prop_map(|x| json!(x)),
        2 => Just(json!(typical)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// Any beta schedule is either refused or gives alphas_cumprod in (0, 1] and a 20-step plan
    /// whose timesteps are below num_train_timesteps and whose step rules are finite.
    #[test]
    fn a_beta_schedule_is_refused_or_finite(
        class in prop::sample::select(vec!["DDIMScheduler", "DPMSolverMultistepScheduler"]),
        schedule in prop::sample::select(vec!["linear", "scaled_linear"]),
        spacing in prop::sample::select(vec!["leading", "linspace", "trailing"]),
        heun in any::<bool>(),
        beta_start in number(1e-4),
        beta_end in number(0.02),
        train in count(1000),
        offset in count(2),
    ) {
        let v = json!({
            "_class_name": class,
            "clip_sample": false,
            "beta_schedule": schedule,
            "timestep_spacing": spacing,
            "solver_type": if heun { "heun" } else { "midpoint" },
            "beta_start": beta_start,
            "beta_end": beta_end,
            "num_train_timesteps": train,
            "steps_offset": offset,
        });
        let Ok(s) = Scheduler::from_json(&v, Path::new("scheduler_config.json")) else {
            return Ok(());
        };
        let acp = s.alphas_cumprod().unwrap();
        let n = acp.len() as f32;
        prop_assert!(acp.iter().all(|a| a.is_finite() && *a > 0.0 && *a <= 1.0), "{v}");
        if let Ok(plan) = s.plan(20) {
            prop_assert!(plan.timesteps.iter().all(|t| *t >= 0.0 && *t < n), "{v}: {:?}", plan.timesteps);
            for r in &plan.rules {
                prop_assert!(
                    [r.x0_alpha, r.x0_sigma, r.a, r.b, r.c, r.e].iter().all(|x| x.is_finite())
                        && r.x0_alpha > 0.0,
                    "{v}: {r:?}"
                );
            }
        }
    }

    /// Any flow-matching config is either refused or gives sigmas in [0, 1] (timesteps in
    /// [0, num_train_timesteps], up to f32 rounding) and finite, non-positive steps, static or
    /// dynamically shifted.
    #[test]
    fn a_flow_schedule_is_refused_or_finite(
        shift in number(3.0),
        train in count(1000),
        dynamic in any::<bool>(),
        linear in any::<bool>(),
        base_shift in number(0.5),
        max_shift in number(1.15),
        tokens in 1usize..100_000,
        flux in any::<bool>(),
    ) {
        let v = json!({
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "shift": shift,
            "num_train_timesteps": train,
            "use_dynamic_shifting": dynamic,
            "time_shift_type": if linear { "linear" } else { "exponential" },
            "base_shift": base_shift,
            "max_shift": max_shift,
        });
        let Ok(s) = Scheduler::from_json(&v, Path::new("scheduler_config.json")) else {
            return Ok(());
        };
        let how = if flux { PipelineTimesteps::FluxSigmas } else { PipelineTimesteps::Default };
        if let Ok(plan) = s.plan_for(20, tokens, how) {
            // sigma <= 1 up to f32 rounding of the shift (diffusers' arithmetic, kept).
            let n = v["num_train_timesteps"].as_u64().unwrap_or(1000) as f32 * (1.0 + 1e-5);
            prop_assert!(plan.timesteps.iter().all(|t| *t >= 0.0 && *t <= n), "{v}: {:?}", plan.timesteps);
            prop_assert!(
                plan.rules.iter().all(|r| r.e.is_finite() && r.e <= 0.0),
                "{v}: {:?}",
                plan.rules
            );
        }
    }
}
