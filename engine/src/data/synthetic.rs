//! Synthetic labelled images of any shape and class count, generated per index (nothing is held in
//! memory), learnable: each class has a smooth prototype, each sample adds its own noise.

use super::{DataContext, Dataset, DatasetInfo, Image, Sample, Splits};
use crate::data::DatasetConfig;
use crate::error::{Error, Result};
use crate::plugin::TimeParams;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Synthetic {
    shape: [usize; 3],
    classes: usize,
    len: usize,
    noise: f32,
    seed: u64,
    /// One prototype image per class.
    prototypes: Arc<Vec<Vec<f32>>>,
}

impl Synthetic {
    pub fn new(shape: [usize; 3], classes: usize, len: usize, noise: f32, seed: u64) -> Self {
        let [c, h, w] = shape;
        let prototypes = (0..classes)
            .map(|k| {
                // A few random low-frequency waves per class, in [0.1, 0.9].
                let mut r = crate::rng::item_stream(seed, "synthetic/prototype", k as u64);
                let waves: Vec<(f32, f32, f32)> = (0..3)
                    .map(|_| {
                        (
                            r.random_range(0.5..3.0),
                            r.random_range(0.5..3.0),
                            r.random_range(0.0..6.3),
                        )
                    })
                    .collect();
                let mut img = vec![0.0f32; c * h * w];
                for ch in 0..c {
                    for y in 0..h {
                        for x in 0..w {
                            let (fy, fx) = (y as f32 / h.max(1) as f32, x as f32 / w.max(1) as f32);
                            let v: f32 = waves
                                .iter()
                                .map(|(a, b, ph)| {
                                    (a * std::f32::consts::TAU * fy
                                        + b * std::f32::consts::TAU * fx
                                        + ph
                                        + ch as f32)
                                        .sin()
                                })
                                .sum::<f32>()
                                / 3.0;
                            img[(ch * h + y) * w + x] = 0.5 + 0.4 * v;
                        }
                    }
                }
                img
            })
            .collect();
        Synthetic {
            shape,
            classes,
            len,
            noise,
            seed,
            prototypes: Arc::new(prototypes),
        }
    }

    /// The same generator over another range of indices (an eval split that differs from train).
    fn offset(&self, len: usize, salt: u64) -> Self {
        Synthetic {
            len,
            seed: self.seed ^ salt,
            ..self.clone()
        }
    }
}

impl Dataset for Synthetic {
    fn len(&self) -> usize {
        self.len
    }
    fn read(&self, index: usize) -> Result<(Sample, u32)> {
        let mut r = crate::rng::item_stream(self.seed, "synthetic/sample", index as u64);
        let label = r.random_range(0..self.classes as u32);
        let proto = &self.prototypes[label as usize];
        let [c, h, w] = self.shape;
        // Channel-major prototypes, interleaved 8-bit pixels out (what a decoder gives).
        let mut data = vec![0u8; c * h * w];
        for (i, &p) in proto.iter().enumerate() {
            let v = (p + self.noise * (r.random::<f32>() - 0.5)).clamp(0.0, 1.0);
            let (ch, yx) = (i / (h * w), i % (h * w));
            data[yx * c + ch] = (v * 255.0).round() as u8;
        }
        Ok((Sample::Decoded(Image::new(w, h, c, data)), label))
    }
}

/// Splits of synthetic data with the shape and sizes of `info` (the stand-in for `synthetic: true`).
pub fn synthetic_splits(info: &DatasetInfo, seed: u64) -> Splits {
    let train = Synthetic::new(info.shape, info.num_classes, info.train_len, 0.5, seed);
    let eval = train.offset(info.eval_len, 0x5eed);
    Splits {
        train: Arc::new(train),
        eval: Some(Arc::new(eval)),
        info: info.clone(),
        classes: None,
    }
}

fn default_shape() -> [usize; 3] {
    [3, 32, 32]
}
fn default_classes() -> usize {
    10
}
fn default_train() -> usize {
    10_000
}
fn default_eval() -> usize {
    2_000
}
fn default_noise() -> f32 {
    0.5
}

/// Synthetic images for throughput runs and smoke tests.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticConfig {
    /// Channels, height, width.
    #[serde(default = "default_shape")]
    pub shape: [usize; 3],
    #[serde(default = "default_classes")]
    pub num_classes: usize,
    #[serde(default = "default_train")]
    pub train_size: usize,
    #[serde(default = "default_eval")]
    pub eval_size: usize,
    /// Amplitude of the per-sample uniform noise (0 = every sample is its class prototype).
    #[serde(default = "default_noise")]
    pub noise: f32,
}

impl TimeParams for SyntheticConfig {}

impl DatasetConfig for SyntheticConfig {
    fn info(&self) -> DatasetInfo {
        DatasetInfo {
            shape: self.shape,
            num_classes: self.num_classes,
            train_len: self.train_size,
            eval_len: self.eval_size,
            mean: vec![0.5; self.shape[0]],
            std: vec![0.25; self.shape[0]],
        }
    }
    fn build(&self, ctx: &DataContext) -> Result<Splits> {
        if self.shape.contains(&0) || self.num_classes == 0 || self.train_size == 0 {
            return Err(Error::recipe(&ctx.path, "synthetic data needs a non-empty shape, at least one class and one training sample"));
        }
        let train = Synthetic::new(
            self.shape,
            self.num_classes,
            self.train_size,
            self.noise,
            ctx.seed,
        );
        let eval = train.offset(self.eval_size, 0x5eed);
        Ok(Splits {
            train: Arc::new(train),
            eval: (self.eval_size > 0).then(|| Arc::new(eval) as Arc<dyn Dataset>),
            info: self.info(),
            classes: None,
        })
    }
}

crate::register_dataset!(
    SyntheticConfig,
    "synthetic",
    "Synthetic learnable images of any shape and class count, generated per index.",
    "shape: [3, 32, 32]\nnum_classes: 10\ntrain_size: 10000\neval_size: 2000\nnoise: 0.5"
);
