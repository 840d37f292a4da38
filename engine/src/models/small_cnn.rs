use super::layers::{ConvBn, Linear};
use crate::error::{Error, Result};
use crate::model::ModelConfig;
use crate::model::{Model, ParamBuilder, ParamStore};
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

struct SmallCnn {
    stages: Vec<ConvBn>,
    head: Linear,
    params: ParamStore,
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
        let mut stages = Vec::new();
        for (i, &c) in self.channels.iter().enumerate() {
            stages.push(ConvBn::new(
                &mut b,
                &format!("features.{i}.conv"),
                &format!("features.{i}.bn"),
                (c_in, c, 3),
                1,
                1,
                false,
            )?);
            c_in = c;
        }
        let head = Linear::new(&mut b, "fc", c_in, ctx.num_classes)?;
        Ok(Box::new(SmallCnn {
            stages,
            head,
            params: b.finish(),
        }))
    }
}

impl Model for SmallCnn {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, s) in self.stages.iter().enumerate() {
            h = s.forward(&h, train, true)?;
            if i + 1 < self.stages.len() && h.dim(2)? >= 2 && h.dim(3)? >= 2 {
                h = ops::max_pool2d(&h, 2, 2, 0)?;
            }
        }
        self.head.forward(&ops::global_avg_pool(&h)?)
    }
    fn params(&self) -> &ParamStore {
        &self.params
    }
}

crate::register_model!(
    SmallCnnConfig,
    "small_cnn",
    "Small CNN: 3x3 conv-BN-ReLU stages with 2x2 max pools, global average pool, linear head.",
    "channels: [32, 64, 128]"
);
