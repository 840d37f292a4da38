//! Batch normalisation over (N, H, W) per channel, train and eval modes, with an optional fused
//! ReLU, or fused with a residual block's join, `relu(bn(x) + residual)` (`batch_norm_add_relu`).
//! On CPU, training runs as fused kernels with their own backward: the statistics in two passes
//! (mean, then centred variance, summed in f32 lanes per row and f64 across rows), or given by the
//! convolution that produced the input (`batch_norm_given`), the output in one pass, and the
//! backward in two passes that read x and dy in place (the statistics are kept from the forward
//! pass, and the ReLU's mask is recomputed from x). A batch norm + ReLU followed by a convolution
//! can also run inside the convolution (`bn_relu_conv2d`, with `conv::conv2d_after_bn_relu`), its
//! output never written; `bn_relu` and `affine` are the arithmetic both share. Other devices use
//! candle's tensor ops.

use crate::{contiguous_slice, lane_sum, par_new, LANES};
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, Var, WithDType,
};
use rayon::prelude::*;
use std::sync::{Arc, OnceLock};

/// Sums per-channel statistics across data-parallel processes, in place: every process calls
/// it at the same point of its forward and backward passes with a buffer of the same length, and
/// each ends with the elementwise sum over all of them (the engine passes MPI's all-reduce).
pub type StatSum = Arc<dyn Fn(&mut [f64]) -> Result<()> + Send + Sync>;

/// Running statistics of a batch-norm layer, updated in train mode.
pub struct BatchNormStats<'a> {
    pub running_mean: &'a Var,
    pub running_var: &'a Var,
    pub momentum: f64,
    /// Synchronised batch norm: the batch statistics of the whole global batch, summed across
    /// processes by this (in the forward pass the mean and variance, in the backward pass the
    /// two sums the input gradient needs); `None` normalises with this process's batch alone.
    pub sync: Option<StatSum>,
}

/// Batch norm of `x` [N, C, H, W] with affine `weight`/`bias` [C], followed by a ReLU when
/// `relu`. In train mode it normalises with the batch statistics (biased variance) and updates the
/// running ones (unbiased variance, PyTorch's convention); in eval mode it uses the running
/// statistics.
pub fn batch_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stats: BatchNormStats,
    eps: f64,
    train: bool,
    relu: bool,
) -> Result<Tensor> {
    batch_norm_given(x, weight, bias, stats, eps, train, relu, None)
}

/// `batch_norm`, with the batch statistics given when the op that produced `x` computed them
/// (`conv::conv2d_with_batch_stats`); they are used in train mode on CPU, where they save the
/// passes that compute them, and ignored otherwise.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_given(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stats: BatchNormStats,
    eps: f64,
    train: bool,
    relu: bool,
    given: Option<Saved>,
) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let act = |y: Tensor| if relu { y.relu() } else { Ok(y) };
    let fused = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
    if !train {
        let mean = stats.running_mean.as_tensor().detach();
        let var = stats.running_var.as_tensor().detach();
        let scale = (weight / (var + eps)?.sqrt()?)?;
        let shift = (bias - (mean * &scale)?)?;
        let s4 = (1, c, 1, 1);
        return act(x
            .broadcast_mul(&scale.reshape(s4)?)?
            .broadcast_add(&shift.reshape(s4)?)?);
    }
    if fused {
        check_affine(weight, bias, c)?;
        return train_fused(x, stats, eps, relu, given, |x, op| {
            x.apply_op3(weight, bias, op)
        });
    }
    if stats.sync.is_some() {
        candle_core::bail!(
            "synchronised batch norm runs on CPU in f32 or f64 (the fused kernels), not on {:?} in {:?}",
            x.device(),
            x.dtype()
        );
    }
    check_count(x)?;
    let mean = x.mean_keepdim((0, 2, 3))?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim((0, 2, 3))?;
    let y = centered
        .broadcast_div(&(&var + eps)?.sqrt()?)?
        .broadcast_mul(&weight.reshape((1, c, 1, 1))?)?
        .broadcast_add(&bias.reshape((1, c, 1, 1))?)?;
    update_running(
        &stats,
        mean.flatten_all()?.detach(),
        var.flatten_all()?.detach(),
        (n * h * w) as f64,
    )?;
    act(y)
}

/// `relu(batch_norm(x) + residual)`: the join of a residual block. Training on CPU runs it as
/// one fused op (the normalisation, the add and the ReLU in one pass over the activations, where
/// a batch norm and then `add_relu` make two and write one more tensor); otherwise it is
/// `add_relu` after `batch_norm_given`.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_add_relu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    residual: &Tensor,
    stats: BatchNormStats,
    eps: f64,
    train: bool,
    given: Option<Saved>,
) -> Result<Tensor> {
    let fused = train
        && x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && residual.dtype() == x.dtype()
        && residual.shape() == x.shape();
    if !fused {
        let y = batch_norm_given(x, weight, bias, stats, eps, train, false, given)?;
        return super::add_relu(&y, residual);
    }
    check_affine(weight, bias, x.dims4()?.1)?;
    // weight and bias as the rows of one [2, C] input (a custom op takes at most three)
    let wb = Tensor::stack(&[weight, bias], 0)?;
    let residual = residual.contiguous()?;
    train_fused(x, stats, eps, true, given, |x, op| {
        x.apply_op3(&wb, &residual, BatchNormAddRelu(op))
    })
}

/// The gradients of x, weight and bias of `relu(batch_norm(x))` (batch statistics `saved`)
/// from the output gradient `grad`: the fused batch norm's backward, for ops that compute the
/// batch norm themselves (`conv::conv2d_after_bn_relu`).
pub(crate) fn bn_relu_gradients(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    saved: &Saved,
    eps: f64,
    grad: &Tensor,
    sync: Option<StatSum>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = FusedBatchNorm {
        eps,
        relu: true,
        saved: Arc::new(OnceLock::from(saved.clone())),
        given: None,
        sync,
    };
    op.gradients(x, weight, bias, &grad.contiguous()?, true)
}

/// Weight and bias must be one value per channel.
pub(crate) fn check_affine(weight: &Tensor, bias: &Tensor, c: usize) -> Result<()> {
    if weight.dims() != [c] || bias.dims() != [c] {
        candle_core::bail!(
            "batch norm: weight {:?} and bias {:?} must both be [{c}], one value per channel of the input",
            weight.dims(),
            bias.dims()
        );
    }
    Ok(())
}

pub(crate) fn check_count(x: &Tensor) -> Result<()> {
    let (n, _, h, w) = x.dims4()?;
    if n * h * w < 2 {
        candle_core::bail!(
            "batch norm in training needs more than one value per channel, got input {:?}; use a larger batch or drop the last incomplete batch",
            x.dims()
        );
    }
    Ok(())
}

/// Training through a fused op on CPU: `apply` runs `op` on the contiguous input; the batch
/// statistics it keeps then update the running ones.
fn train_fused(
    x: &Tensor,
    stats: BatchNormStats,
    eps: f64,
    relu: bool,
    given: Option<Saved>,
    apply: impl FnOnce(&Tensor, FusedBatchNorm) -> Result<Tensor>,
) -> Result<Tensor> {
    check_count(x)?;
    let c = x.dim(1)?;
    if let Some(g) = &given {
        check_given(g, c)?;
    }
    let kept = Arc::new(OnceLock::new());
    let op = FusedBatchNorm {
        eps,
        relu,
        saved: kept.clone(),
        given,
        sync: stats.sync.clone(),
    };
    let y = apply(&x.contiguous()?, op)?;
    let Some(saved) = kept.get() else {
        candle_core::bail!("batch_norm: the forward pass kept no statistics");
    };
    update_running_from(&stats, saved, x)?;
    Ok(y)
}

/// Batch statistics given by the op that produced the input must be one per channel.
pub(crate) fn check_given(given: &Saved, c: usize) -> Result<()> {
    if given.mean.len() != c || given.var.len() != c {
        candle_core::bail!(
            "batch_norm: {} means and {} variances given for {c} channels; pass the statistics of this input (one per channel) or none",
            given.mean.len(),
            given.var.len()
        );
    }
    Ok(())
}

/// `update_running` with the batch statistics `saved` of a batch like `x` (N, C, H, W; over
/// the global batch when synchronised).
pub(crate) fn update_running_from(stats: &BatchNormStats, saved: &Saved, x: &Tensor) -> Result<()> {
    let c = x.dim(1)?;
    let dev = x.device();
    update_running(
        stats,
        Tensor::from_slice(&saved.mean, c, dev)?.to_dtype(x.dtype())?,
        Tensor::from_slice(&saved.var, c, dev)?.to_dtype(x.dtype())?,
        saved.count,
    )
}

/// The statistics of the global batch from this process's `local` ones: one sum across
/// processes of [count, Σx, Σx²] per channel, each rebuilt in f64 from the local mean and
/// (centred, two-pass) variance, so the cancellation in E[x²] - mean² costs f64 digits only.
pub(crate) fn global_stats(local: &Saved, sum: &StatSum) -> Result<Saved> {
    let c = local.mean.len();
    let n = local.count;
    let mut buf = Vec::with_capacity(2 * c + 1);
    buf.push(n);
    buf.extend(local.mean.iter().map(|m| m * n));
    buf.extend(
        local
            .mean
            .iter()
            .zip(&local.var)
            .map(|(m, v)| (v + m * m) * n),
    );
    sum(&mut buf)?;
    let count = buf[0];
    if buf.len() != 2 * c + 1 || count < 2.0 {
        candle_core::bail!(
            "synchronised batch norm: {count} values per channel across the processes (and {} sums for {c} channels); every process must normalise the same layers with a share of the batch",
            buf.len()
        );
    }
    let mean: Vec<f64> = buf[1..=c].iter().map(|s| s / count).collect();
    let var = buf[c + 1..]
        .iter()
        .zip(&mean)
        .map(|(s2, m)| (s2 / count - m * m).max(0.0))
        .collect();
    Ok(Saved { mean, var, count })
}

/// Running statistics after one batch: momentum-weighted, with the unbiased variance of `count`
/// values (PyTorch's convention).
fn update_running(stats: &BatchNormStats, mean: Tensor, var: Tensor, count: f64) -> Result<()> {
    let m = stats.momentum;
    let unbiased = (var * (count / (count - 1.0).max(1.0)))?;
    let rm = ((stats.running_mean.as_tensor().detach() * (1.0 - m))? + (mean * m)?)?;
    let rv = ((stats.running_var.as_tensor().detach() * (1.0 - m))? + (unbiased * m)?)?;
    stats
        .running_mean
        .set(&rm.to_dtype(stats.running_mean.dtype())?)?;
    stats
        .running_var
        .set(&rv.to_dtype(stats.running_var.dtype())?)
}

/// `(Σ g', Σ g' x)` over one row, with `g' = mask(g, x)`: the masked row is written to `tmp`
/// first (a loop that vectorises; a select inside a reduction does not), then summed in `LANES` lanes
/// of `T` added up in f64.
#[inline]
fn grad_sums<T: WithDType>(
    g: &[T],
    x: &[T],
    mask: impl Fn(T, T) -> T,
    tmp: &mut [T],
) -> (f64, f64) {
    let tmp = &mut tmp[..g.len()];
    for ((t, &g), &x) in tmp.iter_mut().zip(g).zip(x) {
        *t = mask(g, x);
    }
    let s1 = lane_sum(tmp, |v| v);
    let (ct, rt) = tmp.as_chunks::<LANES>();
    let (cx, rx) = x.as_chunks::<LANES>();
    let mut acc = [T::zero(); LANES];
    for (t, x) in ct.iter().zip(cx) {
        for j in 0..LANES {
            acc[j] += t[j] * x[j];
        }
    }
    let rest: f64 = rt.iter().zip(rx).map(|(&t, &x)| (t * x).to_f64()).sum();
    (s1, acc.iter().map(|a| a.to_f64()).sum::<f64>() + rest)
}

/// Per-channel batch statistics, kept from the forward pass for the backward one.
#[derive(Clone)]
pub struct Saved {
    pub(crate) mean: Vec<f64>,
    /// Biased variance.
    pub(crate) var: Vec<f64>,
    /// The values per channel they are over (N x H x W, summed over the processes when
    /// synchronised).
    pub(crate) count: f64,
}

/// Mean and biased variance per channel (two passes: mean, then centred squares), parallel over
/// channels.
pub(crate) fn stats_of<T: WithDType>(x: &[T], n: usize, c: usize, hw: usize) -> Saved {
    let m = (n * hw) as f64;
    let rows = |ch: usize| (0..n).map(move |i| &x[(i * c + ch) * hw..][..hw]);
    let per: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let mean = rows(ch).map(|r| lane_sum(r, |v| v)).sum::<f64>() / m;
            let mt = T::from_f64(mean);
            let var = rows(ch)
                .map(|r| {
                    lane_sum(r, |v| {
                        let d = v - mt;
                        d * d
                    })
                })
                .sum::<f64>()
                / m;
            (mean, var)
        })
        .collect();
    let (mean, var) = per.into_iter().unzip();
    Saved {
        mean,
        var,
        count: m,
    }
}

/// The normalisation and affine map of each channel as one `x * s + t`, in `T`: the forward pass
/// computes its output with these values, and the backward pass recomputes the ReLU's mask from
/// x with the same ones (so it need not read the output).
pub(crate) fn affine<T: WithDType>(
    st: &Saved,
    weight: &[f64],
    bias: &[f64],
    eps: f64,
) -> Vec<(T, T)> {
    (0..weight.len())
        .map(|ch| {
            let s = weight[ch] / (st.var[ch] + eps).sqrt();
            (T::from_f64(s), T::from_f64(bias[ch] - st.mean[ch] * s))
        })
        .collect()
}

/// `affine` from weight and bias as they are stored (converted to f64 first).
pub(crate) fn affine_of<T: WithDType>(
    st: &Saved,
    weight: &[T],
    bias: &[T],
    eps: f64,
) -> Vec<(T, T)> {
    let f = |v: &[T]| v.iter().map(|v| v.to_f64()).collect::<Vec<f64>>();
    affine(st, &f(weight), &f(bias), eps)
}

/// `relu(v * s + t)` for one value with its channel's (s, t) from `affine`: the batch norm +
/// ReLU of the forward pass, also applied by the convolutions that run it inside
/// (`conv::conv2d_after_bn_relu`), so fused and separate passes agree bitwise. The backward's
/// mask is the same comparison (`x * s + t > 0`).
#[inline]
pub(crate) fn bn_relu<T: WithDType>(v: T, (s, t): (T, T)) -> T {
    let y = v * s + t;
    if y > T::zero() {
        y
    } else {
        T::zero()
    }
}

/// y = (x - mean) / sqrt(var + eps) * weight + bias with batch statistics, then max(y, 0) when
/// `relu`. The statistics are kept for the backward pass.
struct FusedBatchNorm {
    eps: f64,
    relu: bool,
    saved: Arc<OnceLock<Saved>>,
    /// Batch statistics computed by the op that produced the input, if any (this process's).
    given: Option<Saved>,
    /// Synchronised: the statistics are the global batch's.
    sync: Option<StatSum>,
}

impl FusedBatchNorm {
    /// The output, plus `residual` before the ReLU when given.
    fn forward<T: WithDType>(
        &self,
        x: &[T],
        wt: &[T],
        b: &[T],
        residual: Option<&[T]>,
        (n, c, hw): (usize, usize, usize),
    ) -> Result<Vec<T>> {
        let st = match &self.given {
            Some(g) => g.clone(),
            None => stats_of(x, n, c, hw),
        };
        let st = match &self.sync {
            Some(sum) => global_stats(&st, sum)?,
            None => st,
        };
        let affine: Vec<(T, T)> = affine_of(&st, wt, b, self.eps);
        let _ = self.saved.set(st);
        let relu = self.relu;
        Ok(par_new(
            x.len(),
            hw,
            x.par_chunks(hw).enumerate(),
            |o, (p, xs)| {
                let (s, t) = affine[p % c];
                if let Some(r) = residual {
                    for ((o, &v), &r) in o.iter_mut().zip(xs).zip(&r[p * hw..][..hw]) {
                        let y = v * s + t + r;
                        *o = if y > T::zero() { y } else { T::zero() };
                    }
                } else if relu {
                    for (o, &v) in o.iter_mut().zip(xs) {
                        *o = bn_relu(v, (s, t));
                    }
                } else {
                    for (o, &v) in o.iter_mut().zip(xs) {
                        *o = v * s + t;
                    }
                }
            },
        ))
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
        let out = float_storage!(s1, "batch_norm", |T| self.forward(
            contiguous_slice::<T>(s1, l1, "batch_norm")?,
            contiguous_slice::<T>(s2, l2, "batch_norm")?,
            contiguous_slice::<T>(s3, l3, "batch_norm")?,
            None,
            (n, c, h * w),
        )?);
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = self.gradients(x, weight, bias, &grad.contiguous()?, self.relu)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

impl FusedBatchNorm {
    /// The gradients of x, weight and bias from the output gradient `grad` (masked by the ReLU
    /// when `relu`).
    fn gradients(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        grad: &Tensor,
        relu: bool,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let Some(saved) = self.saved.get() else {
            candle_core::bail!("batch_norm backward: no statistics from the forward pass");
        };
        let c = x.dim(1)?;
        let op = BatchNormGrad {
            eps: self.eps,
            relu,
            saved: saved.clone(),
            weight: weight.to_dtype(DType::F64)?.to_vec1()?,
            bias: bias.to_dtype(DType::F64)?.to_vec1()?,
            sums: OnceLock::new(),
            sync: self.sync.clone(),
        };
        let dx = x.apply_op2_no_bwd(grad, &op)?;
        let Some((sdy, sdxhat)) = op.sums.get() else {
            candle_core::bail!("batch_norm backward: the gradient pass kept no sums");
        };
        let dev = x.device();
        let dw = Tensor::from_slice(sdxhat, c, dev)?.to_dtype(weight.dtype())?;
        let db = Tensor::from_slice(sdy, c, dev)?.to_dtype(weight.dtype())?;
        Ok((dx, dw, db))
    }
}

/// `relu(batch_norm(x) + residual)` as one op on (x, [weight; bias], residual).
struct BatchNormAddRelu(FusedBatchNorm);

impl CustomOp3 for BatchNormAddRelu {
    fn name(&self) -> &'static str {
        "batch_norm_add_relu"
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
        let name = self.name();
        let (n, c, h, w) = l1.shape().dims4()?;
        if l2.shape().dims() != [2, c] || l3.shape() != l1.shape() {
            candle_core::bail!(
                "{name}: expected weight and bias [2, {c}] and a residual {:?}, got {:?} and {:?}",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let out = float_storage!(s1, name, |T| {
            let wb = contiguous_slice::<T>(s2, l2, name)?;
            self.0.forward(
                contiguous_slice::<T>(s1, l1, name)?,
                &wb[..c],
                &wb[c..],
                Some(contiguous_slice::<T>(s3, l3, name)?),
                (n, c, h * w),
            )?
        });
        Ok((out, l1.shape().clone()))
    }

    /// The residual's gradient is dy masked by the ReLU; the batch norm's backward runs on it.
    fn bwd(
        &self,
        x: &Tensor,
        wb: &Tensor,
        _residual: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = super::act::relu_grad(&grad.contiguous()?, res)?;
        let (dx, dw, db) = self.0.gradients(x, &wb.get(0)?, &wb.get(1)?, &g, false)?;
        Ok((Some(dx), Some(Tensor::stack(&[dw, db], 0)?), Some(g)))
    }
}

/// The input gradient of the fused batch norm from (x, dy), reading both in place (the ReLU's
/// mask is recomputed from x, see `affine`); the weight and bias gradients (per-channel sums it
/// needs anyway) are kept in `sums`.
struct BatchNormGrad {
    eps: f64,
    relu: bool,
    /// The forward pass's batch statistics.
    saved: Saved,
    weight: Vec<f64>,
    bias: Vec<f64>,
    /// (Σ dy, Σ dy * xhat) per channel, with dy masked by the ReLU: this process's, the
    /// gradients of its weight and bias.
    sums: OnceLock<(Vec<f64>, Vec<f64>)>,
    /// Synchronised: the input gradient takes the two sums over the global batch.
    sync: Option<StatSum>,
}

impl BatchNormGrad {
    fn backward<T: WithDType>(
        &self,
        x: &[T],
        dy: &[T],
        dims: (usize, usize, usize),
    ) -> Result<Vec<T>> {
        match self.relu {
            true => self.backward_with::<T, true>(x, dy, dims),
            false => self.backward_with::<T, false>(x, dy, dims),
        }
    }

    /// The backward with the ReLU mask chosen at compile time, so the loops stay branch-free and
    /// vectorise.
    fn backward_with<T: WithDType, const RELU: bool>(
        &self,
        x: &[T],
        dy: &[T],
        (n, c, hw): (usize, usize, usize),
    ) -> Result<Vec<T>> {
        let affine: Vec<(T, T)> = affine(&self.saved, &self.weight, &self.bias, self.eps);
        // dy where the forward output x * s + t was positive (the same arithmetic as the forward)
        let mask = |ch: usize| {
            let (s, t) = affine[ch];
            move |g: T, x: T| {
                if !RELU || x * s + t > T::zero() {
                    g
                } else {
                    T::zero()
                }
            }
        };
        let invstd: Vec<f64> = self
            .saved
            .var
            .iter()
            .map(|v| 1.0 / (v + self.eps).sqrt())
            .collect();
        // Per-channel sums over blocks of images read front to back (streaming, not one
        // channel's scattered rows at a time), added in block order: the result does not
        // depend on the thread count.
        const IMAGES: usize = 4;
        let blocks: Vec<Vec<(f64, f64)>> = (0..n.div_ceil(IMAGES))
            .into_par_iter()
            .map(|blk| {
                let mut acc = vec![(0f64, 0f64); c];
                let mut tmp = vec![T::zero(); hw];
                for i in blk * IMAGES..((blk + 1) * IMAGES).min(n) {
                    for (ch, a) in acc.iter_mut().enumerate() {
                        let off = (i * c + ch) * hw;
                        let (xs, gs) = (&x[off..][..hw], &dy[off..][..hw]);
                        let (s1, s2) = grad_sums(gs, xs, mask(ch), &mut tmp);
                        a.0 += s1;
                        a.1 += s2;
                    }
                }
                acc
            })
            .collect();
        let (mut sdy, mut sdyx) = (vec![0f64; c], vec![0f64; c]);
        for b in &blocks {
            for (ch, &(s1, s2)) in b.iter().enumerate() {
                sdy[ch] += s1;
                sdyx[ch] += s2;
            }
        }
        // Σ dy * xhat = (Σ dy * x - mean Σ dy) * invstd
        let hat = |sdy: &[f64], sdyx: &[f64]| -> Vec<f64> {
            (0..c)
                .map(|ch| (sdyx[ch] - self.saved.mean[ch] * sdy[ch]) * invstd[ch])
                .collect()
        };
        let local = (hat(&sdy, &sdyx), sdy);
        // Synchronised, the input gradient is the global batch's: the two sums over every
        // process (each the sums of its own loss's gradient, as PyTorch's SyncBatchNorm).
        let (sdxhat, sdy) = match &self.sync {
            Some(sum) => {
                let mut buf: Vec<f64> = local.1.iter().chain(&sdyx).copied().collect();
                sum(&mut buf)?;
                let (gdy, gdyx) = buf.split_at(c);
                (hat(gdy, gdyx), gdy.to_vec())
            }
            None => local.clone(),
        };
        let m = self.saved.count;
        // dx = k (dy - Σdy/m - xhat Σ(dy xhat)/m) = A dy + B x + C per channel, k = weight * invstd
        let coef: Vec<(T, T, T)> = (0..c)
            .map(|ch| {
                let k = self.weight[ch] * invstd[ch];
                let b = -k * invstd[ch] * sdxhat[ch] / m;
                let cc = -k * sdy[ch] / m - b * self.saved.mean[ch];
                (T::from_f64(k), T::from_f64(b), T::from_f64(cc))
            })
            .collect();
        let dx = par_new(x.len(), hw, (0..n * c).into_par_iter(), |o, p| {
            let (a, b, cc) = coef[p % c];
            let mask = mask(p % c);
            let off = p * hw;
            for ((o, &xv), &g) in o.iter_mut().zip(&x[off..][..hw]).zip(&dy[off..][..hw]) {
                *o = a * mask(g, xv) + b * xv + cc;
            }
        });
        let _ = self.sums.set((local.1, local.0));
        Ok(dx)
    }
}

impl CustomOp2 for BatchNormGrad {
    fn name(&self) -> &'static str {
        "batch_norm_grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l1.shape().dims4()?;
        let name = "batch_norm_grad";
        let out = float_storage!(s1, name, |T| self.backward(
            contiguous_slice::<T>(s1, l1, name)?,
            contiguous_slice::<T>(s2, l2, name)?,
            (n, c, h * w),
        )?);
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_grad_fd, max_rel_err, rand_tensor};
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
        for ((n, c, h, w), relu) in [(4, 3, 5, 5), (1, 2, 7, 3), (8, 1, 1, 1), (2, 2, 4, 4)]
            .into_iter()
            .flat_map(|s| [(s, false), (s, true)])
        {
            let case = format!("{n} {c} {h} {w} relu {relu}");
            let x = rand_tensor(&[n, c, h, w], 1, DType::F64);
            let wt = rand_tensor(&[c], 2, DType::F64);
            let b = rand_tensor(&[c], 3, DType::F64);
            let fused = |x: &Tensor, wt: &Tensor, b: &Tensor| {
                x.apply_op3(
                    wt,
                    b,
                    FusedBatchNorm {
                        eps: 1e-5,
                        relu,
                        saved: Default::default(),
                        given: None,
                        sync: None,
                    },
                )
                .unwrap()
            };
            let want = reference(&x, &wt, &b, 1e-5);
            let want = if relu { want.relu().unwrap() } else { want };
            assert!(
                max_rel_err(&fused(&x, &wt, &b), &want) < 1e-9,
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

    /// f32 against candle's composed ops, forward and all three gradients, on shapes whose rows
    /// are longer than the 8 summing lanes, with and without the ReLU.
    #[test]
    fn fused_f32_matches_composed_ops() {
        for ((n, c, h, w), relu) in [(16, 8, 12, 12), (3, 5, 7, 9), (1, 4, 28, 28)]
            .into_iter()
            .flat_map(|s| [(s, false), (s, true)])
        {
            let case = format!("{n} {c} {h} {w} relu {relu}");
            let x = Var::from_tensor(&rand_tensor(&[n, c, h, w], 11, DType::F32)).unwrap();
            let wt = Var::from_tensor(&rand_tensor(&[c], 12, DType::F32)).unwrap();
            let b = Var::from_tensor(&rand_tensor(&[c], 13, DType::F32)).unwrap();
            let rm = Var::zeros(c, DType::F32, &Device::Cpu).unwrap();
            let rv = Var::ones(c, DType::F32, &Device::Cpu).unwrap();
            let stats = BatchNormStats {
                running_mean: &rm,
                running_var: &rv,
                momentum: 0.1,
                sync: None,
            };
            let ours = batch_norm(&x, &wt, &b, stats, 1e-5, true, relu).unwrap();
            let want = reference(&x, &wt, &b, 1e-5);
            let want = if relu { want.relu().unwrap() } else { want };
            assert!(max_rel_err(&ours, &want) < 1e-4, "forward {case}");
            let up = rand_tensor(&[n, c, h, w], 14, DType::F32);
            let g1 = (ours * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (want * &up).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &wt, &b] {
                let (a, e) = (
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap(),
                );
                assert!(max_rel_err(a, e) < 1e-4, "gradient {case}");
            }
        }
    }

    /// The fused residual join against batch norm then add and ReLU by candle's ops: forward,
    /// the four gradients and the running statistics in f32, and finite differences in f64.
    #[test]
    fn batch_norm_add_relu_matches_the_composed_join() {
        for (n, c, h, w) in [(4, 3, 5, 5), (16, 8, 12, 12), (1, 2, 7, 3)] {
            let case = format!("{n} {c} {h} {w}");
            let var = |seed| Var::from_tensor(&rand_tensor(&[n, c, h, w], seed, DType::F32));
            let (x, r) = (var(21).unwrap(), var(22).unwrap());
            let wt = Var::from_tensor(&rand_tensor(&[c], 23, DType::F32)).unwrap();
            let b = Var::from_tensor(&rand_tensor(&[c], 24, DType::F32)).unwrap();
            let running = || {
                (
                    Var::zeros(c, DType::F32, &Device::Cpu).unwrap(),
                    Var::ones(c, DType::F32, &Device::Cpu).unwrap(),
                )
            };
            let ((m1, v1), (m2, v2)) = (running(), running());
            let stats = |m, v| BatchNormStats {
                running_mean: m,
                running_var: v,
                momentum: 0.1,
                sync: None,
            };
            let ours =
                batch_norm_add_relu(&x, &wt, &b, &r, stats(&m1, &v1), 1e-5, true, None).unwrap();
            let normed = batch_norm(&x, &wt, &b, stats(&m2, &v2), 1e-5, true, false).unwrap();
            let want = (normed + r.as_tensor()).unwrap().relu().unwrap();
            assert!(max_rel_err(&ours, &want) < 1e-5, "forward {case}");
            assert!(
                max_rel_err(m1.as_tensor(), m2.as_tensor()) < 1e-6,
                "mean {case}"
            );
            assert!(
                max_rel_err(v1.as_tensor(), v2.as_tensor()) < 1e-6,
                "var {case}"
            );
            let up = rand_tensor(&[n, c, h, w], 25, DType::F32);
            let g1 = (ours * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (want * &up).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &wt, &b, &r] {
                let (a, e) = (
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap(),
                );
                assert!(max_rel_err(a, e) < 1e-4, "gradient {case}");
            }
        }
        let (m, v) = (
            Var::zeros(3, DType::F64, &Device::Cpu).unwrap(),
            Var::ones(3, DType::F64, &Device::Cpu).unwrap(),
        );
        let shape = [2, 3, 4, 5];
        let x = rand_tensor(&shape, 31, DType::F64);
        let r = rand_tensor(&shape, 32, DType::F64);
        let wt = rand_tensor(&[3], 33, DType::F64);
        let b = rand_tensor(&[3], 34, DType::F64);
        let join = |x: &Tensor, wt: &Tensor, b: &Tensor, r: &Tensor| {
            let stats = BatchNormStats {
                running_mean: &m,
                running_var: &v,
                momentum: 0.1,
                sync: None,
            };
            batch_norm_add_relu(x, wt, b, r, stats, 1e-5, true, None).unwrap()
        };
        check_grad_fd(|t| join(t, &wt, &b, &r), &x, 1, 1e-6, "input");
        check_grad_fd(|t| join(&x, t, &b, &r), &wt, 1, 1e-6, "weight");
        check_grad_fd(|t| join(&x, &wt, t, &r), &b, 1, 1e-6, "bias");
        check_grad_fd(|t| join(&x, &wt, &b, t), &r, 1, 1e-6, "residual");
    }

    /// A weight or bias that is not one value per channel is an error naming the shapes, in
    /// every training path, not an index panic in the kernel.
    #[test]
    fn affine_parameters_of_the_wrong_shape_are_an_error() {
        let x = rand_tensor(&[2, 3, 2, 2], 41, DType::F32);
        let (rm, rv) = (
            Var::zeros(3, DType::F32, &Device::Cpu).unwrap(),
            Var::ones(3, DType::F32, &Device::Cpu).unwrap(),
        );
        let stats = || BatchNormStats {
            running_mean: &rm,
            running_var: &rv,
            momentum: 0.1,
            sync: None,
        };
        let (w4, b3) = (
            rand_tensor(&[4], 42, DType::F32),
            rand_tensor(&[3], 43, DType::F32),
        );
        let err = batch_norm(&x, &w4, &b3, stats(), 1e-5, true, true).unwrap_err();
        assert!(err.to_string().contains("one value per channel"), "{err}");
        let err = batch_norm_add_relu(&x, &b3, &w4, &x, stats(), 1e-5, true, None).unwrap_err();
        assert!(err.to_string().contains("one value per channel"), "{err}");
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
                sync: None,
            },
            1e-5,
            true,
            false,
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

    /// A job of ranks as threads: the sum adds every thread's buffer (each calls it at the same
    /// points, as MPI ranks do), then hands the total to each.
    struct ThreadJob {
        acc: std::sync::Mutex<Vec<f64>>,
        barrier: std::sync::Barrier,
    }

    fn thread_sum(job: Arc<ThreadJob>) -> StatSum {
        Arc::new(move |buf: &mut [f64]| {
            {
                let mut a = job.acc.lock().unwrap();
                if a.is_empty() {
                    a.resize(buf.len(), 0.0);
                }
                for (a, b) in a.iter_mut().zip(buf.iter()) {
                    *a += b;
                }
            }
            job.barrier.wait();
            buf.copy_from_slice(&job.acc.lock().unwrap());
            if job.barrier.wait().is_leader() {
                job.acc.lock().unwrap().clear();
            }
            job.barrier.wait();
            Ok(())
        })
    }

    /// Two ranks with synchronised batch norm, each on half of the batch, compute what one
    /// process computes on the whole batch, through every fused path: statistics computed by
    /// the batch norm, given by the convolution before it, inside the next convolution
    /// (`bn_relu_conv2d`) and in the residual join. The outputs and input gradients are the
    /// halves of one process's, the parameter gradients add up to its, and the running
    /// statistics are its on both ranks.
    #[test]
    fn synchronised_halves_compute_the_whole_batch() {
        use crate::conv::{bn_relu_conv2d, conv2d_with_batch_stats, Conv2dParams};
        let (n, c) = (8, 3);
        let x = rand_tensor(&[n, c, 6, 6], 51, DType::F64);
        let up = rand_tensor(&[n, c, 6, 6], 52, DType::F64);
        let k = [53, 54].map(|s| rand_tensor(&[c, c, 3, 3], s, DType::F64));
        let affine =
            [55, 56, 57, 58, 59, 60].map(|s| (rand_tensor(&[c], s, DType::F64) + 1.5).unwrap());
        let p = Conv2dParams::new(1, 1);
        // The network on `x` (a batch or a rank's share) with its parameters as fresh Vars:
        // outputs, gradients of x and of every parameter, and the three running statistics.
        let net = |x: &Tensor, up: &Tensor, sync: Option<StatSum>| {
            let x = Var::from_tensor(x).unwrap();
            let ks = k.clone().map(|t| Var::from_tensor(&t).unwrap());
            let ab = affine.clone().map(|t| Var::from_tensor(&t).unwrap());
            let running: Vec<(Var, Var)> = (0..3)
                .map(|_| {
                    (
                        Var::zeros(c, DType::F64, &Device::Cpu).unwrap(),
                        Var::ones(c, DType::F64, &Device::Cpu).unwrap(),
                    )
                })
                .collect();
            let st = |i: usize| BatchNormStats {
                running_mean: &running[i].0,
                running_var: &running[i].1,
                momentum: 0.1,
                sync: sync.clone(),
            };
            let (z1, s1) = conv2d_with_batch_stats(x.as_tensor(), ks[0].as_tensor(), p).unwrap();
            let (z2, s2) = bn_relu_conv2d(&z1, &ab[0], &ab[1], st(0), 1e-5, s1, &ks[1], p).unwrap();
            let joined =
                batch_norm_add_relu(&z2, &ab[2], &ab[3], &x, st(1), 1e-5, true, Some(s2)).unwrap();
            let y = batch_norm(&joined, &ab[4], &ab[5], st(2), 1e-5, true, false).unwrap();
            let g = (&y * up).unwrap().sum_all().unwrap().backward().unwrap();
            let mut grads = vec![g.get(x.as_tensor()).unwrap().clone()];
            for v in ks.iter().chain(&ab) {
                grads.push(g.get(v.as_tensor()).unwrap().clone());
            }
            let stats: Vec<Tensor> = running
                .iter()
                .flat_map(|(m, v)| [m.as_tensor().clone(), v.as_tensor().clone()])
                .collect();
            (y, grads, stats)
        };
        let (y, grads, stats) = net(&x, &up, None);
        let job = Arc::new(ThreadJob {
            acc: Default::default(),
            barrier: std::sync::Barrier::new(2),
        });
        let halves: Vec<_> = std::thread::scope(|sc| {
            let handles: Vec<_> = (0..2)
                .map(|r| {
                    let (xs, ups) = (
                        x.narrow(0, r * 4, 4).unwrap(),
                        up.narrow(0, r * 4, 4).unwrap(),
                    );
                    let sum = thread_sum(job.clone());
                    let net = &net;
                    sc.spawn(move || net(&xs, &ups, Some(sum)))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        type Half = (Tensor, Vec<Tensor>, Vec<Tensor>);
        let cat = |i: usize, of: fn(&Half, usize) -> Tensor| {
            Tensor::cat(&[of(&halves[0], i), of(&halves[1], i)], 0).unwrap()
        };
        assert!(
            max_rel_err(&cat(0, |h, _| h.0.clone()), &y) < 1e-10,
            "output"
        );
        assert!(
            max_rel_err(&cat(0, |h, i| h.1[i].clone()), &grads[0]) < 1e-9,
            "input gradient"
        );
        for (i, whole) in grads.iter().enumerate().skip(1) {
            let summed = (&halves[0].1[i] + &halves[1].1[i]).unwrap();
            assert!(max_rel_err(&summed, whole) < 1e-9, "parameter gradient {i}");
        }
        for h in &halves {
            for (a, b) in h.2.iter().zip(&stats) {
                assert!(max_rel_err(a, b) < 1e-10, "running statistics");
            }
        }
        // And without the sum the halves are another computation (the test can tell).
        let alone = net(
            &x.narrow(0, 0, 4).unwrap(),
            &up.narrow(0, 0, 4).unwrap(),
            None,
        );
        assert!(max_rel_err(&alone.0, &y.narrow(0, 0, 4).unwrap()) > 1e-3);
    }
}
