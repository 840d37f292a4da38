//! Stops training at the first NaN or infinity, naming the step and the first tensor that went
//! bad: the loss (after the forward pass), then each gradient (after backward, before the
//! optimizer step, so the weights stay good), then each weight (after the step).
//!
//! Training ends with an error; the checkpoints already written are untouched, and the message
//! names the last good one to resume from (perhaps with a lower LR and `--force`).

use recipe_engine::callback::{Callback, CallbackConfig};
use recipe_engine::candle_core::{DType, Tensor};
use recipe_engine::error::{Error, Result};
use recipe_engine::plugin::{BindContext, Policy, TimeParams, TimeVisitor};
use recipe_engine::{Event, State, Time};
use serde::{Deserialize, Serialize};

fn one_batch() -> Time {
    Time::batches(1.0)
}
fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NanMonitorConfig {
    /// Check gradients and weights every this often (fixed under ScaleSchedule); the loss is
    /// checked at every step.
    #[serde(default = "one_batch")]
    pub interval: Time,
    /// Also check the weights after the optimizer step.
    #[serde(default = "yes")]
    pub check_weights: bool,
}

impl TimeParams for NanMonitorConfig {
    fn visit_times(&mut self, v: &mut dyn TimeVisitor) {
        v.visit("interval", &mut self.interval, Policy::Fixed);
    }
}

struct NanMonitor {
    every: u64,
    check_weights: bool,
}

impl CallbackConfig for NanMonitorConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Callback>> {
        Ok(Box::new(NanMonitor {
            every: ctx.interval("interval", &self.interval)?,
            check_weights: self.check_weights,
        }))
    }
}

/// Whether every value of `t` is finite (a NaN or an infinity makes the sum non-finite).
fn all_finite(t: &Tensor) -> Result<bool> {
    let s = t.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    Ok(s.is_finite())
}

/// "3 NaN and 1 infinite of 4608 values", read on the bad path only.
fn describe(t: &Tensor) -> Result<String> {
    let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let nan = v.iter().filter(|x| x.is_nan()).count();
    let inf = v.iter().filter(|x| x.is_infinite()).count();
    Ok(if nan + inf == 0 {
        format!(
            "values so large that their sum overflows ({} values)",
            v.len()
        )
    } else {
        format!("{nan} NaN and {inf} infinite of {} values", v.len())
    })
}

impl NanMonitor {
    fn fail(&self, state: &State, what: String, when: &str) -> Error {
        state.non_finite(&what, when)
    }
}

impl Callback for NanMonitor {
    fn run_event(&mut self, event: Event, state: &mut State) -> Result<()> {
        let due = state.timestamp.batch.is_multiple_of(self.every);
        match event {
            Event::AfterLoss => {
                if let Some(l) = &state.loss {
                    if !all_finite(l)? {
                        return Err(self.fail(
                            state,
                            format!("loss ({})", describe(l)?),
                            "after the forward pass; the weights were not updated",
                        ));
                    }
                }
            }
            Event::AfterBackward if due => {
                if let Some(grads) = &state.grads {
                    for p in state.model.params().trainable() {
                        if let Some(g) = grads.get(p.var.as_tensor()) {
                            if !all_finite(g)? {
                                return Err(self.fail(
                                    state,
                                    format!("gradient of `{}` ({})", p.name, describe(g)?),
                                    "before the optimizer step; the weights were not updated",
                                ));
                            }
                        }
                    }
                }
            }
            // BATCH_END follows the optimizer step; the timestamp already counts the batch.
            Event::BatchEnd
                if self.check_weights
                    && state
                        .timestamp
                        .batch
                        .saturating_sub(1)
                        .is_multiple_of(self.every) =>
            {
                for p in state.model.params().iter() {
                    let w = p.var.as_tensor();
                    if !all_finite(w)? {
                        return Err(self.fail(
                            state,
                            format!("weight `{}` ({})", p.name, describe(w)?),
                            "after the optimizer step",
                        ));
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

recipe_engine::register_callback!(
    NanMonitorConfig,
    "nan_monitor",
    "Stops at the first NaN/Inf in the loss, a gradient or a weight, naming it and the step.",
    "interval: 1ba\ncheck_weights: true"
);
