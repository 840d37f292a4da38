//! Synchronised batch norm (`sync_batchnorm: true`, PyTorch's `SyncBatchNorm`): in training,
//! every batch norm normalises with the mean and variance of the whole global batch, its
//! per-channel sums added across ranks, instead of each rank's share; the running statistics
//! are then the same on every rank by construction. Data parallel with it trains as one process
//! would at the global batch, batch norm included.
//!
//! The sums cross ranks through [`AllReduceSum`], an autograd op whose backward pass is the same
//! sum applied to the gradient: the gradient of the global statistics collects every rank's
//! contribution, which is exactly the backward PyTorch's `SyncBatchNorm` writes out by hand
//! (all-reducing Σ dy and Σ dy·x̂). Every rank runs the same forward and backward passes in the
//! same order (the shares are equal, see `check_world`), so the collectives pair up.
//!
//! The conversion is module surgery run at bind time after the algorithms' (every plain
//! `BatchNorm2d` becomes a `SyncBatchNorm2d` holding the same parameters under the same names),
//! on one process as on many, so a recipe builds the same tree at every world size and its
//! checkpoints move between them (with `--force`). The statistics are computed with candle's
//! ops, in f64, not by the fused CPU kernels: each batch norm costs a few more passes over its
//! activations and two small all-reduces forward and two backward.

use super::world;
use crate::error::{Error, Result};
use crate::model::{downcast, downcast_box, Module, Network, Param};
use crate::models::layers::BatchNorm2d;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

/// Elementwise sum of an f64 tensor across the job's ranks, differentiable: the gradient of the
/// sum is the sum of the ranks' gradients.
struct AllReduceSum;

impl CustomOp1 for AllReduceSum {
    fn name(&self) -> &'static str {
        "all_reduce_sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F64(data), Some((a, b))) = (s, l.contiguous_offsets()) else {
            candle_core::bail!("all_reduce_sum: expects a contiguous f64 tensor");
        };
        let mut v = data[a..b].to_vec();
        world()
            .sum_f64(&mut v)
            .map_err(|e| candle_core::Error::Msg(format!("all_reduce_sum: {e}")))?;
        Ok((CpuStorage::F64(v), l.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            grad.to_dtype(DType::F64)?
                .contiguous()?
                .apply_op1_no_bwd(&AllReduceSum)?,
        ))
    }
}

/// `x` summed over ranks (differentiable).
fn all_reduce_sum(x: &Tensor) -> Result<Tensor> {
    Ok(x.to_dtype(DType::F64)?
        .contiguous()?
        .apply_op1(AllReduceSum)?)
}

/// A batch norm whose training statistics are those of the global batch, across ranks.
pub struct SyncBatchNorm2d {
    bn: BatchNorm2d,
}

impl SyncBatchNorm2d {
    pub fn new(bn: BatchNorm2d) -> Self {
        SyncBatchNorm2d { bn }
    }

    fn train_forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let dev = x.device();
        let xd = x.to_dtype(DType::F64)?;
        // Σx per channel and this rank's count in one collective; the count carries no gradient.
        let local = Tensor::new(&[(n * h * w) as f64], dev)?;
        let sums = Tensor::cat(&[&xd.sum((0, 2, 3))?, &local], 0)?;
        let sums = all_reduce_sum(&sums)?;
        let count = sums.get(c)?.to_scalar::<f64>()?;
        if count < 2.0 {
            return Err(Error::msg(format!(
                "batch norm in training needs more than one value per channel across all processes, got {count} for input {:?}; use a larger batch or drop the last incomplete batch",
                x.dims()
            )));
        }
        let mean = (sums.narrow(0, 0, c)? / count)?;
        // The variance from centred squares (two collectives, as the fused kernels' two passes):
        // E[x²] - mean² loses the digits that matter when the mean is large.
        let centred = xd.broadcast_sub(&mean.reshape((1, c, 1, 1))?)?;
        let var = (all_reduce_sum(&centred.sqr()?.sum((0, 2, 3))?)? / count)?;
        let inv = (var.clone() + self.bn.eps())?.sqrt()?.recip()?;
        let scale = (self.bn.weight().tensor().to_dtype(DType::F64)? * inv)?;
        let shift = (self.bn.bias().tensor().to_dtype(DType::F64)? - (&mean * &scale)?)?;
        self.update_running(&mean.detach(), &var.detach(), count)?;
        let dt = x.dtype();
        let s4 = (1, c, 1, 1);
        Ok(x.broadcast_mul(&scale.to_dtype(dt)?.reshape(s4)?)?
            .broadcast_add(&shift.to_dtype(dt)?.reshape(s4)?)?)
    }

    /// The running statistics after one batch (momentum-weighted, the unbiased variance of the
    /// global batch: PyTorch's convention), the same on every rank.
    fn update_running(&self, mean: &Tensor, var: &Tensor, count: f64) -> Result<()> {
        let m = self.bn.momentum();
        let (rm, rv) = self.bn.running();
        let blend = |p: &Param, batch: Tensor| -> Result<()> {
            let old = p.var.as_tensor().detach().to_dtype(DType::F64)?;
            let new = ((old * (1.0 - m))? + (batch * m)?)?;
            Ok(p.var.set(&new.to_dtype(p.var.dtype())?)?)
        };
        blend(rm, mean.clone())?;
        blend(rv, (var * (count / (count - 1.0)))?)
    }
}

impl Module for SyncBatchNorm2d {
    fn kind(&self) -> &'static str {
        "SyncBatchNorm2d"
    }
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            self.train_forward(x)
        } else {
            self.bn.forward(x, false)
        }
    }
    fn describe(&self) -> String {
        format!("Sync{}", self.bn.describe())
    }
    fn own_params(&self) -> Vec<Param> {
        self.bn.own_params()
    }
}

/// Replaces every plain batch norm of `net` by its synchronised form (the recipe's
/// `sync_batchnorm: true`). Batch norms another algorithm rewrote (GhostBatchNorm's per-chunk
/// statistics) keep their own.
pub fn convert(net: &mut Network) -> Result<Vec<String>> {
    net.replace(
        "sync_batchnorm",
        |_, m| downcast::<BatchNorm2d>(m).is_some(),
        |_, m| {
            let bn = downcast_box::<BatchNorm2d>(m).map_err(|_| {
                Error::msg("sync_batchnorm selected a module that is not a BatchNorm2d")
            })?;
            Ok(Box::new(SyncBatchNorm2d::new(*bn)))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ParamBuilder;
    use candle_core::{Device, Var};

    fn bn(c: usize) -> BatchNorm2d {
        let mut b = ParamBuilder::stream(3, "test", &Device::Cpu);
        BatchNorm2d::new(&mut b, "bn", c, false).unwrap()
    }

    /// On one process the synchronised batch norm is the batch norm: the same output, the same
    /// gradients (through the fused kernels on one side, candle's ops on the other) and the
    /// same running statistics.
    #[test]
    fn on_one_process_it_is_the_plain_batch_norm() {
        let x = Tensor::arange(0f32, 360.0, &Device::Cpu)
            .and_then(|t| (t * 0.37)?.sin()?.affine(2.0, 0.7)?.reshape((6, 3, 5, 4)))
            .unwrap();
        let (plain, sync) = (bn(3), SyncBatchNorm2d::new(bn(3)));
        // Distinct affine values, so that a mixed-up channel shows.
        for m in [&plain as &dyn Module, &sync as &dyn Module] {
            let p = m.own_params();
            p[0].var
                .set(&Tensor::new(&[0.5f32, 1.5, -1.0], &Device::Cpu).unwrap())
                .unwrap();
            p[1].var
                .set(&Tensor::new(&[0.1f32, -0.2, 0.3], &Device::Cpu).unwrap())
                .unwrap();
        }
        let run = |m: &dyn Module| {
            let xv = Var::from_tensor(&x).unwrap();
            let y = m.forward(xv.as_tensor(), true).unwrap();
            let loss = (y.sqr().unwrap() * (y.sin().unwrap()))
                .unwrap()
                .sum_all()
                .unwrap();
            let g = loss.backward().unwrap();
            let p = m.own_params();
            let grads = [xv.as_tensor(), p[0].var.as_tensor(), p[1].var.as_tensor()].map(|t| {
                g.get(t)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            });
            let running = [&p[2], &p[3]].map(|p| p.var.as_tensor().to_vec1::<f32>().unwrap());
            (
                y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                grads,
                running,
            )
        };
        let close = |a: &[f32], b: &[f32], what: &str| {
            for (p, q) in a.iter().zip(b) {
                assert!(
                    (p - q).abs() <= 1e-4 * (1.0 + p.abs()),
                    "{what}: {p} vs {q}"
                );
            }
        };
        let (ya, ga, ra) = run(&plain);
        let (yb, gb, rb) = run(&sync);
        close(&ya, &yb, "output");
        for (i, what) in ["input", "weight", "bias"].iter().enumerate() {
            close(&ga[i], &gb[i], what);
        }
        close(&ra[0], &rb[0], "running mean");
        close(&ra[1], &rb[1], "running var");
        // Evaluation reads the running statistics, as the plain batch norm.
        close(
            &plain
                .forward(&x, false)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap(),
            &sync
                .forward(&x, false)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap(),
            "eval",
        );
    }
}
