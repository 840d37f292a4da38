//! Algorithms: training speed-up methods that run at the events they match and change the
//! training state. The runtime trait and its config trait (how a recipe block builds one).

use crate::error::Result;
use crate::event::Event;
use crate::plugin::{BindContext, PluginConfig};
use crate::state::State;
use crate::state_dict::StateDict;
use crate::transform::RecipeTransform;

/// A training speed-up method: runs at the events it matches and changes the training state.
///
/// Dispatch: for one event every algorithm's `matches` is evaluated before any `apply`;
/// algorithms run in recipe order, reversed on after/end events.
pub trait Algorithm {
    /// Whether to run at `event`. An algorithm that acts only through the hooks below (module
    /// surgery, a per-sample augmentation, a second pass) keeps the default: never.
    fn matches(&self, _event: Event, _state: &State) -> bool {
        false
    }
    fn apply(&mut self, _event: Event, _state: &mut State) -> Result<()> {
        Ok(())
    }
    /// State to carry across a checkpoint (counters, moving averages). Most algorithms are a
    /// function of the timestamp and keep none.
    fn state_dict(&self) -> Result<StateDict> {
        Ok(StateDict::default())
    }
    /// Restores what `state_dict` saved (called between BEFORE_LOAD and AFTER_LOAD on resume).
    fn load_state_dict(&mut self, _state: &StateDict) -> Result<()> {
        Ok(())
    }
    /// Module surgery: rewrites the model's modules (`s.network()?.replace(...)`). Called once, at
    /// bind time, in recipe order, before the optimizer collects the parameters; it must depend
    /// on the recipe alone, because a resumed run repeats it (the checkpoint records the tree
    /// and refuses a different one).
    fn surgery(&mut self, _s: &mut crate::model::Surgery) -> Result<()> {
        Ok(())
    }
    /// A closure-style step (SAM): called after AFTER_TRAIN_BATCH, with the batch's gradients in
    /// `state.grads`, before the optimizer step. Returning true asks the trainer to run the
    /// batch again (BEFORE_TRAIN_BATCH to AFTER_TRAIN_BATCH, on the same batch, with what the
    /// algorithm changed, such as perturbed weights), after which it is called again. The loss
    /// and accuracy logged for the batch are those of its first pass.
    fn again(&mut self, _state: &mut State) -> Result<bool> {
        Ok(false)
    }
    /// The size of each training batch, for the loader to decode and crop straight to
    /// (progressive resizing): called once, after binding.
    fn batch_size_hook(&self) -> Option<crate::data::SizeForBatch> {
        None
    }
    /// A per-sample augmentation of the training pictures (RandAugment, AugMix), which the
    /// training loader runs on each decoded, cropped 8-bit picture before normalisation, drawing
    /// from the sample's own generator: called once, after binding. Several algorithms may each
    /// hand one; they run in recipe order.
    fn sample_augment(&self) -> Option<crate::data::SampleAugment> {
        None
    }
}

pub trait AlgorithmConfig: PluginConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Algorithm>>;
    /// An algorithm may also transform the whole recipe before it is bound (ScaleSchedule does).
    /// The transforms run once, in recipe order, in [`crate::recipe::Recipe::prepare`].
    fn recipe_transform(&self) -> Option<Box<dyn RecipeTransform>> {
        None
    }
}
