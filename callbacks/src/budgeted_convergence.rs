//! Budgeted convergence (Li, Yumer, Ramanan 2020, Figures 3 and D): measures the gradient of the
//! loss over the whole training set (or a fixed subset), its norm `convergence/full_grad_norm`,
//! the loss over the same samples `convergence/full_loss`, and the weight norm
//! `convergence/weight_norm`, at intervals and at the end. Budget-aware schedules drive the full
//! gradient norm toward zero at the end of the budget; a constant or truncated schedule does not.
//!
//! The measurement reads the training samples in order, without augmentation, with batch norm in
//! evaluation mode (running statistics), so it is a fixed function of the weights; it changes
//! nothing in training. It costs one forward and backward pass over the samples it reads:
//! `subset` bounds that (the same first samples every time).

use crate::optimizer_monitor::sq_sum;
use recipe_engine::callback::{Callback, CallbackConfig};
use recipe_engine::candle_core::{DType, Tensor};
use recipe_engine::error::{Error, Result};
use recipe_engine::kernels::{cross_entropy, Targets};
use recipe_engine::plugin::{BindContext, Policy, TimeParams, TimeVisitor};
use recipe_engine::{Event, State, Time};
use serde::{Deserialize, Serialize};

fn tenth_of_run() -> Time {
    Time::dur(0.1)
}
fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetedConvergenceConfig {
    /// Measure every this much of training (a phase of the run: scaled).
    #[serde(default = "tenth_of_run")]
    pub interval: Time,
    /// Read only the first this many training samples (default: all of the training split).
    #[serde(default)]
    pub subset: Option<usize>,
    /// Also measure at the start (before the first step) and at the end.
    #[serde(default = "yes")]
    pub at_ends: bool,
}

impl TimeParams for BudgetedConvergenceConfig {
    fn visit_times(&mut self, v: &mut dyn TimeVisitor) {
        v.visit("interval", &mut self.interval, Policy::Scaled);
    }
}

struct BudgetedConvergence {
    every: u64,
    subset: Option<usize>,
    at_ends: bool,
    last: Option<u64>,
}

impl CallbackConfig for BudgetedConvergenceConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Callback>> {
        if self.subset == Some(0) {
            return Err(Error::recipe(
                format!("{}.subset", ctx.path),
                "must be at least 1 sample (leave it out to read the whole training split)",
            ));
        }
        Ok(Box::new(BudgetedConvergence {
            every: ctx.interval("interval", &self.interval)?,
            subset: self.subset,
            at_ends: self.at_ends,
            last: None,
        }))
    }
}

/// (full gradient norm, mean loss, weight norm) over the first `limit` training samples.
pub fn measure(state: &State, limit: Option<usize>) -> Result<(f64, f64, f64)> {
    let loader = state.train_in_order.as_ref().ok_or_else(|| {
        Error::msg(
            "budgeted_convergence needs the training split, which this trainer does not expose",
        )
    })?;
    let params: Vec<_> = state.model.params().trainable().cloned().collect();
    let mut sums: Vec<Option<Tensor>> = vec![None; params.len()];
    let (mut loss_sum, mut seen) = (0.0, 0usize);
    for batch in loader.epoch(0, 0, &state.device) {
        let b = batch?;
        let mut n = b.len();
        let (inputs, labels) = match limit {
            Some(l) if seen + n > l => {
                n = l - seen;
                (b.inputs.narrow(0, 0, n)?, b.labels.narrow(0, 0, n)?)
            }
            _ => (b.inputs, b.labels),
        };
        if n == 0 {
            break;
        }
        let out = state.model.forward(&inputs, false)?;
        let loss = cross_entropy(&out, &Targets::Hard(labels))?;
        // Sum over samples (mean times n), so that batches of any size weigh by their samples.
        let total = (loss * n as f64)?;
        loss_sum += total.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let grads = total.backward()?;
        for (p, acc) in params.iter().zip(sums.iter_mut()) {
            if let Some(g) = grads.get(p.var.as_tensor()) {
                let g = g.detach();
                *acc = Some(match acc.take() {
                    Some(a) => (a + g)?,
                    None => g,
                });
            }
        }
        seen += n;
        if limit.is_some_and(|l| seen >= l) {
            break;
        }
    }
    let n = seen.max(1) as f64;
    let mut g2 = 0.0;
    for s in sums.iter().flatten() {
        g2 += sq_sum(s)?;
    }
    let mut w2 = 0.0;
    for p in &params {
        w2 += sq_sum(p.var.as_tensor())?;
    }
    Ok((g2.sqrt() / n, loss_sum / n, w2.sqrt()))
}

impl BudgetedConvergence {
    fn run(&mut self, state: &mut State) -> Result<()> {
        let b = state.timestamp.batch;
        if self.last == Some(b) {
            return Ok(());
        }
        self.last = Some(b);
        let (g, l, w) = measure(state, self.subset)?;
        state.log("convergence/full_grad_norm", g);
        state.log("convergence/full_loss", l);
        state.log("convergence/weight_norm", w);
        Ok(())
    }
}

impl Callback for BudgetedConvergence {
    /// The step of the last measurement, so a resumed run does not measure it twice.
    fn state_dict(&self) -> Result<recipe_engine::state_dict::StateDict> {
        Ok(recipe_engine::state_dict::StateDict::encode(&self.last))
    }

    fn load_state_dict(&mut self, state: &recipe_engine::state_dict::StateDict) -> Result<()> {
        self.last = state.decode("budgeted_convergence")?;
        Ok(())
    }

    fn run_event(&mut self, event: Event, state: &mut State) -> Result<()> {
        match event {
            Event::FitStart if self.at_ends && state.timestamp.batch == 0 => self.run(state),
            Event::BatchEnd if state.timestamp.batch.is_multiple_of(self.every) => self.run(state),
            Event::FitEnd if self.at_ends => self.run(state),
            _ => Ok(()),
        }
    }
}

recipe_engine::register_callback!(
    BudgetedConvergenceConfig,
    "budgeted_convergence",
    "Full training-set gradient norm, loss and weight norm at intervals (Li et al.'s budgeted convergence).",
    "interval: 0.1dur\nsubset: 10000"
);
