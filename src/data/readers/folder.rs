//! ImageFolder: `root/<class>/**/*.{jpg,jpeg,png}`, classes sorted by name.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::data::dataset::{Dataset, DatasetOptions, Item, Listing, Part, Record};
use crate::data::paths::existing_root;
use crate::error::{ensure, Error, Result};

/// A folder of class folders; the first `train_fraction` of the sorted
/// classes (the folders that hold images) are the training classes, the
/// others the test classes.
pub fn image_folder(root: &Path, options: &DatasetOptions, train_fraction: f64) -> Result<Dataset> {
    ensure(
        train_fraction > 0.0 && train_fraction <= 1.0,
        "train_fraction",
        || train_fraction.to_string(),
        "a number in (0, 1]",
    )?;
    let root = &existing_root(root)?;
    let mut classes: Vec<(String, PathBuf)> = list(root)?
        .into_iter()
        .filter(|p| p.is_dir())
        .filter_map(|p| {
            let name = p.file_name()?.to_string_lossy().into_owned();
            (!name.starts_with('.')).then_some((name, p))
        })
        .collect();
    classes.sort();
    // Folders without images (notes, logs, an empty class) are no classes:
    // the split below counts only those that have images.
    let mut found = Vec::new();
    for (name, dir) in classes {
        let mut files = Vec::new();
        walk(&dir, &mut files, 0)?;
        if !files.is_empty() {
            files.sort();
            found.push((name, files));
        }
    }
    if found.is_empty() {
        return Err(Error::format(
            root,
            None,
            "no class folders with JPEG or PNG images",
        ));
    }
    let n = found.len();
    let n_train = ((train_fraction * n as f64).round() as usize).clamp(1, n);
    let mut listing = Listing::new("ImageFolder", root, "line");
    for (c, (name, files)) in found.into_iter().enumerate() {
        for path in files {
            listing.records.push(Record {
                item: Item::File(path),
                class: c,
                part: if c < n_train { Part::Train } else { Part::Test },
                source: 0,
                line: 0,
                query: true,
                gallery: true,
            });
        }
        listing.class_names.push(name);
    }
    listing.select(options)
}

fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    entries
        .map(|e| e.map(|e| e.path()).map_err(|err| Error::io(dir, err)))
        .collect()
}

/// The JPEG and PNG files below `dir` (hidden names left out), appended to
/// `out` in the order found. Symbolic links to folders are followed (class
/// folders linked from another disk), but no folder is entered twice: one
/// already entered (an ancestor, or a folder two links point to) is
/// skipped, so links such as `cat/l0 -> .` cannot make the walk fan out
/// without end.
pub(super) fn walk(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) -> Result<()> {
    let mut entered = HashSet::new();
    if let Ok(meta) = std::fs::metadata(dir) {
        entered.insert((meta.dev(), meta.ino()));
    }
    walk_from(dir, out, depth, &mut entered)
}

/// [`walk`], `entered` holding the (device, inode) of the folders entered.
fn walk_from(
    dir: &Path,
    out: &mut Vec<PathBuf>,
    depth: usize,
    entered: &mut HashSet<(u64, u64)>,
) -> Result<()> {
    // A bound on the recursion, whatever the links.
    if depth > 32 {
        return Ok(());
    }
    for p in list(dir)? {
        let hidden = p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden {
            continue;
        }
        // Follows symbolic links; a broken one is listed as a file (if its
        // name says image), to be reported when read.
        match std::fs::metadata(&p) {
            Ok(meta) if meta.is_dir() => {
                if entered.insert((meta.dev(), meta.ino())) {
                    walk_from(&p, out, depth + 1, entered)?;
                }
            }
            _ => {
                let ext = p
                    .extension()
                    .map(|e| e.to_string_lossy().to_ascii_lowercase());
                if matches!(ext.as_deref(), Some("jpg" | "jpeg" | "png")) {
                    out.push(p);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testing::temp_dir;
    use std::os::unix::fs::symlink;

    #[test]
    fn symbolic_links_to_entered_folders_are_not_followed() {
        let root = temp_dir("folder-link-loops");
        let (cat, dog) = (root.join("cat"), root.join("dog"));
        std::fs::create_dir_all(cat.join("sub")).unwrap();
        std::fs::create_dir_all(&dog).unwrap();
        for f in ["cat/a.jpg", "cat/sub/b.png", "dog/c.jpg", "dog/d.jpg"] {
            std::fs::write(root.join(f), b"").unwrap();
        }
        // Two links to the class folder itself, one to an ancestor.
        symlink(".", cat.join("l0")).unwrap();
        symlink(".", cat.join("l1")).unwrap();
        symlink("..", cat.join("sub/up")).unwrap();
        // A class folder linked from elsewhere is followed.
        let elsewhere = temp_dir("folder-link-target");
        std::fs::write(elsewhere.join("e.jpg"), b"").unwrap();
        symlink(&elsewhere, root.join("eel")).unwrap();
        let mut files = Vec::new();
        walk(&cat, &mut files, 0).unwrap();
        files.sort();
        assert_eq!(files, [cat.join("a.jpg"), cat.join("sub/b.png")]);
        let options = DatasetOptions {
            split: crate::data::Split::All,
            ..DatasetOptions::default()
        };
        let ds = image_folder(&root, &options, 0.5).unwrap();
        assert_eq!(ds.len(), 5);
        assert_eq!(ds.classes(), ["cat", "dog", "eel"]);
        assert_eq!(ds.labels(), [0, 0, 1, 1, 2]);
        std::fs::remove_dir_all(&root).unwrap();
        std::fs::remove_dir_all(&elsewhere).unwrap();
    }
}
