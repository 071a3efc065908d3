//! A CSV file with a header and the columns `label`, `path`, `split`
//! (train, val or test), and optionally `is_query`, `is_gallery`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::read_lines;
use crate::data::dataset::{Dataset, DatasetOptions, Item, Listing, Part, Record};
use crate::data::paths::{existing_root, join_inside};
use crate::error::{Error, Result};

/// A dataset described by a CSV file. `root` is the folder the paths are
/// relative to (or the CSV file itself, whose folder is then the root);
/// `csv_file` defaults to `root/dataset.csv`.
pub fn csv(root: &Path, csv_file: Option<&Path>, options: &DatasetOptions) -> Result<Dataset> {
    let root = &existing_root(root)?;
    let (root, file): (PathBuf, PathBuf) = if root.is_file() {
        (
            root.parent().unwrap_or(Path::new(".")).to_path_buf(),
            root.to_path_buf(),
        )
    } else {
        let f = csv_file.unwrap_or(Path::new("dataset.csv"));
        (root.to_path_buf(), root.join(f))
    };
    let lines = read_lines(&file)?;
    let Some((header_line, header)) = lines.first() else {
        return Err(Error::format(&file, None, "empty file"));
    };
    let columns = Columns::of(header).map_err(|m| Error::format(&file, Some(*header_line), m))?;
    let mut listing = Listing::new("CsvDataset", &root, "line");
    listing.sources = vec![file.clone()];
    listing.has_query_flags = columns.query.is_some() || columns.gallery.is_some();
    let rows = lines[1..]
        .iter()
        .map(|(line, text)| {
            columns
                .row(text, &root, *line)
                .map_err(|m| Error::format(&file, Some(*line), m))
        })
        .collect::<Result<Vec<Row>>>()?;
    let (names, index) = class_names(&rows);
    listing.records = rows
        .into_iter()
        .map(|row| Record {
            class: index[row.label.as_str()],
            item: Item::File(row.path),
            part: row.part,
            source: 0,
            line: row.line,
            query: row.query,
            gallery: row.gallery,
        })
        .collect();
    listing.class_names = names;
    listing.select(options)
}

/// Where the columns are in the header.
struct Columns {
    /// Number of columns.
    width: usize,
    label: usize,
    path: usize,
    split: usize,
    query: Option<usize>,
    gallery: Option<usize>,
}

/// One line of the file, read.
struct Row {
    path: PathBuf,
    label: String,
    part: Part,
    query: bool,
    gallery: bool,
    line: usize,
}

impl Columns {
    fn of(header: &str) -> std::result::Result<Self, String> {
        let header: Vec<String> = fields(header)?;
        let col = |name: &str| header.iter().position(|h| h.trim() == name);
        let (Some(label), Some(path), Some(split)) = (col("label"), col("path"), col("split"))
        else {
            return Err(format!(
                "header {header:?} lacks one of the columns label, path, split"
            ));
        };
        Ok(Columns {
            width: header.len(),
            label,
            path,
            split,
            query: col("is_query"),
            gallery: col("is_gallery"),
        })
    }

    /// The row of line `line`, its path joined inside `root`.
    fn row(&self, text: &str, root: &Path, line: usize) -> std::result::Result<Row, String> {
        let f = fields(text)?;
        if f.len() != self.width {
            return Err(format!("{} fields, the header has {}", f.len(), self.width));
        }
        let part = match f[self.split].trim().to_ascii_lowercase().as_str() {
            "train" => Part::Train,
            "val" => Part::Val,
            "test" => Part::Test,
            other => return Err(format!("split {other:?} is not train, val or test")),
        };
        let flag = |c: Option<usize>| -> std::result::Result<bool, String> {
            let Some(c) = c else { return Ok(true) };
            match f[c].trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" => Ok(true),
                "0" | "false" | "no" | "" => Ok(false),
                other => Err(format!("{other:?} is not a boolean (0/1, true/false)")),
            }
        };
        let (query, gallery) = (flag(self.query)?, flag(self.gallery)?);
        let label = f[self.label].trim().to_string();
        if label.is_empty() {
            return Err("empty label".into());
        }
        let path = join_inside(root, f[self.path].trim())?;
        Ok(Row {
            path,
            label,
            part,
            query,
            gallery,
            line,
        })
    }
}

/// The sorted class names of the rows (integer labels as numbers, others
/// as text) and each name's index.
fn class_names(rows: &[Row]) -> (Vec<String>, HashMap<String, usize>) {
    let mut names: Vec<String> = rows.iter().map(|r| r.label.clone()).collect();
    names.sort_unstable();
    names.dedup();
    if names.iter().all(|n| n.parse::<i64>().is_ok()) {
        names.sort_by_key(|n| n.parse::<i64>().unwrap_or_default());
    }
    let index = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), i))
        .collect();
    (names, index)
}

/// The fields of one CSV line: commas separate, double quotes quote, and a
/// doubled quote inside quotes is a quote.
fn fields(line: &str) -> std::result::Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(ch) = chars.next() {
        match (ch, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', true) => quoted = false,
            ('"', false) if cur.trim().is_empty() => {
                cur.clear();
                quoted = true;
            }
            (',', false) => out.push(std::mem::take(&mut cur)),
            (c, _) => cur.push(c),
        }
    }
    if quoted {
        return Err("unterminated quoted field".into());
    }
    out.push(cur);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::fields;

    #[test]
    fn csv_fields() {
        assert_eq!(fields("a,b,,c").unwrap(), vec!["a", "b", "", "c"]);
        assert_eq!(
            fields(r#""x, y",1,"say ""hi""""#).unwrap(),
            vec!["x, y", "1", r#"say "hi""#]
        );
        assert!(fields(r#""open,1"#).is_err());
    }
}
