use super::layers::{ConvBnReLU, Linear};
use crate::error::{Error, Result};
use crate::model::ModelConfig;
use crate::model::{downcast, Module, Network, Sequential};
use crate::model::{Model, ParamBuilder};
use crate::plugin::{BindContext, TimeParams};
use candle_core::Tensor;
use recipe_kernels as ops;
use serde::{Deserialize, Serialize};

/// A small CNN: stages of 3x3 conv + batch norm + ReLU, each followed by a 2x2 max pool except the
/// last; global average pooling; a linear head. Any input size works.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmallCnnConfig {
    /// Output channels of each stage.
    #[serde(default = "default_channels")]
    pub channels: Vec<usize>,
}

fn default_channels() -> Vec<usize> {
    vec![32, 64, 128]
}

impl TimeParams for SmallCnnConfig {}

/// Stages `features.0`, `features.1`, ... (conv, batch norm, ReLU), each but the last followed
/// by a 2x2 max pool while the image is at least 2x2; global average pool; `fc`.
struct SmallCnn {
    features: Box<dyn Module>,
    fc: Box<dyn Module>,
}

impl Module for SmallCnn {
    fn kind(&self) -> &'static str {
        "SmallCnn"
    }
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let stages = match downcast::<Sequential>(self.features.as_ref()) {
            Some(s) => s.layers.iter().collect::<Vec<_>>(),
            None => vec![&self.features],
        };
        let mut h = x.clone();
        for (i, s) in stages.iter().enumerate() {
            h = s.forward(&h, train)?;
            if i + 1 < stages.len() && h.dim(2)? >= 2 && h.dim(3)? >= 2 {
                h = ops::max_pool2d(&h, 2, 2, 0)?;
            }
        }
        self.fc.forward(&ops::global_avg_pool(&h)?, train)
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        vec![
            ("features".into(), self.features.as_ref()),
            ("fc".into(), self.fc.as_ref()),
        ]
    }
    fn children_mut(&mut self) -> Vec<(String, &mut Box<dyn Module>)> {
        vec![
            ("features".into(), &mut self.features),
            ("fc".into(), &mut self.fc),
        ]
    }
}

impl ModelConfig for SmallCnnConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Model>> {
        if self.channels.is_empty() || self.channels.contains(&0) {
            return Err(Error::recipe(
                "model.channels",
                "give at least one stage, each with at least one channel",
            ));
        }
        let mut b = ParamBuilder::new(ctx.seed, &ctx.device);
        let mut c_in = ctx.input_shape[0];
        let mut stages: Vec<Box<dyn Module>> = Vec::new();
        for (i, &c) in self.channels.iter().enumerate() {
            stages.push(Box::new(ConvBnReLU::new(
                &mut b,
                &format!("features.{i}"),
                (c_in, c, 3),
            )?));
            c_in = c;
        }
        let fc = Linear::new(&mut b, "fc", c_in, ctx.num_classes)?;
        let root = SmallCnn {
            features: Box::new(Sequential { layers: stages }),
            fc: Box::new(fc),
        };
        Ok(Box::new(Network::new(Box::new(root), true)?))
    }
}

crate::register_model!(
    SmallCnnConfig,
    "small_cnn",
    "Small CNN: 3x3 conv-BN-ReLU stages with 2x2 max pools, global average pool, linear head.",
    "channels: [32, 64, 128]"
);
