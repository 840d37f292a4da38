//! The training state that algorithms and callbacks read and change.

use crate::data::Batch;
use crate::model::Model;
use crate::time::{Clock, Timestamp};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Results of one evaluation pass.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvalResult {
    pub loss: f64,
    pub accuracy: f64,
    /// Top-5 accuracy, with at least 5 classes.
    #[serde(default)]
    pub accuracy_top5: Option<f64>,
    pub samples: u64,
    /// The batch count at which it was measured.
    pub at_batch: u64,
}

/// Running training metrics of the current epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochMetrics {
    pub loss_sum: f64,
    pub correct: u64,
    pub samples: u64,
    pub batches: u64,
}

impl EpochMetrics {
    pub fn mean_loss(&self) -> f64 {
        self.loss_sum / self.batches.max(1) as f64
    }
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.samples.max(1) as f64
    }
}

pub struct State {
    pub run_name: String,
    pub seed: u64,
    pub device: Device,
    /// Where this run writes its files.
    pub run_dir: PathBuf,
    pub timestamp: Timestamp,
    /// The resolved clock: batches per epoch, batch size, and the run length in batches.
    pub clock: Clock,
    pub model: Box<dyn Model>,
    /// The optimizer, with its state (algorithms that snapshot and restore training, such as
    /// AutoLRS, save and load it through `state_dict`).
    pub optimizer: Box<dyn crate::optim::Optimizer>,
    /// The learning rate of the current step (base LR times the schedule's multiplier).
    pub lr: f64,
    pub base_lr: f64,
    /// The current batch (train or eval), from AFTER_DATALOADER / EVAL_BATCH_START on.
    pub batch: Option<Batch>,
    pub outputs: Option<Tensor>,
    pub loss: Option<Tensor>,
    /// Gradients of the last backward pass (AFTER_BACKWARD until the optimizer step).
    pub grads: Option<candle_core::backprop::GradStore>,
    /// The last training loss, as a number.
    pub last_loss: Option<f64>,
    pub epoch_metrics: EpochMetrics,
    pub last_eval: Option<EvalResult>,
    /// Values to log at this event; loggers write them and the engine then clears them.
    pub pending_log: BTreeMap<String, f64>,
    /// Set by a callback or algorithm to end training after the current batch, with a reason.
    pub stop_reason: Option<String>,
    /// Whether an evaluation pass is running.
    pub evaluating: bool,
    /// Set from INIT on when this run continues from a checkpoint: the timestamp it resumes at.
    /// Loggers use it to keep what was logged up to that point and drop what came after.
    pub resumed_from: Option<Timestamp>,
    /// Checkpoints asked for at this event; the trainer writes them after the event.
    pub checkpoint_requests: Vec<CheckpointRequest>,
    /// The last checkpoint written by this run.
    pub last_checkpoint: Option<PathBuf>,
    /// The training split in order, without augmentation, in eval-size batches, for callbacks
    /// that measure over the training set (budgeted convergence).
    pub train_in_order: Option<crate::data::Loader>,
    /// Data parallel: this process's rank and the number of processes. Every rank sees the same
    /// reduced metrics and takes the same decisions; only rank 0 writes files (loggers,
    /// checkpoints, the final weights).
    pub rank: usize,
    pub world_size: usize,
}

/// A checkpoint to write, and older files to delete once it is safely on disk.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointRequest {
    pub path: PathBuf,
    pub prune: Vec<PathBuf>,
}

impl State {
    /// A run's state before its first event: at batch 0, the LR at its base value, no batch,
    /// no metrics, no run folder yet (the trainer sets it when the run starts).
    pub fn new(
        run_name: impl Into<String>,
        seed: u64,
        device: Device,
        clock: Clock,
        model: Box<dyn Model>,
        optimizer: Box<dyn crate::optim::Optimizer>,
        base_lr: f64,
    ) -> State {
        State {
            run_name: run_name.into(),
            seed,
            device,
            run_dir: PathBuf::new(),
            timestamp: Timestamp::default(),
            clock,
            model,
            optimizer,
            lr: base_lr,
            base_lr,
            batch: None,
            outputs: None,
            loss: None,
            grads: None,
            last_loss: None,
            epoch_metrics: EpochMetrics::default(),
            last_eval: None,
            pending_log: BTreeMap::new(),
            stop_reason: None,
            evaluating: false,
            resumed_from: None,
            checkpoint_requests: Vec::new(),
            last_checkpoint: None,
            train_in_order: None,
            rank: 0,
            world_size: 1,
        }
    }

    /// Whether this process writes the run's files (rank 0 of a data-parallel job, or the only
    /// process).
    pub fn writes_files(&self) -> bool {
        self.rank == 0
    }

    /// The run length in batches.
    pub fn max_batches(&self) -> u64 {
        self.clock.max_batches.unwrap_or(0)
    }

    /// Fraction of the run elapsed, in [0, 1], at batch granularity.
    pub fn elapsed_fraction(&self) -> f64 {
        let m = self.max_batches();
        if m == 0 {
            1.0
        } else {
            (self.timestamp.batch as f64 / m as f64).min(1.0)
        }
    }

    /// Records a metric for the loggers at this event.
    pub fn log(&mut self, key: impl Into<String>, value: f64) {
        self.pending_log.insert(key.into(), value);
    }

    /// Asks the trainer to write a checkpoint to `path` after the current event, then delete
    /// the files in `prune` (only once the new one is safely written).
    pub fn request_checkpoint(&mut self, path: PathBuf, prune: Vec<PathBuf>) {
        self.checkpoint_requests
            .push(CheckpointRequest { path, prune });
    }

    /// The error that ends a run whose `what` (the loss, a gradient, a weight) went NaN or
    /// infinite at the current step, `when` in the step: it names the step, the LR, and the last
    /// good checkpoint to resume from.
    pub fn non_finite(&self, what: &str, when: &str) -> crate::error::Error {
        let ts = &self.timestamp;
        let resume = match &self.last_checkpoint {
            Some(p) => format!(
                "the last good checkpoint is {}; resume from it with --resume, perhaps with a lower LR (--set optimizer.lr=... --force)",
                p.display()
            ),
            None => "no checkpoint was written before it; add the `checkpoint` callback to resume from a good state next time, and consider a lower LR or a longer warmup".into(),
        };
        crate::error::Error::NonFinite(format!(
            "non-finite {what} at step {} (epoch {}, batch {} of the epoch), {when}; LR was {:.6}\n  hint: {resume}",
            ts.batch + 1,
            ts.epoch,
            ts.batch_in_epoch + 1,
            self.lr
        ))
    }

    /// Asks the trainer to stop after the current batch.
    pub fn request_stop(&mut self, reason: impl Into<String>) {
        if self.stop_reason.is_none() {
            self.stop_reason = Some(reason.into());
        }
    }
}
