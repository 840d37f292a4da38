//! Continuing a run from a checkpoint: the checks that refuse a checkpoint of another recipe,
//! another scale ratio or another resolved clock (unless forced), and putting the checkpoint's
//! state into the freshly built trainer (`checkpoint::restore`).

use super::{plugin_states_mut, Trainer};
use crate::checkpoint::{self, Checkpoint};
use crate::error::{Error, Result};
use crate::time::Clock;
use serde_yaml::Value;

/// How a run continues from a checkpoint.
pub struct Resume {
    pub checkpoint: Checkpoint,
    /// Continue even though the recipe or the scale ratio differ from the checkpoint's.
    pub force: bool,
}

impl Resume {
    /// Refuses a dataset whose classes differ from the checkpoint's: the labels would mean
    /// other things than the ones the model learned.
    pub fn check_classes(&self, classes: &[String]) -> Result<()> {
        let Some(saved) = &self.checkpoint.meta.classes else {
            return Ok(());
        };
        if saved.as_slice() == classes {
            return Ok(());
        }
        let first = saved
            .iter()
            .zip(classes)
            .position(|(a, b)| a != b)
            .unwrap_or(saved.len().min(classes.len()));
        let at = |v: &[String]| {
            v.get(first)
                .map_or("nothing".to_string(), |c| format!("`{c}`"))
        };
        Err(Error::msg(format!(
            "the data's classes differ from the checkpoint's: {} classes now, {} then; label {first} is {} now and was {}\n  hint: resume on the same class folders the run started with (the run folder's classes.txt lists them)",
            classes.len(),
            saved.len(),
            at(classes),
            at(saved)
        )))
    }

    /// The batch the run continues at.
    pub fn batch(&self) -> u64 {
        self.checkpoint.meta.timestamp.batch
    }

    /// The clock the checkpoint was taken under.
    pub(super) fn saved_clock(&self) -> Clock {
        let c = &self.checkpoint.meta.clock;
        Clock {
            max_batches: Some(c.max_batches),
            batches_per_epoch: c.batches_per_epoch,
            samples_per_batch: c.samples_per_batch,
            tokens_per_sample: None,
        }
    }

    /// Refuses to continue a run whose recipe as given, scale ratio or clock differ from the
    /// checkpoint's, with the list of differences, unless forced (then warns about each).
    pub(super) fn check(&self, given: &Value, ratio: f64, clock: &Clock) -> Result<()> {
        let d = checkpoint::differences(&self.checkpoint.meta, given, ratio, clock);
        check_differences(&self.checkpoint, &d, self.force)
    }

    /// Refuses to continue on another number of data-parallel processes than the checkpoint's
    /// run had, unless forced: the run would go on, but not as the uninterrupted one (each
    /// rank's share of a batch, per-rank batch-norm statistics and the reduction order change).
    pub(super) fn check_world_size(&self, size: usize) -> Result<()> {
        let then = self.checkpoint.meta.world_size;
        if then == size as u64 {
            return Ok(());
        }
        let d = [format!(
            "data-parallel processes: {then} -> {size} (each rank's share of a batch, per-rank batch-norm statistics and the order of the gradient sums change; the global batch stays {})",
            self.checkpoint.meta.clock.samples_per_batch
        )];
        check_differences(&self.checkpoint, &d, self.force)
    }
}

/// Refuses to resume across differences unless forced (then warns about each).
fn check_differences(ckpt: &Checkpoint, d: &[String], force: bool) -> Result<()> {
    if d.is_empty() {
        return Ok(());
    }
    let list = d
        .iter()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n");
    if force {
        tracing::warn!(
            "resuming from {} despite differences (--force):\n{list}",
            ckpt.path.display()
        );
        return Ok(());
    }
    Err(Error::msg(format!(
        "cannot resume from {}: it was written by a different run (checkpoint -> now):\n{list}\n  hint: resume with the recipe, --set and --scale it was started with, or pass --force to continue under the new settings",
        ckpt.path.display()
    )))
}

impl Trainer {
    /// Checks, before anything is written, that `ckpt` can be restored into this run.
    pub(super) fn check_restorable(&self, ckpt: &Checkpoint, force: bool) -> Result<()> {
        let mut keys = vec![self.optimizer_key.as_str()];
        keys.extend(
            super::plugin_states(&self.schedule, &self.engine)
                .into_iter()
                .map(|(k, _)| k),
        );
        checkpoint::check_restorable(ckpt, &self.state, &keys, force)
    }

    /// Puts a checkpoint's state into the freshly built run.
    pub(super) fn load(&mut self, ckpt: &Checkpoint, force: bool) -> Result<()> {
        let Trainer {
            state,
            engine,
            schedule,
            optimizer_key,
            prior_seconds,
            eval_seconds,
            ..
        } = self;
        let mut plugins = plugin_states_mut(schedule, engine);
        *prior_seconds = checkpoint::restore(ckpt, state, optimizer_key, &mut plugins, force)?;
        *eval_seconds = ckpt.meta.eval_seconds;
        Ok(())
    }
}
