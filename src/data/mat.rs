//! MATLAB level-5 MAT-files: enough of the format to read Cars196's
//! `cars_annos.mat` (a struct array and a cell array of strings), with or
//! without zlib compression, in either byte order.
//!
//! A file is a 128-byte header followed by data elements, each a tag (type,
//! byte count; or the "small element" form packing both and up to 4 bytes of
//! data into 8 bytes) and its data padded to 8 bytes. Variables are
//! `miMATRIX` elements, possibly wrapped in `miCOMPRESSED` ones. Nothing in
//! the file is trusted: every length is checked against the bytes present,
//! the file's size, the bytes its compressed variables inflate to and the
//! memory of its decoded values are capped (for the whole file), and
//! nesting is limited.

use std::cell::Cell;
use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

const MI_INT8: u32 = 1;
const MI_UINT8: u32 = 2;
const MI_INT16: u32 = 3;
const MI_UINT16: u32 = 4;
const MI_INT32: u32 = 5;
const MI_UINT32: u32 = 6;
const MI_SINGLE: u32 = 7;
const MI_DOUBLE: u32 = 9;
const MI_INT64: u32 = 12;
const MI_UINT64: u32 = 13;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;
const MI_UTF8: u32 = 16;
const MI_UTF16: u32 = 17;

const MX_CELL: u8 = 1;
const MX_STRUCT: u8 = 2;
const MX_CHAR: u8 = 4;

/// Largest MAT-file read. Cars196's `cars_annos.mat`, the file this reader
/// is for, is about 1 MB; these caps leave it a couple of hundred times
/// that while bounding what a hostile file costs to well under 1 GB.
const MAX_FILE: u64 = 256 << 20;
/// Most bytes the compressed variables of a file inflate to, together.
const MAX_INFLATED: u64 = 256 << 20;
/// Most memory the decoded values of a file take, together (numbers are
/// widened to f64: 8 bytes for each byte of a uint8 array).
const MAX_DECODED: usize = 256 << 20;
const MAX_DEPTH: usize = 32;

/// A MATLAB value.
#[derive(Clone, Debug, PartialEq)]
pub enum MatValue {
    /// Any numeric class, converted to f64, column-major.
    Numeric { dims: Vec<usize>, data: Vec<f64> },
    /// A char array; rows joined by newlines.
    Char { dims: Vec<usize>, text: String },
    Cell {
        dims: Vec<usize>,
        items: Vec<MatValue>,
    },
    /// `items[element][field]`, elements in column-major order.
    Struct {
        dims: Vec<usize>,
        fields: Vec<String>,
        items: Vec<Vec<MatValue>>,
    },
    /// An empty element, or a class this reader does not decode.
    Other,
}

impl MatValue {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MatValue::Char { text, .. } => Some(text),
            _ => None,
        }
    }

    /// The single number of a 1 x 1 numeric array.
    pub fn as_scalar(&self) -> Option<f64> {
        match self {
            MatValue::Numeric { data, .. } if data.len() == 1 => Some(data[0]),
            _ => None,
        }
    }

    /// The value of `field` in element `i` of a struct array.
    pub fn field(&self, i: usize, field: &str) -> Option<&MatValue> {
        match self {
            MatValue::Struct { fields, items, .. } => {
                let f = fields.iter().position(|n| n == field)?;
                items.get(i)?.get(f)
            }
            _ => None,
        }
    }

    /// Number of elements of an array.
    pub fn len(&self) -> usize {
        match self {
            MatValue::Numeric { data, .. } => data.len(),
            MatValue::Char { text, .. } => text.chars().count(),
            MatValue::Cell { items, .. } => items.len(),
            MatValue::Struct { items, .. } => items.len(),
            MatValue::Other => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The variables of a MAT-file, in file order.
pub fn read(path: &Path) -> Result<Vec<(String, MatValue)>> {
    let bytes =
        crate::data::paths::read_regular_file(path, MAX_FILE).map_err(|e| Error::io(path, e))?;
    parse(&bytes).map_err(|msg| Error::format(path, None, msg))
}

/// What is left of a file's [`MAX_DECODED`].
struct Budget(Cell<usize>);

impl Budget {
    /// Takes `bytes` of memory for decoded values, or refuses.
    fn spend(&self, bytes: usize) -> std::result::Result<(), String> {
        let left = self.0.get().checked_sub(bytes).ok_or_else(|| {
            format!(
                "MAT-file too large: its values take more than the limit of {} MiB once decoded",
                MAX_DECODED >> 20
            )
        })?;
        self.0.set(left);
        Ok(())
    }
}

/// The size a compressed variable declares: the length of the element its
/// first 8 inflated bytes announce, with its tag.
fn declared_size(data: &[u8], big: bool) -> std::result::Result<u64, String> {
    let mut tag = [0u8; 8];
    flate2::read::ZlibDecoder::new(data)
        .read_exact(&mut tag)
        .map_err(|e| format!("corrupt compressed variable ({e})"))?;
    let r = Reader {
        buf: &tag,
        pos: 0,
        big,
        budget: &Budget(Cell::new(0)),
    };
    Ok(if r.u32_at(0)? >> 16 != 0 {
        8
    } else {
        8 + u64::from(r.u32_at(4)?)
    })
}

fn too_much_compressed() -> String {
    format!(
        "MAT-file too large: its compressed variables inflate to more than the limit of {} MiB",
        MAX_INFLATED >> 20
    )
}

/// Parses the bytes of a MAT-file.
pub fn parse(bytes: &[u8]) -> std::result::Result<Vec<(String, MatValue)>, String> {
    if bytes.len() < 128 {
        return Err("not a MATLAB 5 MAT-file (shorter than its header)".into());
    }
    if bytes.starts_with(b"\x89HDF") || bytes[..116].windows(10).any(|w| w == b"MATLAB 7.3") {
        return Err("MATLAB 7.3 (HDF5) MAT-files are not supported; save with -v7 or older".into());
    }
    let big = match &bytes[126..128] {
        b"IM" => false,
        b"MI" => true,
        _ => return Err("not a MATLAB 5 MAT-file (bad endian indicator)".into()),
    };
    let budget = &Budget(Cell::new(MAX_DECODED));
    let top = Reader {
        buf: &bytes[128..],
        pos: 0,
        big,
        budget,
    };
    // The sizes the compressed variables declare, summed before any is
    // inflated (8 bytes of each): a file declaring too much is refused at
    // once, and each is then inflated to no more than it declares.
    let mut declared = Vec::new();
    let mut reader = Reader { pos: 0, ..top };
    while !reader.done() {
        let (ty, data) = reader.element()?;
        if ty == MI_COMPRESSED {
            declared.push(declared_size(data, big)?);
        }
    }
    if declared.iter().sum::<u64>() > MAX_INFLATED {
        return Err(too_much_compressed());
    }
    let mut declared = declared.into_iter();
    let mut inflated_left = MAX_INFLATED;
    let mut reader = top;
    let mut vars = Vec::new();
    while !reader.done() {
        let (ty, data) = reader.element()?;
        match ty {
            MI_MATRIX => vars.push(matrix(data, big, 0, budget)?),
            MI_COMPRESSED => {
                let size = declared.next().unwrap_or(0).min(inflated_left);
                let mut inflated = Vec::new();
                flate2::read::ZlibDecoder::new(data)
                    .take(size)
                    .read_to_end(&mut inflated)
                    .map_err(|e| format!("corrupt compressed variable ({e})"))?;
                inflated_left -= inflated.len() as u64;
                let mut inner = Reader {
                    buf: &inflated,
                    pos: 0,
                    big,
                    budget,
                };
                let (ty, data) = inner.element()?;
                if ty == MI_MATRIX {
                    vars.push(matrix(data, big, 0, budget)?);
                }
            }
            _ => {}
        }
    }
    Ok(vars)
}

#[derive(Clone, Copy)]
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    big: bool,
    budget: &'a Budget,
}

impl<'a> Reader<'a> {
    fn u32_at(&self, at: usize) -> std::result::Result<u32, String> {
        let b: [u8; 4] = self
            .buf
            .get(at..at + 4)
            .and_then(|s| s.try_into().ok())
            .ok_or("truncated MAT-file")?;
        Ok(if self.big {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    }

    /// The next element's type and data.
    fn element(&mut self) -> std::result::Result<(u32, &'a [u8]), String> {
        let first = self.u32_at(self.pos)?;
        let (ty, start, n, next);
        if first >> 16 != 0 {
            ty = first & 0xFFFF;
            n = (first >> 16) as usize;
            if n > 4 {
                return Err("corrupt MAT-file (small element longer than 4 bytes)".into());
            }
            start = self.pos + 4;
            next = self.pos + 8;
        } else {
            ty = first;
            n = self.u32_at(self.pos + 4)? as usize;
            start = self.pos + 8;
            // Compressed elements are not padded.
            let padded = if ty == MI_COMPRESSED {
                n
            } else {
                n.div_ceil(8) * 8
            };
            next = start.checked_add(padded).ok_or("corrupt MAT-file")?;
        }
        let data = self
            .buf
            .get(start..start + n)
            .ok_or("truncated MAT-file (element past the end)")?;
        self.pos = next.min(self.buf.len());
        Ok((ty, data))
    }

    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }
}

/// `data` of type `ty` as f64, charged to `budget`.
fn numbers(
    ty: u32,
    data: &[u8],
    big: bool,
    budget: &Budget,
) -> std::result::Result<Vec<f64>, String> {
    let width = match ty {
        MI_INT8 | MI_UINT8 => 1,
        MI_INT16 | MI_UINT16 => 2,
        MI_INT32 | MI_UINT32 | MI_SINGLE => 4,
        MI_DOUBLE | MI_INT64 | MI_UINT64 => 8,
        other => return Err(format!("corrupt MAT-file (numeric data of type {other})")),
    };
    budget.spend(data.len() / width * std::mem::size_of::<f64>())?;
    macro_rules! conv {
        ($t:ty, $n:expr) => {
            data.chunks_exact($n)
                .map(|c| {
                    let a: [u8; $n] = c.try_into().unwrap_or([0; $n]);
                    (if big {
                        <$t>::from_be_bytes(a)
                    } else {
                        <$t>::from_le_bytes(a)
                    }) as f64
                })
                .collect()
        };
    }
    Ok(match ty {
        MI_INT8 => data.iter().map(|&b| b as i8 as f64).collect(),
        MI_UINT8 => data.iter().map(|&b| b as f64).collect(),
        MI_INT16 => conv!(i16, 2),
        MI_UINT16 => conv!(u16, 2),
        MI_INT32 => conv!(i32, 4),
        MI_UINT32 => conv!(u32, 4),
        MI_SINGLE => conv!(f32, 4),
        MI_DOUBLE => conv!(f64, 8),
        MI_INT64 => conv!(i64, 8),
        MI_UINT64 => conv!(u64, 8),
        other => return Err(format!("corrupt MAT-file (numeric data of type {other})")),
    })
}

/// `data` of type `ty` as characters, charged to `budget`.
fn text(
    ty: u32,
    data: &[u8],
    big: bool,
    budget: &Budget,
) -> std::result::Result<Vec<char>, String> {
    // At most one char (4 bytes) per byte, and the string built from them.
    budget.spend(data.len().saturating_mul(8))?;
    match ty {
        MI_UTF8 | MI_UINT8 | MI_INT8 => Ok(String::from_utf8_lossy(data).chars().collect()),
        MI_UINT16 | MI_UTF16 => {
            let units: Vec<u16> = data
                .chunks_exact(2)
                .map(|c| {
                    if big {
                        u16::from_be_bytes([c[0], c[1]])
                    } else {
                        u16::from_le_bytes([c[0], c[1]])
                    }
                })
                .collect();
            Ok(char::decode_utf16(units)
                .map(|r| r.unwrap_or(char::REPLACEMENT_CHARACTER))
                .collect())
        }
        other => Err(format!("corrupt MAT-file (char data of type {other})")),
    }
}

fn matrix(
    data: &[u8],
    big: bool,
    depth: usize,
    budget: &Budget,
) -> std::result::Result<(String, MatValue), String> {
    if data.is_empty() {
        return Ok((String::new(), MatValue::Other));
    }
    if depth > MAX_DEPTH {
        return Err("MAT-file nests arrays too deeply".into());
    }
    let mut r = Reader {
        buf: data,
        pos: 0,
        big,
        budget,
    };
    let (_, flags) = r.element()?;
    let class = *flags.first().ok_or("corrupt MAT-file (no array flags)")?;
    let class = if big {
        *flags.get(3).unwrap_or(&class)
    } else {
        class
    };
    let (ty, dims_raw) = r.element()?;
    let dims: Vec<usize> = numbers(ty, dims_raw, big, budget)?
        .into_iter()
        .map(|d| d.max(0.0) as usize)
        .collect();
    let count = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("corrupt MAT-file")?;
    let (_, name) = r.element()?;
    budget.spend(std::mem::size_of::<MatValue>().saturating_add(name.len()))?;
    let name = String::from_utf8_lossy(name).into_owned();
    let array = Array {
        dims,
        count,
        depth,
        size: data.len(),
    };
    let value = match class {
        MX_CELL => cell(&mut r, array)?,
        MX_STRUCT => structure(&mut r, array)?,
        MX_CHAR => char_array(&mut r, array)?,
        6..=15 => numeric(&mut r, array, &name)?,
        _ => MatValue::Other,
    };
    Ok((name, value))
}

/// An array's header, as read before its contents.
struct Array {
    dims: Vec<usize>,
    /// The product of `dims`.
    count: usize,
    /// Nesting depth (cells and structs hold arrays).
    depth: usize,
    /// Bytes of the array's element.
    size: usize,
}

/// The next element, which must be an array (`what` names it in the error).
fn nested(r: &mut Reader<'_>, depth: usize, what: &str) -> std::result::Result<MatValue, String> {
    let (ty, d) = r.element()?;
    if ty != MI_MATRIX {
        return Err(format!("corrupt MAT-file ({what} is not an array)"));
    }
    Ok(matrix(d, r.big, depth + 1, r.budget)?.1)
}

/// A cell array's items.
fn cell(r: &mut Reader<'_>, a: Array) -> std::result::Result<MatValue, String> {
    r.budget
        .spend(a.count.saturating_mul(std::mem::size_of::<MatValue>()))?;
    let mut items = Vec::with_capacity(a.count.min(a.size / 8));
    for _ in 0..a.count {
        items.push(nested(r, a.depth, "cell item")?);
    }
    Ok(MatValue::Cell {
        dims: a.dims,
        items,
    })
}

/// A struct array's field names and each item's fields.
fn structure(r: &mut Reader<'_>, a: Array) -> std::result::Result<MatValue, String> {
    let (ty, len_raw) = r.element()?;
    let len = numbers(ty, len_raw, r.big, r.budget)?
        .first()
        .copied()
        .unwrap_or(0.0) as usize;
    let (_, names) = r.element()?;
    if len == 0 {
        return Err("corrupt MAT-file (struct field name length 0)".into());
    }
    let n_fields = names.len().div_ceil(len);
    r.budget.spend(
        n_fields
            .saturating_mul(std::mem::size_of::<String>())
            .saturating_add(names.len()),
    )?;
    let fields: Vec<String> = names
        .chunks(len)
        .map(|c| {
            let end = c.iter().position(|&b| b == 0).unwrap_or(c.len());
            String::from_utf8_lossy(&c[..end]).into_owned()
        })
        .collect();
    // Each field of each item is an element of at least 8 bytes: a count
    // the data cannot hold is corrupt (and would loop for ever on a struct
    // without fields).
    let count = a.count;
    if fields.is_empty() && count > 0
        || count.saturating_mul(fields.len()).saturating_mul(8) > a.size
    {
        return Err(format!(
            "corrupt MAT-file (struct of {count} items with {} fields in {} bytes)",
            fields.len(),
            a.size
        ));
    }
    r.budget.spend(
        count.saturating_mul(
            std::mem::size_of::<Vec<MatValue>>()
                .saturating_add(fields.len().saturating_mul(std::mem::size_of::<MatValue>())),
        ),
    )?;
    let mut items = Vec::with_capacity(count);
    for _ in 0..count {
        let values = (0..fields.len())
            .map(|_| nested(r, a.depth, "struct field"))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        items.push(values);
    }
    Ok(MatValue::Struct {
        dims: a.dims,
        fields,
        items,
    })
}

/// A char array's rows, joined by newlines.
fn char_array(r: &mut Reader<'_>, a: Array) -> std::result::Result<MatValue, String> {
    let chars = if r.done() {
        Vec::new()
    } else {
        let (ty, d) = r.element()?;
        text(ty, d, r.big, r.budget)?
    };
    let dims = a.dims;
    // Column-major: character (i, j) is at i + j * rows.
    let rows = dims.first().copied().unwrap_or(1).max(1);
    // Rows without characters (dims [huge, 0]) would build a huge string of
    // newlines.
    if rows > 1 && (chars.len() != a.count || rows > chars.len()) {
        return Err(format!(
            "corrupt MAT-file (char array {dims:?} holds {} characters)",
            chars.len()
        ));
    }
    let cols = chars.len() / rows;
    let text = (0..rows)
        .map(|i| (0..cols).map(|j| chars[i + j * rows]).collect::<String>())
        .collect::<Vec<_>>()
        .join("\n");
    Ok(MatValue::Char { dims, text })
}

/// A numeric array `name`'s values, as float64.
fn numeric(r: &mut Reader<'_>, a: Array, name: &str) -> std::result::Result<MatValue, String> {
    let data = if r.done() {
        Vec::new()
    } else {
        let (ty, d) = r.element()?;
        numbers(ty, d, r.big, r.budget)?
    };
    if data.len() != a.count {
        return Err(format!(
            "corrupt MAT-file (array {name:?} of {} elements has {} values)",
            a.count,
            data.len()
        ));
    }
    Ok(MatValue::Numeric { dims: a.dims, data })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// A little-endian MAT-file writer for fixtures: enough for structs of
    /// strings and numbers, and cells of strings.
    pub(crate) enum W {
        Str(String),
        Num(f64),
        U8(u8),
        Cell(Vec<W>),
        Struct(Vec<String>, Vec<Vec<W>>),
    }

    fn element(ty: u32, data: &[u8]) -> Vec<u8> {
        let mut out = ty.to_le_bytes().to_vec();
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(data);
        while !out.len().is_multiple_of(8) {
            out.push(0);
        }
        out
    }

    fn matrix_bytes(name: &str, v: &W) -> Vec<u8> {
        let (class, dims, body): (u8, Vec<i32>, Vec<u8>) = match v {
            W::Str(s) => {
                let units: Vec<u8> = s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect();
                (
                    MX_CHAR,
                    vec![1, s.encode_utf16().count() as i32],
                    element(MI_UINT16, &units),
                )
            }
            W::Num(x) => (6, vec![1, 1], element(MI_DOUBLE, &x.to_le_bytes())),
            W::U8(x) => (9, vec![1, 1], element(MI_UINT8, &[*x])),
            W::Cell(items) => (
                MX_CELL,
                vec![1, items.len() as i32],
                items.iter().flat_map(|i| matrix_bytes("", i)).collect(),
            ),
            W::Struct(fields, items) => {
                let mut body = Vec::new();
                // Small element: the field-name length.
                body.extend_from_slice(&((4u32 << 16) | MI_INT32).to_le_bytes());
                body.extend_from_slice(&32i32.to_le_bytes());
                let names: Vec<u8> = fields
                    .iter()
                    .flat_map(|f| {
                        let mut b = f.as_bytes().to_vec();
                        b.resize(32, 0);
                        b
                    })
                    .collect();
                body.extend(element(MI_INT8, &names));
                for item in items {
                    for v in item {
                        body.extend(matrix_bytes("", v));
                    }
                }
                (MX_STRUCT, vec![1, items.len() as i32], body)
            }
        };
        let mut inner = element(MI_UINT32, &[class, 0, 0, 0, 0, 0, 0, 0]);
        inner.extend(element(
            MI_INT32,
            &dims
                .iter()
                .flat_map(|d| d.to_le_bytes())
                .collect::<Vec<_>>(),
        ));
        inner.extend(element(MI_INT8, name.as_bytes()));
        inner.extend(body);
        element(MI_MATRIX, &inner)
    }

    pub(crate) fn write_mat(vars: &[(&str, W)], compress: bool) -> Vec<u8> {
        let mut out = b"MATLAB 5.0 MAT-file, written by grouploss tests".to_vec();
        out.resize(116, b' ');
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&[0x00, 0x01]);
        out.extend_from_slice(b"IM");
        for (name, v) in vars {
            let m = matrix_bytes(name, v);
            if compress {
                let mut z =
                    flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
                z.write_all(&m).unwrap();
                let z = z.finish().unwrap();
                out.extend_from_slice(&MI_COMPRESSED.to_le_bytes());
                out.extend_from_slice(&(z.len() as u32).to_le_bytes());
                out.extend(z);
            } else {
                out.extend(m);
            }
        }
        out
    }

    #[test]
    fn reads_structs_cells_strings_and_numbers() {
        for compress in [false, true] {
            let bytes = write_mat(
                &[
                    (
                        "annotations",
                        W::Struct(
                            vec!["relative_im_path".into(), "class".into()],
                            vec![
                                vec![W::Str("car_ims/000001.jpg".into()), W::U8(1)],
                                vec![W::Str("car_ims/000002.jpg".into()), W::Num(196.0)],
                            ],
                        ),
                    ),
                    (
                        "class_names",
                        W::Cell(vec![W::Str("AM General".into()), W::Str("Zoë".into())]),
                    ),
                ],
                compress,
            );
            let vars = parse(&bytes).unwrap();
            assert_eq!(vars[0].0, "annotations");
            let a = &vars[0].1;
            assert_eq!(a.len(), 2);
            assert_eq!(
                a.field(1, "relative_im_path").unwrap().as_str(),
                Some("car_ims/000002.jpg")
            );
            assert_eq!(a.field(0, "class").unwrap().as_scalar(), Some(1.0));
            assert_eq!(a.field(1, "class").unwrap().as_scalar(), Some(196.0));
            match &vars[1].1 {
                MatValue::Cell { items, .. } => assert_eq!(items[1].as_str(), Some("Zoë")),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn refuses_char_arrays_with_more_rows_than_characters() {
        // An empty string is a 1 x 0 char array: make it 2^31 - 1 x 0.
        let mut bytes = write_mat(&[("x", W::Str(String::new()))], false);
        let dims: Vec<u8> = [1i32, 0].iter().flat_map(|d| d.to_le_bytes()).collect();
        let at = bytes.windows(8).position(|w| w == dims.as_slice()).unwrap();
        bytes[at..at + 4].copy_from_slice(&i32::MAX.to_le_bytes());
        let err = parse(&bytes).unwrap_err();
        assert!(err.contains("char array"), "{err}");
    }

    /// Where a uint8 1 x `n` array named `name` starts: its element's tag,
    /// header and data tag, which `n` bytes of data follow.
    fn uint8_head(name: &str, n: usize) -> Vec<u8> {
        let mut inner = element(MI_UINT32, &[9, 0, 0, 0, 0, 0, 0, 0]);
        let dims: Vec<u8> = [1i32, n as i32]
            .iter()
            .flat_map(|d| d.to_le_bytes())
            .collect();
        inner.extend(element(MI_INT32, &dims));
        inner.extend(element(MI_INT8, name.as_bytes()));
        inner.extend_from_slice(&MI_UINT8.to_le_bytes());
        inner.extend_from_slice(&(n as u32).to_le_bytes());
        let mut out = MI_MATRIX.to_le_bytes().to_vec();
        out.extend_from_slice(&((inner.len() + n) as u32).to_le_bytes());
        out.extend(inner);
        out
    }

    /// A compressed variable: a uint8 array of `mib` MiB of zeros. One MiB
    /// of zeros is compressed (twice, the second time after zeros only)
    /// and the second copy repeated, so building it costs little.
    fn compressed_zeros(name: &str, mib: usize) -> Vec<u8> {
        use flate2::{Compress, Compression, FlushCompress};
        fn push(c: &mut Compress, input: &[u8], flush: FlushCompress, out: &mut Vec<u8>) {
            let start = c.total_in();
            loop {
                out.reserve(1 << 16);
                let done = (c.total_in() - start) as usize;
                c.compress_vec(&input[done..], out, flush).unwrap();
                if (c.total_in() - start) as usize == input.len() && out.len() < out.capacity() {
                    return;
                }
            }
        }
        let head = uint8_head(name, mib << 20);
        let zeros = vec![0u8; 1 << 20];
        let mut c = Compress::new(Compression::best(), true);
        let mut z = Vec::new();
        push(&mut c, &head, FlushCompress::Sync, &mut z);
        push(&mut c, &zeros, FlushCompress::Sync, &mut z);
        let mut block = Vec::new();
        push(&mut c, &zeros, FlushCompress::Sync, &mut block);
        for _ in 1..mib {
            z.extend_from_slice(&block);
        }
        push(&mut c, &[], FlushCompress::Finish, &mut z);
        // The Adler-32 of the head and the zeros.
        let (mut a, mut b) = (1u64, 0u64);
        for &x in &head {
            a = (a + x as u64) % 65521;
            b = (b + a) % 65521;
        }
        b = (b + ((mib as u64) << 20) % 65521 * a) % 65521;
        let at = z.len() - 4;
        z[at..].copy_from_slice(&((b << 16 | a) as u32).to_be_bytes());
        let mut out = MI_COMPRESSED.to_le_bytes().to_vec();
        out.extend_from_slice(&(z.len() as u32).to_le_bytes());
        out.extend(z);
        out
    }

    fn cars_vars() -> Vec<(&'static str, W)> {
        vec![
            (
                "annotations",
                W::Struct(
                    vec!["relative_im_path".into(), "class".into()],
                    vec![vec![W::Str("car_ims/000001.jpg".into()), W::U8(1)]],
                ),
            ),
            ("class_names", W::Cell(vec![W::Str("AM General".into())])),
        ]
    }

    #[test]
    fn caps_what_the_compressed_variables_of_a_file_inflate_to() {
        // The builder's variables are sound: 3 MiB open.
        let mut bytes = write_mat(&cars_vars(), true);
        bytes.extend(compressed_zeros("junk", 3));
        let vars = parse(&bytes).unwrap();
        assert_eq!(vars[2].0, "junk");
        assert_eq!(vars[2].1.len(), 3 << 20);
        // Two of 160 MiB (each under the old per-variable cap) are refused
        // without being inflated, by read naming the file.
        let mut bytes = write_mat(&cars_vars(), true);
        bytes.extend(compressed_zeros("junk1", 160));
        bytes.extend(compressed_zeros("junk2", 160));
        assert!(bytes.len() < 1 << 20);
        let dir = crate::data::testing::temp_dir("mat-inflate-cap");
        let file = dir.join("cars_annos.mat");
        std::fs::write(&file, &bytes).unwrap();
        let e = read(&file).unwrap_err().to_string();
        assert!(e.contains("cars_annos.mat"), "{e}");
        assert!(
            e.contains("inflate to more than the limit of 256 MiB"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn caps_the_memory_of_the_decoded_values() {
        // 33 MiB of uint8 would be 264 MiB of f64.
        let mut bytes = write_mat(&cars_vars(), false);
        bytes.extend(uint8_head("junk", 33 << 20));
        bytes.resize(bytes.len() + (33 << 20), 0);
        let e = parse(&bytes).unwrap_err();
        assert!(
            e.contains("more than the limit of 256 MiB once decoded"),
            "{e}"
        );
        // 4 MiB is fine.
        let mut bytes = write_mat(&cars_vars(), false);
        bytes.extend(uint8_head("junk", 4 << 20));
        bytes.resize(bytes.len() + (4 << 20), 0);
        assert_eq!(parse(&bytes).unwrap()[2].1.len(), 4 << 20);
    }

    #[test]
    fn rejects_truncated_and_foreign_files() {
        let bytes = write_mat(&[("x", W::Num(1.0))], false);
        assert!(parse(&bytes[..bytes.len() - 9])
            .unwrap_err()
            .contains("truncated"));
        assert!(parse(b"hello").unwrap_err().contains("not a MATLAB 5"));
        let mut hdf = bytes.clone();
        hdf[..10].copy_from_slice(b"MATLAB 7.3");
        assert!(parse(&hdf).unwrap_err().contains("7.3"));
    }
}
