//! # CutOut: an algorithm plugin from outside the engine
//!
//! This crate shows what a plugin author writes: a config (serde), its time parameters, the event
//! glue, and one `register_algorithm!` line. The engine is not touched. Its binary
//! (`src/main.rs`) is the `recipe` CLI with this plugin linked in.
//!
//! **What.** CutOut (DeVries & Taylor 2017): at AFTER_DATALOADER, zero one random square of side
//! `length` in each training image (Composer's `CutOut`, `num_holes: 1`).
//!
//! **When it helps.** Small image datasets where the model overfits; it is a regulariser.
//!
//! **Hyperparameters.** `length` (side of the square, pixels, default 8), `num_holes` (1),
//! `stop` (a time after which CutOut is off, default `1dur`: never; scaled by ScaleSchedule).
//!
//! **Expected effect.** Slightly higher training loss, equal or better eval accuracy on small
//! datasets; no cost in throughput.

use candle_core::{DType, Tensor};
use rand::Rng;
use recipe_engine::algorithm::{Algorithm, AlgorithmConfig};
use recipe_engine::error::{Error, Result};
use recipe_engine::plugin::{BindContext, Policy, TimeParams, TimeVisitor};
use recipe_engine::rng::Streams;
use recipe_engine::{Event, State, Time};
use serde::{Deserialize, Serialize};

/// The pure core: zeroes `holes` random squares of side `length` in every image of [N, C, H, W].
/// A square may overlap the border (as in the paper); its centre is uniform over the image.
pub fn cutout(x: &Tensor, length: usize, holes: usize, rng: &mut impl Rng) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let mut v = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    for s in 0..n {
        for _ in 0..holes {
            let (cy, cx) = (
                rng.random_range(0..h) as isize,
                rng.random_range(0..w) as isize,
            );
            let half = (length / 2) as isize;
            let (y0, y1) = (
                (cy - half).max(0) as usize,
                ((cy - half + length as isize).min(h as isize)).max(0) as usize,
            );
            let (x0, x1) = (
                (cx - half).max(0) as usize,
                ((cx - half + length as isize).min(w as isize)).max(0) as usize,
            );
            for ch in 0..c {
                for y in y0..y1 {
                    let row = ((s * c + ch) * h + y) * w;
                    v[row + x0..row + x1].iter_mut().for_each(|p| *p = 0.0);
                }
            }
        }
    }
    Ok(Tensor::from_vec(v, (n, c, h, w), x.device())?.to_dtype(x.dtype())?)
}

fn eight() -> usize {
    8
}
fn one() -> usize {
    1
}
fn whole_run() -> Time {
    Time::dur(1.0)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CutOutConfig {
    #[serde(default = "eight")]
    pub length: usize,
    #[serde(default = "one")]
    pub num_holes: usize,
    /// Turn CutOut off from this time on.
    #[serde(default = "whole_run")]
    pub stop: Time,
}

impl TimeParams for CutOutConfig {
    fn visit_times(&mut self, v: &mut dyn TimeVisitor) {
        v.visit("stop", &mut self.stop, Policy::Scaled);
    }
}

struct CutOut {
    length: usize,
    holes: usize,
    stop: u64,
    rng: Streams,
}

impl AlgorithmConfig for CutOutConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Algorithm>> {
        if self.length == 0 {
            return Err(Error::recipe(
                format!("{}.length", ctx.path),
                "must be at least 1 pixel",
            ));
        }
        Ok(Box::new(CutOut {
            length: self.length,
            holes: self.num_holes,
            stop: ctx.batches("stop", &self.stop)?,
            rng: ctx.rng(),
        }))
    }
}

impl Algorithm for CutOut {
    fn matches(&self, event: Event, state: &State) -> bool {
        event == Event::AfterDataloader && !state.evaluating && state.timestamp.batch < self.stop
    }

    fn apply(&mut self, _event: Event, state: &mut State) -> Result<()> {
        if let Some(b) = state.batch.as_mut() {
            b.inputs = cutout(
                &b.inputs,
                self.length,
                self.holes,
                &mut self.rng.at(state.timestamp.batch),
            )?;
        }
        Ok(())
    }
}

recipe_engine::register_algorithm!(
    CutOutConfig,
    "cutout",
    "Zeroes a random square in each training image (example plugin from outside the engine).",
    "length: 8\nnum_holes: 1\nstop: 1dur"
);

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cuts_at_most_one_square_per_image() {
        let x = Tensor::ones((3, 1, 10, 10), DType::F32, &Device::Cpu).unwrap();
        let mut rng = recipe_engine::rng::stream(1, "t");
        let y = cutout(&x, 4, 1, &mut rng).unwrap();
        for img in y.chunk(3, 0).unwrap() {
            let zeros = img
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .filter(|v| **v == 0.0)
                .count();
            assert!((1..=16).contains(&zeros), "{zeros}");
        }
    }
}
