//! Binding a prepared recipe: the run folder and its recipe.yaml, the data and its loaders, the
//! resolved clock, then the model, optimizer, schedule, algorithms and callbacks built against it,
//! and the INIT, BEFORE_LOAD and AFTER_LOAD events (a resumed run loads its checkpoint between the
//! last two).

use super::{Resume, Trainer};
use crate::checkpoint;
use crate::data::{synthetic_splits, DataContext, Loader};
use crate::engine::{Engine, Named};
use crate::error::{Error, Result};
use crate::event::Event;
use crate::plugin::BindContext;
use crate::recipe::Recipe;
use crate::run_dir;
use crate::state::{EpochMetrics, State};
use crate::time::Timestamp;
use candle_core::Device;
use std::path::Path;

/// Parses the recipe's `device`.
pub fn parse_device(s: &str) -> Result<Device> {
    let bad = |m: String| {
        Error::recipe_hint(
            "device",
            m,
            "use cpu, cuda or cuda:N (CUDA needs a binary built with `--features cuda`)",
        )
    };
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

impl Trainer {
    pub(super) fn build(
        recipe: &Recipe,
        run_dir: &Path,
        resume: Option<Resume>,
    ) -> Result<Trainer> {
        let given = recipe.source.raw()?;
        if let Some(r) = &resume {
            // A quick check before any data is read; the clock is compared once it is known.
            r.check(&given, recipe.scale_ratio, &r.saved_clock())?;
        }
        run_dir::write_recipe(&recipe.raw, run_dir, resume.as_ref().map(Resume::batch))?;
        if let Some(r) = &resume {
            checkpoint::set_aside_after(run_dir, r.batch());
        }
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
        if let Some(r) = &resume {
            r.check(&given, recipe.scale_ratio, &clock)?;
        }
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
            Some(s) => Some((
                checkpoint::plugin_key("schedule", &s.name),
                s.config.build(&ctx.with_path("schedule")).map_err(locate)?,
            )),
            None => None,
        };
        let mut engine = Engine::default();
        for a in &recipe.algorithms {
            let inner = a.config.build(&ctx.with_path(&a.path)).map_err(locate)?;
            engine.algorithms.push(Named {
                label: checkpoint::plugin_key(&a.path, &a.name),
                inner,
            });
        }
        for c in &recipe.callbacks {
            let inner = c.config.build(&ctx.with_path(&c.path)).map_err(locate)?;
            engine.callbacks.push(Named {
                label: checkpoint::plugin_key(&c.path, &c.name),
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
            pending_log: Default::default(),
            stop_reason: None,
            evaluating: false,
            resumed_from: resume.as_ref().map(|r| r.checkpoint.meta.timestamp.clone()),
            checkpoint_requests: Vec::new(),
            last_checkpoint: None,
            train_in_order: Some(Loader::in_order(
                splits.train.clone(),
                splits.info.clone(),
                l,
                None,
                recipe.seed,
            )?),
        };
        let mut t = Trainer {
            state,
            engine,
            optimizer_key: checkpoint::plugin_key("optimizer", &recipe.optimizer.name),
            schedule,
            train,
            eval,
            eval_every,
            recipe_given: given,
            scale_ratio: recipe.scale_ratio,
            interrupt: None,
            cleaned: Default::default(),
            fit_start: None,
            prior_seconds: 0.0,
        };
        t.event(Event::Init)?;
        t.event(Event::BeforeLoad)?;
        if let Some(r) = &resume {
            t.load(&r.checkpoint, r.force)?;
        }
        t.event(Event::AfterLoad)?;
        Ok(t)
    }
}
