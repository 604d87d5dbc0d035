//! Tensors on the wire, one encoding everywhere: a dtype, a shape and the elements' little-endian
//! bytes, taken from and put back into a tensor by `kernels` (`Tensor::to_le_bytes` /
//! `from_le_bytes`: the one path a device backend implements, device <-> pinned host buffer).
//! Frames carry the dtype and shape in their header; control payloads carry tensors as blobs
//! (`[u8 dtype][u8 rank][u32 LE dims][bytes]`). This module is the only place that knows both
//! tensors and the transport's types (the transport carries bytes; the model works on tensors).

use kernels::{DType, Tensor};
use topology::schedule::Part;
use transport::{Frame, FrameHeader, FrameLabel, TransportError, WireDType, PART_WHOLE};

use crate::error::{ClusterError, Result};

/// The wire code of a part.
pub(crate) fn part_code(part: Part) -> u32 {
    match part {
        Part::Whole => PART_WHOLE,
        Part::Patch(p) => p as u32,
    }
}

/// The part a wire code names.
pub(crate) fn part_of(code: u32) -> Part {
    if code == PART_WHOLE {
        Part::Whole
    } else {
        Part::Patch(code as usize)
    }
}

/// The label of a work item's input: latent rows for stage 0, hidden states for any other.
pub(crate) fn item_label(to_first_stage: bool, step: usize, part: Part) -> FrameLabel {
    let (step, part) = (step as u32, part_code(part));
    match to_first_stage {
        true => FrameLabel::Latent { step, part },
        false => FrameLabel::Hidden { step, part },
    }
}

/// The (step, part) a work-item label names (`None` for a collective part).
pub(crate) fn item_of(label: FrameLabel) -> Option<(usize, Part)> {
    match label {
        FrameLabel::Hidden { step, part } | FrameLabel::Latent { step, part } => {
            Some((step as usize, part_of(part)))
        }
        FrameLabel::Collective { .. } => None,
    }
}

/// Most dimensions a tensor on the wire may have.
const MAX_RANK: usize = 8;

/// The wire name of a dtype.
fn wire_dtype(d: DType) -> WireDType {
    match d {
        DType::F32 => WireDType::F32,
        DType::F16 => WireDType::F16,
        DType::BF16 => WireDType::BF16,
    }
}

/// The dtype a wire name stands for.
fn dtype_of(d: WireDType) -> DType {
    match d {
        WireDType::F32 => DType::F32,
        WireDType::F16 => DType::F16,
        WireDType::BF16 => DType::BF16,
    }
}

/// A frame carrying `t` labelled `label`.
pub(crate) fn encode(request: u64, from: usize, label: FrameLabel, t: &Tensor) -> Result<Frame> {
    Ok(Frame {
        header: FrameHeader {
            request,
            from,
            label,
            dtype: wire_dtype(t.dtype()),
            shape: t.shape().iter().map(|&d| d as u32).collect(),
        },
        payload: t.to_le_bytes()?,
    })
}

/// The tensor in a frame (after checking the payload length against the header).
pub(crate) fn decode(frame: &Frame) -> Result<Tensor> {
    frame.validate()?;
    let shape: Vec<usize> = frame.header.shape.iter().map(|&d| d as usize).collect();
    let dtype = dtype_of(frame.header.dtype);
    Tensor::from_le_bytes(dtype, &shape, &frame.payload).map_err(|e| {
        TransportError::Malformed {
            from: frame.header.from,
            message: e.to_string(),
        }
        .into()
    })
}

/// Appends `t` as a blob: `[u8 dtype][u8 rank][u32 LE dims][bytes]`.
pub(crate) fn put_tensor(out: &mut Vec<u8>, t: &Tensor) -> Result<()> {
    if t.shape().len() > MAX_RANK || t.shape().iter().any(|&d| u32::try_from(d).is_err()) {
        return Err(ClusterError::BadRequest(format!(
            "tensor of shape {:?} cannot be written",
            t.shape()
        )));
    }
    out.push(match t.dtype() {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    });
    out.push(t.shape().len() as u8);
    for &d in t.shape() {
        out.extend_from_slice(&(d as u32).to_le_bytes());
    }
    out.extend_from_slice(&t.to_le_bytes()?);
    Ok(())
}

/// Reads a blob of [`put_tensor`] from the front of `bytes`, advancing it; errors (naming `what`)
/// instead of reading past the end, with checked arithmetic before any allocation.
pub(crate) fn take_tensor(bytes: &mut &[u8], what: &str) -> Result<Tensor> {
    let bad = |m: String| ClusterError::BadRequest(format!("{what}: {m}"));
    let take = |bytes: &mut &[u8], n: usize| -> Result<Vec<u8>> {
        if bytes.len() < n {
            return Err(bad(format!(
                "ends after {} bytes, {n} more needed",
                bytes.len()
            )));
        }
        let (head, rest) = bytes.split_at(n);
        *bytes = rest;
        Ok(head.to_vec())
    };
    let head = take(bytes, 2)?;
    let dtype = match head[0] {
        0 => DType::F32,
        1 => DType::F16,
        2 => DType::BF16,
        d => return Err(bad(format!("unknown dtype {d}"))),
    };
    let rank = head[1] as usize;
    if rank > MAX_RANK {
        return Err(bad(format!("rank {rank} exceeds {MAX_RANK}")));
    }
    let dims = take(bytes, 4 * rank)?;
    let shape: Vec<usize> = dims
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let n = shape
        .iter()
        .try_fold(dtype.size_in_bytes(), |n, &d| n.checked_mul(d))
        .filter(|&n| n <= bytes.len())
        .ok_or_else(|| {
            bad(format!(
                "shape {shape:?} needs more bytes than the {} left",
                bytes.len()
            ))
        })?;
    let data = take(bytes, n)?;
    Tensor::from_le_bytes(dtype, &shape, &data).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tensor_survives_the_round_trip() {
        let t =
            Tensor::from_vec((0..24).map(|i| i as f32 * 0.5 - 3.0).collect(), &[2, 3, 4]).unwrap();
        let f = encode(9, 1, item_label(false, 4, Part::Patch(2)), &t).unwrap();
        assert_eq!(f.header.label, FrameLabel::Hidden { step: 4, part: 2 });
        assert_eq!(item_of(f.header.label), Some((4, Part::Patch(2))));
        assert_eq!(part_of(part_code(Part::Whole)), Part::Whole);
        let back = decode(&f).unwrap();
        assert_eq!(back.shape(), t.shape());
        assert_eq!(back.as_f32().unwrap(), t.as_f32().unwrap());
        // Other dtypes keep theirs.
        let half = t.to_dtype(DType::BF16).unwrap();
        let f = encode(9, 1, item_label(true, 0, Part::Whole), &half).unwrap();
        assert_eq!((f.header.dtype, f.payload.len()), (WireDType::BF16, 48));
        assert_eq!(
            decode(&f).unwrap().to_vec_f32().unwrap(),
            half.to_vec_f32().unwrap()
        );
    }

    #[test]
    fn blobs_round_trip_and_bad_ones_are_refused() {
        let a = Tensor::from_vec(vec![1.5, -2.0, 3.25], &[3]).unwrap();
        let b = Tensor::from_vec(vec![0.5; 4], &[1, 2, 2])
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let mut out = Vec::new();
        put_tensor(&mut out, &a).unwrap();
        put_tensor(&mut out, &b).unwrap();
        let mut r = &out[..];
        assert_eq!(
            take_tensor(&mut r, "a").unwrap().as_f32().unwrap(),
            a.as_f32().unwrap()
        );
        let back = take_tensor(&mut r, "b").unwrap();
        assert_eq!((back.dtype(), back.shape()), (DType::F16, &[1, 2, 2][..]));
        assert!(r.is_empty());
        // Every truncation is an error naming the tensor, never a panic.
        for cut in 0..out.len() {
            let mut r = &out[..cut];
            let first = take_tensor(&mut r, "noise");
            if cut < 2 + 4 + 12 {
                let e = first.unwrap_err().to_string();
                assert!(e.contains("noise"), "{e}");
            }
        }
        // A shape whose byte count overflows, a bad dtype, a huge rank.
        let mut huge = vec![0u8, 3];
        for _ in 0..3 {
            huge.extend_from_slice(&u32::MAX.to_le_bytes());
        }
        let e = take_tensor(&mut &huge[..], "latent")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("latent: shape") && e.contains("needs more bytes"),
            "{e}"
        );
        assert!(take_tensor(&mut &[7u8, 0][..], "x")
            .unwrap_err()
            .to_string()
            .contains("unknown dtype 7"));
        assert!(take_tensor(&mut &[0u8, 9][..], "x")
            .unwrap_err()
            .to_string()
            .contains("rank 9"));
    }
}
