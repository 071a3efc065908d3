//! CUB-200-2011: `images.txt` (`<id> <path>` under `images/`),
//! `image_class_labels.txt` (`<id> <class>`), optional `classes.txt`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::{class_id, classes_in_halves, read_lines};
use crate::data::dataset::{Dataset, DatasetOptions, Listing};
use crate::data::paths::{join_inside, resolve_root, Home};
use crate::error::{Error, Result};

/// Where the dataset is looked for.
pub const HOME: Home = Home {
    dataset: "CUB200",
    names: &["CUB_200_2011", "cub200", "CUB200"],
    markers: &["images.txt"],
    system: &[],
    obtain: "",
};

/// Caltech-UCSD Birds: classes 1-100 train, 101-200 test.
pub fn cub200(root: Option<&Path>, options: &DatasetOptions) -> Result<Dataset> {
    let root = resolve_root(&HOME, root)?;
    let images_txt = root.join("images.txt");
    let labels_txt = root.join("image_class_labels.txt");
    let mut listing = Listing::new("CUB200", &root, "line");
    listing.sources = vec![images_txt.clone(), labels_txt.clone()];

    let mut class_of: HashMap<String, (i64, usize)> = HashMap::new();
    for (line, text) in read_lines(&labels_txt)? {
        let bad = |m: String| Error::format(&labels_txt, Some(line), m);
        let mut f = text.split_whitespace();
        let (Some(id), Some(class), None) = (f.next(), f.next(), f.next()) else {
            return Err(bad("expected '<image id> <class id>'".into()));
        };
        let class = class_id(class).map_err(bad)?;
        if class_of.insert(id.to_string(), (class, line)).is_some() {
            return Err(bad(format!("image id {id} listed twice")));
        }
    }
    let mut names: BTreeMap<i64, String> = BTreeMap::new();
    let classes_txt = root.join("classes.txt");
    if classes_txt.is_file() {
        for (line, text) in read_lines(&classes_txt)? {
            let bad = |m: String| Error::format(&classes_txt, Some(line), m);
            let Some((id, name)) = text.trim().split_once(char::is_whitespace) else {
                return Err(bad("expected '<class id> <name>'".into()));
            };
            names.insert(class_id(id).map_err(bad)?, name.trim().to_string());
        }
    }
    let images = root.join("images");
    let mut rows: Vec<(PathBuf, i64, usize)> = Vec::new();
    let mut seen = HashMap::new();
    for (line, text) in read_lines(&images_txt)? {
        let bad = |m: String| Error::format(&images_txt, Some(line), m);
        let Some((id, path)) = text.trim().split_once(char::is_whitespace) else {
            return Err(bad("expected '<image id> <path>'".into()));
        };
        if seen.insert(id.to_string(), line).is_some() {
            return Err(bad(format!("image id {id} listed twice")));
        }
        let path = join_inside(&images, path.trim()).map_err(bad)?;
        let Some(&(class, _)) = class_of.get(id) else {
            let labels = labels_txt.display();
            return Err(bad(format!("image id {id} has no class in {labels}")));
        };
        rows.push((path, class, line));
    }
    classes_in_halves(&mut listing, rows, |id| {
        names
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("class {id}"))
    });
    listing.select(options)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::dataset::Split;
    use crate::data::testing;

    #[test]
    fn zero_shot_splits_and_malformed_lines() {
        let root = testing::cub("cub-reader", 4, 2);
        let opts = |split| DatasetOptions {
            split,
            ..Default::default()
        };
        let train = cub200(Some(&root), &opts(Split::Train)).unwrap();
        let test = cub200(Some(&root), &opts(Split::Test)).unwrap();
        assert_eq!((train.len(), test.len()), (4, 4));
        assert_eq!(test.labels(), &[0, 0, 1, 1]);
        assert_eq!(train.classes(), &["class 1", "class 2"]);
        assert_eq!(test.load(3).unwrap().width, 60);
        std::fs::write(root.join("images.txt"), "1 ../../etc/passwd\n").unwrap();
        let err = cub200(Some(&root), &opts(Split::Train))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("images.txt, line 1: image path") && err.contains("'..'"),
            "{err}"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
