//! Files written whole or not at all: a temporary file beside the target,
//! flushed, renamed over it, and the folder synced; a failed write removes
//! the temporary. A reader (or a run resumed after a crash) sees the old
//! file or the new one, never part of one. The run folder, the checkpoints
//! and the retrieval index all write through here.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::tensor::{Dtype, TensorView};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::names::dtype_name;

/// Writes `bytes` to `path` atomically (its folder made if missing).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path.file_name().and_then(|f| f.to_str()).unwrap_or("file");
    let (tmp, mut f) = reserve_temporary(dir, name).map_err(|e| Error::io(path, e))?;
    let written = (|| -> std::io::Result<()> {
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// A new temporary file `.NAME.tmp-PID-N` in `dir`, created here so that no
/// other writer has it: two threads saving one path, or two processes of
/// the same pid (containers sharing a volume), each write their own file.
fn reserve_temporary(dir: &Path, name: &str) -> std::io::Result<(PathBuf, fs::File)> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.tmp-{}-{n}", std::process::id()));
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The pid of the writer of a temporary file that [`write_atomic`] (or the
/// Python package's `_files.replaced`) names `.NAME.tmp-PID[-SUFFIX]`.
pub fn temporary_writer(file_name: &str) -> Option<u32> {
    let (_, tail) = file_name.strip_prefix('.')?.rsplit_once(".tmp-")?;
    tail.split('-').next()?.parse().ok()
}

/// Writes named `tensors` and `metadata` to `path` as safetensors,
/// atomically ([`write_atomic`]).
pub fn write_safetensors_atomic(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let mut data = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        data.push((name.clone(), dtype(t.kind())?, t.size(), bytes_of(t)));
    }
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .map(|(n, d, s, b)| {
            let shape: Vec<usize> = s.iter().map(|&x| x as usize).collect();
            TensorView::new(*d, shape, b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::invalid("tensors", format!("{n}: {e}"), "a valid tensor"))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, &Some(metadata))
        .map_err(|e| Error::invalid("tensors", e.to_string(), "serialisable tensors"))?;
    write_atomic(path, &bytes)
}

/// Named tensors, in file order.
pub type NamedTensors = Vec<(String, Tensor)>;

/// Reads every tensor of a safetensors file and its metadata.
pub fn read_safetensors_with_metadata(
    path: &Path,
) -> Result<(NamedTensors, HashMap<String, String>)> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::format(path, None, format!("not a safetensors file: {e}")))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::format(path, None, format!("not a safetensors file: {e}")))?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let shape: Vec<i64> = view.shape().iter().map(|&s| s as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind(view.dtype())?)
            .map_err(|e| Error::format(path, None, format!("tensor {name}: {e}")))?;
        out.push((name, t));
    }
    Ok((out, metadata))
}

fn kind(dtype: Dtype) -> Result<Kind> {
    Ok(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        other => {
            return Err(Error::invalid(
                "tensors",
                format!("a tensor of dtype {other:?}"),
                "a dtype libtorch reads",
            ))
        }
    })
}

fn dtype(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        other => {
            return Err(Error::invalid(
                "tensors",
                format!("a tensor of dtype {}", dtype_name(other)),
                "a kind safetensors stores",
            ))
        }
    })
}

fn bytes_of(t: &Tensor) -> Vec<u8> {
    let t = t.to_device(Device::Cpu).contiguous();
    let n = t.numel() * t.kind().elt_size_in_bytes();
    let mut out = vec![0u8; n];
    t.copy_data_u8(&mut out, t.numel());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writers_of_one_path_never_share_a_temporary_file() {
        let dir = std::env::temp_dir().join(format!("grouploss-atomic-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("shared.bin");
        // Large enough that the writes overlap in time.
        let payloads: Vec<Vec<u8>> = (0..4u8)
            .map(|i| vec![i; (1 << 20) * (i as usize + 1)])
            .collect();
        for _ in 0..5 {
            std::thread::scope(|s| {
                for p in &payloads {
                    let path = &path;
                    s.spawn(move || write_atomic(path, p).unwrap());
                }
            });
            // One writer's bytes, whole.
            let got = fs::read(&path).unwrap();
            assert!(
                payloads.contains(&got),
                "a mixed file of {} bytes",
                got.len()
            );
            let names: Vec<_> = fs::read_dir(&dir)
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .collect();
            assert_eq!(names, ["shared.bin"]);
        }
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn temporary_names_give_their_writer() {
        assert_eq!(temporary_writer(".last.safetensors.tmp-123-7"), Some(123));
        assert_eq!(temporary_writer(".emb.npy.tmp-42-0a1b2c3d"), Some(42));
        // Written before names had a suffix.
        assert_eq!(temporary_writer(".metrics.jsonl.tmp-99"), Some(99));
        assert_eq!(temporary_writer("last.safetensors.tmp-99"), None);
        assert_eq!(temporary_writer(".notes.txt"), None);
        assert_eq!(temporary_writer(".a.tmp-x-1"), None);
    }
}
