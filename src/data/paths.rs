//! Where datasets live, and keeping annotation paths inside them.

use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// The environment variable naming a folder of datasets.
pub const DATA_ENV: &str = "GROUPLOSS_DATA";

/// `root/rel` for a path read from an annotation file, which must be
/// relative and must not climb out of `root` (no `..`, no absolute path): a
/// crafted annotation file must not make the loader read other files.
pub fn join_inside(root: &Path, rel: &str) -> std::result::Result<PathBuf, String> {
    if rel.is_empty() {
        return Err("empty image path".into());
    }
    let p = Path::new(rel);
    let mut out = root.to_path_buf();
    for c in p.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(format!(
                    "image path {rel:?} leaves the dataset root (contains '..')"
                ))
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "image path {rel:?} is absolute; paths must be relative to the dataset root"
                ))
            }
        }
    }
    Ok(out)
}

/// Opens `path` (symbolic links followed) for reading if it is a regular
/// file, with its length; anything else (a FIFO, which would block the open
/// for ever, a device such as `/dev/zero`, which never ends, a folder) is
/// refused as "not a regular file".
pub(crate) fn open_regular_file(path: &Path) -> std::io::Result<(std::fs::File, u64)> {
    let not_regular = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file (a device, FIFO, socket or folder)",
        )
    };
    if !std::fs::metadata(path)?.is_file() {
        return Err(not_regular());
    }
    let file = std::fs::File::open(path)?;
    // Checked again on what was opened (replaced in between by another
    // regular file or a device; a FIFO put there in between would still
    // block the open).
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(not_regular());
    }
    Ok((file, meta.len()))
}

/// The regular file `path` (see [`open_regular_file`]) read whole, refusing
/// one of more than `limit` bytes (also one that grows past it while read).
pub(crate) fn read_regular_file(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let too_large = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than the limit of {limit} bytes"),
        )
    };
    let (file, len) = open_regular_file(path)?;
    if len > limit {
        return Err(too_large());
    }
    let mut out = Vec::with_capacity(len as usize);
    file.take(limit + 1).read_to_end(&mut out)?;
    if out.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(out)
}

/// Where a dataset is looked for when no root is given, and how a user
/// gets it when it is nowhere.
#[derive(Clone, Copy, Debug)]
pub struct Home<'a> {
    /// The dataset's name in messages (`Glyphs`).
    pub dataset: &'a str,
    /// Folder names under a data folder (`glyphs`); the first is the one
    /// [`build_dir`] gives.
    pub names: &'a [&'a str],
    /// Files of which one marks the dataset's folder.
    pub markers: &'a [&'a str],
    /// System folders tried last (a distribution's package).
    pub system: &'a [&'a str],
    /// How to get the dataset, for the not-found message ("" if unknown).
    pub obtain: &'a str,
}

/// The per-user data folder: `$XDG_DATA_HOME/grouploss`, else
/// `~/.local/share/grouploss`; None without a home folder.
pub fn user_data_dir() -> Option<PathBuf> {
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(xdg) = nonempty("XDG_DATA_HOME") {
        return Some(PathBuf::from(xdg).join("grouploss"));
    }
    nonempty("HOME").map(|h| PathBuf::from(h).join(".local/share/grouploss"))
}

/// The folders searched for `home`, in order: `$GROUPLOSS_DATA/<name>` for
/// each name, `$GROUPLOSS_DATA`, the user data folder's `<name>`s, then the
/// system folders.
pub fn candidates(home: &Home) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(env) = std::env::var_os(DATA_ENV).filter(|v| !v.is_empty()) {
        let env = PathBuf::from(env);
        out.extend(home.names.iter().map(|n| env.join(n)));
        out.push(env);
    }
    if let Some(user) = user_data_dir() {
        out.extend(home.names.iter().map(|n| user.join(n)));
    }
    out.extend(home.system.iter().map(PathBuf::from));
    out
}

/// Where a dataset built by the library goes by default (and is then found
/// by [`resolve_root`]): `$GROUPLOSS_DATA/<name>`, else the user data
/// folder's `<name>`.
pub fn build_dir(home: &Home) -> Result<PathBuf> {
    let name = home.names.first().copied().unwrap_or(home.dataset);
    if let Some(env) = std::env::var_os(DATA_ENV).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(env).join(name));
    }
    user_data_dir().map(|u| u.join(name)).ok_or_else(|| {
        Error::invalid(
            "root",
            "nothing (no HOME, XDG_DATA_HOME or GROUPLOSS_DATA)",
            "a folder to write the dataset to",
        )
    })
}

/// `explicit`, which must exist.
pub fn existing_root(explicit: &Path) -> Result<PathBuf> {
    if !explicit.exists() {
        return Err(Error::io(
            explicit,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such dataset folder"),
        ));
    }
    Ok(explicit.to_path_buf())
}

/// The folder of a dataset: `explicit` if given (it must exist and hold one
/// of the markers: another folder is named as not this dataset's, rather
/// than by the first file found missing); else the first of [`candidates`]
/// that holds one of the markers.
pub fn resolve_root(home: &Home, explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(root) = explicit {
        let root = existing_root(root)?;
        if !home.markers.iter().any(|m| root.join(m).exists()) {
            let obtain = if home.obtain.is_empty() {
                String::new()
            } else {
                format!("; {}", home.obtain)
            };
            return Err(Error::io(
                &root,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "no {} dataset here (none of {}){obtain}",
                        home.dataset,
                        home.markers.join(", ")
                    ),
                ),
            ));
        }
        return Ok(root);
    }
    let candidates = candidates(home);
    for c in &candidates {
        if home.markers.iter().any(|m| c.join(m).exists()) {
            return Ok(c.clone());
        }
    }
    let looked: Vec<String> = candidates.iter().map(|c| c.display().to_string()).collect();
    let obtain = if home.obtain.is_empty() {
        String::new()
    } else {
        format!("; {}", home.obtain)
    };
    Err(Error::io(
        home.dataset,
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "dataset not found; pass root=... (`--data-root` on the command line) or set \
                 {DATA_ENV} (looked in: {}){obtain}",
                if looked.is_empty() {
                    "nowhere".into()
                } else {
                    looked.join(", ")
                }
            ),
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotation_paths_stay_inside_the_root() {
        let root = Path::new("/data/cub");
        assert_eq!(
            join_inside(root, "a/./b.jpg").unwrap(),
            Path::new("/data/cub/a/b.jpg")
        );
        assert!(join_inside(root, "../etc/passwd")
            .unwrap_err()
            .contains("'..'"));
        assert!(join_inside(root, "a/../../x").unwrap_err().contains("'..'"));
        assert!(join_inside(root, "/etc/passwd")
            .unwrap_err()
            .contains("absolute"));
        assert!(join_inside(root, "").is_err());
    }

    #[test]
    fn reads_regular_files_only_and_up_to_the_limit() {
        let dir = crate::data::testing::temp_dir("paths-regular");
        let file = dir.join("a.bin");
        std::fs::write(&file, [7u8; 10]).unwrap();
        assert_eq!(read_regular_file(&file, 10).unwrap(), vec![7u8; 10]);
        let e = read_regular_file(&file, 9).unwrap_err();
        assert!(e.to_string().contains("limit of 9 bytes"), "{e}");
        for other in [Path::new("/dev/zero"), &dir] {
            let e = read_regular_file(other, 10).unwrap_err();
            assert!(e.to_string().contains("not a regular file"), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
