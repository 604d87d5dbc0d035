use super::*;
use crate::control::tests::samples;

/// `[u32 LE length][archive]` of each message.
fn framed(msgs: &[ControlMessage]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        let body = encode_control(m).unwrap();
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
    }
    out
}

async fn read_all(bytes: &[u8], max: usize) -> Result<Vec<(ControlMessage, usize)>, ReadFail> {
    let mut r = bytes;
    let mut buf = AlignedVec::new();
    let mut out = Vec::new();
    while let Some(m) = read_message(&mut r, &mut buf, max).await? {
        out.push(m);
    }
    Ok(out)
}

fn malformed(r: Result<Vec<(ControlMessage, usize)>, ReadFail>) -> String {
    match r {
        Err(ReadFail::Malformed(m)) => m,
        other => panic!("expected Malformed, got {other:?}"),
    }
}

#[tokio::test]
async fn a_stream_of_messages_reads_back_in_order() {
    let msgs = samples();
    let bytes = framed(&msgs);
    let got = read_all(&bytes, 1 << 20).await.unwrap();
    assert_eq!(
        got.iter().map(|g| &g.0).collect::<Vec<_>>(),
        msgs.iter().collect::<Vec<_>>()
    );
    assert_eq!(got.iter().map(|g| g.1).sum::<usize>(), bytes.len());
}

#[tokio::test]
async fn bad_lengths_and_truncations_are_malformed() {
    let bytes = framed(&samples()[..2]);
    let first = 4 + u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
    let m = malformed(read_all(&bytes, first - 5).await);
    assert!(m.contains("outside 1..="), "{m}");
    assert!(malformed(read_all(&[0, 0, 0, 0], 100).await).contains("length 0"));
    for cut in 1..bytes.len() {
        if cut == first {
            continue; // a clean end between two messages
        }
        let m = malformed(read_all(&bytes[..cut], 1 << 20).await);
        assert!(
            m.contains("stream ended inside a control message"),
            "cut {cut}: {m}"
        );
    }
    let mut garbage = vec![32, 0, 0, 0];
    garbage.extend([0xee; 32]);
    assert!(malformed(read_all(&garbage, 1 << 20).await).contains("validation"));
}

#[test]
fn devices_must_be_where_the_message_says() {
    let (a_has, b_has) = (|d: usize| d < 2, |d: usize| d == 2 || d == 3);
    let a: Side<'_> = ("node-a", &a_has);
    let b: Side<'_> = ("node-b", &b_has);
    // Every sample is valid from b (devices 2, 3) to a, except Begin, which goes a -> b.
    for m in samples() {
        let r = match m {
            ControlMessage::Begin { .. } => check_route(&m, a, b),
            _ => check_route(&m, b, a),
        };
        assert_eq!(r, Ok(()), "{}", m.name());
    }
    let begin = &samples()[0];
    let e = check_route(begin, b, a).unwrap_err();
    assert_eq!(e, "Begin names device 2, which is not on node node-a");
    let ack = ControlMessage::BeginAck {
        request: 1,
        device: 0,
        error: None,
    };
    assert!(check_route(&ack, b, a)
        .unwrap_err()
        .contains("not on node node-b"));
    let ready = ControlMessage::NodeReady {
        node: "node-c".into(),
        devices: vec![],
    };
    let e = check_route(&ready, b, a).unwrap_err();
    assert!(
        e.contains("names node node-c but comes from node node-b"),
        "{e}"
    );
}
