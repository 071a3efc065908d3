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
    let header: Vec<String> =
        fields(header).map_err(|m| Error::format(&file, Some(*header_line), m))?;
    let col = |name: &str| header.iter().position(|h| h.trim() == name);
    let (Some(c_label), Some(c_path), Some(c_split)) = (col("label"), col("path"), col("split"))
    else {
        return Err(Error::format(
            &file,
            Some(*header_line),
            format!("header {header:?} lacks one of the columns label, path, split"),
        ));
    };
    let (c_query, c_gallery) = (col("is_query"), col("is_gallery"));
    let mut listing = Listing::new("CsvDataset", &root, "line");
    listing.sources = vec![file.clone()];
    listing.has_query_flags = c_query.is_some() || c_gallery.is_some();
    let mut rows = Vec::new();
    for (line, text) in &lines[1..] {
        let bad = |m: String| Error::format(&file, Some(*line), m);
        let f = fields(text).map_err(bad)?;
        if f.len() != header.len() {
            return Err(bad(format!(
                "{} fields, the header has {}",
                f.len(),
                header.len()
            )));
        }
        let part = match f[c_split].trim().to_ascii_lowercase().as_str() {
            "train" => Part::Train,
            "val" => Part::Val,
            "test" => Part::Test,
            other => return Err(bad(format!("split {other:?} is not train, val or test"))),
        };
        let flag = |c: Option<usize>| -> Result<bool> {
            let Some(c) = c else { return Ok(true) };
            match f[c].trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" => Ok(true),
                "0" | "false" | "no" | "" => Ok(false),
                other => Err(bad(format!(
                    "{:?} is not a boolean (0/1, true/false)",
                    other
                ))),
            }
        };
        let (query, gallery) = (flag(c_query)?, flag(c_gallery)?);
        let label = f[c_label].trim().to_string();
        if label.is_empty() {
            return Err(bad("empty label".into()));
        }
        let path = join_inside(&root, f[c_path].trim()).map_err(bad)?;
        rows.push((path, label, part, query, gallery, *line));
    }
    // Integer labels sort as numbers, others as text.
    let mut names: Vec<String> = rows.iter().map(|r| r.1.clone()).collect();
    names.sort_unstable();
    names.dedup();
    if names.iter().all(|n| n.parse::<i64>().is_ok()) {
        names.sort_by_key(|n| n.parse::<i64>().unwrap_or_default());
    }
    let index: HashMap<&str, usize> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    let records = rows
        .iter()
        .map(|(path, label, part, query, gallery, line)| Record {
            item: Item::File(path.clone()),
            class: index[label.as_str()],
            part: *part,
            source: 0,
            line: *line,
            query: *query,
            gallery: *gallery,
        })
        .collect();
    listing.records = records;
    listing.class_names = names;
    listing.select(options)
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
