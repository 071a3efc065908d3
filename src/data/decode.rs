//! Recognising and decoding image files (JPEG, PNG) by their content.

use super::image::Image;
use super::{jpeg, png};

/// The image formats the pipeline decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Jpeg,
    Png,
}

/// The format of `data`, from its first bytes (file names may lie).
pub fn sniff(data: &[u8]) -> Result<Format, String> {
    if data.is_empty() {
        return Err("empty file".into());
    }
    if data.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Ok(Format::Jpeg)
    } else if data.starts_with(b"\x89PNG\r\n\x1a\n") {
        Ok(Format::Png)
    } else {
        let head: Vec<String> = data.iter().take(8).map(|b| format!("{b:02x}")).collect();
        Err(format!(
            "not a JPEG or PNG image (starts with {})",
            head.join(" ")
        ))
    }
}

/// Decodes a whole JPEG or PNG file to `channels` channels (1, 3, or 0 to
/// keep grey images grey and colour ones RGB).
pub fn decode(data: &[u8], channels: usize) -> Result<Image, String> {
    match sniff(data)? {
        Format::Jpeg => {
            let c = match channels {
                0 if jpeg::header(data)?.is_grey() => 1,
                0 => 3,
                c => c,
            };
            jpeg::decode(data, None, c)
        }
        Format::Png => {
            let image = png::decode(data)?;
            Ok(match channels {
                0 => image,
                c => image.into_channels(c),
            })
        }
    }
}
