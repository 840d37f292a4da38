//! Exporting weights for use elsewhere: a plain safetensors file with PyTorch's names.
//!
//! The models already name their parameters the way the corresponding PyTorch module would
//! (`conv1.weight`, `layer1.0.bn2.running_var`, `fc.bias` for the ResNets, as torchvision's).
//! What PyTorch has and we do not keep is BatchNorm's `num_batches_tracked` counter; the export
//! adds it (the number of training steps, which is what PyTorch counts when every step runs the
//! layer in training mode), so `model.load_state_dict(...)` accepts the file with `strict=True`.

use crate::atomic::write_atomic;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use candle_core::{DType, Tensor};
use serde_yaml::Value;
use std::collections::{BTreeMap, HashMap};
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

/// The tensors to export from a checkpoint.
pub fn torch_state_dict(ckpt: &Checkpoint) -> Result<Vec<(String, Tensor)>> {
    let model = ckpt.model_tensors();
    if model.is_empty() {
        return Err(Error::Data {
            path: ckpt.path.clone(),
            message: "the checkpoint holds no model tensors".into(),
            hint: "export a checkpoint written by `recipe run`".into(),
        });
    }
    torch_names(model, ckpt.meta.timestamp.batch)
}

/// A model's tensors as PyTorch names them: ours, plus `num_batches_tracked` (`steps`, int64)
/// beside every running mean; sorted by name.
pub fn torch_names(model: BTreeMap<String, Tensor>, steps: u64) -> Result<Vec<(String, Tensor)>> {
    let steps = steps as i64;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;
    use crate::plugin::BindContext;
    use candle_core::Device;

    /// The keys of torchvision's `resnet18().state_dict()`, generated from its layout.
    fn torchvision_resnet18_keys() -> Vec<String> {
        let bn = |p: &str| {
            [
                "weight",
                "bias",
                "running_mean",
                "running_var",
                "num_batches_tracked",
            ]
            .map(|k| format!("{p}.{k}"))
            .to_vec()
        };
        let mut keys = vec!["conv1.weight".to_string()];
        keys.extend(bn("bn1"));
        for layer in 1..=4 {
            for block in 0..2 {
                let p = format!("layer{layer}.{block}");
                keys.push(format!("{p}.conv1.weight"));
                keys.extend(bn(&format!("{p}.bn1")));
                keys.push(format!("{p}.conv2.weight"));
                keys.extend(bn(&format!("{p}.bn2")));
                if layer > 1 && block == 0 {
                    keys.push(format!("{p}.downsample.0.weight"));
                    keys.extend(bn(&format!("{p}.downsample.1")));
                }
            }
        }
        keys.extend(["fc.weight".to_string(), "fc.bias".to_string()]);
        keys.sort();
        keys
    }

    #[test]
    fn resnet18_exports_exactly_torchvisions_state_dict_keys() {
        let ctx = BindContext::standalone(&Device::Cpu, [3, 32, 32], 1000, 1);
        let cfg: crate::models::ResNetConfig =
            crate::plugin::parse_block(&serde_yaml::from_str("depth: 18").unwrap()).unwrap();
        let model = cfg.build(&ctx).unwrap();
        let tensors = model
            .params()
            .iter()
            .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
            .collect();
        let out = torch_names(tensors, 7).unwrap();
        let names: Vec<String> = out.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(names.len(), 122);
        assert_eq!(names, torchvision_resnet18_keys());
        let (_, n) = out
            .iter()
            .find(|(n, _)| n == "layer3.0.downsample.1.num_batches_tracked")
            .unwrap();
        assert_eq!(n.to_scalar::<i64>().unwrap(), 7);
    }
}
