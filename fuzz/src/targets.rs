//! Every decoder of bytes from outside the process, as a fuzz [`Target`] with valid seeds from the
//! repository (examples, fixtures, the bundled model) or made by the encoders themselves.

use std::path::{Path, PathBuf};

use crate::Target;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("fuzz/ is in the workspace")
        .to_path_buf()
}

fn read(path: impl AsRef<Path>) -> Vec<u8> {
    let p = root().join(path);
    std::fs::read(&p).unwrap_or_else(|e| panic!("seed {}: {e}", p.display()))
}

fn json(bytes: &[u8]) -> Result<serde_json::Value, String> {
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

/// The DiT configuration the request payloads are decoded for (the fixture model's).
fn dit_config() -> model::ModelConfig {
    model::ModelConfig::from_dir(&root().join("actors/tests/fixtures/dit_pf/transformer"))
        .expect("fixture config")
}

/// Every target, in a fixed order.
pub fn all() -> Vec<Target> {
    vec![
        control(),
        frames(),
        hello(),
        topology_toml(),
        scheduler_config(),
        model_config(),
        model_index(),
        request_payload(),
        tensor_blob(),
        weights_file(),
    ]
}

/// Node-to-node control messages (`transport::decode_control`).
fn control() -> Target {
    use transport::ControlMessage as C;
    let samples = [
        C::Begin {
            request: 3,
            device: 1,
            spec: actors::fuzzing::sample_request(&dit_config(), vec![1, 2], 3),
        },
        C::StageFinished {
            request: 3,
            device: 2,
            busy_ns: 5,
            exchange_wait_ns: 1,
            items: 4,
            bytes_sent: 1 << 20,
            sent_to: vec![(0, 7)],
            latent: Some(actors::fuzzing::sample_tensor(&[1, 4, 4, 4])),
        },
        C::Checkpoint {
            request: 3,
            device: 2,
            step: 1,
            latent: actors::fuzzing::sample_tensor(&[1, 4, 4, 4]),
            history: None,
        },
        C::Reconfigure {
            epoch: 1,
            members: vec!["n0".into(), "n2".into()],
            floor: 4,
        },
        C::NodeReady {
            node: "n1".into(),
            devices: vec![1, 2],
        },
        C::DeviceFailed {
            request: 3,
            device: 1,
            step: Some(2),
            message: "x".into(),
            lost_peer: Some(0),
        },
    ];
    Target {
        name: "control",
        seeds: samples
            .iter()
            .map(|m| transport::encode_control(m).expect("encodes"))
            .collect(),
        text: false,
        focus: 0,
        run: Box::new(|b| {
            transport::decode_control(b)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }),
    }
}

/// Activation streams: `[u32 length][rkyv header][payload]` frames.
fn frames() -> Target {
    use transport::{Frame, FrameHeader, FrameLabel, WireDType};
    let frame = |label, dtype, shape: Vec<u32>, size: usize| Frame {
        header: FrameHeader {
            request: 9,
            from: 0,
            label,
            dtype,
            shape: shape.clone(),
        },
        payload: vec![7; shape.iter().product::<u32>() as usize * size],
    };
    let stream = transport::fuzz_encode_frames(&[
        (
            frame(
                FrameLabel::Hidden { step: 1, part: 0 },
                WireDType::F32,
                vec![2, 3],
                4,
            ),
            1,
        ),
        (
            frame(
                FrameLabel::Latent {
                    step: 2,
                    part: transport::PART_WHOLE,
                },
                WireDType::BF16,
                vec![1, 2, 2, 2],
                2,
            ),
            1,
        ),
        (
            frame(
                FrameLabel::Collective {
                    group: transport::PeerGroupKind::Cfg,
                    op: transport::CollectiveOp::AllGather,
                    seq: 4,
                },
                WireDType::F16,
                vec![4],
                2,
            ),
            1,
        ),
    ])
    .expect("encodes");
    Target {
        name: "frames",
        seeds: vec![stream],
        text: false,
        focus: 0,
        run: Box::new(|b| transport::fuzz_frame_stream(b, 1 << 20).map(|_| ())),
    }
}

/// The handshake hello.
fn hello() -> Target {
    Target {
        name: "hello",
        seeds: vec![
            transport::fuzz_encode_hello("n0", [7; 32]),
            transport::fuzz_encode_hello("node-b.example", [0; 32]),
        ],
        text: false,
        focus: 0,
        run: Box::new(|b| transport::fuzz_hello(b).map(|_| ())),
    }
}

/// Topology files (`topology::ClusterSpec::parse`, then `validate`).
fn topology_toml() -> Target {
    let dir = root().join("examples/topologies");
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .expect("examples")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .map(|p| std::fs::read(p).expect("readable"))
        .collect();
    seeds.sort();
    Target {
        name: "topology",
        seeds,
        text: true,
        focus: 0,
        run: Box::new(move |b| {
            let text = std::str::from_utf8(b).map_err(|e| e.to_string())?;
            let spec = topology::ClusterSpec::parse(text, "fuzz.toml", Some(&dir))
                .map_err(|e| e.to_string())?;
            spec.validate().map_err(|e| e.to_string())
        }),
    }
}

/// `scheduler_config.json`.
fn scheduler_config() -> Target {
    Target {
        name: "scheduler",
        seeds: ["ddim", "dpm", "flow"]
            .iter()
            .map(|s| {
                read(format!(
                    "model/tests/fixtures/schedulers/{s}/scheduler_config.json"
                ))
            })
            .chain([read("assets/digits-dit/scheduler/scheduler_config.json")])
            .collect(),
        text: true,
        focus: 0,
        run: Box::new(|b| {
            let s = model::sampler::Scheduler::from_json(&json(b)?, Path::new("fuzz.json"))
                .map_err(|e| e.to_string())?;
            // A plan too: the numbers a config gives must not break the sampler.
            s.plan(7).map(|_| ()).map_err(|e| e.to_string())
        }),
    }
}

/// A transformer's `config.json`.
fn model_config() -> Target {
    Target {
        name: "model_config",
        seeds: [
            "assets/digits-dit/transformer/config.json",
            "model/tests/fixtures/dit_tiny/config.json",
            "model/tests/fixtures/pixart_tiny/config.json",
            "model/tests/fixtures/sd3_tiny/config.json",
            "model/tests/fixtures/flux_tiny/config.json",
        ]
        .iter()
        .map(read)
        .collect(),
        text: true,
        focus: 0,
        run: Box::new(|b| {
            model::ModelConfig::from_json(&json(b)?, Path::new("fuzz.json"))
                .map(|_| ())
                .map_err(|e| e.to_string())
        }),
    }
}

/// A pipeline's `model_index.json`.
fn model_index() -> Target {
    Target {
        name: "model_index",
        seeds: vec![
            read("assets/digits-dit/model_index.json"),
            read("model/tests/fixtures/sd3_pipeline/model_index.json"),
        ],
        text: true,
        focus: 0,
        run: Box::new(|b| {
            model::ModelIndex::from_json(&json(b)?, Path::new("fuzz.json"))
                .map(|_| ())
                .map_err(|e| e.to_string())
        }),
    }
}

/// A request as the coordinator's node sends it (`ControlMessage::Begin::spec`).
fn request_payload() -> Target {
    let cfg = dit_config();
    Target {
        name: "request",
        seeds: vec![
            actors::fuzzing::sample_request(&cfg, vec![1], 2),
            actors::fuzzing::sample_request(&cfg, vec![3, 7, 1], 4),
        ],
        text: false,
        focus: 0,
        run: Box::new(move |b| actors::fuzzing::decode_request(&cfg, b)),
    }
}

/// A tensor blob (a final latent, a checkpoint).
fn tensor_blob() -> Target {
    Target {
        name: "tensor",
        seeds: vec![
            actors::fuzzing::sample_tensor(&[2, 4, 8, 8]),
            actors::fuzzing::sample_tensor(&[3]),
        ],
        text: false,
        focus: 0,
        run: Box::new(actors::fuzzing::decode_tensor),
    }
}

/// A model folder's weights file (safetensors header and tensors) loaded as a transformer.
fn weights_file() -> Target {
    let dir = std::env::temp_dir().join(format!("pipefuse-fuzz-weights-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(
        dir.join("config.json"),
        read("model/tests/fixtures/dit_tiny/config.json"),
    )
    .expect("config");
    let seed = read("model/tests/fixtures/dit_tiny/diffusion_pytorch_model.safetensors");
    // The header: an 8-byte length, then that much JSON (where every decision is made).
    let header = 8 + u64::from_le_bytes(seed[..8].try_into().expect("8 bytes")) as usize;
    Target {
        name: "weights",
        seeds: vec![seed],
        text: false,
        focus: header,
        run: Box::new(move |b| {
            std::fs::write(dir.join("diffusion_pytorch_model.safetensors"), b)
                .map_err(|e| e.to_string())?;
            let device = kernels::Device::cpu(1).map_err(|e| e.to_string())?;
            model::Transformer::load(&dir, None, device)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }),
    }
}
