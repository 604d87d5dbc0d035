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

/// The most training timesteps a scheduler config may state (diffusers' configs use 1000; the
/// beta schedules hold one value per timestep).
pub(crate) const MAX_TRAIN_STEPS: usize = 100_000;

/// Checks `num_train_timesteps` (at least `min`) and returns it.
pub(crate) fn train_steps(f: &Fields<'_>, min: usize) -> Result<usize> {
    f.usize_in("num_train_timesteps", 1000, min, MAX_TRAIN_STEPS)
}

/// The "leading" timesteps `(i * ratio + offset)` for `i` in `first..first + n`, largest first.
/// diffusers adds the offset without clamping, so a largest timestep past the training range
/// fails there (an index error); here it is refused naming the fields, never clamped into
/// repeated timesteps (DPM-Solver++ divides by their zero log-SNR step).
pub(crate) fn leading(
    n: usize,
    first: usize,
    ratio: usize,
    offset: usize,
    train: usize,
) -> Result<Vec<usize>> {
    let top = (first + n - 1) * ratio + offset;
    if top >= train {
        return Err(ModelError::Input(format!(
            "{n} steps with the scheduler's \"leading\" timestep_spacing and steps_offset \
             {offset} reach timestep {top}, past its {train} training timesteps \
             (num_train_timesteps); use fewer steps or a config with a smaller steps_offset"
        )));
    }
    Ok((first..first + n)
        .rev()
        .map(|i| i * ratio + offset)
        .collect())
}

/// Checks `steps_offset` (below `num_train_timesteps`: the offset shifts the timesteps of a
/// "leading" spacing, which would otherwise all clamp to the last one) and returns it.
pub(crate) fn steps_offset(f: &Fields<'_>, train: usize) -> Result<usize> {
    let x = f.usize("steps_offset", 0)?;
    if x >= train {
        return Err(ModelError::config(
            f.path,
            "steps_offset",
            format!(
                "{x} is not below num_train_timesteps {train}; values that work: 0..={} \
                 (diffusers' configs use 0 or 1)",
                train - 1
            ),
        ));
    }
    Ok(x)
}
