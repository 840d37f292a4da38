//! # MixUp
//!
//! **What.** Trains on convex combinations of pairs of samples (Zhang et al. 2018, Composer's
//! MixUp): at BEFORE_FORWARD each training (micro)batch is paired with a random permutation of
//! itself, `x = (1 - m) x + m x[perm]` and the targets become `(1 - m) y + m y[perm]`, with
//! `m = min(z, 1 - z)`, `z ~ Beta(alpha, alpha)` drawn per (micro)batch, so the original sample
//! always dominates (as in Composer, which keeps training accuracy meaningful). Targets mix as
//! distributions: with label smoothing after it, each sample's target is the smoothed mixture.
//!
//! **When it helps.** Image classification trained long enough to overfit; it regularises and
//! calibrates. Composer uses it in its ResNet-50 "hot" recipe.
//!
//! **Hyperparameters.** `alpha` (0.2, Composer's default; 0 turns it off). No time parameters.
//! Composer's `interpolate_loss` (mixing two losses instead of the targets) is not offered: with a
//! cross-entropy loss it gives the same gradient.
//!
//! **Expected effect.** Higher training loss, equal or better accuracy after long training;
//! slower convergence on short budgets. Costs one pass over the batch's pixels.

use crate::mixing::{beta, mix_targets, permutation, permuted, BatchDraws};
use recipe_engine::algorithm::{Algorithm, AlgorithmConfig};
use recipe_engine::error::{Error, Result};
use recipe_engine::plugin::{BindContext, TimeParams};
use recipe_engine::{Event, State};
use serde::{Deserialize, Serialize};

fn default_alpha() -> f64 {
    0.2
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixUpConfig {
    #[serde(default = "default_alpha")]
    pub alpha: f64,
}

impl TimeParams for MixUpConfig {}

struct MixUp {
    alpha: f64,
    num_classes: usize,
    draws: BatchDraws,
}

impl AlgorithmConfig for MixUpConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Algorithm>> {
        if !(self.alpha.is_finite() && self.alpha >= 0.0) {
            return Err(Error::recipe(
                format!("{}.alpha", ctx.path),
                format!("{} is not a non-negative number", self.alpha),
            ));
        }
        Ok(Box::new(MixUp {
            alpha: self.alpha,
            num_classes: ctx.num_classes,
            draws: BatchDraws::new(ctx.rng()),
        }))
    }
}

impl Algorithm for MixUp {
    fn matches(&self, event: Event, state: &State) -> bool {
        event == Event::BeforeForward && !state.evaluating
    }

    fn apply(&mut self, _event: Event, state: &mut State) -> Result<()> {
        let rng = self.draws.at(state.timestamp.batch);
        let z = beta(self.alpha, rng)?;
        let m = z.min(1.0 - z);
        let Some(batch) = state.batch.as_mut() else {
            return Ok(());
        };
        let perm = permutation(batch.len(), rng);
        let x = &batch.inputs;
        batch.inputs = ((x * (1.0 - m))? + (permuted(x, &perm)? * m)?)?;
        batch.targets = mix_targets(&batch.targets, &perm, 1.0 - m, self.num_classes)?;
        Ok(())
    }
}

recipe_engine::register_algorithm!(
    MixUpConfig,
    "mixup",
    "Trains on convex mixtures of sample pairs and of their targets (m = min(z, 1-z), z ~ Beta(alpha, alpha)).",
    "alpha: 0.2"
);
