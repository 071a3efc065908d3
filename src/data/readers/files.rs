//! A list of image files (JPEG or PNG), for inference on new images: each
//! file's label is its parent folder's name; a folder stands for the images
//! below it.

use std::path::{Path, PathBuf};

use super::folder::walk;
use crate::data::dataset::{Dataset, DatasetOptions, Item, Listing, Part, Record};
use crate::data::Split;
use crate::error::{Error, Result};

/// The files `paths` in the order given, a folder among them standing for
/// its `*.jpg|jpeg|png` files (below it, hidden names left out, sorted), as
/// the split `"all"`; classes are the parent folders' names, sorted. The
/// root is the files' deepest common folder.
pub fn image_files(paths: &[PathBuf]) -> Result<Dataset> {
    if paths.is_empty() {
        return Err(Error::invalid("paths", "[]", "at least one image file"));
    }
    let paths = &expand(paths)?;
    let class_of = |p: &Path| {
        p.parent()
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let mut names: Vec<String> = paths.iter().map(|p| class_of(p)).collect();
    names.sort();
    names.dedup();
    let mut listing = Listing::new("image files", &common_folder(paths), "line");
    for p in paths {
        let name = class_of(p);
        listing.records.push(Record {
            item: Item::File(p.clone()),
            class: names.binary_search(&name).unwrap_or(0),
            part: Part::Test,
            source: 0,
            line: 0,
            query: true,
            gallery: true,
        });
    }
    listing.class_names = names;
    let options = DatasetOptions {
        split: Split::All,
        ..DatasetOptions::default()
    };
    listing.select(&options)
}

/// `paths` with every folder replaced by its image files, sorted.
fn expand(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::with_capacity(paths.len());
    for p in paths {
        if p.is_dir() {
            let mut found = Vec::new();
            walk(p, &mut found, 0)?;
            if found.is_empty() {
                return Err(Error::invalid(
                    "paths",
                    format!("{} holds no .jpg, .jpeg or .png files", p.display()),
                    "image files or folders of them",
                ));
            }
            found.sort();
            files.extend(found);
        } else if p.is_file() {
            files.push(p.clone());
        } else {
            return Err(Error::io(
                p,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such image file"),
            ));
        }
    }
    Ok(files)
}

/// The deepest folder holding every one of `paths`.
fn common_folder(paths: &[PathBuf]) -> PathBuf {
    let parent = |p: &PathBuf| p.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut common = parent(&paths[0]);
    for p in &paths[1..] {
        while !p.starts_with(&common) {
            if !common.pop() {
                return PathBuf::new();
            }
        }
    }
    common
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_folder_of_siblings_and_cousins() {
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(common_folder(&[p("/a/b/x.png")]), p("/a/b"));
        assert_eq!(common_folder(&[p("/a/b/x.png"), p("/a/c/y.png")]), p("/a"));
        assert_eq!(common_folder(&[p("a/x.png"), p("b/y.png")]), p(""));
    }

    #[test]
    fn missing_file_and_empty_list_are_errors() {
        assert!(image_files(&[]).unwrap_err().to_string().contains("paths"));
        let e = image_files(&[PathBuf::from("/no/such/file.png")]).unwrap_err();
        assert!(e.to_string().contains("/no/such/file.png"), "{e}");
    }
}
