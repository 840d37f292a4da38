//! Recipe transforms: changes to the whole recipe before it is bound (ScaleSchedule is one).
//! A transform sees the recipe through [`RecipeView`] (every time parameter and the scale ratio),
//! so an algorithm that transforms recipes depends on this view, not on the recipe parser.

use crate::error::Result;
use crate::plugin::Policy;
use crate::time::Time;

/// What a transform may read and change of a recipe.
pub trait RecipeView {
    /// Walks every time parameter of the recipe: its full key (`schedule.t_warmup`), its owner
    /// (the plugin's name, or `recipe`), the value, and the effective policy (the owner's, or
    /// the recipe's override).
    fn visit_times(&mut self, f: &mut dyn FnMut(&str, &str, &mut Time, Policy));
    /// The product of every scale ratio applied so far (1 for an unscaled recipe); a transform
    /// that scales the recipe multiplies it, so that checkpoints record the ratio.
    fn scale_ratio_mut(&mut self) -> &mut f64;
}

/// A transform of the whole recipe before it is bound. An algorithm offers one through
/// `AlgorithmConfig::recipe_transform`; the transforms run once, in recipe order.
pub trait RecipeTransform {
    fn apply(&self, recipe: &mut dyn RecipeView) -> Result<()>;
}
