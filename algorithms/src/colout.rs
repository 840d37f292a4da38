//! # ColOut
//!
//! **What.** Drops random rows and columns of the training images (Composer's ColOut, batch-wise):
//! at AFTER_DATALOADER, keeps `int((1 - p_row) H)` rows and `int((1 - p_col) W)` columns, drawn
//! at random and kept in their order, the same ones for every image of the batch, so the batch
//! gets smaller and the step cheaper. Draws are keyed by (seed, batch). Labels are class indices
//! here, so there are no dense targets to crop with the images (Composer's `resize_target`).
//!
//! **When it helps.** Convolutional networks with global pooling on images large enough that
//! losing a few rows and columns keeps the object; a cheap augmentation and speed-up together.
//!
//! **Hyperparameters.** `p_row` (0.15), `p_col` (0.15), Composer's defaults, each a fraction in
//! [0, 1); `stop` (default `1dur`: never), a time after which ColOut is off so that the last part
//! of the run trains at full size. `stop` is a time of the run and scales with ScaleSchedule.
//!
//! **Expected effect.** About `(1 - p_row)(1 - p_col)` of the pixels (72% with the defaults), so
//! a faster step; a small accuracy cost that a few full-size epochs at the end (`stop`) recover.

use candle_core::Tensor;
use rand::seq::index::sample;
use recipe_engine::algorithm::{Algorithm, AlgorithmConfig};
use recipe_engine::error::{Error, Result};
use recipe_engine::plugin::{BindContext, Policy, TimeParams, TimeVisitor};
use recipe_engine::rng::Streams;
use recipe_engine::{Event, State, Time};
use serde::{Deserialize, Serialize};

/// The pure core: keeps `int((1 - p) * size)` random rows (and columns) of every image of
/// [N, C, H, W], in their order.
pub fn colout(x: &Tensor, p_row: f64, p_col: f64, rng: &mut impl rand::Rng) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let mut keep = |size: usize, p: f64| -> Result<Tensor> {
        let n = (((1.0 - p) * size as f64) as usize).max(1);
        let mut idx: Vec<u32> = sample(rng, size, n).into_iter().map(|i| i as u32).collect();
        idx.sort_unstable();
        Ok(Tensor::new(idx.as_slice(), x.device())?)
    };
    let (rows, cols) = (keep(h, p_row)?, keep(w, p_col)?);
    Ok(x.index_select(&rows, 2)?.index_select(&cols, 3)?)
}

fn fifteen() -> f64 {
    0.15
}
fn whole_run() -> Time {
    Time::dur(1.0)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColOutConfig {
    #[serde(default = "fifteen")]
    pub p_row: f64,
    #[serde(default = "fifteen")]
    pub p_col: f64,
    /// Turn ColOut off from this time on.
    #[serde(default = "whole_run")]
    pub stop: Time,
}

impl TimeParams for ColOutConfig {
    fn visit_times(&mut self, v: &mut dyn TimeVisitor) {
        v.visit("stop", &mut self.stop, Policy::Scaled);
    }
}

struct ColOut {
    p_row: f64,
    p_col: f64,
    stop: u64,
    rng: Streams,
}

impl AlgorithmConfig for ColOutConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Algorithm>> {
        for (key, p) in [("p_row", self.p_row), ("p_col", self.p_col)] {
            if !(0.0..1.0).contains(&p) {
                return Err(Error::recipe(
                    format!("{}.{key}", ctx.path),
                    format!("{p} is not a fraction in [0, 1)"),
                ));
            }
        }
        Ok(Box::new(ColOut {
            p_row: self.p_row,
            p_col: self.p_col,
            stop: ctx.batches("stop", &self.stop)?,
            rng: ctx.rng(),
        }))
    }
}

impl Algorithm for ColOut {
    fn matches(&self, event: Event, state: &State) -> bool {
        event == Event::AfterDataloader && !state.evaluating && state.timestamp.batch < self.stop
    }

    fn apply(&mut self, _event: Event, state: &mut State) -> Result<()> {
        if let Some(b) = state.batch.as_mut() {
            b.inputs = colout(
                &b.inputs,
                self.p_row,
                self.p_col,
                &mut self.rng.at(state.timestamp.batch),
            )?;
        }
        Ok(())
    }
}

recipe_engine::register_algorithm!(
    ColOutConfig,
    "colout",
    "Drops random rows and columns (the same across the batch) of each training image.",
    "p_row: 0.15\np_col: 0.15\nstop: 1dur"
);

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn keeps_rows_and_columns_in_order() {
        // Pixel value = 10 * row + column: what survives is increasing along each axis.
        let v: Vec<f32> = (0..10)
            .flat_map(|r| (0..10).map(move |c| (10 * r + c) as f32))
            .collect();
        let x = Tensor::from_vec(v, (1, 1, 10, 10), &Device::Cpu).unwrap();
        let mut rng = recipe_engine::rng::stream(1, "t");
        let y = colout(&x, 0.2, 0.3, &mut rng).unwrap();
        assert_eq!(y.dims(), &[1, 1, 8, 7]);
        let rows = y
            .squeeze(0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for r in &rows {
            assert!(r.windows(2).all(|p| p[0] < p[1]));
            assert!(r.iter().all(|v| (*v as usize / 10) == (r[0] as usize / 10)));
        }
        assert!(rows.windows(2).all(|p| p[0][0] < p[1][0]));
    }

    #[test]
    fn fractions_outside_zero_to_one_are_refused_with_their_key() {
        let ctx =
            BindContext::standalone(&Device::Cpu, [1, 8, 8], 10, 4).with_path("algorithms[0]");
        for (p_row, p_col, key) in [
            (1.0, 0.1, "p_row"),
            (0.1, -0.1, "p_col"),
            (f64::NAN, 0.1, "p_row"),
        ] {
            let cfg = ColOutConfig {
                p_row,
                p_col,
                stop: whole_run(),
            };
            let e = cfg
                .build(&ctx)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains(&format!("algorithms[0].{key}")), "{e}");
        }
        let ok = ColOutConfig {
            p_row: 0.0,
            p_col: 0.5,
            stop: whole_run(),
        };
        assert!(ok.build(&ctx).is_ok());
    }
}
