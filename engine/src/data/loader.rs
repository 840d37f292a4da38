//! Loaders: seeded shuffling, the per-sample pipeline (decode, transforms, normalisation) on all
//! cores, and a background thread that keeps a bounded number of batches ready while one trains.
//!
//! A batch's content depends only on (seed, epoch, position): shuffling draws from a stream per
//! epoch, transforms from a stream per sample position, so the number of threads never changes
//! the result and a run can restart at any batch of an epoch. Memory holds at most `prefetch`
//! batches ahead, whatever the dataset's size.

use super::augment::SampleAugment;
use super::image::Sample;
use super::pipeline::{self, Pipeline, RandomCrop, Scratch, Transform};
use super::{Batch, Dataset, DatasetInfo};
use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rayon::prelude::*;
use recipe_kernels::Targets;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

/// Training-time augmentation, the short form of `train_transforms` for fixed-size images:
/// `{crop_padding: 4, hflip: true}` is `[{random_crop: {padding: 4}}, random_horizontal_flip]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Augment {
    /// Pad each side by this many pixels (zeros), then crop back to size at a random offset.
    #[serde(default)]
    pub crop_padding: usize,
    /// Flip left-right with probability 1/2.
    #[serde(default)]
    pub hflip: bool,
}

impl Augment {
    fn transforms(&self) -> Vec<Transform> {
        let mut t = Vec::new();
        if self.crop_padding > 0 {
            t.push(Transform::RandomCrop(RandomCrop {
                size: None,
                padding: self.crop_padding,
            }));
        }
        if self.hflip {
            t.push(Transform::RandomHorizontalFlip(pipeline::Flip { p: 0.5 }));
        }
        t
    }
}

/// What to do with a sample whose file cannot be read or decoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BadImage {
    /// Stop with an error naming the file.
    #[default]
    Error,
    /// Leave it out of its batch, warn, and count it (`data/skipped_images`).
    Skip,
}

/// `normalize: true` (the dataset's mean and std), `false`, or `{mean: [...], std: [...]}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Normalize {
    Dataset(bool),
    With { mean: Vec<f64>, std: Vec<f64> },
}

/// The function progressive resizing hands the loader: the `[height, width]` of global training
/// batch `b`, or `None` for the transforms' own size.
pub type SizeForBatch = Arc<dyn Fn(u64) -> Option<[usize; 2]> + Send + Sync>;

fn default_batch() -> usize {
    128
}
fn default_eval_batch() -> usize {
    500
}
fn yes() -> bool {
    true
}
fn default_prefetch() -> usize {
    2
}
fn default_normalize() -> Normalize {
    Normalize::Dataset(true)
}

/// The loader keys of the recipe's `data` block (the other keys belong to the dataset).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoaderConfig {
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    #[serde(default = "default_eval_batch")]
    pub eval_batch_size: usize,
    /// Drop the last incomplete training batch of each epoch.
    #[serde(default = "yes")]
    pub drop_last: bool,
    #[serde(default = "yes")]
    pub shuffle: bool,
    /// Short form of `train_transforms` (pad-and-crop, flip).
    #[serde(default)]
    pub augment: Augment,
    /// Per-sample transforms of training samples, in order.
    #[serde(default)]
    pub train_transforms: Option<Vec<Transform>>,
    /// Per-sample transforms of evaluation samples, in order.
    #[serde(default)]
    pub eval_transforms: Option<Vec<Transform>>,
    /// Subtract a mean and divide by a standard deviation, per channel.
    #[serde(default = "default_normalize")]
    pub normalize: Normalize,
    /// Decode JPEGs at 1/2, 1/4 or 1/8 size (in the DCT domain) when the output needs no more.
    #[serde(default = "yes")]
    pub reduced_decode: bool,
    /// A file that cannot be read or decoded: `error` (stop) or `skip` (leave it out, count it).
    #[serde(default)]
    pub on_bad_image: BadImage,
    /// Use only the first N training samples.
    #[serde(default)]
    pub train_subset: Option<usize>,
    /// Use only the first N evaluation samples.
    #[serde(default)]
    pub eval_subset: Option<usize>,
    /// Replace the dataset with synthetic data of the same shape, classes and size.
    #[serde(default)]
    pub synthetic: bool,
    /// Batches prepared ahead on the background thread.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// Threads that decode and transform samples (default: all cores).
    #[serde(default)]
    pub workers: Option<usize>,
}

impl LoaderConfig {
    /// The loader keys, which the engine takes out of the `data` block.
    pub const KEYS: &'static [&'static str] = &[
        "batch_size",
        "eval_batch_size",
        "drop_last",
        "shuffle",
        "augment",
        "train_transforms",
        "eval_transforms",
        "normalize",
        "reduced_decode",
        "on_bad_image",
        "train_subset",
        "eval_subset",
        "synthetic",
        "prefetch",
        "workers",
    ];

    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(Error::recipe("data.batch_size", "must be at least 1"));
        }
        if self.eval_batch_size == 0 {
            return Err(Error::recipe("data.eval_batch_size", "must be at least 1"));
        }
        if !(1..=64).contains(&self.prefetch) {
            return Err(Error::recipe(
                "data.prefetch",
                format!("{} batches ahead: use 1 to 64", self.prefetch),
            ));
        }
        if self.workers == Some(0) {
            return Err(Error::recipe_hint(
                "data.workers",
                "must be at least 1",
                "leave it out to use every core",
            ));
        }
        if self.train_transforms.is_some() && self.augment != Augment::default() {
            return Err(Error::recipe_hint(
                "data.augment",
                "both `augment` and `train_transforms` are given",
                "keep one: `augment` is the short form of `train_transforms`",
            ));
        }
        if let Normalize::With { mean, std } = &self.normalize {
            if mean.is_empty() || mean.len() != std.len() {
                return Err(Error::recipe(
                    "data.normalize",
                    "mean and std need the same number of values, one per channel",
                ));
            }
            if std.iter().any(|s| s.is_nan() || *s <= 0.0) {
                return Err(Error::recipe(
                    "data.normalize.std",
                    "values must be positive",
                ));
            }
        }
        if let Some(t) = &self.train_transforms {
            pipeline::validate(t, "data.train_transforms")?;
        }
        if let Some(t) = &self.eval_transforms {
            pipeline::validate(t, "data.eval_transforms")?;
        }
        Ok(())
    }

    /// The transforms of one split, and the recipe key that names them.
    pub fn transforms(&self, train: bool) -> (Vec<Transform>, &'static str) {
        if train {
            (
                self.train_transforms
                    .clone()
                    .unwrap_or_else(|| self.augment.transforms()),
                "data.train_transforms",
            )
        } else {
            (
                self.eval_transforms.clone().unwrap_or_default(),
                "data.eval_transforms",
            )
        }
    }

    /// The sample shape a split's transforms make from the dataset's `shape` (where a side of 0
    /// means the images vary in size).
    pub fn output_shape(&self, shape: [usize; 3], train: bool) -> Result<[usize; 3]> {
        let [c, h, w] = shape;
        let native = (h > 0 && w > 0).then_some([h, w]);
        let (list, key) = self.transforms(train);
        match pipeline::output_size(&list, native) {
            Some([h, w]) => Ok([c, h, w]),
            None => Err(Error::recipe_hint(
                key,
                "the images of this dataset differ in size, and these transforms do not give them one size",
                if train {
                    "end the list with a crop to a fixed size, e.g. `[{random_resized_crop: {size: 224}}, {random_horizontal_flip: {}}]`"
                } else {
                    "end the list with a crop to a fixed size, e.g. `[{resize: 256}, {center_crop: 224}]`"
                },
            )),
        }
    }

    /// The mean and std to normalise with, from the dataset's unless given.
    fn normalization(&self, info: &DatasetInfo) -> Option<(Vec<f32>, Vec<f32>)> {
        match &self.normalize {
            Normalize::Dataset(false) => None,
            Normalize::Dataset(true) => Some((info.mean.clone(), info.std.clone())),
            Normalize::With { mean, std } => Some((
                mean.iter().map(|&v| v as f32).collect(),
                std.iter().map(|&v| v as f32).collect(),
            )),
        }
    }
}

/// Batches of one split.
#[derive(Clone)]
pub struct Loader {
    ds: Arc<dyn Dataset>,
    len: usize,
    /// The dataset's info, with the shape of the samples this loader makes.
    info: DatasetInfo,
    batch_size: usize,
    train: bool,
    cfg: LoaderConfig,
    seed: u64,
    pipeline: Arc<Pipeline>,
    pool: Option<Arc<rayon::ThreadPool>>,
    size_for_batch: Option<SizeForBatch>,
    skipped: Arc<AtomicU64>,
    /// Data parallel: (rank, size). Each batch keeps its global composition and positions (the
    /// same samples and augmentation draws as one process), and this loader makes only the
    /// rank's share of it ([`crate::dist::shard_range`]).
    shard: Option<(usize, usize)>,
}

impl Loader {
    pub fn new(
        ds: Arc<dyn Dataset>,
        info: DatasetInfo,
        cfg: &LoaderConfig,
        train: bool,
        seed: u64,
    ) -> Result<Self> {
        cfg.validate()?;
        let shape = cfg.output_shape(info.shape, train)?;
        let info = DatasetInfo { shape, ..info };
        info.validate("data")?;
        let [c, h, w] = info.shape;
        if cfg.augment.crop_padding >= h.max(w) {
            return Err(Error::recipe(
                "data.augment.crop_padding",
                format!(
                    "{} pixels of padding is more than the {h}x{w} image",
                    cfg.augment.crop_padding
                ),
            ));
        }
        let normalize = cfg.normalization(&info);
        if let Some((m, _)) = &normalize {
            if m.len() != c && m.len() != 1 {
                return Err(Error::recipe(
                    "data.normalize",
                    format!("{} mean values for {c}-channel images", m.len()),
                ));
            }
        }
        let subset = if train {
            cfg.train_subset
        } else {
            cfg.eval_subset
        };
        let len = subset.map_or(ds.len(), |s| s.min(ds.len()));
        let batch_size = if train {
            cfg.batch_size
        } else {
            cfg.eval_batch_size
        };
        if train && len < batch_size && cfg.drop_last {
            return Err(Error::recipe_hint(
                "data.batch_size",
                format!("the training set has {len} samples, fewer than one batch of {batch_size}"),
                "lower data.batch_size, or set data.drop_last: false",
            ));
        }
        if len == 0 {
            return Err(Error::recipe(
                if train {
                    "data.train_subset"
                } else {
                    "data.eval_subset"
                },
                "the split is empty",
            ));
        }
        let pool = match cfg.workers {
            Some(n) => Some(Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .thread_name(|i| format!("recipe-data-{i}"))
                    .build()
                    .map_err(|e| Error::msg(format!("cannot start {n} data workers: {e}")))?,
            )),
            None => None,
        };
        Ok(Loader {
            ds,
            len,
            pipeline: Arc::new(Pipeline {
                transforms: cfg.transforms(train).0,
                channels: c,
                normalize,
                reduced_decode: cfg.reduced_decode,
                augments: Vec::new(),
            }),
            info,
            batch_size,
            train,
            cfg: cfg.clone(),
            seed,
            pool,
            size_for_batch: None,
            skipped: Default::default(),
            shard: None,
        })
    }

    /// The training split (its `train_subset`, cut to `limit` samples) in order, through the
    /// evaluation transforms, in eval-size batches: what measurements over the training set read.
    pub fn in_order(
        ds: Arc<dyn Dataset>,
        info: DatasetInfo,
        cfg: &LoaderConfig,
        limit: Option<usize>,
        seed: u64,
    ) -> Result<Self> {
        let mut c = cfg.clone();
        c.eval_subset = match (cfg.train_subset, limit) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Loader::new(ds, info, &c, false, seed)
    }

    /// Makes training batches at the size `f` gives for each global batch (progressive resizing
    /// decodes and crops straight to it).
    pub fn set_size_for_batch(&mut self, f: SizeForBatch) {
        self.size_for_batch = Some(f);
    }

    /// Adds a per-sample augmentation of the 8-bit pictures (after those added before), run on
    /// every sample this loader makes: the trainer adds the algorithms' to the training loader.
    pub fn add_sample_augment(&mut self, f: SampleAugment) {
        Arc::make_mut(&mut self.pipeline).augments.push(f);
    }

    /// Makes only rank `rank`'s share of each batch, of a job of `size` processes.
    pub fn shard(&mut self, rank: usize, size: usize) {
        self.shard = (size > 1).then_some((rank, size));
    }

    /// The number of samples in the split (all ranks together).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    pub fn info(&self) -> &DatasetInfo {
        &self.info
    }

    /// Samples left out so far because their files could not be read (`on_bad_image: skip`).
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    pub fn batches_per_epoch(&self) -> u64 {
        if self.train && self.cfg.drop_last {
            (self.len / self.batch_size) as u64
        } else {
            self.len.div_ceil(self.batch_size) as u64
        }
    }

    /// The sample order of an epoch.
    fn order(&self, epoch: u64) -> Vec<usize> {
        if !(self.train && self.cfg.shuffle) {
            return (0..self.len).collect();
        }
        let mut rng = crate::rng::stream(self.seed, &format!("shuffle/epoch{epoch}"));
        if let Some(order) = self.ds.epoch_order(&mut rng) {
            // A stream over the whole dataset; a subset keeps its first `len` samples.
            return order.into_iter().filter(|&i| i < self.len).collect();
        }
        let mut idx: Vec<usize> = (0..self.len).collect();
        idx.shuffle(&mut rng);
        idx
    }

    /// One sample, written into `out`; returns its label.
    fn sample(
        &self,
        index: usize,
        position: usize,
        purpose: &str,
        size: Option<[usize; 2]>,
        scratch: &mut Scratch,
        out: &mut [f32],
    ) -> Result<u32> {
        let (sample, label): (Sample, u32) = self.ds.read(index)?;
        let mut rng = crate::rng::item_stream(self.seed, purpose, position as u64);
        let name = self.ds.name(index);
        self.pipeline
            .run(sample, size, &mut rng, Path::new(&name), scratch, out)?;
        Ok(label)
    }

    /// Prepares one batch (pixels, labels, [height, width]) of an epoch, given the epoch's order.
    fn make(&self, order: &[usize], epoch: u64, batch: u64) -> Result<Made> {
        let [c, h, w] = self.info.shape;
        let size = match (&self.size_for_batch, self.train) {
            (Some(f), true) => f(epoch * self.batches_per_epoch() + batch),
            _ => None,
        };
        let [h, w] = size.unwrap_or([h, w]);
        let sample = c * h * w;
        let mut start = batch as usize * self.batch_size;
        let mut idx = &order[start..(start + self.batch_size).min(order.len())];
        if let Some((rank, size)) = self.shard {
            let r = crate::dist::shard_range(idx.len(), rank, size);
            start += r.start;
            idx = &idx[r];
        }
        let mut pixels = vec![0.0f32; idx.len() * sample];
        let mut labels = vec![0u32; idx.len()];
        let mut results: Vec<Result<()>> = (0..idx.len()).map(|_| Ok(())).collect();
        let purpose = format!("augment/epoch{epoch}");
        let mut work = || {
            pixels
                .par_chunks_mut(sample)
                .zip(labels.par_iter_mut())
                .zip(results.par_iter_mut())
                .enumerate()
                .for_each_init(
                    Scratch::default,
                    |scratch, (k, ((out, label), res))| match self.sample(
                        idx[k],
                        start + k,
                        &purpose,
                        size,
                        scratch,
                        out,
                    ) {
                        Ok(l) => *label = l,
                        Err(e) => *res = Err(e),
                    },
                );
        };
        match &self.pool {
            Some(p) => p.install(work),
            None => work(),
        }
        let mut failures = results
            .into_iter()
            .enumerate()
            .filter_map(|(k, r)| r.err().map(|e| (k, e)));
        let Some((first_bad, first)) = failures.next() else {
            return Ok((pixels, labels, [h, w]));
        };
        if self.cfg.on_bad_image == BadImage::Error {
            return Err(first);
        }
        let failures: Vec<(usize, Error)> = std::iter::once((first_bad, first))
            .chain(failures)
            .collect();
        for (_, e) in &failures {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("skipped a bad image (data.on_bad_image: skip): {e}");
        }
        if failures.len() == labels.len() {
            return Err(Error::msg(format!(
                "every image of batch {batch} of epoch {epoch} is unreadable; the first: {}",
                failures[0].1
            )));
        }
        let (mut kept_px, mut kept_labels) = (Vec::new(), Vec::new());
        for k in (0..labels.len()).filter(|k| !failures.iter().any(|(b, _)| b == k)) {
            kept_px.extend_from_slice(&pixels[k * sample..(k + 1) * sample]);
            kept_labels.push(labels[k]);
        }
        Ok((kept_px, kept_labels, [h, w]))
    }

    /// The batches of `epoch` from batch `start` on, prepared on a background thread.
    pub fn epoch(&self, epoch: u64, start: u64, device: &Device) -> EpochIter {
        let (tx, rx) = sync_channel(self.cfg.prefetch.max(1));
        let me = self.clone();
        let end = self.batches_per_epoch();
        std::thread::spawn(move || {
            let order = me.order(epoch);
            for b in start..end {
                // A dataset that panics must not leave the trainer waiting or training on less.
                let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    me.make(&order, epoch, b)
                }))
                .unwrap_or_else(|p| {
                    let why = p
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| p.downcast_ref::<&str>().copied())
                        .unwrap_or("unknown cause");
                    Err(Error::msg(format!(
                        "the data loader failed on batch {b} of epoch {epoch}: {why}"
                    )))
                });
                let failed = made.is_err();
                if tx.send(made).is_err() || failed {
                    return; // the consumer stopped early, or the error is on its way
                }
            }
        });
        EpochIter {
            rx,
            channels: self.info.shape[0],
            device: device.clone(),
        }
    }
}

type Made = (Vec<f32>, Vec<u32>, [usize; 2]);

/// An epoch's batches, in order.
pub struct EpochIter {
    rx: Receiver<Result<Made>>,
    channels: usize,
    device: Device,
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Result<Batch>> {
        let (pixels, labels, [h, w]) = match self.rx.recv().ok()? {
            Ok(b) => b,
            Err(e) => return Some(Err(e)),
        };
        let n = labels.len();
        let c = self.channels;
        let make = || -> Result<Batch> {
            let inputs = Tensor::from_vec(pixels, (n, c, h, w), &self.device)?;
            let labels = Tensor::from_vec(labels, n, &self.device)?;
            Ok(Batch {
                inputs,
                targets: Targets::Hard(labels.clone()),
                labels,
            })
        };
        Some(make())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Synthetic;

    fn loader(train: bool, cfg: LoaderConfig) -> Loader {
        let ds = Arc::new(Synthetic::new([1, 6, 6], 3, 50, 0.5, 1));
        let info = DatasetInfo {
            shape: [1, 6, 6],
            num_classes: 3,
            train_len: 50,
            eval_len: 0,
            mean: vec![0.5],
            std: vec![0.25],
        };
        Loader::new(ds, info, &cfg, train, 9).unwrap()
    }

    fn cfg() -> LoaderConfig {
        serde_yaml::from_str("batch_size: 8\naugment: {crop_padding: 2, hflip: true}").unwrap()
    }

    fn collect(l: &Loader, epoch: u64, start: u64) -> Vec<(Vec<f32>, Vec<u32>)> {
        l.epoch(epoch, start, &Device::Cpu)
            .map(|b| {
                let b = b.unwrap();
                (
                    b.inputs.flatten_all().unwrap().to_vec1().unwrap(),
                    b.labels.to_vec1().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn epochs_are_deterministic_restartable_and_differ_from_each_other() {
        let l = loader(true, cfg());
        assert_eq!(l.batches_per_epoch(), 6); // 50 / 8, last partial dropped
        let a = collect(&l, 0, 0);
        assert_eq!(a.len(), 6);
        assert_eq!(a, collect(&l, 0, 0));
        assert_eq!(&a[3..], &collect(&l, 0, 3)[..]);
        assert_ne!(a, collect(&l, 1, 0));
    }

    /// A per-sample augmentation draws from the sample's own generator: the batches do not
    /// depend on the number of worker threads, and the same seed gives the same batches.
    #[test]
    fn sample_augments_do_not_depend_on_workers() {
        use crate::data::augment::AugmentationSet;
        // RandAugment's chain: two operations of the whole set at severity 9.
        let aug: SampleAugment = Arc::new(|img, rng| {
            for _ in 0..2 {
                *img = AugmentationSet::All.choose(rng).apply(img, 9.0, rng);
            }
            Ok(())
        });
        let plain = collect(&loader(true, cfg()), 0, 0);
        let mut runs = Vec::new();
        for workers in [1, 4, 4] {
            let mut c = cfg();
            c.workers = Some(workers);
            let mut l = loader(true, c);
            l.add_sample_augment(aug.clone());
            runs.push(collect(&l, 0, 0));
        }
        assert_eq!(runs[0], runs[1]);
        assert_eq!(runs[1], runs[2]);
        assert_ne!(runs[0], plain, "the augmentation changed nothing");
        // The labels and the order are the plain run's: only pixels change.
        let labels = |r: &[(Vec<f32>, Vec<u32>)]| r.iter().map(|b| b.1.clone()).collect::<Vec<_>>();
        assert_eq!(labels(&runs[0]), labels(&plain));
    }

    #[test]
    fn eval_keeps_the_last_partial_batch_in_order() {
        let mut c = cfg();
        c.eval_batch_size = 16;
        let l = loader(false, c);
        let b = collect(&l, 0, 0);
        assert_eq!(
            b.iter().map(|x| x.1.len()).collect::<Vec<_>>(),
            vec![16, 16, 16, 2]
        );
        assert_eq!(b, collect(&l, 5, 0));
    }
}
