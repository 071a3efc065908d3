//! IDX files (the MNIST format), gzipped or not.
//!
//! Magic: two zero bytes, a type code (0x08 unsigned byte, 0x0C big-endian
//! int32 are the ones read here), the number of dimensions, then each
//! dimension as a big-endian u32, then the data in row-major order.

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// The content of an IDX file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Idx {
    pub dims: Vec<usize>,
    pub data: IdxData,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdxData {
    U8(Vec<u8>),
    I32(Vec<i32>),
}

impl Idx {
    /// The values as i64 (labels).
    pub fn to_i64(&self) -> Vec<i64> {
        match &self.data {
            IdxData::U8(v) => v.iter().map(|&x| x as i64).collect(),
            IdxData::I32(v) => v.iter().map(|&x| x as i64).collect(),
        }
    }
}

/// The first of `name` and `name.gz` that exists in `dir`.
pub fn find(dir: &Path, name: &str) -> Option<std::path::PathBuf> {
    [dir.join(name), dir.join(format!("{name}.gz"))]
        .into_iter()
        .find(|p| p.is_file())
}

/// Reads an IDX file; gzip is recognised by its magic bytes.
pub fn read(path: &Path) -> Result<Idx> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bytes = if raw.starts_with(&[0x1F, 0x8B]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::format(path, None, format!("corrupt gzip data ({e})")))?;
        out
    } else {
        raw
    };
    parse(path, &bytes)
}

pub(crate) fn parse(path: &Path, b: &[u8]) -> Result<Idx> {
    let bad = |msg: String| Error::format(path, None, msg);
    if b.len() < 4 || b[0] != 0 || b[1] != 0 {
        return Err(bad("not an IDX file (bad magic number)".into()));
    }
    let (code, ndim) = (b[2], b[3] as usize);
    let elem = match code {
        0x08 => 1,
        0x0C => 4,
        other => {
            return Err(bad(format!(
                "IDX type code {other:#04x} is not supported (expected 0x08 unsigned byte or 0x0c int32)"
            )))
        }
    };
    if ndim == 0 || b.len() < 4 + 4 * ndim {
        return Err(bad("truncated IDX header".into()));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| {
            u32::from_be_bytes([b[4 + 4 * i], b[5 + 4 * i], b[6 + 4 * i], b[7 + 4 * i]]) as usize
        })
        .collect();
    let count = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let body = &b[4 + 4 * ndim..];
    let need = count.and_then(|c| c.checked_mul(elem));
    if need != Some(body.len()) {
        return Err(bad(format!(
            "IDX dimensions {dims:?} need {} bytes of data, the file has {}",
            need.map_or("too many".into(), |n| n.to_string()),
            body.len()
        )));
    }
    let data = if elem == 1 {
        IdxData::U8(body.to_vec())
    } else {
        IdxData::I32(
            body.chunks_exact(4)
                .map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    };
    Ok(Idx { dims, data })
}

/// Encodes an IDX file (for fixtures and tests).
pub fn encode(dims: &[usize], data: &IdxData) -> Vec<u8> {
    let code = match data {
        IdxData::U8(_) => 0x08,
        IdxData::I32(_) => 0x0C,
    };
    let mut out = vec![0, 0, code, dims.len() as u8];
    for &d in dims {
        out.extend_from_slice(&(d as u32).to_be_bytes());
    }
    match data {
        IdxData::U8(v) => out.extend_from_slice(v),
        IdxData::I32(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_be_bytes())),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_plain_and_gzipped_files_of_both_types() {
        let dir = std::env::temp_dir().join(format!("gl-idx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let labels = IdxData::I32(vec![300, -1, 7]);
        let plain = dir.join("l.idx");
        std::fs::write(&plain, encode(&[3], &labels)).unwrap();
        assert_eq!(read(&plain).unwrap().to_i64(), vec![300, -1, 7]);
        let images = IdxData::U8((0..12).collect());
        let gz = dir.join("i.idx.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&encode(&[3, 2, 2], &images)).unwrap();
        std::fs::write(&gz, enc.finish().unwrap()).unwrap();
        let idx = read(&gz).unwrap();
        assert_eq!(idx.dims, vec![3, 2, 2]);
        assert_eq!(idx.data, images);

        let mut short = encode(&[3, 2, 2], &images);
        short.pop();
        std::fs::write(&plain, &short).unwrap();
        assert!(read(&plain)
            .unwrap_err()
            .to_string()
            .contains("need 12 bytes"));
        std::fs::write(&plain, [0, 0, 0x0D, 1, 0, 0, 0, 1, 0, 0, 0, 0]).unwrap();
        assert!(read(&plain)
            .unwrap_err()
            .to_string()
            .contains("type code 0x0d"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
