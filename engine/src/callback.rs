//! Callbacks: monitors, loggers, checkpointing, stoppers. They observe training and run after
//! the algorithms. The runtime trait and its config trait.

use crate::error::Result;
use crate::event::Event;
use crate::plugin::{BindContext, PluginConfig};
use crate::state::State;
use crate::state_dict::StateDict;

/// Observes training (monitors, loggers, progress bar, stoppers). Runs after the algorithms.
pub trait Callback {
    fn run_event(&mut self, event: Event, state: &mut State) -> Result<()>;
    /// Loggers run after every other callback (and first at INIT).
    fn is_logger(&self) -> bool {
        false
    }
    /// State to carry across a checkpoint (a stopper's best value, a checkpointer's file list).
    fn state_dict(&self) -> Result<StateDict> {
        Ok(StateDict::default())
    }
    /// Restores what `state_dict` saved (called between BEFORE_LOAD and AFTER_LOAD on resume).
    fn load_state_dict(&mut self, _state: &StateDict) -> Result<()> {
        Ok(())
    }
}

pub trait CallbackConfig: PluginConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Callback>>;
}
