//! # Label smoothing
//!
//! **What.** Trains against `(1 - alpha) * one_hot(y) + alpha / K` instead of the one-hot target
//! (Szegedy et al. 2016). The targets are swapped at BEFORE_LOSS and restored at AFTER_LOSS, so
//! metrics and later algorithms see the true labels. Targets that an algorithm has already made
//! distributions (MixUp, CutMix) are smoothed as they are: `(1 - alpha) * t + alpha / K`.
//!
//! **When it helps.** Classification with many confident-but-wrong predictions; it regularises
//! the logits and usually improves calibration. Composer reports +0.2-0.5 top-1 on ResNet-50
//! ImageNet with `smoothing: 0.1`, at no measurable cost.
//!
//! **Hyperparameters.** `smoothing` (alpha, in [0, 1), default 0.1).
//!
//! **Expected effect.** Slightly higher training loss (the target is no longer reachable), equal
//! or better eval accuracy; nothing changes in throughput.

use candle_core::{DType, Tensor};
use recipe_engine::algorithm::{Algorithm, AlgorithmConfig};
use recipe_engine::error::{Error, Result};
use recipe_engine::kernels::Targets;
use recipe_engine::plugin::{BindContext, TimeParams};
use recipe_engine::{Event, State};
use serde::{Deserialize, Serialize};

/// The pure core: smoothed distributions [N, K] from class indices [N].
pub fn smooth_labels(labels: &Tensor, num_classes: usize, smoothing: f64) -> Result<Tensor> {
    let n = labels.dim(0)?;
    let idx = labels.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    let off = (smoothing / num_classes as f64) as f32;
    let on = (1.0 - smoothing) as f32 + off;
    let mut v = vec![off; n * num_classes];
    for (i, &c) in idx.iter().enumerate() {
        let c = c as usize;
        if c >= num_classes {
            return Err(Error::msg(format!(
                "label {c} is out of range for {num_classes} classes"
            )));
        }
        v[i * num_classes + c] = on;
    }
    Ok(Tensor::from_vec(v, (n, num_classes), labels.device())?)
}

/// The pure core for targets that are already distributions [N, K]: `(1 - a) t + a / K`.
pub fn smooth_distributions(t: &Tensor, num_classes: usize, smoothing: f64) -> Result<Tensor> {
    Ok(((t * (1.0 - smoothing))? + smoothing / num_classes as f64)?)
}

fn default_smoothing() -> f64 {
    0.1
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelSmoothingConfig {
    #[serde(default = "default_smoothing")]
    pub smoothing: f64,
}

impl TimeParams for LabelSmoothingConfig {}

struct LabelSmoothing {
    smoothing: f64,
    num_classes: usize,
    saved: Option<Targets>,
}

impl AlgorithmConfig for LabelSmoothingConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Algorithm>> {
        if !(0.0..1.0).contains(&self.smoothing) {
            return Err(Error::recipe(
                format!("{}.smoothing", ctx.path),
                format!("{} is not in [0, 1)", self.smoothing),
            ));
        }
        Ok(Box::new(LabelSmoothing {
            smoothing: self.smoothing,
            num_classes: ctx.num_classes,
            saved: None,
        }))
    }
}

impl Algorithm for LabelSmoothing {
    fn matches(&self, event: Event, state: &State) -> bool {
        !state.evaluating && matches!(event, Event::BeforeLoss | Event::AfterLoss)
    }

    fn apply(&mut self, event: Event, state: &mut State) -> Result<()> {
        let batch = state
            .batch
            .as_mut()
            .ok_or_else(|| Error::msg("no batch at the loss"))?;
        match event {
            Event::BeforeLoss => {
                // Targets already mixed (MixUp, CutMix) are smoothed as they are: the result is
                // the smoothed mixture.
                let soft = match &batch.targets {
                    Targets::Hard(_) => {
                        smooth_labels(&batch.labels, self.num_classes, self.smoothing)?
                    }
                    Targets::Soft(t) => smooth_distributions(t, self.num_classes, self.smoothing)?,
                };
                self.saved = Some(std::mem::replace(&mut batch.targets, Targets::Soft(soft)));
            }
            Event::AfterLoss => {
                if let Some(t) = self.saved.take() {
                    batch.targets = t;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

recipe_engine::register_algorithm!(
    LabelSmoothingConfig,
    "label_smoothing",
    "Trains on (1-a)*one_hot + a/K targets, swapped in at BEFORE_LOSS and restored at AFTER_LOSS.",
    "smoothing: 0.1"
);

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn smoothed_rows_sum_to_one_and_put_the_mass_where_expected() {
        let y = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
        let s = smooth_labels(&y, 4, 0.2).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(s[0], vec![0.05, 0.05, 0.85, 0.05]);
        assert_eq!(s[1], vec![0.85, 0.05, 0.05, 0.05]);
        assert!(smooth_labels(&Tensor::new(&[4u32], &Device::Cpu).unwrap(), 4, 0.1).is_err());
    }

    #[test]
    fn a_mixture_smooths_to_the_smoothed_mixture() {
        // MixUp's 0.75 of class 2 and 0.25 of class 0, smoothed by 0.2 over 4 classes.
        let mixed = crate::mixing::mix_targets(
            &Targets::Hard(Tensor::new(&[2u32, 0], &Device::Cpu).unwrap()),
            &[1, 0],
            0.75,
            4,
        )
        .unwrap();
        let Targets::Soft(m) = mixed else {
            panic!("soft")
        };
        let s = smooth_distributions(&m, 4, 0.2)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let want = [0.25 * 0.8 + 0.05, 0.05, 0.75 * 0.8 + 0.05, 0.05];
        for (got, want) in s[0].iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{s:?}");
        }
        assert!((s[0].iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
}
