use super::layers::Linear;
use crate::error::{Error, Result};
use crate::model::ModelConfig;
use crate::model::{Model, ParamBuilder, ParamStore};
use crate::plugin::{BindContext, TimeParams};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// A multi-layer perceptron over flattened inputs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpConfig {
    /// Widths of the hidden layers.
    #[serde(default = "default_hidden")]
    pub hidden: Vec<usize>,
}

fn default_hidden() -> Vec<usize> {
    vec![256, 128]
}

impl TimeParams for MlpConfig {}

struct Mlp {
    layers: Vec<Linear>,
    params: ParamStore,
    input: usize,
}

impl ModelConfig for MlpConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Model>> {
        if self.hidden.contains(&0) {
            return Err(Error::recipe(
                "model.hidden",
                "a hidden layer needs at least one unit",
            ));
        }
        let input: usize = ctx.input_shape.iter().product();
        let mut b = ParamBuilder::new(ctx.seed, &ctx.device);
        let mut widths = vec![input];
        widths.extend(&self.hidden);
        widths.push(ctx.num_classes);
        let layers = widths
            .windows(2)
            .enumerate()
            .map(|(i, w)| Linear::new(&mut b, &format!("layers.{i}"), w[0], w[1]))
            .collect::<Result<Vec<_>>>()?;
        Ok(Box::new(Mlp {
            layers,
            params: b.finish(),
            input,
        }))
    }
}

impl Model for Mlp {
    fn forward(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        let n = x.dim(0)?;
        if x.elem_count() != n * self.input {
            return Err(Error::msg(format!(
                "mlp: expected {} values per sample, got input of shape {:?} (the MLP needs a fixed input size)",
                self.input,
                x.dims()
            )));
        }
        let mut h = x.reshape((n, self.input))?;
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(&h)?;
            if i + 1 < self.layers.len() {
                h = h.relu()?;
            }
        }
        Ok(h)
    }
    fn params(&self) -> &ParamStore {
        &self.params
    }
    fn any_input_size(&self) -> bool {
        false
    }
}

crate::register_model!(
    MlpConfig,
    "mlp",
    "Multi-layer perceptron on flattened inputs (ReLU).",
    "hidden: [256, 128]"
);
