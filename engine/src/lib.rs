//! `recipe-engine`: the core of the `recipe` training-recipe engine.
//!
//! - [`time`]: Time, units, resolution into batches.
//! - [`event`], [`engine`]: training events and their dispatch rules.
//! - [`state`]: what algorithms and callbacks see and change.
//! - [`plugin`]: the six plugin kinds, their `inventory` registries, the time-parameter visitor.
//! - [`recipe`]: the YAML schema, `--set` overrides, recipe transforms.
//! - [`trainer`]: the training loop.
//! - [`checkpoint`], [`export`]: checkpoint files (atomic, checksummed), resume, weight export.
//! - [`dist`]: data-parallel jobs (MPI with the `mpi` feature).
//! - [`schedule`], [`optim`], [`data`], [`model`], [`models`], [`ops`]: the built-in parts.

pub mod algorithm;
pub mod atomic;
pub mod callback;
pub mod checkpoint;
pub mod data;
pub mod dist;
pub mod engine;
pub mod error;
pub mod event;
pub mod export;
pub mod metric;
pub mod model;
pub mod models;
pub mod optim;
pub mod param;
pub mod plugin;
pub mod precision;
pub mod recipe;
pub mod registry;
pub mod rng;
pub mod run_dir;
pub mod schedule;
pub mod state;
pub mod state_dict;
pub mod sysinfo;
pub mod time;
pub mod trainer;
pub mod transform;

pub use algorithm::Algorithm;
pub use callback::Callback;
pub use error::{Error, Result};
pub use event::Event;
pub use plugin::{Policy, TimeParams, TimeVisitor};
pub use recipe::Recipe;
pub use state::State;
pub use time::{Time, TimeUnit};
pub use trainer::Trainer;

// Re-exported so plugin crates use the same versions as the engine.
pub use candle_core;
pub use inventory;
pub use rayon;
pub use recipe_kernels as kernels;
pub use serde_yaml;
