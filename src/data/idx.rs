//! IDX files (the MNIST format), gzipped or not.
//!
//! Magic: two zero bytes, a type code (0x08 unsigned byte, 0x0C big-endian
//! int32 are the ones read here), the number of dimensions, then each
//! dimension as a big-endian u32, then the data in row-major order.

use std::io::{BufRead, Read};
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

/// Largest data accepted (1 GiB, 20 times Fashion-MNIST's 47 MB training
/// images): a header declaring more is refused before anything is read.
const MAX_DATA: usize = 1 << 30;

/// Reads an IDX file; gzip is recognised by its magic bytes. The header is
/// read (inflated) first: no more data than it declares is ever read, and
/// a file whose data is shorter or longer than declared is refused.
pub fn read(path: &Path) -> Result<Idx> {
    let (file, len) =
        crate::data::paths::open_regular_file(path).map_err(|e| Error::io(path, e))?;
    let mut file = std::io::BufReader::new(file);
    let magic = file.fill_buf().map_err(|e| Error::io(path, e))?;
    if magic.starts_with(&[0x1F, 0x8B]) {
        let mut gz = flate2::read::MultiGzDecoder::new(file);
        decode(path, &mut gz, None, |e| {
            Error::format(path, None, format!("corrupt gzip data ({e})"))
        })
    } else {
        decode(path, &mut file, Some(len), |e| Error::io(path, e))
    }
}

/// Parses the bytes of an IDX file named `path` (for the fuzz tests).
#[cfg(test)]
pub(crate) fn parse(path: &Path, b: &[u8]) -> Result<Idx> {
    let len = b.len() as u64;
    decode(path, &mut &b[..], Some(len), |e| Error::io(path, e))
}

/// Reads `r` as an IDX file; `len` is its length where known (not for
/// gzip); `failed` turns a read error into the error returned.
fn decode(
    path: &Path,
    r: &mut impl Read,
    len: Option<u64>,
    failed: impl Fn(std::io::Error) -> Error,
) -> Result<Idx> {
    let bad = |msg: String| Error::format(path, None, msg);
    let (elem, dims) = header(r, &bad, &failed)?;
    let need = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .and_then(|c| c.checked_mul(elem))
        .filter(|&n| n <= MAX_DATA)
        .ok_or_else(|| {
            bad(format!(
                "IDX dimensions {dims:?} declare more than the limit of {MAX_DATA} bytes of data"
            ))
        })?;
    let mismatch = |has: String| {
        bad(format!(
            "IDX dimensions {dims:?} need {need} bytes of data, the file has {has}"
        ))
    };
    if let Some(len) = len {
        let has = len.saturating_sub(4 + 4 * dims.len() as u64);
        if has != need as u64 {
            return Err(mismatch(has.to_string()));
        }
    }
    // Grown as data comes (a gzip stream may end early); one byte more than
    // declared is read to tell a longer file.
    let mut body = Vec::with_capacity(need.min(1 << 24));
    r.take(need as u64 + 1)
        .read_to_end(&mut body)
        .map_err(&failed)?;
    if body.len() != need {
        let has = if body.len() > need {
            "more".to_string()
        } else {
            body.len().to_string()
        };
        return Err(mismatch(has));
    }
    let data = if elem == 1 {
        IdxData::U8(body)
    } else {
        IdxData::I32(
            body.chunks_exact(4)
                .map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    };
    Ok(Idx { dims, data })
}

/// The element size and dimensions of an IDX header read from `r`.
fn header(
    r: &mut impl Read,
    bad: &impl Fn(String) -> Error,
    failed: &impl Fn(std::io::Error) -> Error,
) -> Result<(usize, Vec<usize>)> {
    let mut head = [0u8; 4];
    if read_up_to(r, &mut head).map_err(failed)? < 4 || head[0] != 0 || head[1] != 0 {
        return Err(bad("not an IDX file (bad magic number)".into()));
    }
    let (code, ndim) = (head[2], head[3] as usize);
    let elem = match code {
        0x08 => 1,
        0x0C => 4,
        other => {
            return Err(bad(format!(
                "IDX type code {other:#04x} is not supported (expected 0x08 unsigned byte or 0x0c int32)"
            )))
        }
    };
    let mut raw_dims = vec![0u8; 4 * ndim];
    if ndim == 0 || read_up_to(r, &mut raw_dims).map_err(failed)? < 4 * ndim {
        return Err(bad("truncated IDX header".into()));
    }
    let dims = raw_dims
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    Ok((elem, dims))
}

/// Fills `buf` from `r` as far as `r` goes: the bytes read (fewer at its
/// end).
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
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

    #[test]
    fn gzip_inflates_no_more_than_the_header_declares() {
        let dir = crate::data::testing::temp_dir("idx-gzip-bomb");
        let gz = |bytes: &[u8]| {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            enc.write_all(bytes).unwrap();
            enc.finish().unwrap()
        };
        // 16 bytes declared, then 1 GiB of zeros: 1024 gzip members of
        // 1 MiB each (about 1 MB of file), read by the multi-member decoder.
        let mut bomb = gz(&encode(&[4, 2, 2], &IdxData::U8(vec![0; 16])));
        let member = gz(&vec![0u8; 1 << 20]);
        for _ in 0..1024 {
            bomb.extend_from_slice(&member);
        }
        let file = dir.join("bomb.idx.gz");
        std::fs::write(&file, &bomb).unwrap();
        let e = read(&file).unwrap_err().to_string();
        assert!(
            e.contains("need 16 bytes of data, the file has more"),
            "{e}"
        );
        assert!(e.contains("bomb.idx.gz"), "{e}");
        // Shorter than declared.
        let mut short = encode(&[4, 2, 2], &IdxData::U8(vec![0; 16]));
        short.truncate(short.len() - 3);
        std::fs::write(&file, gz(&short)).unwrap();
        let e = read(&file).unwrap_err().to_string();
        assert!(e.contains("need 16 bytes of data, the file has 13"), "{e}");
        // 8 GiB declared: refused from the header alone.
        std::fs::write(
            &file,
            gz(&encode(&[1 << 16, 1 << 16, 2], &IdxData::U8(vec![]))),
        )
        .unwrap();
        let e = read(&file).unwrap_err().to_string();
        assert!(e.contains("more than the limit"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
