//! # SWA (stochastic weight averaging)
//!
//! **What.** Stochastic Weight Averaging (Izmailov et al. 2018, Composer's SWA): from `swa_start`
//! on, every `update_interval`, the trained weights are added to an equal-weight running average,
//! `avg += (w - avg) / (n + 1)` (the first update copies them); at `swa_end` the average replaces
//! the trained weights, and training goes on from it until the end of the run (Composer's
//! design: the remaining steps refresh the batch-norm statistics for the averaged weights).
//! With `update_interval` in `ba` an update comes at every n-th BATCH_END from the first one at
//! or after `swa_start`; in `ep`, at every n-th EPOCH_END. The average replaces the weights at the
//! first BATCH_END at or after `swa_end` (after that batch's update; with epoch updates, when that
//! batch ends an epoch, after the epoch's update at its EPOCH_END). A run that stops before
//! `swa_end` (an early stopper) ends with the average it has, at FIT_END.
//!
//! Parameters and buffers: as Composer (torch's `AveragedModel` with `use_buffers=False`), only
//! the trained parameters are averaged. Composer then loads the averaged copy's whole state,
//! whose batch-norm statistics are those of the model when averaging began; here the model keeps
//! its own running statistics (the most recent ones), which the steps after `swa_end` then adapt
//! to the averaged weights. With no steps after `swa_end` (`swa_end` at the end of the run), the
//! statistics are never refreshed for the average, which hurts a model with batch norm: the
//! recipe is accepted with a warning, as in Composer.
//!
//! With `schedule_swa_lr: true`, the LR is taken over from the first update to `swa_end` (torch's
//! SWALR): after k updates it is `lr0 + (swa_lr - lr0) * a(min(k / anneal_steps, 1))`, with `lr0`
//! the LR of the last step before the first update, `a(t) = t` (`linear`) or `(1 - cos(pi t)) / 2`
//! (`cos`), and `swa_lr` defaulting to `lr0` (a constant LR, the paper's SWA phase). It is set at
//! BATCH_START, over the recipe's schedule; after `swa_end` the schedule applies again.
//!
//! The average (on the model's device), the update counters and `lr0` are saved in checkpoints,
//! so a resumed run continues exactly.
//!
//! **When it helps.** Runs whose late iterates bounce around a wide basin: a high constant or
//! cyclic LR in the last part of training, then the average. Composer reports it on ResNets with
//! CIFAR and ImageNet; it pays least after a schedule that already decays to zero.
//!
//! **Hyperparameters.** Composer's defaults: `swa_start` (0.7dur), `swa_end` (0.97dur),
//! `update_interval` (1ep; `ba` or whole `ep`), `schedule_swa_lr` (false), `anneal_strategy`
//! (`linear` or `cos`), `anneal_steps` (10 updates), `swa_lr` (none: the LR at the first update).
//! `swa_start` and `swa_end` may be given in any unit (each is resolved to batches; Composer asks
//! for `dur` or `ep`, in the same unit). Scale policy: `swa_start` and `swa_end` mark a phase of
//! training and scale with ScaleSchedule, so the averaging window keeps its share of the run.
//! `update_interval` is a cadence, how often the average samples the weights, and is `fixed`, as
//! EMA's is: the window, and so what the equal-weight average covers in time, scales with the run
//! whatever the cadence, only the number of snapshots in it changes. `anneal_steps` counts
//! updates, so with a fixed cadence the SWA LR's anneal lasts `anneal_steps * update_interval`
//! whatever the scale; a recipe that wants the anneal (and the number of snapshots) to follow the
//! run writes `scale_policy: {update_interval: scaled}` with the interval in `ba`.
//!
//! **Expected effect.** Better generalisation than the last iterate at no extra forward or
//! backward pass, largest with a high LR during averaging; costs one copy of the trained weights
//! in memory and one multiply-add per weight per update.

use recipe_engine::algorithm::{Algorithm, AlgorithmConfig};
use recipe_engine::candle_core::Tensor;
use recipe_engine::error::{Error, Result};
use recipe_engine::plugin::{BindContext, Policy, TimeParams, TimeVisitor};
use recipe_engine::state_dict::StateDict;
use recipe_engine::time::TimeUnit;
use recipe_engine::{Event, State, Time};
use serde::{Deserialize, Serialize};

/// How the SWA LR goes from the LR at the first update to `swa_lr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Anneal {
    #[serde(rename = "linear", alias = "lin")]
    Linear,
    #[serde(rename = "cos", alias = "cosine")]
    Cos,
}

/// The pure core: the share of the way from the starting LR to `swa_lr` at progress `t` in [0, 1].
pub fn anneal_factor(strategy: Anneal, t: f64) -> f64 {
    let t = t.clamp(0.0, 1.0);
    match strategy {
        Anneal::Linear => t,
        Anneal::Cos => (1.0 - (std::f64::consts::PI * t).cos()) / 2.0,
    }
}

/// The SWA LR after `updates` updates (torch's SWALR, stepped once per update): from `lr0`
/// towards `swa_lr` over `anneal_steps` updates, then `swa_lr`.
pub fn swa_lr_after(
    lr0: f64,
    swa_lr: f64,
    updates: u64,
    anneal_steps: u64,
    strategy: Anneal,
) -> f64 {
    let t = updates as f64 / anneal_steps.max(1) as f64;
    let a = anneal_factor(strategy, t);
    swa_lr * a + lr0 * (1.0 - a)
}

/// One update of the equal-weight average of `n` snapshots with a new one: `avg + (w - avg) / (n + 1)`.
pub fn running_average(avg: &Tensor, w: &Tensor, n: u64) -> Result<Tensor> {
    Ok((avg + ((w - avg)? / (n + 1) as f64)?)?)
}

fn default_start() -> Time {
    Time::dur(0.7)
}
fn default_end() -> Time {
    Time::dur(0.97)
}
fn one_epoch() -> Time {
    Time::epochs(1.0)
}
fn linear() -> Anneal {
    Anneal::Linear
}
fn ten() -> u64 {
    10
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwaConfig {
    #[serde(default = "default_start")]
    pub swa_start: Time,
    #[serde(default = "default_end")]
    pub swa_end: Time,
    /// How often the average takes the weights: `ba` (batch ends) or whole `ep` (epoch ends).
    #[serde(default = "one_epoch")]
    pub update_interval: Time,
    #[serde(default)]
    pub schedule_swa_lr: bool,
    #[serde(default = "linear")]
    pub anneal_strategy: Anneal,
    /// Updates over which the SWA LR anneals.
    #[serde(default = "ten")]
    pub anneal_steps: u64,
    /// The LR annealed to; none: the LR at the first update.
    #[serde(default)]
    pub swa_lr: Option<f64>,
}

impl TimeParams for SwaConfig {
    fn visit_times(&mut self, v: &mut dyn TimeVisitor) {
        v.visit("swa_start", &mut self.swa_start, Policy::Scaled);
        v.visit("swa_end", &mut self.swa_end, Policy::Scaled);
        v.visit("update_interval", &mut self.update_interval, Policy::Fixed);
    }
}

/// Which event the average is updated at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cadence {
    Batch,
    Epoch,
}

/// Where averaging stands; what a checkpoint carries besides the average itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Progress {
    /// Update events (batch or epoch ends) seen since `swa_start`.
    events: u64,
    /// Snapshots in the average.
    updates: u64,
    /// The LR of the batch of the first update, where the SWA LR starts.
    lr0: Option<f64>,
    /// The LR of the last batch trained (seen at its BATCH_END): at an EPOCH_END after a resume
    /// `state.lr` already holds the next batch's.
    last_lr: Option<f64>,
    /// Whether the average has replaced the weights.
    completed: bool,
}

struct Swa {
    start: u64,
    end: u64,
    cadence: Cadence,
    /// Update every `every`-th update event.
    every: u64,
    batches_per_epoch: u64,
    schedule_lr: bool,
    strategy: Anneal,
    anneal_steps: u64,
    swa_lr: Option<f64>,
    p: Progress,
    /// The average, one tensor per trained parameter in the model's order.
    average: Option<Vec<Tensor>>,
}

/// The update event and how many of them between updates: `ba` counts batch ends, a whole
/// number of `ep` epoch ends.
fn cadence(t: &Time, ctx: &BindContext) -> Result<(Cadence, u64)> {
    let key = format!("{}.update_interval", ctx.path);
    match t.unit {
        TimeUnit::Batch => Ok((Cadence::Batch, ctx.interval("update_interval", t)?)),
        TimeUnit::Epoch if t.value >= 1.0 && t.value.fract() == 0.0 => {
            Ok((Cadence::Epoch, t.value as u64))
        }
        TimeUnit::Epoch => Err(Error::recipe_hint(
            key,
            format!("{t} is not a whole number of epochs: epoch updates come at epoch ends"),
            format!(
                "give a whole number of epochs, or batches ({}ba here)",
                recipe_engine::time::round_batches(t.value * ctx.clock.batches_per_epoch as f64)
            ),
        )),
        _ => Err(Error::recipe_hint(
            key,
            format!("{t}: SWA updates at batch ends or at epoch ends"),
            "give the interval in ba (every n batches) or ep (every n epochs), e.g. 1ep",
        )),
    }
}

impl AlgorithmConfig for SwaConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Algorithm>> {
        let key = |k: &str| format!("{}.{k}", ctx.path);
        let (cadence, every) = cadence(&self.update_interval, ctx)?;
        let start = ctx.batches("swa_start", &self.swa_start)?;
        let end = ctx.batches("swa_end", &self.swa_end)?;
        let max = ctx.max_batches();
        if start >= end {
            return Err(Error::recipe_hint(
                key("swa_end"),
                format!(
                    "swa_end {} (batch {end}) is not after swa_start {} (batch {start})",
                    self.swa_end, self.swa_start
                ),
                "averaging runs from swa_start to swa_end: give swa_end > swa_start, e.g. 0.7dur and 0.97dur",
            ));
        }
        if end > max {
            return Err(Error::recipe_hint(
                key("swa_end"),
                format!(
                    "swa_end {} (batch {end}) is after the end of the run (batch {max}): the average would never be used",
                    self.swa_end
                ),
                "give swa_end within the run, e.g. 0.97dur",
            ));
        }
        let bpe = ctx.clock.batches_per_epoch.max(1);
        if cadence == Cadence::Epoch && start.max(1).div_ceil(bpe) * bpe > end {
            return Err(Error::recipe_hint(
                key("update_interval"),
                format!(
                    "no epoch ends between swa_start (batch {start}) and swa_end (batch {end}), {bpe} batches per epoch: the average would hold nothing"
                ),
                "give update_interval in ba, or a wider window",
            ));
        }
        if self.anneal_steps == 0 {
            return Err(Error::recipe(
                key("anneal_steps"),
                "0 updates: the anneal needs at least 1",
            ));
        }
        if let Some(lr) = self.swa_lr {
            if !(lr.is_finite() && lr >= 0.0) {
                return Err(Error::recipe(
                    key("swa_lr"),
                    format!("{lr} is not a learning rate (a finite number >= 0)"),
                ));
            }
            if !self.schedule_swa_lr {
                tracing::warn!(
                    "{}: swa_lr is set but schedule_swa_lr is false, so it is not used",
                    ctx.path
                );
            }
        }
        // The average replaces the weights at swa_end (at its EPOCH_END when it ends an epoch
        // and updates come at epoch ends). With no step after it, batch-norm statistics are
        // never refreshed for the averaged weights (Composer warns too).
        if end >= max {
            tracing::warn!(
                "{}: swa_end {} is the end of the run (batch {max}): the averaged weights get no \
                 training step, so batch-norm statistics, if the model has any, are not refreshed \
                 for them, which can hurt accuracy; end SWA a few epochs earlier",
                ctx.path,
                self.swa_end
            );
        }
        Ok(Box::new(Swa {
            start,
            end,
            cadence,
            every,
            batches_per_epoch: bpe,
            schedule_lr: self.schedule_swa_lr,
            strategy: self.anneal_strategy,
            anneal_steps: self.anneal_steps,
            swa_lr: self.swa_lr,
            p: Progress::default(),
            average: None,
        }))
    }
}

/// A copy of the trained parameters (the optimizer updates them in place).
fn trained(state: &State) -> Result<Vec<Tensor>> {
    let mut out = Vec::new();
    for p in state.model.params().trainable() {
        out.push(p.var.as_tensor().detach().copy()?);
    }
    Ok(out)
}

fn check_len(avg: &[Tensor], state: &State) -> Result<()> {
    let n = state.model.params().trainable().count();
    if avg.len() != n {
        return Err(Error::msg(format!(
            "the SWA average holds {} tensors but the model has {n} trained parameters (a checkpoint of another model?)",
            avg.len()
        )));
    }
    Ok(())
}

impl Swa {
    /// An update event (batch or epoch end) at or after `swa_start`.
    fn tick(&mut self, state: &State) -> Result<()> {
        if self.p.events.is_multiple_of(self.every) {
            let w = trained(state)?;
            match &mut self.average {
                None => {
                    self.average = Some(w);
                    self.p.lr0 = Some(self.p.last_lr.unwrap_or(state.lr));
                }
                Some(avg) => {
                    check_len(avg, state)?;
                    for (a, x) in avg.iter_mut().zip(&w) {
                        *a = running_average(a, x, self.p.updates)?;
                    }
                }
            }
            self.p.updates += 1;
        }
        self.p.events += 1;
        Ok(())
    }

    /// The average replaces the trained parameters; the buffers stay the model's.
    fn finish(&mut self, state: &mut State) -> Result<()> {
        self.p.completed = true;
        let Some(avg) = self.average.take() else {
            return Ok(());
        };
        check_len(&avg, state)?;
        for (p, a) in state.model.params().trainable().zip(&avg) {
            p.var.set(a)?;
        }
        let batch = state.timestamp.batch;
        tracing::info!(
            "swa: the average of {} snapshots replaces the weights at batch {batch}",
            self.p.updates
        );
        state.log("swa/updates", self.p.updates as f64);
        Ok(())
    }

    fn ends_epoch(&self, state: &State) -> bool {
        state.timestamp.batch_in_epoch >= self.batches_per_epoch
    }
}

impl Algorithm for Swa {
    fn matches(&self, event: Event, state: &State) -> bool {
        if self.p.completed {
            return false;
        }
        let started = state.timestamp.batch >= self.start;
        match event {
            Event::BatchStart => self.schedule_lr && self.p.updates > 0,
            Event::BatchEnd => started,
            Event::EpochEnd => started && self.cadence == Cadence::Epoch,
            Event::FitEnd => self.average.is_some(),
            _ => false,
        }
    }

    fn apply(&mut self, event: Event, state: &mut State) -> Result<()> {
        let at_end = state.timestamp.batch >= self.end;
        match event {
            Event::BatchStart => {
                if let Some(lr0) = self.p.lr0 {
                    let target = self.swa_lr.unwrap_or(lr0);
                    state.lr = swa_lr_after(
                        lr0,
                        target,
                        self.p.updates,
                        self.anneal_steps,
                        self.strategy,
                    );
                }
            }
            Event::BatchEnd => {
                self.p.last_lr = Some(state.lr);
                if self.cadence == Cadence::Batch {
                    self.tick(state)?;
                }
                // With epoch updates, a batch that ends an epoch leaves the swap to EPOCH_END,
                // after the epoch's update.
                let epoch_update_pending = self.cadence == Cadence::Epoch && self.ends_epoch(state);
                if at_end && !epoch_update_pending {
                    self.finish(state)?;
                }
            }
            Event::EpochEnd => {
                self.tick(state)?;
                if at_end {
                    self.finish(state)?;
                }
            }
            Event::FitEnd => self.finish(state)?,
            _ => {}
        }
        Ok(())
    }

    fn state_dict(&self) -> Result<StateDict> {
        let mut sd = StateDict::encode(&self.p);
        for (i, t) in self.average.iter().flatten().enumerate() {
            sd.tensors.insert(format!("average.{i}"), t.clone());
        }
        Ok(sd)
    }

    fn load_state_dict(&mut self, state: &StateDict) -> Result<()> {
        self.p = state.decode("swa")?;
        let mut avg = Vec::new();
        while let Some(t) = state.tensors.get(&format!("average.{}", avg.len())) {
            avg.push(t.clone());
        }
        let expected = self.p.updates > 0 && !self.p.completed;
        if expected && avg.is_empty() {
            return Err(Error::msg(
                "the checkpoint's swa state has no averaged weights",
            ));
        }
        self.average = expected.then_some(avg);
        Ok(())
    }
}

recipe_engine::register_algorithm!(
    SwaConfig,
    "swa",
    "Stochastic weight averaging: an equal-weight average of the weights from swa_start replaces them at swa_end.",
    "swa_start: 0.7dur\nswa_end: 0.97dur\nupdate_interval: 1ep\nschedule_swa_lr: false\nanneal_strategy: linear\nanneal_steps: 10\nswa_lr: null"
);

#[cfg(test)]
mod tests {
    use super::*;
    use recipe_engine::candle_core::Device;
    use recipe_engine::model::ModelConfig;
    use recipe_engine::model::ParamKind;
    use recipe_engine::time::Clock;

    fn ctx(bpe: u64, max: u64) -> BindContext {
        let mut c =
            BindContext::standalone(&Device::Cpu, [1, 4, 4], 2, 1).with_path("algorithms[0]");
        c.clock = Clock {
            batches_per_epoch: bpe,
            samples_per_batch: 1,
            tokens_per_sample: None,
            max_batches: Some(max),
        };
        c
    }

    fn build(yaml: &str, bpe: u64, max: u64) -> Result<Box<dyn Algorithm>> {
        let cfg: SwaConfig = serde_yaml::from_str(yaml).unwrap();
        cfg.build(&ctx(bpe, max))
    }

    /// A small CNN (with batch-norm buffers) on the CPU.
    fn state(bpe: u64, max: u64) -> State {
        let ctx = ctx(bpe, max);
        let model = recipe_engine::models::SmallCnnConfig { channels: vec![2] }
            .build(&ctx)
            .unwrap();
        let sgd: recipe_engine::optim::SgdConfig = serde_yaml::from_str("{}").unwrap();
        let optimizer =
            recipe_engine::optim::OptimizerConfig::build(&sgd, &ctx, model.params()).unwrap();
        let mut s = State::new("t", 0, Device::Cpu, ctx.clock, model, optimizer, 0.1);
        s.run_dir = std::env::temp_dir();
        s
    }

    fn fire(a: &mut Box<dyn Algorithm>, e: Event, s: &mut State) {
        if a.matches(e, s) {
            a.apply(e, s).unwrap();
        }
    }

    /// Every trained parameter set to `v`, every buffer to `-v`.
    fn set_all(s: &State, v: f32) {
        for p in s.model.params().iter() {
            let x = if p.kind == ParamKind::Buffer { -v } else { v };
            let t = Tensor::full(x, p.var.shape(), &Device::Cpu).unwrap();
            p.var.set(&t).unwrap();
        }
    }

    /// (distinct trained values, distinct buffer values) of the model.
    fn values(s: &State) -> (Vec<f32>, Vec<f32>) {
        let (mut w, mut b) = (Vec::new(), Vec::new());
        for p in s.model.params().iter() {
            let v = p
                .var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let out = if p.kind == ParamKind::Buffer {
                &mut b
            } else {
                &mut w
            };
            out.extend(v);
        }
        for v in [&mut w, &mut b] {
            v.sort_by(f32::total_cmp);
            v.dedup();
        }
        (w, b)
    }

    /// Batches `from..to` as the trainer runs them: the schedule's LR `1 - batch / 100`, then
    /// BATCH_START; the step leaves every trained weight at `batch + 1` (buffers at its
    /// negative); BATCH_END, and EPOCH_END at the end of an epoch. Gives, per batch, the LR the
    /// step used and the trained values after its events.
    fn run(a: &mut Box<dyn Algorithm>, s: &mut State, from: u64, to: u64) -> Vec<(f64, Vec<f32>)> {
        let mut out = Vec::new();
        for k in from..to {
            let lr = train_batch(a, s, k);
            if s.timestamp.batch_in_epoch >= s.clock.batches_per_epoch {
                epoch_end(a, s);
            }
            out.push((lr, values(s).0));
        }
        out
    }

    /// Batch `k` up to its BATCH_END; the LR it trained with.
    fn train_batch(a: &mut Box<dyn Algorithm>, s: &mut State, k: u64) -> f64 {
        s.lr = 1.0 - k as f64 / 100.0;
        fire(a, Event::BatchStart, s);
        let lr = s.lr;
        set_all(s, (k + 1) as f32);
        s.timestamp.next_batch(1, 0);
        fire(a, Event::BatchEnd, s);
        lr
    }

    fn epoch_end(a: &mut Box<dyn Algorithm>, s: &mut State) {
        fire(a, Event::EpochEnd, s);
        s.timestamp.next_epoch();
    }

    #[test]
    fn the_average_is_an_equal_weight_running_mean() {
        let dev = Device::Cpu;
        let mut avg = Tensor::new(&[1.0f32, -2.0], &dev).unwrap();
        for (n, w) in [(1u64, [2.0f32, 0.0]), (2, [3.0, 2.0]), (3, [6.0, 8.0])] {
            let w = Tensor::new(&w, &dev).unwrap();
            avg = running_average(&avg, &w, n).unwrap();
        }
        // (1 + 2 + 3 + 6) / 4 and (-2 + 0 + 2 + 8) / 4.
        assert_eq!(avg.to_vec1::<f32>().unwrap(), vec![3.0, 2.0]);
    }

    #[test]
    fn batch_updates_average_every_nth_batch_from_the_start_and_the_average_replaces_the_weights_at_the_end(
    ) {
        let mut s = state(4, 12);
        let mut a = build(
            "{swa_start: 4ba, swa_end: 10ba, update_interval: 2ba}",
            4,
            12,
        )
        .unwrap();
        let rec = run(&mut a, &mut s, 0, 10);
        // Updates after batches 4, 6, 8 and 10: (4 + 6 + 8 + 10) / 4 = 7, in place of 10.
        assert_eq!(rec[9].1, vec![7.0]);
        assert_eq!(rec[8].1, vec![9.0]);
        // The buffers stay the model's own (the running statistics of the last step).
        assert_eq!(values(&s).1, vec![-10.0]);
        assert_eq!(s.pending_log.get("swa/updates"), Some(&4.0));
        // Done: nothing more matches, training goes on from the average.
        let rec = run(&mut a, &mut s, 10, 12);
        assert_eq!(rec[1].1, vec![12.0]);
        assert!(!a.matches(Event::FitEnd, &s));
        // Without schedule_swa_lr the schedule's LR is left alone.
        assert!(rec
            .iter()
            .enumerate()
            .all(|(i, r)| r.0 == 1.0 - (10 + i) as f64 / 100.0));
    }

    #[test]
    fn epoch_updates_come_at_epoch_ends_and_an_end_on_an_epoch_end_takes_its_update() {
        // Epoch ends at 4, 8, 12, 16; swa_start 3ba: updates at 4, 8, 12.
        for (end, want) in [("12ba", 8.0), ("14ba", 8.0), ("10ba", 6.0)] {
            let mut s = state(4, 16);
            let yaml = format!("{{swa_start: 3ba, swa_end: {end}, update_interval: 1ep}}");
            let mut a = build(&yaml, 4, 16).unwrap();
            let end: usize = end.trim_end_matches("ba").parse().unwrap();
            let rec = run(&mut a, &mut s, 0, end as u64);
            assert_eq!(rec[end - 1].1, vec![want], "swa_end {end}");
        }
        // Every second epoch end from the first one after swa_start: 4 and 12.
        let mut s = state(4, 16);
        let mut a = build(
            "{swa_start: 1ba, swa_end: 15ba, update_interval: 2ep}",
            4,
            16,
        )
        .unwrap();
        assert_eq!(run(&mut a, &mut s, 0, 15)[14].1, vec![8.0]);
    }

    #[test]
    fn the_swa_lr_anneals_from_the_lr_at_the_first_update() {
        let lin = |k| swa_lr_after(1.0, 0.1, k, 10, Anneal::Linear);
        assert!((lin(0) - 1.0).abs() < 1e-12);
        assert!((lin(1) - 0.91).abs() < 1e-12);
        assert!((lin(5) - 0.55).abs() < 1e-12);
        assert!((lin(10) - 0.1).abs() < 1e-12 && (lin(30) - 0.1).abs() < 1e-12);
        let cos = |k| swa_lr_after(1.0, 0.1, k, 10, Anneal::Cos);
        assert!((cos(5) - 0.55).abs() < 1e-12);
        let a2 = (1.0 - (0.2 * std::f64::consts::PI).cos()) / 2.0;
        assert!((cos(2) - (1.0 - 0.9 * a2)).abs() < 1e-12);
        assert!((cos(10) - 0.1).abs() < 1e-12);

        // Through the events: the first update comes after batch 2, trained at LR 0.99.
        let mut s = state(4, 12);
        let yaml = "{swa_start: 2ba, swa_end: 8ba, update_interval: 1ba, schedule_swa_lr: true, swa_lr: 0.1, anneal_steps: 2}";
        let mut a = build(yaml, 4, 12).unwrap();
        let lrs: Vec<f64> = run(&mut a, &mut s, 0, 10).iter().map(|r| r.0).collect();
        let want = [1.0, 0.99, 0.545, 0.1, 0.1, 0.1, 0.1, 0.1, 0.92, 0.91];
        for (i, (l, w)) in lrs.iter().zip(want).enumerate() {
            assert!((l - w).abs() < 1e-12, "batch {i}: {l} != {w} ({lrs:?})");
        }
        // Without swa_lr: constant at the LR of the first update.
        let mut s = state(4, 12);
        let mut a = build("{swa_start: 2ba, swa_end: 8ba, update_interval: 1ba, schedule_swa_lr: true, anneal_strategy: cos}", 4, 12).unwrap();
        let lrs: Vec<f64> = run(&mut a, &mut s, 0, 8).iter().map(|r| r.0).collect();
        assert!(lrs[2..].iter().all(|l| (l - 0.99).abs() < 1e-12), "{lrs:?}");
    }

    #[test]
    fn a_run_resumed_from_its_state_dict_continues_exactly() {
        let yaml = "{swa_start: 2ba, swa_end: 10ba, update_interval: 1ba, schedule_swa_lr: true, swa_lr: 0.2, anneal_steps: 3}";
        let mut s = state(4, 12);
        let mut a = build(yaml, 4, 12).unwrap();
        let whole = run(&mut a, &mut s, 0, 12);
        for cut in [1, 2, 5, 10, 11] {
            let mut s = state(4, 12);
            let mut a = build(yaml, 4, 12).unwrap();
            run(&mut a, &mut s, 0, cut);
            let sd = a.state_dict().unwrap();
            let mut b = build(yaml, 4, 12).unwrap();
            b.load_state_dict(&sd).unwrap();
            let rest = run(&mut b, &mut s, cut, 12);
            assert_eq!(rest, whole[cut as usize..], "resumed after batch {cut}");
        }
    }

    #[test]
    fn a_resume_from_the_last_batch_of_an_epoch_owes_the_epoch_update_its_lr() {
        // A checkpoint at batch 4 comes before EPOCH_END; the resumed trainer runs that EPOCH_END
        // with the next batch's LR in `state.lr`: the SWA LR must still start from batch 4's.
        let yaml = "{swa_start: 2ba, swa_end: 10ba, update_interval: 1ep, schedule_swa_lr: true, swa_lr: 0.2, anneal_steps: 2}";
        let mut s = state(4, 12);
        let mut a = build(yaml, 4, 12).unwrap();
        let whole = run(&mut a, &mut s, 0, 12);
        let mut s = state(4, 12);
        let mut a = build(yaml, 4, 12).unwrap();
        run(&mut a, &mut s, 0, 3);
        train_batch(&mut a, &mut s, 3);
        let sd = a.state_dict().unwrap();
        let mut b = build(yaml, 4, 12).unwrap();
        b.load_state_dict(&sd).unwrap();
        s.lr = 1.0 - 4.0 / 100.0;
        epoch_end(&mut b, &mut s);
        assert_eq!(run(&mut b, &mut s, 4, 12), whole[4..]);
        // The SWA LR after the first update (at the end of batch 4, trained at 0.97).
        assert!((whole[4].0 - (0.97 + (0.2 - 0.97) * 0.5)).abs() < 1e-12);
    }

    #[test]
    fn an_early_stop_before_swa_end_ends_with_the_average() {
        let mut s = state(4, 12);
        let mut a = build(
            "{swa_start: 2ba, swa_end: 10ba, update_interval: 1ba}",
            4,
            12,
        )
        .unwrap();
        run(&mut a, &mut s, 0, 5);
        fire(&mut a, Event::FitEnd, &mut s);
        // (2 + 3 + 4 + 5) / 4.
        assert_eq!(values(&s).0, vec![3.5]);
    }

    #[test]
    fn bad_hyperparameters_are_refused_with_their_key() {
        for (yaml, key, says) in [
            (
                "{swa_start: 0.8dur, swa_end: 0.7dur}",
                "swa_end",
                "not after swa_start",
            ),
            (
                "{swa_start: 6ba, swa_end: 6ba}",
                "swa_end",
                "not after swa_start",
            ),
            (
                "{swa_start: 2ep, swa_end: 4ep}",
                "swa_end",
                "after the end of the run",
            ),
            (
                "{update_interval: 1.5ep}",
                "update_interval",
                "whole number of epochs",
            ),
            ("{update_interval: 0ba}", "update_interval", "positive"),
            (
                "{update_interval: 0.1dur}",
                "update_interval",
                "batch ends or at epoch ends",
            ),
            (
                "{swa_start: 5ba, swa_end: 7ba}",
                "update_interval",
                "no epoch ends",
            ),
            ("{anneal_steps: 0}", "anneal_steps", "at least 1"),
            (
                "{schedule_swa_lr: true, swa_lr: -0.1}",
                "swa_lr",
                "not a learning rate",
            ),
        ] {
            let e = build(yaml, 4, 12)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                e.contains(&format!("algorithms[0].{key}")) && e.contains(says),
                "{yaml}: {e}"
            );
        }
        // Composer's defaults, in a unit Composer refuses for swa_start/swa_end, and at the end.
        assert!(build("{}", 4, 12).is_ok());
        assert!(build(
            "{swa_start: 2sp, swa_end: 1dur, update_interval: 3ba}",
            4,
            12
        )
        .is_ok());
        let e = serde_yaml::from_str::<SwaConfig>("anneal_strategy: cosine_annealing")
            .unwrap_err()
            .to_string();
        assert!(e.contains("linear") && e.contains("cos"), "{e}");
    }
}
