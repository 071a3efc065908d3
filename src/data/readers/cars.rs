//! Cars196: `cars_annos.mat` (MATLAB 5) with a struct array `annotations`
//! (`relative_im_path`, `class`, ...) and a cell array `class_names`.

use std::path::Path;

use super::classes_in_halves;
use crate::data::dataset::{Dataset, DatasetOptions, Listing};
use crate::data::mat::{self, MatValue};
use crate::data::paths::{join_inside, resolve_root, Home};
use crate::error::{Error, Result};

/// Where the dataset is looked for.
pub const HOME: Home = Home {
    dataset: "Cars196",
    names: &["cars196", "Cars196", "stanford_cars", "CARS196"],
    markers: &["cars_annos.mat"],
    system: &[],
    obtain: "",
};

/// Stanford Cars: classes 1-98 train, 99-196 test.
pub fn cars196(root: Option<&Path>, options: &DatasetOptions) -> Result<Dataset> {
    let root = resolve_root(&HOME, root)?;
    let file = root.join("cars_annos.mat");
    let vars = mat::read(&file)?;
    let get = |name: &str| vars.iter().find(|(n, _)| n == name).map(|(_, v)| v);
    let Some(annos @ MatValue::Struct { .. }) = get("annotations") else {
        return Err(Error::format(&file, None, "no struct array 'annotations'"));
    };
    let names: Vec<String> = match get("class_names") {
        Some(MatValue::Cell { items, .. }) => items
            .iter()
            .map(|v| v.as_str().unwrap_or_default().to_string())
            .collect(),
        _ => Vec::new(),
    };
    let mut listing = Listing::new("Cars196", &root, "annotation");
    listing.sources = vec![file.clone()];
    let mut rows = Vec::with_capacity(annos.len());
    for i in 0..annos.len() {
        let bad = |m: String| Error::format(&file, None, format!("annotation {}: {m}", i + 1));
        let path = annos
            .field(i, "relative_im_path")
            .and_then(MatValue::as_str)
            .ok_or_else(|| bad("no string field 'relative_im_path'".into()))?;
        let class = annos
            .field(i, "class")
            .and_then(MatValue::as_scalar)
            .ok_or_else(|| bad("no numeric field 'class'".into()))?;
        if class < 1.0 || class.fract() != 0.0 {
            return Err(bad(format!("class {class} is not a positive integer")));
        }
        let path = join_inside(&root, path.trim()).map_err(bad)?;
        rows.push((path, class as i64, i + 1));
    }
    classes_in_halves(&mut listing, rows, |id| {
        names
            .get(id as usize - 1)
            .filter(|n| !n.is_empty())
            .cloned()
            .unwrap_or_else(|| format!("class {id}"))
    });
    listing.select(options)
}
