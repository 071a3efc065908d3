//! Image transforms: geometry, flip, and normalisation into float32 CHW.
//!
//! The geometry follows torchvision on PIL images: `RandomResizedCrop` draws
//! its box with torchvision's algorithm (ten tries, then a centre crop),
//! resizing is Pillow's antialiased bilinear filter (`fast_image_resize`
//! implements the same convolution with SIMD), and the evaluation transform
//! is `Resize(resize)` of the short side then `CenterCrop(size)`, done in one
//! resampling of the source box. A JPEG is decoded only over the box (see
//! `jpeg.rs`), at full resolution, so the pixels are those of a whole decode.
//!
//! Normalisation is a lookup table per channel (the input is 8-bit), fused
//! with the flip and the HWC -> CHW transposition.

use std::borrow::Cow;

use fast_image_resize as fir;
use serde::{Deserialize, Serialize};

use super::decode::{self, Format};
use super::image::Image;
use super::jpeg;
use crate::error::{at_least, at_most, ensure, Error, Result};
use crate::rng::Rng;

/// Pixels decoded around a JPEG region so that its chroma upsampling has
/// the neighbours it has in a whole decode (two iMCUs of 4:2:0).
const JPEG_CONTEXT: f64 = 32.0;

const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// BN-Inception's Caffe means, in BGR order on 0..255 values.
const CAFFE_BGR_MEAN: [f32; 3] = [104.0, 117.0, 128.0];

/// How 8-bit values become network inputs (saved in a run's `input.json`
/// as `{"kind": "imagenet"}`, `{"kind": "mean_std", "mean": [..], ..}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Normalization {
    /// `(v / 255 - mean) / std` with ImageNet's RGB mean and std.
    Imagenet,
    /// `v - mean` on 0..255 values in BGR order, mean [104, 117, 128]: the
    /// input of the Caffe BN-Inception the paper uses.
    CaffeBgr,
    /// `v / 255`.
    #[serde(rename = "none")]
    Unit,
    /// `(v / 255 - mean) / std`, one value per output channel.
    MeanStd { mean: Vec<f32>, std: Vec<f32> },
}

impl Normalization {
    /// `"imagenet"`, `"caffe_bgr"` or `"none"`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "imagenet" => Ok(Normalization::Imagenet),
            "caffe_bgr" => Ok(Normalization::CaffeBgr),
            "none" => Ok(Normalization::Unit),
            other => Err(Error::invalid(
                "normalization",
                format!("{other:?}"),
                "'imagenet', 'caffe_bgr', 'none' or (mean, std)",
            )),
        }
    }
}

/// The spatial part of a transform (saved in a run's `input.json` as
/// `{"geometry": "pad_crop", "pad": 0}` and the like).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "geometry", rename_all = "snake_case", deny_unknown_fields)]
pub enum Geometry {
    /// A box of `scale` times the area and aspect ratio in `ratio` (drawn
    /// log-uniformly), resized to `size` x `size`.
    RandomResizedCrop {
        scale: (f64, f64),
        ratio: (f64, f64),
    },
    /// Short side resized to `resize`, then the central `size` x `size`.
    ResizeCenterCrop { resize: usize },
    /// For small (28/32 px) images: resized to `size` if needed, padded by
    /// `pad` zero pixels on each side and cropped back to `size` at a random
    /// offset (`pad = 0`: the image passes through).
    PadCrop { pad: usize },
}

/// A box in source pixels (fractional for the centre crop).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CropBox {
    pub x: f64,
    pub y: f64,
    pub w: f64,
    pub h: f64,
}

/// Per-thread scratch memory of [`Transform::apply`].
pub struct Workspace {
    resizer: fir::Resizer,
    pixels: Vec<u8>,
    /// A random crop's pixels, copied out before resizing.
    crop: Vec<u8>,
}

impl Default for Workspace {
    fn default() -> Self {
        Workspace {
            resizer: fir::Resizer::new(),
            pixels: Vec::new(),
            crop: Vec::new(),
        }
    }
}

impl Workspace {
    pub fn new() -> Self {
        Self::default()
    }
}

/// The largest side a transform produces or resizes to: a square of it is
/// the decoders' pixel limit (2^28 pixels).
pub const MAX_SIDE: usize = 1 << 14;

/// Decode + geometry + optional horizontal flip + normalisation, producing
/// `channels x size x size` float32 values.
#[derive(Clone, Debug, PartialEq)]
pub struct Transform {
    size: usize,
    geometry: Geometry,
    flip: bool,
    normalization: Normalization,
    channels: usize,
    affine: Affine,
    /// `lut[c][v]`: output channel `c` for input value `v`.
    lut: Vec<[f32; 256]>,
    /// Input channel feeding output channel `c` (BGR swaps 0 and 2).
    source: [usize; 3],
}

/// The map from 8-bit values to network inputs that a [`Normalization`]
/// stands for: output channel `c` is `(v[source[c]] / scale - mean[c]) /
/// std[c]`, each operation in float32, in that order (what an exported
/// model repeats to reproduce the transform bit for bit).
#[derive(Clone, Debug, PartialEq)]
pub struct Affine {
    pub scale: f32,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// Input channel feeding each output channel.
    pub source: Vec<usize>,
}

impl Affine {
    fn new(scale: f32, mean: &[f32], std: &[f32], source: &[usize], channels: usize) -> Self {
        Affine {
            scale,
            mean: mean[..channels].to_vec(),
            std: std[..channels].to_vec(),
            source: source[..channels].to_vec(),
        }
    }

    /// `lut[c][v]`, and the source channels padded to 3.
    fn tables(&self) -> Tables {
        let lut = (0..self.mean.len())
            .map(|c| std::array::from_fn(|v| (v as f32 / self.scale - self.mean[c]) / self.std[c]))
            .collect();
        let mut source = [0, 1, 2];
        source[..self.source.len()].copy_from_slice(&self.source);
        (lut, source)
    }
}

impl Transform {
    /// A transform; checks every argument.
    pub fn new(
        size: usize,
        geometry: Geometry,
        flip: bool,
        normalization: Normalization,
        channels: usize,
    ) -> Result<Self> {
        at_least("size", size, 1)?;
        at_most("size", size, MAX_SIDE)?;
        ensure(
            channels == 1 || channels == 3,
            "channels",
            || channels.to_string(),
            "1 or 3",
        )?;
        match &geometry {
            Geometry::RandomResizedCrop { scale, ratio } => {
                for (arg, range) in [("scale", scale), ("ratio", ratio)] {
                    ensure(
                        range.0 > 0.0 && range.0 <= range.1 && range.1.is_finite(),
                        arg,
                        || format!("{range:?}"),
                        "(lo, hi) with 0 < lo <= hi",
                    )?;
                }
            }
            Geometry::ResizeCenterCrop { resize } => ensure(
                *resize >= size && *resize <= MAX_SIDE,
                "resize",
                || resize.to_string(),
                format!("at least size ({size}) and at most {MAX_SIDE}"),
            )?,
            Geometry::PadCrop { pad } => at_most("pad", *pad, MAX_SIDE)?,
        }
        let affine = affine(&normalization, channels)?;
        let (lut, source) = affine.tables();
        Ok(Transform {
            size,
            geometry,
            flip,
            normalization,
            channels,
            affine,
            lut,
            source,
        })
    }

    /// The training transform: RandomResizedCrop + random horizontal flip.
    pub fn random_resized_crop(
        size: usize,
        scale: (f64, f64),
        ratio: (f64, f64),
        flip: bool,
        normalization: Normalization,
        channels: usize,
    ) -> Result<Self> {
        let geometry = Geometry::RandomResizedCrop { scale, ratio };
        Transform::new(size, geometry, flip, normalization, channels)
    }

    /// The evaluation transform: resize of the short side + centre crop.
    pub fn resize_center_crop(
        size: usize,
        resize: usize,
        normalization: Normalization,
        channels: usize,
    ) -> Result<Self> {
        let geometry = Geometry::ResizeCenterCrop { resize };
        Transform::new(size, geometry, false, normalization, channels)
    }

    /// Small grey images: optional pad-and-crop jitter and flip.
    pub fn pad_crop(
        size: usize,
        pad: usize,
        flip: bool,
        normalization: Normalization,
        channels: usize,
    ) -> Result<Self> {
        Transform::new(
            size,
            Geometry::PadCrop { pad },
            flip,
            normalization,
            channels,
        )
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn channels(&self) -> usize {
        self.channels
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    pub fn flip(&self) -> bool {
        self.flip
    }

    pub fn normalization(&self) -> &Normalization {
        &self.normalization
    }

    /// What the normalisation computes, per channel.
    pub fn affine(&self) -> &Affine {
        &self.affine
    }

    /// `[channels, size, size]`.
    pub fn output_shape(&self) -> [usize; 3] {
        [self.channels, self.size, self.size]
    }

    /// Number of floats one output holds.
    pub fn output_len(&self) -> usize {
        self.channels * self.size * self.size
    }

    /// Transforms a decoded image into `out` (`output_len()` floats).
    pub fn apply(
        &self,
        image: &Image,
        rng: &mut Rng,
        out: &mut [f32],
        ws: &mut Workspace,
    ) -> std::result::Result<(), String> {
        let image = if image.channels == self.channels {
            Cow::Borrowed(image)
        } else {
            Cow::Owned(image.clone().into_channels(self.channels))
        };
        if let Geometry::PadCrop { pad } = self.geometry {
            return self.pad_crop_into(&image, pad, rng, out, ws);
        }
        let b = self.crop_box(image.width, image.height, rng);
        let flip = self.draw_flip(rng);
        self.resize_into(&image, b, flip, out, ws)
    }

    /// Decodes and transforms an encoded JPEG or PNG file into `out`. The
    /// random draws are those of [`apply`](Self::apply) on the decoded image.
    pub fn apply_encoded(
        &self,
        data: &[u8],
        rng: &mut Rng,
        out: &mut [f32],
        ws: &mut Workspace,
    ) -> std::result::Result<(), String> {
        if decode::sniff(data)? != Format::Jpeg || matches!(self.geometry, Geometry::PadCrop { .. })
        {
            return self.apply(&decode::decode(data, self.channels)?, rng, out, ws);
        }
        let header = jpeg::header(data)?;
        let b = self.crop_box(header.width, header.height, rng);
        let flip = self.draw_flip(rng);
        // Full resolution: decoding at 1/2, 1/4 or 1/8 scale inside the
        // inverse DCT is a different low-pass filter than torchvision's
        // (PIL decodes whole, then resizes), a few grey levels off.
        // The region holds the box with a margin: the resize filter's reach
        // beyond the box where the geometry filters the whole image, and
        // the chroma upsampling's context, so that every pixel used is the
        // whole decode's.
        let (w, h) = (header.width, header.height);
        let reach = match self.geometry {
            Geometry::RandomResizedCrop { .. } => 0.0,
            _ => (b.w.max(b.h) / self.size as f64).ceil() + 1.0,
        };
        let region = match header.column_step() {
            Some(step) => {
                let (x0, y0, x1, y1) = pixel_hull(b, reach + JPEG_CONTEXT, w, h);
                let x0 = x0 / step * step;
                jpeg::Region {
                    x: x0,
                    y: y0,
                    w: x1 - x0,
                    h: y1 - y0,
                }
            }
            None => jpeg::Region { x: 0, y: 0, w, h },
        };
        let image = jpeg::decode(data, Some(region), self.channels)?;
        let local = CropBox {
            x: b.x - region.x as f64,
            y: b.y - region.y as f64,
            ..b
        };
        self.resize_into(&image, local, flip, out, ws)
    }

    /// The source box of the geometry for an image of `width` x `height`.
    pub fn crop_box(&self, width: usize, height: usize, rng: &mut Rng) -> CropBox {
        let (wf, hf) = (width as f64, height as f64);
        match self.geometry {
            Geometry::RandomResizedCrop { scale, ratio } => {
                random_resized_box(width, height, scale, ratio, rng)
            }
            Geometry::ResizeCenterCrop { resize } => {
                // torchvision: Resize(int) truncates the long side, CenterCrop
                // rounds its offset.
                let (ow, oh) = if width <= height {
                    (resize, (resize as f64 * hf / wf) as usize)
                } else {
                    ((resize as f64 * wf / hf) as usize, resize)
                };
                let (ow, oh) = (ow.max(1), oh.max(1));
                let s = self.size as f64;
                // Python's round(): ties to even.
                let top = ((oh as f64 - s) / 2.0).round_ties_even().max(0.0);
                let left = ((ow as f64 - s) / 2.0).round_ties_even().max(0.0);
                let (sx, sy) = (wf / ow as f64, hf / oh as f64);
                CropBox {
                    x: left * sx,
                    y: top * sy,
                    w: (s.min(ow as f64) * sx).min(wf),
                    h: (s.min(oh as f64) * sy).min(hf),
                }
            }
            Geometry::PadCrop { .. } => CropBox {
                x: 0.0,
                y: 0.0,
                w: wf,
                h: hf,
            },
        }
    }

    fn draw_flip(&self, rng: &mut Rng) -> bool {
        self.flip && rng.next_f64() < 0.5
    }

    fn resize_into(
        &self,
        image: &Image,
        b: CropBox,
        flip: bool,
        out: &mut [f32],
        ws: &mut Workspace,
    ) -> std::result::Result<(), String> {
        let s = self.size;
        let pixel_type = if image.channels == 1 {
            fir::PixelType::U8
        } else {
            fir::PixelType::U8x3
        };
        // torchvision's RandomResizedCrop crops, then resizes the crop: its
        // filter never reads past the box's edges. Resize then centre-crop
        // filters the whole image, which the box within it reproduces.
        let (width, height, data, b) = match self.geometry {
            Geometry::RandomResizedCrop { .. } => copy_crop(image, b, &mut ws.crop),
            _ => (image.width, image.height, &image.data[..], b),
        };
        let src = fir::images::ImageRef::new(width as u32, height as u32, data, pixel_type)
            .map_err(|e| format!("resize: {e}"))?;
        ws.pixels.resize(s * s * image.channels, 0);
        let mut dst =
            fir::images::Image::from_slice_u8(s as u32, s as u32, &mut ws.pixels, pixel_type)
                .map_err(|e| format!("resize: {e}"))?;
        let options = fir::ResizeOptions::new()
            .resize_alg(fir::ResizeAlg::Convolution(fir::FilterType::Bilinear))
            .crop(b.x, b.y, b.w, b.h);
        ws.resizer
            .resize(&src, &mut dst, &options)
            .map_err(|e| format!("resize: {e}"))?;
        self.write(&ws.pixels, s, flip, out);
        Ok(())
    }

    fn pad_crop_into(
        &self,
        image: &Image,
        pad: usize,
        rng: &mut Rng,
        out: &mut [f32],
        ws: &mut Workspace,
    ) -> std::result::Result<(), String> {
        let s = self.size;
        let resized;
        let image = if image.width == s && image.height == s {
            image
        } else {
            let full = CropBox {
                x: 0.0,
                y: 0.0,
                w: image.width as f64,
                h: image.height as f64,
            };
            let mut tmp = Workspace::new();
            let plain = Transform {
                normalization: Normalization::Unit,
                ..self.clone()
            };
            let mut scratch = vec![0f32; self.output_len()];
            plain.resize_into(image, full, false, &mut scratch, &mut tmp)?;
            resized = Image::new(s, s, image.channels, tmp.pixels);
            &resized
        };
        let ox = rng.below(2 * pad as u64 + 1) as usize;
        let oy = rng.below(2 * pad as u64 + 1) as usize;
        let flip = self.draw_flip(rng);
        // Window [ox - pad, ox - pad + s) of the image, zero outside.
        let c = image.channels;
        ws.pixels.clear();
        ws.pixels.resize(s * s * c, 0);
        for y in 0..s {
            let sy = (y + oy).wrapping_sub(pad);
            if sy >= s {
                continue;
            }
            for x in 0..s {
                let sx = (x + ox).wrapping_sub(pad);
                if sx < s {
                    let (d, src) = ((y * s + x) * c, (sy * s + sx) * c);
                    ws.pixels[d..d + c].copy_from_slice(&image.data[src..src + c]);
                }
            }
        }
        self.write(&ws.pixels, s, flip, out);
        Ok(())
    }

    /// Writes `px` (`s` x `s` HWC) normalised into `out` (CHW), mirrored if
    /// `flip`.
    fn write(&self, px: &[u8], s: usize, flip: bool, out: &mut [f32]) {
        let c_in = self.channels;
        for (c, plane) in out.chunks_exact_mut(s * s).take(c_in).enumerate() {
            let lut = &self.lut[c];
            let src_c = self.source[c];
            for (row_out, row_in) in plane.chunks_exact_mut(s).zip(px.chunks_exact(s * c_in)) {
                if flip {
                    for (o, p) in row_out.iter_mut().zip(row_in.chunks_exact(c_in).rev()) {
                        *o = lut[p[src_c] as usize];
                    }
                } else {
                    for (o, p) in row_out.iter_mut().zip(row_in.chunks_exact(c_in)) {
                        *o = lut[p[src_c] as usize];
                    }
                }
            }
        }
    }
}

/// The pixels of the whole pixels `b` touches (its integer hull), copied
/// into `buf` unless that is the whole image; returns their width, height,
/// pixels and `b` within them.
fn copy_crop<'a>(
    image: &'a Image,
    b: CropBox,
    buf: &'a mut Vec<u8>,
) -> (usize, usize, &'a [u8], CropBox) {
    let (x0, y0, x1, y1) = pixel_hull(b, 0.0, image.width, image.height);
    if (x0, y0, x1, y1) == (0, 0, image.width, image.height) {
        return (image.width, image.height, &image.data, b);
    }
    let c = image.channels;
    buf.clear();
    for row in image.data.chunks_exact(image.width * c).take(y1).skip(y0) {
        buf.extend_from_slice(&row[x0 * c..x1 * c]);
    }
    let local = CropBox {
        x: b.x - x0 as f64,
        y: b.y - y0 as f64,
        ..b
    };
    (x1 - x0, y1 - y0, buf, local)
}

/// The whole pixels `(x0, y0, x1, y1)` (ends excluded) of a `width` x
/// `height` image that `b` grown by `margin` on every side touches: at
/// least one, inside the image.
fn pixel_hull(
    b: CropBox,
    margin: f64,
    width: usize,
    height: usize,
) -> (usize, usize, usize, usize) {
    let x0 = ((b.x - margin).max(0.0).floor() as usize).min(width - 1);
    let y0 = ((b.y - margin).max(0.0).floor() as usize).min(height - 1);
    let x1 = ((b.x + b.w + margin).ceil() as usize).clamp(x0 + 1, width);
    let y1 = ((b.y + b.h + margin).ceil() as usize).clamp(y0 + 1, height);
    (x0, y0, x1, y1)
}

/// torchvision's `RandomResizedCrop.get_params`, with our generator.
fn random_resized_box(
    width: usize,
    height: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut Rng,
) -> CropBox {
    let area = (width * height) as f64;
    let (log_lo, log_hi) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * rng.uniform(scale.0, scale.1);
        let aspect = rng.uniform(log_lo, log_hi).exp();
        let w = (target * aspect).sqrt().round() as usize;
        let h = (target / aspect).sqrt().round() as usize;
        if 0 < w && w <= width && 0 < h && h <= height {
            let y = rng.below((height - h + 1) as u64) as usize;
            let x = rng.below((width - w + 1) as u64) as usize;
            return CropBox {
                x: x as f64,
                y: y as f64,
                w: w as f64,
                h: h as f64,
            };
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < ratio.0 {
        (
            width,
            ((width as f64 / ratio.0).round() as usize).clamp(1, height),
        )
    } else if in_ratio > ratio.1 {
        (
            ((height as f64 * ratio.1).round() as usize).clamp(1, width),
            height,
        )
    } else {
        (width, height)
    };
    CropBox {
        x: ((width - w) / 2) as f64,
        y: ((height - h) / 2) as f64,
        w: w as f64,
        h: h as f64,
    }
}

type Tables = (Vec<[f32; 256]>, [usize; 3]);

fn affine(normalization: &Normalization, channels: usize) -> Result<Affine> {
    let affine = |scale: f32, mean: &[f32], std: &[f32], source: &[usize]| {
        Affine::new(scale, mean, std, source, channels)
    };
    let rgb = [0, 1, 2];
    let colour_only = |name: &str| {
        ensure(
            channels == 3,
            "normalization",
            || format!("{name:?} with {channels} channel(s)"),
            "'none' or (mean, std) for grey output",
        )
    };
    match normalization {
        Normalization::Imagenet => {
            colour_only("imagenet")?;
            Ok(affine(255.0, &IMAGENET_MEAN, &IMAGENET_STD, &rgb))
        }
        Normalization::CaffeBgr => {
            colour_only("caffe_bgr")?;
            Ok(affine(1.0, &CAFFE_BGR_MEAN, &[1.0; 3], &[2, 1, 0]))
        }
        Normalization::Unit => Ok(affine(255.0, &[0.0; 3], &[1.0; 3], &rgb)),
        Normalization::MeanStd { mean, std } => {
            ensure(
                mean.len() == channels && std.len() == channels,
                "normalization",
                || format!("mean of {} and std of {} values", mean.len(), std.len()),
                format!("{channels} values each (one per channel)"),
            )?;
            ensure(
                std.iter().all(|&s| s > 0.0 && s.is_finite()) && mean.iter().all(|m| m.is_finite()),
                "normalization",
                || format!("mean {mean:?} and std {std:?}"),
                "finite values with std > 0",
            )?;
            Ok(affine(255.0, mean, std, &rgb))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: usize, h: usize) -> Image {
        let mut data = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                data.extend_from_slice(&[(x * 255 / w) as u8, (y * 255 / h) as u8, 77]);
            }
        }
        Image::new(w, h, 3, data)
    }

    #[test]
    fn random_resized_box_stays_inside_and_respects_the_ranges() {
        let mut rng = Rng::new(1);
        for _ in 0..2000 {
            let b = random_resized_box(500, 375, (0.08, 1.0), (0.75, 4.0 / 3.0), &mut rng);
            assert!(b.x + b.w <= 500.0 && b.y + b.h <= 375.0 && b.w >= 1.0 && b.h >= 1.0);
            let area = b.w * b.h / (500.0 * 375.0);
            assert!((0.07..=1.0).contains(&area), "{b:?}");
        }
        // Impossible ratios fall back to the centre crop of torchvision.
        let b = random_resized_box(100, 10, (0.9, 1.0), (1.0, 1.0), &mut rng);
        assert_eq!(
            b,
            CropBox {
                x: 45.0,
                y: 0.0,
                w: 10.0,
                h: 10.0
            }
        );
    }

    #[test]
    fn centre_crop_matches_torchvision_geometry() {
        let t = Transform::resize_center_crop(224, 256, Normalization::Unit, 3).unwrap();
        let b = t.crop_box(500, 375, &mut Rng::new(0));
        // Resize(256): 341 x 256; CenterCrop(224): left round(58.5) = 58 (banker's
        // rounding in Python gives 58), top 16.
        let sx = 500.0 / 341.0;
        assert!(
            (b.x - 58.0 * sx).abs() < 1e-9 || (b.x - 59.0 * sx).abs() < 1e-9,
            "{b:?}"
        );
        assert!((b.y - 16.0 * 375.0 / 256.0).abs() < 1e-9);
        assert!((b.w - 224.0 * sx).abs() < 1e-9);
    }

    #[test]
    fn normalisation_presets() {
        let img = Image::new(1, 1, 3, vec![255, 0, 128]);
        let mut ws = Workspace::new();
        let mut out = [0f32; 3];
        let t = Transform::resize_center_crop(1, 1, Normalization::CaffeBgr, 3).unwrap();
        t.apply(&img, &mut Rng::new(0), &mut out, &mut ws).unwrap();
        assert_eq!(out, [128.0 - 104.0, 0.0 - 117.0, 255.0 - 128.0]);
        let t = Transform::resize_center_crop(1, 1, Normalization::Imagenet, 3).unwrap();
        t.apply(&img, &mut Rng::new(0), &mut out, &mut ws).unwrap();
        let want = [
            (1.0 - 0.485) / 0.229,
            (0.0 - 0.456) / 0.224,
            (128.0 / 255.0 - 0.406) / 0.225,
        ];
        for (a, b) in out.iter().zip(want) {
            assert!((a - b).abs() < 1e-5);
        }
        assert!(Transform::resize_center_crop(1, 1, Normalization::Imagenet, 1).is_err());
    }

    #[test]
    fn jpeg_region_decoding_matches_full_decoding() {
        let img = gradient(320, 240);
        let data = jpeg::encode(&img, 95).unwrap();
        let full = decode::decode(&data, 3).unwrap();
        let mut ws = Workspace::new();
        for (size, seed) in [(64, 3), (100, 4), (32, 5), (200, 6)] {
            let t = Transform::random_resized_crop(
                size,
                (0.08, 1.0),
                (0.75, 4.0 / 3.0),
                true,
                Normalization::Unit,
                3,
            )
            .unwrap();
            let mut a = vec![0f32; t.output_len()];
            let mut b = vec![0f32; t.output_len()];
            t.apply_encoded(&data, &mut Rng::new(seed), &mut a, &mut ws)
                .unwrap();
            t.apply(&full, &mut Rng::new(seed), &mut b, &mut ws)
                .unwrap();
            let worst = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            // The region's pixels are the whole decode's (a large box was
            // decoded at 1/2 to 1/8 scale: up to 0.2 apart, 50 levels).
            assert_eq!(worst, 0.0, "size {size}");
        }
    }

    #[test]
    fn pad_crop_shifts_and_flips() {
        let data: Vec<u8> = (0..16).map(|v| v * 10).collect();
        let img = Image::new(4, 4, 1, data);
        let mut ws = Workspace::new();
        let plain = Transform::pad_crop(4, 0, false, Normalization::Unit, 1).unwrap();
        let mut out = vec![0f32; 16];
        plain
            .apply(&img, &mut Rng::new(0), &mut out, &mut ws)
            .unwrap();
        let want: Vec<f32> = img.data.iter().map(|&v| v as f32 / 255.0).collect();
        assert_eq!(out, want);
        let jitter = Transform::pad_crop(4, 2, true, Normalization::Unit, 1).unwrap();
        let mut saw_shift = false;
        for seed in 0..20 {
            jitter
                .apply(&img, &mut Rng::new(seed), &mut out, &mut ws)
                .unwrap();
            let nonzero = out.iter().filter(|&&v| v > 0.0).count();
            saw_shift |= nonzero < 15;
            assert!(out.iter().all(|v| want.contains(v) || *v == 0.0));
        }
        assert!(saw_shift);
        // A flip mirrors each row, in about half the draws.
        let flipping = Transform::pad_crop(4, 0, true, Normalization::Unit, 1).unwrap();
        let mirrored: Vec<f32> = want
            .chunks(4)
            .flat_map(|row| row.iter().rev().copied())
            .collect();
        let mut flips = 0;
        for seed in 0..20 {
            flipping
                .apply(&img, &mut Rng::new(seed), &mut out, &mut ws)
                .unwrap();
            if out == mirrored {
                flips += 1;
            } else {
                assert_eq!(out, want, "seed {seed}: neither the image nor its mirror");
            }
        }
        assert!((3..=17).contains(&flips), "{flips} flips in 20 draws");
        // 28 px input to a 32 px output is resized.
        let t = Transform::pad_crop(32, 0, false, Normalization::Unit, 1).unwrap();
        let mut out = vec![0f32; 32 * 32];
        t.apply(
            &Image::new(28, 28, 1, vec![200; 784]),
            &mut Rng::new(0),
            &mut out,
            &mut ws,
        )
        .unwrap();
        assert!(out.iter().all(|&v| (v - 200.0 / 255.0).abs() < 1e-6));
    }
}
