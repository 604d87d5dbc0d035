//! Timestep spacings, computed with numpy's exact arithmetic (diffusers builds them with
//! `np.linspace` / `np.arange` and rounds half to even), so that step counts whose timesteps fall
//! on a .5 tie give the same integers as diffusers.

use super::Fields;
use crate::error::{ModelError, Result};

/// `timestep_spacing` of a diffusers scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Spacing {
    /// `np.linspace(0, train - 1, ...)`.
    Linspace,
    /// Multiples of `train // n` (plus `steps_offset`).
    Leading,
    /// `np.arange(train, 0, -train / n) - 1`.
    Trailing,
}

impl Spacing {
    pub(crate) fn from_fields(f: &Fields<'_>, default: &str) -> Result<Spacing> {
        match f.str("timestep_spacing", default)?.as_str() {
            "linspace" => Ok(Spacing::Linspace),
            "leading" => Ok(Spacing::Leading),
            "trailing" => Ok(Spacing::Trailing),
            other => Err(ModelError::config(
                f.path,
                "timestep_spacing",
                format!("`{other}` is not one of leading, trailing, linspace"),
            )),
        }
    }
}

/// `np.linspace(0, stop, num)` (endpoint included): `i * (stop / (num - 1))`, last = `stop`.
pub(crate) fn np_linspace(stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![0.0];
    }
    let step = stop / (num - 1) as f64;
    (0..num)
        .map(|i| if i == num - 1 { stop } else { i as f64 * step })
        .collect()
}

/// The first `n` values of `np.arange(start, 0, -step)`: `start + i * ((start - step) - start)`.
/// (numpy can produce n + 1 values here for some n; diffusers then runs an extra step at t = -1.
/// We keep exactly n.)
pub(crate) fn np_arange_down(start: f64, step: f64, n: usize) -> Vec<f64> {
    let delta = (start - step) - start;
    (0..n).map(|i| start + i as f64 * delta).collect()
}

/// Checks `num_train_timesteps` and returns it.
pub(crate) fn train_steps(f: &Fields<'_>) -> Result<usize> {
    let n = f.usize("num_train_timesteps", 1000)?;
    if n < 2 {
        return Err(ModelError::config(
            f.path,
            "num_train_timesteps",
            format!("{n} is too small (at least 2)"),
        ));
    }
    Ok(n)
}
