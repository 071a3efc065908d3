//! PNG decoding (any bit depth, palette, alpha) to 8-bit grey or RGB.

use super::image::Image;
use super::jpeg::MAX_PIXELS;

/// Decodes a PNG file to grey or RGB as stored; alpha is dropped and 16-bit samples keep their high
/// byte, as PIL's `convert("RGB")` does for colour (PIL reads 16-bit grey as `I;16`, whose
/// `convert("L")` saturates at 255 instead).
pub(crate) fn decode(data: &[u8]) -> Result<Image, String> {
    let mut decoder = png::Decoder::new_with_limits(
        data,
        png::Limits {
            bytes: MAX_PIXELS * 4,
        },
    );
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder
        .read_info()
        .map_err(|e| format!("corrupt PNG file ({e})"))?;
    let (width, height) = {
        let info = reader.info();
        (info.width as usize, info.height as usize)
    };
    if width.saturating_mul(height) > MAX_PIXELS {
        return Err(format!(
            "PNG of {width} x {height} pixels is larger than the limit of {MAX_PIXELS}"
        ));
    }
    let mut buf = vec![0u8; reader.output_buffer_size()];
    let frame = reader
        .next_frame(&mut buf)
        .map_err(|e| format!("corrupt PNG file ({e})"))?;
    let samples = frame.color_type.samples();
    let line = frame.line_size;
    let grey = samples <= 2;
    let mut out = Vec::with_capacity(width * height * if grey { 1 } else { 3 });
    for row in buf.chunks(line).take(height) {
        for px in row[..width * samples].chunks_exact(samples) {
            if grey {
                out.push(px[0]);
            } else {
                out.extend_from_slice(&px[..3]);
            }
        }
    }
    if out.len() != width * height * if grey { 1 } else { 3 } {
        return Err("corrupt PNG file (short image data)".into());
    }
    Ok(Image::new(width, height, if grey { 1 } else { 3 }, out))
}
