//! # Gradient clipping
//!
//! **What.** Bounds the gradient before the optimizer step (Composer's GradientClipping), on the
//! whole batch's gradient (every microbatch's, summed) at AFTER_TRAIN_BATCH:
//! - `norm`: scales every gradient by `threshold / (global L2 norm + 1e-6)` when that is below 1
//!   (PyTorch's `clip_grad_norm_`);
//! - `value`: clamps each gradient element to `[-threshold, threshold]` (`clip_grad_value_`);
//! - `adaptive`: adaptive gradient clipping (AGC, Brock et al. 2021, as in Composer): per output
//!   unit (a row of a linear weight, an output channel of a convolution, the whole of a bias or
//!   norm parameter), rescales the gradient to at most `threshold` times the unit's weight norm
//!   (at least 1e-3).
//!
//! **When it helps.** Large learning rates and batches, early training with spiky losses,
//! networks without batch norm (AGC was made for normaliser-free ResNets).
//!
//! **Hyperparameters.** `clipping_type` (`norm`, `value` or `adaptive`; Composer's default is
//! `norm`) and `clipping_threshold` (required in Composer; 1.0 here, PyTorch's usual `max_norm`;
//! Brock et al. use 0.01-0.16 for `adaptive`). No time parameters.
//!
//! **Expected effect.** Stability rather than speed: a run that diverges without it trains with
//! it; on a stable run it changes little. With `norm`, the global norm before clipping is logged
//! as `gradient_clipping/grad_norm`.

use recipe_engine::algorithm::{Algorithm, AlgorithmConfig};
use recipe_engine::candle_core::{DType, Tensor};
use recipe_engine::error::{Error, Result};
use recipe_engine::plugin::{BindContext, TimeParams};
use recipe_engine::{Event, State};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClippingType {
    Norm,
    Value,
    Adaptive,
}

fn norm() -> ClippingType {
    ClippingType::Norm
}
fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GradientClippingConfig {
    #[serde(default = "norm")]
    pub clipping_type: ClippingType,
    #[serde(default = "one")]
    pub clipping_threshold: f64,
}

impl TimeParams for GradientClippingConfig {}

/// The global L2 norm of `grads`, and the factor `norm` clipping scales them by (1: unchanged).
pub fn norm_factor(grads: &[&Tensor], threshold: f64) -> Result<(f64, f64)> {
    let mut sq = 0.0;
    for g in grads {
        sq += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    let total = sq.sqrt();
    let coef = threshold / (total + 1e-6);
    Ok((total, coef.min(1.0)))
}

/// AGC of one gradient `g` of weight `w`: each output unit's gradient rescaled to at most
/// `threshold` times the unit's weight norm (at least 1e-3).
pub fn adaptive_clip(g: &Tensor, w: &Tensor, threshold: f64) -> Result<Tensor> {
    let unit_norm = |t: &Tensor| -> Result<Tensor> {
        let sq = t.sqr()?;
        Ok(if t.rank() <= 1 {
            sq.sum_all()?.sqrt()?
        } else {
            sq.sum_keepdim((1..t.rank()).collect::<Vec<_>>())?.sqrt()?
        })
    };
    let max_norm = (unit_norm(w)?.maximum(1e-3)? * threshold)?;
    let grad_norm = unit_norm(g)?.maximum(1e-6)?;
    // min(1, max_norm / grad_norm): exactly 1 (the gradient unchanged) where within bounds.
    let scale = (max_norm / grad_norm)?.minimum(1.0)?;
    Ok(g.broadcast_mul(&scale)?)
}

struct GradientClipping {
    kind: ClippingType,
    threshold: f64,
}

impl AlgorithmConfig for GradientClippingConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Algorithm>> {
        if !(self.clipping_threshold.is_finite() && self.clipping_threshold > 0.0) {
            return Err(Error::recipe(
                format!("{}.clipping_threshold", ctx.path),
                format!("{} is not a positive number", self.clipping_threshold),
            ));
        }
        Ok(Box::new(GradientClipping {
            kind: self.clipping_type,
            threshold: self.clipping_threshold,
        }))
    }
}

impl Algorithm for GradientClipping {
    fn matches(&self, event: Event, state: &State) -> bool {
        event == Event::AfterTrainBatch && state.grads.is_some()
    }

    fn apply(&mut self, _event: Event, state: &mut State) -> Result<()> {
        let Some(mut grads) = state.grads.take() else {
            return Ok(());
        };
        let params: Vec<(Tensor, Tensor)> = state
            .model
            .params()
            .trainable()
            .filter_map(|p| {
                let w = p.var.as_tensor().clone();
                grads.get(&w).map(|g| (w, g.clone()))
            })
            .collect();
        match self.kind {
            ClippingType::Norm => {
                let gs: Vec<&Tensor> = params.iter().map(|(_, g)| g).collect();
                let (total, coef) = norm_factor(&gs, self.threshold)?;
                state.log("gradient_clipping/grad_norm", total);
                if coef < 1.0 {
                    for (w, g) in &params {
                        grads.insert(w, (g * coef)?);
                    }
                }
            }
            ClippingType::Value => {
                for (w, g) in &params {
                    grads.insert(w, g.clamp(-self.threshold, self.threshold)?);
                }
            }
            ClippingType::Adaptive => {
                for (w, g) in &params {
                    grads.insert(w, adaptive_clip(g, w, self.threshold)?);
                }
            }
        }
        state.grads = Some(grads);
        Ok(())
    }
}

recipe_engine::register_algorithm!(
    GradientClippingConfig,
    "gradient_clipping",
    "Clips the batch's gradient before the step: global norm, value, or adaptive (AGC) per output unit.",
    "clipping_type: norm\nclipping_threshold: 1.0"
);

#[cfg(test)]
mod tests {
    use super::*;
    use recipe_engine::candle_core::Device;

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn norm_clipping_scales_everything_by_one_factor_only_above_the_threshold() {
        // Global norm of (3, 4) and (12): 13.
        let (a, b) = (t(&[3.0, 4.0], &[2]), t(&[12.0], &[1]));
        let (total, coef) = norm_factor(&[&a, &b], 6.5).unwrap();
        assert!((total - 13.0).abs() < 1e-9);
        assert!((coef - 6.5 / (13.0 + 1e-6)).abs() < 1e-12);
        assert_eq!(norm_factor(&[&a, &b], 20.0).unwrap().1, 1.0);
    }

    #[test]
    fn adaptive_clipping_bounds_each_output_unit_by_its_weight_norm() {
        // A 2x2 linear weight: rows (3, 4) and (0, 0.0001) (norm 5 and below the 1e-3 floor).
        let w = t(&[3.0, 4.0, 0.0, 0.0001], &[2, 2]);
        // Row 0's gradient norm 10 > 0.1 * 5: rescaled to norm 0.5; row 1's norm 1e-5 is within
        // 0.1 * 1e-3 and stays exactly as it was.
        let g = t(&[6.0, 8.0, 0.0, 0.00001], &[2, 2]);
        let c = adaptive_clip(&g, &w, 0.1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!(
            (c[0][0] - 0.3).abs() < 1e-6 && (c[0][1] - 0.4).abs() < 1e-6,
            "{c:?}"
        );
        assert_eq!(c[1], vec![0.0, 0.00001]);
        // A bias is one unit.
        let b = adaptive_clip(&t(&[1.0, 1.0], &[2]), &t(&[0.0, 0.0], &[2]), 1.0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let n = (b[0] * b[0] + b[1] * b[1]).sqrt();
        assert!((n - 1e-3).abs() < 1e-7, "{b:?}");
    }
}
