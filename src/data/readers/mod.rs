//! Readers of the published dataset layouts.
//!
//! Each turns a dataset folder into a `Listing` (`super::dataset`)
//! and selects the split asked for. The zero-shot protocols: CUB200 and
//! Cars196 train on the first half of their classes and test on the second;
//! Stanford Online Products and InShop ship their train/test files;
//! Fashion-MNIST trains on classes 0-4 of its train file and tests on 5-9 of
//! its test file (or the standard split, `zero_shot = false`); glyphs ships
//! disjoint train and test classes; ImageFolder splits its sorted classes
//! by `train_fraction`; a CSV says it in its `split` column.

mod cars;
mod csv;
mod cub;
mod files;
mod folder;
mod idx_sets;
mod inshop;
mod sop;

use std::path::{Path, PathBuf};

use super::dataset::{Dataset, DatasetOptions, Item, Listing, Part, Record};
use super::paths::Home;
use crate::error::{Error, Result};

pub use self::cars::cars196;
pub use self::csv::csv;
pub use self::cub::cub200;
pub use self::files::image_files;
pub use self::folder::image_folder;
pub use self::idx_sets::{fashion_mnist, glyphs};
pub use self::inshop::inshop;
pub use self::sop::stanford_online_products;

/// Options that only some readers take.
#[derive(Clone, Debug, PartialEq)]
pub struct ReaderOptions {
    /// Fashion-MNIST: classes 0-4 / 5-9 (true) or the standard split.
    pub zero_shot: bool,
    /// ImageFolder: fraction of the sorted classes used for training.
    pub train_fraction: f64,
    /// CSV: the file, relative to the root (default `dataset.csv`).
    pub csv_file: Option<PathBuf>,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        ReaderOptions {
            zero_shot: true,
            train_fraction: 0.5,
            csv_file: None,
        }
    }
}

/// The dataset kinds [`open`] reads (the trainer's `dataset` option
/// writes them with hyphens: `fashion-mnist`, `image-folder`).
pub const KINDS: [&str; 8] = [
    "fashion_mnist",
    "glyphs",
    "cub200",
    "cars196",
    "sop",
    "inshop",
    "image_folder",
    "csv",
];

/// The dataset `kind`, one of [`KINDS`].
pub fn open(
    kind: &str,
    root: Option<&Path>,
    options: &DatasetOptions,
    extra: &ReaderOptions,
) -> Result<Dataset> {
    let need_root = |what: &str| {
        root.ok_or_else(|| Error::invalid("root", "None", format!("the folder of the {what}")))
    };
    match kind {
        "fashion_mnist" => fashion_mnist(root, options, extra.zero_shot),
        "glyphs" => glyphs(root, options),
        "cub200" => cub200(root, options),
        "cars196" => cars196(root, options),
        "sop" => stanford_online_products(root, options),
        "inshop" => inshop(root, options),
        "image_folder" => image_folder(need_root("image folder")?, options, extra.train_fraction),
        "csv" => csv(
            need_root("CSV dataset")?,
            extra.csv_file.as_deref(),
            options,
        ),
        other => Err(crate::error::not_one_of("kind", other, &KINDS)),
    }
}

/// Where a dataset of `kind` is looked for when no root is given (None for
/// the kinds that always take a root).
pub fn home(kind: &str) -> Option<&'static Home<'static>> {
    HOMES.iter().find(|(k, _)| *k == kind).map(|(_, h)| *h)
}

/// The kinds found without a root, with their places.
pub const HOMES: [(&str, &Home<'static>); 6] = [
    ("fashion_mnist", &idx_sets::FASHION_MNIST_HOME),
    ("glyphs", &idx_sets::GLYPHS_HOME),
    ("cub200", &cub::HOME),
    ("cars196", &cars::HOME),
    ("sop", &sop::HOME),
    ("inshop", &inshop::HOME),
];

/// Largest annotation file or CSV manifest read: 4 GiB (SOP's, the
/// largest benchmark's, has 4 MB; a manifest of tens of millions of
/// images fits).
const MAX_ANNOTATION_FILE: u64 = 1 << 32;

/// The non-empty lines of a text file with their 1-based numbers (a
/// regular file of at most [`MAX_ANNOTATION_FILE`] bytes).
pub(crate) fn read_lines(path: &Path) -> Result<Vec<(usize, String)>> {
    let bytes = crate::data::paths::read_regular_file(path, MAX_ANNOTATION_FILE)
        .map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let line = e.as_bytes()[..e.utf8_error().valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        Error::format(path, Some(line), "not UTF-8 text")
    })?;
    // Spreadsheet programs start UTF-8 files with a byte-order mark.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    Ok(text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim_end_matches('\r').to_string()))
        .filter(|(_, l)| !l.trim().is_empty())
        .collect())
}

/// The class id `text` of an annotation line, or the error message.
pub(crate) fn class_id(text: &str) -> std::result::Result<i64, String> {
    text.parse()
        .map_err(|_| format!("class id {text:?} is not an integer"))
}

/// The zero-shot protocol of CUB200 and Cars196: the classes sorted by id,
/// the first half for training, the rest for testing. `rows` are (image,
/// class id, annotation line); `name` names a class id.
pub(crate) fn classes_in_halves(
    listing: &mut Listing,
    rows: Vec<(PathBuf, i64, usize)>,
    name: impl Fn(i64) -> String,
) {
    let mut ids: Vec<i64> = rows.iter().map(|r| r.1).collect();
    ids.sort_unstable();
    ids.dedup();
    listing.class_names = ids.iter().map(|&id| name(id)).collect();
    let n = ids.len();
    for (path, class, line) in rows {
        let c = ids.binary_search(&class).unwrap_or_default();
        listing.records.push(Record {
            item: Item::File(path),
            class: c,
            part: if c < n / 2 { Part::Train } else { Part::Test },
            source: 0,
            line,
            query: true,
            gallery: true,
        });
    }
}
