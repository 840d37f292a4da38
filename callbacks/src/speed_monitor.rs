//! Logs throughput (`throughput/samples_per_sec`) and step time (`time/step_ms`), averaged over a
//! window of steps, and the wall time since the start of training (`time/train_sec`).

use recipe_engine::callback::{Callback, CallbackConfig};
use recipe_engine::error::Result;
use recipe_engine::plugin::{BindContext, Policy, TimeParams, TimeVisitor};
use recipe_engine::{Event, State, Time};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::time::Instant;

fn default_window() -> Time {
    Time::batches(20.0)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpeedMonitorConfig {
    /// Steps averaged (a measurement window: fixed under ScaleSchedule).
    #[serde(default = "default_window")]
    pub window: Time,
}

impl TimeParams for SpeedMonitorConfig {
    fn visit_times(&mut self, v: &mut dyn TimeVisitor) {
        v.visit("window", &mut self.window, Policy::Fixed);
    }
}

struct SpeedMonitor {
    window: usize,
    start: Option<Instant>,
    batch_start: Option<Instant>,
    /// (seconds, samples) of recent steps.
    recent: VecDeque<(f64, u64)>,
    /// Time spent in evaluation, excluded from training time.
    eval_start: Option<Instant>,
    eval_secs: f64,
}

impl CallbackConfig for SpeedMonitorConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Callback>> {
        Ok(Box::new(SpeedMonitor {
            window: ctx.interval("window", &self.window)? as usize,
            start: None,
            batch_start: None,
            recent: VecDeque::new(),
            eval_start: None,
            eval_secs: 0.0,
        }))
    }
}

impl Callback for SpeedMonitor {
    fn run_event(&mut self, event: Event, state: &mut State) -> Result<()> {
        match event {
            Event::FitStart => self.start = Some(Instant::now()),
            Event::BeforeDataloader => self.batch_start = Some(Instant::now()),
            Event::EvalStart => self.eval_start = Some(Instant::now()),
            Event::EvalEnd => {
                if let Some(t) = self.eval_start.take() {
                    self.eval_secs += t.elapsed().as_secs_f64();
                }
            }
            Event::BatchEnd => {
                if let Some(t) = self.batch_start.take() {
                    let n = state.batch.as_ref().map_or(0, |b| b.len() as u64);
                    self.recent.push_back((t.elapsed().as_secs_f64(), n));
                    if self.recent.len() > self.window {
                        self.recent.pop_front();
                    }
                    let secs: f64 = self.recent.iter().map(|r| r.0).sum();
                    let samples: u64 = self.recent.iter().map(|r| r.1).sum();
                    if secs > 0.0 {
                        state.log("throughput/samples_per_sec", samples as f64 / secs);
                        state.log("time/step_ms", 1000.0 * secs / self.recent.len() as f64);
                    }
                }
                if let Some(s) = self.start {
                    state.log("time/train_sec", s.elapsed().as_secs_f64() - self.eval_secs);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

recipe_engine::register_callback!(
    SpeedMonitorConfig,
    "speed_monitor",
    "Logs samples/s and step time over a window of steps.",
    "window: 20ba"
);
