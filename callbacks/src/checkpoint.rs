//! Saves checkpoints at a time interval and at the end of training, keeping the last N.
//!
//! The trainer writes each checkpoint after the event that asked for it, atomically (temporary
//! file, fsync, rename) and with a checksum; older files are deleted only once the new one is on
//! disk. Resume with `recipe run FILE --resume latest` (or a checkpoint's path).
//!
//! `interval` is a process cadence, fixed under ScaleSchedule. A whole number of epochs saves at
//! EPOCH_CHECKPOINT (after the epoch's metrics are logged); anything else saves at
//! BATCH_CHECKPOINT every that many batches.

use recipe_engine::callback::{Callback, CallbackConfig};
use recipe_engine::checkpoint;
use recipe_engine::error::{Error, Result};
use recipe_engine::plugin::{BindContext, Policy, TimeParams, TimeVisitor};
use recipe_engine::state_dict::StateDict;
use recipe_engine::time::TimeUnit;
use recipe_engine::{Event, State, Time};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::path::PathBuf;

fn one_epoch() -> Time {
    Time::epochs(1.0)
}
fn three() -> usize {
    3
}
fn default_folder() -> String {
    "checkpoints".into()
}
fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Save every this often (fixed under ScaleSchedule).
    #[serde(default = "one_epoch")]
    pub interval: Time,
    /// How many checkpoints to keep (the newest); 0 keeps all.
    #[serde(default = "three")]
    pub keep_last: usize,
    /// Folder inside the run folder.
    #[serde(default = "default_folder")]
    pub folder: String,
    /// Also save when training ends.
    #[serde(default = "yes")]
    pub save_at_end: bool,
}

impl TimeParams for CheckpointConfig {
    fn visit_times(&mut self, v: &mut dyn TimeVisitor) {
        v.visit("interval", &mut self.interval, Policy::Fixed);
    }
}

enum Every {
    Epochs(u64),
    Batches(u64),
}

struct Saver {
    every: Every,
    keep_last: usize,
    folder: String,
    save_at_end: bool,
    /// Checkpoints written so far (relative to the run folder), oldest first.
    saved: VecDeque<PathBuf>,
    last_batch: Option<u64>,
}

/// What survives a resume: the files this saver wrote, so `keep_last` goes on counting them.
#[derive(Serialize, Deserialize)]
struct Saved {
    saved: Vec<PathBuf>,
}

impl CallbackConfig for CheckpointConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Callback>> {
        if self.folder.is_empty() || self.folder.contains("..") || self.folder.starts_with('/') {
            return Err(Error::recipe(
                format!("{}.folder", ctx.path),
                "must be a folder name inside the run folder (no `..`, not absolute)",
            ));
        }
        let i = &self.interval;
        let every = if i.unit == TimeUnit::Epoch && i.value.fract() == 0.0 && i.value >= 1.0 {
            Every::Epochs(i.value as u64)
        } else {
            Every::Batches(ctx.interval("interval", i)?)
        };
        Ok(Box::new(Saver {
            every,
            keep_last: self.keep_last,
            folder: self.folder.clone(),
            save_at_end: self.save_at_end,
            saved: VecDeque::new(),
            last_batch: None,
        }))
    }
}

impl Saver {
    fn save(&mut self, state: &mut State) {
        let path = PathBuf::from(&self.folder).join(checkpoint::file_name(&state.timestamp));
        self.saved.retain(|p| p != &path);
        self.saved.push_back(path.clone());
        let mut prune = Vec::new();
        while self.keep_last > 0 && self.saved.len() > self.keep_last {
            prune.extend(self.saved.pop_front());
        }
        self.last_batch = Some(state.timestamp.batch);
        state.request_checkpoint(path, prune);
    }
}

impl Callback for Saver {
    fn run_event(&mut self, event: Event, state: &mut State) -> Result<()> {
        let ts = &state.timestamp;
        let due = match (event, &self.every) {
            (Event::BatchCheckpoint, Every::Batches(n)) => ts.batch.is_multiple_of(*n),
            (Event::EpochCheckpoint, Every::Epochs(n)) => ts.epoch.is_multiple_of(*n),
            (Event::FitEnd, _) => self.save_at_end && self.last_batch != Some(ts.batch),
            _ => false,
        };
        if due {
            self.save(state);
        }
        Ok(())
    }

    fn state_dict(&self) -> Result<StateDict> {
        Ok(StateDict::encode(&Saved {
            saved: self.saved.iter().cloned().collect(),
        }))
    }

    fn load_state_dict(&mut self, state: &StateDict) -> Result<()> {
        let s: Saved = state.decode("checkpoint")?;
        self.saved = s.saved.into();
        Ok(())
    }
}

recipe_engine::register_callback!(
    CheckpointConfig,
    "checkpoint",
    "Saves checkpoints (atomic, checksummed) at an interval and at the end, keeping the last N.",
    "interval: 1ep\nkeep_last: 3"
);
