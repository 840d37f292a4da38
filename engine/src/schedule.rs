//! Learning-rate schedules: stateless multipliers a(t) on the base LR, a function of the batch
//! count only (so resuming is exact and ScaleSchedule's contract a_s(t) = a(t/s) holds when every
//! time parameter is scaled).
//!
//! Composer's names and defaults. Every schedule takes an optional linear warmup `t_warmup`: the
//! multiplier ramps from 0 at batch 0 to its post-warmup value at `t_warmup`. Decaying schedules
//! (linear, cosine, polynomial, REX) decay over [t_warmup, t_max]; step-like schedules (step,
//! multistep, exponential, constant) read absolute time.

use crate::error::{Error, Result};
use crate::plugin::{
    visit_list, visit_opt, BindContext, PluginConfig, Policy, TimeParams, TimeVisitor,
};
use crate::time::Time;
use serde::{Deserialize, Serialize};

/// An LR multiplier as a function of the step (batch count, from 0).
pub trait Schedule {
    fn multiplier(&self, batch: u64) -> f64;
    /// Sees the metrics the trainer logs (`eval/loss`, `eval/accuracy`, `train/loss`, ...) at
    /// `batch`, before the callbacks run; metric-driven schedules (reduce_on_plateau) use it.
    fn observe(&mut self, _metrics: &std::collections::BTreeMap<String, f64>, _batch: u64) {}
    /// State to carry across a checkpoint; the built-in schedules are stateless.
    fn state_dict(&self) -> Result<crate::state_dict::StateDict> {
        Ok(Default::default())
    }
    fn load_state_dict(&mut self, _state: &crate::state_dict::StateDict) -> Result<()> {
        Ok(())
    }
}

/// How a recipe block builds the runtime object.
pub trait ScheduleConfig: PluginConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Schedule>>;
}

/// The shape of a schedule after warmup, with its times resolved into batches.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    Constant {
        alpha: f64,
        t_max: f64,
    },
    Step {
        step_size: f64,
        gamma: f64,
    },
    MultiStep {
        milestones: Vec<f64>,
        gamma: f64,
    },
    Exponential {
        gamma: f64,
        decay_period: f64,
    },
    Linear {
        alpha_i: f64,
        alpha_f: f64,
        t_max: f64,
    },
    Cosine {
        alpha_f: f64,
        t_max: f64,
    },
    Polynomial {
        power: f64,
        alpha_f: f64,
        t_max: f64,
    },
    Rex {
        beta: f64,
        alpha_f: f64,
        t_max: f64,
    },
    /// Cosine cycles of length t_0, t_0 t_mult, t_0 t_mult^2, ... from `offset` on.
    CosineRestarts {
        t_0: f64,
        t_mult: f64,
        alpha_f: f64,
        offset: f64,
    },
    /// OneCycle (Smith and Topin 2019, PyTorch's OneCycleLR): from 1/div_factor up to 1 over the
    /// first pct_start of [t_warmup, t_max], then down to 1/(div_factor final_div_factor).
    OneCycle {
        pct_start: f64,
        div_factor: f64,
        final_div_factor: f64,
        cosine: bool,
        t_max: f64,
    },
}

/// Where `t` falls in cosine cycles of length t_0, t_0 t_mult, ...: progress within its cycle.
fn restart_progress(t: f64, t_0: f64, t_mult: f64) -> f64 {
    if t <= 0.0 {
        return 0.0;
    }
    if (t_mult - 1.0).abs() < 1e-12 {
        return (t / t_0).fract();
    }
    // Cycle n starts at t_0 (t_mult^n - 1) / (t_mult - 1).
    let start = |n: f64| t_0 * (t_mult.powf(n) - 1.0) / (t_mult - 1.0);
    let mut n = ((1.0 + t * (t_mult - 1.0) / t_0).ln() / t_mult.ln()).floor();
    // Guard the float boundaries.
    while n > 0.0 && start(n) > t {
        n -= 1.0;
    }
    while start(n + 1.0) <= t {
        n += 1.0;
    }
    (t - start(n)) / (t_0 * t_mult.powf(n))
}

fn cosine(alpha_f: f64, tau: f64) -> f64 {
    alpha_f + (1.0 - alpha_f) * 0.5 * (1.0 + (std::f64::consts::PI * tau).cos())
}

/// A shape with an optional warmup, in batches.
#[derive(Debug, Clone, PartialEq)]
pub struct WarmupSchedule {
    pub t_warmup: f64,
    pub shape: Shape,
}

impl WarmupSchedule {
    /// Progress through the decay window [t_warmup, t_max], clipped to [0, 1].
    fn tau(&self, t: f64, t_max: f64) -> f64 {
        if t_max <= self.t_warmup {
            return 0.0; // Composer's convention: no room to decay, hold the post-warmup value
        }
        ((t - self.t_warmup) / (t_max - self.t_warmup)).clamp(0.0, 1.0)
    }

    /// The multiplier at `t` ignoring the warmup ramp.
    fn after_warmup(&self, t: f64) -> f64 {
        match &self.shape {
            Shape::Constant { alpha, t_max } => {
                if t < *t_max {
                    *alpha
                } else {
                    1.0
                }
            }
            Shape::Step { step_size, gamma } => gamma.powf((t / step_size).floor()),
            Shape::MultiStep { milestones, gamma } => {
                gamma.powi(milestones.iter().filter(|&&m| t >= m).count() as i32)
            }
            Shape::Exponential {
                gamma,
                decay_period,
            } => gamma.powf(t / decay_period),
            Shape::Linear {
                alpha_i,
                alpha_f,
                t_max,
            } => alpha_i + self.tau(t, *t_max) * (alpha_f - alpha_i),
            Shape::Cosine { alpha_f, t_max } => cosine(*alpha_f, self.tau(t, *t_max)),
            Shape::Polynomial {
                power,
                alpha_f,
                t_max,
            } => alpha_f + (1.0 - alpha_f) * (1.0 - self.tau(t, *t_max)).powf(*power),
            Shape::Rex {
                beta,
                alpha_f,
                t_max,
            } => {
                let z = self.tau(t, *t_max);
                alpha_f + (1.0 - alpha_f) * (1.0 - z) / ((1.0 - beta * z) / 2.0 + 0.5)
            }
            Shape::CosineRestarts {
                t_0,
                t_mult,
                alpha_f,
                offset,
            } => cosine(*alpha_f, restart_progress(t - offset, *t_0, *t_mult)),
            Shape::OneCycle {
                pct_start,
                div_factor,
                final_div_factor,
                cosine,
                t_max,
            } => {
                let p = self.tau(t, *t_max);
                let (from, to, f) = if p < *pct_start {
                    (1.0 / div_factor, 1.0, p / pct_start)
                } else {
                    let end = 1.0 / (div_factor * final_div_factor);
                    (1.0, end, (p - pct_start) / (1.0 - pct_start).max(1e-12))
                };
                let f = if *cosine {
                    0.5 * (1.0 - (std::f64::consts::PI * f).cos())
                } else {
                    f
                };
                from + (to - from) * f
            }
        }
    }
}

impl Schedule for WarmupSchedule {
    fn multiplier(&self, batch: u64) -> f64 {
        let t = batch as f64;
        if t < self.t_warmup {
            t / self.t_warmup * self.after_warmup(self.t_warmup)
        } else {
            self.after_warmup(t)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Configs, one per registered name.

fn one_dur() -> Time {
    Time::dur(1.0)
}
fn one() -> f64 {
    1.0
}
fn tenth() -> f64 {
    0.1
}
fn one_ep() -> Time {
    Time::epochs(1.0)
}
fn two() -> f64 {
    2.0
}

fn positive(ctx: &BindContext, key: &str, t: &Time) -> Result<f64> {
    let b = ctx.batches(key, t)?;
    if b == 0 {
        return Err(Error::recipe(
            format!("{}.{key}", ctx.path),
            format!("{t} is zero; it must be positive"),
        ));
    }
    Ok(b as f64)
}

/// A period of a schedule that is a continuous function of the step (the exponential's decay
/// period, a cosine cycle), in batches, unrounded: under `--scale 0.25` a 10-batch period is 2.5
/// batches, so the curve is exactly a(t / s). (Phase boundaries and the step schedule's steps,
/// which happen at whole batches, are rounded by `positive`.)
fn positive_exact(ctx: &BindContext, key: &str, t: &Time) -> Result<f64> {
    // `batches` checks the range and names the key; the value itself is taken unrounded.
    positive(ctx, key, t)?;
    t.to_batches_exact(&ctx.clock)
        .map_err(|e| e.at(&crate::error::join_key(&ctx.path, key)))
}

fn warmup(ctx: &BindContext, t: &Option<Time>) -> Result<f64> {
    Ok(match t {
        Some(t) => ctx.batches("t_warmup", t)? as f64,
        None => 0.0,
    })
}

macro_rules! schedule_config {
    (
        $(#[$doc:meta])* $name:ident { $($(#[$fdoc:meta])* $field:ident : $ty:ty = $default:expr),* $(,)? }
        times { $($tfield:ident),* } lists { $($lfield:ident),* }
        build($self_:ident, $ctx:ident) $body:block
    ) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            /// Linear warmup from 0 (ramp and end point scale together under ScaleSchedule).
            #[serde(default)]
            pub t_warmup: Option<Time>,
            $($(#[$fdoc])* #[serde(default = $default)] pub $field: $ty,)*
        }

        impl TimeParams for $name {
            fn visit_times(&mut self, v: &mut dyn TimeVisitor) {
                visit_opt(v, "t_warmup", &mut self.t_warmup, Policy::Scaled);
                $(v.visit(stringify!($tfield), &mut self.$tfield, Policy::Scaled);)*
                $(visit_list(v, stringify!($lfield), &mut self.$lfield, Policy::Scaled);)*
            }
        }

        impl ScheduleConfig for $name {
            fn build(&$self_, $ctx: &BindContext) -> Result<Box<dyn Schedule>> {
                let shape = $body;
                let t_warmup = warmup($ctx, &$self_.t_warmup)?;
                if t_warmup >= $ctx.max_batches() as f64 && t_warmup > 0.0 {
                    tracing::warn!(
                        "{}.t_warmup ({} batches) is as long as the whole run ({} batches): the LR never leaves the warmup",
                        $ctx.path, t_warmup, $ctx.max_batches()
                    );
                }
                Ok(Box::new(WarmupSchedule { t_warmup, shape }))
            }
        }
    };
}

fn required_f64() -> f64 {
    f64::NAN
}
fn empty_times() -> Vec<Time> {
    Vec::new()
}

schedule_config! {
    /// alpha until t_max, then 1.
    ConstantConfig { alpha: f64 = "one", t_max: Time = "one_dur" }
    times { t_max } lists {}
    build(self, ctx) { Shape::Constant { alpha: self.alpha, t_max: ctx.batches("t_max", &self.t_max)? as f64 } }
}

schedule_config! {
    /// gamma^floor(t / step_size).
    StepConfig { step_size: Time = "one_ep", gamma: f64 = "tenth" }
    times { step_size } lists {}
    build(self, ctx) { Shape::Step { step_size: positive(ctx, "step_size", &self.step_size)?, gamma: self.gamma } }
}

schedule_config! {
    /// gamma^(number of milestones passed).
    MultiStepConfig { milestones: Vec<Time> = "empty_times", gamma: f64 = "tenth" }
    times {} lists { milestones }
    build(self, ctx) {
        let milestones = self.milestones.iter().enumerate()
            .map(|(i, m)| ctx.batches(&format!("milestones[{i}]"), m).map(|b| b as f64))
            .collect::<Result<Vec<_>>>()?;
        Shape::MultiStep { milestones, gamma: self.gamma }
    }
}

schedule_config! {
    /// gamma^(t / decay_period), continuous.
    ExponentialConfig { gamma: f64 = "required_f64", decay_period: Time = "one_ep" }
    times { decay_period } lists {}
    build(self, ctx) {
        if self.gamma.is_nan() || self.gamma <= 0.0 {
            return Err(Error::recipe_hint(format!("{}.gamma", ctx.path), "missing or not positive", "set gamma, e.g. 0.95"));
        }
        Shape::Exponential { gamma: self.gamma, decay_period: positive_exact(ctx, "decay_period", &self.decay_period)? }
    }
}

schedule_config! {
    /// From alpha_i to alpha_f, linearly, over [t_warmup, t_max]: with the defaults, linear decay to
    /// zero at the end of the budget (Li, Yumer, Ramanan 2020).
    LinearConfig { alpha_i: f64 = "one", alpha_f: f64 = "zero", t_max: Time = "one_dur" }
    times { t_max } lists {}
    build(self, ctx) { Shape::Linear { alpha_i: self.alpha_i, alpha_f: self.alpha_f, t_max: ctx.batches("t_max", &self.t_max)? as f64 } }
}

schedule_config! {
    /// Half a cosine from 1 to alpha_f over [t_warmup, t_max].
    CosineConfig { alpha_f: f64 = "zero", t_max: Time = "one_dur" }
    times { t_max } lists {}
    build(self, ctx) { Shape::Cosine { alpha_f: self.alpha_f, t_max: ctx.batches("t_max", &self.t_max)? as f64 } }
}

schedule_config! {
    /// alpha_f + (1 - alpha_f)(1 - tau)^power.
    PolynomialConfig { power: f64 = "two", alpha_f: f64 = "zero", t_max: Time = "one_dur" }
    times { t_max } lists {}
    build(self, ctx) {
        if self.power.is_nan() || self.power <= 0.0 {
            return Err(Error::recipe(format!("{}.power", ctx.path), "must be a positive number"));
        }
        Shape::Polynomial { power: self.power, alpha_f: self.alpha_f, t_max: ctx.batches("t_max", &self.t_max)? as f64 }
    }
}

schedule_config! {
    /// REX (Chen, Wolfe, Kyrillidis 2021): (1 - z) / ((1 - beta z)/2 + 1/2), z the progress; beta = 1
    /// is the paper's profile, beta = 0 is linear.
    RexConfig { beta: f64 = "one", alpha_f: f64 = "zero", t_max: Time = "one_dur" }
    times { t_max } lists {}
    build(self, ctx) {
        if !(0.0..=1.0).contains(&self.beta) {
            return Err(Error::recipe(format!("{}.beta", ctx.path), "beta must be in [0, 1]"));
        }
        Shape::Rex { beta: self.beta, alpha_f: self.alpha_f, t_max: ctx.batches("t_max", &self.t_max)? as f64 }
    }
}

schedule_config! {
    /// Composer's CosineAnnealingWarmRestartsScheduler: cosine cycles of t_0, t_0 t_mult, ...
    CosineWarmRestartsConfig { t_0: Time = "one_ep", t_mult: f64 = "one", alpha_f: f64 = "zero" }
    times { t_0 } lists {}
    build(self, ctx) {
        if self.t_mult.is_nan() || self.t_mult < 1.0 {
            return Err(Error::recipe(format!("{}.t_mult", ctx.path), "must be a number >= 1"));
        }
        Shape::CosineRestarts { t_0: positive_exact(ctx, "t_0", &self.t_0)?, t_mult: self.t_mult, alpha_f: self.alpha_f, offset: 0.0 }
    }
}

fn two_restarts() -> u32 {
    2
}

schedule_config! {
    /// Budget-aware SGDR (Loshchilov and Hutter 2017, as revisited by Li et al. 2020): `restarts`
    /// restarts with cycles growing by t_mult, fitted exactly into [t_warmup, t_max]. With the
    /// defaults (2 restarts, t_mult 2) the cycles end at 1/7, 3/7 and 1 of the budget (SGDR-r2).
    SgdrConfig { restarts: u32 = "two_restarts", t_mult: f64 = "two", alpha_f: f64 = "zero", t_max: Time = "one_dur" }
    times { t_max } lists {}
    build(self, ctx) {
        if self.t_mult.is_nan() || self.t_mult < 1.0 {
            return Err(Error::recipe(format!("{}.t_mult", ctx.path), "must be a number >= 1"));
        }
        let t_warmup = warmup(ctx, &self.t_warmup)?;
        let span = positive(ctx, "t_max", &self.t_max)? - t_warmup;
        let cycles: f64 = (0..=self.restarts).map(|i| self.t_mult.powi(i as i32)).sum();
        Shape::CosineRestarts { t_0: span.max(1.0) / cycles, t_mult: self.t_mult, alpha_f: self.alpha_f, offset: t_warmup }
    }
}

fn pct_start() -> f64 {
    0.3
}
fn div_factor() -> f64 {
    25.0
}
fn final_div_factor() -> f64 {
    1e4
}
fn cos_anneal() -> String {
    "cos".into()
}

schedule_config! {
    /// OneCycle (PyTorch's OneCycleLR, as a multiplier of the base LR, which is the peak): up from
    /// 1/div_factor over pct_start of the run, then down to 1/(div_factor * final_div_factor).
    OneCycleConfig {
        pct_start: f64 = "pct_start",
        div_factor: f64 = "div_factor",
        final_div_factor: f64 = "final_div_factor",
        /// `cos` or `linear`.
        anneal_strategy: String = "cos_anneal",
        t_max: Time = "one_dur",
    }
    times { t_max } lists {}
    build(self, ctx) {
        let key = |k: &str| format!("{}.{k}", ctx.path);
        if !(self.pct_start > 0.0 && self.pct_start < 1.0) {
            return Err(Error::recipe(key("pct_start"), "must be in (0, 1)"));
        }
        if !(self.div_factor > 0.0 && self.final_div_factor > 0.0) {
            return Err(Error::recipe(key("div_factor"), "div_factor and final_div_factor must be positive"));
        }
        let cosine = match self.anneal_strategy.as_str() {
            "cos" => true,
            "linear" => false,
            other => return Err(Error::recipe_hint(key("anneal_strategy"), format!("unknown strategy `{other}`"), "cos or linear")),
        };
        Shape::OneCycle {
            pct_start: self.pct_start,
            div_factor: self.div_factor,
            final_div_factor: self.final_div_factor,
            cosine,
            t_max: positive(ctx, "t_max", &self.t_max)?,
        }
    }
}

/// Composer's `*WithWarmupScheduler` names: the same schedule with `t_warmup` required.
macro_rules! with_warmup {
    ($(#[$doc:meta])* $name:ident($inner:ty)) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl TimeParams for $name {
            fn visit_times(&mut self, v: &mut dyn TimeVisitor) {
                self.0.visit_times(v)
            }
        }

        impl ScheduleConfig for $name {
            fn build(&self, ctx: &BindContext) -> Result<Box<dyn Schedule>> {
                if self.0.t_warmup.is_none() {
                    return Err(Error::recipe_hint(
                        format!("{}.t_warmup", ctx.path),
                        "missing required key `t_warmup`",
                        "a *_with_warmup schedule needs its warmup: t_warmup: 1ep (or use the name without _with_warmup)",
                    ));
                }
                self.0.build(ctx)
            }
        }
    };
}

with_warmup!(
    /// Composer's MultiStepWithWarmupScheduler.
    MultiStepWithWarmupConfig(MultiStepConfig)
);
with_warmup!(
    /// Composer's LinearWithWarmupScheduler.
    LinearWithWarmupConfig(LinearConfig)
);
with_warmup!(
    /// Composer's CosineAnnealingWithWarmupScheduler.
    CosineWithWarmupConfig(CosineConfig)
);
with_warmup!(
    /// Composer's PolynomialWithWarmupScheduler.
    PolynomialWithWarmupConfig(PolynomialConfig)
);

/// Composer's ConstantWithWarmupScheduler: ramp to alpha over t_warmup, then alpha (Composer's
/// code keeps alpha after t_max; so does this).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConstantWithWarmupConfig {
    pub t_warmup: Time,
    #[serde(default = "one")]
    pub alpha: f64,
    #[serde(default = "one_dur")]
    pub t_max: Time,
}

impl TimeParams for ConstantWithWarmupConfig {
    fn visit_times(&mut self, v: &mut dyn TimeVisitor) {
        v.visit("t_warmup", &mut self.t_warmup, Policy::Scaled);
        v.visit("t_max", &mut self.t_max, Policy::Scaled);
    }
}

impl ScheduleConfig for ConstantWithWarmupConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Schedule>> {
        Ok(Box::new(WarmupSchedule {
            t_warmup: ctx.batches("t_warmup", &self.t_warmup)? as f64,
            shape: Shape::Linear {
                alpha_i: self.alpha,
                alpha_f: self.alpha,
                t_max: ctx.batches("t_max", &self.t_max)? as f64,
            },
        }))
    }
}

fn zero() -> f64 {
    0.0
}

// ---------------------------------------------------------------------------------------------
// Reduce on plateau: the budget-unaware baseline, driven by a metric rather than by time.

fn eval_loss() -> String {
    "eval/loss".into()
}
fn two_ep() -> Time {
    Time::epochs(2.0)
}
fn zero_time() -> Time {
    Time::batches(0.0)
}
fn rel_threshold() -> f64 {
    1e-4
}

/// PyTorch's ReduceLROnPlateau as a multiplier: when `monitor` has not improved (relatively, by
/// `threshold`) for `patience`, multiply by `factor`; then wait `cooldown`; never below
/// `min_factor`. Budget-unaware: it does not know where the run ends.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReduceOnPlateauConfig {
    #[serde(default = "eval_loss")]
    pub monitor: String,
    /// `min` or `max`; by default `max` for accuracies, `min` otherwise.
    #[serde(default)]
    pub mode: Option<crate::metric::Mode>,
    #[serde(default = "tenth")]
    pub factor: f64,
    #[serde(default = "two_ep")]
    pub patience: Time,
    /// Relative improvement that counts (PyTorch's `threshold`, rel mode).
    #[serde(default = "rel_threshold")]
    pub threshold: f64,
    #[serde(default = "zero_time")]
    pub cooldown: Time,
    #[serde(default = "zero")]
    pub min_factor: f64,
    #[serde(default)]
    pub t_warmup: Option<Time>,
}

impl TimeParams for ReduceOnPlateauConfig {
    fn visit_times(&mut self, v: &mut dyn TimeVisitor) {
        visit_opt(v, "t_warmup", &mut self.t_warmup, Policy::Scaled);
        v.visit("patience", &mut self.patience, Policy::Scaled);
        v.visit("cooldown", &mut self.cooldown, Policy::Scaled);
    }
}

/// What reduce_on_plateau carries across a checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct PlateauState {
    factor: f64,
    best: Option<f64>,
    best_at: u64,
    cooldown_until: u64,
}

struct ReduceOnPlateau {
    monitor: String,
    mode: crate::metric::Mode,
    factor: f64,
    patience: u64,
    threshold: f64,
    cooldown: u64,
    min_factor: f64,
    t_warmup: f64,
    st: PlateauState,
}

impl ScheduleConfig for ReduceOnPlateauConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Schedule>> {
        if !(self.factor > 0.0 && self.factor < 1.0) {
            return Err(Error::recipe(
                format!("{}.factor", ctx.path),
                "must be in (0, 1)",
            ));
        }
        Ok(Box::new(ReduceOnPlateau {
            monitor: self.monitor.clone(),
            mode: crate::metric::Mode::resolve(self.mode, &self.monitor),
            factor: self.factor,
            patience: ctx.batches("patience", &self.patience)?,
            threshold: self.threshold.max(0.0),
            cooldown: ctx.batches("cooldown", &self.cooldown)?,
            min_factor: self.min_factor.max(0.0),
            t_warmup: warmup(ctx, &self.t_warmup)?,
            st: PlateauState {
                factor: 1.0,
                ..Default::default()
            },
        }))
    }
}

impl Schedule for ReduceOnPlateau {
    fn multiplier(&self, batch: u64) -> f64 {
        let t = batch as f64;
        let ramp = if t < self.t_warmup {
            t / self.t_warmup
        } else {
            1.0
        };
        ramp * self.st.factor
    }

    fn observe(&mut self, metrics: &std::collections::BTreeMap<String, f64>, batch: u64) {
        let Some(&v) = metrics.get(&self.monitor) else {
            return;
        };
        if v.is_nan() {
            return;
        }
        let st = &mut self.st;
        let improved = match st.best {
            None => true,
            Some(b) => self.mode.better(v, b, self.threshold * b.abs()),
        };
        if improved {
            st.best = Some(v);
            st.best_at = batch;
        } else if batch >= st.cooldown_until && batch - st.best_at >= self.patience {
            st.factor = (st.factor * self.factor).max(self.min_factor);
            st.cooldown_until = batch + self.cooldown;
            st.best_at = batch;
            tracing::info!(
                "reduce_on_plateau: {} has not improved for {} batches; LR multiplier now {}",
                self.monitor,
                self.patience,
                st.factor
            );
        }
    }

    fn state_dict(&self) -> Result<crate::state_dict::StateDict> {
        Ok(crate::state_dict::StateDict::encode(&self.st))
    }

    fn load_state_dict(&mut self, state: &crate::state_dict::StateDict) -> Result<()> {
        self.st = state.decode("reduce_on_plateau")?;
        Ok(())
    }
}

crate::register_schedule!(
    ReduceOnPlateauConfig,
    "reduce_on_plateau",
    "Multiply by factor when a metric stops improving for patience (budget-unaware baseline).",
    "monitor: eval/loss\nfactor: 0.1\npatience: 2ep\ncooldown: 0ba"
);

crate::register_schedule!(
    ConstantConfig,
    "constant",
    "alpha until t_max, then 1 (Composer's ConstantScheduler).",
    "alpha: 1.0\nt_max: 1dur\nt_warmup: 0.05dur"
);
crate::register_schedule!(
    StepConfig,
    "step",
    "gamma^floor(t/step_size) (Composer's StepScheduler).",
    "step_size: 30ep\ngamma: 0.1\nt_warmup: 1ep"
);
crate::register_schedule!(
    MultiStepConfig,
    "multistep",
    "gamma at each milestone (Composer's MultiStepScheduler).",
    "milestones: [30ep, 60ep, 80ep]\ngamma: 0.1\nt_warmup: 1ep"
);
crate::register_schedule!(
    ExponentialConfig,
    "exponential",
    "gamma^(t/decay_period), continuous.",
    "gamma: 0.95\ndecay_period: 1ep\nt_warmup: 100ba"
);
crate::register_schedule!(
    LinearConfig,
    "linear",
    "Linear from alpha_i to alpha_f; the defaults decay to zero at the end of the budget.",
    "alpha_i: 1.0\nalpha_f: 0.0\nt_max: 1dur\nt_warmup: 0.05dur"
);
crate::register_schedule!(
    CosineConfig,
    "cosine",
    "Cosine annealing from 1 to alpha_f over [t_warmup, t_max].",
    "alpha_f: 0.0\nt_max: 1dur\nt_warmup: 2ep"
);
crate::register_schedule!(
    PolynomialConfig,
    "polynomial",
    "alpha_f + (1-alpha_f)(1-tau)^power.",
    "power: 2.0\nalpha_f: 0.0\nt_max: 1dur\nt_warmup: 500ba"
);
crate::register_schedule!(
    RexConfig,
    "rex",
    "REX: (1-z)/((1-beta z)/2 + 1/2), budget-aware (Chen et al. 2021).",
    "beta: 1.0\nalpha_f: 0.0\nt_max: 1dur\nt_warmup: 0.02dur"
);

crate::register_schedule!(
    CosineWarmRestartsConfig,
    "cosine_warm_restarts",
    "Cosine cycles of t_0, t_0*t_mult, ... (Composer's CosineAnnealingWarmRestartsScheduler).",
    "t_0: 10ep\nt_mult: 2.0\nalpha_f: 0.0"
);
crate::register_schedule!(
    SgdrConfig,
    "sgdr",
    "Budget-aware SGDR: n restarts with growing cycles fitted into the run (SGDR-r2 by default).",
    "restarts: 2\nt_mult: 2.0\nalpha_f: 0.0"
);
crate::register_schedule!(
    OneCycleConfig,
    "one_cycle",
    "OneCycle: up from lr/div_factor to lr over pct_start, then down (PyTorch's OneCycleLR).",
    "pct_start: 0.3\ndiv_factor: 25.0\nfinal_div_factor: 10000.0\nanneal_strategy: cos"
);
crate::register_schedule!(
    MultiStepWithWarmupConfig,
    "multistep_with_warmup",
    "multistep with a required warmup (Composer's MultiStepWithWarmupScheduler).",
    "t_warmup: 5ep\nmilestones: [80ep, 120ep]\ngamma: 0.1"
);
crate::register_schedule!(
    ConstantWithWarmupConfig,
    "constant_with_warmup",
    "Ramp to alpha over t_warmup, then alpha (Composer's ConstantWithWarmupScheduler).",
    "t_warmup: 1ep\nalpha: 1.0"
);
crate::register_schedule!(
    LinearWithWarmupConfig,
    "linear_with_warmup",
    "linear with a required warmup (Composer's LinearWithWarmupScheduler).",
    "t_warmup: 0.05dur\nalpha_i: 1.0\nalpha_f: 0.0"
);
crate::register_schedule!(
    CosineWithWarmupConfig,
    "cosine_with_warmup",
    "cosine with a required warmup (Composer's CosineAnnealingWithWarmupScheduler).",
    "t_warmup: 8ep\nalpha_f: 0.0"
);
crate::register_schedule!(
    PolynomialWithWarmupConfig,
    "polynomial_with_warmup",
    "polynomial with a required warmup (Composer's PolynomialWithWarmupScheduler).",
    "t_warmup: 1ep\npower: 2.0"
);

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t_warmup: f64, shape: Shape) -> WarmupSchedule {
        WarmupSchedule { t_warmup, shape }
    }

    fn check(sched: &WarmupSchedule, table: &[(u64, f64)]) {
        for &(t, want) in table {
            let got = sched.multiplier(t);
            assert!(
                (got - want).abs() < 1e-9,
                "{sched:?} at {t}: got {got}, want {want}"
            );
        }
    }

    #[test]
    fn hand_computed_tables() {
        check(
            &s(
                0.0,
                Shape::Constant {
                    alpha: 0.5,
                    t_max: 10.0,
                },
            ),
            &[(0, 0.5), (9, 0.5), (10, 1.0)],
        );
        check(
            &s(
                0.0,
                Shape::Step {
                    step_size: 10.0,
                    gamma: 0.1,
                },
            ),
            &[(0, 1.0), (9, 1.0), (10, 0.1), (25, 0.01)],
        );
        check(
            &s(
                0.0,
                Shape::MultiStep {
                    milestones: vec![30.0, 60.0],
                    gamma: 0.1,
                },
            ),
            &[(29, 1.0), (30, 0.1), (59, 0.1), (60, 0.01)],
        );
        check(
            &s(
                0.0,
                Shape::Exponential {
                    gamma: 0.5,
                    decay_period: 10.0,
                },
            ),
            &[(0, 1.0), (5, 0.5f64.sqrt()), (20, 0.25)],
        );
        check(
            &s(
                0.0,
                Shape::Linear {
                    alpha_i: 1.0,
                    alpha_f: 0.0,
                    t_max: 100.0,
                },
            ),
            &[(0, 1.0), (25, 0.75), (100, 0.0), (150, 0.0)],
        );
        check(
            &s(
                0.0,
                Shape::Cosine {
                    alpha_f: 0.0,
                    t_max: 100.0,
                },
            ),
            &[(0, 1.0), (50, 0.5), (100, 0.0)],
        );
        check(
            &s(
                0.0,
                Shape::Cosine {
                    alpha_f: 0.2,
                    t_max: 100.0,
                },
            ),
            &[(50, 0.6), (100, 0.2)],
        );
        check(
            &s(
                0.0,
                Shape::Polynomial {
                    power: 2.0,
                    alpha_f: 0.0,
                    t_max: 100.0,
                },
            ),
            &[(50, 0.25), (90, 0.01)],
        );
        // REX values from the paper's profile: p=.25 -> .857, .5 -> .667, .75 -> .4, .9 -> .182
        check(
            &s(
                0.0,
                Shape::Rex {
                    beta: 1.0,
                    alpha_f: 0.0,
                    t_max: 100.0,
                },
            ),
            &[
                (0, 1.0),
                (25, 0.75 / 0.875),
                (50, 2.0 / 3.0),
                (75, 0.4),
                (90, 0.1 / 0.55),
                (100, 0.0),
            ],
        );
        // beta = 0 is linear
        check(
            &s(
                0.0,
                Shape::Rex {
                    beta: 0.0,
                    alpha_f: 0.0,
                    t_max: 100.0,
                },
            ),
            &[(25, 0.75), (60, 0.4)],
        );
    }

    #[test]
    fn restarts_one_cycle_and_sgdr_tables() {
        let r = s(
            0.0,
            Shape::CosineRestarts {
                t_0: 10.0,
                t_mult: 2.0,
                alpha_f: 0.0,
                offset: 0.0,
            },
        );
        // Cycles [0,10), [10,30), [30,70).
        check(
            &r,
            &[
                (0, 1.0),
                (5, 0.5),
                (10, 1.0),
                (20, 0.5),
                (30, 1.0),
                (50, 0.5),
                (69, cosine(0.0, 39.0 / 40.0)),
            ],
        );
        let same = s(
            0.0,
            Shape::CosineRestarts {
                t_0: 4.0,
                t_mult: 1.0,
                alpha_f: 0.0,
                offset: 0.0,
            },
        );
        check(&same, &[(2, 0.5), (4, 1.0), (6, 0.5), (8, 1.0)]);
        let one = s(
            0.0,
            Shape::OneCycle {
                pct_start: 0.25,
                div_factor: 10.0,
                final_div_factor: 100.0,
                cosine: false,
                t_max: 100.0,
            },
        );
        check(
            &one,
            &[(0, 0.1), (25, 1.0), (12, 0.1 + 0.9 * 0.48), (100, 0.001)],
        );
        let one_cos = s(
            0.0,
            Shape::OneCycle {
                pct_start: 0.5,
                div_factor: 4.0,
                final_div_factor: 1.0,
                cosine: true,
                t_max: 100.0,
            },
        );
        check(
            &one_cos,
            &[(25, 0.25 + 0.75 * 0.5), (50, 1.0), (75, 0.625), (100, 0.25)],
        );
    }

    #[test]
    fn reduce_on_plateau_cuts_after_patience_and_survives_a_checkpoint() {
        let ctx = BindContext::standalone(&candle_core::Device::Cpu, [1, 1, 1], 2, 1);
        let cfg: ReduceOnPlateauConfig = crate::plugin::parse_block(
            &serde_yaml::from_str("patience: 10ba\nfactor: 0.5\ncooldown: 5ba").unwrap(),
        )
        .unwrap();
        let mut p = cfg.build(&ctx).unwrap();
        let m = |v: f64| std::collections::BTreeMap::from([("eval/loss".to_string(), v)]);
        p.observe(&m(1.0), 0);
        p.observe(&m(0.9), 5);
        p.observe(&m(0.95), 10);
        assert_eq!(
            p.multiplier(11),
            1.0,
            "5 batches without improvement < patience"
        );
        p.observe(&m(0.95), 15);
        assert_eq!(p.multiplier(16), 0.5, "10 batches since the best at 5");
        let saved = p.state_dict().unwrap();
        p.observe(&m(0.95), 19);
        assert_eq!(p.multiplier(20), 0.5, "cooling down");
        p.observe(&m(0.95), 25);
        assert_eq!(p.multiplier(26), 0.25);
        let mut q = cfg.build(&ctx).unwrap();
        q.load_state_dict(&saved).unwrap();
        assert_eq!(q.multiplier(16), 0.5);
        q.observe(&m(0.95), 25);
        assert_eq!(
            q.multiplier(26),
            0.25,
            "the restored schedule goes on the same way"
        );
    }

    /// Under `--scale 0.25` a 10-batch decay period is 2.5 batches: the curve is exactly
    /// a(t / s) = 0.5^(t / 2.5), not 0.5^(t / 3) after rounding (nor Composer's truncated 2).
    #[test]
    fn continuous_periods_keep_their_fraction_of_a_batch() {
        let ctx = BindContext {
            clock: crate::time::Clock {
                batches_per_epoch: 10,
                samples_per_batch: 1,
                tokens_per_sample: None,
                max_batches: Some(100),
            },
            ..BindContext::standalone(&candle_core::Device::Cpu, [1, 1, 1], 2, 1)
        };
        let yaml = |t: &str| serde_yaml::from_str::<serde_yaml::Value>(t).unwrap();
        let exp: ExponentialConfig =
            crate::plugin::parse_block(&yaml("gamma: 0.5\ndecay_period: 2.5ba")).unwrap();
        let sched = exp.build(&ctx).unwrap();
        for t in [0u64, 1, 5, 7, 10] {
            let want = 0.5f64.powf(t as f64 / 2.5);
            assert!((sched.multiplier(t) - want).abs() < 1e-12, "{t}");
        }
        // A cosine cycle of 0.25 epoch (2.5 batches) restarts between batches 2 and 3.
        let cos: CosineWarmRestartsConfig =
            crate::plugin::parse_block(&yaml("t_0: 0.25ep")).unwrap();
        let sched = cos.build(&ctx).unwrap();
        assert!((sched.multiplier(2) - cosine(0.0, 2.0 / 2.5)).abs() < 1e-12);
        assert!((sched.multiplier(3) - cosine(0.0, 0.5 / 2.5)).abs() < 1e-12);
    }

    #[test]
    fn sgdr_r2_restarts_at_one_and_three_sevenths() {
        let ctx = BindContext {
            clock: crate::time::Clock {
                batches_per_epoch: 70,
                samples_per_batch: 1,
                tokens_per_sample: None,
                max_batches: Some(700),
            },
            ..BindContext::standalone(&candle_core::Device::Cpu, [1, 1, 1], 2, 1)
        };
        let cfg: SgdrConfig = crate::plugin::parse_block(&serde_yaml::Value::Null).unwrap();
        let sched = cfg.build(&ctx).unwrap();
        for (t, want) in [
            (0, 1.0),
            (50, 0.5),
            (100, 1.0),
            (200, 0.5),
            (300, 1.0),
            (500, 0.5),
            (699, cosine(0.0, 399.0 / 400.0)),
        ] {
            assert!(
                (sched.multiplier(t) - want).abs() < 1e-9,
                "{t}: {}",
                sched.multiplier(t)
            );
        }
        // A *_with_warmup name without its warmup says what is missing.
        let e = crate::plugin::parse_block::<CosineWithWarmupConfig>(&serde_yaml::Value::Null)
            .unwrap()
            .build(&ctx)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("t_warmup"), "{e}");
    }

    #[test]
    fn warmup_ramps_to_the_post_warmup_value_then_decays_from_there() {
        let c = s(
            10.0,
            Shape::Cosine {
                alpha_f: 0.0,
                t_max: 110.0,
            },
        );
        check(&c, &[(0, 0.0), (5, 0.5), (10, 1.0), (60, 0.5), (110, 0.0)]);
        let l = s(
            4.0,
            Shape::Linear {
                alpha_i: 0.5,
                alpha_f: 0.0,
                t_max: 8.0,
            },
        );
        check(&l, &[(0, 0.0), (2, 0.25), (4, 0.5), (6, 0.25), (8, 0.0)]);
        // Step-like schedules read absolute time after the warmup.
        let m = s(
            5.0,
            Shape::MultiStep {
                milestones: vec![10.0],
                gamma: 0.1,
            },
        );
        check(&m, &[(1, 0.2), (5, 1.0), (9, 1.0), (10, 0.1)]);
        // A warmup as long as the decay window never divides by zero and holds the start value.
        let w = s(
            10.0,
            Shape::Linear {
                alpha_i: 1.0,
                alpha_f: 0.0,
                t_max: 10.0,
            },
        );
        check(&w, &[(5, 0.5), (10, 1.0), (20, 1.0)]);
    }

    #[test]
    fn scaling_every_time_gives_a_of_t_over_s() {
        // a_s(t) = a(t / s): cosine with warmup over 1000 batches vs the same at s = 0.5.
        let a = s(
            100.0,
            Shape::Cosine {
                alpha_f: 0.0,
                t_max: 1000.0,
            },
        );
        let a_half = s(
            50.0,
            Shape::Cosine {
                alpha_f: 0.0,
                t_max: 500.0,
            },
        );
        for t in (0..500).step_by(7) {
            assert!((a_half.multiplier(t) - a.multiplier(2 * t)).abs() < 1e-12);
        }
    }
}
