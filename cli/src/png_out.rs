//! PNG output: images `[B, C, H, W]` with values in [0, 1] (C = 1 grayscale, C = 3 RGB) as one
//! grid, through the `image` crate.

use std::path::Path;

use anyhow::{bail, Context, Result};
use image::{ImageBuffer, Luma, Rgb};
use kernels::Tensor;

/// Grey level between tiles.
const GAP: u8 = 128;

/// Grid layout: up to 10 columns, `scale`x nearest-neighbour upscaling, a mid-grey gap of one
/// image pixel after each tile.
pub(crate) fn write_grid(path: &Path, images: &Tensor, scale: usize) -> Result<()> {
    let &[b, c, h, w] = images.shape() else {
        bail!("images must be [B, C, H, W], got {:?}", images.shape());
    };
    if c != 1 && c != 3 {
        bail!("{c}-channel images cannot be written as PNG (1 or 3 channels)");
    }
    let v = images.as_f32()?;
    let cols = b.clamp(1, 10);
    let (gw, gh) = grid_size(b, h, w, scale)?;
    let (tw, th) = ((w + 1) * scale, (h + 1) * scale);
    let px = |i: usize, ch: usize, y: usize, x: usize| -> u8 {
        let f = v[((i * c + ch) * h + y) * w + x];
        (f.clamp(0.0, 1.0) * 255.0).round() as u8
    };
    let at = |gx: u32, gy: u32| -> Option<(usize, usize, usize)> {
        let (gx, gy) = (gx as usize, gy as usize);
        let (i, x, y) = (
            (gy / th) * cols + gx / tw,
            (gx % tw) / scale,
            (gy % th) / scale,
        );
        (i < b && x < w && y < h).then_some((i, y, x))
    };
    let image: image::DynamicImage = if c == 1 {
        ImageBuffer::from_fn(gw, gh, |gx, gy| {
            Luma([at(gx, gy).map_or(GAP, |(i, y, x)| px(i, 0, y, x))])
        })
        .into()
    } else {
        ImageBuffer::from_fn(gw, gh, |gx, gy| {
            Rgb(at(gx, gy).map_or([GAP; 3], |(i, y, x)| {
                [px(i, 0, y, x), px(i, 1, y, x), px(i, 2, y, x)]
            }))
        })
        .into()
    };
    let mut png = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut png, image::ImageFormat::Png)
        .with_context(|| format!("encoding {}", path.display()))?;
    crate::output_file::write_output(path, png.get_ref(), "--out")
}

/// The upscaling that makes each tile at least 96 pixels on its shorter side.
pub(crate) fn auto_scale(h: usize, w: usize) -> usize {
    96usize.div_ceil(h.min(w).max(1)).max(1)
}

/// The grid's width and height in pixels for `b` images of `h` x `w` at `scale`, refused (naming
/// --png-scale) beyond 2^28 pixels (768 MiB of RGB) before anything is allocated.
pub(crate) fn grid_size(b: usize, h: usize, w: usize, scale: usize) -> Result<(u32, u32)> {
    if scale == 0 {
        bail!("--png-scale 0: the scale is a whole number >= 1");
    }
    let cols = b.clamp(1, 10);
    let rows = b.div_ceil(cols);
    let size = |n: usize, side: usize| n.checked_mul(side.checked_add(1)?)?.checked_mul(scale);
    match (size(cols, w), size(rows, h)) {
        (Some(gw), Some(gh)) if gw.checked_mul(gh).is_some_and(|p| p <= 1 << 28) => {
            Ok((gw as u32, gh as u32))
        }
        _ => bail!(
            "--png-scale {scale}: a grid of {b} images of {h}x{w} pixels at that scale is too \
             large (at most 2^28 pixels)"
        ),
    }
}
