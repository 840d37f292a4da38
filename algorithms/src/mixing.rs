//! What the label-mixing algorithms (MixUp, CutMix) share: their per-batch draws, the pairing of
//! each sample with another of its batch, and targets as mixtures of two samples' distributions.

use candle_core::{DType, Tensor};
use rand::seq::SliceRandom;
use rand_distr::{Beta, Distribution};
use recipe_engine::error::{Error, Result};
use recipe_engine::kernels::Targets;
use recipe_engine::rng::{Rng, Streams};

/// Draws keyed by (seed, algorithm, batch), continued across the microbatches of one batch (each
/// microbatch gets its own draws; a resumed run, which restarts at a batch, draws the same).
pub struct BatchDraws {
    streams: Streams,
    current: Option<(u64, Rng)>,
}

impl BatchDraws {
    pub fn new(streams: Streams) -> Self {
        BatchDraws {
            streams,
            current: None,
        }
    }

    /// The generator of batch `batch`.
    pub fn at(&mut self, batch: u64) -> &mut Rng {
        if self.current.as_ref().map(|(b, _)| *b) != Some(batch) {
            self.current = None;
        }
        let streams = &self.streams;
        &mut self
            .current
            .get_or_insert_with(|| (batch, streams.at(batch)))
            .1
    }
}

/// A sample from Beta(alpha, alpha); 0 when alpha is 0 (no mixing).
pub fn beta(alpha: f64, rng: &mut Rng) -> Result<f64> {
    if alpha == 0.0 {
        return Ok(0.0);
    }
    let d = Beta::new(alpha, alpha).map_err(|e| Error::msg(format!("Beta({alpha}): {e}")))?;
    Ok(d.sample(rng))
}

/// A random pairing of the `n` samples of a batch: sample i is mixed with sample `perm[i]`.
pub fn permutation(n: usize, rng: &mut Rng) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    p.shuffle(rng);
    p
}

/// Rows `perm` of `t`, along the batch dimension.
pub fn permuted(t: &Tensor, perm: &[usize]) -> Result<Tensor> {
    let idx: Vec<u32> = perm.iter().map(|&i| i as u32).collect();
    Ok(t.index_select(&Tensor::new(idx.as_slice(), t.device())?, 0)?)
}

/// Targets as distributions [N, K]: hard class indices become one-hot rows.
pub fn distributions(t: &Targets, num_classes: usize) -> Result<Tensor> {
    match t {
        Targets::Soft(s) => Ok(s.to_dtype(DType::F32)?),
        Targets::Hard(h) => {
            let idx = h.to_dtype(DType::U32)?.to_vec1::<u32>()?;
            let mut v = vec![0f32; idx.len() * num_classes];
            for (i, &c) in idx.iter().enumerate() {
                if c as usize >= num_classes {
                    return Err(Error::msg(format!(
                        "label {c} is out of range for {num_classes} classes"
                    )));
                }
                v[i * num_classes + c as usize] = 1.0;
            }
            Ok(Tensor::from_vec(v, (idx.len(), num_classes), h.device())?)
        }
    }
}

/// `keep * t + (1 - keep) * t[perm]`: each sample's target mixed with its partner's.
pub fn mix_targets(t: &Targets, perm: &[usize], keep: f64, num_classes: usize) -> Result<Targets> {
    let d = distributions(t, num_classes)?;
    let mixed = ((&d * keep)? + (permuted(&d, perm)? * (1.0 - keep))?)?;
    Ok(Targets::Soft(mixed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn mixed_targets_are_distributions_with_the_right_weights() {
        let y = Targets::Hard(Tensor::new(&[0u32, 2, 1], &Device::Cpu).unwrap());
        let Targets::Soft(m) = mix_targets(&y, &[2, 0, 1], 0.75, 3).unwrap() else {
            panic!("soft")
        };
        let m = m.to_vec2::<f32>().unwrap();
        assert_eq!(m[0], vec![0.75, 0.25, 0.0]);
        assert_eq!(m[1], vec![0.25, 0.0, 0.75]);
        assert_eq!(m[2], vec![0.0, 0.75, 0.25]);
        let mut draws = BatchDraws::new(Streams::new(1, "t"));
        let p = permutation(10, draws.at(3));
        let mut sorted = p.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        // The next microbatch of batch 3 draws on; batch 3 drawn again starts over.
        let q = permutation(10, draws.at(3));
        assert_ne!(p, q);
        let mut again = BatchDraws::new(Streams::new(1, "t"));
        assert_eq!(permutation(10, again.at(3)), p);
    }
}
