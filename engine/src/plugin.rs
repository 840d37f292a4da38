//! What every plugin has in common, whatever its kind: the visitor through which it exposes its
//! time parameters to ScaleSchedule (`TimeParams`, `Policy`), the context it is built against
//! (`BindContext`), and the parsing of its YAML block. Each kind's own traits sit beside its
//! runtime code (`algorithm`, `callback`, `schedule`, `optim`, `model`, `data`); the registries
//! and the `register_*!` macros are in `registry`.
//!
//! Adding a plugin never touches the engine: a crate defines a config struct (serde + `TimeParams`)
//! and submits a registration with one of the `register_*!` macros.

use crate::error::{join_key, Error, Result};
use crate::time::{Clock, Time};
use candle_core::Device;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_yaml::Value;

// ---------------------------------------------------------------------------------------------
// Time parameters and the ScaleSchedule visitor.

/// How ScaleSchedule treats a time parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Describes a phase of training: multiplied by the scale ratio.
    Scaled,
    /// Describes the process (logging cadence, say): left as it is.
    Fixed,
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Policy::Scaled => "scaled",
            Policy::Fixed => "fixed",
        })
    }
}

/// Receives every time parameter of a plugin. `key` is the serde field name (`t_warmup`,
/// `milestones[1]`); `policy` is the owner's declaration.
pub trait TimeVisitor {
    fn visit(&mut self, key: &str, time: &mut Time, policy: Policy);
}

impl<F: FnMut(&str, &mut Time, Policy)> TimeVisitor for F {
    fn visit(&mut self, key: &str, time: &mut Time, policy: Policy) {
        self(key, time, policy)
    }
}

/// Implemented by every plugin config: hand each time-valued field to the visitor, with its policy.
/// A config without time parameters implements it with an empty body.
pub trait TimeParams {
    fn visit_times(&mut self, _v: &mut dyn TimeVisitor) {}
}

/// Visits an optional time parameter.
pub fn visit_opt(v: &mut dyn TimeVisitor, key: &str, t: &mut Option<Time>, policy: Policy) {
    if let Some(t) = t {
        v.visit(key, t, policy);
    }
}

/// Visits a list of time parameters as `key[0]`, `key[1]`, ...
pub fn visit_list(v: &mut dyn TimeVisitor, key: &str, ts: &mut [Time], policy: Policy) {
    for (i, t) in ts.iter_mut().enumerate() {
        v.visit(&format!("{key}[{i}]"), t, policy);
    }
}

/// What every plugin config can do, whatever its kind: expose its times, and show itself
/// (with defaults filled in) as YAML.
pub trait PluginConfig: TimeParams + Send + Sync {
    fn to_yaml(&self) -> Value;
}

impl<T: TimeParams + Serialize + Send + Sync> PluginConfig for T {
    fn to_yaml(&self) -> Value {
        serde_yaml::to_value(self).unwrap_or(Value::Null)
    }
}

// ---------------------------------------------------------------------------------------------
// Binding: what a plugin knows when it is built.

/// What a plugin is built against: the resolved clock, the device, the data's shape, the seed,
/// and its own place in the recipe (for error messages and its random stream).
#[derive(Debug, Clone)]
pub struct BindContext {
    pub clock: Clock,
    pub device: Device,
    pub seed: u64,
    /// One input sample: channels, height, width.
    pub input_shape: [usize; 3],
    pub num_classes: usize,
    /// The plugin's place in the recipe: `algorithms[1]`, `schedule`, ...
    pub path: String,
}

impl BindContext {
    /// A context outside a recipe (benchmarks, tests): one epoch of one batch of `batch` samples,
    /// seed 0, path `model`.
    pub fn standalone(
        device: &Device,
        input_shape: [usize; 3],
        num_classes: usize,
        batch: usize,
    ) -> Self {
        BindContext {
            clock: Clock {
                batches_per_epoch: 1,
                samples_per_batch: batch as u64,
                tokens_per_sample: None,
                max_batches: Some(1),
            },
            device: device.clone(),
            seed: 0,
            input_shape,
            num_classes,
            path: "model".into(),
        }
    }

    /// Resolves a time parameter into batches, naming the key on error.
    pub fn batches(&self, key: &str, t: &Time) -> Result<u64> {
        t.to_batches(&self.clock)
            .map_err(|e| e.at(&join_key(&self.path, key)))
    }

    /// Resolves an interval (how often something happens) into batches: zero is refused, not
    /// read as "every batch".
    pub fn interval(&self, key: &str, t: &Time) -> Result<u64> {
        let n = self.batches(key, t)?;
        if n == 0 {
            return Err(Error::recipe_hint(
                join_key(&self.path, key),
                format!("{t} is not an interval: it must be positive"),
                "give how often, e.g. 1ba for every batch, 100ba or 1ep",
            ));
        }
        Ok(n)
    }

    /// The run length in batches.
    pub fn max_batches(&self) -> u64 {
        self.clock.max_batches.unwrap_or(0)
    }

    /// This plugin's own random streams, derived from the run seed and its place in the recipe;
    /// draw from `streams.at(state.timestamp.batch)` so that resumed runs draw the same.
    pub fn rng(&self) -> crate::rng::Streams {
        crate::rng::Streams::new(self.seed, &self.path)
    }

    pub fn with_path(&self, path: &str) -> Self {
        BindContext {
            path: path.to_string(),
            ..self.clone()
        }
    }
}

/// The candidate nearest to `word`, if any is reasonably close.
pub fn nearest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(word, c), *c))
        .filter(|(s, _)| *s > 0.7)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

// ---------------------------------------------------------------------------------------------
// Parsing a plugin's YAML block.

/// Deserializes a plugin's YAML block (without its `name` key) into its config. Unknown keys,
/// missing keys and wrong types become recipe errors that name the key and, for a typo, the
/// nearest valid key.
pub fn parse_block<C: DeserializeOwned>(v: &Value) -> Result<C> {
    let v = if v.is_null() {
        Value::Mapping(Default::default())
    } else {
        v.clone()
    };
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        serde_error_to_recipe(&path, &e.into_inner().to_string())
    })
}

/// Turns a serde message into a recipe error at `path` (relative to the block).
pub fn serde_error_to_recipe(path: &str, msg: &str) -> Error {
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        let field = rest.split('`').next().unwrap_or("");
        let valid: Vec<&str> = rest
            .split('`')
            .skip(1)
            .enumerate()
            .filter(|(i, _)| i % 2 == 1)
            .map(|(_, s)| s)
            .collect();
        let mut hint = String::new();
        if let Some(n) = nearest(field, &valid) {
            hint.push_str(&format!("did you mean `{n}`? "));
        }
        if valid.is_empty() {
            hint.push_str("this block takes no keys");
        } else {
            hint.push_str(&format!("valid keys: {}", valid.join(", ")));
        }
        let key = join_key(path.trim_end_matches(&format!(".{field}")), field);
        // serde_path_to_error's path already ends at the parent; make sure we name the field once.
        let key = if path.ends_with(field) {
            path.to_string()
        } else {
            key
        };
        return Error::recipe_hint(key, format!("unknown key `{field}`"), hint);
    }
    if let Some(rest) = msg.strip_prefix("missing field `") {
        let field = rest.split('`').next().unwrap_or("");
        return Error::recipe_hint(
            join_key(path, field),
            format!("missing required key `{field}`"),
            "add it to this block",
        );
    }
    // Messages from our own Deserialize impls (bad time) already explain themselves.
    Error::recipe(path, msg.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Demo {
        smoothing: f64,
        #[serde(default)]
        interval: Option<Time>,
    }

    #[test]
    fn unknown_key_names_the_nearest_valid_key() {
        let v: Value = serde_yaml::from_str("smothing: 0.1").unwrap();
        let e = parse_block::<Demo>(&v).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("`smothing`"), "{s}");
        assert!(s.contains("did you mean `smoothing`"), "{s}");
        assert!(s.contains("valid keys: smoothing, interval"), "{s}");
    }

    #[test]
    fn missing_and_mistyped_keys_are_named() {
        let e = parse_block::<Demo>(&Value::Null).unwrap_err().to_string();
        assert!(e.contains("missing required key `smoothing`"), "{e}");
        let v: Value = serde_yaml::from_str("smoothing: 0.1\ninterval: 5").unwrap();
        let e = parse_block::<Demo>(&v).unwrap_err().to_string();
        assert!(e.contains("key `interval`") && e.contains("no unit"), "{e}");
        let v: Value = serde_yaml::from_str("smoothing: abc").unwrap();
        let e = parse_block::<Demo>(&v).unwrap_err().to_string();
        assert!(
            e.contains("key `smoothing`") && e.contains("invalid type"),
            "{e}"
        );
    }

    #[test]
    fn nearest_needs_some_similarity() {
        assert_eq!(nearest("cosin", &["cosine", "linear"]), Some("cosine"));
        assert_eq!(nearest("zzzz", &["cosine", "linear"]), None);
    }
}
