//! ImageFolder: `root/<class>/**/*.{jpg,jpeg,png}`, classes sorted by name.

use std::path::{Path, PathBuf};

use crate::data::dataset::{Dataset, DatasetOptions, Item, Listing, Part, Record};
use crate::data::paths::existing_root;
use crate::error::{ensure, Error, Result};

/// A folder of class folders; the first `train_fraction` of the sorted
/// classes are the training classes, the others the test classes.
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
    if classes.is_empty() {
        return Err(Error::format(root, None, "no class folders"));
    }
    let n = classes.len();
    let n_train = ((train_fraction * n as f64).round() as usize).clamp(1, n);
    let mut listing = Listing::new("ImageFolder", root, "line");
    for (c, (name, dir)) in classes.into_iter().enumerate() {
        let mut files = Vec::new();
        walk(&dir, &mut files, 0)?;
        files.sort();
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
/// `out` in the order found.
pub(super) fn walk(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) -> Result<()> {
    // Symbolic-link loops cannot recurse forever.
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
        if p.is_dir() {
            walk(&p, out, depth + 1)?;
        } else {
            let ext = p
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase());
            if matches!(ext.as_deref(), Some("jpg" | "jpeg" | "png")) {
                out.push(p);
            }
        }
    }
    Ok(())
}
