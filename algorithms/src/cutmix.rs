//! # CutMix
//!
//! **What.** Pastes a random box of another sample into each sample (Yun et al. 2019, Composer's
//! CutMix): at BEFORE_FORWARD each training (micro)batch is paired with a random permutation of
//! itself; `z ~ Beta(alpha, alpha)`, a box of `sqrt(1 - z)` of the width and height centred
//! uniformly (clipped at the border) is copied from the partner, and the targets become
//! `l y + (1 - l) y[perm]` with `l` one minus the box's share of the image (after clipping). The
//! same box is used across the (micro)batch, as in Composer. Targets mix as distributions: label
//! smoothing after it smooths the mixture.
//!
//! **When it helps.** Image classification, especially where the object's position varies; a
//! stronger regulariser than CutOut that keeps every pixel informative.
//!
//! **Hyperparameters.** `alpha` (1.0, Composer's default). No time parameters. Composer's
//! `uniform_sampling` is not offered.
//!
//! **Expected effect.** Higher training loss, better accuracy and robustness after long training.
//! Costs one copy of the batch's pixels.

use crate::mixing::{beta, mix_targets, permutation, BatchDraws};
use candle_core::{DType, Tensor};
use rand::Rng;
use recipe_engine::algorithm::{Algorithm, AlgorithmConfig};
use recipe_engine::error::{Error, Result};
use recipe_engine::plugin::{BindContext, TimeParams};
use recipe_engine::{Event, State};
use serde::{Deserialize, Serialize};

fn default_alpha() -> f64 {
    1.0
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CutMixConfig {
    #[serde(default = "default_alpha")]
    pub alpha: f64,
}

impl TimeParams for CutMixConfig {}

/// The box `(x0, y0, x1, y1)` for a `w` x `h` image and mixing draw `z`: `sqrt(1 - z)` of each
/// side, centred at a uniform pixel, clipped to the image (Composer's `_rand_bbox`).
pub fn cut_box(w: usize, h: usize, z: f64, rng: &mut impl Rng) -> (usize, usize, usize, usize) {
    let ratio = (1.0 - z).max(0.0).sqrt();
    let (cw, ch) = ((w as f64 * ratio) as i64, (h as f64 * ratio) as i64);
    let cx = rng.random_range(0..w as i64);
    let cy = rng.random_range(0..h as i64);
    let clip = |v: i64, hi: usize| v.clamp(0, hi as i64) as usize;
    (
        clip(cx - cw / 2, w),
        clip(cy - ch / 2, h),
        clip(cx + cw / 2, w),
        clip(cy + ch / 2, h),
    )
}

/// The pure core: pastes the box of each sample's partner into it; returns the images and the
/// share of each image that is still its own.
pub fn cutmix(
    x: &Tensor,
    perm: &[usize],
    bx: (usize, usize, usize, usize),
) -> Result<(Tensor, f64)> {
    let (n, c, h, w) = x.dims4()?;
    let src = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut out = src.clone();
    let (x0, y0, x1, y1) = bx;
    for (i, &j) in perm.iter().enumerate().take(n) {
        for ch in 0..c {
            for y in y0..y1 {
                let (d, s) = (((i * c + ch) * h + y) * w, ((j * c + ch) * h + y) * w);
                out[d + x0..d + x1].copy_from_slice(&src[s + x0..s + x1]);
            }
        }
    }
    let own = 1.0 - ((x1 - x0) * (y1 - y0)) as f64 / (w * h) as f64;
    Ok((
        Tensor::from_vec(out, (n, c, h, w), x.device())?.to_dtype(x.dtype())?,
        own,
    ))
}

struct CutMix {
    alpha: f64,
    num_classes: usize,
    draws: BatchDraws,
}

impl AlgorithmConfig for CutMixConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Algorithm>> {
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(Error::recipe(
                format!("{}.alpha", ctx.path),
                format!("{} is not a positive number", self.alpha),
            ));
        }
        Ok(Box::new(CutMix {
            alpha: self.alpha,
            num_classes: ctx.num_classes,
            draws: BatchDraws::new(ctx.rng()),
        }))
    }
}

impl Algorithm for CutMix {
    fn matches(&self, event: Event, state: &State) -> bool {
        event == Event::BeforeForward && !state.evaluating
    }

    fn apply(&mut self, _event: Event, state: &mut State) -> Result<()> {
        let rng = self.draws.at(state.timestamp.batch);
        let z = beta(self.alpha, rng)?;
        let Some(batch) = state.batch.as_mut() else {
            return Ok(());
        };
        let (_, _, h, w) = batch.inputs.dims4()?;
        let perm = permutation(batch.len(), rng);
        let bx = cut_box(w, h, z, rng);
        let (x, own) = cutmix(&batch.inputs, &perm, bx)?;
        batch.inputs = x;
        batch.targets = mix_targets(&batch.targets, &perm, own, self.num_classes)?;
        Ok(())
    }
}

recipe_engine::register_algorithm!(
    CutMixConfig,
    "cutmix",
    "Pastes a random box of a partner sample into each sample; targets mix by area.",
    "alpha: 1.0"
);

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_box_comes_from_the_partner_and_the_share_is_by_area() {
        // Two 1x4x4 images of all 1s and all 2s, swapped; a 2x2 box at (1, 1).
        let x = Tensor::from_vec(
            [vec![1f32; 16], vec![2f32; 16]].concat(),
            (2, 1, 4, 4),
            &Device::Cpu,
        )
        .unwrap();
        let (y, own) = cutmix(&x, &[1, 0], (1, 1, 3, 3)).unwrap();
        assert_eq!(own, 0.75);
        let v = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let twos = v[..16].iter().filter(|&&p| p == 2.0).count();
        assert_eq!(twos, 4);
        assert_eq!(v[16..].iter().filter(|&&p| p == 1.0).count(), 4);
        assert_eq!(v[5], 2.0); // row 1, column 1: inside the box
        assert_eq!(v[0], 1.0);
    }

    #[test]
    fn boxes_stay_inside_and_shrink_with_z() {
        let mut rng = recipe_engine::rng::stream(0, "t");
        for z in [0.0, 0.3, 0.9, 1.0] {
            for _ in 0..100 {
                let (x0, y0, x1, y1) = cut_box(32, 24, z, &mut rng);
                assert!(x0 <= x1 && x1 <= 32 && y0 <= y1 && y1 <= 24);
                assert!((x1 - x0) as f64 <= 32.0 * (1.0 - z).sqrt() + 1.0);
            }
        }
    }
}
