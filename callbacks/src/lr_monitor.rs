//! Logs the learning rate of every step (`lr`), and the schedule's multiplier (`lr_multiplier`).

use recipe_engine::callback::{Callback, CallbackConfig};
use recipe_engine::error::Result;
use recipe_engine::plugin::{BindContext, Policy, TimeParams, TimeVisitor};
use recipe_engine::{Event, State, Time};
use serde::{Deserialize, Serialize};

fn one_batch() -> Time {
    Time::batches(1.0)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LrMonitorConfig {
    /// Log every this often (a logging cadence: fixed under ScaleSchedule).
    #[serde(default = "one_batch")]
    pub interval: Time,
}

impl TimeParams for LrMonitorConfig {
    fn visit_times(&mut self, v: &mut dyn TimeVisitor) {
        v.visit("interval", &mut self.interval, Policy::Fixed);
    }
}

struct LrMonitor {
    every: u64,
}

impl CallbackConfig for LrMonitorConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Callback>> {
        Ok(Box::new(LrMonitor {
            every: ctx.interval("interval", &self.interval)?,
        }))
    }
}

impl Callback for LrMonitor {
    fn run_event(&mut self, event: Event, state: &mut State) -> Result<()> {
        // BATCH_END comes after the timestamp advanced: the step just taken is batch - 1.
        if event == Event::BatchEnd && (state.timestamp.batch - 1).is_multiple_of(self.every) {
            state.log("lr", state.lr);
            if state.base_lr > 0.0 {
                state.log("lr_multiplier", state.lr / state.base_lr);
            }
        }
        Ok(())
    }
}

recipe_engine::register_callback!(
    LrMonitorConfig,
    "lr_monitor",
    "Logs the learning rate of each step.",
    "interval: 1ba"
);
