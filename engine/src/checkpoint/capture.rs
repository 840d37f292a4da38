//! Capture and restore: everything of a live run that a checkpoint holds, taken from the run
//! (`capture`) and put back into a freshly built one (`restore`), and what differs between a
//! checkpoint and the run that wants to continue from it (`differences`).

use super::format::{Checkpoint, CheckpointMeta, ClockMeta, FORMAT_VERSION};
use crate::algorithm::Algorithm;
use crate::callback::Callback;
use crate::error::{join_key, Error, Result};
use crate::schedule::Schedule;
use crate::state::State;
use crate::state_dict::StateDict;
use crate::time::Clock;
use candle_core::Tensor;
use serde_yaml::Value;
use std::collections::{BTreeMap, BTreeSet};

/// A plugin whose state a checkpoint carries (a schedule, an algorithm, a callback; the
/// optimizer is the run state's own).
pub trait PluginState {
    fn state_dict(&self) -> Result<StateDict>;
    fn load_state_dict(&mut self, state: &StateDict) -> Result<()>;
}

macro_rules! plugin_state {
    ($($t:path),*) => {$(
        impl PluginState for Box<dyn $t> {
            fn state_dict(&self) -> Result<StateDict> {
                <dyn $t as $t>::state_dict(self.as_ref())
            }
            fn load_state_dict(&mut self, state: &StateDict) -> Result<()> {
                <dyn $t as $t>::load_state_dict(self.as_mut(), state)
            }
        }
    )*};
}
plugin_state!(Algorithm, Callback, Schedule);

/// The key of a plugin's state in a checkpoint: its place and its name
/// (`callbacks[2]:early_stopper`), so that two plugins of one kind never collide.
pub fn plugin_key(path: &str, name: &str) -> String {
    format!("{path}:{name}")
}

/// What a checkpoint holds besides the run state and the plugins.
pub struct RunInfo<'a> {
    /// The recipe as given: the file with every `--set` applied.
    pub recipe_given: &'a Value,
    pub scale_ratio: f64,
    /// Wall time of the run so far, across resumes.
    pub elapsed_seconds: f64,
    /// The part of it spent evaluating.
    pub eval_seconds: f64,
    /// The dataset's class names, when it has them.
    pub classes: Option<&'a [String]>,
}

/// Everything a checkpoint holds, from the live run: the metadata and the tensors (the model's
/// as `model/<name>`, each plugin's as `<key>/<name>`). `optimizer_key` names the run state's
/// optimizer; `plugins` are the other plugins with their keys, in recipe order.
pub fn capture(
    state: &State,
    optimizer_key: &str,
    plugins: &[(&str, &dyn PluginState)],
    run: &RunInfo,
) -> Result<(CheckpointMeta, Vec<(String, Tensor)>)> {
    let mut tensors = Vec::new();
    let mut model_tensors = Vec::new();
    for p in state.model.params().iter() {
        model_tensors.push(p.name.clone());
        tensors.push((format!("model/{}", p.name), p.var.as_tensor().clone()));
    }
    let mut saved = BTreeMap::new();
    let mut add = |key: &str, sd: StateDict| {
        if sd.is_empty() {
            return;
        }
        for (n, t) in sd.tensors {
            tensors.push((format!("{key}/{n}"), t));
        }
        saved.insert(key.to_string(), sd.values);
    };
    add(optimizer_key, state.optimizer.state_dict()?);
    for (key, p) in plugins {
        add(key, p.state_dict()?);
    }
    let meta = CheckpointMeta {
        format: FORMAT_VERSION,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        recipe_name: state.run_name.clone(),
        recipe: run.recipe_given.clone(),
        classes: run.classes.map(<[String]>::to_vec),
        scale_ratio: run.scale_ratio,
        seed: state.seed,
        clock: ClockMeta {
            batches_per_epoch: state.clock.batches_per_epoch,
            samples_per_batch: state.clock.samples_per_batch,
            max_batches: state.max_batches(),
        },
        timestamp: state.timestamp.clone(),
        epoch_metrics: state.epoch_metrics,
        last_eval: state.last_eval,
        last_loss: state.last_loss,
        lr: Some(state.lr),
        stop_reason: state.stop_reason.clone(),
        elapsed_seconds: run.elapsed_seconds,
        eval_seconds: run.eval_seconds,
        architecture: state.model.network().map(|n| n.architecture()),
        rewrites: state
            .model
            .network()
            .map_or_else(Vec::new, |n| n.rewrites().to_vec()),
        world_size: state.world_size as u64,
        plugins: saved,
        model_tensors,
    };
    Ok((meta, tensors))
}

fn cannot_resume(ckpt: &Checkpoint, e: Error) -> Error {
    Error::msg(format!("cannot resume from {}: {e}", ckpt.path.display()))
}

/// How the checkpoint's module tree differs from the run's, if it does: only when the rewrites
/// differ with `rewrites_only`.
fn tree_mismatch(ckpt: &Checkpoint, state: &State, rewrites_only: bool) -> Option<Error> {
    let theirs = ckpt.meta.architecture.as_ref()?;
    let net = state.model.network()?;
    let ours = net.architecture();
    if *theirs == ours {
        return None;
    }
    let same_rewrites = ckpt.meta.rewrites.as_slice() == net.rewrites();
    if same_rewrites && rewrites_only {
        return None;
    }
    let first = theirs
        .iter()
        .zip(&ours)
        .find(|(a, b)| a != b)
        .map(|(a, b)| format!("the checkpoint has `{a}` where this run builds `{b}`"))
        .unwrap_or_else(|| {
            format!(
                "the checkpoint's model has {} modules, this run's {}",
                theirs.len(),
                ours.len()
            )
        });
    if same_rewrites {
        return Some(Error::msg(format!(
            "its model is built differently: {first}; resume with the model settings it was written with"
        )));
    }
    let said = |r: &[String]| {
        if r.is_empty() {
            "none".to_string()
        } else {
            r.join("; ")
        }
    };
    Some(Error::msg(format!(
        "its model was rewritten differently: {first}\n  the checkpoint's rewrites: {}\n  this run's rewrites: {}\n  hint: resume with the algorithms, sync_batchnorm and precision that wrote it (module surgery is part of the model)",
        said(&ckpt.meta.rewrites),
        said(net.rewrites())
    )))
}

/// Checks, without changing anything, that a checkpoint can be restored into a built run: a
/// value of the right shape for every model parameter, and no state for a plugin the run does
/// not have (unless `force`). `keys` are the run's plugin keys, the optimizer's included.
pub fn check_restorable(
    ckpt: &Checkpoint,
    state: &State,
    keys: &[&str],
    force: bool,
) -> Result<()> {
    let at = |e: Error| cannot_resume(ckpt, e);
    // Even with --force: weights of a tree rewritten differently would load into modules that
    // mean something else (a blurred convolution's kernel into a plain one). A different
    // rewrite is named first; another model otherwise shows in its names and shapes first.
    if let Some(e) = tree_mismatch(ckpt, state, true) {
        return Err(at(e));
    }
    let saved = ckpt.model_tensors();
    for p in state.model.params().iter() {
        let t = saved.get(&p.name).ok_or_else(|| {
            at(Error::msg(format!(
                "it has no value for the model's `{}`; it was saved from another model",
                p.name
            )))
        })?;
        if t.dims() != p.var.dims() {
            return Err(at(Error::msg(format!(
                "its `{}` has shape {:?}, the model has {:?}",
                p.name,
                t.dims(),
                p.var.dims()
            ))));
        }
    }
    if let Some(e) = tree_mismatch(ckpt, state, false) {
        return Err(at(e));
    }
    let extra: Vec<&str> = ckpt
        .meta
        .plugins
        .keys()
        .map(String::as_str)
        .filter(|k| !keys.contains(k))
        .collect();
    if !extra.is_empty() && !force {
        return Err(at(Error::msg(format!(
            "the checkpoint holds state for {} that this recipe does not have; pass --force to drop it",
            extra.join(", ")
        ))));
    }
    Ok(())
}

/// Puts a checkpoint's state into a freshly built run: the model's values, the optimizer's and
/// every plugin's state (moved to the run's device), the timestamp and the running metrics,
/// after `check_restorable`. State for a plugin the run does not have is dropped with a warning
/// when `force`. Returns the run's wall time up to the checkpoint.
pub fn restore(
    ckpt: &Checkpoint,
    state: &mut State,
    optimizer_key: &str,
    plugins: &mut [(&str, &mut dyn PluginState)],
    force: bool,
) -> Result<f64> {
    let keys: Vec<&str> = std::iter::once(optimizer_key)
        .chain(plugins.iter().map(|(k, _)| *k))
        .collect();
    check_restorable(ckpt, state, &keys, force)?;
    let dropped: Vec<&String> = ckpt
        .meta
        .plugins
        .keys()
        .filter(|k| !keys.contains(&k.as_str()))
        .collect();
    let at = |e: Error| cannot_resume(ckpt, e);
    let saved = ckpt.model_tensors();
    for p in state.model.params().iter() {
        // Present and of the right shape: `check_restorable`.
        if let Some(t) = saved.get(&p.name) {
            p.var
                .set(&t.to_dtype(p.var.dtype())?.to_device(&state.device)?)?;
        }
    }
    let device = state.device.clone();
    let restore_one = |key: &str, load: &mut dyn FnMut(&StateDict) -> Result<()>| -> Result<()> {
        match ckpt.plugin(key) {
            Some(mut sd) => {
                // Checkpoints are read onto the CPU; plugin state follows the run's device.
                for t in sd.tensors.values_mut() {
                    *t = t.to_device(&device)?;
                }
                load(&sd).map_err(|e| at(Error::msg(format!("{key}: {e}"))))
            }
            None => Ok(()),
        }
    };
    let params = state.model.params().clone();
    let opt = &mut state.optimizer;
    restore_one(optimizer_key, &mut |sd| opt.load_state_dict(sd, &params))?;
    for (key, p) in plugins.iter_mut() {
        restore_one(key, &mut |sd| p.load_state_dict(sd))?;
    }
    if !dropped.is_empty() {
        tracing::warn!(
            "the checkpoint holds state for {} that this recipe does not have; dropped (--force)",
            dropped
                .iter()
                .map(|k| k.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let m = &ckpt.meta;
    state.timestamp = m.timestamp.clone();
    state.epoch_metrics = m.epoch_metrics;
    state.last_eval = m.last_eval;
    state.last_loss = m.last_loss;
    if let Some(lr) = m.lr {
        state.lr = lr;
    }
    state.stop_reason = m.stop_reason.clone();
    state.last_checkpoint = Some(ckpt.path.clone());
    Ok(m.elapsed_seconds)
}

/// What differs between a checkpoint and the run that wants to resume from it.
pub fn differences(meta: &CheckpointMeta, given: &Value, ratio: f64, clock: &Clock) -> Vec<String> {
    let mut d = Vec::new();
    if meta.scale_ratio != ratio {
        d.push(format!(
            "scale ratio: {} -> {ratio} (the checkpoint's run is {} batches long)",
            meta.scale_ratio, meta.clock.max_batches
        ));
    }
    d.extend(recipe_differences(&meta.recipe, given));
    let now = ClockMeta {
        batches_per_epoch: clock.batches_per_epoch,
        samples_per_batch: clock.samples_per_batch,
        max_batches: clock.max_batches.unwrap_or(0),
    };
    if meta.clock != now {
        d.push(format!(
            "resolved clock: {} batches per epoch of {} samples, run of {} batches -> {} of {}, run of {} (did the dataset change?)",
            meta.clock.batches_per_epoch,
            meta.clock.samples_per_batch,
            meta.clock.max_batches,
            now.batches_per_epoch,
            now.samples_per_batch,
            now.max_batches
        ));
    }
    d
}

/// Flattens a YAML value into `key.path = value` lines.
fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, String>) {
    match v {
        Value::Mapping(m) => {
            for (k, v) in m {
                let k = match k {
                    Value::String(s) => s.clone(),
                    other => serde_yaml::to_string(other)
                        .unwrap_or_default()
                        .trim()
                        .to_string(),
                };
                flatten(&join_key(prefix, &k), v, out);
            }
        }
        Value::Sequence(s) => {
            for (i, v) in s.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), v, out);
            }
        }
        Value::Tagged(t) => flatten(prefix, &t.value, out),
        other => {
            let text = serde_yaml::to_string(other)
                .unwrap_or_default()
                .trim()
                .to_string();
            out.insert(prefix.to_string(), text);
        }
    }
}

/// The differences between two recipes, one line per key: `optimizer.lr: 0.1 -> 0.2`. Keys that
/// only say where files go (`run_dir`) are ignored.
pub fn recipe_differences(saved: &Value, now: &Value) -> Vec<String> {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", saved, &mut a);
    flatten("", now, &mut b);
    // Where the run writes and how many threads prepare data change no result.
    let ignored = |k: &str| matches!(k, "run_dir" | "data.workers" | "data.prefetch");
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| !ignored(k))
        .filter_map(|k| match (a.get(k), b.get(k)) {
            (Some(x), Some(y)) if x == y => None,
            (Some(x), Some(y)) => Some(format!("{k}: {x} -> {y}")),
            (Some(x), None) => Some(format!("{k}: {x} -> (absent)")),
            (None, Some(y)) => Some(format!("{k}: (absent) -> {y}")),
            (None, None) => None,
        })
        .collect()
}
