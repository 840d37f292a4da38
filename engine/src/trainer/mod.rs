//! The trainer: binds a prepared recipe (data, model, optimizer, schedule, algorithms,
//! callbacks), then runs the fit loop: fires every event in order, steps, evaluates at the
//! recipe's interval, serves the checkpoints callbacks ask for, and stops at max_duration, when
//! asked to, or on a signal. Binding the recipe is in `bind.rs`, continuing from a checkpoint in
//! `resume.rs`.

mod bind;
mod resume;

pub use bind::{parse_device, validate, Bound, ModelSummary};
pub use resume::Resume;

use crate::checkpoint::{self, PluginState, RunInfo};
use crate::data::Loader;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::recipe::Recipe;
use crate::run_dir::RunLock;
use crate::schedule::Schedule;
use crate::state::{EpochMetrics, EvalResult, State};
use recipe_kernels::{cross_entropy, top1_correct, topk_correct};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct FitSummary {
    pub batches: u64,
    pub epochs_completed: u64,
    pub final_eval: Option<EvalResult>,
    /// Wall time of the whole run, across resumes, evaluations included.
    pub wall_seconds: f64,
    /// The part of `wall_seconds` spent evaluating.
    pub eval_seconds: f64,
    pub run_dir: PathBuf,
    pub stop_reason: Option<String>,
}

pub struct Trainer {
    pub state: State,
    pub engine: Engine,
    optimizer_key: String,
    schedule: NamedSchedule,
    train: Loader,
    eval: Option<Loader>,
    eval_every: u64,
    /// What goes into every checkpoint besides the state: the recipe as given and its ratio.
    recipe_given: serde_yaml::Value,
    scale_ratio: f64,
    /// Set (to the signal number) by a signal handler: finish the step, checkpoint, stop.
    interrupt: Option<Arc<AtomicUsize>>,
    /// Checkpoint folders already cleared of partial files from a killed process.
    cleaned: std::collections::HashSet<PathBuf>,
    /// When `fit` started (this process), for `time/fit_sec` beside each evaluation.
    fit_start: Option<Instant>,
    /// Training time of the run before it was resumed (from the checkpoint).
    prior_seconds: f64,
    /// Wall time spent evaluating, across resumes (the checkpoint's plus this process's).
    eval_seconds: f64,
    /// Gradient accumulation: the samples of one forward/backward pass, when fewer than a batch
    /// (`device_train_microbatch_size`).
    microbatch: Option<usize>,
    /// Whether evaluation also counts top-5 accuracy (at least 5 classes).
    eval_top5: bool,
    /// The run folder's lock, held while this trainer lives.
    lock: Option<RunLock>,
    /// The dataset's class names in label order (image folders): written to the run folder as
    /// classes.txt and into each checkpoint.
    classes: Option<Vec<String>>,
    /// The data-parallel job this process is part of (a job of one by default).
    dist: Arc<dyn crate::dist::Collective>,
    /// Data parallel: a signal that reached any rank, agreed on in the last step's all-reduce,
    /// so that every rank stops at the same batch (0: none).
    job_signal: usize,
}

fn signal_name(sig: usize) -> String {
    match sig {
        2 => "SIGINT".into(),
        15 => "SIGTERM".into(),
        n => format!("signal {n}"),
    }
}

type NamedSchedule = Option<(String, Box<dyn Schedule>)>;

/// The plugins whose state a checkpoint carries besides the optimizer, with their keys, in
/// recipe order.
fn plugin_states<'a>(
    schedule: &'a NamedSchedule,
    engine: &'a Engine,
) -> Vec<(&'a str, &'a dyn PluginState)> {
    let mut v: Vec<(&str, &dyn PluginState)> = Vec::new();
    if let Some((key, s)) = schedule {
        v.push((key, s));
    }
    for a in &engine.algorithms {
        v.push((&a.label, &a.inner));
    }
    for c in &engine.callbacks {
        v.push((&c.label, &c.inner));
    }
    v
}

/// `plugin_states`, to restore them.
fn plugin_states_mut<'a>(
    schedule: &'a mut NamedSchedule,
    engine: &'a mut Engine,
) -> Vec<(&'a str, &'a mut dyn PluginState)> {
    let mut v: Vec<(&str, &mut dyn PluginState)> = Vec::new();
    if let Some((key, s)) = schedule {
        v.push((key, s));
    }
    for a in &mut engine.algorithms {
        v.push((&a.label, &mut a.inner));
    }
    for c in &mut engine.callbacks {
        v.push((&c.label, &mut c.inner));
    }
    v
}

impl Trainer {
    /// Binds a prepared recipe and starts it in `run_dir` (created if needed; refused if it
    /// holds another run): `Trainer::bind(recipe, None)?.start(run_dir, false)`.
    pub fn new(recipe: &Recipe, run_dir: &Path) -> Result<Trainer> {
        Self::bind(recipe, None)?.start(run_dir, false)
    }

    /// Binds a recipe and continues from a checkpoint. A checkpoint of another recipe, another
    /// scale ratio or another resolved clock is refused with the list of differences, unless
    /// `force` is set.
    pub fn resume(recipe: &Recipe, run_dir: &Path, resume: Resume) -> Result<Trainer> {
        Self::bind(recipe, Some(resume))?.start(run_dir, false)
    }

    /// Stop cleanly when `flag` becomes non-zero (a signal number): finish the step, write a
    /// checkpoint, return [`Error::Interrupted`].
    pub fn set_interrupt(&mut self, flag: Arc<AtomicUsize>) {
        self.interrupt = Some(flag);
    }

    /// Wall time of the whole run so far: this process's fit plus the time before a resume.
    fn elapsed_seconds(&self) -> f64 {
        self.prior_seconds + self.fit_start.map_or(0.0, |t| t.elapsed().as_secs_f64())
    }

    /// Refuses to go on (or to write weights) when a weight is NaN or infinite: a step can
    /// leave them so with a finite loss, and the next loss would only show it a step later.
    fn check_weights_finite(&self, when: &str) -> Result<()> {
        for p in self.state.model.params().iter() {
            // In f64, a sum of finite f32 values cannot overflow: it is finite iff they all are.
            let sum = p
                .var
                .as_tensor()
                .to_dtype(candle_core::DType::F64)?
                .sum_all()?
                .to_scalar::<f64>()?;
            if !sum.is_finite() {
                return Err(self.state.non_finite(&format!("weight `{}`", p.name), when));
            }
        }
        Ok(())
    }

    /// Writes a checkpoint of the run as it stands (never one whose weights are not finite).
    pub fn save_checkpoint(&mut self, path: &Path) -> Result<()> {
        self.check_weights_finite("before a checkpoint was written; none was")?;
        if !self.state.writes_files() {
            // Rank 0 writes it: every rank holds the same weights and state.
            self.state.last_checkpoint = Some(path.to_path_buf());
            return Ok(());
        }
        if let Some(dir) = path.parent() {
            if self.cleaned.insert(dir.to_path_buf()) {
                let n = crate::atomic::remove_stale_temporaries(dir);
                if n > 0 {
                    tracing::info!(
                        "removed {n} partial checkpoint file(s) left in {} by an interrupted write",
                        dir.display()
                    );
                }
            }
        }
        let run = RunInfo {
            recipe_given: &self.recipe_given,
            scale_ratio: self.scale_ratio,
            elapsed_seconds: self.elapsed_seconds(),
            eval_seconds: self.eval_seconds,
            classes: self.classes.as_deref(),
        };
        let (meta, tensors) = checkpoint::capture(
            &self.state,
            &self.optimizer_key,
            &plugin_states(&self.schedule, &self.engine),
            &run,
        )?;
        checkpoint::Checkpoint::write(path, &meta, &tensors).map_err(|e| {
            // A write goes to a temporary file first: whatever failed, no earlier checkpoint
            // was touched.
            let hint = match &self.state.last_checkpoint {
                Some(p) => format!(
                    "the previous checkpoint {} is intact; free some space (or fix the folder), then continue with --resume {}",
                    p.display(),
                    p.display()
                ),
                None => "no earlier checkpoint was written; free some space (or fix the folder) and start the run again".into(),
            };
            Error::msg(format!(
                "cannot write the checkpoint {}: {e}\n  hint: {hint}",
                path.display()
            ))
        })?;
        tracing::info!(
            "checkpoint at batch {}: {}",
            self.state.timestamp.batch,
            path.display()
        );
        self.state.last_checkpoint = Some(path.to_path_buf());
        Ok(())
    }

    /// Writes the checkpoints callbacks asked for at the last event, then deletes the files they
    /// retire (only after the new one is on disk).
    fn serve_checkpoint_requests(&mut self) -> Result<()> {
        for req in std::mem::take(&mut self.state.checkpoint_requests) {
            let path = if req.path.is_absolute() {
                req.path.clone()
            } else {
                self.state.run_dir.join(&req.path)
            };
            self.save_checkpoint(&path)?;
            if !self.state.writes_files() {
                continue;
            }
            for old in req.prune {
                let old = self.state.run_dir.join(old);
                if old == path {
                    continue;
                }
                match std::fs::remove_file(&old) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => tracing::warn!("cannot delete old checkpoint {}: {e}", old.display()),
                }
            }
        }
        Ok(())
    }

    /// When a signal arrived: write a checkpoint at this batch (unless one was just written) and
    /// stop with [`Error::Interrupted`].
    fn check_interrupt(&mut self) -> Result<()> {
        let sig = match self.dist.size() {
            1 => self.local_signal(),
            _ => self.job_signal,
        };
        if sig == 0 {
            return Ok(());
        }
        let ts = &self.state.timestamp;
        let path = self
            .state
            .run_dir
            .join("checkpoints")
            .join(checkpoint::file_name(ts));
        if self.state.last_checkpoint.as_deref() != Some(path.as_path()) || !path.exists() {
            self.save_checkpoint(&path)?;
        }
        Err(Error::Interrupted {
            signal: signal_name(sig),
            batch: self.state.timestamp.batch,
            checkpoint: path,
        })
    }

    /// The signal this process received (0: none).
    fn local_signal(&self) -> usize {
        self.interrupt
            .as_ref()
            .map_or(0, |f| f.load(Ordering::SeqCst))
    }

    fn event(&mut self, e: Event) -> Result<()> {
        if let Some((_, s)) = &mut self.schedule {
            if !self.state.pending_log.is_empty() {
                s.observe(&self.state.pending_log, self.state.timestamp.batch);
            }
        }
        self.engine.run_event(e, &mut self.state)
    }

    /// Trains to max_duration (or until a callback asks to stop) and writes the final weights.
    pub fn fit(&mut self) -> Result<FitSummary> {
        let t0 = Instant::now();
        self.fit_start = Some(t0);
        let max = self.state.max_batches();
        let bpe = self.train.batches_per_epoch();
        self.event(Event::FitStart)?;
        // A run resumed from the last batch of an epoch still owes that epoch its end.
        while (self.state.timestamp.batch < max && self.state.stop_reason.is_none())
            || self.state.timestamp.batch_in_epoch >= bpe
        {
            let epoch = self.state.timestamp.epoch;
            // A run resumed after the last batch of an epoch keeps the LR that batch trained
            // with (restored from the checkpoint) for the epoch's end.
            if self.state.timestamp.batch_in_epoch < bpe {
                self.set_lr();
            }
            if self.state.timestamp.batch_in_epoch == 0 {
                self.state.epoch_metrics = EpochMetrics::default();
                self.event(Event::EpochStart)?;
            }
            let mut batches = self.train.epoch(
                epoch,
                self.state.timestamp.batch_in_epoch,
                &self.state.device,
            );
            while self.state.timestamp.batch < max
                && self.state.timestamp.batch_in_epoch < bpe
                && self.state.stop_reason.is_none()
            {
                self.set_lr();
                self.event(Event::BeforeDataloader)?;
                let batch = match batches.next() {
                    Some(b) => b?,
                    None => {
                        return Err(Error::msg(
                            "the data loader stopped before the end of the epoch",
                        ))
                    }
                };
                self.state.batch = Some(batch);
                self.event(Event::AfterDataloader)?;
                self.train_batch()?;
                self.check_interrupt()?;
            }
            drop(batches);
            if self.state.timestamp.batch_in_epoch >= bpe {
                let m = self.state.epoch_metrics;
                self.state.log("train/epoch_loss", m.mean_loss());
                let skipped = self.train.skipped() + self.eval.as_ref().map_or(0, Loader::skipped);
                if skipped > 0 {
                    self.state.log("data/skipped_images", skipped as f64);
                }
                self.state.log("train/epoch_accuracy", m.accuracy());
                self.event(Event::EpochEnd)?;
                // As in Composer: the timestamp moves to the next epoch before EPOCH_CHECKPOINT,
                // so a checkpoint taken there resumes at the start of the next epoch.
                self.state.timestamp.next_epoch();
                self.event(Event::EpochCheckpoint)?;
                self.serve_checkpoint_requests()?;
                self.check_interrupt()?;
            }
        }
        if self.state.last_eval.map(|e| e.at_batch) != Some(self.state.timestamp.batch) {
            self.evaluate()?;
        }
        self.event(Event::FitEnd)?;
        self.serve_checkpoint_requests()?;
        self.check_weights_finite("at the end of training")?;
        if self.state.writes_files() {
            let weights = self.state.run_dir.join("model.safetensors");
            self.state.model.params().save(&weights)?;
        }
        let summary = FitSummary {
            batches: self.state.timestamp.batch,
            epochs_completed: self.state.timestamp.epoch,
            final_eval: self.state.last_eval,
            wall_seconds: self.prior_seconds + t0.elapsed().as_secs_f64(),
            eval_seconds: self.eval_seconds,
            run_dir: self.state.run_dir.clone(),
            stop_reason: self.state.stop_reason.clone(),
        };
        Ok(summary)
    }

    /// The LR of batch k comes from batch k's timestamp, before anything of the batch runs.
    fn set_lr(&mut self) {
        let step = self.state.timestamp.batch;
        let mult = self
            .schedule
            .as_ref()
            .map_or(1.0, |(_, s)| s.multiplier(step));
        self.state.lr = self.state.base_lr * mult;
    }

    fn train_batch(&mut self) -> Result<()> {
        self.event(Event::BatchStart)?;
        let n = self.batch()?.len() as u64;
        let (loss_value, n) = self.train_pass(true, n)?;
        // A closure-style step (SAM): an algorithm may ask for the batch to run again, with
        // what it changed, before the optimizer steps.
        let mut passes = 1;
        while self.wants_again()? {
            passes += 1;
            if passes > 16 {
                return Err(Error::msg(
                    "the algorithms asked for more than 16 passes over one batch; one of them never lets the step finish",
                ));
            }
            self.train_pass(false, n)?;
        }
        if let Some(grads) = self.state.grads.take() {
            let st = &mut self.state;
            st.optimizer.step(st.model.params(), &grads, st.lr)?;
        }
        self.state.timestamp.next_batch(n, 0);
        self.state.log("train/loss", loss_value);
        self.event(Event::BatchEnd)?;
        // Every evaluation of a step, the last one included, comes before its BATCH_CHECKPOINT,
        // so a checkpoint taken there already holds it.
        let b = self.state.timestamp.batch;
        if b.is_multiple_of(self.eval_every)
            || b >= self.state.max_batches()
            || self.state.stop_reason.is_some()
        {
            self.evaluate()?;
        }
        self.event(Event::BatchCheckpoint)?;
        self.serve_checkpoint_requests()
    }

    /// Whether an algorithm asks for another pass over the batch ([`crate::algorithm::Algorithm::again`]).
    fn wants_again(&mut self) -> Result<bool> {
        for a in &mut self.engine.algorithms {
            if a.inner
                .again(&mut self.state)
                .map_err(|e| Error::msg(format!("{} failed before the step: {e}", a.label)))?
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// BEFORE_TRAIN_BATCH, the forward and backward passes (in microbatches when the recipe
    /// asks), AFTER_TRAIN_BATCH. As in Composer, AFTER_TRAIN_BATCH comes before the optimizer
    /// step, with the whole batch's gradient (every microbatch's, summed) in `state.grads`: where
    /// gradients are clipped or measured. The step's result is seen from BATCH_END on. The
    /// first pass of a batch counts in the epoch's metrics. In a data-parallel job the gradients,
    /// the loss and the counts are summed across ranks before AFTER_TRAIN_BATCH. Returns the
    /// loss (the global batch's mean) and the batch's samples, `batch_samples` on this rank
    /// (all ranks together).
    fn train_pass(&mut self, first: bool, batch_samples: u64) -> Result<(f64, u64)> {
        self.event(Event::BeforeTrainBatch)?;
        let n = self.batch()?.len();
        let (loss_value, correct) = match self.microbatch {
            Some(m) if m < n => self.train_microbatches(m)?,
            _ => self.forward_backward(None)?,
        };
        let (loss_value, correct, n, batch_samples) =
            self.reduce_pass(loss_value, correct, n, batch_samples)?;
        if first {
            let m = &mut self.state.epoch_metrics;
            m.loss_sum += loss_value;
            m.correct += correct;
            m.samples += n as u64;
            m.batches += 1;
            self.state.last_loss = Some(loss_value);
        }
        self.state.outputs = None;
        self.state.loss = None;
        self.event(Event::AfterTrainBatch)?;
        Ok((loss_value, batch_samples))
    }

    /// Data parallel: sums each rank's gradients weighted by its samples, divided by the global
    /// batch's (the gradient of the global mean loss, identical on every rank), averages the
    /// batch-norm buffers ([`crate::dist::reduce_step`]), and sums the loss, correct predictions
    /// and sample counts, and whether a signal reached any rank. A job of one returns its
    /// arguments untouched.
    fn reduce_pass(
        &mut self,
        loss: f64,
        correct: u64,
        n: usize,
        batch_samples: u64,
    ) -> Result<(f64, u64, usize, u64)> {
        if self.dist.size() == 1 {
            return Ok((loss, correct, n, batch_samples));
        }
        let signal = self.local_signal();
        let mut counts = [
            loss * n as f64,
            correct as f64,
            n as f64,
            batch_samples as f64,
            signal as f64,
        ];
        self.dist.sum_f64(&mut counts)?;
        if counts[4] > 0.0 {
            self.job_signal = if signal > 0 { signal } else { 15 };
        }
        let total = counts[2];
        crate::dist::reduce_step(
            self.dist.as_ref(),
            self.state.model.params(),
            self.state.grads.as_mut(),
            n as f64,
            total,
        )?;
        Ok((
            counts[0] / total.max(1.0),
            counts[1] as u64,
            total as usize,
            counts[3] as u64,
        ))
    }

    /// The forward pass, the loss and the backward pass of the batch in `state.batch`, with their
    /// events; with `weight` (a microbatch's share of the batch), the loss is scaled by it so
    /// that the microbatches' gradients add up to the batch's. Leaves the gradients in
    /// `state.grads`; returns the (unscaled) loss and the number of correct top-1 predictions.
    fn forward_backward(&mut self, weight: Option<f64>) -> Result<(f64, u64)> {
        self.event(Event::BeforeForward)?;
        let inputs = self.batch()?.inputs.clone();
        self.state.outputs = Some(self.state.model.forward(&inputs, true)?);
        self.event(Event::AfterForward)?;
        self.event(Event::BeforeLoss)?;
        let outputs = self
            .state
            .outputs
            .clone()
            .ok_or_else(|| Error::msg("an algorithm removed the model outputs"))?;
        let loss = cross_entropy(&outputs, &self.batch()?.targets)?;
        self.state.loss = Some(loss);
        self.event(Event::AfterLoss)?;
        self.event(Event::BeforeBackward)?;
        let loss = self
            .state
            .loss
            .clone()
            .ok_or_else(|| Error::msg("an algorithm removed the loss"))?;
        // Read before the backward pass, so that a diverged step never reaches the weights.
        let loss_value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        if !loss_value.is_finite() {
            return Err(self.state.non_finite(
                &format!("loss ({loss_value})"),
                "after the forward pass; the weights were not updated",
            ));
        }
        let loss = match weight {
            Some(w) => (loss * w)?,
            None => loss,
        };
        self.state.grads = Some(loss.backward()?);
        self.event(Event::AfterBackward)?;
        let correct = top1_correct(&outputs, &self.batch()?.labels)?;
        Ok((loss_value, correct))
    }

    /// Gradient accumulation: the batch in microbatches of `size` samples (the last one may be
    /// shorter), each through `forward_backward` with its share of the batch as the loss
    /// weight, and the parameters' gradients summed: one optimizer step for the batch, with the
    /// gradient of its mean loss. Each microbatch's forward, loss and backward events fire with
    /// `state.batch` holding that microbatch (as in Composer); the whole batch is restored after.
    fn train_microbatches(&mut self, size: usize) -> Result<(f64, u64)> {
        let whole = self
            .state
            .batch
            .take()
            .ok_or_else(|| Error::msg("an algorithm removed the batch"))?;
        let n = whole.len();
        let (mut loss_sum, mut correct) = (0.0, 0u64);
        let mut acc: Option<candle_core::backprop::GradStore> = None;
        for start in (0..n).step_by(size) {
            let len = size.min(n - start);
            let share = len as f64 / n as f64;
            self.state.batch = Some(whole.narrow(start, len)?);
            let (l, c) = self.forward_backward(Some(share))?;
            loss_sum += l * share;
            correct += c;
            let Some(g) = self.state.grads.take() else {
                continue;
            };
            match &mut acc {
                None => acc = Some(g),
                Some(a) => {
                    for p in self.state.model.params().trainable() {
                        let t = p.var.as_tensor();
                        if let Some(gi) = g.get(t) {
                            let sum = match a.get(t) {
                                Some(prev) => (prev + gi)?,
                                None => gi.clone(),
                            };
                            a.insert(t, sum);
                        }
                    }
                }
            }
        }
        self.state.batch = Some(whole);
        self.state.grads = acc;
        Ok((loss_sum, correct))
    }

    fn batch(&self) -> Result<&crate::data::Batch> {
        self.state
            .batch
            .as_ref()
            .ok_or_else(|| Error::msg("an algorithm removed the batch"))
    }

    /// One pass over the eval split; its result goes into `state.last_eval` and the log.
    pub fn evaluate(&mut self) -> Result<()> {
        let Some(eval) = self.eval.clone() else {
            return Ok(());
        };
        let started = Instant::now();
        self.state.evaluating = true;
        self.event(Event::EvalStart)?;
        let (mut loss_sum, mut correct, mut samples, mut scored) = (0.0, 0u64, 0u64, 0u64);
        let top5 = self.eval_top5;
        let mut correct5 = 0u64;
        for batch in eval.epoch(0, 0, &self.state.device) {
            let batch = batch?;
            samples += batch.len() as u64;
            if batch.is_empty() {
                // A data-parallel rank's share of a last batch smaller than the job.
                continue;
            }
            self.state.batch = Some(batch);
            self.event(Event::EvalBatchStart)?;
            self.event(Event::EvalBeforeForward)?;
            let b = self.batch()?.clone();
            // In microbatches when the recipe trains in them (as Composer evaluates): candle keeps
            // a forward's whole graph until its output is dropped, so a big evaluation batch
            // would hold every activation of every sample at once.
            let step = self.microbatch.unwrap_or(b.len()).max(1);
            let mut outs = Vec::new();
            for start in (0..b.len()).step_by(step) {
                let n = step.min(b.len() - start);
                outs.push(
                    self.state
                        .model
                        .forward(&b.inputs.narrow(0, start, n)?, false)?
                        .detach(),
                );
            }
            let out = match outs.as_slice() {
                [one] => one.clone(),
                many => candle_core::Tensor::cat(many, 0)?,
            };
            self.state.outputs = Some(out.clone());
            self.event(Event::EvalAfterForward)?;
            let n = b.len() as u64;
            let l = cross_entropy(&out, &recipe_kernels::Targets::Hard(b.labels.clone()))?;
            loss_sum += l.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()? * n as f64;
            correct += top1_correct(&out, &b.labels)?;
            if top5 {
                correct5 += topk_correct(&out, &b.labels, 5)?;
            }
            scored += n;
            self.event(Event::EvalBatchEnd)?;
        }
        if self.dist.size() > 1 {
            // Sharded evaluation: the sums of every rank's share.
            let mut v = [
                loss_sum,
                correct as f64,
                correct5 as f64,
                scored as f64,
                samples as f64,
            ];
            self.dist.sum_f64(&mut v)?;
            loss_sum = v[0];
            (correct, correct5, scored, samples) =
                (v[1] as u64, v[2] as u64, v[3] as u64, v[4] as u64);
        }
        if samples as usize != eval.len() {
            return Err(Error::msg(format!(
                "evaluation saw {samples} of {} samples: the data loader failed",
                eval.len()
            )));
        }
        let r = EvalResult {
            loss: loss_sum / scored.max(1) as f64,
            accuracy: correct as f64 / scored.max(1) as f64,
            accuracy_top5: top5.then(|| correct5 as f64 / scored.max(1) as f64),
            samples,
            at_batch: self.state.timestamp.batch,
        };
        self.state.last_eval = Some(r);
        self.state.outputs = None;
        self.state.batch = None;
        self.state.log("eval/loss", r.loss);
        self.state.log("eval/accuracy", r.accuracy);
        if let Some(a) = r.accuracy_top5 {
            self.state.log("eval/accuracy_top5", a);
        }
        // Wall time of the run so far across resumes: in all, evaluating, and training (all but
        // evaluating), so that time-to-accuracy can be measured on training time with the cost
        // of evaluation shown apart.
        self.eval_seconds += started.elapsed().as_secs_f64();
        let fit = self.elapsed_seconds();
        self.state.log("time/fit_sec", fit);
        self.state.log("time/eval_sec", self.eval_seconds);
        self.state.log("time/train_sec", fit - self.eval_seconds);
        self.event(Event::EvalEnd)?;
        self.state.evaluating = false;
        Ok(())
    }
}
