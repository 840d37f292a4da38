//! Batch normalisation over (N, H, W) per channel, train and eval modes.

use candle_core::{Result, Tensor, Var};

/// Running statistics of a batch-norm layer, updated in train mode.
pub struct BatchNormStats<'a> {
    pub running_mean: &'a Var,
    pub running_var: &'a Var,
    pub momentum: f64,
}

/// Batch norm of `x` [N, C, H, W] with affine `weight`/`bias` [C]. In train mode it normalises
/// with the batch statistics (biased variance) and updates the running ones (unbiased variance,
/// PyTorch's convention); in eval mode it uses the running statistics.
pub fn batch_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stats: BatchNormStats,
    eps: f64,
    train: bool,
) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let shape = (1, c, 1, 1);
    let (mean, var) = if train {
        let mean = x.mean_keepdim((0, 2, 3))?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim((0, 2, 3))?;
        let count = (n * h * w) as f64;
        let m = stats.momentum;
        let unbiased = (var.detach() * (count / (count - 1.0).max(1.0)))?.reshape(c)?;
        let rm =
            ((stats.running_mean.as_tensor() * (1.0 - m))? + (mean.detach().reshape(c)? * m)?)?;
        let rv = ((stats.running_var.as_tensor() * (1.0 - m))? + (unbiased * m)?)?;
        stats.running_mean.set(&rm)?;
        stats.running_var.set(&rv)?;
        let inv = (var + eps)?.sqrt()?.recip()?;
        let y = centered.broadcast_mul(&inv)?;
        return y
            .broadcast_mul(&weight.reshape(shape)?)?
            .broadcast_add(&bias.reshape(shape)?);
    } else {
        (
            stats.running_mean.as_tensor().detach().reshape(shape)?,
            stats.running_var.as_tensor().detach().reshape(shape)?,
        )
    };
    let inv = (var + eps)?.sqrt()?.recip()?;
    x.broadcast_sub(&mean)?
        .broadcast_mul(&(inv.broadcast_mul(&weight.reshape(shape)?))?)?
        .broadcast_add(&bias.reshape(shape)?)
}
