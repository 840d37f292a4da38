//! Recipes: the YAML schema (this file: top-level keys, plugin blocks, the walk over every time
//! parameter, the clock, recipe transforms), `--set` overrides (`set.rs`) and where a key is in
//! the file (`locate.rs`). Errors name the file, line and key, and what to do.
//!
//! ```yaml
//! name: quickstart
//! seed: 17
//! max_duration: 5ep
//! eval_interval: 1ep
//! data: {name: fashion_mnist_mini, batch_size: 128}
//! model: {name: small_cnn}
//! optimizer: {name: sgd, lr: 0.1, momentum: 0.9}
//! schedule: {name: cosine, t_warmup: 0.5ep}
//! algorithms:
//!   - {name: label_smoothing, smoothing: 0.1}
//! callbacks:
//!   - lr_monitor
//! ```

use crate::algorithm::AlgorithmConfig;
use crate::callback::CallbackConfig;
use crate::data::DatasetConfig;
mod locate;
mod set;

pub use locate::{locate_line, RecipeSource};
pub use set::{apply_override, entry_name};

use set::describe;

use crate::data::{DatasetInfo, LoaderConfig};
use crate::error::{join_key, Error, Result};
use crate::model::ModelConfig;
use crate::optim::OptimizerConfig;
use crate::plugin::{nearest, parse_block, Policy};
use crate::registry::{lookup, Kind, Registration};
use crate::schedule::ScheduleConfig;
use crate::time::{Clock, Time};
use crate::transform::{RecipeTransform, RecipeView};
use serde_yaml::{Mapping, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One plugin in a recipe: its registered name, its place (`algorithms[1]`), its parsed config,
/// and any recipe-level override of its time parameters' policies.
pub struct Spec<C: ?Sized> {
    pub name: String,
    pub path: String,
    pub config: Box<C>,
    pub scale_policy: BTreeMap<String, Policy>,
}

impl<C: ?Sized + crate::plugin::PluginConfig> Spec<C> {
    fn visit(&mut self, f: &mut dyn FnMut(&str, &str, &mut Time, Policy)) {
        let path = self.path.clone();
        let name = self.name.clone();
        let policies = &self.scale_policy;
        self.config
            .visit_times(&mut |key: &str, t: &mut Time, p: Policy| {
                let base = key.split('[').next().unwrap_or(key);
                let p = policies
                    .get(key)
                    .or_else(|| policies.get(base))
                    .copied()
                    .unwrap_or(p);
                f(&join_key(&path, key), &name, t, p)
            });
    }

    /// The block as YAML: `name` first, then every key with its default filled in.
    pub fn to_yaml(&self) -> Value {
        let mut m = Mapping::new();
        m.insert("name".into(), Value::String(self.name.clone()));
        if let Value::Mapping(c) = self.config.to_yaml() {
            m.extend(c);
        }
        if !self.scale_policy.is_empty() {
            m.insert(
                "scale_policy".into(),
                serde_yaml::to_value(&self.scale_policy).unwrap_or(Value::Null),
            );
        }
        Value::Mapping(m)
    }
}

/// The `data` block: a dataset plugin and the loader settings.
pub struct DataSpec {
    pub dataset: Spec<dyn DatasetConfig>,
    pub loader: LoaderConfig,
}

/// One time parameter of a recipe, as the table of `recipe show` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct TimeRow {
    /// Full key path: `schedule.t_warmup`, `algorithms[0].delay`.
    pub key: String,
    /// The plugin that owns it (`cosine`), or `recipe` for top-level keys.
    pub owner: String,
    pub time: Time,
    pub policy: Policy,
}

pub struct Recipe {
    pub source: RecipeSource,
    /// The tree after overrides, before transforms: what reproduces the run.
    pub raw: Value,
    pub name: String,
    pub seed: u64,
    pub max_duration: Time,
    pub eval_interval: Time,
    /// Folder in which run folders are created.
    pub runs_dir: PathBuf,
    pub device: String,
    pub data: DataSpec,
    pub model: Spec<dyn ModelConfig>,
    pub optimizer: Spec<dyn OptimizerConfig>,
    pub schedule: Option<Spec<dyn ScheduleConfig>>,
    pub algorithms: Vec<Spec<dyn AlgorithmConfig>>,
    pub callbacks: Vec<Spec<dyn CallbackConfig>>,
    /// Policy overrides for the top-level times (`max_duration`, `eval_interval`).
    pub scale_policy: BTreeMap<String, Policy>,
    /// The product of every scale ratio applied by transforms so far.
    pub scale_ratio: f64,
    /// Gradient accumulation (Composer's `device_train_microbatch_size`): each batch runs forward
    /// and backward in microbatches of this many samples, and the optimizer steps once per
    /// batch with the gradient of the whole batch. Times stay in whole batches.
    pub microbatch_size: Option<usize>,
    /// Data parallel (`sync_batchnorm: true`): every batch norm normalises with the statistics
    /// of the whole global batch, summed across ranks (PyTorch's `SyncBatchNorm`), instead of
    /// each rank's share. The same model on one process.
    pub sync_batchnorm: bool,
    /// `precision: fp32 | amp_bf16 | amp_fp16` (`crate::precision`).
    pub precision: crate::precision::Precision,
    prepared: bool,
}

const TOP_KEYS: &[&str] = &[
    "name",
    "seed",
    "max_duration",
    "eval_interval",
    "run_dir",
    "device",
    "data",
    "model",
    "optimizer",
    "schedule",
    "algorithms",
    "callbacks",
    "scale_policy",
    "device_train_microbatch_size",
    "sync_batchnorm",
    "precision",
];

fn get<'a>(m: &'a Mapping, k: &str) -> Option<&'a Value> {
    m.get(k).filter(|v| !v.is_null())
}

fn parse_policies(v: Option<&Value>, key: &str) -> Result<BTreeMap<String, Policy>> {
    match v {
        None => Ok(BTreeMap::new()),
        Some(v) => serde_yaml::from_value(v.clone()).map_err(|e| {
            Error::recipe_hint(
                key,
                format!("not a map of key: scaled|fixed ({e})"),
                "e.g. scale_policy: {interval: scaled}",
            )
        }),
    }
}

/// Parses a plugin block (`{name: x, ...}` or just `x`) of one kind.
pub fn parse_spec<C: ?Sized + crate::plugin::PluginConfig + 'static>(
    kind: Kind,
    v: &Value,
    path: &str,
) -> Result<Spec<C>>
where
    Registration<C>: inventory::Collect,
{
    parse_spec_with(kind, v, path, |reg, rest| (reg.parse)(rest))
}

fn parse_spec_with<C: ?Sized + crate::plugin::PluginConfig + 'static>(
    kind: Kind,
    v: &Value,
    path: &str,
    parse: impl FnOnce(&Registration<C>, &Value) -> Result<Box<C>>,
) -> Result<Spec<C>>
where
    Registration<C>: inventory::Collect,
{
    let names = || {
        crate::registry::registered(kind)
            .iter()
            .map(|p| p.name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (name, mut rest) = match v {
        Value::String(s) => (s.clone(), Mapping::new()),
        Value::Mapping(m) => {
            let name = match m.get("name") {
                Some(Value::String(s)) => s.clone(),
                Some(_) => return Err(Error::recipe(join_key(path, "name"), "must be a string")),
                None => {
                    return Err(Error::recipe_hint(
                        path,
                        format!("this {} block has no `name`", kind.name()),
                        format!("add `name:` with one of: {}", names()),
                    ))
                }
            };
            let mut rest = m.clone();
            rest.remove("name");
            (name, rest)
        }
        other => {
            return Err(Error::recipe_hint(
                path,
                format!(
                    "expected a {} block, found {}",
                    kind.name(),
                    describe(other)
                ),
                format!(
                    "write `{{name: ..., key: value}}` with a name from: {}",
                    names()
                ),
            ))
        }
    };
    let policy_v = rest.remove("scale_policy");
    let scale_policy = parse_policies(policy_v.as_ref(), &join_key(path, "scale_policy"))?;
    let reg = lookup::<C>(kind, &name, &join_key(path, "name"))?;
    let config = parse(reg, &Value::Mapping(rest)).map_err(|e| e.at(path))?;
    let mut spec = Spec {
        name,
        path: path.to_string(),
        config,
        scale_policy,
    };
    // Every policy override must name a time parameter of this plugin.
    let mut keys = Vec::new();
    spec.visit(&mut |k, _, _, _| {
        keys.push(
            k.rsplit('.')
                .next()
                .unwrap_or(k)
                .split('[')
                .next()
                .unwrap_or(k)
                .to_string(),
        )
    });
    for k in spec.scale_policy.keys() {
        let base = k.split('[').next().unwrap_or(k);
        if !keys.iter().any(|x| x == base) {
            let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
            return Err(Error::recipe_hint(
                join_key(&join_key(path, "scale_policy"), k),
                format!("`{}` has no time parameter `{k}`", spec.name),
                match nearest(k, &refs) {
                    Some(n) => format!(
                        "did you mean `{n}`? its time parameters: {}",
                        refs.join(", ")
                    ),
                    None if refs.is_empty() => "this plugin has no time parameters".to_string(),
                    None => format!("its time parameters: {}", refs.join(", ")),
                },
            ));
        }
    }
    Ok(spec)
}

fn parse_time(m: &Mapping, key: &str) -> Result<Option<Time>> {
    match get(m, key) {
        None => Ok(None),
        Some(v) => serde_yaml::from_value::<Time>(v.clone())
            .map(Some)
            .map_err(|e| {
                Error::recipe_hint(
                    key,
                    e.to_string(),
                    "a time is a number and a unit: 90ep, 1.5ep, 500ba, 2048sp, 0.3dur",
                )
            }),
    }
}

impl Recipe {
    /// Reads, overrides, parses and prepares (runs the transforms of) a recipe file.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Recipe> {
        let src = RecipeSource::read(path, overrides)?;
        let raw = src.raw()?;
        Recipe::from_raw(raw, src, true)
    }

    /// Parses a tree (after overrides); `prepare` runs the transforms. Errors are located in the
    /// source.
    pub fn from_raw(raw: Value, source: RecipeSource, prepare: bool) -> Result<Recipe> {
        let r = Recipe::parse(&raw, source.clone()).map_err(|e| source.locate(e));
        let mut r = r?;
        if prepare {
            r.prepare().map_err(|e| source.locate(e))?;
        }
        Ok(r)
    }

    fn parse(raw: &Value, source: RecipeSource) -> Result<Recipe> {
        let m = raw
            .as_mapping()
            .ok_or_else(|| Error::msg("a recipe is a YAML mapping"))?;
        for k in m.keys() {
            let k = k.as_str().unwrap_or("");
            if !TOP_KEYS.contains(&k) {
                let hint = match nearest(k, TOP_KEYS) {
                    Some(n) => format!("did you mean `{n}`? valid keys: {}", TOP_KEYS.join(", ")),
                    None => format!("valid keys: {}", TOP_KEYS.join(", ")),
                };
                return Err(Error::recipe_hint(k, format!("unknown key `{k}`"), hint));
            }
        }
        let name = match get(m, "name") {
            None => source
                .file
                .as_ref()
                .and_then(|f| f.file_stem())
                .map_or("recipe".to_string(), |s| s.to_string_lossy().into_owned()),
            Some(Value::String(s)) if !s.is_empty() && !s.contains(['/', '\\']) => s.clone(),
            Some(_) => {
                return Err(Error::recipe(
                    "name",
                    "must be a non-empty string without slashes",
                ))
            }
        };
        let seed = match get(m, "seed") {
            None => 17,
            Some(v) => v
                .as_u64()
                .ok_or_else(|| Error::recipe("seed", "must be a whole number >= 0"))?,
        };
        let max_duration = parse_time(m, "max_duration")?.ok_or_else(|| {
            Error::recipe_hint(
                "max_duration",
                "missing: how long to train",
                "add e.g. `max_duration: 5ep`",
            )
        })?;
        if max_duration.unit == crate::time::TimeUnit::Duration {
            return Err(Error::recipe_hint(
                "max_duration",
                "the run length cannot be a fraction of itself",
                "use ep, ba, sp or tok",
            ));
        }
        if max_duration.value <= 0.0 {
            return Err(Error::recipe("max_duration", "must be positive"));
        }
        let eval_interval = parse_time(m, "eval_interval")?.unwrap_or(Time::epochs(1.0));
        let runs_dir = match get(m, "run_dir") {
            None => PathBuf::from("runs"),
            Some(Value::String(s)) => PathBuf::from(s),
            Some(_) => return Err(Error::recipe("run_dir", "must be a path")),
        };
        let device = match get(m, "device") {
            None => "cpu".to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => {
                return Err(Error::recipe_hint(
                    "device",
                    "must be a string",
                    "cpu, cuda or cuda:N",
                ))
            }
        };
        let microbatch_size = match get(m, "device_train_microbatch_size") {
            None => None,
            Some(v) => match v.as_u64() {
                Some(n) if n >= 1 && n <= usize::MAX as u64 => Some(n as usize),
                _ => {
                    return Err(Error::recipe_hint(
                        "device_train_microbatch_size",
                        "must be a whole number >= 1",
                        "the samples of one forward/backward pass, e.g. 32; leave it out to run each batch in one pass",
                    ))
                }
            },
        };
        let sync_batchnorm = match get(m, "sync_batchnorm") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(Error::recipe_hint(
                    "sync_batchnorm",
                    "must be true or false",
                    "true normalises with the whole global batch's statistics across data-parallel processes; false (the default) with each process's share",
                ))
            }
        };
        let precision = match get(m, "precision") {
            None => crate::precision::Precision::Fp32,
            Some(Value::String(s)) => crate::precision::Precision::parse(s)?,
            Some(_) => {
                return Err(Error::recipe_hint(
                    "precision",
                    "must be a name",
                    "fp32 (the default), amp_bf16 or amp_fp16",
                ))
            }
        };
        let data = Recipe::parse_data(get(m, "data"))?;
        let model = parse_spec(
            Kind::Model,
            get(m, "model").ok_or_else(|| missing("model", Kind::Model))?,
            "model",
        )?;
        let optimizer = parse_spec(
            Kind::Optimizer,
            get(m, "optimizer").ok_or_else(|| missing("optimizer", Kind::Optimizer))?,
            "optimizer",
        )?;
        let schedule = get(m, "schedule")
            .map(|v| parse_spec(Kind::Schedule, v, "schedule"))
            .transpose()?;
        let list = |key: &str| -> Result<Vec<Value>> {
            match get(m, key) {
                None => Ok(Vec::new()),
                Some(Value::Sequence(s)) => Ok(s.clone()),
                Some(_) => Err(Error::recipe_hint(
                    key,
                    "must be a list",
                    format!("write `{key}:` followed by `- name: ...` entries"),
                )),
            }
        };
        let algorithms = list("algorithms")?
            .iter()
            .enumerate()
            .map(|(i, v)| parse_spec(Kind::Algorithm, v, &format!("algorithms[{i}]")))
            .collect::<Result<Vec<_>>>()?;
        let callbacks = list("callbacks")?
            .iter()
            .enumerate()
            .map(|(i, v)| parse_spec(Kind::Callback, v, &format!("callbacks[{i}]")))
            .collect::<Result<Vec<_>>>()?;
        let scale_policy = parse_policies(get(m, "scale_policy"), "scale_policy")?;
        for k in scale_policy.keys() {
            if k != "max_duration" && k != "eval_interval" {
                return Err(Error::recipe_hint(
                    join_key("scale_policy", k),
                    "only max_duration and eval_interval are set here",
                    "a plugin's policies go in its own block: `scale_policy: {key: scaled}`",
                ));
            }
        }
        Ok(Recipe {
            source,
            raw: raw.clone(),
            name,
            seed,
            max_duration,
            eval_interval,
            runs_dir,
            device,
            data,
            model,
            optimizer,
            schedule,
            algorithms,
            callbacks,
            scale_policy,
            scale_ratio: 1.0,
            microbatch_size,
            sync_batchnorm,
            precision,
            prepared: false,
        })
    }

    fn parse_data(v: Option<&Value>) -> Result<DataSpec> {
        let v = v.ok_or_else(|| missing("data", Kind::Dataset))?;
        let (loader_part, dataset_part) = match v {
            Value::Mapping(m) => {
                let mut l = Mapping::new();
                let mut d = Mapping::new();
                for (k, val) in m {
                    if LoaderConfig::KEYS.contains(&k.as_str().unwrap_or("")) {
                        l.insert(k.clone(), val.clone());
                    } else {
                        d.insert(k.clone(), val.clone());
                    }
                }
                (Value::Mapping(l), Value::Mapping(d))
            }
            other => (Value::Mapping(Mapping::new()), other.clone()),
        };
        let loader: LoaderConfig = parse_block(&loader_part).map_err(|e| e.at("data"))?;
        loader.validate()?;
        let dataset = parse_spec_with(Kind::Dataset, &dataset_part, "data", |reg, rest| {
            (reg.parse)(rest).map_err(|e| match e {
                // A typo may be meant for a loader key: widen the suggestion.
                Error::Recipe { key, message, .. } if message.starts_with("unknown key") => {
                    let field = key.rsplit('.').next().unwrap_or(&key).to_string();
                    let mut valid: Vec<&str> = LoaderConfig::KEYS.to_vec();
                    let ds_keys = reg
                        .example
                        .lines()
                        .filter_map(|l| l.split(':').next())
                        .map(str::trim)
                        .filter(|k| !k.is_empty() && *k != "{}")
                        .collect::<Vec<_>>();
                    valid.extend(ds_keys);
                    let hint = match nearest(&field, &valid) {
                        Some(n) => format!("did you mean `{n}`? valid keys: {}", valid.join(", ")),
                        None => format!("valid keys: {}", valid.join(", ")),
                    };
                    Error::Recipe {
                        key,
                        message,
                        hint: Some(hint),
                        origin: None,
                    }
                }
                e => e,
            })
        })?;
        Ok(DataSpec { dataset, loader })
    }

    /// Runs every algorithm's recipe transform, once, in recipe order.
    pub fn prepare(&mut self) -> Result<()> {
        if self.prepared {
            return Ok(());
        }
        self.prepared = true;
        let transforms: Vec<Box<dyn RecipeTransform>> = self
            .algorithms
            .iter()
            .filter_map(|a| a.config.recipe_transform())
            .collect();
        for t in transforms {
            t.apply(self)?;
        }
        Ok(())
    }

    /// Walks every time parameter of the recipe: its full key, its owner, the value, and the
    /// effective policy (the owner's, or the recipe's override).
    pub fn visit_times(&mut self, f: &mut dyn FnMut(&str, &str, &mut Time, Policy)) {
        let top = |k: &str, default: Policy, pols: &BTreeMap<String, Policy>| {
            pols.get(k).copied().unwrap_or(default)
        };
        let p = top("max_duration", Policy::Scaled, &self.scale_policy);
        f("max_duration", "recipe", &mut self.max_duration, p);
        let p = top("eval_interval", Policy::Fixed, &self.scale_policy);
        f("eval_interval", "recipe", &mut self.eval_interval, p);
        self.data.dataset.visit(f);
        self.model.visit(f);
        self.optimizer.visit(f);
        if let Some(s) = &mut self.schedule {
            s.visit(f);
        }
        for a in &mut self.algorithms {
            a.visit(f);
        }
        for c in &mut self.callbacks {
            c.visit(f);
        }
    }

    /// Every time parameter, in recipe order.
    pub fn time_rows(&mut self) -> Vec<TimeRow> {
        let mut rows = Vec::new();
        self.visit_times(&mut |key, owner, t, policy| {
            rows.push(TimeRow {
                key: key.to_string(),
                owner: owner.to_string(),
                time: *t,
                policy,
            })
        });
        rows
    }

    /// Shape, classes and sizes of the data, without reading it; the shape is that of the
    /// training samples the loader makes (after `train_transforms`).
    pub fn data_info(&self) -> DatasetInfo {
        let mut info = self.data.dataset.config.info();
        if let Ok(shape) = self.data.loader.output_shape(info.shape, true) {
            info.shape = shape;
        }
        info
    }

    /// [`Recipe::data_info`], with the loader settings checked against it.
    pub fn checked_data_info(&self) -> Result<DatasetInfo> {
        let l = &self.data.loader;
        l.validate()?;
        let native = self.data.dataset.config.info().shape;
        let info = DatasetInfo {
            shape: l.output_shape(native, true)?,
            ..self.data_info()
        };
        l.output_shape(native, false)?;
        info.validate("data")?;
        Ok(info)
    }

    /// The training clock implied by the recipe (before any file is read): batches per epoch from
    /// the dataset's size and the loader settings, and the run length in batches.
    pub fn clock(&self) -> Result<Clock> {
        let info = self.data_info();
        let l = &self.data.loader;
        let len = l
            .train_subset
            .map_or(info.train_len, |s| s.min(info.train_len));
        self.clock_for(len)
    }

    /// The clock for a training split of `train_len` samples.
    pub fn clock_for(&self, train_len: usize) -> Result<Clock> {
        let l = &self.data.loader;
        let bpe = if l.drop_last {
            train_len / l.batch_size
        } else {
            train_len.div_ceil(l.batch_size)
        } as u64;
        if bpe == 0 {
            return Err(Error::recipe_hint(
                "data.batch_size",
                format!(
                    "the training set ({train_len} samples) holds less than one batch of {}",
                    l.batch_size
                ),
                "lower data.batch_size or set data.drop_last: false",
            ));
        }
        let mut clock = Clock {
            batches_per_epoch: bpe,
            samples_per_batch: l.batch_size as u64,
            tokens_per_sample: None,
            max_batches: None,
        };
        let max = self
            .max_duration
            .to_batches(&clock)
            .map_err(|e| e.at("max_duration"))?;
        if max == 0 {
            return Err(Error::recipe("max_duration", "resolves to zero batches"));
        }
        clock.max_batches = Some(max);
        Ok(clock)
    }

    /// The recipe with every default filled in and every transform applied, as YAML.
    pub fn resolved_yaml(&self) -> Value {
        let mut m = Mapping::new();
        m.insert("name".into(), self.name.clone().into());
        m.insert("seed".into(), self.seed.into());
        m.insert("max_duration".into(), self.max_duration.to_string().into());
        m.insert(
            "eval_interval".into(),
            self.eval_interval.to_string().into(),
        );
        m.insert("run_dir".into(), self.runs_dir.display().to_string().into());
        m.insert("device".into(), self.device.clone().into());
        if let Some(n) = self.microbatch_size {
            m.insert("device_train_microbatch_size".into(), (n as u64).into());
        }
        if self.sync_batchnorm {
            m.insert("sync_batchnorm".into(), true.into());
        }
        if self.precision != crate::precision::Precision::Fp32 {
            m.insert("precision".into(), self.precision.name().into());
        }
        let mut data = match self.data.dataset.to_yaml() {
            Value::Mapping(d) => d,
            _ => Mapping::new(),
        };
        if let Ok(Value::Mapping(l)) = serde_yaml::to_value(&self.data.loader) {
            data.extend(l);
        }
        m.insert("data".into(), Value::Mapping(data));
        m.insert("model".into(), self.model.to_yaml());
        m.insert("optimizer".into(), self.optimizer.to_yaml());
        if let Some(s) = &self.schedule {
            m.insert("schedule".into(), s.to_yaml());
        }
        m.insert(
            "algorithms".into(),
            Value::Sequence(self.algorithms.iter().map(Spec::to_yaml).collect()),
        );
        m.insert(
            "callbacks".into(),
            Value::Sequence(self.callbacks.iter().map(Spec::to_yaml).collect()),
        );
        if !self.scale_policy.is_empty() {
            m.insert(
                "scale_policy".into(),
                serde_yaml::to_value(&self.scale_policy).unwrap_or(Value::Null),
            );
        }
        Value::Mapping(m)
    }
}

impl RecipeView for Recipe {
    fn visit_times(&mut self, f: &mut dyn FnMut(&str, &str, &mut Time, Policy)) {
        Recipe::visit_times(self, f)
    }
    fn scale_ratio_mut(&mut self) -> &mut f64 {
        &mut self.scale_ratio
    }
}

fn missing(key: &str, kind: Kind) -> Error {
    let names: Vec<&str> = crate::registry::registered(kind)
        .iter()
        .map(|p| p.name)
        .collect();
    Error::recipe_hint(
        key,
        format!("missing `{key}` block"),
        format!(
            "add `{key}: {{name: ...}}` with one of: {}",
            names.join(", ")
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TEXT: &str = "\
name: t
max_duration: 2ep
data:
  name: synthetic
  batch_size: 8
model: {name: mlp}
optimizer:
  name: sgd
  lr: 0.1
algorithms:
  - name: label_smoothing
    smoothing: 0.1
  - progressive_resizing
callbacks:
- name: lr_monitor
  interval: 2ba
";

    #[test]
    fn locates_keys_in_blocks_lists_and_flow_style() {
        assert_eq!(locate_line(TEXT, "max_duration"), Some(2));
        assert_eq!(locate_line(TEXT, "data.batch_size"), Some(5));
        assert_eq!(locate_line(TEXT, "optimizer.lr"), Some(9));
        assert_eq!(locate_line(TEXT, "algorithms[0].smoothing"), Some(12));
        assert_eq!(locate_line(TEXT, "algorithms[1]"), Some(13));
        assert_eq!(locate_line(TEXT, "callbacks[0].interval"), Some(16));
        // flow style: the line of the block
        assert_eq!(locate_line(TEXT, "model.name"), Some(6));
        assert_eq!(locate_line(TEXT, "nope"), None);
    }

    fn raw_with(sets: &[&str]) -> Result<Value> {
        let s: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        RecipeSource::from_text(TEXT, &s).raw()
    }

    #[test]
    fn overrides_reach_maps_list_entries_by_index_and_by_name() {
        let v = raw_with(&[
            "optimizer.lr=0.2",
            "algorithms.label_smoothing.smoothing=0.3",
            "algorithms[1].delay=0.2dur",
            "max_duration=3ep",
        ])
        .unwrap();
        assert_eq!(v["optimizer"]["lr"].as_f64(), Some(0.2));
        assert_eq!(v["algorithms"][0]["smoothing"].as_f64(), Some(0.3));
        assert_eq!(
            v["algorithms"][1]["name"].as_str(),
            Some("progressive_resizing")
        );
        assert_eq!(v["algorithms"][1]["delay"].as_str(), Some("0.2dur"));
        assert_eq!(v["max_duration"].as_str(), Some("3ep"));
        let v = raw_with(&["algorithms.0.smoothing=0.05", "model.hidden=[4, 4]"]).unwrap();
        assert_eq!(v["algorithms"][0]["smoothing"].as_f64(), Some(0.05));
        assert_eq!(v["model"]["hidden"].as_sequence().map(Vec::len), Some(2));
        for bad in [
            "algorithms.cutout.length=3",
            "algorithms[5].x=1",
            "max_duration.value=3",
            "=3",
            "novalue",
        ] {
            assert!(raw_with(&[bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_located_error_names_the_file_line_or_the_override() {
        let src = RecipeSource {
            file: Some("r.yaml".into()),
            text: TEXT.into(),
            overrides: vec!["optimizer.lr=x".into()],
        };
        let e = src.locate(Error::recipe("algorithms[0].smoothing", "bad"));
        assert!(
            e.to_string()
                .starts_with("r.yaml:12: key `algorithms[0].smoothing`"),
            "{e}"
        );
        let e = src.locate(Error::recipe("optimizer.lr", "bad"));
        assert!(e.to_string().starts_with("--set optimizer.lr=x:"), "{e}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any override string: an Ok tree or a clear error, never a panic.
        #[test]
        fn overrides_never_panic(key in "[a-z_.\\[\\]0-9]{0,24}", value in ".{0,12}") {
            // An error names the --set that caused it.
            let set = format!("{key}={value}");
            if let Err(e) = raw_with(&[&set]) {
                prop_assert!(e.to_string().contains(&format!("--set {set}")), "{}", e);
            }
            if let Err(e) = raw_with(&[&key]) {
                prop_assert!(e.to_string().contains(&format!("--set {key}")), "{}", e);
            }
        }

        /// Any text as a recipe: parse errors, never a panic.
        #[test]
        fn arbitrary_yaml_never_panics(text in "[a-z_:{}\\[\\], \\n0-9.\\-]{0,80}") {
            let src = RecipeSource::from_text(&text, &[]);
            let r = src.raw().and_then(|raw| Recipe::from_raw(raw, src, true));
            if let Err(e) = r {
                // A clear error: it says where (a key or a line) or what the recipe must be.
                let m = e.to_string();
                prop_assert!(
                    m.contains("key `") || m.contains("line") || m.contains("mapping"),
                    "unclear error for {:?}: {}", text, m
                );
            }
        }

        /// Mutations of a valid recipe (one value replaced by junk): never a panic.
        #[test]
        fn mutated_recipes_never_panic(line in 0usize..16, junk in "[a-z0-9.:\\-\\[\\]{} ]{0,10}") {
            let mut lines: Vec<String> = TEXT.lines().map(String::from).collect();
            if let Some(l) = lines.get_mut(line) {
                match l.split_once(':') {
                    Some((k, _)) => *l = format!("{k}: {junk}"),
                    None => *l = junk.clone(),
                }
            }
            let src = RecipeSource::from_text(&lines.join("\n"), &[]);
            match src.raw().and_then(|raw| Recipe::from_raw(raw, src, true)) {
                Ok(mut r) => {
                    let _ = r.clock();
                    let _ = r.time_rows();
                }
                Err(e) => {
                    let m = e.to_string();
                    prop_assert!(
                        m.contains("key `") || m.contains("line") || m.contains("mapping"),
                        "unclear error for line {}: {}", line, m
                    );
                }
            }
        }
    }
}
