//! # AugMix
//!
//! **What.** For each training sample, makes `width` augmented copies, each through a chain of
//! `depth` operations drawn uniformly from an augmentation set (`depth: -1`: a chain length drawn
//! from 1, 2, 3 for each copy), each at an intensity drawn uniformly from [0.1, `severity`];
//! mixes the copies with weights `w ~ Dirichlet(alpha, ..., alpha)`, then mixes that with the
//! original picture: `(1 - m) x + m sum_i w_i chain_i(x)`, `m ~ Beta(alpha, alpha)` (Hendrycks
//! et al. 2020, Composer's AugMix, which like Composer's omits the paper's Jensen-Shannon
//! consistency loss: the "AugmentAndMix" part only). The operations are RandAugment's (PIL's
//! definitions; see `recipe_engine::data::augment`); the mixture is computed in single precision
//! and truncated to bytes, as Composer's numpy code does. It runs in the training loader on each
//! decoded 8-bit picture, after the crop and resize transforms and before normalisation, drawing
//! from the sample's own generator (seed, epoch, position): the batch does not depend on the
//! number of loader threads, and a resumed run makes the same samples. Evaluation data is never
//! augmented. Grey pictures (Fashion-MNIST) take the same operations.
//!
//! **When it helps.** Robustness to corruptions and distribution shift (CIFAR-10-C, ImageNet-C),
//! and accuracy for larger models on longer runs; it is a regulariser, and may cost accuracy on
//! small models and short runs. It costs CPU time per sample (`width` chains of full-picture
//! passes), which can bottleneck the loader.
//!
//! **Hyperparameters.** `severity` (3, in [0, 10]), `depth` (-1: 1 to 3 operations per chain
//! at random; or a fixed positive length), `width` (3 chains, at least 1), `alpha` (1.0, > 0:
//! the Dirichlet and Beta concentration; large values mix evenly, small ones pick one picture),
//! `augmentation_set` (`all`; `safe` leaves out colour, contrast, brightness and sharpness, which
//! overlap with the ImageNet-C/CIFAR-10-C corruptions; `original` uses the original repository's
//! intensity draw for those four). No time parameters.
//!
//! **Expected effect.** Hendrycks et al. report +13.8% accuracy on CIFAR-10-C for a WRN-40-2 (with
//! their consistency loss); Composer measures about +0.5% top-1 on ResNet-50 ImageNet without it,
//! and 1.1x to 10x longer training where the CPU becomes the bottleneck. Higher training loss.

use crate::randaugment::check_severity;
use rand::Rng;
use rand_distr::{Beta, Distribution, Gamma};
use recipe_engine::algorithm::{Algorithm, AlgorithmConfig};
use recipe_engine::data::augment::AugmentationSet;
use recipe_engine::data::{Image, SampleAugment};
use recipe_engine::error::{Error, Result};
use recipe_engine::plugin::{BindContext, TimeParams};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// AugMix's settings, checked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AugMixParams {
    pub severity: f64,
    /// Operations per chain; `None`: 1 to 3 at random for each chain.
    pub depth: Option<usize>,
    pub width: usize,
    pub alpha: f64,
    pub set: AugmentationSet,
}

/// The pure core. Draws, in Composer's order: the chain weights (Dirichlet), the mixing weight
/// (Beta), then each chain's length and operations.
pub fn augmix(img: &Image, p: &AugMixParams, rng: &mut dyn rand::RngCore) -> Result<Image> {
    let bad = |e: String| Error::msg(format!("AugMix with alpha {}: {e}", p.alpha));
    let gamma = Gamma::new(p.alpha, 1.0).map_err(|e| bad(e.to_string()))?;
    let draws: Vec<f64> = (0..p.width).map(|_| gamma.sample(rng)).collect();
    let total: f64 = draws.iter().sum();
    let weights: Vec<f32> = if total > 0.0 && total.is_finite() {
        draws.iter().map(|g| (g / total) as f32).collect()
    } else {
        // Every draw underflowed (a tiny alpha): the even mixture.
        vec![1.0 / p.width.max(1) as f32; p.width]
    };
    let m = Beta::new(p.alpha, p.alpha)
        .map_err(|e| bad(e.to_string()))?
        .sample(rng) as f32;
    let mut mix = vec![0f32; img.data.len()];
    for &w in &weights {
        let depth = p.depth.unwrap_or_else(|| rng.random_range(1..=3));
        let mut chain = img.clone();
        for _ in 0..depth {
            let op = p.set.choose(rng);
            chain = op.apply(&chain, p.severity, rng);
        }
        for (acc, &v) in mix.iter_mut().zip(&chain.data) {
            *acc += w * v as f32;
        }
    }
    let data = img
        .data
        .iter()
        .zip(&mix)
        .map(|(&x, &a)| ((1.0 - m) * x as f32 + m * a) as u8)
        .collect();
    Ok(Image {
        data,
        ..img.clone()
    })
}

fn default_severity() -> f64 {
    3.0
}
fn default_depth() -> i64 {
    -1
}
fn default_width() -> i64 {
    3
}
fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AugMixConfig {
    #[serde(default = "default_severity")]
    pub severity: f64,
    #[serde(default = "default_depth")]
    pub depth: i64,
    #[serde(default = "default_width")]
    pub width: i64,
    #[serde(default = "one")]
    pub alpha: f64,
    #[serde(default)]
    pub augmentation_set: AugmentationSet,
}

impl TimeParams for AugMixConfig {}

impl AugMixConfig {
    /// The settings, checked; errors name the key.
    pub fn params(&self, ctx: &BindContext) -> Result<AugMixParams> {
        check_severity(self.severity, ctx)?;
        let depth = match self.depth {
            -1 => None,
            d if d >= 1 => Some(d as usize),
            d => {
                return Err(Error::recipe_hint(
                    format!("{}.depth", ctx.path),
                    format!("{d} is not a chain length"),
                    "use -1 for 1 to 3 operations per chain at random (Composer's default), or a positive length",
                ))
            }
        };
        if self.width < 1 {
            return Err(Error::recipe_hint(
                format!("{}.width", ctx.path),
                format!("{} chains: at least 1 is needed", self.width),
                "width is how many augmented copies are mixed: 3 is Composer's default",
            ));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(Error::recipe_hint(
                format!("{}.alpha", ctx.path),
                format!("{} is not a positive number", self.alpha),
                "alpha is the Dirichlet and Beta concentration: 1.0 is Composer's default",
            ));
        }
        Ok(AugMixParams {
            severity: self.severity,
            depth,
            width: self.width as usize,
            alpha: self.alpha,
            set: self.augmentation_set,
        })
    }
}

struct AugMix {
    params: AugMixParams,
}

impl AlgorithmConfig for AugMixConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Algorithm>> {
        Ok(Box::new(AugMix {
            params: self.params(ctx)?,
        }))
    }
}

impl Algorithm for AugMix {
    fn sample_augment(&self) -> Option<SampleAugment> {
        let p = self.params;
        Some(Arc::new(
            move |img: &mut Image, rng: &mut dyn rand::RngCore| {
                *img = augmix(img, &p, rng)?;
                Ok(())
            },
        ))
    }
}

recipe_engine::register_algorithm!(
    AugMixConfig,
    "augmix",
    "Mixes each training picture with width random chains of image operations (Dirichlet weights), then with itself (Beta weight).",
    "severity: 3\ndepth: -1\nwidth: 3\nalpha: 1.0\naugmentation_set: all"
);

#[cfg(test)]
mod tests {
    use super::*;
    use recipe_engine::rng::item_stream;

    fn picture(w: usize, h: usize, c: usize) -> Image {
        let data = (0..w * h * c).map(|i| ((i * 37) % 251) as u8).collect();
        Image::new(w, h, c, data)
    }

    fn params() -> AugMixParams {
        AugMixParams {
            severity: 3.0,
            depth: None,
            width: 3,
            alpha: 1.0,
            set: AugmentationSet::All,
        }
    }

    #[test]
    fn augmix_is_deterministic_per_stream_keeps_the_shape_and_mixes() {
        for img in [picture(24, 20, 3), picture(28, 28, 1)] {
            let a = augmix(&img, &params(), &mut item_stream(1, "s", 0)).unwrap();
            assert_eq!(
                a,
                augmix(&img, &params(), &mut item_stream(1, "s", 0)).unwrap()
            );
            assert_eq!(
                (a.width, a.height, a.channels, a.data.len()),
                (img.width, img.height, img.channels, img.data.len())
            );
            let changed = (0..8)
                .filter(|&i| augmix(&img, &params(), &mut item_stream(1, "s", i)).unwrap() != img)
                .count();
            assert!(changed >= 6, "{changed} of 8 changed");
        }
    }

    #[test]
    fn a_picture_that_every_chain_leaves_alone_comes_back_unchanged() {
        // A black picture: every operation of the safe set maps it to black (solarize to
        // white only at threshold 0, which severity 0 cannot reach), so the mixture of black
        // with black is black whatever the weights.
        let black = Image::new(9, 7, 3, vec![0; 9 * 7 * 3]);
        let p = AugMixParams {
            severity: 0.0,
            set: AugmentationSet::Safe,
            ..params()
        };
        for i in 0..20 {
            assert_eq!(
                augmix(&black, &p, &mut item_stream(3, "s", i)).unwrap(),
                black
            );
        }
    }

    fn ctx() -> BindContext {
        BindContext::standalone(&candle_core::Device::Cpu, [1, 28, 28], 10, 4)
            .with_path("algorithms[0]")
    }

    #[test]
    fn bad_hyperparameters_are_refused_naming_the_key() {
        let cfg = |y: &str| serde_yaml::from_str::<AugMixConfig>(y).unwrap();
        let err = |y: &str| cfg(y).build(&ctx()).err().unwrap().to_string();
        assert!(err("severity: 10.5").contains("algorithms[0].severity"));
        assert!(err("depth: 0").contains("algorithms[0].depth"));
        assert!(err("depth: -2").contains("-1"));
        assert!(err("width: 0").contains("algorithms[0].width"));
        assert!(err("alpha: 0").contains("algorithms[0].alpha"));
        assert!(err("alpha: -1").contains("positive"));
        assert!(err("alpha: .inf").contains("alpha"));
        let p = cfg("{}").params(&ctx()).unwrap();
        assert_eq!(p, params());
        assert_eq!(cfg("depth: 2").params(&ctx()).unwrap().depth, Some(2));
        assert!(serde_yaml::from_str::<AugMixConfig>("mixture_width: 3").is_err());
    }
}
