//! # ChannelsLast
//!
//! **What.** Composer's ChannelsLast converts the model and inputs to the NHWC memory format,
//! which cuDNN's tensor-core convolutions run faster. In `recipe` it is a documented no-op on
//! every device today: on CPU the project's convolution kernels already choose their own
//! internal layout per layer (and the tensors between layers stay NCHW), and candle's CUDA
//! backend has no channels-last format (the GPU path of issue 18 will take it up). The plugin
//! exists so that Composer recipes that list it run unchanged; it logs what it did once.
//!
//! **When it helps.** On NVIDIA GPUs with tensor cores, in Composer; nowhere yet here.
//!
//! **Hyperparameters.** None.
//!
//! **Expected effect.** None in `recipe` (no cost either).

use recipe_engine::algorithm::{Algorithm, AlgorithmConfig};
use recipe_engine::error::Result;
use recipe_engine::event::Event;
use recipe_engine::plugin::{BindContext, TimeParams};
use recipe_engine::State;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelsLastConfig {}

impl TimeParams for ChannelsLastConfig {}

struct ChannelsLast;

impl AlgorithmConfig for ChannelsLastConfig {
    fn build(&self, _ctx: &BindContext) -> Result<Box<dyn Algorithm>> {
        Ok(Box::new(ChannelsLast))
    }
}

impl Algorithm for ChannelsLast {
    fn matches(&self, event: Event, _state: &State) -> bool {
        event == Event::FitStart
    }
    fn apply(&mut self, _event: Event, state: &mut State) -> Result<()> {
        let device = if state.device.is_cpu() {
            "the CPU"
        } else {
            "this device"
        };
        tracing::info!(
            "channels_last: no-op on {device} (the CPU kernels pick their own layout; candle has no NHWC format on CUDA)"
        );
        Ok(())
    }
}

recipe_engine::register_algorithm!(
    ChannelsLastConfig,
    "channels_last",
    "NHWC memory format (Composer's ChannelsLast): a documented no-op here, the CPU kernels choose their own layout.",
    ""
);
