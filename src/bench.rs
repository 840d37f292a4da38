//! `recipe bench throughput`: training speed of one model on synthetic input, with the step split
//! into forward (with the loss), backward and optimizer, and the peak resident memory.

use recipe_engine::candle_core::{Device, Tensor};
use recipe_engine::error::{Error, Result};
use recipe_engine::model::Model;
use recipe_engine::ops::{cross_entropy, Targets};
use recipe_engine::optim::Optimizer;
use recipe_engine::plugin::{BindContext, Kind, ModelConfig, OptimizerConfig};
use recipe_engine::recipe::{parse_spec, Spec};
use recipe_engine::serde_yaml::Value;
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
}

/// Per-step averages of one measurement.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    pub images_per_sec: f64,
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
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

pub fn throughput(a: &ThroughputArgs) -> Result<Throughput> {
    if a.batch == 0 || a.steps == 0 || a.classes == 0 {
        return Err(Error::msg(
            "--batch, --steps and --classes must be at least 1",
        ));
    }
    let shape = parse_input(&a.input)?;
    let model_spec: Spec<dyn ModelConfig> =
        parse_spec(Kind::Model, &block(&a.model, "model")?, "model")?;
    let opt_spec: Spec<dyn OptimizerConfig> = parse_spec(
        Kind::Optimizer,
        &block(&a.optimizer, "optimizer")?,
        "optimizer",
    )?;
    let ctx = BindContext::standalone(&Device::Cpu, shape, a.classes, a.batch);
    let model: Box<dyn Model> = model_spec.config.build(&ctx)?;
    let mut opt: Box<dyn Optimizer> = opt_spec
        .config
        .build(&ctx.with_path("optimizer"), model.params())?;
    let lr = opt_spec.config.lr();
    let [c, h, w] = shape;
    let mut rng = recipe_engine::rng::stream(0, "bench");
    let pixels: Vec<f32> = (0..a.batch * c * h * w)
        .map(|_| rand::Rng::random_range(&mut rng, -1.0..1.0))
        .collect();
    let x = Tensor::from_vec(pixels, (a.batch, c, h, w), &Device::Cpu)?;
    let labels: Vec<u32> = (0..a.batch).map(|i| (i % a.classes) as u32).collect();
    let y = Targets::Hard(Tensor::from_vec(labels, a.batch, &Device::Cpu)?);
    let (mut f, mut b, mut o) = (0.0, 0.0, 0.0);
    for step in 0..a.warmup + a.steps {
        let t0 = Instant::now();
        let loss = cross_entropy(&model.forward(&x, true)?, &y)?;
        loss.to_vec0::<f32>()?; // make sure the forward pass is done
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        opt.step(model.params(), &grads, lr)?;
        let t3 = Instant::now();
        if step >= a.warmup {
            f += (t1 - t0).as_secs_f64();
            b += (t2 - t1).as_secs_f64();
            o += (t3 - t2).as_secs_f64();
        }
    }
    let n = a.steps as f64;
    Ok(Throughput {
        images_per_sec: a.batch as f64 * n / (f + b + o),
        forward_ms: 1e3 * f / n,
        backward_ms: 1e3 * b / n,
        optimizer_ms: 1e3 * o / n,
        peak_rss_mb: recipe_engine::sysinfo::peak_rss_mb(),
    })
}
