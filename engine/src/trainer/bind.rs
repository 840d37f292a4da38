//! Binding a prepared recipe, in two steps so that nothing on disk changes before every check has
//! passed. `Trainer::bind` reads the data, resolves the clock, builds the model, optimizer,
//! schedule, algorithms and callbacks against it and checks a checkpoint to resume from, all in
//! memory. `Bound::start` then takes the run folder: locks it, refuses one that holds another run,
//! writes recipe.yaml, sets aside checkpoints from after a resume point, and fires INIT,
//! BEFORE_LOAD and AFTER_LOAD (a resumed run loads its checkpoint between the last two).
//! `validate` runs the same checks without the data, for `recipe show`.

use super::{Resume, Trainer};
use crate::checkpoint;
use crate::data::{synthetic_splits, DataContext, Loader};
use crate::engine::{Engine, Named};
use crate::error::{Error, Result};
use crate::event::Event;
use crate::model::Surgery;
use crate::model::{Model, ParamBuilder};
use crate::optim::Optimizer;
use crate::plugin::BindContext;
use crate::recipe::Recipe;
use crate::run_dir::{self, RunLock};
use crate::schedule::Schedule;
use crate::state::State;
use candle_core::Device;
use serde_yaml::Value;
use std::path::Path;

fn device_error(m: String) -> Error {
    Error::recipe_hint(
        "device",
        m,
        "use cpu, cuda or cuda:N (CUDA needs a binary built with `--features cuda`)",
    )
}

/// The recipe's `device` read without opening it: `None` for the CPU, `Some(i)` for CUDA
/// device i. Plain `cuda` is the process's own GPU: device 0 alone, the device of its local
/// rank in a data-parallel job (rank r on a node takes GPU r, as torchrun and Composer do), so
/// that `mpirun -n 8` on an 8-GPU node puts one rank on each.
fn device_index(s: &str) -> Result<Option<usize>> {
    match s {
        "cpu" => Ok(None),
        "cuda" => Ok(Some(crate::dist::local_rank().unwrap_or(0))),
        s if s.starts_with("cuda:") => s[5..]
            .parse()
            .map(Some)
            .map_err(|_| device_error(format!("`{s}` has no device number"))),
        s => Err(device_error(format!("unknown device `{s}`"))),
    }
}

/// Parses and opens the recipe's `device`.
pub fn parse_device(s: &str) -> Result<Device> {
    match device_index(s)? {
        None => Ok(Device::Cpu),
        Some(i) => Device::new_cuda(i)
            .map_err(|e| device_error(format!("cannot open CUDA device {i}: {e}"))),
    }
}

/// Every plugin of a recipe, built against one context.
struct Plugins {
    model: Box<dyn Model>,
    optimizer: Box<dyn Optimizer>,
    schedule: Option<(String, Box<dyn Schedule>)>,
    engine: Engine,
    eval_every: u64,
}

/// Builds the model, optimizer, schedule, algorithms and callbacks of `recipe` against `ctx`;
/// each plugin checks its own settings as it is built. Errors are located in the recipe.
fn build_plugins(recipe: &Recipe, ctx: &BindContext) -> Result<Plugins> {
    let locate = |e: Error| recipe.source.locate(e);
    let mut model = recipe
        .model
        .config
        .build(&ctx.with_path("model"))
        .map_err(locate)?;
    let mut engine = Engine::default();
    for a in &recipe.algorithms {
        let inner = a.config.build(&ctx.with_path(&a.path)).map_err(locate)?;
        engine.algorithms.push(Named {
            label: checkpoint::plugin_key(&a.path, &a.name),
            inner,
        });
    }
    // The surgery point: each algorithm, in recipe order, may rewrite the model before the
    // optimizer collects its parameters. New modules draw from a stream of their own.
    for (a, named) in recipe.algorithms.iter().zip(&mut engine.algorithms) {
        let mut s = Surgery {
            model: model.as_mut(),
            params: ParamBuilder::stream(
                ctx.seed,
                &format!("surgery/{}", named.label),
                &ctx.device,
            ),
            by: named.label.clone(),
        };
        named.inner.surgery(&mut s).map_err(|e| match e {
            Error::Recipe { .. } => locate(e),
            e => locate(Error::recipe(&a.path, e.to_string())),
        })?;
    }
    if recipe.sync_batchnorm {
        let net = model.network_mut().ok_or_else(|| {
            locate(Error::recipe_hint(
                "sync_batchnorm",
                "this model is not a module tree, so its batch norms cannot be synchronised",
                "use a model of the zoo (`recipe list` shows them) or leave sync_batchnorm out",
            ))
        })?;
        crate::dist::sync_batchnorm::convert(net).map_err(locate)?;
    }
    if recipe.precision != crate::precision::Precision::Fp32 {
        recipe
            .precision
            .check(!ctx.device.is_cpu())
            .map_err(locate)?;
        let net = model.network_mut().ok_or_else(|| {
            locate(Error::recipe_hint(
                "precision",
                "this model is not a module tree, so its convolutions cannot change precision",
                "use a model of the zoo (`recipe list` shows them) or precision: fp32",
            ))
        })?;
        recipe.precision.convert(net).map_err(locate)?;
    }
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
    for c in &recipe.callbacks {
        let inner = c.config.build(&ctx.with_path(&c.path)).map_err(locate)?;
        engine.callbacks.push(Named {
            label: checkpoint::plugin_key(&c.path, &c.name),
            inner,
        });
    }
    let eval_every = ctx
        .batches("eval_interval", &recipe.eval_interval)
        .map_err(locate)?;
    if eval_every == 0 {
        return Err(locate(Error::recipe_hint(
            "eval_interval",
            "must be positive",
            "evaluate every so often, e.g. `eval_interval: 1ep`; the end of training is always evaluated",
        )));
    }
    Ok(Plugins {
        model,
        optimizer,
        schedule,
        engine,
        eval_every,
    })
}

/// Checks everything about a recipe that binding checks, without reading its data or opening a
/// device: the data block, the device's name, the clock from the dataset's declared size, and
/// every plugin built against it. `recipe show` runs it, so what `show` accepts `run` accepts
/// too (but for the data files themselves). Returns what the model is once every algorithm's
/// surgery has run.
pub fn validate(recipe: &Recipe) -> Result<ModelSummary> {
    let locate = |e: Error| recipe.source.locate(e);
    let info = recipe.checked_data_info().map_err(locate)?;
    let cuda = device_index(&recipe.device).map_err(locate)?.is_some();
    recipe.precision.check(cuda).map_err(locate)?;
    let clock = recipe.clock().map_err(locate)?;
    let ctx = BindContext {
        clock,
        device: Device::Cpu,
        seed: recipe.seed,
        input_shape: info.shape,
        num_classes: info.num_classes,
        path: String::new(),
    };
    let p = build_plugins(recipe, &ctx)?;
    Ok(ModelSummary {
        trainable: p.model.params().num_trainable(),
        rewrites: p
            .model
            .network()
            .map_or_else(Vec::new, |n| n.rewrites().to_vec()),
    })
}

/// A bound model in brief, for `recipe show`.
#[derive(Debug, Clone)]
pub struct ModelSummary {
    /// Trained scalars, after surgery.
    pub trainable: usize,
    /// What each algorithm's surgery did, in recipe order.
    pub rewrites: Vec<String>,
}

/// Checks that a recipe's global batch splits between `size` data-parallel processes: the batch
/// into equal shares, each share into whole microbatches, and no rank left without samples in
/// an epoch's last batch.
fn check_world(recipe: &Recipe, train_len: usize, size: usize) -> Result<()> {
    let l = &recipe.data.loader;
    let b = l.batch_size;
    if !b.is_multiple_of(size) {
        return Err(Error::recipe_hint(
            "data.batch_size",
            format!("a batch of {b} does not split evenly between {size} processes"),
            format!(
                "data.batch_size is the global batch (all processes together): use a multiple of {size}, e.g. {}",
                b.div_ceil(size) * size
            ),
        ));
    }
    let share = b / size;
    if let Some(m) = recipe.microbatch_size {
        if !share.is_multiple_of(m) {
            return Err(Error::recipe_hint(
                "device_train_microbatch_size",
                format!(
                    "each of the {size} processes trains on {share} samples of a batch of {b}, which microbatches of {m} do not divide"
                ),
                format!("use a divisor of {share}"),
            ));
        }
    }
    let last = train_len % b;
    if recipe.sync_batchnorm && !l.drop_last && !last.is_multiple_of(size) {
        // Synchronised batch norm pairs every rank's forward passes: unequal shares would also
        // weigh the ranks' statistics gradients unequally.
        return Err(Error::recipe_hint(
            "sync_batchnorm",
            format!(
                "an epoch's last batch has {last} samples, which do not split evenly between {size} processes"
            ),
            "set data.drop_last: true, or a train_subset whose last batch is a multiple of the process count",
        ));
    }
    if !l.drop_last && last != 0 && last < size {
        return Err(Error::recipe_hint(
            "data.drop_last",
            format!(
                "an epoch's last batch has {last} samples, fewer than the {size} processes: some would train on none"
            ),
            "set data.drop_last: true, or a train_subset that leaves no such batch",
        ));
    }
    Ok(())
}

/// A recipe bound in memory, ready to start in a run folder: nothing is written until
/// [`Bound::start`].
pub struct Bound {
    trainer: Trainer,
    resume: Option<Resume>,
    /// The recipe as run (overrides and scale included), for the run folder's recipe.yaml.
    raw: Value,
}

impl Trainer {
    /// Binds a prepared recipe in memory (see the module doc); with `resume`, also checks that
    /// the checkpoint belongs to this recipe, scale ratio and clock (unless forced) and fits its
    /// model and plugins. Nothing on disk changes.
    pub fn bind(recipe: &Recipe, resume: Option<Resume>) -> Result<Bound> {
        let given = recipe.source.raw()?;
        if let Some(r) = &resume {
            // A quick check before any data is read; the clock is compared once it is known.
            r.check(&given, recipe.scale_ratio, &r.saved_clock())?;
        }
        let locate = |e: Error| recipe.source.locate(e);
        let l = &recipe.data.loader;
        l.validate().map_err(locate)?;
        let device = parse_device(&recipe.device).map_err(locate)?;
        let data_ctx = DataContext {
            seed: recipe.seed,
            path: "data".into(),
        };
        let splits = if l.synthetic {
            let info = recipe.checked_data_info().map_err(locate)?;
            synthetic_splits(&info, recipe.seed)
        } else {
            recipe
                .data
                .dataset
                .config
                .build(&data_ctx)
                .map_err(locate)?
        };
        if let (Some(r), Some(classes)) = (&resume, &splits.classes) {
            r.check_classes(classes)?;
        }
        let mut train = Loader::new(
            splits.train.clone(),
            splits.info.clone(),
            l,
            true,
            recipe.seed,
        )
        .map_err(locate)?;
        let mut eval = match &splits.eval {
            Some(e) => Some(
                Loader::new(e.clone(), splits.info.clone(), l, false, recipe.seed)
                    .map_err(locate)?,
            ),
            None => None,
        };
        let clock = recipe
            .clock_for(train.len())
            .map_err(|e| recipe.source.locate(e))?;
        if let Some(r) = &resume {
            r.check(&given, recipe.scale_ratio, &clock)?;
        }
        // Data parallel: the recipe's batch is the global batch; each rank makes its share.
        let dist = crate::dist::world();
        let (rank, size) = (dist.rank(), dist.size());
        if size > 1 {
            check_world(recipe, train.len(), size).map_err(locate)?;
            train.shard(rank, size);
            if let Some(e) = eval.as_mut() {
                e.shard(rank, size);
            }
        }
        if let Some(r) = &resume {
            r.check_world_size(size)?;
        }
        let ctx = BindContext {
            clock,
            device: device.clone(),
            seed: recipe.seed,
            input_shape: train.info().shape,
            num_classes: splits.info.num_classes,
            path: String::new(),
        };
        let Plugins {
            model,
            optimizer,
            schedule,
            engine,
            eval_every,
        } = build_plugins(recipe, &ctx)?;
        for a in &engine.algorithms {
            if let Some(f) = a.inner.batch_size_hook() {
                train.set_size_for_batch(f);
            }
            if let Some(f) = a.inner.sample_augment() {
                train.add_sample_augment(f);
            }
        }
        let base_lr = recipe.optimizer.config.lr();
        let mut state = State::new(
            recipe.name.clone(),
            recipe.seed,
            device,
            clock,
            model,
            optimizer,
            base_lr,
        );
        state.resumed_from = resume.as_ref().map(|r| r.checkpoint.meta.timestamp.clone());
        state.rank = rank;
        state.world_size = size;
        state.train_in_order = Some(Loader::in_order(
            splits.train.clone(),
            splits.info.clone(),
            l,
            None,
            recipe.seed,
        )?);
        let trainer = Trainer {
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
            eval_seconds: 0.0,
            microbatch: recipe.microbatch_size,
            eval_top5: splits.info.num_classes >= 5,
            lock: None,
            classes: splits.classes.clone(),
            dist,
            job_signal: 0,
        };
        if let Some(r) = &resume {
            trainer.check_restorable(&r.checkpoint, r.force)?;
        }
        Ok(Bound {
            trainer,
            resume,
            raw: recipe.raw.clone(),
        })
    }
}

impl Bound {
    /// Starts the run in `run_dir` (created if needed): locks the folder for this process
    /// (refused, with the holder's pid, while another process trains in it), refuses a folder
    /// that holds another run unless this is its resume or `overwrite` (which removes that run's
    /// files), writes recipe.yaml, sets aside checkpoints from after a resume point, and fires
    /// INIT, BEFORE_LOAD and AFTER_LOAD, loading the checkpoint between the last two.
    pub fn start(self, run_dir: &Path, overwrite: bool) -> Result<Trainer> {
        let Bound {
            mut trainer,
            resume,
            raw,
        } = self;
        // In a data-parallel job rank 0 owns the run folder; the other ranks only read the
        // checkpoint they resume from (already read, in `bind`).
        if trainer.state.writes_files() {
            let lock = RunLock::acquire(run_dir)?;
            if resume.is_none() {
                run_dir::claim_for_new_run(run_dir, overwrite)?;
            }
            run_dir::write_recipe(&raw, run_dir, resume.as_ref().map(Resume::batch))?;
            if let Some(classes) = &trainer.classes {
                run_dir::write_classes(classes, run_dir)?;
            }
            if let Some(r) = &resume {
                checkpoint::set_aside_after(run_dir, r.batch());
            }
            trainer.lock = Some(lock);
        }
        trainer.state.run_dir = run_dir.to_path_buf();
        trainer.event(Event::Init)?;
        trainer.event(Event::BeforeLoad)?;
        if let Some(r) = &resume {
            trainer.load(&r.checkpoint, r.force)?;
        }
        trainer.event(Event::AfterLoad)?;
        Ok(trainer)
    }
}
