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

/// The folder of a dataset: `explicit` if given; else the first folder that
/// holds one of `markers` among `$GROUPLOSS_DATA/<name>` for each of
/// `names`, `$GROUPLOSS_DATA` itself, then `defaults`.
pub fn resolve_root(
    dataset: &str,
    explicit: Option<&Path>,
    names: &[&str],
    markers: &[&str],
    defaults: &[PathBuf],
) -> Result<PathBuf> {
    if let Some(root) = explicit {
        if !root.exists() {
            return Err(Error::io(
                root,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such dataset folder"),
            ));
        }
        return Ok(root.to_path_buf());
    }
    let mut candidates = Vec::new();
    if let Some(env) = std::env::var_os(DATA_ENV).filter(|v| !v.is_empty()) {
        let env = PathBuf::from(env);
        candidates.extend(names.iter().map(|n| env.join(n)));
        candidates.push(env);
    }
    candidates.extend(defaults.iter().cloned());
    for c in &candidates {
        if markers.iter().any(|m| c.join(m).exists()) {
            return Ok(c.clone());
        }
    }
    let looked: Vec<String> = candidates.iter().map(|c| c.display().to_string()).collect();
    Err(Error::io(
        dataset,
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "dataset not found; pass root=... or set {DATA_ENV} (looked in: {})",
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
}
