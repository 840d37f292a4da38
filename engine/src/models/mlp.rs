use super::layers::Linear;
use crate::error::{Error, Result};
use crate::model::ModelConfig;
use crate::model::{Model, ParamBuilder};
use crate::model::{Module, Network, Sequential};
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

/// `layers.0`, `layers.1`, ... with a ReLU between them, over the flattened input.
struct Mlp {
    layers: Box<dyn Module>,
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
            .map(|(i, w)| {
                Linear::new(&mut b, &format!("layers.{i}"), w[0], w[1])
                    .map(|l| Box::new(l) as Box<dyn Module>)
            })
            .collect::<Result<Vec<_>>>()?;
        let root = Mlp {
            layers: Box::new(Sequential { layers }),
            input,
        };
        Ok(Box::new(Network::new(Box::new(root), false)?))
    }
}

impl Module for Mlp {
    fn kind(&self) -> &'static str {
        "Mlp"
    }
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let n = x.dim(0)?;
        if x.elem_count() != n * self.input {
            return Err(Error::msg(format!(
                "mlp: expected {} values per sample, got input of shape {:?} (the MLP needs a fixed input size)",
                self.input,
                x.dims()
            )));
        }
        let mut h = x.reshape((n, self.input))?;
        let layers = self.layers.children();
        for (i, (_, l)) in layers.iter().enumerate() {
            h = l.forward(&h, train)?;
            if i + 1 < layers.len() {
                h = h.relu()?;
            }
        }
        Ok(h)
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        vec![("layers".into(), self.layers.as_ref())]
    }
    fn children_mut(&mut self) -> Vec<(String, &mut Box<dyn Module>)> {
        vec![("layers".into(), &mut self.layers)]
    }
}

crate::register_model!(
    MlpConfig,
    "mlp",
    "Multi-layer perceptron on flattened inputs (ReLU).",
    "hidden: [256, 128]"
);
