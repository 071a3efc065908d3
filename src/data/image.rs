//! The decoded image type and its colour conversions.

/// An 8-bit image: `height` rows of `width` pixels of `channels` (1 = grey,
/// 3 = RGB) interleaved samples, top row first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<u8>,
}

impl Image {
    /// An image over `data`, which must hold `width * height * channels` bytes.
    pub fn new(width: usize, height: usize, channels: usize, data: Vec<u8>) -> Self {
        debug_assert_eq!(data.len(), width * height * channels);
        Image {
            width,
            height,
            channels,
            data,
        }
    }

    /// The image with `channels` channels: grey is repeated into RGB, RGB is
    /// turned into luma with the weights of ITU-R 601 (as PIL's `convert("L")`).
    pub fn into_channels(self, channels: usize) -> Image {
        match (self.channels, channels) {
            (1, 3) => {
                let data = self.data.iter().flat_map(|&v| [v, v, v]).collect();
                Image::new(self.width, self.height, 3, data)
            }
            (3, 1) => {
                let data = self
                    .data
                    .chunks_exact(3)
                    .map(|p| luma(p[0], p[1], p[2]))
                    .collect();
                Image::new(self.width, self.height, 1, data)
            }
            _ => self,
        }
    }
}

/// PIL's fixed-point luma: (299 R + 587 G + 114 B) / 1000, rounded.
#[inline]
pub(crate) fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_conversions() {
        let grey = Image::new(2, 1, 1, vec![10, 200]);
        let rgb = grey.clone().into_channels(3);
        assert_eq!(rgb.data, vec![10, 10, 10, 200, 200, 200]);
        assert_eq!(rgb.into_channels(1), grey);
        assert_eq!(luma(255, 0, 0), 76);
        assert_eq!(luma(0, 255, 0), 150);
        assert_eq!(luma(0, 0, 255), 29);
    }
}
