//! Datasets, image decoding, transforms and the batch loader.
//!
//! - [`readers`]: the published layouts (IDX for Fashion-MNIST and glyphs,
//!   CUB200, Cars196, Stanford Online Products, InShop, ImageFolder, CSV),
//!   each giving a [`Dataset`] of one class-disjoint split.
//! - [`Transform`]: JPEG/PNG decoding (libjpeg-turbo decodes only the crop),
//!   RandomResizedCrop + flip, resize + centre crop, small-image jitter,
//!   normalisation presets, into float32 CHW.
//! - [`Loader`]: a thread pool building float32 NCHW batches ahead of the
//!   consumer, deterministic for a seed whatever the thread count.

pub mod dataset;
pub mod decode;
#[cfg(test)]
mod fuzz_tests;
pub mod idx;
pub mod image;
mod jpeg;
pub mod loader;
pub mod mat;
pub mod paths;
mod png;
pub mod readers;
pub mod transform;

pub use dataset::{Dataset, DatasetOptions, Split};
pub use image::Image;
pub use jpeg::encode as encode_jpeg;
pub use loader::{Batch, Epoch, Loader, LoaderOptions, OnError, Skipped};
pub use readers::{home, image_files, open, ReaderOptions};
pub use transform::{Affine, CropBox, Geometry, Normalization, Transform, Workspace};

#[cfg(test)]
pub(crate) mod testing {
    //! Fixtures for the data tests.
    use std::path::{Path, PathBuf};

    use super::{encode_jpeg, Image};
    use crate::rng::Rng;

    /// A fresh empty folder under the system temp dir.
    pub(crate) fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("grouploss-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A smooth random RGB JPEG of `w` x `h` pixels.
    pub(crate) fn write_jpeg(path: &Path, seed: u64, w: usize, h: usize) {
        let mut rng = Rng::new(seed);
        let (a, b) = (rng.uniform(0.01, 0.1), rng.uniform(0.01, 0.1));
        let mut data = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                let v = 127.0 + 100.0 * ((x as f64 * a).sin() * (y as f64 * b).cos());
                data.extend_from_slice(&[v as u8, (255.0 - v) as u8, (x % 256) as u8]);
            }
        }
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, encode_jpeg(&Image::new(w, h, 3, data), 90).unwrap()).unwrap();
    }

    /// CUB layout: `classes` x `per_class` images; returns the root.
    pub(crate) fn cub(name: &str, classes: usize, per_class: usize) -> PathBuf {
        let root = temp_dir(name);
        let (mut images, mut labels) = (String::new(), String::new());
        let mut id = 0;
        for c in 1..=classes {
            for j in 0..per_class {
                id += 1;
                let rel = format!("{c:03}.c/{j}.jpg");
                write_jpeg(&root.join("images").join(&rel), id as u64, 60, 40);
                images += &format!("{id} {rel}\n");
                labels += &format!("{id} {c}\n");
            }
        }
        std::fs::write(root.join("images.txt"), images).unwrap();
        std::fs::write(root.join("image_class_labels.txt"), labels).unwrap();
        root
    }
}
