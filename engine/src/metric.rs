//! Watching a logged metric: whether larger or smaller is better.

use serde::{Deserialize, Serialize};

/// Whether larger or smaller values of a metric are better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Max,
    Min,
}

impl Mode {
    /// The given mode, or the usual one for the metric: accuracies go up, anything else (losses)
    /// goes down.
    pub fn resolve(mode: Option<Mode>, monitor: &str) -> Mode {
        mode.unwrap_or(if monitor.contains("acc") {
            Mode::Max
        } else {
            Mode::Min
        })
    }

    /// Whether `v` is better than `than` by more than `delta`.
    pub fn better(self, v: f64, than: f64, delta: f64) -> bool {
        match self {
            Mode::Max => v > than + delta,
            Mode::Min => v < than - delta,
        }
    }
}
