//! A request's images as PNG files, one per image at its own size, for the API's `b64_json`.

use actors::ModelSource;
use anyhow::{bail, Result};
use image::{ImageBuffer, Luma, Rgb};
use kernels::Tensor;

/// Decodes `latent` `[B, C, H, W]` through the model's VAE (or takes a pixel-space model's
/// samples) and encodes each image as a PNG.
pub(crate) fn encode_each(
    model: &ModelSource,
    latent: &Tensor,
    threads: usize,
) -> Result<Vec<Vec<u8>>> {
    let images = crate::images::to_images(model, latent, threads)?; // [B, C, H, W] in [0, 1]
    let &[b, c, h, w] = images.shape() else {
        bail!("images must be [B, C, H, W], got {:?}", images.shape());
    };
    let all = images.as_f32()?;
    let each = c * h * w;
    (0..b)
        .map(|i| png(&all[i * each..(i + 1) * each], c, h, w))
        .collect()
}

/// One image `[C, H, W]` (C = 1 grey, 3 RGB) with values in [0, 1] as PNG bytes.
fn png(v: &[f32], c: usize, h: usize, w: usize) -> Result<Vec<u8>> {
    let px = |ch: usize, y: u32, x: u32| -> u8 {
        let f = v[(ch * h + y as usize) * w + x as usize];
        (f.clamp(0.0, 1.0) * 255.0).round() as u8
    };
    let (wu, hu) = (u32::try_from(w)?, u32::try_from(h)?);
    let image: image::DynamicImage = match c {
        1 => ImageBuffer::from_fn(wu, hu, |x, y| Luma([px(0, y, x)])).into(),
        3 => {
            ImageBuffer::from_fn(wu, hu, |x, y| Rgb([px(0, y, x), px(1, y, x), px(2, y, x)])).into()
        }
        _ => bail!("{c}-channel images cannot be PNG (1 or 3 channels)"),
    };
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}
