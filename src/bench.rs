//! `recipe bench throughput`: training speed of one model on synthetic input, with the step split
//! into forward (with the loss), backward and optimizer, and the peak resident memory.

use recipe_engine::callback::Callback;
use recipe_engine::candle_core::{Device, Tensor};
use recipe_engine::data::{DataContext, Loader};
use recipe_engine::engine::Named;
use recipe_engine::error::{Error, Result};
use recipe_engine::kernels::{cross_entropy, Targets};
use recipe_engine::model::Model;
use recipe_engine::model::ModelConfig;
use recipe_engine::optim::Optimizer;
use recipe_engine::optim::OptimizerConfig;
use recipe_engine::plugin::BindContext;
use recipe_engine::precision::Precision;
use recipe_engine::recipe::{parse_spec, Spec};
use recipe_engine::recipe::{Recipe, RecipeSource};
use recipe_engine::registry::Kind;
use recipe_engine::serde_yaml::Value;
use recipe_engine::trainer::{parse_device, Trainer};
use recipe_engine::{Event, State};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What to measure.
#[derive(clap::Args, Debug, Clone)]
pub struct ThroughputArgs {
    /// The model block, as YAML: `small_cnn` or `{name: resnet_cifar, depth: 20}`.
    #[arg(long)]
    pub model: String,
    /// The optimizer block, as YAML.
    #[arg(long, default_value = "{name: sgd, lr: 0.1, momentum: 0.9}")]
    pub optimizer: String,
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// One input sample: CxHxW.
    #[arg(long, default_value = "3x32x32")]
    pub input: String,
    #[arg(long, default_value_t = 10)]
    pub classes: usize,
    /// Measured steps (after the warmup steps).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Also run the whole trainer (the --callbacks, a cosine schedule) against a bare loop over
    /// the same data loader, model and optimizer, in alternating rounds, and report what the
    /// engine costs per step (fastest round of each side).
    #[arg(long)]
    pub trainer: bool,
    /// Print the figures as one JSON object (the format of benches/reference/throughput.py).
    #[arg(long)]
    pub json: bool,
    /// The trainer's callbacks (with --trainer), comma-separated; `none` for none.
    #[arg(
        long,
        default_value = "progress_bar,json_logger,lr_monitor,speed_monitor"
    )]
    pub callbacks: String,
    /// The trainer's algorithms (with --trainer), as a YAML list: what they add to a step.
    #[arg(long, default_value = "[]")]
    pub algorithms: String,
    /// Alternating rounds of bare loop and trainer (with --trainer).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Where to train: `cpu`, `cuda` or `cuda:N` (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Data parallel in N local processes through `mpirun` (a build with `--features mpi`):
    /// --batch is the global batch, each rank trains on its share and the gradients are summed
    /// across ranks every step (timed apart as the all-reduce). One thread per rank unless
    /// RAYON_NUM_THREADS says otherwise.
    #[arg(long, value_name = "N")]
    pub nproc: Option<usize>,
    /// Every batch norm synchronised across the ranks (the recipe's `sync_batchnorm: true`).
    #[arg(long)]
    pub sync_batchnorm: bool,
    /// The recipe's `precision`: fp32, or amp_bf16 (convolutions in bf16 with f32 sums, on CPUs
    /// with AVX512-BF16).
    #[arg(long, default_value = "fp32")]
    pub precision: String,
}

/// Per-step averages of one measurement.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    pub images_per_sec: f64,
    /// Images per CPU-second of the process (user + system, every thread) over the measured
    /// steps: what other processes on a shared machine disturb far less than wall time.
    pub images_per_cpu_sec: Option<f64>,
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
    /// Summing the gradients across data-parallel ranks (0 for one process).
    pub allreduce_ms: f64,
    /// Data-parallel processes (1 for one).
    pub ranks: usize,
    pub peak_rss_mb: Option<f64>,
}

fn parse_input(s: &str) -> Result<[usize; 3]> {
    let v: Vec<usize> = s
        .split('x')
        .map(|p| p.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| {
            Error::msg(format!(
                "--input {s}: write channels x height x width, e.g. 3x32x32"
            ))
        })?;
    match v.as_slice() {
        [c, h, w] if *c > 0 && *h > 0 && *w > 0 => Ok([*c, *h, *w]),
        _ => Err(Error::msg(format!(
            "--input {s}: write channels x height x width, e.g. 3x32x32"
        ))),
    }
}

fn block(s: &str, what: &str) -> Result<Value> {
    recipe_engine::serde_yaml::from_str(s)
        .map_err(|e| Error::msg(format!("--{what} {s}: not a YAML block ({e})")))
}

/// A model, its optimizer and the optimizer's learning rate.
type Parts = (Box<dyn Model>, Box<dyn Optimizer>, f64);

/// Builds the model and the optimizer of a throughput measurement.
fn build_parts(a: &ThroughputArgs, shape: [usize; 3], dev: &Device) -> Result<Parts> {
    let model_spec: Spec<dyn ModelConfig> =
        parse_spec(Kind::Model, &block(&a.model, "model")?, "model")?;
    let opt_spec: Spec<dyn OptimizerConfig> = parse_spec(
        Kind::Optimizer,
        &block(&a.optimizer, "optimizer")?,
        "optimizer",
    )?;
    let ctx = BindContext::standalone(dev, shape, a.classes, a.batch);
    let mut model: Box<dyn Model> = model_spec.config.build(&ctx)?;
    if a.sync_batchnorm {
        let net = model.network_mut().ok_or_else(|| {
            Error::msg("--sync-batchnorm: this model is not a module tree of the zoo")
        })?;
        recipe_engine::dist::sync_batchnorm::convert(net)?;
    }
    let precision = Precision::parse(&a.precision)
        .map_err(|_| Error::msg(format!("--precision {}: fp32 or amp_bf16", a.precision)))?;
    if precision != Precision::Fp32 {
        precision
            .check(!dev.is_cpu())
            .map_err(|e| Error::msg(format!("--precision {}: {e}", a.precision)))?;
        let net = model
            .network_mut()
            .ok_or_else(|| Error::msg("--precision: this model is not a module tree of the zoo"))?;
        precision.convert(net)?;
    }
    let opt: Box<dyn Optimizer> = opt_spec
        .config
        .build(&ctx.with_path("optimizer"), model.params())?;
    Ok((model, opt, opt_spec.config.lr()))
}

pub fn throughput(a: &ThroughputArgs) -> Result<Throughput> {
    if a.batch == 0 || a.steps == 0 || a.classes == 0 {
        return Err(Error::msg(
            "--batch, --steps and --classes must be at least 1",
        ));
    }
    let shape = parse_input(&a.input)?;
    let dev = parse_device(&a.device)?;
    let (model, mut opt, lr) = build_parts(a, shape, &dev)?;
    let [c, h, w] = shape;
    let mut rng = recipe_engine::rng::stream(0, "bench");
    let pixels: Vec<f32> = (0..a.batch * c * h * w)
        .map(|_| rand::Rng::random_range(&mut rng, -1.0..1.0))
        .collect();
    let x = Tensor::from_vec(pixels, (a.batch, c, h, w), &dev)?;
    let labels: Vec<u32> = (0..a.batch).map(|i| (i % a.classes) as u32).collect();
    let mut y = Tensor::from_vec(labels, a.batch, &dev)?;
    // Data parallel: this rank's share of the global batch.
    let world = recipe_engine::dist::world();
    let share = recipe_engine::dist::shard_range(a.batch, world.rank(), world.size());
    if share.is_empty() {
        return Err(Error::msg(format!(
            "--batch {} leaves rank {} of {} without samples: use a batch of at least {}",
            a.batch,
            world.rank(),
            world.size(),
            world.size()
        )));
    }
    let x = x.narrow(0, share.start, share.len())?;
    y = y.narrow(0, share.start, share.len())?;
    let y = Targets::Hard(y);
    let (mut f, mut b, mut o, mut ar) = (0.0, 0.0, 0.0, 0.0);
    let mut cpu_start = None;
    for step in 0..a.warmup + a.steps {
        if step == a.warmup {
            cpu_start = recipe_engine::sysinfo::cpu_seconds();
        }
        let t0 = Instant::now();
        let loss = cross_entropy(&model.forward(&x, true)?, &y)?;
        loss.to_vec0::<f32>()?; // make sure the forward pass is done
        let t1 = Instant::now();
        let mut grads = loss.backward()?;
        dev.synchronize()?; // a GPU queues its kernels: wait for them before reading the clock
        let t2 = Instant::now();
        if world.size() > 1 {
            recipe_engine::dist::reduce_step(
                world.as_ref(),
                model.params(),
                Some(&mut grads),
                share.len() as f64,
                a.batch as f64,
            )?;
        }
        let t3 = Instant::now();
        opt.step(model.params(), &grads, lr)?;
        dev.synchronize()?;
        let t4 = Instant::now();
        if step >= a.warmup {
            f += (t1 - t0).as_secs_f64();
            b += (t2 - t1).as_secs_f64();
            ar += (t3 - t2).as_secs_f64();
            o += (t4 - t3).as_secs_f64();
        }
    }
    let n = a.steps as f64;
    let cpu = match (cpu_start, recipe_engine::sysinfo::cpu_seconds()) {
        (Some(s), Some(e)) if e > s => Some(e - s),
        _ => None,
    };
    // A job's figures: the ranks' mean time per phase (they wait for one another at every
    // all-reduce, so their steps take the same time) and the CPU time of all ranks together.
    let mut v = [f, b, ar, o, cpu.unwrap_or(f64::NAN)];
    if world.size() > 1 {
        world.sum_f64(&mut v)?;
        for x in &mut v[..4] {
            *x /= world.size() as f64;
        }
    }
    let [f, b, ar, o, cpu] = v;
    Ok(Throughput {
        images_per_sec: a.batch as f64 * n / (f + b + ar + o),
        images_per_cpu_sec: cpu
            .is_finite()
            .then(|| a.batch as f64 * n / cpu)
            .filter(|_| cpu > 0.0),
        forward_ms: 1e3 * f / n,
        backward_ms: 1e3 * b / n,
        optimizer_ms: 1e3 * o / n,
        allreduce_ms: 1e3 * ar / n,
        ranks: world.size(),
        peak_rss_mb: recipe_engine::sysinfo::peak_rss_mb(),
    })
}

/// Per-step wall time (start of one step to the start of the next, the last one to the end of
/// the run) of the bare loop and of the trainer, in alternating rounds.
#[derive(Debug, Clone)]
pub struct EngineOverhead {
    pub bare_ms: Vec<f64>,
    pub trainer_ms: Vec<f64>,
    pub callbacks: Vec<String>,
    /// Per round: each algorithm's own time in `apply`, in ms per step.
    pub apply_ms: Vec<std::collections::BTreeMap<String, f64>>,
}

impl EngineOverhead {
    /// The step time of each side's fastest round, and the trainer's extra share in percent. On
    /// a shared machine other work only adds time, and it comes in phases that can cover whole
    /// rounds of one side (rounds of 78 and 105 ms in one run here), which a mean carries into
    /// the difference; the fastest rounds compare the two sides as they run undisturbed.
    pub fn summary(&self) -> (f64, f64, f64) {
        let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
        let (b, t) = (best(&self.bare_ms), best(&self.trainer_ms));
        (b, t, 100.0 * (t - b) / b)
    }
}

/// The `--callbacks` list (by default those a `recipe run` has, progress bar and JSON logger, and
/// the two monitors the shipped recipes list).
fn trainer_callbacks(a: &ThroughputArgs) -> Vec<String> {
    a.callbacks
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty() && *c != "none")
        .map(String::from)
        .collect()
}

/// A recipe of `steps` steps over synthetic data of the benchmark's shape, with the default
/// callbacks and a cosine schedule.
fn bench_recipe(a: &ThroughputArgs, [c, h, w]: [usize; 3], steps: usize) -> Result<Recipe> {
    let text = format!(
        "name: bench-throughput\nseed: 0\nmax_duration: {steps}ba\n\
         data: {{name: synthetic, shape: [{c}, {h}, {w}], num_classes: {k}, train_size: {n}, \
         eval_size: 0, batch_size: {b}}}\nmodel: {model}\noptimizer: {opt}\n\
         schedule: {{name: cosine}}\ncallbacks: [{cbs}]\nalgorithms: {algs}\ndevice: {dev}\n",
        k = a.classes,
        n = a.batch * steps,
        b = a.batch,
        model = a.model,
        opt = a.optimizer,
        cbs = trainer_callbacks(a).join(", "),
        algs = a.algorithms,
        dev = a.device,
    );
    let src = RecipeSource::from_text(&text, &[]);
    Recipe::from_raw(src.raw()?, src, true)
}

/// Records the start of every step (BEFORE_DATALOADER) and the end of the run.
struct StepClock(Arc<Mutex<Vec<Instant>>>);

impl Callback for StepClock {
    fn run_event(&mut self, event: Event, _state: &mut State) -> Result<()> {
        if matches!(event, Event::BeforeDataloader | Event::FitEnd) {
            if let Ok(mut v) = self.0.lock() {
                v.push(Instant::now());
            }
        }
        Ok(())
    }
}

/// Mean of the step intervals after the first `warmup` steps.
fn steady_ms(marks: &[Instant], warmup: usize) -> f64 {
    let d: Vec<f64> = marks
        .windows(2)
        .skip(warmup)
        .map(|w| 1e3 * (w[1] - w[0]).as_secs_f64())
        .collect();
    d.iter().sum::<f64>() / d.len().max(1) as f64
}

fn bare_loop(a: &ThroughputArgs, recipe: &Recipe, shape: [usize; 3]) -> Result<f64> {
    let dev = parse_device(&a.device)?;
    let (model, mut opt, lr) = build_parts(a, shape, &dev)?;
    let splits = recipe.data.dataset.config.build(&DataContext {
        seed: recipe.seed,
        path: "data".into(),
    })?;
    let loader = Loader::new(
        splits.train,
        splits.info,
        &recipe.data.loader,
        true,
        recipe.seed,
    )?;
    let mut marks = Vec::new();
    for batch in loader.epoch(0, 0, &dev) {
        marks.push(Instant::now());
        let b = batch?;
        let loss = cross_entropy(&model.forward(&b.inputs, true)?, &b.targets)?;
        loss.to_vec0::<f32>()?;
        let grads = loss.backward()?;
        opt.step(model.params(), &grads, lr)?;
    }
    dev.synchronize()?;
    marks.push(Instant::now());
    Ok(steady_ms(&marks, a.warmup))
}

/// The trainer's steady step time, and each algorithm's own time in `apply` per step.
fn trainer_loop(
    a: &ThroughputArgs,
    recipe: &Recipe,
    dir: &std::path::Path,
) -> Result<(f64, std::collections::BTreeMap<String, f64>)> {
    let _ = std::fs::remove_dir_all(dir);
    let mut t = Trainer::new(recipe, dir)?;
    let marks = Arc::new(Mutex::new(Vec::new()));
    t.engine.callbacks.push(Named {
        label: "bench:step_clock".into(),
        inner: Box::new(StepClock(marks.clone())),
    });
    t.engine.apply_time = Some(Default::default());
    let summary = t.fit()?;
    let steps = summary.batches.max(1) as f64;
    let apply = t
        .engine
        .apply_time
        .take()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, d)| (k, 1e3 * d.as_secs_f64() / steps))
        .collect();
    let marks = marks
        .lock()
        .map_err(|_| Error::msg("step clock poisoned"))?;
    Ok((steady_ms(&marks, a.warmup), apply))
}

/// The trainer against a bare loop over the same loader, model and optimizer.
pub fn engine_overhead(a: &ThroughputArgs) -> Result<EngineOverhead> {
    let shape = parse_input(&a.input)?;
    let recipe = bench_recipe(a, shape, a.warmup + a.steps)?;
    let dir = std::env::temp_dir().join(format!("recipe-bench-{}", std::process::id()));
    let mut out = EngineOverhead {
        bare_ms: Vec::new(),
        trainer_ms: Vec::new(),
        callbacks: trainer_callbacks(a),
        apply_ms: Vec::new(),
    };
    let result = (|| -> Result<()> {
        for _ in 0..a.rounds.max(1) {
            out.bare_ms.push(bare_loop(a, &recipe, shape)?);
            let (ms, apply) = trainer_loop(a, &recipe, &dir)?;
            out.trainer_ms.push(ms);
            out.apply_ms.push(apply);
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result.map(|_| out)
}

#[cfg(test)]
mod tests {
    use super::EngineOverhead;

    /// A round of the bare loop caught in a slow phase of the machine does not make the engine
    /// look free, nor does one of the trainer's make it look costly: the fastest rounds compare.
    #[test]
    fn engine_overhead_compares_the_fastest_rounds() {
        let e = EngineOverhead {
            bare_ms: vec![80.0, 105.0, 80.5],
            trainer_ms: vec![104.0, 80.8, 81.0],
            callbacks: vec![],
            apply_ms: vec![],
        };
        let (bare, trainer, pct) = e.summary();
        assert_eq!((bare, trainer), (80.0, 80.8));
        assert!((pct - 1.0).abs() < 1e-9, "{pct}");
    }
}
