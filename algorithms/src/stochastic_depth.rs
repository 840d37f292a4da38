//! # StochasticDepth
//!
//! **What.** Randomly skipped residual branches (Huang et al. 2016, Composer's StochasticDepth):
//! module surgery at bind time wraps every residual block of the kind `target_layer_name`
//! (`Bottleneck`, `BasicBlock`, or `residual` for both; Composer's `ResNetBottleneck` is read as
//! `Bottleneck`). Block `i` of `N` gets the drop probability `p_i = (i+1)/N drop_rate` (`linear`)
//! or `drop_rate` (`uniform`).
//! - `block` mode: in training the whole branch is dropped with probability `p_i` (the block
//!   returns `relu(shortcut(x))`), one draw per block and batch, keyed by (seed, batch, block).
//! - `sample` mode: each sample's branch is zeroed with probability `p_i`, keyed by (seed, batch,
//!   block, pass).
//! - In evaluation the branch is scaled by its keep probability `1 - p_i`.
//!
//! With `drop_warmup`, the probabilities grow linearly from 0 over that time.
//!
//! **When it helps.** Deep ResNets: training steps are cheaper (a dropped block skips its
//! forward and backward passes) and the implicit ensemble regularises; a shallow network mostly
//! loses capacity.
//!
//! **Hyperparameters.** Composer's defaults: `target_layer_name` (`residual`; Composer requires
//! one), `stochastic_method` (`block`), `drop_rate` (0.2), `drop_distribution` (`linear`),
//! `drop_warmup` (0.0dur, a time of the run: scales with ScaleSchedule). Unlike Composer, the
//! warmup also applies to `sample` mode.
//!
//! **Expected effect.** Composer reports, on ImageNet ResNet-50, a few percent faster steps in
//! block mode at equal accuracy for long budgets, and a loss of accuracy for short ones.

use rand::Rng;
use recipe_engine::algorithm::{Algorithm, AlgorithmConfig};
use recipe_engine::candle_core::Tensor;
use recipe_engine::error::{Error, Result};
use recipe_engine::event::Event;
use recipe_engine::model::Param;
use recipe_engine::model::{downcast, downcast_box, Module, Surgery};
use recipe_engine::models::{Block, Branch};
use recipe_engine::plugin::{BindContext, Policy, TimeParams, TimeVisitor};
use recipe_engine::rng::Streams;
use recipe_engine::{State, Time};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    Block,
    Sample,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Distribution {
    Linear,
    Uniform,
}

/// The drop probability of block `i` of `n`.
pub fn drop_probability(dist: Distribution, drop_rate: f64, i: usize, n: usize) -> f64 {
    match dist {
        Distribution::Linear => (i + 1) as f64 / n.max(1) as f64 * drop_rate,
        Distribution::Uniform => drop_rate,
    }
}

/// What the wrapped blocks read at each forward pass: set by the algorithm at BEFORE_DATALOADER,
/// so that forward passes before BATCH_START (SelectiveBackprop's scoring pass at
/// AFTER_DATALOADER) already see the batch they belong to.
#[derive(Debug, Default)]
struct Control {
    batch: u64,
    /// The warmup's share of the drop probabilities, in [0, 1].
    warm: f64,
    /// Forward passes in training since BEFORE_DATALOADER (microbatches, a second SAM pass).
    passes: Vec<u64>,
}

/// A residual block whose branch is dropped at random in training.
pub struct StochasticBlock {
    block: Block,
    index: usize,
    p: f64,
    method: Method,
    control: Arc<Mutex<Control>>,
    rng: Streams,
}

impl Module for StochasticBlock {
    fn kind(&self) -> &'static str {
        "StochasticBlock"
    }
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (batch, warm, pass) = {
            let mut c = self
                .control
                .lock()
                .map_err(|_| Error::msg("stochastic depth's control was poisoned"))?;
            if c.passes.len() <= self.index {
                c.passes.resize(self.index + 1, 0);
            }
            let pass = c.passes[self.index];
            if train {
                c.passes[self.index] += 1;
            }
            (c.batch, c.warm, pass)
        };
        let p = self.p * warm;
        if !train {
            return self.block.forward_branch(x, false, Branch::Scaled(1.0 - p));
        }
        match self.method {
            Method::Block => {
                let mut r = self.rng.at(batch.wrapping_mul(1 << 16) + self.index as u64);
                if r.random::<f64>() < p {
                    self.block.forward_branch(x, true, Branch::Dropped)
                } else {
                    self.block.forward_branch(x, true, Branch::Full)
                }
            }
            Method::Sample => {
                let n = x.dim(0)?;
                let mut r = self
                    .rng
                    .at(
                        (batch.wrapping_mul(1 << 16) + self.index as u64).wrapping_mul(1 << 8)
                            + pass,
                    );
                let keep = 1.0 - p;
                let mask: Vec<f32> = (0..n)
                    .map(|_| (keep + r.random::<f64>()).floor() as f32)
                    .collect();
                let mask = Tensor::from_vec(mask, (n, 1, 1, 1), x.device())?.to_dtype(x.dtype())?;
                self.block.forward_branch(x, true, Branch::Masked(&mask))
            }
        }
    }
    fn describe(&self) -> String {
        format!(
            "StochasticBlock({}, drop_rate={:.4}, method={:?})",
            self.block.kind(),
            self.p,
            self.method
        )
    }
    fn own_params(&self) -> Vec<Param> {
        Vec::new()
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        // Transparent: the block's layers keep their paths (`layer1.0.conv1`).
        self.block.children()
    }
    fn children_mut(&mut self) -> Vec<(String, &mut Box<dyn Module>)> {
        self.block.children_mut()
    }
}

fn default_target() -> String {
    "residual".into()
}
fn default_rate() -> f64 {
    0.2
}
fn zero() -> Time {
    Time::dur(0.0)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StochasticDepthConfig {
    #[serde(default = "default_target")]
    pub target_layer_name: String,
    #[serde(default = "method_block")]
    pub stochastic_method: Method,
    #[serde(default = "default_rate")]
    pub drop_rate: f64,
    #[serde(default = "linear")]
    pub drop_distribution: Distribution,
    #[serde(default = "zero")]
    pub drop_warmup: Time,
}

fn method_block() -> Method {
    Method::Block
}
fn linear() -> Distribution {
    Distribution::Linear
}

impl TimeParams for StochasticDepthConfig {
    fn visit_times(&mut self, v: &mut dyn TimeVisitor) {
        v.visit("drop_warmup", &mut self.drop_warmup, Policy::Scaled);
    }
}

struct StochasticDepth {
    cfg: StochasticDepthConfig,
    kinds: Vec<&'static str>,
    warmup: u64,
    control: Arc<Mutex<Control>>,
    rng: Streams,
    path: String,
}

impl AlgorithmConfig for StochasticDepthConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Algorithm>> {
        let kinds = match self.target_layer_name.as_str() {
            "residual" => vec!["BasicBlock", "Bottleneck"],
            "Bottleneck" | "ResNetBottleneck" => vec!["Bottleneck"],
            "BasicBlock" => vec!["BasicBlock"],
            other => {
                return Err(Error::recipe_hint(
                    format!("{}.target_layer_name", ctx.path),
                    format!("`{other}` is not a residual block kind"),
                    "use Bottleneck (ResNet-50), BasicBlock (ResNet-18/34, the CIFAR ResNets) or residual (both)",
                ))
            }
        };
        if !(0.0..=1.0).contains(&self.drop_rate) {
            return Err(Error::recipe(
                format!("{}.drop_rate", ctx.path),
                format!("{} is not a probability in [0, 1]", self.drop_rate),
            ));
        }
        Ok(Box::new(StochasticDepth {
            cfg: self.clone(),
            kinds,
            warmup: ctx.batches("drop_warmup", &self.drop_warmup)?,
            control: Arc::new(Mutex::new(Control {
                warm: 1.0,
                ..Default::default()
            })),
            rng: ctx.rng(),
            path: ctx.path.clone(),
        }))
    }
}

impl Algorithm for StochasticDepth {
    fn matches(&self, event: Event, _state: &State) -> bool {
        event == Event::BeforeDataloader
    }
    fn apply(&mut self, _event: Event, state: &mut State) -> Result<()> {
        let mut c = self
            .control
            .lock()
            .map_err(|_| Error::msg("stochastic depth's control was poisoned"))?;
        c.batch = state.timestamp.batch;
        c.warm = if self.warmup == 0 {
            1.0
        } else {
            (state.timestamp.batch as f64 / self.warmup as f64).min(1.0)
        };
        c.passes.iter_mut().for_each(|p| *p = 0);
        Ok(())
    }
    fn surgery(&mut self, s: &mut Surgery) -> Result<()> {
        let by = s.by().to_string();
        let net = s.network()?;
        let kinds = self.kinds.clone();
        let is_target =
            |m: &dyn Module| downcast::<Block>(m).is_some_and(|b| kinds.contains(&b.kind()));
        let n = net
            .modules()
            .into_iter()
            .filter(|(_, m)| is_target(*m))
            .count();
        if n == 0 {
            return Err(Error::recipe_hint(
                format!("{}.target_layer_name", self.path),
                format!("the model has no {} block", self.kinds.join(" or ")),
                "stochastic depth drops residual blocks: use a ResNet (resnet, resnet_cifar, small_resnet)",
            ));
        }
        let mut i = 0;
        let cfg = self.cfg.clone();
        let (control, rng) = (self.control.clone(), self.rng.clone());
        net.replace(
            &by,
            |_, m| is_target(m),
            |_, m| {
                let block = downcast_box::<Block>(m).map_err(|_| {
                    Error::msg("stochastic_depth selected a module that is not a residual block")
                })?;
                let p = drop_probability(cfg.drop_distribution, cfg.drop_rate, i, n);
                let wrapped = StochasticBlock {
                    block: *block,
                    index: i,
                    p,
                    method: cfg.stochastic_method,
                    control: control.clone(),
                    rng: rng.clone(),
                };
                i += 1;
                Ok(Box::new(wrapped))
            },
        )?;
        Ok(())
    }
}

recipe_engine::register_algorithm!(
    StochasticDepthConfig,
    "stochastic_depth",
    "Drops residual branches at random in training (block or sample mode), scaled by the keep rate in evaluation (module surgery).",
    "target_layer_name: residual\nstochastic_method: block\ndrop_rate: 0.2\ndrop_distribution: linear\ndrop_warmup: 0.0dur"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_distribution_reaches_the_drop_rate_at_the_last_block() {
        let p: Vec<f64> = (0..4)
            .map(|i| drop_probability(Distribution::Linear, 0.2, i, 4))
            .collect();
        assert_eq!(p, vec![0.05, 0.1, 0.15000000000000002, 0.2]);
        assert_eq!(drop_probability(Distribution::Uniform, 0.2, 0, 4), 0.2);
    }
}
