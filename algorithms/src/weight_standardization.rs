//! # WeightStandardization
//!
//! **What.** Standardised convolution kernels (Qiao et al. 2019, Composer's
//! WeightStandardization): module surgery at bind time makes every `Conv2d` but the last
//! `n_last_layers_ignore` (in module order) convolve with its kernel standardised per output
//! channel, `(W - mean(W)) / sqrt(var(W) + 1e-10)` over (in channels, kh, kw), biased variance,
//! as Composer's parametrization. The trained weights stay the raw ones, under their names; the
//! gradient flows through the standardisation.
//!
//! **When it helps.** With group norm or small batches, where it smooths the loss landscape;
//! with batch norm Composer found it roughly neutral on ResNets.
//!
//! **Hyperparameters.** Composer's default: `n_last_layers_ignore` (0). No time parameters.
//!
//! **Expected effect.** Composer reports a small gain with group norm on ImageNet (and marks it
//! neutral-to-slightly-negative with batch norm); on CPU it also turns off the fused
//! conv + batch norm kernels of every convolution it rewrites.

use recipe_engine::algorithm::{Algorithm, AlgorithmConfig};
use recipe_engine::candle_core::{Tensor, D};
use recipe_engine::error::{Error, Result};
use recipe_engine::model::Param;
use recipe_engine::model::{downcast, downcast_box, Module, Surgery};
use recipe_engine::models::layers::Conv2d;
use recipe_engine::plugin::{BindContext, TimeParams};
use serde::{Deserialize, Serialize};

/// The pure core: `w` [O, I, kh, kw] standardised per output channel (biased variance, eps 1e-10).
pub fn standardize(w: &Tensor) -> Result<Tensor> {
    let o = w.dim(0)?;
    let flat = w.reshape((o, ()))?;
    let mean = flat.mean_keepdim(D::Minus1)?;
    let centred = flat.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let std = (var + 1e-10)?.sqrt()?;
    Ok(centred.broadcast_div(&std)?.reshape(w.dims())?)
}

/// A convolution with its kernel standardised at every forward pass.
pub struct WsConv2d {
    conv: Conv2d,
}

impl Module for WsConv2d {
    fn kind(&self) -> &'static str {
        "WSConv2d"
    }
    fn forward(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        let w = standardize(&self.conv.weight().tensor())?;
        self.conv
            .forward_with(x, &w, self.conv.conv_params().stride)
    }
    fn describe(&self) -> String {
        format!("WSConv2d({})", self.conv.describe())
    }
    fn own_params(&self) -> Vec<Param> {
        self.conv.own_params()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightStandardizationConfig {
    #[serde(default)]
    pub n_last_layers_ignore: usize,
}

impl TimeParams for WeightStandardizationConfig {}

struct Ws {
    ignore: usize,
    path: String,
}

impl AlgorithmConfig for WeightStandardizationConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Algorithm>> {
        Ok(Box::new(Ws {
            ignore: self.n_last_layers_ignore,
            path: ctx.path.clone(),
        }))
    }
}

impl Algorithm for Ws {
    fn surgery(&mut self, s: &mut Surgery) -> Result<()> {
        let by = s.by().to_string();
        let net = s.network()?;
        let convs: Vec<String> = net
            .modules()
            .into_iter()
            .filter(|(_, m)| downcast::<Conv2d>(*m).is_some())
            .map(|(p, _)| p)
            .collect();
        if self.ignore >= convs.len() && !convs.is_empty() {
            return Err(Error::recipe(
                format!("{}.n_last_layers_ignore", self.path),
                format!(
                    "{} leaves none of the model's {} convolutions to standardise",
                    self.ignore,
                    convs.len()
                ),
            ));
        }
        let chosen = &convs[..convs.len() - self.ignore.min(convs.len())];
        net.replace(
            &by,
            |p, m| downcast::<Conv2d>(m).is_some() && chosen.iter().any(|c| c == p),
            |_, m| {
                let conv = downcast_box::<Conv2d>(m).map_err(|_| {
                    Error::msg("weight_standardization selected a module that is not a Conv2d")
                })?;
                Ok(Box::new(WsConv2d { conv: *conv }))
            },
        )?;
        Ok(())
    }
}

recipe_engine::register_algorithm!(
    WeightStandardizationConfig,
    "weight_standardization",
    "Convolution kernels standardised per output channel at every forward pass (module surgery).",
    "n_last_layers_ignore: 0"
);

#[cfg(test)]
mod tests {
    use super::*;
    use recipe_engine::candle_core::Device;

    #[test]
    fn each_output_channel_has_zero_mean_and_unit_variance() {
        let v: Vec<f32> = (0..2 * 3 * 3 * 3)
            .map(|i| ((i * 7) % 11) as f32 * 0.3 - 1.0)
            .collect();
        let w = Tensor::from_vec(v, (2, 3, 3, 3), &Device::Cpu).unwrap();
        let s = standardize(&w).unwrap();
        for o in 0..2 {
            let row = s
                .get(o)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let mean = row.iter().sum::<f32>() / row.len() as f32;
            let var = row.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / row.len() as f32;
            assert!(mean.abs() < 1e-5, "{mean}");
            assert!((var - 1.0).abs() < 1e-4, "{var}");
        }
    }
}
