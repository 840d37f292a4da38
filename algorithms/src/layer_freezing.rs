//! # LayerFreezing
//!
//! **What.** Progressively frozen early layers (Brock et al. 2017's FreezeOut, Composer's
//! LayerFreezing): at each EPOCH_END, with `e` the elapsed fraction of the run, the share
//! `pct = 0` while `e <= freeze_start`, then `freeze_level (e - freeze_start) / (1 -
//! freeze_start)`, and the first `floor(pct * L)` of the model's `L` layers that hold
//! parameters (in module order: the stem first, the head last) are frozen: their parameters are
//! read as constants in the forward pass, so they get no gradient and no update, and the
//! backward pass stops at the first layer still trained. Batch-norm running statistics keep
//! updating, as in Composer.
//!
//! **When it helps.** Long budgets where the early layers have converged: the backward pass gets
//! cheaper as layers freeze. Composer's own measurements found it did not improve the
//! accuracy-time Pareto frontier of ResNets; it is here so that it can be measured.
//!
//! **Hyperparameters.** Composer's defaults: `freeze_start` (0.5) and `freeze_level` (1.0),
//! fractions of the run (they scale with it by construction). The frozen depth is saved in
//! checkpoints.
//!
//! **Expected effect.** Faster late epochs, some loss of final accuracy.

use recipe_engine::algorithm::{Algorithm, AlgorithmConfig};
use recipe_engine::error::{Error, Result};
use recipe_engine::event::Event;
use recipe_engine::plugin::{BindContext, TimeParams};
use recipe_engine::state_dict::StateDict;
use recipe_engine::State;
use serde::{Deserialize, Serialize};

/// The pure core: how many of `layers` layers are frozen at elapsed fraction `e`.
pub fn frozen_layers(e: f64, start: f64, level: f64, layers: usize) -> usize {
    let pct = if e <= start {
        0.0
    } else {
        level * (e - start) / (1.0 - start)
    };
    ((pct.clamp(0.0, 1.0) * layers as f64).floor() as usize).min(layers)
}

fn half() -> f64 {
    0.5
}
fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerFreezingConfig {
    #[serde(default = "half")]
    pub freeze_start: f64,
    #[serde(default = "one")]
    pub freeze_level: f64,
}

impl TimeParams for LayerFreezingConfig {}

struct LayerFreezing {
    start: f64,
    level: f64,
    frozen: usize,
}

impl AlgorithmConfig for LayerFreezingConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Algorithm>> {
        if !(0.0..1.0).contains(&self.freeze_start) {
            return Err(Error::recipe(
                format!("{}.freeze_start", ctx.path),
                format!(
                    "{} is not a fraction of the run in [0, 1)",
                    self.freeze_start
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.freeze_level) {
            return Err(Error::recipe(
                format!("{}.freeze_level", ctx.path),
                format!(
                    "{} is not a fraction of the layers in [0, 1]",
                    self.freeze_level
                ),
            ));
        }
        Ok(Box::new(LayerFreezing {
            start: self.freeze_start,
            level: self.freeze_level,
            frozen: 0,
        }))
    }
}

/// The model's layers that hold parameters, in module order, as their parameters' lists.
fn layers(state: &State) -> Result<Vec<Vec<recipe_engine::model::Param>>> {
    let net = state.model.network().ok_or_else(|| {
        Error::msg("layer_freezing needs a model built of modules (a model of the zoo)")
    })?;
    Ok(net
        .modules()
        .into_iter()
        .map(|(_, m)| m.own_params())
        .filter(|p| !p.is_empty())
        .collect())
}

impl LayerFreezing {
    fn freeze(&self, state: &State) -> Result<()> {
        for (i, ps) in layers(state)?.iter().enumerate() {
            for p in ps {
                p.set_frozen(i < self.frozen);
            }
        }
        Ok(())
    }
}

#[derive(Serialize, Deserialize)]
struct Saved {
    frozen: usize,
}

impl Algorithm for LayerFreezing {
    fn matches(&self, event: Event, _state: &State) -> bool {
        // AFTER_LOAD: a resumed run freezes what its checkpoint had frozen.
        matches!(event, Event::AfterLoad | Event::EpochEnd)
    }
    fn apply(&mut self, event: Event, state: &mut State) -> Result<()> {
        let n = layers(state)?.len();
        if event == Event::EpochEnd {
            // The timestamp still counts the epoch that ends.
            let e = state.elapsed_fraction();
            self.frozen = frozen_layers(e, self.start, self.level, n);
        }
        self.freeze(state)?;
        if event != Event::EpochEnd {
            return Ok(());
        }
        state.log("layer_freezing/layers_frozen", self.frozen as f64);
        state.log(
            "layer_freezing/percentage_frozen",
            self.frozen as f64 / n.max(1) as f64,
        );
        Ok(())
    }
    fn state_dict(&self) -> Result<StateDict> {
        Ok(StateDict::encode(&Saved {
            frozen: self.frozen,
        }))
    }
    fn load_state_dict(&mut self, state: &StateDict) -> Result<()> {
        let s: Saved = state.decode("layer_freezing")?;
        self.frozen = s.frozen;
        Ok(())
    }
}

recipe_engine::register_algorithm!(
    LayerFreezingConfig,
    "layer_freezing",
    "Freezes the model's first layers progressively from freeze_start of the run (no gradient, no update).",
    "freeze_start: 0.5\nfreeze_level: 1.0"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_frozen_before_the_start_and_all_at_the_end() {
        assert_eq!(frozen_layers(0.5, 0.5, 1.0, 10), 0);
        assert_eq!(frozen_layers(0.75, 0.5, 1.0, 10), 5);
        assert_eq!(frozen_layers(1.0, 0.5, 1.0, 10), 10);
        assert_eq!(frozen_layers(1.0, 0.5, 0.5, 10), 5);
        assert_eq!(frozen_layers(0.2, 0.0, 1.0, 21), 4);
    }
}
