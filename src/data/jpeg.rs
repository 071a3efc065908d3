//! JPEG decoding with libjpeg-turbo 3 (TurboJPEG API), the only unsafe code
//! of the data module.
//!
//! Besides whole images it decodes a region: rows below the region are never
//! decoded, columns outside it skip the inverse DCT and colour conversion. A
//! random crop of a training transform thus costs a fraction of a full
//! decode, and gives the pixels the full decode has there.

use std::ffi::{c_int, CStr};

use turbojpeg_sys as tj;

use super::image::Image;

/// Refuse images above this many pixels before allocating them.
pub(crate) const MAX_PIXELS: usize = 1 << 28;

/// Width in pixels of an iMCU for each TJSAMP value (444, 422, 420, GRAY,
/// 440, 411, 441), from turbojpeg.h.
const MCU_WIDTH: [usize; 7] = [8, 16, 16, 8, 8, 32, 8];

/// What the header tells.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Header {
    pub width: usize,
    pub height: usize,
    /// TJSAMP value, or -1 when the subsampling is unusual.
    subsamp: c_int,
    colorspace: c_int,
}

/// A region of the image, in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Region {
    pub x: usize,
    pub y: usize,
    pub w: usize,
    pub h: usize,
}

impl Header {
    /// Left edges of regions must fall on an iMCU boundary; `None` when
    /// cropping is unsupported (unusual subsampling).
    pub fn column_step(&self) -> Option<usize> {
        MCU_WIDTH.get(usize::try_from(self.subsamp).ok()?).copied()
    }

    pub fn is_grey(&self) -> bool {
        self.colorspace == tj::TJCS_TJCS_GRAY as c_int
    }
}

struct Decoder {
    handle: tj::tjhandle,
}

impl Decoder {
    fn new() -> Result<Self, String> {
        // SAFETY: tj3Init has no preconditions; a null handle is checked.
        let handle = unsafe { tj::tj3Init(tj::TJINIT_TJINIT_DECOMPRESS as c_int) };
        if handle.is_null() {
            return Err("cannot initialise libjpeg-turbo".into());
        }
        // SAFETY: handle is a valid decompressor.
        unsafe {
            tj::tj3Set(
                handle,
                tj::TJPARAM_TJPARAM_MAXPIXELS as c_int,
                MAX_PIXELS as c_int,
            );
            // Progressive files with absurd scan counts are a known decoding bomb.
            tj::tj3Set(handle, tj::TJPARAM_TJPARAM_SCANLIMIT as c_int, 500);
        }
        Ok(Decoder { handle })
    }

    fn error(&self) -> String {
        // SAFETY: the handle is valid and tj3GetErrorStr returns a static or
        // handle-owned NUL-terminated string.
        unsafe { CStr::from_ptr(tj::tj3GetErrorStr(self.handle)) }
            .to_string_lossy()
            .into_owned()
    }

    /// A failed call is an error, except warnings (such as extraneous bytes
    /// before a marker, common in real datasets) that leave the image whole.
    /// A truncated file is an error, as in PIL.
    fn check(&self, rc: c_int) -> Result<(), String> {
        if rc == 0 {
            return Ok(());
        }
        let msg = self.error();
        // SAFETY: valid handle.
        let code = unsafe { tj::tj3GetErrorCode(self.handle) };
        if code == tj::TJERR_TJERR_WARNING as c_int && !msg.contains("Premature end") {
            return Ok(());
        }
        if msg.contains("Premature end") {
            Err("truncated JPEG file".into())
        } else {
            Err(format!("corrupt JPEG file ({msg})"))
        }
    }

    fn header(&mut self, data: &[u8]) -> Result<Header, String> {
        // SAFETY: data is a valid buffer of data.len() bytes.
        let rc = unsafe { tj::tj3DecompressHeader(self.handle, data.as_ptr(), data.len() as _) };
        // Unlike pixel data, a header with a warning is not usable: the
        // handle may still hold the previous image's parameters.
        if rc != 0 {
            return Err(format!("corrupt JPEG file ({})", self.error()));
        }
        // SAFETY: valid handle.
        let get = |p: tj::TJPARAM| unsafe { tj::tj3Get(self.handle, p as c_int) };
        let header = Header {
            width: get(tj::TJPARAM_TJPARAM_JPEGWIDTH).max(0) as usize,
            height: get(tj::TJPARAM_TJPARAM_JPEGHEIGHT).max(0) as usize,
            subsamp: get(tj::TJPARAM_TJPARAM_SUBSAMP),
            colorspace: get(tj::TJPARAM_TJPARAM_COLORSPACE),
        };
        if header.width == 0 || header.height == 0 {
            return Err("corrupt JPEG file (zero size)".into());
        }
        if header.width.saturating_mul(header.height) > MAX_PIXELS {
            return Err(format!(
                "JPEG of {} x {} pixels is larger than the limit of {MAX_PIXELS}",
                header.width, header.height
            ));
        }
        Ok(header)
    }

    fn decode(
        &mut self,
        data: &[u8],
        header: &Header,
        region: Option<Region>,
        channels: usize,
    ) -> Result<Image, String> {
        let (sw, sh) = (header.width, header.height);
        let r = region.unwrap_or(Region {
            x: 0,
            y: 0,
            w: sw,
            h: sh,
        });
        if r.w == 0 || r.h == 0 || r.x + r.w > sw || r.y + r.h > sh {
            return Err(format!("bad JPEG region {r:?} of a {sw} x {sh} image"));
        }
        let cmyk = header.colorspace == tj::TJCS_TJCS_CMYK as c_int
            || header.colorspace == tj::TJCS_TJCS_YCCK as c_int;
        // A colour JPEG wanted grey is decoded to RGB and converted by
        // `luma`, as PIL's convert("L") and every other path do: libjpeg's
        // own grey output is the Y plane before RGB clipping (up to 41 grey
        // levels off on saturated colours).
        let (format, bpp) = if cmyk {
            (tj::TJPF_TJPF_CMYK, 4)
        } else if channels == 1 && header.is_grey() {
            (tj::TJPF_TJPF_GRAY, 1)
        } else {
            (tj::TJPF_TJPF_RGB, 3)
        };
        let mut out = vec![0u8; r.w * r.h * bpp];
        let full = region.is_none() || (r.x == 0 && r.y == 0 && r.w == sw && r.h == sh);
        // SAFETY: valid handle; the header was read from the same data just
        // before; `out` holds pitch * r.h bytes, the size the crop decodes.
        let rc = unsafe {
            let crop = if full {
                tj::tjregion {
                    x: 0,
                    y: 0,
                    w: 0,
                    h: 0,
                }
            } else {
                tj::tjregion {
                    x: r.x as c_int,
                    y: r.y as c_int,
                    w: r.w as c_int,
                    h: r.h as c_int,
                }
            };
            self.check(tj::tj3SetCroppingRegion(self.handle, crop))?;
            tj::tj3Decompress8(
                self.handle,
                data.as_ptr(),
                data.len() as _,
                out.as_mut_ptr(),
                (r.w * bpp) as c_int,
                format as c_int,
            )
        };
        self.check(rc)?;
        if cmyk {
            // Adobe writes inverted CMYK; PIL converts it the same way.
            let rgb: Vec<u8> = out
                .chunks_exact(4)
                .flat_map(|p| {
                    let k = p[3] as u32;
                    [p[0], p[1], p[2]].map(|c| ((c as u32 * k + 127) / 255) as u8)
                })
                .collect();
            return Ok(Image::new(r.w, r.h, 3, rgb).into_channels(channels));
        }
        Ok(Image::new(r.w, r.h, bpp, out).into_channels(channels))
    }
}

impl Drop for Decoder {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init and is destroyed once.
        unsafe { tj::tj3Destroy(self.handle) }
    }
}

/// A fresh decompressor for each file: a handle that decoded an image keeps
/// its parameters, and libjpeg-turbo reports success on some garbage
/// headers without overwriting them; a new handle costs microseconds.
fn with_decoder<T>(f: impl FnOnce(&mut Decoder) -> Result<T, String>) -> Result<T, String> {
    f(&mut Decoder::new()?)
}

/// The header of a JPEG file.
pub(crate) fn header(data: &[u8]) -> Result<Header, String> {
    with_decoder(|d| d.header(data))
}

/// Decodes `region` (or the whole image) to `channels` (1 or 3) channels.
pub(crate) fn decode(
    data: &[u8],
    region: Option<Region>,
    channels: usize,
) -> Result<Image, String> {
    with_decoder(|d| {
        let h = d.header(data)?;
        d.decode(data, &h, region, channels)
    })
}

/// Encodes an image with libjpeg-turbo (4:2:0 for colour); used to make test
/// fixtures and benchmark data.
pub fn encode(image: &Image, quality: u8) -> Result<Vec<u8>, String> {
    // SAFETY: tj3Init has no preconditions; a null handle is checked.
    let handle = unsafe { tj::tj3Init(tj::TJINIT_TJINIT_COMPRESS as c_int) };
    if handle.is_null() {
        return Err("cannot initialise libjpeg-turbo".into());
    }
    let (format, subsamp) = if image.channels == 1 {
        (tj::TJPF_TJPF_GRAY, tj::TJSAMP_TJSAMP_GRAY)
    } else {
        (tj::TJPF_TJPF_RGB, tj::TJSAMP_TJSAMP_420)
    };
    let mut buf: *mut u8 = std::ptr::null_mut();
    let mut size: tj::size_t = 0;
    // SAFETY: valid handle; image.data holds width * height * channels
    // bytes; the output buffer is allocated by libjpeg-turbo and freed below.
    unsafe {
        tj::tj3Set(
            handle,
            tj::TJPARAM_TJPARAM_QUALITY as c_int,
            quality as c_int,
        );
        tj::tj3Set(
            handle,
            tj::TJPARAM_TJPARAM_SUBSAMP as c_int,
            subsamp as c_int,
        );
        let rc = tj::tj3Compress8(
            handle,
            image.data.as_ptr(),
            image.width as c_int,
            (image.width * image.channels) as c_int,
            image.height as c_int,
            format as c_int,
            &mut buf,
            &mut size,
        );
        let result = if rc == 0 && !buf.is_null() {
            Ok(std::slice::from_raw_parts(buf, size as usize).to_vec())
        } else {
            Err(CStr::from_ptr(tj::tj3GetErrorStr(handle))
                .to_string_lossy()
                .into_owned())
        };
        tj::tj3Free(buf.cast());
        tj::tj3Destroy(handle);
        result
    }
}
