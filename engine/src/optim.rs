//! Optimizers of our own, with state that can be saved: SGD (momentum, Nesterov, dampening,
//! coupled or decoupled weight decay) and Adam/AdamW (with AMSGrad). candle-nn's SGD has no
//! momentum and no optimizer exposes its state, so exact resume needs these.
//!
//! Biases and normalisation parameters get no weight decay unless `decay_norm_and_bias: true`.

use crate::error::{join_key, Error, Result};
use crate::model::{ParamKind, ParamStore};
use crate::plugin::{BindContext, PluginConfig, TimeParams};
use crate::state_dict::StateDict;
use candle_core::backprop::GradStore;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub trait Optimizer {
    /// One update of every trainable parameter that has a gradient, at learning rate `lr`.
    fn step(&mut self, params: &ParamStore, grads: &GradStore, lr: f64) -> Result<()>;
    /// The whole state (momentum buffers, moments, step counts), for checkpoints. Tensors are
    /// named `<slot>.<parameter>`, PyTorch's slot names: `momentum_buffer`, `exp_avg`, ...
    fn state_dict(&self) -> Result<StateDict>;
    /// Restores a state saved by `state_dict` for the same parameters.
    fn load_state_dict(&mut self, state: &StateDict, params: &ParamStore) -> Result<()>;
}

/// How a recipe block builds the runtime object.
pub trait OptimizerConfig: PluginConfig {
    /// The base learning rate that the schedule multiplies.
    fn lr(&self) -> f64;
    fn build(&self, ctx: &BindContext, params: &ParamStore) -> Result<Box<dyn Optimizer>>;
}

/// Puts each saved `<slot>.<parameter>` tensor into `slots[slot][index of parameter]`, checking
/// that the parameter exists and the shape matches.
fn load_slots(
    state: &StateDict,
    params: &ParamStore,
    names: &[String],
    slots: &mut [(&str, &mut Vec<Option<Tensor>>)],
) -> Result<()> {
    for v in slots.iter_mut() {
        v.1.iter_mut().for_each(|t| *t = None);
    }
    for (key, t) in &state.tensors {
        let found = slots.iter_mut().find_map(|(slot, v)| {
            key.strip_prefix(*slot)
                .and_then(|r| r.strip_prefix('.'))
                .map(|n| (n, v))
        });
        let Some((name, v)) = found else {
            return Err(Error::msg(format!(
                "the checkpoint's optimizer state has `{key}`, which this optimizer does not keep; was it saved by another optimizer?"
            )));
        };
        let i = names.iter().position(|n| n == name).ok_or_else(|| {
            Error::msg(format!(
                "the checkpoint's optimizer state is for a parameter `{name}` that this model does not have"
            ))
        })?;
        let p = params.trainable().nth(i).map(|p| p.var.dims().to_vec());
        if p.as_deref() != Some(t.dims()) {
            return Err(Error::msg(format!(
                "the checkpoint's optimizer state `{key}` has shape {:?}, the parameter has {:?}",
                t.dims(),
                p.unwrap_or_default()
            )));
        }
        v[i] = Some(t.clone());
    }
    Ok(())
}

fn save_slots(names: &[String], slots: &[(&str, &Vec<Option<Tensor>>)]) -> StateDict {
    let mut out = StateDict::default();
    for (slot, v) in slots {
        for (n, t) in names.iter().zip(v.iter()) {
            if let Some(t) = t {
                out.tensors.insert(format!("{slot}.{n}"), t.clone());
            }
        }
    }
    out
}

fn decays(kind: ParamKind, decay_norm_and_bias: bool) -> bool {
    match kind {
        ParamKind::Weight => true,
        ParamKind::Bias | ParamKind::Norm => decay_norm_and_bias,
        ParamKind::Buffer => false,
    }
}

/// Checks that a hyperparameter lies in `[lo, hi]` (or `[lo, hi)` when `open_hi`), and is a
/// finite number: NaN, infinities and values that would blow training up at the first step are
/// refused at validation, not discovered as NaN weights.
fn check_range(key: &str, v: f64, lo: f64, hi: f64, open_hi: bool, what: &str) -> Result<()> {
    let above = if open_hi { v >= hi } else { v > hi };
    if !v.is_finite() || v < lo || above {
        let range = if open_hi {
            format!("[{lo}, {hi})")
        } else {
            format!("[{lo}, {hi}]")
        };
        return Err(Error::recipe_hint(
            join_key("optimizer", key),
            format!("{v} is out of range: {what} must be a finite number in {range}"),
            "see `recipe list --examples` for typical values",
        ));
    }
    Ok(())
}

/// A learning rate above this diverges at the first steps for any model here.
const MAX_LR: f64 = 100.0;

fn check_lr(lr: f64) -> Result<()> {
    check_range("lr", lr, 0.0, MAX_LR, false, "the learning rate")
}

fn check_weight_decay(wd: f64) -> Result<()> {
    check_range("weight_decay", wd, 0.0, 1.0, false, "the weight decay")
}

/// What one parameter's update starts from.
struct Update<'a> {
    /// The parameter's slot in the optimizer's state.
    i: usize,
    param: &'a crate::model::Param,
    /// Its current value, detached.
    w: Tensor,
    /// Its gradient, with coupled (L2) weight decay already added.
    g: Tensor,
    /// Decoupled weight decay still to apply (0 when coupled or when the parameter is exempt).
    decoupled_wd: f64,
}

/// The trainable parameters that have a gradient, with weight decay applied the way the optimizer
/// wants it (coupled into the gradient, or handed back to apply apart).
fn updates<'a>(
    params: &'a ParamStore,
    grads: &GradStore,
    weight_decay: f64,
    decay_norm_and_bias: bool,
    decoupled: bool,
) -> Result<Vec<Update<'a>>> {
    let mut out = Vec::new();
    for (i, param) in params.trainable().enumerate() {
        let Some(g) = grads.get(param.var.as_tensor()) else {
            continue;
        };
        let w = param.var.as_tensor().detach();
        let wd = if decays(param.kind, decay_norm_and_bias) {
            weight_decay
        } else {
            0.0
        };
        let mut g = g.detach();
        if wd != 0.0 && !decoupled {
            g = (g + (&w * wd)?)?;
        }
        out.push(Update {
            i,
            param,
            w,
            g,
            decoupled_wd: if decoupled { wd } else { 0.0 },
        });
    }
    Ok(out)
}

/// Warns once about trainable parameters that received no gradient (a silently cut graph).
fn warn_missing_grads(params: &ParamStore, grads: &GradStore, warned: &mut bool) {
    if *warned {
        return;
    }
    *warned = true;
    let missing: Vec<&str> = params
        .trainable()
        .filter(|p| grads.get(p.var.as_tensor()).is_none())
        .map(|p| p.name.as_str())
        .collect();
    if !missing.is_empty() {
        tracing::warn!(
            "{} trainable parameters received no gradient: {}",
            missing.len(),
            missing.join(", ")
        );
    }
}

// ---------------------------------------------------------------------------------------------

fn default_sgd_lr() -> f64 {
    0.1
}

/// SGD with momentum (PyTorch semantics).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SgdConfig {
    #[serde(default = "default_sgd_lr")]
    pub lr: f64,
    #[serde(default)]
    pub momentum: f64,
    #[serde(default)]
    pub dampening: f64,
    #[serde(default)]
    pub nesterov: bool,
    #[serde(default)]
    pub weight_decay: f64,
    /// Composer's DecoupledSGDW: decay by `(lr / base_lr) * weight_decay`, apart from the gradient.
    #[serde(default)]
    pub decoupled_weight_decay: bool,
    #[serde(default)]
    pub decay_norm_and_bias: bool,
}

impl TimeParams for SgdConfig {}

struct Sgd {
    cfg: SgdConfig,
    buffers: Vec<Option<Tensor>>,
    names: Vec<String>,
    warned: bool,
}

impl OptimizerConfig for SgdConfig {
    fn lr(&self) -> f64 {
        self.lr
    }
    fn build(&self, _ctx: &BindContext, params: &ParamStore) -> Result<Box<dyn Optimizer>> {
        check_lr(self.lr)?;
        check_range("momentum", self.momentum, 0.0, 1.0, true, "the momentum")?;
        check_range(
            "dampening",
            self.dampening,
            0.0,
            1.0,
            false,
            "the dampening",
        )?;
        check_weight_decay(self.weight_decay)?;
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            return Err(Error::recipe(
                "optimizer.nesterov",
                "Nesterov momentum needs momentum > 0 and dampening 0",
            ));
        }
        let names: Vec<String> = params.trainable().map(|p| p.name.clone()).collect();
        Ok(Box::new(Sgd {
            cfg: self.clone(),
            buffers: vec![None; names.len()],
            names,
            warned: false,
        }))
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, params: &ParamStore, grads: &GradStore, lr: f64) -> Result<()> {
        warn_missing_grads(params, grads, &mut self.warned);
        let c = &self.cfg;
        for Update {
            i,
            param: p,
            w,
            mut g,
            decoupled_wd: wd,
        } in updates(
            params,
            grads,
            c.weight_decay,
            c.decay_norm_and_bias,
            c.decoupled_weight_decay,
        )? {
            if c.momentum != 0.0 {
                let buf = match self.buffers[i].take() {
                    None => g.clone(),
                    Some(b) => ((b * c.momentum)? + (&g * (1.0 - c.dampening))?)?,
                };
                g = if c.nesterov {
                    (g + (&buf * c.momentum)?)?
                } else {
                    buf.clone()
                };
                self.buffers[i] = Some(buf);
            }
            let mut w_new = (&w - (g * lr)?)?;
            if wd != 0.0 && c.lr > 0.0 {
                w_new = (w_new - (&w * (lr / c.lr * wd))?)?;
            }
            p.var.set(&w_new)?;
        }
        Ok(())
    }

    fn state_dict(&self) -> Result<StateDict> {
        Ok(save_slots(
            &self.names,
            &[("momentum_buffer", &self.buffers)],
        ))
    }

    fn load_state_dict(&mut self, state: &StateDict, params: &ParamStore) -> Result<()> {
        load_slots(
            state,
            params,
            &self.names,
            &mut [("momentum_buffer", &mut self.buffers)],
        )
    }
}

/// `sgd` with decoupled weight decay on by default.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DecoupledSgdwConfig {
    pub sgd: SgdConfig,
}

impl TimeParams for DecoupledSgdwConfig {}

impl OptimizerConfig for DecoupledSgdwConfig {
    fn lr(&self) -> f64 {
        self.sgd.lr
    }
    fn build(&self, ctx: &BindContext, params: &ParamStore) -> Result<Box<dyn Optimizer>> {
        SgdConfig {
            decoupled_weight_decay: true,
            ..self.sgd.clone()
        }
        .build(ctx, params)
    }
}

// ---------------------------------------------------------------------------------------------

fn default_adam_lr() -> f64 {
    1e-3
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}

/// Adam with L2 weight decay folded into the gradient (PyTorch's Adam); `adamw` decouples it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamConfig {
    #[serde(default = "default_adam_lr")]
    pub lr: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default)]
    pub amsgrad: bool,
    #[serde(default)]
    pub decay_norm_and_bias: bool,
}

impl TimeParams for AdamConfig {}

struct Adam {
    cfg: AdamConfig,
    decoupled: bool,
    /// Steps taken by each parameter (a parameter without a gradient does not step).
    steps: Vec<u64>,
    names: Vec<String>,
    m: Vec<Option<Tensor>>,
    v: Vec<Option<Tensor>>,
    v_max: Vec<Option<Tensor>>,
    warned: bool,
}

impl AdamConfig {
    fn build_adam(&self, params: &ParamStore, decoupled: bool) -> Result<Box<dyn Optimizer>> {
        check_lr(self.lr)?;
        check_weight_decay(self.weight_decay)?;
        check_range("eps", self.eps, f64::MIN_POSITIVE, 1.0, false, "eps")?;
        if self.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            return Err(Error::recipe(
                "optimizer.betas",
                "each beta must be in [0, 1)",
            ));
        }
        let names: Vec<String> = params.trainable().map(|p| p.name.clone()).collect();
        let n = names.len();
        Ok(Box::new(Adam {
            cfg: self.clone(),
            decoupled,
            steps: vec![0; n],
            names,
            m: vec![None; n],
            v: vec![None; n],
            v_max: vec![None; n],
            warned: false,
        }))
    }
}

impl OptimizerConfig for AdamConfig {
    fn lr(&self) -> f64 {
        self.lr
    }
    fn build(&self, _ctx: &BindContext, params: &ParamStore) -> Result<Box<dyn Optimizer>> {
        self.build_adam(params, false)
    }
}

/// AdamW: Adam with decoupled weight decay `w <- w (1 - lr * weight_decay)` (PyTorch's AdamW).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AdamWConfig {
    pub adam: AdamConfig,
}

impl TimeParams for AdamWConfig {}

impl OptimizerConfig for AdamWConfig {
    fn lr(&self) -> f64 {
        self.adam.lr
    }
    fn build(&self, _ctx: &BindContext, params: &ParamStore) -> Result<Box<dyn Optimizer>> {
        self.adam.build_adam(params, true)
    }
}

/// Adam's saved values: the step count of each parameter.
#[derive(Serialize, Deserialize)]
struct AdamSaved {
    steps: BTreeMap<String, u64>,
}

impl Optimizer for Adam {
    fn step(&mut self, params: &ParamStore, grads: &GradStore, lr: f64) -> Result<()> {
        warn_missing_grads(params, grads, &mut self.warned);
        let c = &self.cfg;
        let [b1, b2] = c.betas;
        for Update {
            i,
            param: p,
            w,
            g,
            decoupled_wd: wd,
        } in updates(
            params,
            grads,
            c.weight_decay,
            c.decay_norm_and_bias,
            self.decoupled,
        )? {
            self.steps[i] += 1;
            let t = self.steps[i].min(i32::MAX as u64) as i32;
            let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
            let m = match self.m[i].take() {
                None => (&g * (1.0 - b1))?,
                Some(m) => ((m * b1)? + (&g * (1.0 - b1))?)?,
            };
            let g2 = g.sqr()?;
            let v = match self.v[i].take() {
                None => (g2 * (1.0 - b2))?,
                Some(v) => ((v * b2)? + (g2 * (1.0 - b2))?)?,
            };
            let v_used = if c.amsgrad {
                let vm = match self.v_max[i].take() {
                    None => v.clone(),
                    Some(vm) => vm.maximum(&v)?,
                };
                self.v_max[i] = Some(vm.clone());
                vm
            } else {
                v.clone()
            };
            let denom = ((v_used / bc2)?.sqrt()? + c.eps)?;
            let update = ((&m / bc1)? / denom)?;
            let mut w_new = w.clone();
            if wd != 0.0 {
                w_new = (w_new * (1.0 - lr * wd))?;
            }
            w_new = (w_new - (update * lr)?)?;
            p.var.set(&w_new)?;
            self.m[i] = Some(m);
            self.v[i] = Some(v);
        }
        Ok(())
    }

    fn state_dict(&self) -> Result<StateDict> {
        let mut out = save_slots(
            &self.names,
            &[
                ("exp_avg", &self.m),
                ("exp_avg_sq", &self.v),
                ("max_exp_avg_sq", &self.v_max),
            ],
        );
        let steps = self
            .names
            .iter()
            .cloned()
            .zip(self.steps.iter().copied())
            .collect();
        out.values = serde_yaml::to_value(AdamSaved { steps })
            .map_err(|e| Error::msg(format!("cannot save the optimizer state: {e}")))?;
        Ok(out)
    }

    fn load_state_dict(&mut self, state: &StateDict, params: &ParamStore) -> Result<()> {
        load_slots(
            state,
            params,
            &self.names,
            &mut [
                ("exp_avg", &mut self.m),
                ("exp_avg_sq", &mut self.v),
                ("max_exp_avg_sq", &mut self.v_max),
            ],
        )?;
        let saved: AdamSaved = state.decode("optimizer")?;
        for (i, n) in self.names.iter().enumerate() {
            self.steps[i] = saved.steps.get(n).copied().unwrap_or(0);
        }
        Ok(())
    }
}

crate::register_optimizer!(
    SgdConfig,
    "sgd",
    "SGD with momentum, Nesterov, dampening, coupled or decoupled weight decay.",
    "lr: 0.1\nmomentum: 0.9\nnesterov: true\nweight_decay: 5.0e-4"
);
crate::register_optimizer!(DecoupledSgdwConfig, "decoupled_sgdw", "SGD with weight decay decoupled from the gradient, scaled by lr/base_lr (Composer's DecoupledSGDW).", "lr: 2.048\nmomentum: 0.875\nweight_decay: 5.0e-5");
crate::register_optimizer!(
    AdamConfig,
    "adam",
    "Adam (L2 weight decay in the gradient), optional AMSGrad.",
    "lr: 1.0e-3\nbetas: [0.9, 0.999]\neps: 1.0e-8\namsgrad: false"
);
crate::register_optimizer!(
    AdamWConfig,
    "adamw",
    "AdamW: Adam with decoupled weight decay, optional AMSGrad.",
    "lr: 1.0e-3\nweight_decay: 0.01"
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ParamBuilder;
    use candle_core::{Device, Var};

    fn ctx() -> BindContext {
        BindContext::standalone(&Device::Cpu, [1, 1, 1], 1, 1).with_path("optimizer")
    }

    /// One weight w=[1, -2] and one bias b=[0.5]; loss = sum(w * [3, 4]) + 2 b, so grads are
    /// constant: dw = [3, 4], db = [2].
    fn run(cfg: &dyn OptimizerConfig, steps: usize, lr: f64) -> (Vec<f32>, Vec<f32>) {
        let mut b = ParamBuilder::new(0, &Device::Cpu);
        let ps = ParamStore::new(vec![
            b.constant("w".into(), &[2], 0.0, ParamKind::Weight)
                .unwrap(),
            b.constant("z.bias".into(), &[1], 0.0, ParamKind::Bias)
                .unwrap(),
        ])
        .unwrap();
        let w: &Var = &ps.iter().next().unwrap().var;
        let bias: &Var = &ps.iter().nth(1).unwrap().var;
        w.set(&Tensor::new(&[1.0f32, -2.0], &Device::Cpu).unwrap())
            .unwrap();
        bias.set(&Tensor::new(&[0.5f32], &Device::Cpu).unwrap())
            .unwrap();
        let mut opt = cfg.build(&ctx(), &ps).unwrap();
        let k = Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap();
        for _ in 0..steps {
            let loss = ((w.as_tensor() * &k).unwrap().sum_all().unwrap()
                + (bias.as_tensor() * 2.0).unwrap().sum_all().unwrap())
            .unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&ps, &grads, lr).unwrap();
        }
        (
            w.as_tensor().to_vec1().unwrap(),
            bias.as_tensor().to_vec1().unwrap(),
        )
    }

    fn close(a: &[f32], b: &[f64]) {
        for (x, y) in a.iter().zip(b) {
            assert!((*x as f64 - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn sgd_momentum_nesterov_and_weight_decay_by_hand() {
        let base = SgdConfig {
            lr: 0.1,
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 0.0,
            decoupled_weight_decay: false,
            decay_norm_and_bias: false,
        };
        let (w, b) = run(&base, 1, 0.1);
        close(&w, &[0.7, -2.4]);
        close(&b, &[0.3]);
        // momentum 0.9, two steps: buf1 = g, buf2 = 0.9 g + g = 1.9 g; total = 2.9 g * lr
        let (w, _) = run(
            &SgdConfig {
                momentum: 0.9,
                ..base.clone()
            },
            2,
            0.1,
        );
        close(&w, &[1.0 - 0.29 * 3.0, -2.0 - 0.29 * 4.0]);
        // nesterov: step1 uses g + 0.9 g = 1.9 g; step2 uses g + 0.9 * 1.9 g = 2.71 g; total 4.61 g
        let (w, _) = run(
            &SgdConfig {
                momentum: 0.9,
                nesterov: true,
                ..base.clone()
            },
            2,
            0.1,
        );
        close(&w, &[1.0 - 0.461 * 3.0, -2.0 - 0.461 * 4.0]);
        // coupled weight decay 0.5 on the weight only: g = 3 + 0.5 * 1 = 3.5
        let (w, b) = run(
            &SgdConfig {
                weight_decay: 0.5,
                ..base.clone()
            },
            1,
            0.1,
        );
        close(&w, &[1.0 - 0.35, -2.0 - 0.1 * (4.0 - 1.0)]);
        close(&b, &[0.3]);
        let (_, b) = run(
            &SgdConfig {
                weight_decay: 0.5,
                decay_norm_and_bias: true,
                ..base.clone()
            },
            1,
            0.1,
        );
        close(&b, &[0.5 - 0.1 * (2.0 + 0.25)]);
        // decoupled at lr = base lr / 2: w - lr g - (lr / base) wd w
        let (w, _) = run(
            &SgdConfig {
                weight_decay: 0.5,
                decoupled_weight_decay: true,
                ..base.clone()
            },
            1,
            0.05,
        );
        close(&w, &[1.0 - 0.15 - 0.25, -2.0 - 0.2 + 0.5]);
    }

    #[test]
    fn adam_first_step_moves_by_lr_in_the_sign_of_the_gradient() {
        let cfg = AdamConfig {
            lr: 0.01,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.0,
            amsgrad: false,
            decay_norm_and_bias: false,
        };
        let (w, _) = run(&cfg, 1, 0.01);
        close(&w, &[0.99, -2.01]);
        // constant gradient: every step moves by lr (bias correction makes m/sqrt(v) = 1)
        let (w, _) = run(&cfg, 3, 0.01);
        close(&w, &[0.97, -2.03]);
        let (w, _) = run(
            &AdamConfig {
                amsgrad: true,
                ..cfg.clone()
            },
            3,
            0.01,
        );
        close(&w, &[0.97, -2.03]);
        // AdamW: decoupled decay w (1 - lr wd) before the step
        let (w, _) = run(
            &AdamWConfig {
                adam: AdamConfig {
                    weight_decay: 0.1,
                    ..cfg
                },
            },
            1,
            0.01,
        );
        close(
            &w,
            &[1.0 * (1.0 - 0.001) - 0.01, -2.0 * (1.0 - 0.001) - 0.01],
        );
    }
}
