//! Stanford Online Products: `Ebay_train.txt` and `Ebay_test.txt`, each a
//! header then `<image_id> <class_id> <super_class_id> <path>`.

use std::path::Path;

use super::{class_id, read_lines};
use crate::data::dataset::{Dataset, DatasetOptions, Item, Listing, Part, Record, Split};
use crate::data::paths::{join_inside, resolve_root, Home};
use crate::error::{Error, Result};

/// Where the dataset is looked for.
pub const HOME: Home = Home {
    dataset: "StanfordOnlineProducts",
    names: &["Stanford_Online_Products", "sop", "SOP"],
    markers: &["Ebay_train.txt", "Ebay_test.txt"],
    system: &[],
    obtain: "",
};

/// Stanford Online Products: 11,318 training products, 11,316 test ones.
pub fn stanford_online_products(root: Option<&Path>, options: &DatasetOptions) -> Result<Dataset> {
    let root = resolve_root(&HOME, root)?;
    let mut listing = Listing::new("StanfordOnlineProducts", &root, "line");
    let files: &[(&str, Part)] = match options.split {
        Split::Train | Split::Val => &[("Ebay_train.txt", Part::Train)],
        Split::Test | Split::Query | Split::Gallery => &[("Ebay_test.txt", Part::Test)],
        Split::All => &[
            ("Ebay_train.txt", Part::Train),
            ("Ebay_test.txt", Part::Test),
        ],
    };
    let mut rows = Vec::new();
    for (source, &(name, part)) in files.iter().enumerate() {
        let file = root.join(name);
        listing.sources.push(file.clone());
        for (line, text) in read_lines(&file)?.into_iter().skip(1) {
            let bad = |m: String| Error::format(&file, Some(line), m);
            let f: Vec<&str> = text.split_whitespace().collect();
            if f.len() != 4 {
                return Err(bad(
                    "expected '<image_id> <class_id> <super_class_id> <path>'".into(),
                ));
            }
            let class = class_id(f[1]).map_err(bad)?;
            let path = join_inside(&root, f[3]).map_err(bad)?;
            let group = f[3].split('/').next().unwrap_or_default().to_string();
            rows.push((path, class, group, part, source, line));
        }
    }
    let mut ids: Vec<(i64, String)> = rows.iter().map(|r| (r.1, r.2.clone())).collect();
    ids.sort_unstable();
    ids.dedup_by_key(|(id, _)| *id);
    listing.class_names = ids.iter().map(|(id, g)| format!("{g}/{id}")).collect();
    for (path, class, _, part, source, line) in rows {
        let c = ids
            .binary_search_by_key(&class, |(id, _)| *id)
            .unwrap_or_default();
        listing.records.push(Record {
            item: Item::File(path),
            class: c,
            part,
            source,
            line,
            query: true,
            gallery: true,
        });
    }
    listing.select(options)
}
