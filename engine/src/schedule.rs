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
    visit_list, visit_opt, BindContext, Policy, ScheduleConfig, TimeParams, TimeVisitor,
};
use crate::time::Time;
use serde::{Deserialize, Serialize};

/// An LR multiplier as a function of the step (batch count, from 0).
pub trait Schedule {
    fn multiplier(&self, batch: u64) -> f64;
    /// State to carry across a checkpoint; the built-in schedules are stateless.
    fn state_dict(&self) -> Result<crate::checkpoint::StateDict> {
        Ok(Default::default())
    }
    fn load_state_dict(&mut self, _state: &crate::checkpoint::StateDict) -> Result<()> {
        Ok(())
    }
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
            Shape::Cosine { alpha_f, t_max } => {
                let tau = self.tau(t, *t_max);
                alpha_f + (1.0 - alpha_f) * 0.5 * (1.0 + (std::f64::consts::PI * tau).cos())
            }
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
        Shape::Exponential { gamma: self.gamma, decay_period: positive(ctx, "decay_period", &self.decay_period)? }
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

fn zero() -> f64 {
    0.0
}

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
