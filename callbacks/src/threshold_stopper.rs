//! Stops training as soon as a metric reaches a threshold (`eval/accuracy` >= 0.9, say):
//! time-to-accuracy runs stop where the target is met.

use crate::early_stopper::{check_monitor, Mode};
use recipe_engine::callback::{Callback, CallbackConfig};
use recipe_engine::error::{Error, Result};
use recipe_engine::plugin::{BindContext, TimeParams};
use recipe_engine::{Event, State};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdStopperConfig {
    /// The metric to watch.
    pub monitor: String,
    /// The value that ends training once reached.
    pub threshold: f64,
    /// `max` (stop at or above) or `min` (stop at or below); by default `max` for accuracies.
    #[serde(default)]
    pub mode: Option<Mode>,
}

impl TimeParams for ThresholdStopperConfig {}

struct ThresholdStopper {
    monitor: String,
    threshold: f64,
    mode: Mode,
}

impl CallbackConfig for ThresholdStopperConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Callback>> {
        check_monitor(ctx, &self.monitor)?;
        if !self.threshold.is_finite() {
            return Err(Error::recipe(
                format!("{}.threshold", ctx.path),
                "must be a finite number",
            ));
        }
        Ok(Box::new(ThresholdStopper {
            monitor: self.monitor.clone(),
            threshold: self.threshold,
            mode: Mode::resolve(self.mode, &self.monitor),
        }))
    }
}

impl Callback for ThresholdStopper {
    fn run_event(&mut self, _event: Event, state: &mut State) -> Result<()> {
        let Some(&v) = state.pending_log.get(&self.monitor) else {
            return Ok(());
        };
        let reached = match self.mode {
            Mode::Max => v >= self.threshold,
            Mode::Min => v <= self.threshold,
        };
        if reached {
            state.request_stop(format!(
                "{} reached {v:.6} (threshold {}) at batch {}",
                self.monitor, self.threshold, state.timestamp.batch
            ));
        }
        Ok(())
    }
}

recipe_engine::register_callback!(
    ThresholdStopperConfig,
    "threshold_stopper",
    "Stops as soon as a metric reaches a threshold.",
    "monitor: eval/accuracy\nthreshold: 0.9"
);
