//! Element-wise activations, in place, split over the device's threads.

use rayon::prelude::*;

use super::math::silu_scalar;

const CHUNK: usize = 16 * 1024;

/// GELU (tanh approximation) in place.
pub(crate) fn gelu_tanh(x: &mut [f32]) {
    x.par_chunks_mut(CHUNK)
        .for_each(super::vector_math::gelu_tanh_in_place);
}

/// SiLU in place.
pub(crate) fn silu(x: &mut [f32]) {
    x.par_chunks_mut(CHUNK)
        .for_each(|c| c.iter_mut().for_each(|v| *v = silu_scalar(*v)));
}

/// Reference GELU-tanh with `f64` `tanh`.
pub fn gelu_tanh_slow(x: &[f32]) -> Vec<f32> {
    x.iter()
        .map(|&v| {
            let v = v as f64;
            (0.5 * v
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v.powi(3))).tanh()))
                as f32
        })
        .collect()
}

/// Reference SiLU with `f64` `exp`.
pub fn silu_slow(x: &[f32]) -> Vec<f32> {
    x.iter()
        .map(|&v| (v as f64 / (1.0 + (-(v as f64)).exp())) as f32)
        .collect()
}
