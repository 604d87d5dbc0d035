use super::*;

fn tensor(shape: &[u32], seed: f32) -> WireTensor {
    let n: u32 = shape.iter().product();
    WireTensor::new(
        shape.to_vec(),
        (0..n).map(|i| seed + i as f32 * 0.25).collect(),
    )
    .unwrap()
}

fn spec(noise_elems: u32) -> RequestSpec {
    RequestSpec {
        class_labels: vec![207, 360],
        caption: Some(tensor(&[2, 3, 4], 1.0)),
        caption_mask: Some(tensor(&[2, 3], 0.0)),
        negative_caption: None,
        negative_caption_mask: Some(tensor(&[], 7.0)),
        guidance_scale: 4.5,
        latent_size: [32, 32],
        steps: 20,
        scheduler_json: r#"{"_class_name": "DDIMScheduler"}"#.into(),
        noise: tensor(&[1, noise_elems], -3.0),
        patches: vec![[0, 128], [128, 256]],
        warmup: 1,
        stages: 2,
        cfg_degree: 1,
        sp_degree: 1,
    }
}

/// One message of every variant.
pub(crate) fn samples() -> Vec<ControlMessage> {
    vec![
        ControlMessage::Begin {
            request: 1,
            device: 2,
            spec: spec(64),
        },
        ControlMessage::BeginAck {
            request: 1,
            device: 2,
            error: Some("out of memory".into()),
        },
        ControlMessage::BeginAck {
            request: 1,
            device: 3,
            error: None,
        },
        ControlMessage::Abort { request: u64::MAX },
        ControlMessage::StepDone {
            request: 1,
            step: 19,
        },
        ControlMessage::StageFinished {
            request: 1,
            device: 2,
            busy_ns: 123_456_789,
            exchange_wait_ns: 0,
            items: 40,
            bytes_sent: 1 << 33,
            latent: Some(tensor(&[1, 4, 8, 8], 0.5)),
        },
        ControlMessage::DeviceFailed {
            request: 1,
            device: 3,
            step: Some(4),
            message: "stalled: no input within 5s".into(),
        },
        ControlMessage::NodeReady {
            node: "node-b".into(),
            devices: vec![2, 3],
        },
    ]
}

fn err_text(r: Result<ControlMessage, TransportError>) -> String {
    match r {
        Err(e @ TransportError::InvalidControl { node: None, .. }) => e.to_string(),
        other => panic!("expected InvalidControl, got {other:?}"),
    }
}

#[test]
fn every_variant_round_trips_at_any_alignment() {
    for msg in samples() {
        let bytes = encode_control(&msg).unwrap();
        assert_eq!(decode_control(&bytes).unwrap(), msg);
        // The same bytes at an odd address are copied, not refused.
        let mut shifted = vec![0u8; bytes.len() + 1];
        shifted[1..].copy_from_slice(&bytes);
        assert_eq!(
            decode_control(&shifted[1..]).unwrap(),
            msg,
            "{}",
            msg.name()
        );
    }
    let m = &samples()[0];
    assert_eq!((m.name(), m.request()), ("Begin", Some(1)));
    assert_eq!(samples()[7].request(), None);
}

#[test]
fn truncated_and_garbage_bytes_are_refused_without_panics() {
    assert!(err_text(decode_control(&[])).contains("empty"));
    assert!(err_text(decode_control(&[0xff; 512])).contains("validation"));
    let begin = encode_control(&samples()[0]).unwrap();
    let mut refused = 0;
    for cut in 0..begin.len() {
        // rkyv reads the root from the end, so a cut may happen to look valid; it must never
        // panic, and a cut that decodes is still a checked message.
        match decode_control(&begin[..cut]) {
            Err(TransportError::InvalidControl { .. }) => refused += 1,
            Err(e) => panic!("unexpected error {e}"),
            Ok(m) => m.validate().unwrap(),
        }
    }
    assert!(
        refused * 10 >= begin.len() * 9,
        "{refused} of {} truncations refused",
        begin.len()
    );
    // Corrupting any single byte never panics.
    let mut bytes = begin.clone();
    for i in 0..bytes.len() {
        let keep = bytes[i];
        bytes[i] ^= 0xa5;
        if let Ok(m) = decode_control(&bytes) {
            m.validate().unwrap();
        }
        bytes[i] = keep;
    }
    // Pseudo-random garbage of many lengths.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for len in 0..600 {
        let garbage: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        if let Ok(m) = decode_control(&garbage) {
            m.validate().unwrap();
        }
    }
}

#[test]
fn tensor_shape_must_match_its_data() {
    let e = WireTensor::new(vec![2, 3], vec![0.0; 5]).unwrap_err();
    assert!(e.to_string().contains("has 6 elements, data has 5"), "{e}");
    let e = WireTensor::new(vec![u32::MAX; 3], vec![]).unwrap_err();
    assert!(e.to_string().contains("overflows"), "{e}");
    let e = WireTensor::new(vec![1; 9], vec![0.0]).unwrap_err();
    assert!(e.to_string().contains("rank 9"), "{e}");
    assert_eq!(WireTensor::new(vec![], vec![1.0]).unwrap().data, [1.0]);

    // The sender refuses to encode it, naming the field...
    let mut s = spec(8);
    s.noise.data.pop();
    let bad = ControlMessage::Begin {
        request: 1,
        device: 0,
        spec: s,
    };
    let e = encode_control(&bad).unwrap_err().to_string();
    assert!(e.contains("Begin.spec.noise"), "{e}");
    // ...and the receiver refuses the bytes of a peer that skipped the check.
    let bytes = rkyv::to_bytes::<rancor::Error>(&bad).unwrap();
    let e = err_text(decode_control(&bytes));
    assert!(
        e.contains("Begin.spec.noise: shape [1, 8] has 8 elements, data has 7"),
        "{e}"
    );
    let finished = ControlMessage::StageFinished {
        request: 1,
        device: 0,
        busy_ns: 0,
        exchange_wait_ns: 0,
        items: 0,
        bytes_sent: 0,
        latent: Some(WireTensor {
            shape: vec![u32::MAX, 2],
            data: vec![],
        }),
    };
    let bytes = rkyv::to_bytes::<rancor::Error>(&finished).unwrap();
    assert!(err_text(decode_control(&bytes)).contains("StageFinished.latent"));
    let mut s = spec(4);
    s.patches[1] = [300, 200];
    let reversed = ControlMessage::Begin {
        request: 1,
        device: 0,
        spec: s,
    };
    assert!(encode_control(&reversed)
        .unwrap_err()
        .to_string()
        .contains("patches[1]: range 300..200 is reversed"));
}

#[test]
fn oversize_bytes_are_refused_before_validation() {
    let bytes = encode_control(&samples()[0]).unwrap();
    let e = err_text(decode_control_with_limit(&bytes, bytes.len() - 1));
    assert!(e.contains("more than the maximum"), "{e}");
    assert!(decode_control_with_limit(&bytes, bytes.len()).is_ok());
    let huge = vec![0u8; DEFAULT_MAX_CONTROL_BYTES + 1];
    assert!(err_text(decode_control(&huge)).contains("more than the maximum"));
}

/// A `Begin` with 1 MiB of noise encodes to a little more than 1 MiB and decodes exactly.
#[test]
fn a_mib_of_noise_round_trips() {
    let msg = ControlMessage::Begin {
        request: 9,
        device: 1,
        spec: spec(1 << 18),
    };
    let bytes = encode_control(&msg).unwrap();
    assert!(
        bytes.len() > 1 << 20 && bytes.len() < (1 << 20) + 4096,
        "{}",
        bytes.len()
    );
    assert_eq!(decode_control(&bytes).unwrap(), msg);
}
