//! # AutoLRS
//!
//! **What.** Tunes the learning rate on the fly (Jin et al., ICLR 2021). Training is cut into
//! stages; a stage exploits one constant LR for `tau` steps. Before each stage, `candidates` LRs
//! are tried, each for `tau' = trial_fraction * tau` steps starting from the same weights and
//! optimizer state (snapshot, train, restore). Each trial's training-loss curve is fitted with the
//! exponential model `L(x) = a exp(b x) + c` (b < 0) and forecast to `tau` steps; the LRs to try
//! are chosen by Bayesian optimisation (a Gaussian process over log-LR with a Matern-5/2 kernel and
//! a lower-confidence-bound acquisition, `kappa` 1e6 by default as in the official code, which makes
//! the search explore), and the stage exploits the LR with the lowest forecast. `tau` doubles after
//! each stage up to `tau_max`.
//!
//! **Budget.** Trial steps are real optimizer steps on real batches: they advance the clock and
//! count against `max_duration`. With the defaults the search costs as many steps as the
//! exploitation (the paper's 2x); `max_search_fraction` bounds the share of the run spent
//! searching: once a stage's search would pass it, or the run has too few steps left, the last
//! chosen LR is used to the end. The run logs `autolrs/lr` (the LR of each step),
//! `autolrs/search_steps` (steps spent on trials so far) and `autolrs/stage`.
//!
//! **When it helps.** When no good schedule is known for a model and budget; the paper reports
//! 1.22x-1.5x fewer steps to a target on ResNet-50, Transformer and BERT against their published
//! schedules. It does not anneal to zero at the end of the budget (it is not budget-aware).
//!
//! **Hyperparameters.** `min_lr`, `max_lr` (the search range, log-uniform; 1e-3..1e-1), `candidates`
//! (10), `tau` (first stage's exploitation, 1/16 of the run), `tau_max` (1/4 of the run),
//! `trial_fraction` (0.1), `kappa` (1e6), `start` (0: takes over from the recipe's schedule then,
//! e.g. after a warmup), `max_search_fraction` (0.5). `tau`, `tau_max` and `start` scale with the
//! run. Differences from the official code: the loss curve is denoised by dropping the 3% largest
//! residuals of its first half once (not a spline), and validation-loss forecasting for long stages
//! is not implemented (training loss throughout).
//!
//! **Expected effect.** A run that picks its own LR per stage; compare at equal total steps
//! (search included) with `recipe bench speedup` or `recipe bench sweep`. Measured here
//! (benches/README.md, "AutoLRS against a tuned cosine schedule"): on a 936-step Fashion-MNIST
//! run its search takes 44% of the steps and it ends 8.7 points below the tuned cosine (78.5%
//! against 87.2%, 3 seeds): a short budget is the regime where it loses.

use recipe_engine::algorithm::{Algorithm, AlgorithmConfig};
use recipe_engine::candle_core::Tensor;
use recipe_engine::error::{Error, Result};
use recipe_engine::plugin::{BindContext, Policy, TimeParams, TimeVisitor};
use recipe_engine::state_dict::StateDict;
use recipe_engine::{Event, State, Time};
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------------------------
// The pure core: the exponential forecast and the Gaussian-process search.

/// Least-squares a, c of y = a e^{b x} + c for a fixed b; returns (a, c, squared residual).
fn fit_ac(xs: &[f64], ys: &[f64], b: f64) -> (f64, f64, f64) {
    let n = xs.len() as f64;
    let (mut sf, mut sff, mut sy, mut sfy) = (0.0, 0.0, 0.0, 0.0);
    for (&x, &y) in xs.iter().zip(ys) {
        let f = (b * x).exp();
        sf += f;
        sff += f * f;
        sy += y;
        sfy += f * y;
    }
    let det = n * sff - sf * sf;
    let (a, c) = if det.abs() < 1e-12 {
        (0.0, sy / n)
    } else {
        ((n * sfy - sf * sy) / det, (sff * sy - sf * sfy) / det)
    };
    let r = xs
        .iter()
        .zip(ys)
        .map(|(&x, &y)| (a * (b * x).exp() + c - y).powi(2))
        .sum();
    (a, c, r)
}

/// Fits y = a e^{b x} + c (b < 0) by a search over log(-b), (a, c) by least squares for each.
fn fit_exponential(xs: &[f64], ys: &[f64]) -> (f64, f64, f64) {
    let span = xs.last().copied().unwrap_or(1.0).max(1.0);
    let (lo, hi) = ((1e-3 / span).ln(), (20.0 / span).ln());
    let eval = |s: f64| fit_ac(xs, ys, -s.exp()).2;
    let grid = 64;
    let mut best = (f64::INFINITY, lo);
    for i in 0..=grid {
        let s = lo + (hi - lo) * i as f64 / grid as f64;
        let r = eval(s);
        if r < best.0 {
            best = (r, s);
        }
    }
    // Golden-section refinement around the best grid point.
    let step = (hi - lo) / grid as f64;
    let (mut a, mut b) = (best.1 - step, best.1 + step);
    let g = 0.5 * (5f64.sqrt() - 1.0);
    for _ in 0..40 {
        let (c, d) = (b - g * (b - a), a + g * (b - a));
        if eval(c) < eval(d) {
            b = d;
        } else {
            a = c;
        }
    }
    let bb = -(0.5 * (a + b)).exp();
    let (aa, cc, _) = fit_ac(xs, ys, bb);
    (aa, bb, cc)
}

/// Forecasts a training-loss curve (one value per step) to `at` steps after its start: the
/// exponential model, fitted once, refitted without the 3% largest residuals of the first half.
/// Non-finite losses forecast 1e6 (a diverged trial).
pub fn forecast(losses: &[f64], at: f64) -> f64 {
    if losses.is_empty() || losses.iter().any(|l| !l.is_finite()) {
        return 1e6;
    }
    if losses.len() < 3 {
        return losses[losses.len() - 1];
    }
    let xs: Vec<f64> = (0..losses.len()).map(|i| i as f64).collect();
    let (a, b, c) = fit_exponential(&xs, losses);
    let half = losses.len() / 2;
    let drop = (0.03 * losses.len() as f64).ceil() as usize;
    let mut resid: Vec<(f64, usize)> = (0..half)
        .map(|i| ((a * (b * xs[i]).exp() + c - losses[i]).abs(), i))
        .collect();
    resid.sort_by(|p, q| q.0.total_cmp(&p.0));
    let dropped: Vec<usize> = resid.iter().take(drop).map(|r| r.1).collect();
    let (kx, ky): (Vec<f64>, Vec<f64>) = xs
        .iter()
        .zip(losses)
        .enumerate()
        .filter(|(i, _)| !dropped.contains(i))
        .map(|(_, (&x, &y))| (x, y))
        .unzip();
    let (a, b, c) = fit_exponential(&kx, &ky);
    let f = a * (b * at).exp() + c;
    if f.is_finite() {
        f
    } else {
        1e6
    }
}

fn matern52(d: f64, l: f64) -> f64 {
    let r = 5f64.sqrt() * d.abs() / l;
    (1.0 + r + r * r / 3.0) * (-r).exp()
}

/// The next point to try in [0, 1] by a Gaussian-process lower confidence bound over a grid,
/// given (x, y) observations; `first` is used when there are none.
pub fn next_point(obs: &[(f64, f64)], kappa: f64, first: f64) -> f64 {
    if obs.is_empty() {
        return first;
    }
    let n = obs.len();
    let ys: Vec<f64> = obs.iter().map(|o| o.1).collect();
    let mean = ys.iter().sum::<f64>() / n as f64;
    let sd = (ys.iter().map(|y| (y - mean).powi(2)).sum::<f64>() / n as f64)
        .sqrt()
        .max(1e-12);
    let y: Vec<f64> = ys.iter().map(|v| (v - mean) / sd).collect();
    let l = 0.25;
    // K + noise, Cholesky.
    let mut k = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            k[i * n + j] = matern52(obs[i].0 - obs[j].0, l) + if i == j { 1e-6 } else { 0.0 };
        }
    }
    let mut ch = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = (0..j).map(|m| ch[i * n + m] * ch[j * n + m]).sum();
            ch[i * n + j] = if i == j {
                (k[i * n + i] - s).max(1e-12).sqrt()
            } else {
                (k[i * n + j] - s) / ch[j * n + j]
            };
        }
    }
    let solve = |b: &[f64]| -> Vec<f64> {
        let mut z = vec![0.0; n];
        for i in 0..n {
            z[i] = (b[i] - (0..i).map(|m| ch[i * n + m] * z[m]).sum::<f64>()) / ch[i * n + i];
        }
        let mut x = vec![0.0; n];
        for i in (0..n).rev() {
            x[i] = (z[i] - (i + 1..n).map(|m| ch[m * n + i] * x[m]).sum::<f64>()) / ch[i * n + i];
        }
        x
    };
    let alpha = solve(&y);
    let mut best = (f64::INFINITY, first);
    for g in 0..=256 {
        let x = g as f64 / 256.0;
        let ks: Vec<f64> = obs.iter().map(|o| matern52(x - o.0, l)).collect();
        let mu: f64 = ks.iter().zip(&alpha).map(|(a, b)| a * b).sum();
        let v = solve(&ks);
        let var = (1.0 - ks.iter().zip(&v).map(|(a, b)| a * b).sum::<f64>()).max(0.0);
        let lcb = mu - kappa * var.sqrt();
        if lcb < best.0 {
            best = (lcb, x);
        }
    }
    best.1
}

// ---------------------------------------------------------------------------------------------
// Config.

fn min_lr() -> f64 {
    1e-3
}
fn max_lr() -> f64 {
    1e-1
}
fn ten() -> usize {
    10
}
fn sixteenth() -> Time {
    Time::dur(1.0 / 16.0)
}
fn quarter() -> Time {
    Time::dur(0.25)
}
fn tenth() -> f64 {
    0.1
}
fn big_kappa() -> f64 {
    1e6
}
fn zero() -> Time {
    Time::batches(0.0)
}
fn half() -> f64 {
    0.5
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoLrsConfig {
    #[serde(default = "min_lr")]
    pub min_lr: f64,
    #[serde(default = "max_lr")]
    pub max_lr: f64,
    #[serde(default = "ten")]
    pub candidates: usize,
    #[serde(default = "sixteenth")]
    pub tau: Time,
    #[serde(default = "quarter")]
    pub tau_max: Time,
    #[serde(default = "tenth")]
    pub trial_fraction: f64,
    #[serde(default = "big_kappa")]
    pub kappa: f64,
    #[serde(default = "zero")]
    pub start: Time,
    #[serde(default = "half")]
    pub max_search_fraction: f64,
}

impl TimeParams for AutoLrsConfig {
    fn visit_times(&mut self, v: &mut dyn TimeVisitor) {
        v.visit("tau", &mut self.tau, Policy::Scaled);
        v.visit("tau_max", &mut self.tau_max, Policy::Scaled);
        v.visit("start", &mut self.start, Policy::Scaled);
    }
}

/// Where the search stands; saved in checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Phase {
    /// Before `start`, or between stages.
    Idle,
    Trial {
        lr: f64,
        end: u64,
        losses: Vec<f64>,
    },
    Exploit {
        lr: f64,
        end: u64,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotValues {
    values: serde_yaml::Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Progress {
    phase: Phase,
    /// (x in [0, 1] = position of log-LR in the range, forecast loss) of this stage's trials.
    tried: Vec<(f64, f64)>,
    tau: u64,
    stage: u64,
    search_steps: u64,
    last_lr: Option<f64>,
    /// Whether a snapshot is held, with the optimizer's values at it (its tensors are saved
    /// beside the weights). A struct, so that an optimizer without values (SGD) still says Some.
    snapshot_optimizer: Option<SnapshotValues>,
}

struct AutoLrs {
    cfg: AutoLrsConfig,
    path: String,
    tau_max: u64,
    start: u64,
    max_batches: u64,
    rng: recipe_engine::rng::Streams,
    p: Progress,
    /// Weights, buffers and optimizer state at the start of the stage's search.
    snapshot: Option<(Vec<Tensor>, StateDict)>,
}

impl AlgorithmConfig for AutoLrsConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Algorithm>> {
        let key = |k: &str| format!("{}.{k}", ctx.path);
        if !(self.min_lr > 0.0 && self.max_lr > self.min_lr && self.max_lr.is_finite()) {
            return Err(Error::recipe(
                key("max_lr"),
                "the search range needs 0 < min_lr < max_lr",
            ));
        }
        if self.candidates == 0 {
            return Err(Error::recipe(key("candidates"), "must be at least 1"));
        }
        if !(self.trial_fraction > 0.0 && self.trial_fraction <= 1.0) {
            return Err(Error::recipe(key("trial_fraction"), "must be in (0, 1]"));
        }
        if !(self.max_search_fraction > 0.0 && self.max_search_fraction < 1.0) {
            return Err(Error::recipe(
                key("max_search_fraction"),
                "must be in (0, 1)",
            ));
        }
        Ok(Box::new(AutoLrs {
            cfg: self.clone(),
            path: ctx.path.clone(),
            tau_max: ctx.interval("tau_max", &self.tau_max)?,
            start: ctx.batches("start", &self.start)?,
            max_batches: ctx.max_batches(),
            rng: ctx.rng(),
            p: Progress {
                phase: Phase::Idle,
                tried: Vec::new(),
                tau: ctx.interval("tau", &self.tau)?,
                stage: 0,
                search_steps: 0,
                last_lr: None,
                snapshot_optimizer: None,
            },
            snapshot: None,
        }))
    }
}

impl AutoLrs {
    fn lr_of(&self, x: f64) -> f64 {
        let (a, b) = (self.cfg.min_lr.ln(), self.cfg.max_lr.ln());
        (a + x * (b - a))
            .exp()
            .clamp(self.cfg.min_lr, self.cfg.max_lr)
    }

    fn trial_steps(&self) -> u64 {
        ((self.p.tau as f64 * self.cfg.trial_fraction).round() as u64).max(1)
    }

    fn ask(&mut self, batch: u64) -> f64 {
        let first = rand::Rng::random_range(&mut self.rng.at(batch), 0.0..1.0);
        let mut x = next_point(&self.p.tried, self.cfg.kappa, first);
        // An LR already tried: take the least explored grid point instead (skopt re-asks).
        if self.p.tried.iter().any(|t| (t.0 - x).abs() < 1e-9) {
            x = (0..=256)
                .map(|g| g as f64 / 256.0)
                .max_by(|a, b| {
                    let da = self
                        .p
                        .tried
                        .iter()
                        .map(|t| (t.0 - a).abs())
                        .fold(1.0, f64::min);
                    let db = self
                        .p
                        .tried
                        .iter()
                        .map(|t| (t.0 - b).abs())
                        .fold(1.0, f64::min);
                    da.total_cmp(&db)
                })
                .unwrap_or(first);
        }
        x
    }

    fn take_snapshot(&mut self, state: &State) -> Result<()> {
        let params = state
            .model
            .params()
            .iter()
            .map(|p| Ok(p.var.as_tensor().copy()?))
            .collect::<Result<Vec<_>>>()?;
        let opt = state.optimizer.state_dict()?;
        self.p.snapshot_optimizer = Some(SnapshotValues {
            values: opt.values.clone(),
        });
        self.snapshot = Some((params, opt));
        Ok(())
    }

    fn restore(&self, state: &mut State) -> Result<()> {
        let (params, opt) = self
            .snapshot
            .as_ref()
            .ok_or_else(|| Error::msg("autolrs: no snapshot to restore"))?;
        for (p, t) in state.model.params().iter().zip(params) {
            p.var.set(t)?;
        }
        let ps = state.model.params().clone();
        state.optimizer.load_state_dict(opt, &ps)
    }

    /// Starts a stage at `batch`: the search, or, when it no longer fits, the last LR to the end.
    fn begin_stage(&mut self, state: &State, batch: u64) -> Result<()> {
        let search = self.cfg.candidates as u64 * self.trial_steps();
        let left = self.max_batches.saturating_sub(batch);
        let over_budget = (self.p.search_steps + search) as f64
            > self.cfg.max_search_fraction * self.max_batches as f64;
        if search + self.trial_steps() >= left || over_budget {
            let lr = self.p.last_lr.unwrap_or(state.lr);
            self.p.phase = Phase::Exploit {
                lr,
                end: self.max_batches,
            };
            return Ok(());
        }
        self.take_snapshot(state)?;
        self.p.tried.clear();
        let x = self.ask(batch);
        self.p.phase = Phase::Trial {
            lr: self.lr_of(x),
            end: batch + self.trial_steps(),
            losses: Vec::new(),
        };
        Ok(())
    }

    fn end_trial(&mut self, state: &mut State, batch: u64, lr: f64, losses: &[f64]) -> Result<()> {
        let pred = forecast(losses, self.p.tau as f64);
        let (a, b) = (self.cfg.min_lr.ln(), self.cfg.max_lr.ln());
        self.p.tried.push(((lr.ln() - a) / (b - a), pred));
        self.restore(state)?;
        if self.p.tried.len() < self.cfg.candidates {
            let x = self.ask(batch);
            self.p.phase = Phase::Trial {
                lr: self.lr_of(x),
                end: batch + self.trial_steps(),
                losses: Vec::new(),
            };
        } else {
            let best = self
                .p
                .tried
                .iter()
                .min_by(|p, q| p.1.total_cmp(&q.1))
                .map(|t| self.lr_of(t.0))
                .unwrap_or(state.lr);
            tracing::info!(
                "{}: stage {} exploits lr {best:.3e} for {} steps (forecasts: {:?})",
                self.path,
                self.p.stage,
                self.p.tau,
                self.p
                    .tried
                    .iter()
                    .map(|t| (self.lr_of(t.0), t.1))
                    .collect::<Vec<_>>()
            );
            self.p.last_lr = Some(best);
            self.p.phase = Phase::Exploit {
                lr: best,
                end: batch + self.p.tau,
            };
            self.p.stage += 1;
            self.p.tau = (self.p.tau * 2).min(self.tau_max);
            self.snapshot = None;
            self.p.snapshot_optimizer = None;
        }
        Ok(())
    }
}

impl Algorithm for AutoLrs {
    fn matches(&self, event: Event, state: &State) -> bool {
        matches!(event, Event::BatchStart | Event::BatchEnd)
            && (state.timestamp.batch >= self.start || self.p.phase != Phase::Idle)
    }

    fn apply(&mut self, event: Event, state: &mut State) -> Result<()> {
        let b = state.timestamp.batch;
        match event {
            Event::BatchStart => {
                if self.p.phase == Phase::Idle {
                    self.begin_stage(state, b)?;
                }
                state.lr = match &self.p.phase {
                    Phase::Trial { lr, .. } | Phase::Exploit { lr, .. } => *lr,
                    Phase::Idle => state.lr,
                };
            }
            Event::BatchEnd => {
                state.log("autolrs/lr", state.lr);
                match &mut self.p.phase {
                    Phase::Trial { lr, end, losses } => {
                        losses.push(state.last_loss.unwrap_or(f64::NAN));
                        self.p.search_steps += 1;
                        if b >= *end {
                            let (lr, losses) = (*lr, std::mem::take(losses));
                            self.end_trial(state, b, lr, &losses)?;
                        }
                    }
                    Phase::Exploit { end, .. } => {
                        if b >= *end {
                            self.p.phase = Phase::Idle;
                        }
                    }
                    Phase::Idle => {}
                }
                state.log("autolrs/search_steps", self.p.search_steps as f64);
                state.log("autolrs/stage", self.p.stage as f64);
            }
            _ => {}
        }
        Ok(())
    }

    fn state_dict(&self) -> Result<StateDict> {
        let mut sd = StateDict::encode(&self.p);
        if let Some((params, opt)) = &self.snapshot {
            for (i, t) in params.iter().enumerate() {
                sd.tensors.insert(format!("param.{i}"), t.clone());
            }
            for (k, t) in &opt.tensors {
                sd.tensors.insert(format!("optimizer.{k}"), t.clone());
            }
        }
        Ok(sd)
    }

    fn load_state_dict(&mut self, state: &StateDict) -> Result<()> {
        self.p = state.decode("autolrs")?;
        self.snapshot = match &self.p.snapshot_optimizer {
            None => None,
            Some(SnapshotValues { values }) => {
                let mut params = Vec::new();
                while let Some(t) = state.tensors.get(&format!("param.{}", params.len())) {
                    params.push(t.clone());
                }
                let tensors = state
                    .tensors
                    .iter()
                    .filter_map(|(k, t)| {
                        k.strip_prefix("optimizer.")
                            .map(|n| (n.to_string(), t.clone()))
                    })
                    .collect();
                Some((
                    params,
                    StateDict {
                        values: values.clone(),
                        tensors,
                    },
                ))
            }
        };
        Ok(())
    }
}

recipe_engine::register_algorithm!(
    AutoLrsConfig,
    "autolrs",
    "AutoLRS: per-stage LR by Bayesian optimisation over short trials with an exponential loss forecast (Jin et al. 2021).",
    "min_lr: 1.0e-3\nmax_lr: 1.0e-1\ncandidates: 10\ntau: 0.0625dur\ntau_max: 0.25dur\ntrial_fraction: 0.1"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forecast_recovers_an_exponential_and_its_floor() {
        let ys: Vec<f64> = (0..40)
            .map(|x| 2.0 * (-0.1 * x as f64).exp() + 0.5)
            .collect();
        let f = forecast(&ys, 200.0);
        assert!((f - 0.5).abs() < 1e-3, "{f}");
        let f = forecast(&ys, 45.0);
        let want = 2.0 * (-4.5f64).exp() + 0.5;
        assert!((f - want).abs() < 1e-3, "{f} vs {want}");
        assert_eq!(forecast(&[1.0, f64::NAN, 0.5], 10.0), 1e6);
        // Outliers early in the window are dropped before the final fit.
        let mut noisy = ys.clone();
        noisy[3] += 5.0;
        assert!((forecast(&noisy, 200.0) - 0.5).abs() < 0.05);
    }

    #[test]
    fn the_search_explores_away_from_what_it_tried() {
        let x = next_point(&[(0.5, 1.0)], 1e6, 0.3);
        assert!((x - 0.5).abs() > 0.4, "{x}");
        let x = next_point(&[(0.0, 1.0), (1.0, 1.0)], 1e6, 0.3);
        assert!((x - 0.5).abs() < 0.01, "{x}");
        // With little exploration it goes where the forecasts are low.
        let x = next_point(&[(0.1, 0.0), (0.5, 1.0), (0.9, 2.0)], 0.0, 0.3);
        assert!(x < 0.3, "{x}");
    }
}
