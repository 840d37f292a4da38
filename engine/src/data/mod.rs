//! Data: datasets (random access to samples, decoded or still encoded), the per-sample transform
//! pipeline, the recipe's `data` block, and the loaders that prepare batches on all cores while
//! the current batch trains.

pub mod augment;
mod cifar;
mod folder;
mod idx;
pub mod image;
mod loader;
pub mod pipeline;
mod shards;
mod synthetic;

pub use augment::{AugmentationSet, SampleAugment};
pub use cifar::{Cifar100Config, Cifar10Config, CifarSet};
pub use folder::{list_classes, ImageFolder, ImageFolderConfig};
pub use idx::{read_idx, Idx, ImageSet};
pub use image::{Image, Sample};
pub use loader::{BadImage, Loader, LoaderConfig, Normalize, SizeForBatch};
pub use pipeline::Transform;
pub use shards::{expand_braces, TarShards, TarShardsConfig};
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
    /// Sample `index`: its picture (decoded, or a file's bytes) and its label. Called from many
    /// threads at once.
    fn read(&self, index: usize) -> Result<(Sample, u32)>;
    /// What sample `index` is called in messages: its file, or its place in the dataset.
    fn name(&self, index: usize) -> String {
        format!("sample {index}")
    }
    /// The order of a shuffled training epoch, for datasets read as a stream (tar shards: shard
    /// order and a shuffle buffer); `None` for a uniform shuffle. `rng` is the epoch's stream.
    fn epoch_order(&self, _rng: &mut dyn rand::RngCore) -> Option<Vec<usize>> {
        None
    }
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
    /// One sample: channels, height, width. A side of 0: the images vary in size, and the
    /// loader's transforms set the size of the samples.
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
            return Err(crate::error::Error::recipe_hint(
                key,
                format!("sample shape {:?} has a zero dimension", self.shape),
                "images that vary in size need `train_transforms` and `eval_transforms` that end in a fixed-size crop",
            ));
        }
        if self.num_classes == 0 {
            return Err(crate::error::Error::recipe_hint(
                key,
                "the dataset needs at least one class",
                "image_folder and tar_shards count their classes from their files: check that `data.root` (or `data.shards`) exists, or give `data.num_classes`",
            ));
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

/// ImageNet's per-channel mean and std (torchvision's): the default for photographs.
pub(crate) fn imagenet_mean() -> Vec<f64> {
    vec![0.485, 0.456, 0.406]
}
pub(crate) fn imagenet_std() -> Vec<f64> {
    vec![0.229, 0.224, 0.225]
}

/// The info of a dataset of variable-size 3-channel images whose sizes are read from its files:
/// the recipe's `declared` values (classes, train size, eval size) where given, a `scan` of the
/// files (run once, kept in `cache`) where not, `fallback`'s where the files cannot be read.
pub(crate) fn planned_info(
    declared: [Option<usize>; 3],
    cache: &std::sync::OnceLock<Option<DatasetInfo>>,
    scan: impl FnOnce() -> Option<DatasetInfo>,
    fallback: [usize; 3],
    mean: &[f64],
    std: &[f64],
) -> DatasetInfo {
    let scanned = if declared.iter().all(Option::is_some) {
        None
    } else {
        cache.get_or_init(scan).as_ref()
    };
    let pick = |i: usize| {
        declared[i]
            .or_else(|| scanned.map(|s| [s.num_classes, s.train_len, s.eval_len][i]))
            .unwrap_or(fallback[i])
    };
    DatasetInfo {
        shape: [3, 0, 0],
        num_classes: pick(0),
        train_len: pick(1),
        eval_len: pick(2),
        mean: mean.iter().map(|&v| v as f32).collect(),
        std: std.iter().map(|&v| v as f32).collect(),
    }
}

/// A dataset's train and eval splits.
pub struct Splits {
    pub train: Arc<dyn Dataset>,
    pub eval: Option<Arc<dyn Dataset>>,
    pub info: DatasetInfo,
    /// The class names, in label order, when the dataset has them (folders): written to the run
    /// folder and checked on resume.
    pub classes: Option<Vec<String>>,
}

/// What a dataset is built with.
#[derive(Debug, Clone)]
pub struct DataContext {
    pub seed: u64,
    /// The dataset block's place in the recipe (`data`), for error messages.
    pub path: String,
}
