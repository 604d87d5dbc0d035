//! The bytes on a stream: a kind byte ([`STREAM_FRAMES`] or [`STREAM_CONTROL`]) opens every
//! unidirectional stream; frames are `[u32 LE header length][rkyv WireHeader][raw payload]`;
//! the handshake hello has its own fixed layout. Decoding validates everything before it
//! allocates the payload, and reports a problem as [`ReadFail::Malformed`], never a panic.
//! Generic over `AsyncRead`, so the TCP baseline of the benchmark uses the same code as QUIC.

use bytes::Bytes;
use rkyv::util::AlignedVec;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::{CollectiveOp, Frame, FrameHeader, FrameLabel, PeerGroupKind, WireDType};

/// First byte of a unidirectional stream of activation frames.
pub(crate) const STREAM_FRAMES: u8 = 0;
/// First byte of a node's control stream (one per direction per pair of nodes).
pub(crate) const STREAM_CONTROL: u8 = 1;
/// Most dimensions a payload shape may have.
pub(crate) const MAX_RANK: usize = 8;
/// Bytes before the payload of every frame: length prefix + archived header (fixed size).
#[cfg(test)]
const ENVELOPE_BYTES: usize = 4 + std::mem::size_of::<ArchivedWireHeader>();
/// Largest accepted encoded header (the real one is a few dozen bytes).
pub(crate) const MAX_HEADER_LEN: usize = 1024;

/// The envelope of one frame: [`FrameHeader`] plus the destination device. Fixed-size numbers
/// only (no relative pointers), so bytecheck has little to trust.
#[derive(rkyv::Archive, rkyv::Serialize, Debug)]
pub(crate) struct WireHeader {
    request: u64,
    payload_len: u64,
    /// Collective frames: the call's sequence number (0 otherwise).
    seq: u64,
    from: u32,
    to: u32,
    /// Work-item frames: step and part (0 otherwise).
    step: u32,
    part: u32,
    /// 0 hidden states, 1 latent, 2 collective part.
    kind: u8,
    /// Collective frames: 0 sequence-parallel group, 1 CFG group.
    group: u8,
    /// Collective frames: 0 all-to-all, 1 ring shift, 2 all-gather.
    op: u8,
    dtype: u8,
    rank: u8,
    shape: [u32; MAX_RANK],
}

/// (kind, group, op, step, part, seq) codes of a label.
fn label_codes(l: FrameLabel) -> (u8, u8, u8, u32, u32, u64) {
    match l {
        FrameLabel::Hidden { step, part } => (0, 0, 0, step, part, 0),
        FrameLabel::Latent { step, part } => (1, 0, 0, step, part, 0),
        FrameLabel::Collective { group, op, seq } => {
            let group = match group {
                PeerGroupKind::SequenceParallel => 0,
                PeerGroupKind::Cfg => 1,
            };
            let op = match op {
                CollectiveOp::AllToAll => 0,
                CollectiveOp::RingShift => 1,
                CollectiveOp::AllGather => 2,
            };
            (2, group, op, 0, 0, seq)
        }
    }
}

fn dtype_code(d: WireDType) -> u8 {
    match d {
        WireDType::F32 => 0,
        WireDType::F16 => 1,
        WireDType::BF16 => 2,
    }
}

/// Why a frame could not be encoded (a caller error, reported before queueing).
pub(crate) fn check_encodable(h: &FrameHeader) -> Result<(), String> {
    if h.shape.len() > MAX_RANK {
        return Err(format!(
            "shape {:?} has rank {}, more than {MAX_RANK}",
            h.shape,
            h.shape.len()
        ));
    }
    if u32::try_from(h.from).is_err() {
        return Err(format!("device index {} does not fit in u32", h.from));
    }
    Ok(())
}

/// `[u32 LE length][rkyv header]` of `frame` for device `to`. The caller checked
/// [`check_encodable`].
pub(crate) fn encode_header(frame: &Frame, to: usize) -> Result<Bytes, String> {
    check_encodable(&frame.header)?;
    let h = &frame.header;
    let mut shape = [0u32; MAX_RANK];
    shape[..h.shape.len()].copy_from_slice(&h.shape);
    let (kind, group, op, step, part, seq) = label_codes(h.label);
    let wire = WireHeader {
        request: h.request,
        payload_len: frame.payload.len() as u64,
        seq,
        from: h.from as u32,
        to: u32::try_from(to).map_err(|_| format!("device index {to} does not fit in u32"))?,
        step,
        part,
        kind,
        group,
        op,
        dtype: dtype_code(h.dtype),
        rank: h.shape.len() as u8,
        shape,
    };
    let body = rkyv::to_bytes::<rkyv::rancor::BoxedError>(&wire).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(Bytes::from(out))
}

/// A decoded frame, its destination device and the bytes it took on the stream.
#[derive(Debug)]
pub(crate) struct Decoded {
    pub(crate) frame: Frame,
    pub(crate) to: usize,
    pub(crate) wire_bytes: usize,
}

/// Why reading a frame stopped.
#[derive(Debug)]
pub(crate) enum ReadFail {
    /// The connection or stream went away (not the bytes' fault).
    Closed(String),
    /// The peer sent bytes that are not a valid frame: the connection must be closed.
    Malformed(String),
}

/// Classifies an I/O error while reading `what` (e.g. `"a frame (header)"`).
pub(crate) fn io_fail(e: std::io::Error, what: &str) -> ReadFail {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            ReadFail::Malformed(format!("stream ended inside {what}"))
        }
        std::io::ErrorKind::ConnectionReset => {
            ReadFail::Malformed(format!("stream reset by the peer ({what}): {e}"))
        }
        _ => ReadFail::Closed(e.to_string()),
    }
}

/// Reads a `u32 LE` length prefix; `Ok(None)` is a clean end of stream before its first byte,
/// an end inside it is malformed (`what` names the prefix in the message).
pub(crate) async fn read_prefix<R: AsyncRead + Unpin>(
    r: &mut R,
    what: &str,
) -> Result<Option<u32>, ReadFail> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r
            .read(&mut len[got..])
            .await
            .map_err(|e| io_fail(e, what))?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(ReadFail::Malformed(format!("stream ended inside {what}")));
        }
        got += n;
    }
    Ok(Some(u32::from_le_bytes(len)))
}

/// Reads one frame. `Ok(None)` is a clean end of stream at a frame boundary. `hdr` is a reusable
/// aligned buffer (rkyv needs the archive aligned).
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    hdr: &mut AlignedVec<16>,
    max_frame_bytes: usize,
) -> Result<Option<Decoded>, ReadFail> {
    let Some(hlen) = read_prefix(r, "a frame (header length)").await? else {
        return Ok(None);
    };
    let hlen = hlen as usize;
    if hlen == 0 || hlen > MAX_HEADER_LEN {
        return Err(ReadFail::Malformed(format!(
            "header length {hlen} outside 1..={MAX_HEADER_LEN}"
        )));
    }
    hdr.clear();
    hdr.resize(hlen, 0);
    r.read_exact(&mut hdr[..])
        .await
        .map_err(|e| io_fail(e, "a frame (header)"))?;
    let (header, to, payload_len) = decode_header(hdr, max_frame_bytes)?;
    let mut payload = vec![0u8; payload_len];
    r.read_exact(&mut payload)
        .await
        .map_err(|e| io_fail(e, "a frame (payload)"))?;
    Ok(Some(Decoded {
        frame: Frame { header, payload },
        to,
        wire_bytes: 4 + hlen + payload_len,
    }))
}

/// Validates an archived header: bytecheck, enum codes, rank, size limit, shape product.
fn decode_header(
    bytes: &[u8],
    max_frame_bytes: usize,
) -> Result<(FrameHeader, usize, usize), ReadFail> {
    let bad = ReadFail::Malformed;
    let a = rkyv::access::<ArchivedWireHeader, rkyv::rancor::BoxedError>(bytes)
        .map_err(|e| bad(format!("header failed validation: {e}")))?;
    let (step, part) = (a.step.to_native(), a.part.to_native());
    let label = match a.kind {
        0 => FrameLabel::Hidden { step, part },
        1 => FrameLabel::Latent { step, part },
        2 => FrameLabel::Collective {
            group: match a.group {
                0 => PeerGroupKind::SequenceParallel,
                1 => PeerGroupKind::Cfg,
                g => return Err(bad(format!("unknown peer group {g}"))),
            },
            op: match a.op {
                0 => CollectiveOp::AllToAll,
                1 => CollectiveOp::RingShift,
                2 => CollectiveOp::AllGather,
                o => return Err(bad(format!("unknown collective operation {o}"))),
            },
            seq: a.seq.to_native(),
        },
        k => return Err(bad(format!("unknown frame kind {k}"))),
    };
    let dtype = match a.dtype {
        0 => WireDType::F32,
        1 => WireDType::F16,
        2 => WireDType::BF16,
        d => return Err(bad(format!("unknown dtype {d}"))),
    };
    let rank = a.rank as usize;
    if rank > MAX_RANK {
        return Err(bad(format!("rank {rank} exceeds {MAX_RANK}")));
    }
    let shape: Vec<u32> = a.shape[..rank].iter().map(|d| d.to_native()).collect();
    let payload_len = a.payload_len.to_native();
    let payload_len = usize::try_from(payload_len)
        .ok()
        .filter(|&n| n <= max_frame_bytes)
        .ok_or_else(|| {
            bad(format!(
                "payload of {payload_len} bytes exceeds the maximum frame size {max_frame_bytes}"
            ))
        })?;
    let want = shape
        .iter()
        .try_fold(dtype.size(), |n, &d| n.checked_mul(d as usize));
    if want != Some(payload_len) {
        return Err(bad(format!(
            "shape {shape:?} does not describe a payload of {payload_len} bytes"
        )));
    }
    let header = FrameHeader {
        request: a.request.to_native(),
        from: a.from.to_native() as usize,
        label,
        dtype,
        shape,
    };
    Ok((header, a.to.to_native() as usize, payload_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(shape: Vec<u32>) -> Frame {
        let n: u32 = shape.iter().product();
        Frame {
            header: FrameHeader {
                request: 9,
                from: 3,
                label: FrameLabel::Latent { step: 4, part: 1 },
                dtype: WireDType::F32,
                shape,
            },
            payload: (0..n * 4).map(|i| i as u8).collect(),
        }
    }

    fn encoded(f: &Frame) -> Vec<u8> {
        let mut b = encode_header(f, 5).unwrap().to_vec();
        b.extend_from_slice(&f.payload);
        b
    }

    #[tokio::test]
    async fn frames_round_trip_and_end_cleanly() {
        let f = frame(vec![2, 3]);
        let mut bytes = encoded(&f);
        bytes.extend(encoded(&f));
        let mut r = &bytes[..];
        let mut hdr = AlignedVec::new();
        for _ in 0..2 {
            let d = read_frame(&mut r, &mut hdr, 1 << 20)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(d.frame, f);
            assert_eq!(d.to, 5);
            assert_eq!(d.wire_bytes, bytes.len() / 2);
        }
        // The envelope is a small constant: length prefix + fixed-size archived header.
        assert_eq!(encode_header(&f, 5).unwrap().len(), ENVELOPE_BYTES);
        assert!(read_frame(&mut r, &mut hdr, 1 << 20)
            .await
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn collective_labels_round_trip() {
        for (group, op, seq) in [
            (PeerGroupKind::SequenceParallel, CollectiveOp::AllToAll, 1),
            (
                PeerGroupKind::SequenceParallel,
                CollectiveOp::RingShift,
                u64::MAX,
            ),
            (PeerGroupKind::Cfg, CollectiveOp::AllGather, 77),
        ] {
            let mut f = frame(vec![3]);
            f.header.label = FrameLabel::Collective { group, op, seq };
            let bytes = encoded(&f);
            let d = read_frame(&mut &bytes[..], &mut AlignedVec::new(), 1 << 20)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(d.frame, f);
        }
    }

    async fn fail(bytes: &[u8], max: usize) -> String {
        let mut r = bytes;
        match read_frame(&mut r, &mut AlignedVec::new(), max).await {
            Err(ReadFail::Malformed(m)) => m,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn bad_bytes_are_malformed_not_panics() {
        let good = encoded(&frame(vec![4]));
        assert!(fail(&good[..good.len() - 1], 1 << 20)
            .await
            .contains("inside a frame"));
        assert!(fail(&good[..2], 1 << 20).await.contains("inside a frame"));
        assert!(fail(&good, 8).await.contains("exceeds the maximum"));
        assert!(fail(&[0xff; 64], 1 << 20).await.contains("header length"));
        let mut garbage = vec![64, 0, 0, 0];
        garbage.extend([0xAB; 64]);
        let m = fail(&garbage, 1 << 20).await;
        assert!(m.contains("kind") || m.contains("validation"), "{m}");
        // A shape that does not match the payload length.
        let mut f = frame(vec![4]);
        f.header.shape = vec![u32::MAX, u32::MAX, u32::MAX];
        let mut b = encode_header(&f, 0).unwrap().to_vec();
        b.extend_from_slice(&f.payload);
        assert!(fail(&b, usize::MAX).await.contains("does not describe"));
        // Every truncation of a valid frame fails cleanly.
        for cut in 1..good.len() {
            fail(&good[..cut], 1 << 20).await;
        }
    }
}
