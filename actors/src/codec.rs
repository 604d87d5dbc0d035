//! Tensors to frames and back: the only place that knows both (the transport carries dtype,
//! shape and bytes; the model works on tensors).

use kernels::Tensor;
use topology::schedule::Part;
use transport::{Frame, FrameHeader, FrameLabel, TransportError, WireDType, PART_WHOLE};

use crate::error::Result;

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

/// A frame carrying `t` (f32, little endian) labelled `label`.
pub(crate) fn encode(request: u64, from: usize, label: FrameLabel, t: &Tensor) -> Result<Frame> {
    Ok(Frame {
        header: FrameHeader {
            request,
            from,
            label,
            dtype: WireDType::F32,
            shape: t.shape().iter().map(|&d| d as u32).collect(),
        },
        payload: bytemuck::cast_slice(t.as_f32()?).to_vec(),
    })
}

/// The tensor in a frame (after checking the payload length against the header).
pub(crate) fn decode(frame: &Frame) -> Result<Tensor> {
    frame.validate()?;
    let shape: Vec<usize> = frame.header.shape.iter().map(|&d| d as usize).collect();
    // Payloads are native-endian f32 (little endian on every supported target); one aligned copy.
    let values: Vec<f32> = match frame.header.dtype {
        WireDType::F32 => bytemuck::pod_collect_to_vec(&frame.payload),
    };
    Tensor::from_vec(values, &shape).map_err(|e| {
        TransportError::Malformed {
            from: frame.header.from,
            message: e.to_string(),
        }
        .into()
    })
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
    }
}
