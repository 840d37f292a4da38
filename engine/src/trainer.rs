//! The trainer loop: binds a prepared recipe (data, model, optimizer, schedule, algorithms,
//! callbacks), fires every event in order, evaluates at the recipe's interval, and stops at
//! max_duration.

use crate::data::{synthetic_splits, DataContext, Loader};
use crate::engine::{Engine, Named};
use crate::error::{Error, Result};
use crate::event::Event;
use crate::ops::{cross_entropy, top1_correct};
use crate::optim::Optimizer;
use crate::plugin::BindContext;
use crate::recipe::Recipe;
use crate::schedule::Schedule;
use crate::state::{EpochMetrics, EvalResult, State};
use crate::time::Timestamp;
use candle_core::Device;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct FitSummary {
    pub batches: u64,
    pub epochs_completed: u64,
    pub final_eval: Option<EvalResult>,
    pub wall_seconds: f64,
    pub run_dir: PathBuf,
    pub stop_reason: Option<String>,
}

pub struct Trainer {
    pub state: State,
    pub engine: Engine,
    optimizer: Box<dyn Optimizer>,
    schedule: Option<Box<dyn Schedule>>,
    train: Loader,
    eval: Option<Loader>,
    eval_every: u64,
}

/// Parses the recipe's `device`.
pub fn parse_device(s: &str) -> Result<Device> {
    let bad = |m: String| Error::recipe_hint("device", m, "use cpu, cuda or cuda:N");
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0).map_err(|e| bad(format!("cannot open CUDA device 0: {e}"))),
        s if s.starts_with("cuda:") => {
            let i: usize = s[5..]
                .parse()
                .map_err(|_| bad(format!("`{s}` has no device number")))?;
            Device::new_cuda(i).map_err(|e| bad(format!("cannot open CUDA device {i}: {e}")))
        }
        s => Err(bad(format!("unknown device `{s}`"))),
    }
}

/// A fresh run folder under `parent`: `<name>-<n>` with the first free n.
pub fn new_run_dir(parent: &Path, name: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(parent).map_err(|e| {
        Error::msg(format!("cannot create the runs folder {}: {e}; set `run_dir` or pass --run-dir to a writable folder", parent.display()))
    })?;
    for n in 1.. {
        let d = parent.join(format!("{name}-{n}"));
        match std::fs::create_dir(&d) {
            Ok(()) => return Ok(d),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(Error::msg(format!(
                    "cannot create run folder {}: {e}; pass --run-dir to a writable folder",
                    d.display()
                )))
            }
        }
    }
    unreachable!("the run-folder search is unbounded")
}

impl Trainer {
    /// Binds a prepared recipe into a trainer writing into `run_dir` (which must exist or be
    /// creatable; it is checked before any data is read).
    pub fn new(recipe: &Recipe, run_dir: &Path) -> Result<Trainer> {
        std::fs::create_dir_all(run_dir)
            .and_then(|_| {
                std::fs::write(
                    run_dir.join("recipe.yaml"),
                    serde_yaml::to_string(&recipe.raw).unwrap_or_default(),
                )
            })
            .map_err(|e| {
                Error::msg(format!(
                    "the run folder {} is not writable ({e}); pass --run-dir to a writable folder",
                    run_dir.display()
                ))
            })?;
        recipe
            .data_info()
            .validate("data")
            .map_err(|e| recipe.source.locate(e))?;
        let device = parse_device(&recipe.device)?;
        let data_ctx = DataContext {
            seed: recipe.seed,
            path: "data".into(),
        };
        let l = &recipe.data.loader;
        let splits = if l.synthetic {
            synthetic_splits(&recipe.data_info(), recipe.seed)
        } else {
            recipe
                .data
                .dataset
                .config
                .build(&data_ctx)
                .map_err(|e| recipe.source.locate(e))?
        };
        let train = Loader::new(
            splits.train.clone(),
            splits.info.clone(),
            l,
            true,
            recipe.seed,
        )?;
        let eval = match &splits.eval {
            Some(e) => Some(Loader::new(
                e.clone(),
                splits.info.clone(),
                l,
                false,
                recipe.seed,
            )?),
            None => None,
        };
        let clock = recipe
            .clock_for(train.len())
            .map_err(|e| recipe.source.locate(e))?;
        let ctx = BindContext {
            clock,
            device: device.clone(),
            seed: recipe.seed,
            input_shape: splits.info.shape,
            num_classes: splits.info.num_classes,
            path: String::new(),
        };
        let locate = |e: Error| recipe.source.locate(e);
        let model = recipe
            .model
            .config
            .build(&ctx.with_path("model"))
            .map_err(locate)?;
        let optimizer = recipe
            .optimizer
            .config
            .build(&ctx.with_path("optimizer"), model.params())
            .map_err(locate)?;
        let schedule = match &recipe.schedule {
            Some(s) => Some(s.config.build(&ctx.with_path("schedule")).map_err(locate)?),
            None => None,
        };
        let mut engine = Engine::default();
        for a in &recipe.algorithms {
            let inner = a.config.build(&ctx.with_path(&a.path)).map_err(locate)?;
            engine.algorithms.push(Named {
                label: format!("{} ({})", a.path, a.name),
                inner,
            });
        }
        for c in &recipe.callbacks {
            let inner = c.config.build(&ctx.with_path(&c.path)).map_err(locate)?;
            engine.callbacks.push(Named {
                label: format!("{} ({})", c.path, c.name),
                inner,
            });
        }
        let eval_every = ctx
            .batches("eval_interval", &recipe.eval_interval)
            .map_err(locate)?
            .max(1);
        let base_lr = recipe.optimizer.config.lr();
        let state = State {
            run_name: recipe.name.clone(),
            seed: recipe.seed,
            device,
            run_dir: run_dir.to_path_buf(),
            timestamp: Timestamp::default(),
            clock,
            model,
            lr: base_lr,
            base_lr,
            batch: None,
            outputs: None,
            loss: None,
            grads: None,
            last_loss: None,
            epoch_metrics: EpochMetrics::default(),
            last_eval: None,
            pending_log: Default::default(),
            stop_reason: None,
            evaluating: false,
        };
        let mut t = Trainer {
            state,
            engine,
            optimizer,
            schedule,
            train,
            eval,
            eval_every,
        };
        t.event(Event::Init)?;
        // No checkpoint is loaded yet; the events keep their place for the plugins that use them.
        t.event(Event::BeforeLoad)?;
        t.event(Event::AfterLoad)?;
        Ok(t)
    }

    fn event(&mut self, e: Event) -> Result<()> {
        self.engine.run_event(e, &mut self.state)
    }

    /// Trains to max_duration (or until a callback asks to stop) and writes the final weights.
    pub fn fit(&mut self) -> Result<FitSummary> {
        let t0 = Instant::now();
        let max = self.state.max_batches();
        let bpe = self.train.batches_per_epoch();
        self.event(Event::FitStart)?;
        while self.state.timestamp.batch < max && self.state.stop_reason.is_none() {
            let epoch = self.state.timestamp.epoch;
            self.set_lr();
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
                if self.state.timestamp.batch.is_multiple_of(self.eval_every) {
                    self.evaluate()?;
                }
            }
            drop(batches);
            if self.state.timestamp.batch_in_epoch >= bpe {
                let m = self.state.epoch_metrics;
                self.state.log("train/epoch_loss", m.mean_loss());
                self.state.log("train/epoch_accuracy", m.accuracy());
                self.event(Event::EpochEnd)?;
                self.event(Event::EpochCheckpoint)?;
                self.state.timestamp.next_epoch();
            }
        }
        if self.state.last_eval.map(|e| e.at_batch) != Some(self.state.timestamp.batch) {
            self.evaluate()?;
        }
        self.event(Event::FitEnd)?;
        let weights = self.state.run_dir.join("model.safetensors");
        self.state.model.params().save(&weights)?;
        let summary = FitSummary {
            batches: self.state.timestamp.batch,
            epochs_completed: self.state.timestamp.epoch,
            final_eval: self.state.last_eval,
            wall_seconds: t0.elapsed().as_secs_f64(),
            run_dir: self.state.run_dir.clone(),
            stop_reason: self.state.stop_reason.clone(),
        };
        Ok(summary)
    }

    /// The LR of batch k comes from batch k's timestamp, before anything of the batch runs.
    fn set_lr(&mut self) {
        let step = self.state.timestamp.batch;
        let mult = self.schedule.as_ref().map_or(1.0, |s| s.multiplier(step));
        self.state.lr = self.state.base_lr * mult;
    }

    fn train_batch(&mut self) -> Result<()> {
        self.event(Event::BatchStart)?;
        self.event(Event::BeforeTrainBatch)?;
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
        self.state.grads = Some(loss.backward()?);
        self.event(Event::AfterBackward)?;
        if let Some(grads) = self.state.grads.take() {
            self.optimizer
                .step(self.state.model.params(), &grads, self.state.lr)?;
        }
        let loss_value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        let batch = self.batch()?;
        let n = batch.len() as u64;
        let correct = top1_correct(&outputs, &batch.labels)?;
        let m = &mut self.state.epoch_metrics;
        m.loss_sum += loss_value;
        m.correct += correct;
        m.samples += n;
        m.batches += 1;
        self.state.last_loss = Some(loss_value);
        self.state.outputs = None;
        self.state.loss = None;
        self.event(Event::AfterTrainBatch)?;
        self.state.timestamp.next_batch(n, 0);
        self.state.log("train/loss", loss_value);
        self.event(Event::BatchEnd)?;
        self.event(Event::BatchCheckpoint)?;
        Ok(())
    }

    fn batch(&self) -> Result<&crate::state::Batch> {
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
        self.state.evaluating = true;
        self.event(Event::EvalStart)?;
        let (mut loss_sum, mut correct, mut samples, mut scored) = (0.0, 0u64, 0u64, 0u64);
        for batch in eval.epoch(0, 0, &self.state.device) {
            let batch = batch?;
            samples += batch.len() as u64;
            self.state.batch = Some(batch);
            self.event(Event::EvalBatchStart)?;
            self.event(Event::EvalBeforeForward)?;
            let b = self.batch()?.clone();
            let out = self.state.model.forward(&b.inputs, false)?.detach();
            self.state.outputs = Some(out.clone());
            self.event(Event::EvalAfterForward)?;
            let n = b.len() as u64;
            let l = cross_entropy(&out, &crate::ops::Targets::Hard(b.labels.clone()))?;
            loss_sum += l.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()? * n as f64;
            correct += top1_correct(&out, &b.labels)?;
            scored += n;
            self.event(Event::EvalBatchEnd)?;
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
            samples,
            at_batch: self.state.timestamp.batch,
        };
        self.state.last_eval = Some(r);
        self.state.outputs = None;
        self.state.batch = None;
        self.state.log("eval/loss", r.loss);
        self.state.log("eval/accuracy", r.accuracy);
        self.event(Event::EvalEnd)?;
        self.state.evaluating = false;
        Ok(())
    }
}
