//! Data: datasets (random access to samples), the recipe's `data` block, and the loaders that
//! prepare batches on a background thread while the current batch trains.

mod idx;
mod loader;
mod synthetic;

pub use idx::{read_idx, Idx, ImageSet};
pub use loader::{Loader, LoaderConfig};
pub use synthetic::{synthetic_splits, Synthetic, SyntheticConfig};

use crate::error::Result;
use crate::plugin::PluginConfig;
use candle_core::Tensor;
use recipe_kernels::Targets;
use std::sync::Arc;

/// One batch: inputs [N, C, H, W] and targets (class indices, or distributions while an algorithm
/// such as label smoothing has swapped them in). `labels` always holds the class indices.
#[derive(Debug, Clone)]
pub struct Batch {
    pub inputs: Tensor,
    pub targets: Targets,
    pub labels: Tensor,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.inputs.dim(0).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Samples `start..start + len` of the batch (a microbatch).
    pub fn narrow(&self, start: usize, len: usize) -> candle_core::Result<Batch> {
        Ok(Batch {
            inputs: self.inputs.narrow(0, start, len)?,
            targets: match &self.targets {
                Targets::Hard(t) => Targets::Hard(t.narrow(0, start, len)?),
                Targets::Soft(t) => Targets::Soft(t.narrow(0, start, len)?),
            },
            labels: self.labels.narrow(0, start, len)?,
        })
    }
}

/// Random access to labelled images.
pub trait Dataset: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Writes sample `index` (C*H*W values in [0, 1], channel-major) into `out`; returns its label.
    fn get(&self, index: usize, out: &mut [f32]) -> u32;
}

/// How a recipe block builds the runtime object.
pub trait DatasetConfig: PluginConfig {
    /// Shape and sizes, known without reading any file (synthetic stand-ins use them).
    fn info(&self) -> DatasetInfo;
    fn build(&self, ctx: &DataContext) -> Result<Splits>;
}

/// What is known about a dataset without reading it.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetInfo {
    /// One sample: channels, height, width.
    pub shape: [usize; 3],
    pub num_classes: usize,
    pub train_len: usize,
    pub eval_len: usize,
    /// Per-channel mean and standard deviation used to normalise.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl DatasetInfo {
    /// Checks that the shape, classes and normalisation constants make sense together.
    pub fn validate(&self, key: &str) -> crate::error::Result<()> {
        let bad = |m: String| crate::error::Error::recipe(key, m);
        if self.shape.contains(&0) {
            return Err(bad(format!(
                "sample shape {:?} has a zero dimension",
                self.shape
            )));
        }
        if self.num_classes == 0 {
            return Err(bad("the dataset needs at least one class".into()));
        }
        if self.mean.len() != self.shape[0] || self.std.len() != self.shape[0] {
            return Err(bad(format!(
                "mean and std need one value per channel ({})",
                self.shape[0]
            )));
        }
        if self.std.iter().any(|s| s.is_nan() || *s <= 0.0) {
            return Err(bad("std values must be positive".into()));
        }
        Ok(())
    }
}

/// A dataset's train and eval splits.
pub struct Splits {
    pub train: Arc<dyn Dataset>,
    pub eval: Option<Arc<dyn Dataset>>,
    pub info: DatasetInfo,
}

/// What a dataset is built with.
#[derive(Debug, Clone)]
pub struct DataContext {
    pub seed: u64,
    /// The dataset block's place in the recipe (`data`), for error messages.
    pub path: String,
}
