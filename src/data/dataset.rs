//! The dataset type: samples (image files or rows of an IDX array), their
//! labels and class names, one split of a published protocol.
//!
//! Readers (`readers/`) turn a dataset's files into a `Listing`: every
//! image with its class and its part of the protocol (train or test classes,
//! query or gallery). `Listing::select` then takes one split, carving a
//! class-disjoint validation split out of the training classes when asked,
//! and numbers the classes of the split `0..C` in their published order.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::decode;
use super::image::Image;
use super::paths::read_regular_file;
use super::transform::{Transform, Workspace};
use crate::error::{ensure, Error, Result};
use crate::rng::Rng;

/// A split of a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    /// The training classes (less the validation classes, if any).
    Train,
    /// Classes carved out of the training classes (`val_fraction`).
    Val,
    /// The test classes, disjoint from the training ones (zero-shot).
    Test,
    /// The query images of the test split (InShop, CSV with `is_query`).
    Query,
    /// The gallery images of the test split.
    Gallery,
    /// Every image of every split.
    All,
}

impl Split {
    /// The names [`Split::parse`] accepts.
    pub const NAMES: [&'static str; 6] = ["train", "val", "test", "query", "gallery", "all"];

    /// Parses one of [`Split::NAMES`].
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "train" => Split::Train,
            "val" => Split::Val,
            "test" => Split::Test,
            "query" => Split::Query,
            "gallery" => Split::Gallery,
            "all" => Split::All,
            other => return Err(crate::error::not_one_of("split", other, &Split::NAMES)),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
            Split::Query => "query",
            Split::Gallery => "gallery",
            Split::All => "all",
        }
    }
}

/// Which split to take, and how to carve the validation classes.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetOptions {
    pub split: Split,
    /// Fraction of the training classes moved to the validation split
    /// (0 = none; `split = Val` needs it > 0 unless the files have a val split).
    pub val_fraction: f64,
    /// Seed of the choice of validation classes.
    pub split_seed: u64,
}

impl Default for DatasetOptions {
    fn default() -> Self {
        DatasetOptions {
            split: Split::Train,
            val_fraction: 0.0,
            split_seed: 0,
        }
    }
}

/// Part of the published protocol a record belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Part {
    Train,
    Val,
    Test,
}

#[derive(Clone, Debug)]
pub(crate) enum Item {
    File(PathBuf),
    Row { block: usize, row: usize },
}

/// One image of a listing.
#[derive(Clone, Debug)]
pub(crate) struct Record {
    pub item: Item,
    /// Index into `Listing::class_names`.
    pub class: usize,
    pub part: Part,
    /// Index into `Listing::sources`, and the 1-based line or entry there
    /// (0: none).
    pub source: usize,
    pub line: usize,
    pub query: bool,
    pub gallery: bool,
}

/// Decoded 8-bit grey images of one IDX file.
#[derive(Clone, Debug)]
pub(crate) struct PixelBlock {
    pub file: PathBuf,
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// Everything a reader found, before a split is chosen.
#[derive(Debug)]
pub(crate) struct Listing {
    pub name: String,
    pub root: PathBuf,
    /// Annotation files, for messages.
    pub sources: Vec<PathBuf>,
    /// What a source position is called: "line" or "annotation".
    pub entry: &'static str,
    pub class_names: Vec<String>,
    pub records: Vec<Record>,
    pub blocks: Vec<PixelBlock>,
    /// Whether query/gallery flags are meaningful.
    pub has_query_flags: bool,
}

/// `val_fraction`: the share of the training classes carved out as
/// validation classes, in [0, 1) (the trainer's option and the datasets'
/// keyword alike).
pub fn check_val_fraction(val_fraction: f64) -> Result<()> {
    ensure(
        (0.0..1.0).contains(&val_fraction),
        "val_fraction",
        || val_fraction.to_string(),
        "a number in [0, 1)",
    )
}

impl Listing {
    pub(crate) fn new(name: &str, root: &Path, entry: &'static str) -> Self {
        Listing {
            name: name.to_string(),
            root: root.to_path_buf(),
            sources: Vec::new(),
            entry,
            class_names: Vec::new(),
            records: Vec::new(),
            blocks: Vec::new(),
            has_query_flags: false,
        }
    }

    /// The dataset of one split.
    pub(crate) fn select(self, options: &DatasetOptions) -> Result<Dataset> {
        let has_val_part = self.check_split(options)?;
        let (split, vf) = (options.split, options.val_fraction);
        let val_classes = if vf > 0.0 && matches!(split, Split::Train | Split::Val) {
            self.carve_val(vf, options.split_seed)?
        } else {
            HashSet::new()
        };
        let keep = |r: &Record| match split {
            Split::Train => r.part == Part::Train && !val_classes.contains(&r.class),
            Split::Val if has_val_part => r.part == Part::Val,
            Split::Val => r.part == Part::Train && val_classes.contains(&r.class),
            Split::Test => r.part == Part::Test,
            Split::Query => r.part == Part::Test && r.query,
            Split::Gallery => r.part == Part::Test && r.gallery,
            Split::All => true,
        };
        let records: Vec<Record> = self.records.into_iter().filter(keep).collect();
        if records.is_empty() {
            return Err(Error::format(
                &self.root,
                None,
                format!("the {} split of {} has no images", split.name(), self.name),
            ));
        }
        let (classes, labels) = dense_classes(&records, &self.class_names);
        let flags = self.has_query_flags && !matches!(split, Split::Train | Split::Val);
        let is_query = flags.then(|| records.iter().map(|r| r.query).collect());
        let is_gallery = flags.then(|| records.iter().map(|r| r.gallery).collect());
        Ok(Dataset {
            name: self.name,
            root: self.root,
            split,
            sources: self.sources,
            entry: self.entry,
            items: records.iter().map(|r| r.item.clone()).collect(),
            origins: records
                .iter()
                .map(|r| (r.source as u32, r.line as u32))
                .collect(),
            labels,
            classes,
            blocks: self.blocks,
            is_query,
            is_gallery,
        })
    }

    /// `val_fraction` and `split` fit the listing; whether it has its own
    /// val part.
    fn check_split(&self, options: &DatasetOptions) -> Result<bool> {
        let vf = options.val_fraction;
        check_val_fraction(vf)?;
        let has_val_part = self.records.iter().any(|r| r.part == Part::Val);
        if has_val_part {
            ensure(
                vf == 0.0,
                "val_fraction",
                || vf.to_string(),
                format!("0, since {} has its own val split", self.name),
            )?;
        }
        let split = options.split;
        if split == Split::Val && !has_val_part {
            ensure(
                vf > 0.0,
                "val_fraction",
                || vf.to_string(),
                "a fraction > 0 of the training classes for split='val'",
            )?;
        }
        if matches!(split, Split::Query | Split::Gallery) && !self.has_query_flags {
            return Err(Error::invalid(
                "split",
                format!("{:?}", split.name()),
                format!(
                    "'train', 'val', 'test' or 'all' ({} has no query/gallery split)",
                    self.name
                ),
            ));
        }
        Ok(has_val_part)
    }

    fn carve_val(&self, vf: f64, seed: u64) -> Result<HashSet<usize>> {
        let mut train: Vec<usize> = self
            .records
            .iter()
            .filter(|r| r.part == Part::Train)
            .map(|r| r.class)
            .collect();
        train.sort_unstable();
        train.dedup();
        let n = train.len();
        ensure(
            n >= 2,
            "val_fraction",
            || format!("{vf} with {n} training class(es)"),
            "0: a validation split needs at least 2 training classes",
        )?;
        let k = ((vf * n as f64).round() as usize).clamp(1, n - 1);
        Rng::derived(seed, &[crate::rng::stream::VALIDATION]).shuffle(&mut train);
        Ok(train[..k].iter().copied().collect())
    }
}

/// Largest image file read: 1 GiB, the size of the largest image decoded
/// (`jpeg::MAX_PIXELS` pixels of 4 bytes), far above any real JPEG or PNG.
const MAX_IMAGE_FILE: u64 = 1 << 30;

/// One split of a dataset.
#[derive(Debug)]
pub struct Dataset {
    name: String,
    root: PathBuf,
    split: Split,
    sources: Vec<PathBuf>,
    entry: &'static str,
    items: Vec<Item>,
    origins: Vec<(u32, u32)>,
    labels: Vec<i64>,
    classes: Vec<String>,
    blocks: Vec<PixelBlock>,
    is_query: Option<Vec<bool>>,
    is_gallery: Option<Vec<bool>>,
}

impl Dataset {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn split(&self) -> Split {
        self.split
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Label of every sample, in `0..classes().len()`.
    pub fn labels(&self) -> &[i64] {
        &self.labels
    }

    /// Class names; `classes()[label]`.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Query flags of the test split, where the dataset defines them.
    pub fn is_query(&self) -> Option<&[bool]> {
        self.is_query.as_deref()
    }

    /// Gallery flags of the test split, where the dataset defines them.
    pub fn is_gallery(&self) -> Option<&[bool]> {
        self.is_gallery.as_deref()
    }

    /// The image file of sample `index` (`None` for IDX rows).
    pub fn path(&self, index: usize) -> Option<&Path> {
        match self.items.get(index)? {
            Item::File(p) => Some(p),
            Item::Row { .. } => None,
        }
    }

    /// Where sample `index` comes from, for messages: the image file and
    /// the annotation line that lists it, or the IDX file and row.
    pub fn describe(&self, index: usize) -> String {
        let Some(item) = self.items.get(index) else {
            return format!("sample {index} of {}", self.name);
        };
        let (src, line) = self.origins[index];
        let origin = self
            .sources
            .get(src as usize)
            .filter(|_| line > 0)
            .map(|s| format!(" ({} {line} of {})", self.entry, s.display()));
        match item {
            Item::File(p) => format!("{}{}", p.display(), origin.unwrap_or_default()),
            Item::Row { block, row } => {
                format!("image {row} of {}", self.blocks[*block].file.display())
            }
        }
    }

    fn check_index(&self, index: usize) -> Result<&Item> {
        self.items.get(index).ok_or_else(|| {
            Error::invalid(
                "index",
                index,
                format!("an index below the dataset's length ({})", self.len()),
            )
        })
    }

    /// The file of sample `index`, read whole: a regular file (symbolic
    /// links followed) of at most [`MAX_IMAGE_FILE`] bytes, else an I/O
    /// error naming it (a device such as `/dev/zero` never ends, a FIFO
    /// blocks for ever), which `on_error` treats as any unreadable file.
    fn read_file(&self, index: usize, path: &Path) -> Result<Vec<u8>> {
        read_regular_file(path, MAX_IMAGE_FILE).map_err(|e| Error::io(self.describe(index), e))
    }

    /// Sample `index` decoded: 8-bit grey or RGB, as stored.
    pub fn load(&self, index: usize) -> Result<Image> {
        match self.check_index(index)? {
            Item::File(path) => {
                let data = self.read_file(index, path)?;
                decode::decode(&data, 0).map_err(|m| Error::format(self.describe(index), None, m))
            }
            Item::Row { block, row } => Ok(self.row(*block, *row)),
        }
    }

    /// Sample `index` through `transform` into `out`
    /// (`transform.output_len()` floats), decoding only what it needs.
    pub fn load_into(
        &self,
        index: usize,
        transform: &Transform,
        rng: &mut Rng,
        out: &mut [f32],
        ws: &mut Workspace,
    ) -> Result<()> {
        let result = match self.check_index(index)? {
            Item::File(path) => {
                let data = self.read_file(index, path)?;
                transform.apply_encoded(&data, rng, out, ws)
            }
            Item::Row { block, row } => transform.apply(&self.row(*block, *row), rng, out, ws),
        };
        result.map_err(|m| Error::format(self.describe(index), None, m))
    }

    fn row(&self, block: usize, row: usize) -> Image {
        let b = &self.blocks[block];
        let n = b.width * b.height;
        Image::new(
            b.width,
            b.height,
            1,
            b.pixels[row * n..(row + 1) * n].to_vec(),
        )
    }
}

/// The classes of `records`, numbered 0..C in the published order: their
/// names and each record's class number.
fn dense_classes(records: &[Record], class_names: &[String]) -> (Vec<String>, Vec<i64>) {
    let mut present = vec![usize::MAX; class_names.len()];
    let mut seen: Vec<usize> = records.iter().map(|r| r.class).collect();
    seen.sort_unstable();
    seen.dedup();
    for (dense, &c) in seen.iter().enumerate() {
        present[c] = dense;
    }
    let classes = seen.iter().map(|&c| class_names[c].clone()).collect();
    let labels = records.iter().map(|r| present[r.class] as i64).collect();
    (classes, labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testing::{temp_dir, write_jpeg};

    /// A dataset of `files`, in one class.
    fn files(paths: &[PathBuf]) -> Dataset {
        let mut listing = Listing::new("test", Path::new("/"), "line");
        listing.class_names.push("c".into());
        for p in paths {
            listing.records.push(Record {
                item: Item::File(p.clone()),
                class: 0,
                part: Part::Train,
                source: 0,
                line: 0,
                query: true,
                gallery: true,
            });
        }
        let options = DatasetOptions {
            split: Split::All,
            ..DatasetOptions::default()
        };
        listing.select(&options).unwrap()
    }

    #[test]
    fn refuses_devices_fifos_and_huge_files_by_name() {
        let dir = temp_dir("dataset-special-files");
        let good = dir.join("good.jpg");
        write_jpeg(&good, 1, 8, 8);
        let zero = dir.join("zero.jpg");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        let fifo = dir.join("fifo.jpg");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.unwrap().success());
        // A sparse file one byte over the limit (nothing is written).
        let huge = dir.join("huge.png");
        std::fs::File::create(&huge)
            .unwrap()
            .set_len(MAX_IMAGE_FILE + 1)
            .unwrap();
        let ds = files(&[good, zero.clone(), fifo.clone(), huge.clone()]);
        assert_eq!(ds.load(0).unwrap().width, 8);
        let t =
            Transform::resize_center_crop(8, 8, crate::data::Normalization::Imagenet, 3).unwrap();
        let mut ws = Workspace::default();
        let mut out = vec![0.0; t.output_len()];
        for (i, path, what) in [
            (1, &zero, "not a regular file"),
            (2, &fifo, "not a regular file"),
            (3, &huge, "larger than the limit"),
        ] {
            for e in [
                ds.load(i).unwrap_err(),
                ds.load_into(i, &t, &mut Rng::new(0), &mut out, &mut ws)
                    .unwrap_err(),
            ] {
                assert!(matches!(e, Error::Io { .. }), "{e:?}");
                let msg = e.to_string();
                assert!(msg.contains(&*path.to_string_lossy()), "{msg}");
                assert!(msg.contains(what), "{msg}");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
