//! Mini-batch plans for metric learning: P classes x K samples per batch.
//!
//! The Group Loss refines the predictions of a batch jointly, so every batch
//! must hold several samples of each of its classes. [`ClassBalancedSampler`]
//! plans a whole epoch at once from the labels alone (no tensors, no files),
//! so the same plan serves a Python `DataLoader`, the Rust loader and every
//! rank of a distributed run.

mod class_balanced;

pub use class_balanced::{ClassBalancedSampler, SamplerOptions};
