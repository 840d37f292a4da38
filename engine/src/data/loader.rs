//! Loaders: seeded shuffling, augmentation (random crop with padding, horizontal flip),
//! normalisation, and a background thread that prepares the next batches while one trains.
//!
//! A batch's content depends only on (seed, epoch, position): shuffling draws from a stream per
//! epoch, augmentation from a stream per sample position, so threads never change the result and
//! a run can restart at any batch of an epoch.

use super::{Batch, Dataset, DatasetInfo};
use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::Rng;
use rayon::prelude::*;
use recipe_kernels::Targets;
use serde::{Deserialize, Serialize};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

/// Training-time augmentation.
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
    #[serde(default)]
    pub augment: Augment,
    /// Subtract the dataset's mean and divide by its standard deviation.
    #[serde(default = "yes")]
    pub normalize: bool,
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
}

impl LoaderConfig {
    /// The loader keys, which the engine takes out of the `data` block.
    pub const KEYS: &'static [&'static str] = &[
        "batch_size",
        "eval_batch_size",
        "drop_last",
        "shuffle",
        "augment",
        "normalize",
        "train_subset",
        "eval_subset",
        "synthetic",
        "prefetch",
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
        Ok(())
    }
}

/// Batches of one split.
#[derive(Clone)]
pub struct Loader {
    ds: Arc<dyn Dataset>,
    len: usize,
    info: DatasetInfo,
    batch_size: usize,
    train: bool,
    cfg: LoaderConfig,
    seed: u64,
}

impl Loader {
    pub fn new(
        ds: Arc<dyn Dataset>,
        info: DatasetInfo,
        cfg: &LoaderConfig,
        train: bool,
        seed: u64,
    ) -> Result<Self> {
        info.validate("data")?;
        let [_, h, w] = info.shape;
        if cfg.augment.crop_padding >= h.max(w) {
            return Err(Error::recipe(
                "data.augment.crop_padding",
                format!(
                    "{} pixels of padding is more than the {h}x{w} image",
                    cfg.augment.crop_padding
                ),
            ));
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
        Ok(Loader {
            ds,
            len,
            info,
            batch_size,
            train,
            cfg: cfg.clone(),
            seed,
        })
    }

    /// The training split (its `train_subset`, cut to `limit` samples) in order, without
    /// augmentation, in eval-size batches: what measurements over the training set read.
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

    pub fn batches_per_epoch(&self) -> u64 {
        if self.train && self.cfg.drop_last {
            (self.len / self.batch_size) as u64
        } else {
            self.len.div_ceil(self.batch_size) as u64
        }
    }

    /// The sample order of an epoch.
    fn order(&self, epoch: u64) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.len).collect();
        if self.train && self.cfg.shuffle {
            idx.shuffle(&mut crate::rng::stream(
                self.seed,
                &format!("shuffle/epoch{epoch}"),
            ));
        }
        idx
    }

    /// Prepares one batch (pixels, labels) of an epoch, given the epoch's order.
    fn make(&self, order: &[usize], epoch: u64, batch: u64) -> (Vec<f32>, Vec<u32>) {
        let [c, h, w] = self.info.shape;
        let sample = c * h * w;
        let start = batch as usize * self.batch_size;
        let idx = &order[start..(start + self.batch_size).min(order.len())];
        let mut pixels = vec![0.0f32; idx.len() * sample];
        let mut labels = vec![0u32; idx.len()];
        let purpose = format!("augment/epoch{epoch}");
        pixels
            .par_chunks_mut(sample)
            .zip(labels.par_iter_mut())
            .enumerate()
            .for_each_init(
                || vec![0.0f32; sample],
                |tmp, (k, (out, label))| {
                    *label = self.ds.get(idx[k], tmp);
                    if self.train && (self.cfg.augment.crop_padding > 0 || self.cfg.augment.hflip) {
                        let mut rng =
                            crate::rng::item_stream(self.seed, &purpose, (start + k) as u64);
                        augment(tmp, out, self.info.shape, &self.cfg.augment, &mut rng);
                    } else {
                        out.copy_from_slice(tmp);
                    }
                    if self.cfg.normalize {
                        for ch in 0..c {
                            let (m, s) = (
                                self.info.mean[ch.min(self.info.mean.len() - 1)],
                                self.info.std[ch.min(self.info.std.len() - 1)],
                            );
                            out[ch * h * w..(ch + 1) * h * w]
                                .iter_mut()
                                .for_each(|v| *v = (*v - m) / s);
                        }
                    }
                },
            );
        (pixels, labels)
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
                .map_err(|p| {
                    let why = p
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| p.downcast_ref::<&str>().copied())
                        .unwrap_or("unknown cause");
                    Error::msg(format!(
                        "the data loader failed on batch {b} of epoch {epoch}: {why}"
                    ))
                });
                let failed = made.is_err();
                if tx.send(made).is_err() || failed {
                    return; // the consumer stopped early, or the error is on its way
                }
            }
        });
        EpochIter {
            rx,
            shape: self.info.shape,
            device: device.clone(),
        }
    }
}

/// An epoch's batches, in order.
pub struct EpochIter {
    rx: Receiver<Result<(Vec<f32>, Vec<u32>)>>,
    shape: [usize; 3],
    device: Device,
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Result<Batch>> {
        let (pixels, labels) = match self.rx.recv().ok()? {
            Ok(b) => b,
            Err(e) => return Some(Err(e)),
        };
        let n = labels.len();
        let [c, h, w] = self.shape;
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

/// Random crop with zero padding and horizontal flip of one [C, H, W] sample.
fn augment(src: &[f32], dst: &mut [f32], [c, h, w]: [usize; 3], a: &Augment, rng: &mut impl Rng) {
    let p = a.crop_padding as isize;
    let (dy, dx) = if p > 0 {
        (
            rng.random_range(0..=2 * p as i64) as isize - p,
            rng.random_range(0..=2 * p as i64) as isize - p,
        )
    } else {
        (0, 0)
    };
    let flip = a.hflip && rng.random_bool(0.5);
    for ch in 0..c {
        for y in 0..h {
            let sy = y as isize + dy;
            for x in 0..w {
                let xx = if flip { w - 1 - x } else { x };
                let sx = xx as isize + dx;
                dst[(ch * h + y) * w + x] =
                    if sy >= 0 && sy < h as isize && sx >= 0 && sx < w as isize {
                        src[(ch * h + sy as usize) * w + sx as usize]
                    } else {
                        0.0
                    };
            }
        }
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

    #[test]
    fn crop_shifts_and_flip_mirrors() {
        let src: Vec<f32> = (0..9).map(|v| v as f32).collect();
        let mut dst = vec![0.0; 9];
        let mut rng = crate::rng::stream(0, "t");
        augment(
            &src,
            &mut dst,
            [1, 3, 3],
            &Augment {
                crop_padding: 0,
                hflip: false,
            },
            &mut rng,
        );
        assert_eq!(dst, src);
        // With padding 1 every output is either a source pixel or zero padding.
        for s in 0..20 {
            let mut rng = crate::rng::stream(s, "t");
            augment(
                &src,
                &mut dst,
                [1, 3, 3],
                &Augment {
                    crop_padding: 1,
                    hflip: true,
                },
                &mut rng,
            );
            assert!(dst.iter().all(|v| *v == 0.0 || src.contains(v)));
        }
    }
}
