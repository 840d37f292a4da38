//! The plugin registries: every registered algorithm, callback, schedule, optimizer, model and
//! dataset, collected through `inventory`; lookup by name (with the nearest name on a typo);
//! and the `register_*!` macros that plugin crates submit their registrations with.

use crate::algorithm::AlgorithmConfig;
use crate::callback::CallbackConfig;
use crate::data::DatasetConfig;
use crate::error::{Error, Result};
use crate::model::ModelConfig;
use crate::optim::OptimizerConfig;
use crate::plugin::nearest;
use crate::schedule::ScheduleConfig;
use serde_yaml::Value;

/// One registered plugin: its name in recipes, a one-line description, an example YAML block
/// (used by `recipe list` and by the tests that walk every plugin), and its parser.
pub struct Registration<C: ?Sized + 'static> {
    pub name: &'static str,
    pub description: &'static str,
    pub example: &'static str,
    pub parse: fn(&Value) -> Result<Box<C>>,
}

pub type AlgorithmRegistration = Registration<dyn AlgorithmConfig>;
pub type CallbackRegistration = Registration<dyn CallbackConfig>;
pub type ScheduleRegistration = Registration<dyn ScheduleConfig>;
pub type OptimizerRegistration = Registration<dyn OptimizerConfig>;
pub type ModelRegistration = Registration<dyn ModelConfig>;
pub type DatasetRegistration = Registration<dyn DatasetConfig>;

inventory::collect!(AlgorithmRegistration);
inventory::collect!(CallbackRegistration);
inventory::collect!(ScheduleRegistration);
inventory::collect!(OptimizerRegistration);
inventory::collect!(ModelRegistration);
inventory::collect!(DatasetRegistration);

/// The plugin kinds, as named in recipes and by `recipe list`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Algorithm,
    Callback,
    Schedule,
    Optimizer,
    Model,
    Dataset,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Algorithm,
        Kind::Callback,
        Kind::Schedule,
        Kind::Optimizer,
        Kind::Model,
        Kind::Dataset,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Kind::Algorithm => "algorithm",
            Kind::Callback => "callback",
            Kind::Schedule => "schedule",
            Kind::Optimizer => "optimizer",
            Kind::Model => "model",
            Kind::Dataset => "dataset",
        }
    }
}

/// Name, description and example of a registered plugin, whatever its kind.
#[derive(Debug, Clone, Copy)]
pub struct PluginInfo {
    pub kind: Kind,
    pub name: &'static str,
    pub description: &'static str,
    pub example: &'static str,
}

fn infos<C: ?Sized + 'static>(kind: Kind) -> Vec<PluginInfo>
where
    Registration<C>: inventory::Collect,
{
    let mut v: Vec<PluginInfo> = inventory::iter::<Registration<C>>
        .into_iter()
        .map(|r| PluginInfo {
            kind,
            name: r.name,
            description: r.description,
            example: r.example,
        })
        .collect();
    v.sort_by_key(|p| p.name);
    v
}

/// Every registered plugin of one kind, sorted by name.
pub fn registered(kind: Kind) -> Vec<PluginInfo> {
    match kind {
        Kind::Algorithm => infos::<dyn AlgorithmConfig>(kind),
        Kind::Callback => infos::<dyn CallbackConfig>(kind),
        Kind::Schedule => infos::<dyn ScheduleConfig>(kind),
        Kind::Optimizer => infos::<dyn OptimizerConfig>(kind),
        Kind::Model => infos::<dyn ModelConfig>(kind),
        Kind::Dataset => infos::<dyn DatasetConfig>(kind),
    }
}

/// Finds a registration by name, or says which names exist and which is nearest.
pub fn lookup<C: ?Sized + 'static>(
    kind: Kind,
    name: &str,
    key: &str,
) -> Result<&'static Registration<C>>
where
    Registration<C>: inventory::Collect,
{
    if let Some(r) = inventory::iter::<Registration<C>>
        .into_iter()
        .find(|r| r.name == name)
    {
        return Ok(r);
    }
    let names: Vec<&str> = registered(kind).iter().map(|p| p.name).collect();
    let mut hint = String::new();
    if let Some(n) = nearest(name, &names) {
        hint.push_str(&format!("did you mean `{n}`? "));
    }
    hint.push_str(&format!(
        "registered {}s: {}. A plugin from another crate must be linked into the binary (`use my_plugin as _;`); `recipe list` shows what is registered",
        kind.name(),
        names.join(", ")
    ));
    Err(Error::recipe_hint(
        key,
        format!("unknown {} `{name}`", kind.name()),
        hint,
    ))
}

/// Generates a parse function and submits a registration for one plugin kind.
#[doc(hidden)]
#[macro_export]
macro_rules! __register {
    ($reg:ident, $cfg_trait:path, $config:ty, $name:expr, $desc:expr, $example:expr) => {
        $crate::inventory::submit! {
            $crate::registry::$reg {
                name: $name,
                description: $desc,
                example: $example,
                parse: |v| {
                    let c: $config = $crate::plugin::parse_block(v)?;
                    Ok(Box::new(c) as Box<dyn $cfg_trait>)
                },
            }
        }
    };
}

/// Registers an algorithm: `register_algorithm!(MyConfig, "name", "one line", "example: 1");`
#[macro_export]
macro_rules! register_algorithm {
    ($config:ty, $name:expr, $desc:expr, $example:expr $(,)?) => {
        $crate::__register!(
            AlgorithmRegistration,
            $crate::algorithm::AlgorithmConfig,
            $config,
            $name,
            $desc,
            $example
        );
    };
}
/// Registers a callback.
#[macro_export]
macro_rules! register_callback {
    ($config:ty, $name:expr, $desc:expr, $example:expr $(,)?) => {
        $crate::__register!(
            CallbackRegistration,
            $crate::callback::CallbackConfig,
            $config,
            $name,
            $desc,
            $example
        );
    };
}
/// Registers a learning-rate schedule.
#[macro_export]
macro_rules! register_schedule {
    ($config:ty, $name:expr, $desc:expr, $example:expr $(,)?) => {
        $crate::__register!(
            ScheduleRegistration,
            $crate::schedule::ScheduleConfig,
            $config,
            $name,
            $desc,
            $example
        );
    };
}
/// Registers an optimizer.
#[macro_export]
macro_rules! register_optimizer {
    ($config:ty, $name:expr, $desc:expr, $example:expr $(,)?) => {
        $crate::__register!(
            OptimizerRegistration,
            $crate::optim::OptimizerConfig,
            $config,
            $name,
            $desc,
            $example
        );
    };
}
/// Registers a model.
#[macro_export]
macro_rules! register_model {
    ($config:ty, $name:expr, $desc:expr, $example:expr $(,)?) => {
        $crate::__register!(
            ModelRegistration,
            $crate::model::ModelConfig,
            $config,
            $name,
            $desc,
            $example
        );
    };
}
/// Registers a dataset.
#[macro_export]
macro_rules! register_dataset {
    ($config:ty, $name:expr, $desc:expr, $example:expr $(,)?) => {
        $crate::__register!(
            DatasetRegistration,
            $crate::data::DatasetConfig,
            $config,
            $name,
            $desc,
            $example
        );
    };
}
