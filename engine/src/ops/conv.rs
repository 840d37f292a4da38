//! 2-D convolution on CPU: per image, im2col into a reused buffer and one matrix product that
//! writes the NCHW output directly. The input gradient of a stride-1 convolution is the forward
//! convolution of dy with the flipped, transposed kernel (same code, same speed); of a strided one,
//! the transposed product folded back with col2im. The kernel gradient is the product cols dy^T
//! per image, summed in groups fixed by the shapes, so it does not depend on the thread count.
//! Gradients are computed by ops reading the tensors in place, and only those the graph needs.
//! Other devices use candle's convolution.

use super::gemm::{matmul, Mat};
use super::winograd::Winograd;
use super::{contiguous_slice, out_size};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;
use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dParams {
    pub stride: usize,
    pub padding: usize,
}

/// Convolution of `x` [N, C, H, W] with `w` [O, C, KH, KW], plus an optional bias [O].
pub fn conv2d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, p: Conv2dParams) -> Result<Tensor> {
    let y = if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        conv2d_cpu(x, w, p)?
    } else {
        x.conv2d(w, p.padding, p.stride, 1, 1)?
    };
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
        None => Ok(y),
    }
}

fn conv2d_cpu(x: &Tensor, w: &Tensor, p: Conv2dParams) -> Result<Tensor> {
    let (_, c, _, _) = x.dims4()?;
    let (_, c2, _, _) = w.dims4()?;
    if c != c2 {
        candle_core::bail!("conv2d: input has {c} channels, kernel expects {c2}");
    }
    if p.stride == 0 {
        candle_core::bail!("conv2d: stride must be at least 1");
    }
    if x.elem_count() == 0 || w.elem_count() == 0 {
        candle_core::bail!(
            "conv2d: empty input {:?} or kernel {:?}",
            x.dims(),
            w.dims()
        );
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, Conv2d(p))
}

/// The shape of one image's convolution.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    s: usize,
    p: usize,
    oh: usize,
    ow: usize,
}

impl Geometry {
    fn new(x: &Shape, k: &Shape, p: Conv2dParams) -> Result<(usize, Self)> {
        let (n, c, h, w) = x.dims4()?;
        let (o, _, kh, kw) = k.dims4()?;
        let (oh, ow) = (
            out_size(h, kh, p.stride, p.padding)?,
            out_size(w, kw, p.stride, p.padding)?,
        );
        Ok((
            n,
            Geometry {
                c,
                h,
                w,
                o,
                kh,
                kw,
                s: p.stride,
                p: p.padding,
                oh,
                ow,
            },
        ))
    }
    /// Rows of the unfolded image: one per kernel element.
    fn ckk(&self) -> usize {
        self.c * self.kh * self.kw
    }
    /// Columns of the unfolded image: one per output pixel.
    fn l(&self) -> usize {
        self.oh * self.ow
    }
    fn image(&self) -> usize {
        self.c * self.h * self.w
    }
    /// A 1x1 stride-1 convolution without padding needs no unfolding: the image is its own cols.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.s == 1 && self.p == 0
    }

    /// The output positions `o < out` whose input position `o * s + k - p` lies in `0..input`.
    fn valid(&self, k: usize, input: usize, out: usize) -> (usize, usize) {
        let (s, p) = (self.s, self.p);
        let lo = p.saturating_sub(k).div_ceil(s).min(out);
        let hi = (input + p).saturating_sub(k).div_ceil(s).clamp(lo, out);
        (lo, hi)
    }

    /// The output columns `ox` whose input column `ox * s + kx - p` lies inside the image.
    fn valid_cols(&self, kx: usize) -> (usize, usize) {
        self.valid(kx, self.w, self.ow)
    }

    /// The output rows `oy` whose input row `oy * s + ky - p` lies inside the image.
    fn valid_rows(&self, ky: usize) -> (usize, usize) {
        self.valid(ky, self.h, self.oh)
    }

    /// Unfolds one image [C, H, W] into cols [C*KH*KW, OH*OW] (zero padding).
    fn im2col<T: WithDType>(&self, img: &[T], cols: &mut [T]) {
        let (l, ow, s) = (self.l(), self.ow, self.s);
        // "Same" stride-1 convolutions: each row of cols is the image plane shifted by a constant
        // offset, so it is one copy, then the wrapped-around border columns are zeroed.
        let shifted = s == 1 && ow == self.w;
        for ci in 0..self.c {
            let plane = &img[ci * self.h * self.w..][..self.h * self.w];
            for ky in 0..self.kh {
                let (ylo, yhi) = self.valid_rows(ky);
                for kx in 0..self.kw {
                    let row = &mut cols[((ci * self.kh + ky) * self.kw + kx) * l..][..l];
                    let (lo, hi) = self.valid_cols(kx);
                    if shifted {
                        let off = (ky as isize - self.p as isize) * self.w as isize + kx as isize
                            - self.p as isize;
                        let plane_len = plane.len() as isize;
                        let a = ((ylo * ow) as isize).max(-off).min(l as isize) as usize;
                        let b = ((yhi * ow) as isize).min(plane_len - off).max(a as isize) as usize;
                        row[..a].fill(T::zero());
                        row[b..].fill(T::zero());
                        if a < b {
                            // a >= -off and b <= plane_len - off: the source range is inside
                            let src = (a as isize + off) as usize;
                            row[a..b].copy_from_slice(&plane[src..src + (b - a)]);
                        }
                        if lo > 0 || hi < ow {
                            for r in row[ylo * ow..yhi * ow].chunks_exact_mut(ow) {
                                r[..lo].fill(T::zero());
                                r[hi..].fill(T::zero());
                            }
                        }
                        continue;
                    }
                    for oy in 0..self.oh {
                        let dst = &mut row[oy * ow..][..ow];
                        if oy < ylo || oy >= yhi || lo == hi {
                            dst.fill(T::zero());
                            continue;
                        }
                        let iy = oy * s + ky - self.p;
                        let src = &plane[iy * self.w..][..self.w];
                        dst[..lo].fill(T::zero());
                        dst[hi..].fill(T::zero());
                        let x0 = lo * s + kx - self.p;
                        if s == 1 {
                            dst[lo..hi].copy_from_slice(&src[x0..x0 + hi - lo]);
                        } else {
                            for (d, v) in dst[lo..hi].iter_mut().zip(src[x0..].iter().step_by(s)) {
                                *d = *v;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Folds cols [C*KH*KW, OH*OW] back into an image [C, H, W], summing overlaps (the adjoint of
    /// `im2col`); `img` is overwritten.
    fn col2im<T: WithDType>(&self, cols: &[T], img: &mut [T]) {
        img.fill(T::zero());
        let (l, ow, s) = (self.l(), self.ow, self.s);
        for ci in 0..self.c {
            let plane = &mut img[ci * self.h * self.w..][..self.h * self.w];
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let row = &cols[((ci * self.kh + ky) * self.kw + kx) * l..][..l];
                    let (lo, hi) = self.valid_cols(kx);
                    if lo == hi {
                        continue;
                    }
                    let x0 = lo * s + kx - self.p;
                    for oy in 0..self.oh {
                        let iy = (oy * s + ky) as isize - self.p as isize;
                        if iy < 0 || iy >= self.h as isize {
                            continue;
                        }
                        let dst = &mut plane[iy as usize * self.w..][..self.w];
                        let src = &row[oy * ow + lo..oy * ow + hi];
                        for (d, &v) in dst[x0..].iter_mut().step_by(s).zip(src) {
                            *d += v;
                        }
                    }
                }
            }
        }
    }

    /// 3x3 stride-1 convolutions run as Winograd F(2x2, 3x3) where it measured faster than
    /// im2col (64 channels or more in and out: +25% on ResNet-20's last stage; below that its
    /// transforms cost more than the multiplications saved). `RECIPE_WINOGRAD=0` turns it off,
    /// `RECIPE_WINOGRAD=1` uses it from 8 channels (for comparisons).
    fn winograd(&self) -> Option<Winograd> {
        static SETTING: OnceLock<Option<bool>> = OnceLock::new();
        let setting = *SETTING.get_or_init(|| match std::env::var("RECIPE_WINOGRAD").as_deref() {
            Ok("0") => Some(false),
            Ok("1") => Some(true),
            _ => None,
        });
        let min_channels = match setting {
            Some(false) => return None,
            Some(true) => 8,
            None => 64,
        };
        let fits = self.kh == 3 && self.kw == 3 && self.s == 1;
        (fits && self.c >= min_channels && self.o >= min_channels).then_some(Winograd {
            c: self.c,
            h: self.h,
            w: self.w,
            o: self.o,
            p: self.p,
            oh: self.oh,
            ow: self.ow,
        })
    }

    fn forward<T: WithDType>(&self, n: usize, x: &[T], k: &[T]) -> Vec<T> {
        if let Some(wg) = self.winograd() {
            return wg.forward(n, x, k);
        }
        let (o, ckk, l) = (self.o, self.ckk(), self.l());
        let mut out = vec![T::zero(); n * o * l];
        let pointwise = self.pointwise();
        out.par_chunks_mut(o * l)
            .zip(x.par_chunks(self.image()))
            .for_each_init(
                || {
                    if pointwise {
                        Vec::new()
                    } else {
                        vec![T::zero(); ckk * l]
                    }
                },
                |cols, (y, img)| {
                    let cols: &[T] = if pointwise {
                        img
                    } else {
                        self.im2col(img, cols);
                        cols
                    };
                    matmul(o, l, ckk, y, false, Mat::rows(k, ckk), Mat::rows(cols, l));
                },
            );
        out
    }

    /// Gradient of the input. Stride 1 with a square kernel: the "full" convolution of dy with the
    /// flipped, transposed kernel, which is a forward convolution (one im2col and one product per
    /// image, as fast as the forward pass). Otherwise: per image, cols' gradient = K^T dy, folded
    /// back with col2im.
    fn grad_input<T: WithDType>(&self, n: usize, k: &[T], dy: &[T]) -> Vec<T> {
        if self.s == 1 && self.kh == self.kw && self.p < self.kh {
            let transposed = Geometry {
                c: self.o,
                h: self.oh,
                w: self.ow,
                o: self.c,
                kh: self.kh,
                kw: self.kw,
                s: 1,
                p: self.kh - 1 - self.p,
                oh: self.h,
                ow: self.w,
            };
            return transposed.forward(n, dy, &self.flipped_kernel(k));
        }
        let (o, ckk, l) = (self.o, self.ckk(), self.l());
        let mut dx = vec![T::zero(); n * self.image()];
        let pointwise = self.pointwise();
        dx.par_chunks_mut(self.image())
            .zip(dy.par_chunks(o * l))
            .for_each_init(
                || {
                    if pointwise {
                        Vec::new()
                    } else {
                        vec![T::zero(); ckk * l]
                    }
                },
                |dcols, (dimg, g)| {
                    if pointwise {
                        matmul(
                            ckk,
                            l,
                            o,
                            dimg,
                            false,
                            Mat::transposed(k, ckk),
                            Mat::rows(g, l),
                        );
                    } else {
                        matmul(
                            ckk,
                            l,
                            o,
                            dcols,
                            false,
                            Mat::transposed(k, ckk),
                            Mat::rows(g, l),
                        );
                        self.col2im(dcols, dimg);
                    }
                },
            );
        dx
    }

    /// The kernel [O, C, KH, KW] as [C, O, KH, KW], each window rotated by 180 degrees.
    fn flipped_kernel<T: WithDType>(&self, k: &[T]) -> Vec<T> {
        let (o, c, kh, kw) = (self.o, self.c, self.kh, self.kw);
        let mut f = vec![T::zero(); k.len()];
        for oi in 0..o {
            for ci in 0..c {
                for ky in 0..kh {
                    for kx in 0..kw {
                        f[((ci * o + oi) * kh + ky) * kw + kx] =
                            k[((oi * c + ci) * kh + (kh - 1 - ky)) * kw + (kw - 1 - kx)];
                    }
                }
            }
        }
        f
    }

    /// Gradient of the kernel: the sum over images of dy cols^T, computed transposed (cols dy^T,
    /// [C*KH*KW, O], about twice as fast with these shapes) in a fixed number of groups whose
    /// partial sums are added in order, so the result does not depend on the thread count (and
    /// memory stays bounded at GROUPS partial kernels).
    fn grad_kernel<T: WithDType>(&self, n: usize, x: &[T], dy: &[T]) -> Vec<T> {
        // At most 16 groups, fewer when the partial kernels would pass 16M values (ResNet-50's
        // 512x512x3x3 at batch 16): a function of the shapes only, never of the thread count.
        const GROUPS: usize = 16;
        let (o, ckk, l) = (self.o, self.ckk(), self.l());
        let groups = GROUPS.min(((16 << 20) / (o * ckk).max(1)).max(2));
        let group = n.div_ceil(groups).max(1);
        let pointwise = self.pointwise();
        let partials: Vec<Vec<T>> = (0..n.div_ceil(group))
            .into_par_iter()
            .map(|g| {
                let mut acc = vec![T::zero(); ckk * o];
                let mut cols = if pointwise {
                    Vec::new()
                } else {
                    vec![T::zero(); ckk * l]
                };
                for i in g * group..((g + 1) * group).min(n) {
                    let img = &x[i * self.image()..][..self.image()];
                    let c: &[T] = if pointwise {
                        img
                    } else {
                        self.im2col(img, &mut cols);
                        &cols
                    };
                    matmul(
                        ckk,
                        o,
                        l,
                        &mut acc,
                        i > g * group,
                        Mat::rows(c, l),
                        Mat::transposed(&dy[i * o * l..][..o * l], l),
                    );
                }
                acc
            })
            .collect();
        // The partial sums added in group order, element by element, in parallel.
        const SPAN: usize = 1 << 12;
        let mut dk_t = vec![T::zero(); ckk * o];
        dk_t.par_chunks_mut(SPAN).enumerate().for_each(|(i, d)| {
            for part in &partials {
                d.iter_mut()
                    .zip(&part[i * SPAN..])
                    .for_each(|(a, &b)| *a += b);
            }
        });
        let mut dk = vec![T::zero(); o * ckk];
        for (j, row) in dk_t.chunks_exact(o).enumerate() {
            for (oi, &v) in row.iter().enumerate() {
                dk[oi * ckk + j] = v;
            }
        }
        dk
    }
}

/// The convolution as a candle op on (input, kernel), with its own backward.
struct Conv2d(Conv2dParams);

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, g) = Geometry::new(l1.shape(), l2.shape(), self.0)?;
        let out = float_storage!(s1, "conv2d", |T| g.forward(
            n,
            contiguous_slice::<T>(s1, l1, "conv2d")?,
            contiguous_slice::<T>(s2, l2, "conv2d")?,
        ));
        Ok((out, Shape::from((n, g.o, g.oh, g.ow))))
    }

    /// Each gradient is computed only when the graph needs it (the input batch of the first layer
    /// needs none), by ops that read the tensors in place.
    fn bwd(
        &self,
        x: &Tensor,
        k: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, g) = Geometry::new(x.shape(), k.shape(), self.0)?;
        let dy = dy.contiguous()?;
        let dx = match x.track_op() {
            true => Some(dy.apply_op2_no_bwd(k, &ConvGrad::Input(n, g))?),
            false => None,
        };
        let dk = match k.track_op() {
            true => Some(x.apply_op2_no_bwd(&dy, &ConvGrad::Kernel(n, g))?),
            false => None,
        };
        Ok((dx, dk))
    }
}

/// The gradients of a convolution as ops without a backward of their own: the input's from
/// (dy, kernel), the kernel's from (x, dy).
enum ConvGrad {
    Input(usize, Geometry),
    Kernel(usize, Geometry),
}

impl CustomOp2 for ConvGrad {
    fn name(&self) -> &'static str {
        match self {
            ConvGrad::Input(..) => "conv2d_grad_input",
            ConvGrad::Kernel(..) => "conv2d_grad_kernel",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        match *self {
            ConvGrad::Input(n, g) => {
                let out = float_storage!(s1, name, |T| g.grad_input(
                    n,
                    contiguous_slice::<T>(s2, l2, name)?,
                    contiguous_slice::<T>(s1, l1, name)?,
                ));
                Ok((out, Shape::from((n, g.c, g.h, g.w))))
            }
            ConvGrad::Kernel(n, g) => {
                let out = float_storage!(s1, name, |T| g.grad_kernel(
                    n,
                    contiguous_slice::<T>(s1, l1, name)?,
                    contiguous_slice::<T>(s2, l2, name)?,
                ));
                Ok((out, Shape::from((g.o, g.c, g.kh, g.kw))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{check_grad_fd, max_rel_err, rand_tensor};
    use candle_core::Var;

    #[test]
    fn matches_candle_forward_and_gradients() {
        for (n, c, h, w, o, k, s, p) in [
            (2, 3, 7, 9, 4, 3, 1, 1),
            (1, 2, 8, 8, 3, 3, 2, 1),
            (2, 1, 11, 10, 2, 1, 1, 0),
            (1, 3, 13, 13, 2, 7, 2, 3),
            (3, 2, 5, 5, 5, 1, 2, 0),
            (1, 2, 6, 7, 3, 3, 1, 0),
            (2, 3, 5, 4, 2, 5, 1, 2),
            (1, 4, 9, 9, 3, 3, 2, 0),
            (2, 3, 1, 1, 2, 3, 1, 1),
            (1, 2, 2, 2, 3, 3, 1, 1),
            (1, 2, 2, 3, 2, 5, 1, 2),
            (3, 8, 7, 9, 8, 3, 1, 1),
            (2, 16, 8, 8, 12, 3, 1, 1),
            (1, 9, 5, 6, 10, 3, 1, 0),
            (2, 8, 3, 3, 8, 3, 1, 2),
            (1, 8, 1, 1, 8, 3, 1, 1),
            // 64 channels: the Winograd path, forward and input gradient
            (2, 64, 6, 5, 64, 3, 1, 1),
        ] {
            let case = format!("{n} {c} {h} {w} {o} {k} {s} {p}");
            let x = Var::from_tensor(&rand_tensor(&[n, c, h, w], 1, DType::F32)).unwrap();
            let kt = Var::from_tensor(&rand_tensor(&[o, c, k, k], 2, DType::F32)).unwrap();
            let params = Conv2dParams {
                stride: s,
                padding: p,
            };
            let ours = conv2d_cpu(x.as_tensor(), kt.as_tensor(), params).unwrap();
            let theirs = x.as_tensor().conv2d(kt.as_tensor(), p, s, 1, 1).unwrap();
            assert!(max_rel_err(&ours, &theirs) < 1e-5, "forward {case}");
            let up = rand_tensor(ours.dims(), 3, DType::F32);
            let g1 = (ours * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (theirs * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&x, &kt] {
                let (a, b) = (
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap(),
                );
                assert!(max_rel_err(a, b) < 1e-4, "gradient {case}");
            }
        }
    }

    /// Also where candle's own backward is wrong (it drops the last row or column when
    /// (size + 2 pad - kernel) is not a multiple of the stride): finite differences in f64, for
    /// the input and the kernel.
    #[test]
    fn gradients_match_finite_differences() {
        for (n, c, h, w, o, k, s, p) in [
            (2, 2, 5, 6, 3, 1, 2, 0),
            (1, 2, 8, 7, 2, 3, 2, 1),
            (1, 1, 6, 6, 2, 2, 3, 1),
            (1, 2, 9, 9, 2, 7, 1, 3),
            (5, 1, 11, 9, 2, 7, 2, 3),
            (3, 3, 4, 5, 4, 1, 1, 0),
            (2, 2, 6, 7, 3, 3, 1, 0),
            (2, 8, 5, 7, 9, 3, 1, 1),
            (1, 8, 4, 4, 8, 3, 1, 0),
        ] {
            let case = format!("{n} {c} {h} {w} {o} {k} {s} {p}");
            let params = Conv2dParams {
                stride: s,
                padding: p,
            };
            let x = rand_tensor(&[n, c, h, w], 4, DType::F64);
            let kt = rand_tensor(&[o, c, k, k], 5, DType::F64);
            check_grad_fd(
                |t| conv2d_cpu(t, &kt, params).unwrap(),
                &x,
                1,
                1e-6,
                &format!("input {case}"),
            );
            check_grad_fd(
                |t| conv2d_cpu(&x, t, params).unwrap(),
                &kt,
                1,
                1e-6,
                &format!("kernel {case}"),
            );
        }
    }
}
