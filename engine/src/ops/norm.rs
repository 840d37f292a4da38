//! Batch normalisation over (N, H, W) per channel, train and eval modes, as fused CPU kernels
//! with their own backward (candle's reductions over non-last dimensions are slow); other devices
//! use candle's tensor ops.

use super::contiguous_slice;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, Var, WithDType};
use rayon::prelude::*;

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
    let fused = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
    if !train {
        let mean = stats.running_mean.as_tensor().detach();
        let var = stats.running_var.as_tensor().detach();
        let scale = (weight / (var + eps)?.sqrt()?)?;
        let shift = (bias - (mean * &scale)?)?;
        let s4 = (1, c, 1, 1);
        return x
            .broadcast_mul(&scale.reshape(s4)?)?
            .broadcast_add(&shift.reshape(s4)?);
    }
    let count = (n * h * w) as f64;
    if n * h * w < 2 {
        candle_core::bail!(
            "batch norm in training needs more than one value per channel, got input {:?}; use a larger batch or drop the last incomplete batch",
            x.dims()
        );
    }
    let (y, mean, var) = if fused {
        let x = x.contiguous()?;
        let (mean, var) = channel_stats(&x)?;
        (
            x.apply_op3(weight, bias, FusedBatchNorm { eps })?,
            mean,
            var,
        )
    } else {
        let mean = x.mean_keepdim((0, 2, 3))?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim((0, 2, 3))?;
        let y = centered
            .broadcast_div(&(&var + eps)?.sqrt()?)?
            .broadcast_mul(&weight.reshape((1, c, 1, 1))?)?
            .broadcast_add(&bias.reshape((1, c, 1, 1))?)?;
        (y, mean.flatten_all()?.detach(), var.flatten_all()?.detach())
    };
    let m = stats.momentum;
    let unbiased = (var * (count / (count - 1.0).max(1.0)))?;
    let rm = ((stats.running_mean.as_tensor().detach() * (1.0 - m))? + (mean * m)?)?;
    let rv = ((stats.running_var.as_tensor().detach() * (1.0 - m))? + (unbiased * m)?)?;
    stats
        .running_mean
        .set(&rm.to_dtype(stats.running_mean.dtype())?)?;
    stats
        .running_var
        .set(&rv.to_dtype(stats.running_var.dtype())?)?;
    Ok(y)
}

/// Per-channel mean and biased variance of a contiguous CPU tensor [N, C, H, W].
fn channel_stats(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let (n, c, h, w) = x.dims4()?;
    let v = x.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let (mean, var) = stats_of(&v, n, c, h * w);
    Ok((
        Tensor::from_vec(mean, c, x.device())?.to_dtype(x.dtype())?,
        Tensor::from_vec(var, c, x.device())?.to_dtype(x.dtype())?,
    ))
}

/// Mean and biased variance per channel, accumulated in f64, parallel over channels.
fn stats_of<T: WithDType>(x: &[T], n: usize, c: usize, hw: usize) -> (Vec<f64>, Vec<f64>) {
    let per: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let (mut s, mut s2) = (0f64, 0f64);
            for i in 0..n {
                for &v in &x[(i * c + ch) * hw..][..hw] {
                    let v = v.to_f64();
                    s += v;
                    s2 += v * v;
                }
            }
            let m = (n * hw) as f64;
            let mean = s / m;
            (mean, (s2 / m - mean * mean).max(0.0))
        })
        .collect();
    per.into_iter().unzip()
}

/// y = (x - mean) / sqrt(var + eps) * weight + bias with batch statistics; backward recomputes
/// the statistics from x.
struct FusedBatchNorm {
    eps: f64,
}

impl FusedBatchNorm {
    fn forward<T: WithDType>(
        &self,
        x: &[T],
        wt: &[T],
        b: &[T],
        (n, c, hw): (usize, usize, usize),
    ) -> Vec<T> {
        let (mean, var) = stats_of(x, n, c, hw);
        let scale: Vec<f64> = (0..c)
            .map(|ch| wt[ch].to_f64() / (var[ch] + self.eps).sqrt())
            .collect();
        let shift: Vec<f64> = (0..c)
            .map(|ch| b[ch].to_f64() - mean[ch] * scale[ch])
            .collect();
        let mut out = vec![T::zero(); x.len()];
        out.par_chunks_mut(hw)
            .zip(x.par_chunks(hw))
            .enumerate()
            .for_each(|(p, (o, xs))| {
                let ch = p % c;
                let (s, t) = (T::from_f64(scale[ch]), T::from_f64(shift[ch]));
                for (o, &v) in o.iter_mut().zip(xs) {
                    *o = v * s + t;
                }
            });
        out
    }

    /// Gradients (dx, dweight, dbias) from x, weight and dy.
    fn backward<T: WithDType>(
        &self,
        x: &[T],
        wt: &[T],
        dy: &[T],
        (n, c, hw): (usize, usize, usize),
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (mean, var) = stats_of(x, n, c, hw);
        let invstd: Vec<f64> = var.iter().map(|v| 1.0 / (v + self.eps).sqrt()).collect();
        // Per channel: sum(dy) and sum(dy * xhat).
        let sums: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let (mut sdy, mut sdyx) = (0f64, 0f64);
                for i in 0..n {
                    let off = (i * c + ch) * hw;
                    for (&g, &v) in dy[off..off + hw].iter().zip(&x[off..off + hw]) {
                        let g = g.to_f64();
                        sdy += g;
                        sdyx += g * (v.to_f64() - mean[ch]) * invstd[ch];
                    }
                }
                (sdy, sdyx)
            })
            .collect();
        let m = (n * hw) as f64;
        let mut dx = vec![T::zero(); x.len()];
        dx.par_chunks_mut(hw).enumerate().for_each(|(p, o)| {
            let ch = p % c;
            let (sdy, sdyx) = sums[ch];
            let k = wt[ch].to_f64() * invstd[ch];
            let off = p * hw;
            for (j, o) in o.iter_mut().enumerate() {
                let xhat = (x[off + j].to_f64() - mean[ch]) * invstd[ch];
                *o = T::from_f64(k * (dy[off + j].to_f64() - sdy / m - xhat * sdyx / m));
            }
        });
        let dw = sums.iter().map(|s| T::from_f64(s.1)).collect();
        let db = sums.iter().map(|s| T::from_f64(s.0)).collect();
        (dx, dw, db)
    }
}

impl CustomOp3 for FusedBatchNorm {
    fn name(&self) -> &'static str {
        "batch_norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l1.shape().dims4()?;
        let dims = (n, c, h * w);
        macro_rules! go {
            ($t:ty) => {
                <$t>::to_cpu_storage_owned(self.forward(
                    contiguous_slice::<$t>(s1, l1, "batch_norm")?,
                    contiguous_slice::<$t>(s2, l2, "batch_norm")?,
                    contiguous_slice::<$t>(s3, l3, "batch_norm")?,
                    dims,
                ))
            };
        }
        let out = match s1 {
            CpuStorage::F32(_) => go!(f32),
            CpuStorage::F64(_) => go!(f64),
            _ => candle_core::bail!("batch_norm: only f32 and f64 are supported"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c, h, w) = x.dims4()?;
        let dims = (n, c, h * w);
        let dev = x.device();
        macro_rules! go {
            ($t:ty) => {{
                let xs = x.flatten_all()?.to_vec1::<$t>()?;
                let ws = weight.flatten_all()?.to_vec1::<$t>()?;
                let gs = grad.flatten_all()?.to_vec1::<$t>()?;
                let (dx, dw, db) = self.backward(&xs, &ws, &gs, dims);
                (
                    Tensor::from_vec(dx, (n, c, h, w), dev)?,
                    Tensor::from_vec(dw, c, dev)?,
                    Tensor::from_vec(db, c, dev)?,
                )
            }};
        }
        let (dx, dw, db) = match x.dtype() {
            DType::F32 => go!(f32),
            DType::F64 => go!(f64),
            d => candle_core::bail!("batch_norm backward: unsupported dtype {d:?}"),
        };
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{check_grad_fd, max_rel_err, rand_tensor};
    use candle_core::Device;

    /// The composed (candle ops) batch norm, as the reference.
    fn reference(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Tensor {
        let c = x.dim(1).unwrap();
        let mean = x.mean_keepdim((0, 2, 3)).unwrap();
        let xc = x.broadcast_sub(&mean).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim((0, 2, 3)).unwrap();
        xc.broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&w.reshape((1, c, 1, 1)).unwrap())
            .unwrap()
            .broadcast_add(&b.reshape((1, c, 1, 1)).unwrap())
            .unwrap()
    }

    #[test]
    fn fused_forward_and_gradients_match_the_reference_and_finite_differences() {
        for (n, c, h, w) in [(4, 3, 5, 5), (1, 2, 7, 3), (8, 1, 1, 1)] {
            let case = format!("{n} {c} {h} {w}");
            let x = rand_tensor(&[n, c, h, w], 1, DType::F64);
            let wt = rand_tensor(&[c], 2, DType::F64);
            let b = rand_tensor(&[c], 3, DType::F64);
            let fused = |x: &Tensor, wt: &Tensor, b: &Tensor| {
                x.apply_op3(wt, b, FusedBatchNorm { eps: 1e-5 }).unwrap()
            };
            assert!(
                max_rel_err(&fused(&x, &wt, &b), &reference(&x, &wt, &b, 1e-5)) < 1e-9,
                "forward {case}"
            );
            check_grad_fd(|t| fused(t, &wt, &b), &x, 1, 1e-6, &format!("input {case}"));
            check_grad_fd(
                |t| fused(&x, t, &b),
                &wt,
                1,
                1e-6,
                &format!("weight {case}"),
            );
            check_grad_fd(|t| fused(&x, &wt, t), &b, 1, 1e-6, &format!("bias {case}"));
        }
    }

    #[test]
    fn running_statistics_follow_pytorch() {
        let x = rand_tensor(&[4, 2, 3, 3], 7, DType::F32);
        let rm = Var::zeros(2, DType::F32, &Device::Cpu).unwrap();
        let rv = Var::ones(2, DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::ones(2, DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        batch_norm(
            &x,
            &w,
            &b,
            BatchNormStats {
                running_mean: &rm,
                running_var: &rv,
                momentum: 0.1,
            },
            1e-5,
            true,
        )
        .unwrap();
        let mean = x.mean_keepdim((0, 2, 3)).unwrap();
        // unbiased variance over the 36 values of each channel
        let var = (x
            .broadcast_sub(&mean)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_keepdim((0, 2, 3))
            .unwrap()
            / 35.0)
            .unwrap();
        let want_m = (mean.flatten_all().unwrap() * 0.1).unwrap();
        let want_v = ((var.flatten_all().unwrap() * 0.1).unwrap() + 0.9).unwrap();
        assert!(max_rel_err(rm.as_tensor(), &want_m) < 1e-5);
        assert!(max_rel_err(rv.as_tensor(), &want_v) < 1e-5);
    }
}
