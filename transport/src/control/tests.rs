use super::*;

/// An opaque payload of `n` bytes (the runtime's encoding of a request or a tensor).
fn payload(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// One message of every variant.
pub(crate) fn samples() -> Vec<ControlMessage> {
    vec![
        ControlMessage::Begin {
            request: 1,
            device: 2,
            spec: payload(300, 1),
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
            sent_to: vec![(0, 1 << 32), (3, (1 << 32) + 7)],
            latent: Some(payload(1024, 2)),
        },
        ControlMessage::DeviceFailed {
            request: 1,
            device: 3,
            step: Some(4),
            message: "stalled: no input within 5s".into(),
            lost_peer: Some(1),
        },
        ControlMessage::NodeReady {
            node: "node-b".into(),
            devices: vec![2, 3],
        },
        ControlMessage::Checkpoint {
            request: 1,
            device: 3,
            step: 7,
            latent: payload(512, 3),
            history: Some(payload(512, 4)),
        },
        ControlMessage::Reconfigure {
            epoch: 2,
            members: vec!["n0".into(), "n2".into()],
            floor: 17,
        },
        ControlMessage::Reconfigured {
            epoch: 2,
            error: Some("node n2: cannot load layers 2..4".into()),
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
fn oversize_bytes_are_refused_before_validation() {
    let bytes = encode_control(&samples()[0]).unwrap();
    let e = err_text(decode_control_with_limit(&bytes, bytes.len() - 1));
    assert!(e.contains("more than the maximum"), "{e}");
    assert!(decode_control_with_limit(&bytes, bytes.len()).is_ok());
    let huge = vec![0u8; DEFAULT_MAX_CONTROL_BYTES + 1];
    assert!(err_text(decode_control(&huge)).contains("more than the maximum"));
}

/// A `Begin` with a 1 MiB request (its noise) encodes to a little more than 1 MiB and decodes
/// exactly.
#[test]
fn a_mib_of_noise_round_trips() {
    let msg = ControlMessage::Begin {
        request: 9,
        device: 1,
        spec: payload(1 << 20, 3),
    };
    let bytes = encode_control(&msg).unwrap();
    assert!(
        bytes.len() > 1 << 20 && bytes.len() < (1 << 20) + 4096,
        "{}",
        bytes.len()
    );
    assert_eq!(decode_control(&bytes).unwrap(), msg);
}
