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
pub use readers::{open, ReaderOptions};
pub use transform::{CropBox, Geometry, Normalization, Transform, Workspace};
