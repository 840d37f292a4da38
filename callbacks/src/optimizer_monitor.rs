//! Logs L2 norms of the gradients and the weights: global (`l2_norm/grad/global`,
//! `l2_norm/param/global`) and, with `per_layer: true`, per tensor (`l2_norm/grad/<name>`,
//! `l2_norm/param/<name>`); and the global norm of each slot of the optimizer's state
//! (`l2_norm/optimizer/momentum_buffer`, `l2_norm/optimizer/exp_avg`, ...). They are measured at
//! AFTER_TRAIN_BATCH, before the optimizer step (the whole batch's gradient, summed over
//! microbatches, after any clipping by an algorithm; the weights it was computed at; the
//! optimizer state the step will update), and logged at BATCH_END with the step's other metrics.

use recipe_engine::callback::{Callback, CallbackConfig};
use recipe_engine::candle_core::{DType, Tensor};
use recipe_engine::error::Result;
use recipe_engine::plugin::{BindContext, Policy, TimeParams, TimeVisitor};
use recipe_engine::{Event, State, Time};
use serde::{Deserialize, Serialize};

fn one_batch() -> Time {
    Time::batches(1.0)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerMonitorConfig {
    /// Log every this often (fixed under ScaleSchedule).
    #[serde(default = "one_batch")]
    pub interval: Time,
    /// Also log each tensor's norms.
    #[serde(default)]
    pub per_layer: bool,
}

impl TimeParams for OptimizerMonitorConfig {
    fn visit_times(&mut self, v: &mut dyn TimeVisitor) {
        v.visit("interval", &mut self.interval, Policy::Fixed);
    }
}

struct OptimizerMonitor {
    every: u64,
    per_layer: bool,
    pending: Vec<(String, f64)>,
}

impl CallbackConfig for OptimizerMonitorConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Callback>> {
        Ok(Box::new(OptimizerMonitor {
            every: ctx.interval("interval", &self.interval)?,
            per_layer: self.per_layer,
            pending: Vec::new(),
        }))
    }
}

/// The sum of squares of a tensor, accumulated in f64.
pub fn sq_sum(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f64>()?)
}

impl Callback for OptimizerMonitor {
    fn run_event(&mut self, event: Event, state: &mut State) -> Result<()> {
        if event == Event::BatchEnd {
            for (k, v) in self.pending.drain(..) {
                state.log(k, v);
            }
            return Ok(());
        }
        // AFTER_TRAIN_BATCH: the whole batch's gradient (summed over microbatches), before the
        // optimizer step.
        if event != Event::AfterTrainBatch || !state.timestamp.batch.is_multiple_of(self.every) {
            return Ok(());
        }
        let Some(grads) = &state.grads else {
            return Ok(());
        };
        let (mut g_total, mut w_total) = (0.0, 0.0);
        let mut per_layer = Vec::new();
        for p in state.model.params().trainable() {
            let w = sq_sum(p.var.as_tensor())?;
            w_total += w;
            let g = match grads.get(p.var.as_tensor()) {
                Some(g) => sq_sum(g)?,
                None => continue,
            };
            g_total += g;
            if self.per_layer {
                per_layer.push((p.name.clone(), g.sqrt(), w.sqrt()));
            }
        }
        let mut slots: std::collections::BTreeMap<String, f64> = Default::default();
        for (name, t) in &state.optimizer.state_dict()?.tensors {
            let slot = name.split('.').next().unwrap_or(name).to_string();
            *slots.entry(slot).or_default() += sq_sum(t)?;
        }
        for (slot, v) in slots {
            self.pending
                .push((format!("l2_norm/optimizer/{slot}"), v.sqrt()));
        }
        self.pending
            .push(("l2_norm/grad/global".into(), g_total.sqrt()));
        self.pending
            .push(("l2_norm/param/global".into(), w_total.sqrt()));
        for (n, g, w) in per_layer {
            self.pending.push((format!("l2_norm/grad/{n}"), g));
            self.pending.push((format!("l2_norm/param/{n}"), w));
        }
        Ok(())
    }
}

recipe_engine::register_callback!(
    OptimizerMonitorConfig,
    "optimizer_monitor",
    "Logs global (and per-layer) L2 norms of gradients and weights.",
    "interval: 1ba\nper_layer: false"
);
