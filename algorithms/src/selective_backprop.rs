//! # Selective backprop
//!
//! **What.** Trains each step on the samples with the highest losses (Jiang et al. 2019, Composer's
//! SelectiveBackprop): at AFTER_DATALOADER, a forward pass without gradients scores every sample
//! of the batch by its loss; `keep` of them are drawn without replacement with probability
//! proportional to `percentile ^ (1/keep - 1)` of their loss rank, and the step trains on those
//! only. It runs between `start` and `end` of the run, and skips every `interrupt`-th batch
//! (Composer's defaults and definition; the scoring pass uses the model in training mode, as
//! Composer's does, so batch-norm statistics see it too).
//!
//! **When it helps.** Datasets where many samples are learned early: the backward pass, about
//! two thirds of a step, is spent on the samples that still teach something.
//!
//! **Hyperparameters.** `start` (0.5dur), `end` (0.9dur), `keep` (0.5), `interrupt` (2: every
//! second batch trains on the whole batch; 0 never interrupts). `start` and `end` are times of the
//! run and scale with ScaleSchedule. Composer's `scale_factor` (scoring on down-sampled images)
//! is not offered.
//!
//! **Expected effect.** Steps that select cost one forward on the whole batch plus a step on
//! `keep` of it: faster per step for models whose backward dominates, at a small accuracy cost
//! for the same number of steps. The scoring pass runs on the whole batch at once, so with
//! microbatches it needs a whole batch's forward memory. Logged: `selective_backprop/kept`.

use candle_core::{DType, Tensor};
use rand::seq::index::sample_weighted;
use recipe_engine::algorithm::{Algorithm, AlgorithmConfig};
use recipe_engine::error::{Error, Result};
use recipe_engine::kernels::Targets;
use recipe_engine::plugin::{BindContext, Policy, TimeParams, TimeVisitor};
use recipe_engine::rng::Streams;
use recipe_engine::{Event, State, Time};
use serde::{Deserialize, Serialize};

fn default_start() -> Time {
    Time::dur(0.5)
}
fn default_end() -> Time {
    Time::dur(0.9)
}
fn half() -> f64 {
    0.5
}
fn two() -> u64 {
    2
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectiveBackpropConfig {
    #[serde(default = "default_start")]
    pub start: Time,
    #[serde(default = "default_end")]
    pub end: Time,
    #[serde(default = "half")]
    pub keep: f64,
    #[serde(default = "two")]
    pub interrupt: u64,
}

impl TimeParams for SelectiveBackpropConfig {
    fn visit_times(&mut self, v: &mut dyn TimeVisitor) {
        v.visit("start", &mut self.start, Policy::Scaled);
        v.visit("end", &mut self.end, Policy::Scaled);
    }
}

/// Per-sample cross entropy of `logits` [N, K] against class indices.
pub fn per_sample_loss(logits: &Tensor, labels: &[u32]) -> Result<Vec<f64>> {
    let rows = logits.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    rows.iter()
        .zip(labels)
        .map(|(r, &y)| {
            let m = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + r.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            r.get(y as usize)
                .map(|v| lse - v)
                .ok_or_else(|| Error::msg(format!("label {y} is out of range")))
        })
        .collect()
}

/// Composer's `select_using_loss`: the indices of `keep * N` samples drawn without replacement,
/// sample of loss rank r (0 the lowest) with weight `((r + 0.5) / N) ^ (1/keep - 1)`.
pub fn select(losses: &[f64], keep: f64, rng: &mut impl rand::Rng) -> Result<Vec<usize>> {
    let n = losses.len();
    let n_select = ((keep * n as f64) as usize).max(1).min(n);
    let mut by_loss: Vec<usize> = (0..n).collect();
    by_loss.sort_by(|&a, &b| losses[a].total_cmp(&losses[b]));
    let power = 1.0 / keep - 1.0;
    let chosen = sample_weighted(
        rng,
        n,
        |r| ((r as f64 + 0.5) / n as f64).powf(power),
        n_select,
    )
    .map_err(|e| Error::msg(format!("selective backprop: {e}")))?;
    Ok(chosen.into_iter().map(|r| by_loss[r]).collect())
}

struct SelectiveBackprop {
    start: u64,
    end: u64,
    keep: f64,
    interrupt: u64,
    rng: Streams,
}

impl AlgorithmConfig for SelectiveBackpropConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Algorithm>> {
        if !(self.keep > 0.0 && self.keep <= 1.0) {
            return Err(Error::recipe(
                format!("{}.keep", ctx.path),
                format!("{} is not a fraction in (0, 1]", self.keep),
            ));
        }
        let (start, end) = (
            ctx.batches("start", &self.start)?,
            ctx.batches("end", &self.end)?,
        );
        if end < start {
            return Err(Error::recipe(
                format!("{}.end", ctx.path),
                "comes before `start`",
            ));
        }
        Ok(Box::new(SelectiveBackprop {
            start,
            end,
            keep: self.keep,
            interrupt: self.interrupt,
            rng: ctx.rng(),
        }))
    }
}

impl SelectiveBackprop {
    /// Composer's `should_selective_backprop` for batch `b`.
    fn due(&self, b: u64) -> bool {
        (self.start..self.end).contains(&b)
            && (self.interrupt == 0 || !(b + 1).is_multiple_of(self.interrupt))
    }
}

impl Algorithm for SelectiveBackprop {
    fn matches(&self, event: Event, state: &State) -> bool {
        event == Event::AfterDataloader && !state.evaluating && self.due(state.timestamp.batch)
    }

    fn apply(&mut self, _event: Event, state: &mut State) -> Result<()> {
        let Some(batch) = state.batch.as_ref() else {
            return Ok(());
        };
        let logits = state.model.forward(&batch.inputs, true)?.detach();
        let labels = batch.labels.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        let losses = per_sample_loss(&logits, &labels)?;
        let chosen = select(&losses, self.keep, &mut self.rng.at(state.timestamp.batch))?;
        let idx: Vec<u32> = chosen.iter().map(|&i| i as u32).collect();
        let idx = Tensor::new(idx.as_slice(), batch.inputs.device())?;
        let pick = |t: &Tensor| -> Result<Tensor> { Ok(t.index_select(&idx, 0)?) };
        let subset = recipe_engine::data::Batch {
            inputs: pick(&batch.inputs)?,
            targets: match &batch.targets {
                Targets::Hard(t) => Targets::Hard(pick(t)?),
                Targets::Soft(t) => Targets::Soft(pick(t)?),
            },
            labels: pick(&batch.labels)?,
        };
        state.log("selective_backprop/kept", chosen.len() as f64);
        state.batch = Some(subset);
        Ok(())
    }
}

recipe_engine::register_algorithm!(
    SelectiveBackpropConfig,
    "selective_backprop",
    "Trains each step on the higher-loss share of the batch, scored by a forward pass without gradients.",
    "start: 0.5dur\nend: 0.9dur\nkeep: 0.5\ninterrupt: 2"
);

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn per_sample_losses_are_cross_entropies() {
        let logits = Tensor::new(&[[0f32, 0.0], [2.0, 0.0]], &Device::Cpu).unwrap();
        let l = per_sample_loss(&logits, &[0, 1]).unwrap();
        assert!((l[0] - 2f64.ln()).abs() < 1e-9);
        assert!((l[1] - (2.0 + (1.0 + (-2f64).exp()).ln())).abs() < 1e-9);
    }

    #[test]
    fn selection_keeps_a_share_and_prefers_high_losses() {
        let losses: Vec<f64> = (0..100).map(|i| i as f64).collect();
        let mut rng = recipe_engine::rng::stream(0, "t");
        let mut mean = 0.0;
        for _ in 0..200 {
            let s = select(&losses, 0.25, &mut rng).unwrap();
            assert_eq!(s.len(), 25);
            let mut u = s.clone();
            u.sort();
            u.dedup();
            assert_eq!(u.len(), 25, "drawn without replacement");
            mean += s.iter().map(|&i| losses[i]).sum::<f64>() / 25.0 / 200.0;
        }
        // Weight r^3 on ranks: the kept losses average far above the batch's 49.5.
        assert!(mean > 70.0, "{mean}");
        assert_eq!(select(&losses, 1.0, &mut rng).unwrap().len(), 100);
    }
}
