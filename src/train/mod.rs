//! The training loop and everything around it: configuration, presets,
//! optimizers, checkpoints and the run folder.

pub mod autocast;
pub mod checkpoint;
pub mod config;
pub mod distributed;
pub mod memory;
pub mod objective;
pub mod optim;
pub mod presets;
pub mod replica;

pub use config::TrainConfig;
pub use presets::{preset, PRESETS};
mod member;
pub mod progress;
pub mod run_dir;
pub mod run_input;
pub mod run_model;
pub mod runner;
pub mod state;

pub use distributed::{Collective, SingleProcess};
pub use runner::{train, train_on, TrainOutcome};
