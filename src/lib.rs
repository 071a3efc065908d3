//! grouploss: the Group Loss for deep metric learning (Elezi et al., ECCV
//! 2020) with label-propagation refinement, sampling, data, evaluation and
//! training over libtorch tensors.
//!
//! The core is plain Rust over `tch`; the Python bindings live in
//! `python` behind the `python` cargo feature.

pub mod data;
pub mod error;
pub mod eval;
pub mod files;
pub mod loss;
pub mod model;
pub mod names;
pub mod rng;
pub mod sampler;
pub mod train;

#[cfg(feature = "python")]
pub mod python;

pub use error::{Error, Result};
