//! Logs this process's resident memory (`memory/rss_mb`) and its peak so far
//! (`memory/peak_rss_mb`), in MiB, from the operating system (Linux `/proc`). On other systems it
//! logs nothing.

use recipe_engine::callback::{Callback, CallbackConfig};
use recipe_engine::error::Result;
use recipe_engine::plugin::{BindContext, Policy, TimeParams, TimeVisitor};
use recipe_engine::sysinfo::{peak_rss_mb, rss_mb};
use recipe_engine::{Event, State, Time};
use serde::{Deserialize, Serialize};

fn default_interval() -> Time {
    Time::batches(100.0)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryMonitorConfig {
    /// Log every this often (fixed under ScaleSchedule); also at each epoch's end.
    #[serde(default = "default_interval")]
    pub interval: Time,
}

impl TimeParams for MemoryMonitorConfig {
    fn visit_times(&mut self, v: &mut dyn TimeVisitor) {
        v.visit("interval", &mut self.interval, Policy::Fixed);
    }
}

struct MemoryMonitor {
    every: u64,
}

impl CallbackConfig for MemoryMonitorConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Callback>> {
        Ok(Box::new(MemoryMonitor {
            every: ctx.interval("interval", &self.interval)?,
        }))
    }
}

impl Callback for MemoryMonitor {
    fn run_event(&mut self, event: Event, state: &mut State) -> Result<()> {
        let due = match event {
            Event::BatchEnd => state.timestamp.batch.is_multiple_of(self.every),
            Event::EpochEnd => true,
            _ => false,
        };
        if due {
            if let Some(m) = rss_mb() {
                state.log("memory/rss_mb", m);
            }
            if let Some(m) = peak_rss_mb() {
                state.log("memory/peak_rss_mb", m);
            }
        }
        Ok(())
    }
}

recipe_engine::register_callback!(
    MemoryMonitorConfig,
    "memory_monitor",
    "Logs resident and peak resident memory of the process.",
    "interval: 100ba"
);
