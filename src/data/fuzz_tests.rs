//! Mutation fuzzing of every parser that reads a user's files: IDX (raw and
//! gzipped), MAT-files, JPEG, PNG, and the annotation files of each dataset
//! layout (CUB, Cars196, SOP, InShop, CSV).
//!
//! Valid files are mutated (bit flips, boundary values in length fields,
//! truncation, insertion, duplication, splicing, line shuffles for text) and
//! fed to the parser. A parser must return a value or an error, never
//! panic, never take more than a few seconds, and what it returns must hold
//! its invariants (sizes that match, paths inside the dataset root, labels
//! in range). The budget is `GROUPLOSS_FUZZ_SECONDS` per target (default 2,
//! `make stress` gives minutes). A failing input is written under
//! `target/fuzz-failures/` and named in the failure; add it to
//! `tests/fuzz-regressions/<target>/`, which `regressions_stay_fixed` replays
//! on every `cargo test`.

use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::dataset::{DatasetOptions, Split};
use super::idx::{self, IdxData};
use super::image::Image;
use super::mat::tests::{write_mat, W};
use super::testing::temp_dir;
use super::{decode, encode_jpeg, mat, readers};
use crate::rng::Rng;

/// Longest a single input may take before it counts as a hang.
const SLOW: Duration = Duration::from_secs(5);

fn budget() -> Duration {
    let secs = std::env::var("GROUPLOSS_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(2.0);
    Duration::from_secs_f64(secs.max(0.0))
}

/// Values that sit on the edges of length and count fields.
const EDGES: [u32; 12] = [
    0,
    1,
    2,
    7,
    8,
    0x7F,
    0x80,
    0xFF,
    0xFFFF,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_FFFF,
];

struct Mutator {
    rng: Rng,
}

impl Mutator {
    fn below(&mut self, n: usize) -> usize {
        self.rng.below(n.max(1) as u64) as usize
    }

    fn range(&mut self, len: usize) -> (usize, usize) {
        let a = self.below(len + 1);
        let b = a + self.below(len - a + 1).min(64);
        (a, b)
    }

    /// One to four byte-level edits of `seed`, sometimes spliced with `other`.
    fn bytes(&mut self, seed: &[u8], other: &[u8]) -> Vec<u8> {
        let mut d = seed.to_vec();
        for _ in 0..1 + self.below(4) {
            let len = d.len();
            match self.below(9) {
                0 if len > 0 => {
                    let i = self.below(len);
                    d[i] ^= 1 << self.below(8);
                }
                1 if len > 0 => {
                    let i = self.below(len);
                    d[i] = EDGES[self.below(EDGES.len())] as u8;
                }
                2 if len >= 4 => {
                    let i = self.below(len - 3);
                    let v = EDGES[self.below(EDGES.len())];
                    let b = if self.below(2) == 0 {
                        v.to_be_bytes()
                    } else {
                        v.to_le_bytes()
                    };
                    d[i..i + 4].copy_from_slice(&b);
                }
                3 => d.truncate(self.below(len + 1)),
                4 => {
                    let i = self.below(len + 1);
                    let n = 1 + self.below(16);
                    let junk: Vec<u8> = (0..n).map(|_| self.rng.next_u64() as u8).collect();
                    d.splice(i..i, junk);
                }
                5 => {
                    let (a, b) = self.range(len);
                    d.drain(a..b);
                }
                6 => {
                    let (a, b) = self.range(len);
                    let copy = d[a..b].to_vec();
                    let i = self.below(len + 1);
                    d.splice(i..i, copy);
                }
                7 if !other.is_empty() => {
                    let cut = self.below(len + 1);
                    let from = self.below(other.len());
                    d.truncate(cut);
                    d.extend_from_slice(&other[from..]);
                }
                _ => {
                    if len > 0 {
                        let i = self.below(len);
                        d[i] = d[i].wrapping_add(1 + self.below(3) as u8);
                    }
                }
            }
        }
        d
    }

    /// Line-level edits of a text file (and sometimes byte-level ones).
    fn text(&mut self, seed: &[u8], other: &[u8]) -> Vec<u8> {
        if self.below(3) == 0 {
            return self.bytes(seed, other);
        }
        let text = String::from_utf8_lossy(seed);
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        const WORDS: [&str; 12] = [
            "",
            "0",
            "-1",
            "99999999999999999999",
            "1e3",
            "../outside.jpg",
            "/etc/passwd",
            "a/../../b.jpg",
            "\"",
            ",",
            "\u{e9}",
            "NaN",
        ];
        for _ in 0..1 + self.below(3) {
            let n = lines.len();
            match self.below(6) {
                0 if n > 0 => {
                    lines.remove(self.below(n));
                }
                1 if n > 0 => {
                    let l = lines[self.below(n)].clone();
                    lines.insert(self.below(n + 1), l);
                }
                2 if n > 1 => {
                    let (a, b) = (self.below(n), self.below(n));
                    lines.swap(a, b);
                }
                3 if n > 0 => {
                    // Replace one whitespace- or comma-separated token.
                    let i = self.below(n);
                    let sep = if lines[i].contains(',') { ',' } else { ' ' };
                    let mut toks: Vec<String> = lines[i].split(sep).map(str::to_string).collect();
                    let t = self.below(toks.len());
                    toks[t] = WORDS[self.below(WORDS.len())].to_string();
                    lines[i] = toks.join(&sep.to_string());
                }
                4 if n > 0 => {
                    let i = self.below(n);
                    let cut = self.below(lines[i].len() + 1);
                    let cut = (0..=cut)
                        .rev()
                        .find(|&c| lines[i].is_char_boundary(c))
                        .unwrap_or(0);
                    lines[i].truncate(cut);
                }
                _ => lines.clear(),
            }
        }
        let mut out = lines.join("\n").into_bytes();
        if self.below(2) == 0 {
            out.push(b'\n');
        }
        out
    }
}

/// What one target is: its valid inputs, how to mutate them, and the
/// parser with its invariants (`Err` = an invariant broken).
struct Target<'a> {
    name: &'a str,
    seeds: Vec<Vec<u8>>,
    text: bool,
    run: &'a dyn Fn(&[u8]) -> Result<bool, String>,
}

fn failure_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures")
}

/// Runs `input` through the target; `Ok(accepted)` or a description of the
/// failure (a panic, a broken invariant, a hang).
fn check_one(target: &Target, input: &[u8]) -> Result<bool, String> {
    let start = Instant::now();
    let outcome = catch_unwind(AssertUnwindSafe(|| (target.run)(input)));
    let took = start.elapsed();
    let accepted = match outcome {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(broken)) => return Err(format!("invariant broken: {broken}")),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            return Err(format!("panic: {msg}"));
        }
    };
    if took > SLOW {
        return Err(format!("took {took:?} (limit {SLOW:?})"));
    }
    Ok(accepted)
}

/// Fuzzes `target` for the budget; fails with the saved input on the first
/// failure. Returns (inputs tried, inputs accepted).
fn fuzz(target: Target, stream: u64) -> (usize, usize) {
    for (i, seed) in target.seeds.iter().enumerate() {
        assert_eq!(
            check_one(&target, seed),
            Ok(true),
            "{}: valid seed {i} must parse",
            target.name
        );
    }
    let mut m = Mutator {
        rng: Rng::derived(0x4655_5A5A, &[stream]),
    };
    let deadline = Instant::now() + budget();
    let (mut tried, mut accepted) = (0, 0);
    // At least a few hundred inputs even with a zero budget, so the test
    // always exercises the parser.
    while tried < 200 || Instant::now() < deadline {
        let a = &target.seeds[m.below(target.seeds.len())];
        let b = &target.seeds[m.below(target.seeds.len())];
        let input = if target.text {
            m.text(a, b)
        } else {
            m.bytes(a, b)
        };
        tried += 1;
        match check_one(&target, &input) {
            Ok(ok) => accepted += ok as usize,
            Err(why) => {
                let dir = failure_dir().join(target.name);
                let _ = std::fs::create_dir_all(&dir);
                let file = dir.join(format!("input-{stream}-{tried}.bin"));
                let _ = std::fs::write(&file, &input);
                panic!(
                    "{}: {why}; input ({} bytes) saved to {}",
                    target.name,
                    input.len(),
                    file.display()
                );
            }
        }
    }
    eprintln!("fuzz {}: {tried} inputs, {accepted} accepted", target.name);
    (tried, accepted)
}

fn image_ok(img: &Image) -> Result<bool, String> {
    if img.width == 0 || img.height == 0 || !matches!(img.channels, 1 | 3) {
        return Err(format!(
            "image of {} x {} x {}",
            img.width, img.height, img.channels
        ));
    }
    if img.data.len() != img.width * img.height * img.channels {
        return Err(format!(
            "{} bytes for {} x {} x {}",
            img.data.len(),
            img.width,
            img.height,
            img.channels
        ));
    }
    Ok(true)
}

fn gradient(w: usize, h: usize, c: usize) -> Image {
    let data = (0..w * h * c)
        .map(|i| ((i * 7) % 251) as u8 ^ ((i / w) as u8))
        .collect();
    Image::new(w, h, c, data)
}

fn png_bytes(w: u32, h: u32, color: ::png::ColorType, depth: ::png::BitDepth) -> Vec<u8> {
    let samples = color.samples();
    let bits = match depth {
        ::png::BitDepth::Eight => 8,
        ::png::BitDepth::Sixteen => 16,
        _ => 8,
    };
    let row = (w as usize * samples * bits).div_ceil(8);
    let data: Vec<u8> = (0..row * h as usize)
        .map(|i| (i * 13 % 256) as u8)
        .collect();
    let mut out = Vec::new();
    {
        let mut enc = ::png::Encoder::new(&mut out, w, h);
        enc.set_color(color);
        enc.set_depth(depth);
        if color == ::png::ColorType::Indexed {
            enc.set_palette((0..256 * 3).map(|i| (i % 256) as u8).collect::<Vec<u8>>());
        }
        let mut writer = enc.write_header().unwrap();
        writer.write_image_data(&data).unwrap();
    }
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    z.write_all(bytes).unwrap();
    z.finish().unwrap()
}

fn idx_seeds() -> Vec<Vec<u8>> {
    vec![
        idx::encode(&[3, 4, 5], &IdxData::U8((0..60).collect())),
        idx::encode(&[6], &IdxData::I32(vec![0, 1, -5, 300, 1 << 20, 7])),
        idx::encode(&[2, 28, 28], &IdxData::U8(vec![9; 2 * 28 * 28])),
    ]
}

fn idx_ok(r: crate::error::Result<idx::Idx>) -> Result<bool, String> {
    let Ok(x) = r else { return Ok(false) };
    let n: usize = x.dims.iter().product();
    let got = match &x.data {
        IdxData::U8(v) => v.len(),
        IdxData::I32(v) => v.len(),
    };
    if n != got {
        return Err(format!("dims {:?} with {got} values", x.dims));
    }
    Ok(true)
}

#[test]
fn fuzz_idx() {
    fuzz(
        Target {
            name: "idx",
            seeds: idx_seeds(),
            text: false,
            run: &|b| idx_ok(idx::parse(Path::new("fuzz.idx"), b)),
        },
        1,
    );
}

#[test]
fn fuzz_idx_gzip() {
    let dir = temp_dir("fuzz-idx-gz");
    let file = dir.join("data.idx.gz");
    fuzz(
        Target {
            name: "idx_gzip",
            seeds: idx_seeds().iter().map(|s| gzip(s)).collect(),
            text: false,
            run: &|b| {
                std::fs::write(&file, b).map_err(|e| e.to_string())?;
                idx_ok(idx::read(&file))
            },
        },
        2,
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn mat_seeds() -> Vec<Vec<u8>> {
    let vars = || {
        vec![
            (
                "annotations",
                W::Struct(
                    vec!["relative_im_path".into(), "class".into(), "test".into()],
                    vec![
                        vec![W::Str("car_ims/000001.jpg".into()), W::U8(1), W::U8(0)],
                        vec![W::Str("car_ims/000002.jpg".into()), W::Num(2.0), W::U8(1)],
                    ],
                ),
            ),
            (
                "class_names",
                W::Cell(vec![W::Str("AM General".into()), W::Str("Zoë".into())]),
            ),
        ]
    };
    vec![write_mat(&vars(), false), write_mat(&vars(), true)]
}

/// A parsed MAT-file holds as many elements as its dimensions say, at every
/// level, and a struct element has a value for each field.
fn mat_ok(r: std::result::Result<Vec<(String, mat::MatValue)>, String>) -> Result<bool, String> {
    fn check(v: &mat::MatValue) -> Result<(), String> {
        let (dims, len) = match v {
            mat::MatValue::Numeric { dims, data } => (dims, data.len()),
            mat::MatValue::Cell { dims, items } => {
                items.iter().try_for_each(check)?;
                (dims, items.len())
            }
            mat::MatValue::Struct {
                dims,
                fields,
                items,
            } => {
                for element in items {
                    if element.len() != fields.len() {
                        return Err(format!(
                            "{} values for {} fields",
                            element.len(),
                            fields.len()
                        ));
                    }
                    element.iter().try_for_each(check)?;
                }
                (dims, items.len())
            }
            mat::MatValue::Char { .. } | mat::MatValue::Other => return Ok(()),
        };
        let n: usize = dims.iter().product();
        if n != len {
            return Err(format!("dims {dims:?} with {len} elements"));
        }
        Ok(())
    }
    let Ok(vars) = r else { return Ok(false) };
    vars.iter().try_for_each(|(_, v)| check(v))?;
    Ok(true)
}

#[test]
fn fuzz_mat() {
    fuzz(
        Target {
            name: "mat",
            seeds: mat_seeds(),
            text: false,
            run: &|b| mat_ok(mat::parse(b)),
        },
        3,
    );
}

#[test]
fn fuzz_jpeg() {
    let seeds = vec![
        encode_jpeg(&gradient(33, 17, 3), 85).unwrap(),
        encode_jpeg(&gradient(16, 40, 1), 70).unwrap(),
        encode_jpeg(&gradient(64, 48, 3), 95).unwrap(),
    ];
    fuzz(
        Target {
            name: "jpeg",
            seeds,
            text: false,
            run: &|b| {
                for channels in [0, 1, 3] {
                    match decode::decode(b, channels) {
                        Ok(img) => {
                            image_ok(&img)?;
                        }
                        Err(_) => return Ok(false),
                    }
                }
                Ok(true)
            },
        },
        4,
    );
}

#[test]
fn fuzz_png() {
    use ::png::{BitDepth, ColorType};
    let seeds = vec![
        png_bytes(13, 7, ColorType::Rgb, BitDepth::Eight),
        png_bytes(9, 9, ColorType::Grayscale, BitDepth::Sixteen),
        png_bytes(8, 5, ColorType::Rgba, BitDepth::Eight),
        png_bytes(6, 6, ColorType::Indexed, BitDepth::Eight),
        png_bytes(5, 3, ColorType::GrayscaleAlpha, BitDepth::Eight),
    ];
    fuzz(
        Target {
            name: "png",
            seeds,
            text: false,
            run: &|b| match decode::decode(b, 0) {
                Ok(img) => image_ok(&img),
                Err(_) => Ok(false),
            },
        },
        5,
    );
}

/// Opens `kind` at `root` in every split and checks what comes back:
/// lengths agree, labels index the classes, every path stays inside root.
fn open_all_splits(kind: &str, root: &Path) -> Result<bool, String> {
    let mut any = false;
    for (split, val_fraction) in [
        (Split::Train, 0.0),
        (Split::Val, 0.4),
        (Split::Test, 0.0),
        (Split::All, 0.0),
    ] {
        let options = DatasetOptions {
            split,
            val_fraction,
            split_seed: 3,
        };
        let Ok(ds) = readers::open(kind, Some(root), &options, &Default::default()) else {
            continue;
        };
        any = true;
        if ds.labels().len() != ds.len() {
            return Err(format!(
                "{} labels for {} samples",
                ds.labels().len(),
                ds.len()
            ));
        }
        let classes = ds.classes().len() as i64;
        if let Some(bad) = ds.labels().iter().find(|&&l| l < 0 || l >= classes) {
            return Err(format!("label {bad} with {classes} classes"));
        }
        let canon_root = root.canonicalize().map_err(|e| e.to_string())?;
        for i in 0..ds.len() {
            let Some(p) = ds.path(i) else { continue };
            let inside = p.starts_with(root) || p.starts_with(&canon_root);
            let climbs = p
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir));
            if !inside || climbs {
                return Err(format!("path {} escapes the root", p.display()));
            }
        }
    }
    Ok(any)
}

/// Fuzzes the annotation file `file` of a `kind` layout built in `root`.
fn fuzz_annotations(kind: &str, root: &Path, file: &str, text: bool, stream: u64) {
    let path = root.join(file);
    let seed = std::fs::read(&path).unwrap();
    let name = format!("{kind}-{}", file.replace(['/', '.'], "_"));
    fuzz(
        Target {
            name: &name,
            seeds: vec![seed],
            text,
            run: &|b| {
                std::fs::write(&path, b).map_err(|e| e.to_string())?;
                open_all_splits(kind, root)
            },
        },
        stream,
    );
    let _ = std::fs::remove_dir_all(root);
}

fn write(root: &Path, file: &str, text: &str) {
    let p = root.join(file);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

#[test]
fn fuzz_cub_annotations() {
    for (i, file) in ["images.txt", "image_class_labels.txt"].iter().enumerate() {
        let root = super::testing::cub(&format!("fuzz-cub-{i}"), 4, 3);
        write(&root, "classes.txt", "1 001.a\n2 002.b\n3 003.c\n4 004.d\n");
        fuzz_annotations("cub200", &root, file, true, 10 + i as u64);
    }
}

#[test]
fn fuzz_sop_annotations() {
    let root = temp_dir("fuzz-sop");
    let mut train = String::from("image_id class_id super_class_id path\n");
    let mut test = train.clone();
    for i in 1..=12 {
        train += &format!("{i} {} 1 bike_final/{i}_0.JPG\n", 1 + (i - 1) / 3);
        test += &format!("{i} {} 2 chair_final/{i}_0.JPG\n", 5 + (i - 1) / 3);
    }
    write(&root, "Ebay_train.txt", &train);
    write(&root, "Ebay_test.txt", &test);
    fuzz_annotations("sop", &root, "Ebay_train.txt", true, 20);
}

/// Fuzzes the text annotations of a dataset `kind` held in one file,
/// `file`: `header`, then `rows`.
fn fuzz_one_file(
    kind: &str,
    file: &str,
    header: &str,
    rows: impl Iterator<Item = String>,
    seed: u64,
) {
    let root = temp_dir(&format!("fuzz-{kind}"));
    let text: String = std::iter::once(header.to_string()).chain(rows).collect();
    write(&root, file, &text);
    fuzz_annotations(kind, &root, file, true, seed);
}

#[test]
fn fuzz_inshop_annotations() {
    let rows = (0..24).map(|i| {
        let status = ["train", "query", "gallery"][i % 3];
        let item = if i % 3 == 0 { i / 3 } else { 100 + i % 4 };
        format!("img/WOMEN/Dresses/id_{item:08}/{i:02}_1_front.jpg id_{item:08} {status}\n")
    });
    let header = "24\nimage_name item_id evaluation_status\n";
    fuzz_one_file("inshop", "list_eval_partition.txt", header, rows, 30);
}

#[test]
fn fuzz_csv_annotations() {
    let rows = (0..18).map(|i| {
        let split = if i < 9 { "train" } else { "test" };
        format!(
            "c{},\"img/{i}, x.png\",{split},{},{}\n",
            i / 3,
            i % 2,
            1 - i % 2
        )
    });
    let header = "label,path,split,is_query,is_gallery\n";
    fuzz_one_file("csv", "dataset.csv", header, rows, 40);
}

#[test]
fn fuzz_cars_annotations() {
    let root = temp_dir("fuzz-cars");
    let rows = (0..8)
        .map(|i| {
            vec![
                W::Str(format!("car_ims/{i:06}.jpg")),
                W::U8(1 + (i % 4) as u8),
                W::U8((i % 2) as u8),
            ]
        })
        .collect();
    let bytes = write_mat(
        &[
            (
                "annotations",
                W::Struct(
                    vec!["relative_im_path".into(), "class".into(), "test".into()],
                    rows,
                ),
            ),
            (
                "class_names",
                W::Cell((1..=4).map(|c| W::Str(format!("car {c}"))).collect()),
            ),
        ],
        false,
    );
    std::fs::write(root.join("cars_annos.mat"), bytes).unwrap();
    fuzz_annotations("cars196", &root, "cars_annos.mat", false, 50);
}

/// Replays every saved failure in `tests/fuzz-regressions/<target>/`.
#[test]
fn regressions_stay_fixed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions");
    let targets = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (the saved inputs moved?)", dir.display()));
    let mut replayed = 0;
    for target in targets.flatten() {
        let kind = target.file_name().to_string_lossy().into_owned();
        for file in std::fs::read_dir(target.path()).unwrap().flatten() {
            let bytes = std::fs::read(file.path()).unwrap();
            let t = Target {
                name: &kind,
                seeds: vec![],
                text: false,
                run: &|b| match kind.as_str() {
                    "idx" => idx_ok(idx::parse(Path::new("fuzz.idx"), b)),
                    "mat" => mat_ok(mat::parse(b)),
                    "jpeg" | "png" => match decode::decode(b, 0) {
                        Ok(img) => image_ok(&img),
                        Err(_) => Ok(false),
                    },
                    other => Err(format!("no replay for target {other}")),
                },
            };
            if let Err(why) = check_one(&t, &bytes) {
                panic!("{}: {why}", file.path().display());
            }
            replayed += 1;
        }
    }
    assert!(replayed > 0, "no saved fuzz input under {}", dir.display());
}
