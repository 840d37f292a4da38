//! # ScaleSchedule
//!
//! **What.** Shrinks (or stretches) the whole recipe by a ratio `s`: the run length and every time
//! parameter that describes a phase of training, of every schedule, algorithm and callback, so that
//! each follows `a_s(t) = a(t / s)`. `recipe run FILE --scale 0.5` is this algorithm with ratio 0.5.
//!
//! **How.** A recipe transform, applied before binding: it walks every time parameter through the
//! visitor each plugin implements, multiplies the `scaled` ones by `s` in their own unit (keeping
//! fractions: 90ep x 0.36 = 32.4ep, not Composer's truncated 32ep), and leaves the `fixed` ones
//! (logging cadence, say). `dur` values are fractions of the scaled run and need no change. A
//! warmup's ramp and its end point are one parameter (`t_warmup`), so they always scale together.
//! Times resolve to batches once, rounding to the nearest batch, never to zero.
//!
//! **When it helps.** Budgeted training (Li, Yumer, Ramanan, ICLR 2020): for a fixed budget, a
//! schedule that anneals to zero at the end of the budget beats the full schedule truncated.
//! Composer reports ResNet-50 at s = 0.5 keeps most of its accuracy for half the cost.
//!
//! **Hyperparameters.** `ratio` (> 0). Ratios compose: a recipe with `ratio: 0.5` run with
//! `--scale 0.5` trains at 0.25. A plugin declares each time parameter's policy; a recipe may
//! override it in the plugin's block: `scale_policy: {interval: scaled}`.
//!
//! **Expected effect.** Cost proportional to `s`; accuracy falls gracefully with `s` when the
//! schedule is budget-aware (linear, cosine, REX to zero).

use recipe_engine::algorithm::{Algorithm, AlgorithmConfig};
use recipe_engine::error::{Error, Result};
use recipe_engine::plugin::{BindContext, Policy, TimeParams};
use recipe_engine::transform::{RecipeTransform, RecipeView};
use recipe_engine::{Event, State, Time};
use serde::{Deserialize, Serialize};

/// One time parameter before and after scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaledTime {
    pub key: String,
    pub before: Time,
    pub after: Time,
    pub policy: Policy,
}

/// The pure core: scales every time parameter of `recipe` whose policy is `scaled` by `ratio`,
/// and records the ratio. Returns what changed.
pub fn scale_recipe(recipe: &mut dyn RecipeView, ratio: f64) -> Result<Vec<ScaledTime>> {
    check_ratio(ratio)?;
    let mut rows = Vec::new();
    recipe.visit_times(&mut |key, _owner, t, policy| {
        let before = *t;
        if policy == Policy::Scaled {
            *t = t.scaled(ratio);
        }
        rows.push(ScaledTime {
            key: key.to_string(),
            before,
            after: *t,
            policy,
        });
    });
    *recipe.scale_ratio_mut() *= ratio;
    Ok(rows)
}

/// The largest scale ratio: a run a million times the recipe's length is a typo, and larger
/// ratios overflow the times they multiply.
const MAX_RATIO: f64 = 1e6;

fn check_ratio(ratio: f64) -> Result<()> {
    if !ratio.is_finite() || ratio <= 0.0 {
        return Err(Error::recipe_hint(
            "ratio",
            format!("scale ratio {ratio} is not a positive number"),
            "use a ratio > 0: 0.5 halves the recipe, 2 doubles it",
        ));
    }
    if ratio > MAX_RATIO {
        return Err(Error::recipe_hint(
            "ratio",
            format!("scale ratio {ratio} is too large: the run would be {ratio} times the recipe's length"),
            format!("use a ratio of at most {MAX_RATIO}: 0.5 halves the recipe, 2 doubles it"),
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleScheduleConfig {
    pub ratio: f64,
}

impl TimeParams for ScaleScheduleConfig {}

struct ScaleTransform {
    ratio: f64,
}

impl RecipeTransform for ScaleTransform {
    fn apply(&self, recipe: &mut dyn RecipeView) -> Result<()> {
        scale_recipe(recipe, self.ratio).map(|_| ())
    }
}

/// At run time it only records the ratio in the log, once.
struct ScaleSchedule {
    ratio: f64,
}

impl Algorithm for ScaleSchedule {
    fn matches(&self, event: Event, _state: &State) -> bool {
        event == Event::FitStart
    }
    fn apply(&mut self, _event: Event, state: &mut State) -> Result<()> {
        state.log("scale_schedule/ratio", self.ratio);
        Ok(())
    }
}

impl AlgorithmConfig for ScaleScheduleConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Algorithm>> {
        check_ratio(self.ratio).map_err(|e| e.at(&ctx.path))?;
        Ok(Box::new(ScaleSchedule { ratio: self.ratio }))
    }
    fn recipe_transform(&self) -> Option<Box<dyn RecipeTransform>> {
        Some(Box::new(ScaleTransform { ratio: self.ratio }))
    }
}

recipe_engine::register_algorithm!(
    ScaleScheduleConfig,
    "scale_schedule",
    "Shrinks the whole recipe by a ratio: run length and every phase time of every plugin (a_s(t) = a(t/s)).",
    "ratio: 0.5"
);
