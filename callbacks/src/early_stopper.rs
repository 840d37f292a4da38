//! Stops training when a metric has not improved for a while (`patience`).
//!
//! Watches any logged metric (`eval/accuracy`, `eval/loss`, `train/epoch_loss`, ...). Improvement
//! means better than the best so far by more than `min_delta`. When `patience` of training time
//! has passed since the best value without improvement, it asks the trainer to stop after the
//! current batch. `patience` describes a phase of training, so ScaleSchedule scales it with the
//! run; its best value and where it was seen are saved in checkpoints.

use recipe_engine::callback::{Callback, CallbackConfig};
use recipe_engine::error::{Error, Result};
use recipe_engine::plugin::{BindContext, Policy, TimeParams, TimeVisitor};
use recipe_engine::state_dict::StateDict;
use recipe_engine::{Event, State, Time};
use serde::{Deserialize, Serialize};

pub use recipe_engine::metric::Mode;

/// Checks a metric name given in a recipe.
pub fn check_monitor(ctx: &BindContext, monitor: &str) -> Result<()> {
    if monitor.trim().is_empty() {
        return Err(Error::recipe_hint(
            format!("{}.monitor", ctx.path),
            "names no metric",
            "name a logged metric: eval/accuracy, eval/loss, train/loss, train/epoch_loss, ...",
        ));
    }
    Ok(())
}

fn default_monitor() -> String {
    "eval/loss".into()
}
fn one_epoch() -> Time {
    Time::epochs(1.0)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyStopperConfig {
    /// The metric to watch.
    #[serde(default = "default_monitor")]
    pub monitor: String,
    /// `max` or `min`; by default `max` for accuracies and `min` for anything else.
    #[serde(default)]
    pub mode: Option<Mode>,
    /// How long without improvement before stopping (scaled by ScaleSchedule).
    #[serde(default = "one_epoch")]
    pub patience: Time,
    /// The smallest change that counts as an improvement.
    #[serde(default)]
    pub min_delta: f64,
}

impl TimeParams for EarlyStopperConfig {
    fn visit_times(&mut self, v: &mut dyn TimeVisitor) {
        v.visit("patience", &mut self.patience, Policy::Scaled);
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Best {
    value: Option<f64>,
    at_batch: u64,
}

struct EarlyStopper {
    monitor: String,
    mode: Mode,
    patience: u64,
    min_delta: f64,
    best: Best,
}

impl CallbackConfig for EarlyStopperConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Callback>> {
        check_monitor(ctx, &self.monitor)?;
        if self.min_delta.is_nan() || self.min_delta < 0.0 {
            return Err(Error::recipe(
                format!("{}.min_delta", ctx.path),
                "must be a number >= 0",
            ));
        }
        Ok(Box::new(EarlyStopper {
            monitor: self.monitor.clone(),
            mode: Mode::resolve(self.mode, &self.monitor),
            patience: ctx.batches("patience", &self.patience)?,
            min_delta: self.min_delta,
            best: Best::default(),
        }))
    }
}

impl Callback for EarlyStopper {
    fn run_event(&mut self, _event: Event, state: &mut State) -> Result<()> {
        let Some(&v) = state.pending_log.get(&self.monitor) else {
            return Ok(());
        };
        let b = state.timestamp.batch;
        match self.best.value {
            _ if v.is_nan() => {}
            None => {
                self.best = Best {
                    value: Some(v),
                    at_batch: b,
                }
            }
            Some(best) if self.mode.better(v, best, self.min_delta) => {
                self.best = Best {
                    value: Some(v),
                    at_batch: b,
                }
            }
            Some(best) => {
                if b - self.best.at_batch >= self.patience {
                    state.request_stop(format!(
                        "early stopping: {} has not improved on {best:.6} (batch {}) for {} batches (patience {})",
                        self.monitor,
                        self.best.at_batch,
                        b - self.best.at_batch,
                        self.patience
                    ));
                }
            }
        }
        Ok(())
    }

    fn state_dict(&self) -> Result<StateDict> {
        Ok(StateDict::encode(&self.best))
    }

    fn load_state_dict(&mut self, state: &StateDict) -> Result<()> {
        self.best = state.decode("early_stopper")?;
        Ok(())
    }
}

recipe_engine::register_callback!(
    EarlyStopperConfig,
    "early_stopper",
    "Stops when a metric has not improved for `patience` (scaled with the run).",
    "monitor: eval/accuracy\npatience: 2ep\nmin_delta: 0.001"
);
