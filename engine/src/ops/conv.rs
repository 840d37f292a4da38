//! 2-D convolution as im2col + matrix product, with the input gradient through col2im.

use super::{contiguous_slice, out_size};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dParams {
    pub stride: usize,
    pub padding: usize,
}

/// Convolution of `x` [N, C, H, W] with `w` [O, C, KH, KW], plus an optional bias [O].
pub fn conv2d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, p: Conv2dParams) -> Result<Tensor> {
    let y = if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        conv2d_im2col(x, w, p)?
    } else {
        x.conv2d(w, p.padding, p.stride, 1, 1)?
    };
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
        None => Ok(y),
    }
}

fn conv2d_im2col(x: &Tensor, w: &Tensor, p: Conv2dParams) -> Result<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let (o, c2, kh, kw) = w.dims4()?;
    if c != c2 {
        candle_core::bail!("conv2d: input has {c} channels, kernel expects {c2}");
    }
    let oh = out_size(h, kh, p.stride, p.padding)?;
    let ow = out_size(wd, kw, p.stride, p.padding)?;
    let op = Im2Col {
        kh,
        kw,
        stride: p.stride,
        pad: p.padding,
    };
    // cols: [N, OH*OW, C*KH*KW]: one row per output pixel.
    let cols = x.contiguous()?.apply_op1(op)?;
    let cols = cols.reshape((n * oh * ow, c * kh * kw))?;
    let wmat = w.reshape((o, c * kh * kw))?;
    let y = cols.matmul(&wmat.t()?)?; // [N*OH*OW, O]
    y.reshape((n, oh, ow, o))?
        .permute((0, 3, 1, 2))?
        .contiguous()
}

/// Unfolds [N, C, H, W] into [N, OH*OW, C*KH*KW] (zero padding).
#[derive(Debug, Clone, Copy)]
struct Im2Col {
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
}

impl Im2Col {
    fn run<T: WithDType>(
        &self,
        x: &[T],
        (n, c, h, w): (usize, usize, usize, usize),
    ) -> Result<(Vec<T>, usize, usize)> {
        let (kh, kw, s, p) = (self.kh, self.kw, self.stride, self.pad);
        let oh = out_size(h, kh, s, p)?;
        let ow = out_size(w, kw, s, p)?;
        let row = c * kh * kw;
        let mut out = vec![T::zero(); n * oh * ow * row];
        out.par_chunks_mut(oh * ow * row)
            .zip(x.par_chunks(c * h * w))
            .for_each(|(dst, img)| {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let r = &mut dst[(oy * ow + ox) * row..][..row];
                        let mut i = 0;
                        for ci in 0..c {
                            let plane = &img[ci * h * w..][..h * w];
                            for ky in 0..kh {
                                let iy = (oy * s + ky) as isize - p as isize;
                                for kx in 0..kw {
                                    let ix = (ox * s + kx) as isize - p as isize;
                                    if iy >= 0 && (iy as usize) < h && ix >= 0 && (ix as usize) < w
                                    {
                                        r[i] = plane[iy as usize * w + ix as usize];
                                    }
                                    i += 1;
                                }
                            }
                        }
                    }
                }
            });
        Ok((out, oh, ow))
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.shape().dims4()?;
        let (n, c, _, _) = dims;
        macro_rules! go {
            ($t:ty) => {{
                let (v, oh, ow) = self.run(contiguous_slice::<$t>(s, l, "im2col")?, dims)?;
                Ok((
                    <$t>::to_cpu_storage_owned(v),
                    Shape::from((n, oh * ow, c * self.kh * self.kw)),
                ))
            }};
        }
        match s {
            CpuStorage::F32(_) => go!(f32),
            CpuStorage::F64(_) => go!(f64),
            _ => candle_core::bail!("im2col: only f32 and f64 are supported"),
        }
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (_, _, h, w) = arg.dims4()?;
        let g = grad
            .contiguous()?
            .apply_op1_no_bwd(&Col2Im { fwd: *self, h, w })?;
        Ok(Some(g))
    }
}

/// The adjoint of [`Im2Col`]: folds [N, OH*OW, C*KH*KW] back into [N, C, H, W], summing overlaps.
struct Col2Im {
    fwd: Im2Col,
    h: usize,
    w: usize,
}

impl Col2Im {
    fn run<T: WithDType>(
        &self,
        cols: &[T],
        n: usize,
        rows: usize,
        row: usize,
    ) -> Result<(Vec<T>, usize)> {
        let Im2Col {
            kh,
            kw,
            stride: s,
            pad: p,
        } = self.fwd;
        let (h, w) = (self.h, self.w);
        let oh = out_size(h, kh, s, p)?;
        let ow = out_size(w, kw, s, p)?;
        if oh * ow != rows || row % (kh * kw) != 0 {
            candle_core::bail!("col2im: shape mismatch");
        }
        let c = row / (kh * kw);
        let mut out = vec![T::zero(); n * c * h * w];
        out.par_chunks_mut(c * h * w)
            .zip(cols.par_chunks(rows * row))
            .for_each(|(img, src)| {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let r = &src[(oy * ow + ox) * row..][..row];
                        let mut i = 0;
                        for ci in 0..c {
                            let plane = &mut img[ci * h * w..][..h * w];
                            for ky in 0..kh {
                                let iy = (oy * s + ky) as isize - p as isize;
                                for kx in 0..kw {
                                    let ix = (ox * s + kx) as isize - p as isize;
                                    if iy >= 0 && (iy as usize) < h && ix >= 0 && (ix as usize) < w
                                    {
                                        plane[iy as usize * w + ix as usize] += r[i];
                                    }
                                    i += 1;
                                }
                            }
                        }
                    }
                }
            });
        Ok((out, c))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, rows, row) = l.shape().dims3()?;
        macro_rules! go {
            ($t:ty) => {{
                let (v, c) = self.run(contiguous_slice::<$t>(s, l, "col2im")?, n, rows, row)?;
                Ok((
                    <$t>::to_cpu_storage_owned(v),
                    Shape::from((n, c, self.h, self.w)),
                ))
            }};
        }
        match s {
            CpuStorage::F32(_) => go!(f32),
            CpuStorage::F64(_) => go!(f64),
            _ => candle_core::bail!("col2im: only f32 and f64 are supported"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        use rand::Rng;
        let mut r = crate::rng::stream(seed, "test");
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| r.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let m = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1e-6);
        d / m
    }

    #[test]
    fn matches_candle_forward_and_gradients() {
        for (n, c, h, w, o, k, s, p) in [
            (2, 3, 7, 9, 4, 3, 1, 1),
            (1, 2, 8, 8, 3, 3, 2, 1),
            (2, 1, 11, 10, 2, 1, 1, 0),
            (1, 3, 13, 13, 2, 7, 2, 3),
            (3, 2, 5, 5, 5, 1, 2, 0),
        ] {
            let x = Var::from_tensor(&rand(&[n, c, h, w], 1)).unwrap();
            let k_ = Var::from_tensor(&rand(&[o, c, k, k], 2)).unwrap();
            let params = Conv2dParams {
                stride: s,
                padding: p,
            };
            let ours = conv2d_im2col(x.as_tensor(), k_.as_tensor(), params).unwrap();
            let theirs = x.as_tensor().conv2d(k_.as_tensor(), p, s, 1, 1).unwrap();
            assert!(
                max_rel(&ours, &theirs) < 1e-5,
                "forward {n} {c} {h} {w} {o} {k} {s} {p}"
            );
            let up = rand(ours.dims(), 3);
            let g1 = (ours * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (theirs * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&x, &k_] {
                let a = g1.get(v.as_tensor()).unwrap();
                let b = g2.get(v.as_tensor()).unwrap();
                assert!(max_rel(a, b) < 1e-4, "grad {n} {c} {h} {w} {o} {k} {s} {p}");
            }
        }
    }

    /// Shapes where candle's own backward is wrong (it drops the last row or column when
    /// (size + 2 pad - kernel) is not a multiple of the stride): check against finite differences
    /// in f64.
    #[test]
    fn gradients_match_finite_differences_where_candle_cannot() {
        for (n, c, h, w, o, k, s, p) in [
            (2, 2, 5, 6, 3, 1, 2, 0),
            (1, 2, 8, 7, 2, 3, 2, 1),
            (1, 1, 6, 6, 2, 2, 3, 1),
        ] {
            let x =
                Var::from_tensor(&rand(&[n, c, h, w], 4).to_dtype(DType::F64).unwrap()).unwrap();
            let kt = rand(&[o, c, k, k], 5).to_dtype(DType::F64).unwrap();
            let params = Conv2dParams {
                stride: s,
                padding: p,
            };
            let y = conv2d_im2col(x.as_tensor(), &kt, params).unwrap();
            let up = rand(y.dims(), 6).to_dtype(DType::F64).unwrap();
            let f = |t: &Tensor| -> f64 {
                (conv2d_im2col(t, &kt, params).unwrap() * &up)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let g = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g = g
                .get(x.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let base = x
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for i in 0..base.len() {
                let (mut a, mut b) = (base.clone(), base.clone());
                a[i] += 1e-6;
                b[i] -= 1e-6;
                let ta = Tensor::from_vec(a, x.dims(), &Device::Cpu).unwrap();
                let tb = Tensor::from_vec(b, x.dims(), &Device::Cpu).unwrap();
                let fd = (f(&ta) - f(&tb)) / 2e-6;
                assert!(
                    (fd - g[i]).abs() < 1e-6 * fd.abs().max(1.0),
                    "case {n} {c} {h} {w} {o} {k} {s} {p} at {i}: {fd} vs {}",
                    g[i]
                );
            }
        }
    }
}
