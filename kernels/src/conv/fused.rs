//! A batch norm + ReLU inside the convolution that follows it, in one place: the forward runs
//! the normalisation while each image is copied for the products, and the kernel gradient
//! again, so the normalised activations are never written; the batch norm's own gradients come
//! from `norm`. Bitwise the composed batch norm, ReLU and convolution.

use super::geometry::Geometry;
use super::{batch_stats, checked, Conv2dParams, ConvGrad, Moments};
use crate::contiguous_slice;
use crate::norm::{
    check_affine, check_count, check_given, global_stats, update_running_from, BatchNormStats,
    Saved, StatSum,
};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use std::sync::{Arc, OnceLock};

/// `conv2d(relu(batch_norm(x)), k)` in training on CPU with the batch statistics of `x` given
/// (`conv::conv2d_with_batch_stats`): the batch norm runs inside the convolution
/// (`conv::conv2d_after_bn_relu`), so its output is never written. Updates the running
/// statistics like `batch_norm`; returns the convolution's output and its batch statistics.
/// Synchronised (`stats.sync`), the given statistics are this process's and the batch norm
/// normalises with the global batch's.
#[allow(clippy::too_many_arguments)]
pub fn bn_relu_conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stats: BatchNormStats,
    eps: f64,
    given: Saved,
    k: &Tensor,
    p: Conv2dParams,
) -> Result<(Tensor, Saved)> {
    check_count(x)?;
    let c = x.dim(1)?;
    check_affine(weight, bias, c)?;
    check_given(&given, c)?;
    let given = match &stats.sync {
        Some(sum) => global_stats(&given, sum)?,
        None => given,
    };
    update_running_from(&stats, &given, x)?;
    let wb = Tensor::stack(&[weight, bias], 0)?;
    conv2d_after_bn_relu(x, &wb, given, eps, k, p, stats.sync.clone())
}

/// `conv2d(relu(batch_norm(z)), k)` in training on CPU (f32 or f64), with the batch statistics
/// of `z` given (`saved`, from the convolution that produced it) and the batch norm's weight
/// and bias as the rows of `wb` [2, C]; also the batch statistics of the output, for the batch
/// norm after it. The normalised activations are computed image by image inside the
/// convolution (and again inside its kernel gradient) and never written out (except on the
/// Winograd path): one pass over the activations and one activation tensor fewer than a batch
/// norm and then a convolution, with bitwise the same results. The running statistics are the caller's
/// (`norm::bn_relu_conv2d`); `sync` sums the batch norm's backward sums across processes.
pub(crate) fn conv2d_after_bn_relu(
    z: &Tensor,
    wb: &Tensor,
    saved: Saved,
    eps: f64,
    k: &Tensor,
    p: Conv2dParams,
    sync: Option<StatSum>,
) -> Result<(Tensor, Saved)> {
    let sink = Arc::new(OnceLock::new());
    let op = ConvAfterBn {
        params: p,
        eps,
        saved,
        moments: sink.clone(),
        sync,
    };
    let y = checked(z, k, p)?.apply_op3(&wb.contiguous()?, &k.contiguous()?, op)?;
    let Some(rows) = sink.get() else {
        candle_core::bail!("conv2d: the forward pass kept no statistics");
    };
    let stats = batch_stats(rows, y.dims4()?);
    Ok((y, stats))
}

/// The per-channel (s, t) of a batch norm with batch statistics `saved` and weight and bias
/// the rows of `wb` [2, C].
fn bn_affine<T: WithDType>(wb: &[T], saved: &Saved, eps: f64) -> Vec<(T, T)> {
    let c = wb.len() / 2;
    crate::norm::affine_of(saved, &wb[..c], &wb[c..], eps)
}

/// Checks that `wb` is [2, C] for an input of C channels.
fn check_wb(wb: &Layout, c: usize, name: &str) -> Result<()> {
    if wb.shape().dims() != [2, c] {
        candle_core::bail!(
            "{name}: batch-norm weight and bias must be [2, {c}], got {:?}",
            wb.shape()
        );
    }
    Ok(())
}

/// The op of `conv2d_after_bn_relu` on (z, [weight; bias], kernel).
struct ConvAfterBn {
    params: Conv2dParams,
    eps: f64,
    /// Batch statistics of z (the global batch's when synchronised).
    saved: Saved,
    moments: Arc<OnceLock<Vec<Moments>>>,
    sync: Option<StatSum>,
}

impl CustomOp3 for ConvAfterBn {
    fn name(&self) -> &'static str {
        "conv2d_after_bn_relu"
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
        let (n, g) = Geometry::new(l1.shape(), l3.shape(), self.params)?;
        check_wb(l2, g.c, name)?;
        let mut rows = vec![(0.0, 0.0); n * g.o];
        let out = float_storage!(s1, name, |T| {
            let st = bn_affine(contiguous_slice::<T>(s2, l2, name)?, &self.saved, self.eps);
            g.forward_after(
                n,
                contiguous_slice::<T>(s1, l1, name)?,
                contiguous_slice::<T>(s3, l3, name)?,
                Some(&mut rows),
                Some(&st),
            )
        });
        let _ = self.moments.set(rows);
        Ok((out, Shape::from((n, g.o, g.oh, g.ow))))
    }

    /// The kernel gradient over the normalised activations recomputed image by image, and,
    /// when the graph needs z's or the batch norm's, the input gradient of the convolution
    /// (`da`) and the batch norm's backward on it (the ReLU's mask recomputed from z).
    fn bwd(
        &self,
        z: &Tensor,
        wb: &Tensor,
        k: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, g) = Geometry::new(z.shape(), k.shape(), self.params)?;
        let dy = dy.contiguous()?;
        let dk = match k.track_op() {
            true => {
                let op = KernelGradAfterBn {
                    n,
                    g,
                    eps: self.eps,
                    saved: self.saved.clone(),
                };
                Some(z.apply_op3_no_bwd(&dy, &wb.contiguous()?, &op)?)
            }
            false => None,
        };
        if !z.track_op() && !wb.track_op() {
            return Ok((None, None, dk));
        }
        let da = dy.apply_op2_no_bwd(&k.contiguous()?, &ConvGrad::Input(n, g))?;
        let (w, b) = (wb.get(0)?, wb.get(1)?);
        let (dz, dw, db) = crate::norm::bn_relu_gradients(
            z,
            &w,
            &b,
            &self.saved,
            self.eps,
            &da,
            self.sync.clone(),
        )?;
        Ok((Some(dz), Some(Tensor::stack(&[dw, db], 0)?), dk))
    }
}

/// The kernel gradient of `conv2d_after_bn_relu` on (z, dy, [weight; bias]).
struct KernelGradAfterBn {
    n: usize,
    g: Geometry,
    eps: f64,
    saved: Saved,
}

impl CustomOp3 for KernelGradAfterBn {
    fn name(&self) -> &'static str {
        "conv2d_after_bn_relu_grad_kernel"
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
        let (name, n, g) = (self.name(), self.n, self.g);
        check_wb(l3, g.c, name)?;
        let out = float_storage!(s1, name, |T| {
            let st = bn_affine(contiguous_slice::<T>(s3, l3, name)?, &self.saved, self.eps);
            g.grad_kernel(
                n,
                contiguous_slice::<T>(s1, l1, name)?,
                contiguous_slice::<T>(s2, l2, name)?,
                Some(&st),
            )
        });
        Ok((out, Shape::from((g.o, g.c, g.kh, g.kw))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::conv2d_with_batch_stats;
    use crate::norm::{batch_norm_given, stats_of};
    use crate::testing::{check_grad_fd, rand_tensor};
    use candle_core::{DType, Device, Var};

    /// `bn_relu_conv2d` (the batch norm and ReLU inside the convolution, never written out)
    /// gives bitwise the composed batch norm + ReLU + convolution: output, batch statistics,
    /// running statistics and every gradient, on the in-place, im2col, strided and pointwise
    /// paths; in f64 its input gradient matches finite differences.
    #[test]
    fn batch_norm_inside_the_next_convolution_equals_the_composed_ops() {
        // (n, c, o, h, k, stride, padding)
        for (n, c, o, h, k, s, p) in [
            (3, 8, 16, 9, 3, 1, 1),
            (2, 6, 20, 8, 3, 1, 1),
            (2, 8, 24, 16, 3, 1, 1),
            (2, 6, 5, 8, 3, 1, 0),
            (2, 64, 64, 6, 3, 1, 1),
            // Winograd on AVX-512: the prologue applied while transforming the input
            (2, 16, 32, 10, 3, 1, 1),
            (3, 5, 7, 9, 3, 2, 1),
            (2, 4, 6, 6, 1, 1, 0),
            (2, 4, 6, 7, 1, 2, 0),
        ] {
            let case = format!("n{n} c{c} o{o} h{h} k{k} s{s} p{p}");
            let params = Conv2dParams::new(s, p);
            let x = Var::from_tensor(&rand_tensor(&[n, 3, h, h], 1, DType::F32)).unwrap();
            let k0 = Var::from_tensor(&rand_tensor(&[c, 3, 3, 3], 2, DType::F32)).unwrap();
            let wt = Var::from_tensor(&rand_tensor(&[c], 3, DType::F32)).unwrap();
            let b = Var::from_tensor(&rand_tensor(&[c], 4, DType::F32)).unwrap();
            let k1 = Var::from_tensor(&rand_tensor(&[o, c, k, k], 5, DType::F32)).unwrap();
            let p0 = Conv2dParams::new(1, 1);
            let run = |fused: bool| {
                let rm = Var::zeros(c, DType::F32, &Device::Cpu).unwrap();
                let rv = Var::ones(c, DType::F32, &Device::Cpu).unwrap();
                let stats = BatchNormStats {
                    running_mean: &rm,
                    running_var: &rv,
                    momentum: 0.1,
                    sync: None,
                };
                let (z, given) = conv2d_with_batch_stats(&x, &k0, p0).unwrap();
                let (y, y_stats) = match fused {
                    true => bn_relu_conv2d(&z, &wt, &b, stats, 1e-5, given, &k1, params).unwrap(),
                    false => {
                        let a = batch_norm_given(&z, &wt, &b, stats, 1e-5, true, true, Some(given))
                            .unwrap();
                        conv2d_with_batch_stats(&a, &k1, params).unwrap()
                    }
                };
                let up = rand_tensor(y.dims(), 6, DType::F32);
                let grads = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
                let mut out = vec![y, rm.as_tensor().clone(), rv.as_tensor().clone()];
                for v in [&x, &k0, &wt, &b, &k1] {
                    out.push(grads.get(v.as_tensor()).unwrap().clone());
                }
                (out, y_stats.mean, y_stats.var)
            };
            let bits = |t: &Tensor| -> Vec<u32> {
                let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                v.into_iter().map(f32::to_bits).collect()
            };
            let (fused, fm, fv) = run(true);
            let (composed, cm, cv) = run(false);
            let names = [
                "output",
                "running mean",
                "running var",
                "dx",
                "dk0",
                "dweight",
                "dbias",
                "dk1",
            ];
            for ((a, b), what) in fused.iter().zip(&composed).zip(names) {
                assert_eq!(bits(a), bits(b), "{what}, {case}");
            }
            assert_eq!((fm, fv), (cm, cv), "output statistics, {case}");
            // f64: the gradient of z through the fused op, its statistics a function of z
            let z = rand_tensor(&[n, c, h, h], 7, DType::F64);
            let (w64, b64) = (
                wt.to_dtype(DType::F64).unwrap(),
                b.to_dtype(DType::F64).unwrap(),
            );
            let k64 = k1.to_dtype(DType::F64).unwrap();
            check_grad_fd(
                |z| {
                    let rm = Var::zeros(c, DType::F64, &Device::Cpu).unwrap();
                    let rv = Var::ones(c, DType::F64, &Device::Cpu).unwrap();
                    let stats = BatchNormStats {
                        running_mean: &rm,
                        running_var: &rv,
                        momentum: 0.1,
                        sync: None,
                    };
                    let (zn, _, zh, zw) = z.dims4().unwrap();
                    let flat: Vec<f64> = z.flatten_all().unwrap().to_vec1().unwrap();
                    let given = stats_of(&flat, zn, c, zh * zw);
                    bn_relu_conv2d(z, &w64, &b64, stats, 1e-5, given, &k64, params)
                        .unwrap()
                        .0
                },
                &z,
                3,
                1e-6,
                &format!("input {case}"),
            );
        }
    }
}
