//! Estimates the time left (`time/remaining_estimate_sec`) from the pace of the run so far,
//! evaluations included, and logs the elapsed wall time (`time/elapsed_sec`). The first `skip`
//! steps (warm-up of caches and allocators) are left out of the pace; on resume the estimate
//! starts again from the resumed step.

use recipe_engine::callback::{Callback, CallbackConfig};
use recipe_engine::error::Result;
use recipe_engine::plugin::{BindContext, Policy, TimeParams, TimeVisitor};
use recipe_engine::{Event, State, Time};
use serde::{Deserialize, Serialize};
use std::time::Instant;

fn one_batch() -> Time {
    Time::batches(1.0)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeEstimatorConfig {
    /// Steps left out of the pace at the start (fixed under ScaleSchedule).
    #[serde(default = "one_batch")]
    pub skip: Time,
    /// Log every this often (fixed under ScaleSchedule).
    #[serde(default = "one_batch")]
    pub interval: Time,
}

impl TimeParams for RuntimeEstimatorConfig {
    fn visit_times(&mut self, v: &mut dyn TimeVisitor) {
        v.visit("skip", &mut self.skip, Policy::Fixed);
        v.visit("interval", &mut self.interval, Policy::Fixed);
    }
}

struct RuntimeEstimator {
    skip: u64,
    every: u64,
    start: Option<Instant>,
    /// Where the pace is measured from: a step and the time it ended.
    origin: Option<(u64, Instant)>,
    first_batch: u64,
}

impl CallbackConfig for RuntimeEstimatorConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Callback>> {
        Ok(Box::new(RuntimeEstimator {
            skip: ctx.batches("skip", &self.skip)?,
            every: ctx.interval("interval", &self.interval)?,
            start: None,
            origin: None,
            first_batch: 0,
        }))
    }
}

impl Callback for RuntimeEstimator {
    fn run_event(&mut self, event: Event, state: &mut State) -> Result<()> {
        let b = state.timestamp.batch;
        match event {
            Event::FitStart => {
                self.start = Some(Instant::now());
                self.first_batch = b;
                self.origin = None;
            }
            Event::BatchEnd => {
                let now = Instant::now();
                if self.origin.is_none() && b >= self.first_batch + self.skip {
                    self.origin = Some((b, now));
                }
                if !(b - 1).is_multiple_of(self.every) {
                    return Ok(());
                }
                if let Some(start) = self.start {
                    state.log("time/elapsed_sec", (now - start).as_secs_f64());
                }
                if let Some((b0, t0)) = self.origin {
                    if b > b0 {
                        let pace = (now - t0).as_secs_f64() / (b - b0) as f64;
                        let left = state.max_batches().saturating_sub(b) as f64;
                        state.log("time/remaining_estimate_sec", pace * left);
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

recipe_engine::register_callback!(
    RuntimeEstimatorConfig,
    "runtime_estimator",
    "Logs the estimated time left and the elapsed wall time.",
    "skip: 1ba\ninterval: 1ba"
);
