//! # RandomErasing: an algorithm plugin from outside the engine
//!
//! This crate shows what a plugin author writes: a config (serde), its time parameters with
//! their scale policy, the event glue, and one `register_algorithm!` line. The engine is not
//! touched. Its binary (`src/main.rs`) is the `recipe` CLI with this plugin linked in.
//!
//! **What.** Random Erasing (Zhong et al. 2017, "Random Erasing Data Augmentation"; torchvision's
//! `RandomErasing`): at AFTER_DATALOADER, each training image of the batch, with probability `p`,
//! gets one rectangle replaced by `value`. The rectangle's area is a uniform fraction in `scale`
//! of the image's, its aspect ratio (height / width) log-uniform in `ratio`, its place uniform
//! among those where it fits; as in torchvision, a draw that does not fit is tried again, up to
//! ten times, and the image is left as it is if none fits. Draws are keyed by (seed, batch), so
//! a resumed run erases what the uninterrupted one erased.
//!
//! **When it helps.** Image classification where the model leans on one part of the object or
//! overfits (occlusion); a regulariser like CutOut, with rectangles of varied size and shape.
//!
//! **Hyperparameters.** torchvision's defaults: `p` (0.5), `scale` ([0.02, 0.33]), `ratio`
//! ([0.3, 3.3]), `value` (0: the inputs are normalised, so 0 is the dataset mean; or `random`,
//! a standard normal value per erased pixel and channel). Added in this example to show a time
//! parameter: `stop` (default `1dur`: never), a time from which erasing is off; it describes a
//! phase of training, so it is declared `scaled` and shrinks with `--scale`.
//!
//! **Expected effect.** Higher training loss, equal or better accuracy after enough epochs; no
//! measurable cost per step.

use candle_core::{DType, Tensor};
use rand::Rng;
use rand_distr::StandardNormal;
use recipe_engine::algorithm::{Algorithm, AlgorithmConfig};
use recipe_engine::error::{Error, Result};
use recipe_engine::plugin::{BindContext, Policy, TimeParams, TimeVisitor};
use recipe_engine::rng::Streams;
use recipe_engine::{Event, State, Time};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What an erased rectangle is filled with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fill {
    /// The same value everywhere (0 by default: the mean of normalised inputs).
    Value(f32),
    /// A standard normal draw per pixel and channel (torchvision's `value='random'`).
    Random,
}

impl Serialize for Fill {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Fill::Value(v) => s.serialize_f64(f64::from(*v)),
            Fill::Random => s.serialize_str("random"),
        }
    }
}

impl<'de> Deserialize<'de> for Fill {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Fill;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(
                    f,
                    "a number (0 for the mean of normalised inputs) or `random`"
                )
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<Fill, E> {
                if v.is_finite() {
                    Ok(Fill::Value(v as f32))
                } else {
                    Err(E::custom(format!("value {v} is not a finite number")))
                }
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Fill, E> {
                self.visit_f64(v as f64)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Fill, E> {
                self.visit_f64(v as f64)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Fill, E> {
                match v {
                    "random" => Ok(Fill::Random),
                    other => Err(E::custom(format!(
                        "value `{other}`: write a number (0 for the mean of normalised inputs) or `random`"
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// One erased rectangle: top row, left column, height, width.
pub type Rect = (usize, usize, usize, usize);

/// torchvision's draw of the rectangle for an `h` x `w` image: up to ten tries of an area in
/// `scale` (fraction of the image) and an aspect ratio log-uniform in `ratio`; `None` if none fits.
pub fn draw_rect(
    h: usize,
    w: usize,
    scale: [f64; 2],
    ratio: [f64; 2],
    rng: &mut impl Rng,
) -> Option<Rect> {
    let area = (h * w) as f64;
    let (lo, hi) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let erase = area * uniform(rng, scale[0], scale[1]);
        let aspect = uniform(rng, lo, hi).exp();
        let eh = (erase * aspect).sqrt().round() as usize;
        let ew = (erase / aspect).sqrt().round() as usize;
        if !(eh < h && ew < w) {
            continue;
        }
        let top = rng.random_range(0..=h - eh);
        let left = rng.random_range(0..=w - ew);
        return Some((top, left, eh, ew));
    }
    None
}

fn uniform(rng: &mut impl Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

/// The pure core: erases one rectangle in each image of [N, C, H, W] with probability `p`, the
/// images taking their draws from `rng` in order.
pub fn random_erasing(
    x: &Tensor,
    p: f64,
    scale: [f64; 2],
    ratio: [f64; 2],
    fill: Fill,
    rng: &mut impl Rng,
) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let mut v = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    for s in 0..n {
        if rng.random::<f64>() >= p {
            continue;
        }
        let Some((top, left, eh, ew)) = draw_rect(h, w, scale, ratio, rng) else {
            continue;
        };
        for ch in 0..c {
            for y in top..top + eh {
                let row = ((s * c + ch) * h + y) * w;
                for px in &mut v[row + left..row + left + ew] {
                    *px = match fill {
                        Fill::Value(f) => f,
                        Fill::Random => rng.sample(StandardNormal),
                    };
                }
            }
        }
    }
    Ok(Tensor::from_vec(v, (n, c, h, w), x.device())?.to_dtype(x.dtype())?)
}

fn half() -> f64 {
    0.5
}
fn default_scale() -> [f64; 2] {
    [0.02, 0.33]
}
fn default_ratio() -> [f64; 2] {
    [0.3, 3.3]
}
fn zero() -> Fill {
    Fill::Value(0.0)
}
fn whole_run() -> Time {
    Time::dur(1.0)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RandomErasingConfig {
    /// The probability that an image is erased.
    #[serde(default = "half")]
    pub p: f64,
    /// The erased area, as a range of fractions of the image.
    #[serde(default = "default_scale")]
    pub scale: [f64; 2],
    /// The erased rectangle's aspect ratio (height / width), as a range.
    #[serde(default = "default_ratio")]
    pub ratio: [f64; 2],
    /// What the rectangle is filled with: a number, or `random`.
    #[serde(default = "zero")]
    pub value: Fill,
    /// Turn erasing off from this time on.
    #[serde(default = "whole_run")]
    pub stop: Time,
}

impl TimeParams for RandomErasingConfig {
    fn visit_times(&mut self, v: &mut dyn TimeVisitor) {
        v.visit("stop", &mut self.stop, Policy::Scaled);
    }
}

struct RandomErasing {
    p: f64,
    scale: [f64; 2],
    ratio: [f64; 2],
    fill: Fill,
    stop: u64,
    rng: Streams,
}

impl AlgorithmConfig for RandomErasingConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Algorithm>> {
        let key = |k: &str| format!("{}.{k}", ctx.path);
        if !(0.0..=1.0).contains(&self.p) {
            return Err(Error::recipe(
                key("p"),
                format!("{} is not a probability in [0, 1]", self.p),
            ));
        }
        let [lo, hi] = self.scale;
        if !(lo.is_finite() && hi.is_finite() && 0.0 <= lo && lo <= hi && hi <= 1.0) {
            return Err(Error::recipe_hint(
                key("scale"),
                format!("[{lo}, {hi}] is not a range of fractions of the image"),
                "give [low, high] with 0 <= low <= high <= 1, e.g. [0.02, 0.33]",
            ));
        }
        let [lo, hi] = self.ratio;
        if !(lo.is_finite() && hi.is_finite() && 0.0 < lo && lo <= hi) {
            return Err(Error::recipe_hint(
                key("ratio"),
                format!("[{lo}, {hi}] is not a range of aspect ratios"),
                "give [low, high] with 0 < low <= high, e.g. [0.3, 3.3]",
            ));
        }
        Ok(Box::new(RandomErasing {
            p: self.p,
            scale: self.scale,
            ratio: self.ratio,
            fill: self.value,
            stop: ctx.batches("stop", &self.stop)?,
            rng: ctx.rng(),
        }))
    }
}

impl Algorithm for RandomErasing {
    fn matches(&self, event: Event, state: &State) -> bool {
        event == Event::AfterDataloader && !state.evaluating && state.timestamp.batch < self.stop
    }

    fn apply(&mut self, _event: Event, state: &mut State) -> Result<()> {
        if let Some(b) = state.batch.as_mut() {
            b.inputs = random_erasing(
                &b.inputs,
                self.p,
                self.scale,
                self.ratio,
                self.fill,
                &mut self.rng.at(state.timestamp.batch),
            )?;
        }
        Ok(())
    }
}

recipe_engine::register_algorithm!(
    RandomErasingConfig,
    "random_erasing",
    "Erases a random rectangle of each training image with probability p (example plugin from outside the engine).",
    "p: 0.5\nscale: [0.02, 0.33]\nratio: [0.3, 3.3]\nvalue: 0\nstop: 1dur"
);

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn erased(img: &[f32]) -> Vec<bool> {
        img.iter().map(|v| *v != 1.0).collect()
    }

    #[test]
    fn erases_one_rectangle_of_the_drawn_size_in_each_chosen_image() {
        let (h, w) = (20, 24);
        let x = Tensor::ones((6, 2, h, w), DType::F32, &Device::Cpu).unwrap();
        let mut rng = recipe_engine::rng::stream(3, "t");
        let y =
            random_erasing(&x, 1.0, [0.1, 0.2], [0.5, 2.0], Fill::Value(0.0), &mut rng).unwrap();
        for img in y.chunk(6, 0).unwrap() {
            let v = img.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (c0, c1) = v.split_at(h * w);
            // Both channels erased in the same place.
            assert_eq!(erased(c0), erased(c1));
            let cells: Vec<(usize, usize)> = (0..h * w)
                .filter(|i| c0[*i] == 0.0)
                .map(|i| (i / w, i % w))
                .collect();
            let (r0, r1) = (
                cells.iter().map(|c| c.0).min().unwrap(),
                cells.iter().map(|c| c.0).max().unwrap(),
            );
            let (k0, k1) = (
                cells.iter().map(|c| c.1).min().unwrap(),
                cells.iter().map(|c| c.1).max().unwrap(),
            );
            // A filled rectangle...
            assert_eq!(cells.len(), (r1 - r0 + 1) * (k1 - k0 + 1));
            // ...whose area is about the drawn fraction (rounding of each side aside).
            let frac = cells.len() as f64 / (h * w) as f64;
            assert!((0.06..=0.28).contains(&frac), "{frac}");
        }
    }

    #[test]
    fn p_zero_keeps_the_images_and_the_same_draws_give_the_same_erasing() {
        let x = Tensor::ones((4, 1, 10, 10), DType::F32, &Device::Cpu).unwrap();
        let mut rng = recipe_engine::rng::stream(1, "t");
        let y = random_erasing(&x, 0.0, [0.02, 0.33], [0.3, 3.3], Fill::Random, &mut rng).unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![1.0; 400]
        );
        let draw = |seed| {
            let mut rng = recipe_engine::rng::stream(seed, "t");
            random_erasing(&x, 0.5, [0.02, 0.33], [0.3, 3.3], Fill::Random, &mut rng)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn a_rectangle_that_never_fits_leaves_the_image_alone() {
        // Area 100% of the image at aspect 1: h = H and w = W never fit (torchvision's `<`).
        let mut rng = recipe_engine::rng::stream(1, "t");
        assert_eq!(draw_rect(8, 8, [1.0, 1.0], [1.0, 1.0], &mut rng), None);
    }

    #[test]
    fn value_reads_numbers_and_random_and_names_anything_else() {
        let cfg: RandomErasingConfig = serde_yaml::from_str("value: random").unwrap();
        assert_eq!(cfg.value, Fill::Random);
        let cfg: RandomErasingConfig = serde_yaml::from_str("value: -0.5").unwrap();
        assert_eq!(cfg.value, Fill::Value(-0.5));
        let cfg: RandomErasingConfig = serde_yaml::from_str("value: 1").unwrap();
        assert_eq!(cfg.value, Fill::Value(1.0));
        let e = serde_yaml::from_str::<RandomErasingConfig>("value: noise")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`random`"), "{e}");
    }

    #[test]
    fn bad_hyperparameters_are_refused_with_their_key() {
        let ctx =
            BindContext::standalone(&Device::Cpu, [1, 8, 8], 10, 4).with_path("algorithms[0]");
        let base: RandomErasingConfig = serde_yaml::from_str("{}").unwrap();
        assert!(base.build(&ctx).is_ok());
        for (cfg, key) in [
            (
                RandomErasingConfig {
                    p: 1.5,
                    ..base.clone()
                },
                "p",
            ),
            (
                RandomErasingConfig {
                    scale: [0.4, 0.2],
                    ..base.clone()
                },
                "scale",
            ),
            (
                RandomErasingConfig {
                    scale: [0.1, 1.2],
                    ..base.clone()
                },
                "scale",
            ),
            (
                RandomErasingConfig {
                    ratio: [0.0, 3.3],
                    ..base.clone()
                },
                "ratio",
            ),
        ] {
            let e = cfg
                .build(&ctx)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains(&format!("algorithms[0].{key}")), "{e}");
        }
    }
}
