//! Exporting weights for use elsewhere: a plain safetensors file with PyTorch's names.
//!
//! The models already name their parameters the way the corresponding PyTorch module would
//! (`conv1.weight`, `layer1.0.bn2.running_var`, `fc.bias` for the ResNets, as torchvision's).
//! What PyTorch has and we do not keep is BatchNorm's `num_batches_tracked` counter; the export
//! adds it (the number of training steps, which is what PyTorch counts when every step runs the
//! layer in training mode), so `model.load_state_dict(...)` accepts the file with `strict=True`.

use crate::checkpoint::{write_atomic, Checkpoint};
use crate::error::{Error, Result};
use candle_core::{DType, Tensor};
use serde_yaml::Value;
use std::collections::HashMap;
use std::path::Path;

/// The model's name in a recipe's `model` entry (`resnet` from `{name: resnet, depth: 50}`).
pub fn model_name(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Mapping(m) => m
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("model")
            .to_string(),
        _ => "model".into(),
    }
}

/// The tensors to export: the model's, plus `num_batches_tracked` beside every running mean.
pub fn torch_state_dict(ckpt: &Checkpoint) -> Result<Vec<(String, Tensor)>> {
    let model = ckpt.model_tensors();
    if model.is_empty() {
        return Err(Error::Data {
            path: ckpt.path.clone(),
            message: "the checkpoint holds no model tensors".into(),
            hint: "export a checkpoint written by `recipe run`".into(),
        });
    }
    let steps = ckpt.meta.timestamp.batch as i64;
    let mut out = Vec::new();
    for (name, t) in model {
        if let Some(layer) = name.strip_suffix(".running_mean") {
            out.push((
                format!("{layer}.num_batches_tracked"),
                Tensor::new(steps, t.device())?,
            ));
        }
        out.push((name, t.to_dtype(DType::F32)?));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Writes the export atomically; returns the number of tensors written.
pub fn write_torch_weights(ckpt: &Checkpoint, to: &Path) -> Result<usize> {
    let tensors = torch_state_dict(ckpt)?;
    let info: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(info))
        .map_err(|e| Error::msg(format!("cannot serialize the weights: {e}")))?;
    write_atomic(to, &bytes)?;
    Ok(tensors.len())
}
