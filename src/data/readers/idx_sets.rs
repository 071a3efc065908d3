//! The IDX datasets: Fashion-MNIST and glyphs.

use std::path::{Path, PathBuf};

use super::read_lines;
use crate::data::dataset::{
    Dataset, DatasetOptions, Item, Listing, Part, PixelBlock, Record, Split,
};
use crate::data::idx::{self, IdxData};
use crate::data::paths::{resolve_root, Home};
use crate::error::{Error, Result};

const FASHION_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// The files of the parts a split needs: `(prefix, part)`.
fn parts(split: Split) -> &'static [(&'static str, Part)] {
    match split {
        Split::Train | Split::Val => &[("train", Part::Train)],
        Split::Test | Split::Query | Split::Gallery => &[("t10k", Part::Test)],
        Split::All => &[("train", Part::Train), ("t10k", Part::Test)],
    }
}

/// Reads `<prefix>-images-idx3-ubyte[.gz]` and `<prefix>-labels-idx1-ubyte[.gz]`.
fn read_pair(root: &Path, prefix: &str) -> Result<(PixelBlock, Vec<i64>, PathBuf)> {
    let find = |kind: &str| {
        let name = format!("{prefix}-{kind}-ubyte");
        idx::find(root, &name).ok_or_else(|| {
            Error::io(
                root.join(format!("{name}.gz")),
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "IDX file not found (with or without .gz)",
                ),
            )
        })
    };
    let (img_path, lab_path) = (find("images-idx3")?, find("labels-idx1")?);
    let images = idx::read(&img_path)?;
    let labels = idx::read(&lab_path)?;
    let IdxData::U8(pixels) = images.data else {
        return Err(Error::format(
            &img_path,
            None,
            "images must be unsigned bytes (type 0x08)",
        ));
    };
    if images.dims.len() != 3 {
        return Err(Error::format(
            &img_path,
            None,
            format!(
                "expected 3 dimensions (count, height, width), got {:?}",
                images.dims
            ),
        ));
    }
    if labels.dims.len() != 1 || labels.dims[0] != images.dims[0] {
        return Err(Error::format(
            &lab_path,
            None,
            format!(
                "{:?} labels for {} images of {}",
                labels.dims,
                images.dims[0],
                img_path.display()
            ),
        ));
    }
    let block = PixelBlock {
        file: img_path,
        width: images.dims[2],
        height: images.dims[1],
        pixels,
    };
    Ok((block, labels.to_i64(), lab_path))
}

/// Where Fashion-MNIST is looked for: Debian's `dataset-fashion-mnist`
/// package last.
pub const FASHION_MNIST_HOME: Home = Home {
    dataset: "FashionMNIST",
    names: &["fashion-mnist", "FashionMNIST", "fashion_mnist"],
    markers: &[
        "train-labels-idx1-ubyte.gz",
        "train-labels-idx1-ubyte",
        "t10k-labels-idx1-ubyte.gz",
        "t10k-labels-idx1-ubyte",
    ],
    system: &["/usr/share/datasets/fashion-mnist"],
    obtain: "on Debian or Ubuntu: apt-get install dataset-fashion-mnist",
};

/// Where the glyphs benchmark is looked for; `grouploss datasets build
/// glyphs` writes it to the first place ([`crate::data::paths::build_dir`]).
pub const GLYPHS_HOME: Home = Home {
    dataset: "Glyphs",
    names: &["glyphs"],
    markers: &["classes.tsv"],
    system: &[],
    obtain: "render it from the typefaces of this machine with `grouploss datasets build glyphs` \
             (needs pip install 'grouploss[glyphs]')",
};

/// Fashion-MNIST (found at `root`, else as `FASHION_MNIST_HOME` says). Zero-shot: classes 0-4 of the train
/// file for training, 5-9 of the test file for testing; otherwise the
/// standard 60,000 / 10,000 split over all ten classes.
pub fn fashion_mnist(
    root: Option<&Path>,
    options: &DatasetOptions,
    zero_shot: bool,
) -> Result<Dataset> {
    let root = resolve_root(&FASHION_MNIST_HOME, root)?;
    let mut listing = Listing::new("FashionMNIST", &root, "line");
    listing.class_names = FASHION_CLASSES.iter().map(|s| s.to_string()).collect();
    for &(prefix, part) in parts(options.split) {
        let (block, labels, lab_path) = read_pair(&root, prefix)?;
        let b = listing.blocks.len();
        for (row, &l) in labels.iter().enumerate() {
            if !(0..10).contains(&l) {
                return Err(Error::format(
                    &lab_path,
                    None,
                    format!("label {l} of image {row} is not in 0..9"),
                ));
            }
            let keep = !zero_shot || (part == Part::Train) == (l < 5);
            if keep {
                listing.records.push(row_record(b, row, l as usize, part));
            }
        }
        listing.blocks.push(block);
    }
    listing.select(options)
}

/// The glyphs benchmark (found at `root`, else as `GLYPHS_HOME` says):
/// train and t10k files hold disjoint classes, named in `classes.tsv`.
pub fn glyphs(root: Option<&Path>, options: &DatasetOptions) -> Result<Dataset> {
    let root = resolve_root(&GLYPHS_HOME, root)?;
    let tsv = root.join("classes.tsv");
    let mut names: Vec<(String, String)> = Vec::new();
    for (line, text) in read_lines(&tsv)?.into_iter().skip(1) {
        let f: Vec<&str> = text.split('\t').collect();
        let label = f.first().and_then(|l| l.parse::<usize>().ok());
        let (Some(label), true) = (label, f.len() >= 5) else {
            return Err(Error::format(
                &tsv,
                Some(line),
                "expected label, codepoint, char, name, split",
            ));
        };
        if label != names.len() {
            return Err(Error::format(
                &tsv,
                Some(line),
                format!("label {label} out of order (expected {})", names.len()),
            ));
        }
        let name = if f[2].trim().is_empty() { f[1] } else { f[2] };
        names.push((name.to_string(), f[4].trim().to_string()));
    }
    let mut listing = Listing::new("Glyphs", &root, "line");
    listing.class_names = names.iter().map(|(n, _)| n.clone()).collect();
    for &(prefix, part) in parts(options.split) {
        let (block, labels, lab_path) = read_pair(&root, prefix)?;
        let want = if part == Part::Train { "train" } else { "test" };
        let b = listing.blocks.len();
        for (row, &l) in labels.iter().enumerate() {
            let class = usize::try_from(l).ok().filter(|&c| c < names.len());
            let Some(c) = class.filter(|&c| names[c].1 == want) else {
                return Err(Error::format(
                    &lab_path,
                    None,
                    format!(
                        "label {l} of image {row} is not a {want} class of {}",
                        tsv.display()
                    ),
                ));
            };
            listing.records.push(row_record(b, row, c, part));
        }
        listing.blocks.push(block);
    }
    listing.select(options)
}

fn row_record(block: usize, row: usize, class: usize, part: Part) -> Record {
    Record {
        item: Item::Row { block, row },
        class,
        part,
        source: 0,
        line: 0,
        query: true,
        gallery: true,
    }
}
