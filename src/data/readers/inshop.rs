//! In-Shop Clothes Retrieval: `list_eval_partition.txt` (at the root or in
//! `Eval/`): a count, a header, then `<path> <item_id> <train|query|gallery>`.

use std::path::Path;

use super::read_lines;
use crate::data::dataset::{Dataset, DatasetOptions, Item, Listing, Part, Record};
use crate::data::paths::{join_inside, resolve_root, Home};
use crate::error::{Error, Result};

/// Where the dataset is looked for.
pub const HOME: Home = Home {
    dataset: "InShop",
    names: &["InShop", "inshop", "In-shop", "DeepFashion_InShop"],
    markers: &["list_eval_partition.txt", "Eval/list_eval_partition.txt"],
    system: &[],
    obtain: "",
};

/// InShop: 3,997 training items; test items split into query and gallery.
pub fn inshop(root: Option<&Path>, options: &DatasetOptions) -> Result<Dataset> {
    let root = resolve_root(&HOME, root)?;
    let file = [
        root.join("list_eval_partition.txt"),
        root.join("Eval/list_eval_partition.txt"),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .unwrap_or_else(|| root.join("list_eval_partition.txt"));
    let lines = read_lines(&file)?;
    let mut listing = Listing::new("InShop", &root, "line");
    listing.sources = vec![file.clone()];
    listing.has_query_flags = true;
    let Some((first, count)) = lines.first() else {
        return Err(Error::format(&file, None, "empty file"));
    };
    let count: usize = count.trim().parse().map_err(|_| {
        Error::format(
            &file,
            Some(*first),
            "expected the number of images on the first line",
        )
    })?;
    let entries = &lines[2.min(lines.len())..];
    if entries.len() != count {
        return Err(Error::format(
            &file,
            Some(*first),
            format!("announces {count} images, the file lists {}", entries.len()),
        ));
    }
    let mut rows = Vec::with_capacity(count);
    for (line, text) in entries {
        let f: Vec<&str> = text.split_whitespace().collect();
        if f.len() != 3 {
            return Err(Error::format(
                &file,
                Some(*line),
                "expected '<image_name> <item_id> <evaluation_status>'",
            ));
        }
        let (part, query, gallery) = match f[2] {
            "train" => (Part::Train, false, false),
            "query" => (Part::Test, true, false),
            "gallery" => (Part::Test, false, true),
            other => {
                return Err(Error::format(
                    &file,
                    Some(*line),
                    format!("evaluation status {other:?} is not train, query or gallery"),
                ))
            }
        };
        let path = join_inside(&root, f[0]).map_err(|m| Error::format(&file, Some(*line), m))?;
        rows.push((path, f[1].to_string(), part, query, gallery, *line));
    }
    let mut ids: Vec<String> = rows.iter().map(|r| r.1.clone()).collect();
    ids.sort_unstable();
    ids.dedup();
    for (path, item, part, query, gallery, line) in rows {
        listing.records.push(Record {
            item: Item::File(path),
            class: ids.binary_search(&item).unwrap_or_default(),
            part,
            source: 0,
            line,
            query,
            gallery,
        });
    }
    listing.class_names = ids;
    listing.select(options)
}
