//! The saved state of one plugin, as a checkpoint carries it: plain values and named tensors.

use crate::error::{Error, Result};
use candle_core::Tensor;
use serde::Serialize;
use serde_yaml::Value;
use std::collections::BTreeMap;

/// The saved state of one plugin (algorithm, callback, schedule, optimizer): plain values and
/// named tensors. Most plugins have neither; the default is empty.
#[derive(Debug, Clone, Default)]
pub struct StateDict {
    pub values: Value,
    pub tensors: BTreeMap<String, Tensor>,
}

impl StateDict {
    pub fn from_values(values: Value) -> Self {
        StateDict {
            values,
            tensors: BTreeMap::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_null() && self.tensors.is_empty()
    }

    /// Deserializes the values into a plugin's own state struct, naming the plugin on error.
    pub fn decode<T: serde::de::DeserializeOwned>(&self, owner: &str) -> Result<T> {
        serde_yaml::from_value(self.values.clone()).map_err(|e| {
            Error::msg(format!(
                "the checkpoint's state for {owner} does not fit this version of it: {e}"
            ))
        })
    }

    /// Serializes a plugin's own state struct.
    pub fn encode<T: Serialize>(state: &T) -> Self {
        StateDict::from_values(serde_yaml::to_value(state).unwrap_or(Value::Null))
    }
}
