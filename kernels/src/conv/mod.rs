//! 2-D convolution on CPU. Stride-1 "same" convolutions (3x3, 5x5, 7x7) and stride-2
//! downsampling (3x3 padding 1, 1x1) with a multiple of 8 output channels, in f32 on CPUs with
//! AVX-512, run as a direct convolution (`direct.rs`): forward, input gradient and (3x3) kernel
//! gradient read each image from one copy with zero margins (phase planes for stride 2).
//! Otherwise, per image, im2col into a reused buffer and one matrix product that writes
//! the NCHW output directly; for stride-1 layers with at most 16 output channels the products
//! read the unfolded image in place from a padded copy instead (`Geometry::implicit`).
//! Strided convolutions split each image once into phase planes (every s-th row and column), so
//! im2col is contiguous copies there too. The input gradient of a stride-1 convolution is the
//! forward convolution of dy with the flipped, transposed kernel (same code, same speed); of a
//! strided one, direct convolutions of dy per phase of the input where the direct path applies
//! (`direct::StridedGrad`), else the transposed product folded back with col2im. The kernel
//! gradient is the
//! product cols dy^T per image (or in place from a channel-last padded copy,
//! `Geometry::implicit_kernel`), summed in groups fixed by the shapes, so it does not depend on
//! the thread count. Small output images with large kernels (ResNet-50's 14 and 7 pixel stages)
//! run the whole batch in one product per pass instead (`batched.rs`, `Geometry::batched`): the
//! kernel gradient always, the forward pass and input gradient where that measured faster.
//! Gradients are computed by ops reading the tensors in place, and only those
//! the graph needs. A batch norm + ReLU before a convolution can run inside it
//! (`conv2d_after_bn_relu`): applied to each image while it is copied for the products (and
//! again in the kernel gradient), so its output is never written (except on the Winograd path,
//! which takes the normalised batch whole). Other devices use candle's convolution.
//!
//! In bf16 (`Conv2dParams::bf16`, the recipe's `precision: amp_bf16`; CPUs with AVX512-BF16):
//! the same passes with every product's operands rounded to bf16 and the sums in f32. The direct
//! tiles read bf16 pairs of input channels (forward and stride-1 input gradient) or bf16 copies
//! of 32 pixels (3x3 kernel gradient) and add with VDPBF16PS; the im2col and in-place paths run
//! the packed bf16 product (`crate::bf16`); the strided direct input gradient is not taken (the
//! folded product runs instead). Winograd runs only the kernel gradient, where it would in f32,
//! on operands rounded to bf16 as its transforms read them: the same function, summed in f32.
//!
//! - this file: the public ops, their candle glue and the batch statistics of the output;
//! - `geometry.rs`: one image's convolution shape, and the path it takes;
//! - `layout.rs`: im2col/col2im, phase planes, padded and shifted rows, the channel-last copy;
//! - `passes.rs`: the forward, input-gradient and kernel-gradient passes over a batch, image by
//!   image;
//! - `batched.rs`: the same passes with the whole batch in one product each, for small images
//!   with large kernels (`Geometry::batched`);
//! - `direct.rs`, `winograd.rs`, `winograd_avx512.rs`, `winograd4_avx512.rs`: the direct
//!   AVX-512 convolution, Winograd F(2x2, 3x3) portable and with AVX-512, and F(4x4, 3x3) with
//!   AVX-512 for the larger images (`Winograd::f4`);
//! - `fused.rs`: a batch norm + ReLU run inside the convolution that follows it.

use crate::norm::Saved;
use crate::{contiguous_slice, lane_sum};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};
use geometry::Geometry;
use std::sync::{Arc, OnceLock};

mod batched;
mod direct;
mod fused;
mod geometry;
mod layout;
mod passes;
mod winograd;
#[cfg(target_arch = "x86_64")]
mod winograd4_avx512;
#[cfg(target_arch = "x86_64")]
mod winograd_avx512;

pub use fused::bn_relu_conv2d;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dParams {
    pub stride: usize,
    pub padding: usize,
    /// The products in bf16 with f32 sums (`precision: amp_bf16`): the input and the kernel
    /// rounded to bf16 as they are packed (`crate::bf16`), the output and both gradients f32.
    /// CPU, f32 tensors and AVX512-BF16 only; elsewhere the op is an error.
    pub bf16: bool,
}

impl Conv2dParams {
    /// A convolution in f32.
    pub fn new(stride: usize, padding: usize) -> Self {
        Conv2dParams {
            stride,
            padding,
            bf16: false,
        }
    }

    /// The same convolution with its products in bf16 (`bf16 = true`) or f32.
    pub fn with_bf16(self, bf16: bool) -> Self {
        Conv2dParams { bf16, ..self }
    }
}

/// Convolution of `x` [N, C, H, W] with `w` [O, C, KH, KW], plus an optional bias [O].
pub fn conv2d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, p: Conv2dParams) -> Result<Tensor> {
    check_bf16(x, p)?;
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

/// The gradients of `conv2d(x, w)` (CPU, f32 or f64) for the output gradient `dy`: of the input
/// when `input`, of the kernel when `kernel`. The backward pass of `conv2d` calls it; it is public
/// for benchmarks and for code that needs one gradient alone.
pub fn conv2d_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    p: Conv2dParams,
    input: bool,
    kernel: bool,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    if !x.device().is_cpu() || !matches!(x.dtype(), DType::F32 | DType::F64) {
        candle_core::bail!(
            "conv2d_backward runs on the CPU in f32 or f64, got {:?} on {:?}; elsewhere take the gradients from Tensor::backward",
            x.dtype(),
            x.device()
        );
    }
    let x = checked(x, w, p)?;
    let (n, g) = Geometry::new(x.shape(), w.shape(), p)?;
    let want = Shape::from((n, g.o, g.oh, g.ow));
    if dy.shape() != &want {
        candle_core::bail!(
            "conv2d_backward: output gradient {:?} does not match the convolution's output shape {:?}; pass the gradient of conv2d(x, w) with the same parameters",
            dy.dims(),
            want.dims()
        );
    }
    let dy = dy.contiguous()?;
    let dx = match input {
        true => Some(dy.apply_op2_no_bwd(&w.contiguous()?, &ConvGrad::Input(n, g))?),
        false => None,
    };
    let dk = match kernel {
        true => Some(x.apply_op2_no_bwd(&dy, &ConvGrad::Kernel(n, g))?),
        false => None,
    };
    Ok((dx, dk))
}

fn conv2d_cpu(x: &Tensor, w: &Tensor, p: Conv2dParams) -> Result<Tensor> {
    let op = Conv2d {
        params: p,
        moments: None,
    };
    checked(x, w, p)?.apply_op2(&w.contiguous()?, op)
}

/// An error unless a bf16 convolution (`p.bf16`) can run on `x`: f32 on a CPU with AVX512-BF16.
fn check_bf16(x: &Tensor, p: Conv2dParams) -> Result<()> {
    if !p.bf16 {
        return Ok(());
    }
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        candle_core::bail!(
            "conv2d: bf16 products run on the CPU in f32 tensors, got {:?} on {:?}",
            x.dtype(),
            x.device()
        );
    }
    if !crate::bf16::available() {
        candle_core::bail!(
            "conv2d: bf16 products need a CPU with AVX512-BF16, which this one lacks; use f32"
        );
    }
    Ok(())
}

/// `x` made contiguous, after checking that it and the kernel make a convolution.
pub(super) fn checked(x: &Tensor, w: &Tensor, p: Conv2dParams) -> Result<Tensor> {
    check_bf16(x, p)?;
    let (_, c, _, _) = x.dims4()?;
    let (_, c2, _, _) = w.dims4()?;
    if c != c2 {
        candle_core::bail!(
            "conv2d: input has {c} channels, kernel expects {c2}; the kernel must be [O, {c}, KH, KW] for this input"
        );
    }
    if p.stride == 0 {
        candle_core::bail!("conv2d: stride must be at least 1");
    }
    if x.elem_count() == 0 || w.elem_count() == 0 {
        candle_core::bail!(
            "conv2d: empty input {:?} or kernel {:?}; every dimension must be at least 1",
            x.dims(),
            w.dims()
        );
    }
    x.contiguous()
}

/// Moments of one output row (one image, one channel): its sum and its sum of squares about its
/// own mean, in f64.
pub(crate) type Moments = (f64, f64);

/// The element-wise sum of `partials`, blocks of `len` values (one per group of images) added in
/// block order, in parallel over spans of the block: the same bits at any thread count (the
/// kernel gradients' fixed-order sums).
fn sum_in_order<T: WithDType>(partials: &[T], len: usize) -> Vec<T> {
    use rayon::prelude::*;
    const SPAN: usize = 1 << 12;
    let mut sum = vec![T::zero(); len];
    sum.par_chunks_mut(SPAN).enumerate().for_each(|(i, d)| {
        for part in partials.chunks_exact(len) {
            d.iter_mut()
                .zip(&part[i * SPAN..])
                .for_each(|(a, &b)| *a += b);
        }
    });
    sum
}

/// The moments of each row of `l` values of one image's output (still in cache).
pub(super) fn row_moments<T: WithDType>(y: &[T], l: usize, m: &mut [Moments]) {
    for (row, m) in y.chunks_exact(l).zip(m.iter_mut()) {
        let sum = lane_sum(row, |v| v);
        let mean = sum / l as f64;
        let mt = T::from_f64(mean);
        // squares about the rounded mean, corrected to the exact one
        let m2 = lane_sum(row, |v| (v - mt) * (v - mt));
        let d = mean - mt.to_f64();
        *m = (sum, (m2 - l as f64 * d * d).max(0.0));
    }
}

/// `conv2d` (CPU, f32 or f64, no bias) and the per-channel batch mean and biased variance of its
/// output, computed while each image's output is still in cache (in a pass after it on the
/// Winograd path), so the batch norm that follows needs one pass instead of three. Rows are
/// combined in image order (Chan et al.'s pairwise update), so the statistics do not depend on
/// the thread count.
pub fn conv2d_with_batch_stats(x: &Tensor, w: &Tensor, p: Conv2dParams) -> Result<(Tensor, Saved)> {
    let sink = Arc::new(OnceLock::new());
    let op = Conv2d {
        params: p,
        moments: Some(sink.clone()),
    };
    let y = checked(x, w, p)?.apply_op2(&w.contiguous()?, op)?;
    let Some(rows) = sink.get() else {
        candle_core::bail!("conv2d: the forward pass kept no statistics");
    };
    let stats = batch_stats(rows, y.dims4()?);
    Ok((y, stats))
}

/// Per-channel mean and biased variance of an output [N, O, OH, OW] from the moments of its
/// rows, combined in image order (Chan et al.'s pairwise update).
pub(super) fn batch_stats(rows: &[Moments], (n, o, oh, ow): (usize, usize, usize, usize)) -> Saved {
    let l = (oh * ow) as f64;
    let (mut mean, mut var) = (vec![0.0; o], vec![0.0; o]);
    for oi in 0..o {
        let (mut count, mut mu, mut m2) = (0.0, 0.0, 0.0);
        for &(sum, sq) in rows.iter().skip(oi).step_by(o).take(n) {
            let mean_i = sum / l;
            let total = count + l;
            let delta = mean_i - mu;
            mu += delta * l / total;
            m2 += sq + delta * delta * count * l / total;
            count = total;
        }
        mean[oi] = mu;
        var[oi] = m2 / count.max(1.0);
    }
    Saved {
        mean,
        var,
        count: (n * oh * ow) as f64,
    }
}

/// The convolution as a candle op on (input, kernel), with its own backward; with `moments`,
/// the forward pass also leaves the moments of each output row there.
struct Conv2d {
    params: Conv2dParams,
    moments: Option<Arc<OnceLock<Vec<Moments>>>>,
}

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
        let (n, g) = Geometry::new(l1.shape(), l2.shape(), self.params)?;
        let mut rows = vec![(0.0, 0.0); if self.moments.is_some() { n * g.o } else { 0 }];
        let want = self.moments.is_some().then_some(&mut rows[..]);
        let out = float_storage!(s1, "conv2d", |T| g.forward(
            n,
            contiguous_slice::<T>(s1, l1, "conv2d")?,
            contiguous_slice::<T>(s2, l2, "conv2d")?,
            want,
        ));
        if let Some(sink) = &self.moments {
            let _ = sink.set(rows);
        }
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
        conv2d_backward(x, k, dy, self.params, x.track_op(), k.track_op())
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
                    None,
                ));
                Ok((out, Shape::from((g.o, g.c, g.kh, g.kw))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::geometry::InputGrad;
    use super::layout::{gather_every, scatter_every};
    use super::*;
    use crate::norm::bn_relu;
    use crate::testing::{check_grad_fd, max_rel_err, rand_tensor};
    use candle_core::Var;

    /// The tiled channel-last copy equals its definition (padded pixel q's channels at
    /// `q * c`, zero in the padding), with channel counts and widths on and off the tile size.
    #[test]
    fn channel_last_copy_matches_its_definition() {
        for (c, h, w, p) in [(8, 8, 8, 1), (12, 5, 13, 1), (16, 9, 17, 2), (3, 4, 6, 0)] {
            let g = Geometry {
                c,
                h,
                w,
                o: 4,
                kh: 3,
                kw: 3,
                s: 1,
                p,
                oh: h + 2 * p - 2,
                ow: w + 2 * p - 2,
                bf16: false,
            };
            let img: Vec<f32> = (0..c * h * w).map(|i| i as f32 - 40.0).collect();
            // without a prologue, and with a batch norm + ReLU that zeroes some values
            let st: Vec<(f32, f32)> = (0..c).map(|ci| (0.5 + ci as f32, -3.0)).collect();
            for prologue in [None, Some(&st[..])] {
                let mut buf = vec![-1f32; g.padded_len()];
                g.pad_channels_last(&img, &mut buf, prologue);
                let wp = w + 2 * p;
                for (i, &v) in buf.iter().enumerate() {
                    let (q, ci) = (i / c, i % c);
                    let (y, x) = (
                        (q / wp) as isize - p as isize,
                        (q % wp) as isize - p as isize,
                    );
                    let inside = q < (h + 2 * p) * wp
                        && (0..h as isize).contains(&y)
                        && (0..w as isize).contains(&x);
                    let want = match inside {
                        true => {
                            let v = img[(ci * h + y as usize) * w + x as usize];
                            prologue.map_or(v, |st| bn_relu(v, st[ci]))
                        }
                        false => 0.0,
                    };
                    let on = prologue.is_some();
                    assert_eq!(v, want, "c{c} h{h} w{w} p{p} at {i}, prologue {on}");
                }
            }
        }
    }

    /// The strided gather and scatter of the phase planes equal the plain `step_by` loops, for
    /// every stride and for lengths of both parities.
    #[test]
    fn gather_and_scatter_every_sth_value() {
        for s in 1..5 {
            for len in 1..12usize {
                let src: Vec<f32> = (0..len).map(|i| i as f32 + 1.0).collect();
                let mut dst = vec![0f32; len.div_ceil(s)];
                gather_every(&src, s, &mut dst);
                let want: Vec<f32> = src.iter().step_by(s).copied().collect();
                assert_eq!(dst, want, "gather s{s} len{len}");
                let mut back = vec![-1f32; len];
                scatter_every(&want, s, &mut back);
                let want_back: Vec<f32> = (0..len)
                    .map(|i| if i % s == 0 { src[i] } else { -1.0 })
                    .collect();
                assert_eq!(back, want_back, "scatter s{s} len{len}");
            }
        }
    }

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
            // 64 channels: the Winograd path on CPUs without AVX-512
            (2, 64, 6, 5, 64, 3, 1, 1),
            // Winograd's AVX-512 path (16 channels or more, 64 output pixels or more): rows of
            // one and several 16-tile chunks, an odd width, and an input gradient with 24
            // output channels
            (2, 16, 8, 8, 32, 3, 1, 1),
            (3, 24, 11, 37, 16, 3, 1, 1),
            (2, 3, 6, 10, 4, 3, 1, 1),
            (1, 2, 5, 16, 3, 5, 1, 2),
            (1, 2, 6, 8, 3, 2, 1, 1),
            (1, 3, 4, 5, 2, 1, 1, 1),
            // strided: phase planes narrower than the output rows, stride 3, images narrower
            // than the stride, a kernel taller than the stride
            (1, 2, 7, 7, 3, 3, 3, 1),
            (2, 2, 2, 2, 2, 2, 3, 0),
            (1, 3, 9, 9, 2, 3, 2, 0),
            (1, 2, 7, 7, 2, 5, 3, 2),
            (2, 16, 32, 32, 32, 3, 2, 1),
            (2, 16, 32, 32, 32, 1, 2, 0),
            // the kernel gradient in place with more than 16 output channels
            (2, 8, 16, 16, 24, 3, 1, 1),
            // batches of several images per kernel-gradient group
            (40, 4, 6, 6, 5, 3, 2, 1),
            (34, 3, 5, 5, 4, 3, 1, 0),
            // the direct convolution (`direct_convolution_covers_the_same_convolutions`): tiles
            // of 3 and 2 vectors, rows not dividing the vectors, a last vector of one pixel,
            // 5x5 and 7x7 kernels, kernels larger than the image
            (2, 3, 28, 28, 16, 3, 1, 1),
            (1, 5, 9, 11, 16, 5, 1, 2),
            (1, 4, 13, 7, 8, 7, 1, 3),
            (2, 16, 4, 4, 32, 3, 1, 1),
            (1, 8, 2, 3, 8, 5, 1, 2),
            (1, 8, 7, 7, 16, 3, 1, 1),
            // the direct kernel gradient over groups of images, in one pass and in several
            (40, 8, 6, 6, 8, 3, 1, 1),
            (34, 3, 24, 24, 8, 3, 1, 1),
            // strided direct convolutions: odd sizes, a 1x1 projection, several passes of images
            (2, 8, 7, 9, 8, 3, 2, 1),
            (1, 4, 9, 7, 16, 1, 2, 0),
            (20, 3, 50, 50, 8, 3, 2, 1),
            // strided with one-pixel rows or columns; a kernel gradient whose passes of images
            // do not divide its group (12x12: 7 images a pass, 10 a group)
            (1, 8, 1, 1, 8, 3, 2, 1),
            (1, 8, 3, 1, 8, 1, 2, 0),
            (160, 8, 12, 12, 8, 3, 1, 1),
            // the batched passes (`batched_passes_cover_small_images_with_large_kernels`):
            // 3x3, pointwise, strided 3x3 and strided projection
            (3, 64, 5, 5, 512, 3, 1, 1),
            (2, 512, 4, 3, 512, 1, 1, 0),
            (2, 256, 9, 9, 128, 3, 2, 1),
            (3, 512, 7, 7, 1024, 1, 2, 0),
        ] {
            let case = format!("{n} {c} {h} {w} {o} {k} {s} {p}");
            let x = Var::from_tensor(&rand_tensor(&[n, c, h, w], 1, DType::F32)).unwrap();
            let kt = Var::from_tensor(&rand_tensor(&[o, c, k, k], 2, DType::F32)).unwrap();
            let params = Conv2dParams::new(s, p);
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

    /// A bf16 convolution (`Conv2dParams::bf16`) computes the f32 convolution of the inputs
    /// rounded to bf16, on every path it takes (in place, im2col, pointwise, strided, folded
    /// input gradient), forward and both gradients (whose output gradient is rounded too), and
    /// the same bits when run again.
    #[test]
    fn bf16_convolution_is_the_convolution_of_the_rounded_operands() {
        if !crate::bf16::available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let round = |t: &Tensor| {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let r: Vec<f64> = v
                .iter()
                .map(|&x| crate::bf16::round_bf16(x) as f64)
                .collect();
            Tensor::from_vec(r, t.dims(), t.device()).unwrap()
        };
        for (n, c, h, w, o, k, s, p) in [
            (2, 16, 12, 12, 16, 3, 1, 1), // in place (16 output channels)
            (2, 16, 8, 8, 32, 3, 1, 1),   // im2col; Winograd F(2x2) kernel gradient
            (2, 16, 32, 32, 16, 3, 1, 1), // Winograd F(4x4) kernel gradient
            (3, 8, 9, 7, 16, 3, 2, 1),    // strided: phase planes, folded input gradient
            (2, 8, 6, 6, 24, 1, 1, 0),    // pointwise
            (2, 8, 9, 9, 16, 1, 2, 0),    // strided projection
            (1, 3, 20, 20, 8, 7, 2, 3),   // a stem
            (40, 3, 5, 5, 4, 3, 1, 0),    // several images per kernel-gradient group
            (2, 3, 28, 28, 16, 3, 1, 1),  // direct, an odd number of channels
            (2, 16, 8, 8, 32, 3, 1, 1),   // direct
            (2, 5, 9, 11, 16, 5, 1, 2),   // direct 5x5
            (2, 16, 9, 7, 16, 3, 2, 1),   // direct strided
            (2, 16, 9, 9, 16, 1, 2, 0),   // direct strided projection
            (34, 8, 12, 12, 8, 3, 1, 1),  // direct kernel gradient over passes of images
            (3, 64, 5, 5, 512, 3, 1, 1),  // batched
            (2, 512, 4, 3, 512, 1, 1, 0), // batched pointwise
            (2, 256, 9, 9, 128, 3, 2, 1), // batched strided
        ] {
            let case = format!("{n} {c} {h} {w} {o} {k} {s} {p}");
            let x = Var::from_tensor(&rand_tensor(&[n, c, h, w], 1, DType::F32)).unwrap();
            let kt = Var::from_tensor(&rand_tensor(&[o, c, k, k], 2, DType::F32)).unwrap();
            let params = Conv2dParams::new(s, p).with_bf16(true);
            let ours = conv2d(x.as_tensor(), kt.as_tensor(), None, params).unwrap();
            let up = rand_tensor(ours.dims(), 3, DType::F32);
            let g = (&ours * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            // the reference: f64 convolution of the rounded operands
            let (xr, kr, upr) = (round(x.as_tensor()), round(kt.as_tensor()), round(&up));
            let want = xr.conv2d(&kr, p, s, 1, 1).unwrap();
            assert!(max_rel_err(&ours, &want) < 1e-5, "forward {case}");
            let (dx, dk) =
                conv2d_backward(&xr, &kr, &upr, Conv2dParams::new(s, p), true, true).unwrap();
            let dx_ours = g.get(x.as_tensor()).unwrap();
            let dk_ours = g.get(kt.as_tensor()).unwrap();
            assert!(
                max_rel_err(dx_ours, &dx.unwrap()) < 1e-5,
                "input gradient {case}"
            );
            assert!(
                max_rel_err(dk_ours, &dk.unwrap()) < 1e-5,
                "kernel gradient {case}"
            );
            // and it is not the f32 convolution
            let f32_conv = conv2d(x.as_tensor(), kt.as_tensor(), None, Conv2dParams::new(s, p));
            assert!(
                max_rel_err(&ours, &f32_conv.unwrap()) > 1e-4,
                "rounded {case}"
            );
            let again = conv2d(x.as_tensor(), kt.as_tensor(), None, params).unwrap();
            let bits = |t: &Tensor| -> Vec<u32> {
                let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                v.iter().map(|x| x.to_bits()).collect()
            };
            assert_eq!(bits(&again), bits(&ours), "deterministic {case}");
        }
        // f64 tensors have no bf16 path: an error that says so
        let x = rand_tensor(&[1, 3, 5, 5], 1, DType::F64);
        let kt = rand_tensor(&[4, 3, 3, 3], 2, DType::F64);
        let err = conv2d(&x, &kt, None, Conv2dParams::new(1, 1).with_bf16(true)).unwrap_err();
        assert!(err.to_string().contains("bf16"), "{err}");
    }

    /// The geometry of one square image of `c` channels and `h` pixels a side, convolved into
    /// `o` channels by a `k x k` kernel of stride `s` and "same" padding `k / 2`.
    fn square(c: usize, h: usize, o: usize, k: usize, s: usize) -> Geometry {
        let x = Shape::from((1, c, h, h));
        Geometry::new(&x, &Shape::from((o, c, k, k)), Conv2dParams::new(s, k / 2))
            .unwrap()
            .1
    }

    /// On a CPU with AVX-512 the direct convolution is what runs the stride-1 "same" and the
    /// stride-2 downsampling shapes of `matches_candle_forward_and_gradients` in f32, and
    /// nothing else: not f64, not pointwise, stride 3, narrower-padded or 12-channel ones.
    #[test]
    fn direct_convolution_covers_the_same_convolutions() {
        let geometry = |c, h, w, o, k, s, p| {
            let x = Shape::from((1, c, h, w));
            Geometry::new(&x, &Shape::from((o, c, k, k)), Conv2dParams::new(s, p))
                .unwrap()
                .1
        };
        let on = direct::available() && !crate::paths::paths().im2col_only;
        for (c, h, w, o, k, s, p) in [
            (3, 28, 28, 16, 3, 1, 1),
            (5, 9, 11, 16, 5, 1, 2),
            (4, 13, 7, 8, 7, 1, 3),
            (8, 2, 3, 8, 5, 1, 2),
            (8, 7, 9, 8, 3, 2, 1),
            (4, 9, 7, 16, 1, 2, 0),
        ] {
            let g = geometry(c, h, w, o, k, s, p);
            assert_eq!(
                g.direct::<f32>().is_some(),
                on,
                "{c} {h} {w} {o} {k} {s} {p}"
            );
            assert!(g.direct::<f64>().is_none());
            // strided with a multiple of 8 input channels: the input gradient per phase too
            let kernel = vec![0f32; o * c * k * k];
            let strided = matches!(g.input_grad(&kernel), InputGrad::Strided(_));
            assert_eq!(
                strided,
                on && s == 2 && c % 8 == 0,
                "{c} {h} {w} {o} {k} {s} {p}"
            );
        }
        for (c, h, w, o, k, s, p) in [
            (8, 8, 8, 8, 1, 1, 0),
            (8, 9, 9, 8, 3, 3, 1),
            (8, 8, 8, 8, 5, 2, 2),
            (8, 8, 8, 8, 3, 1, 0),
            (8, 8, 8, 12, 3, 1, 1),
        ] {
            assert!(geometry(c, h, w, o, k, s, p).direct::<f32>().is_none());
        }
    }

    /// The batched passes take ResNet-50's small images with large kernels (14 and 7 pixels,
    /// from 2^18 weights) and the shapes added for them to the tests against candle: the kernel
    /// gradient always, the forward pass and input gradient where they measured faster. Nothing
    /// of ResNet-20 or of ResNet-50's larger images.
    #[test]
    fn batched_passes_cover_small_images_with_large_kernels() {
        use super::geometry::Pass;
        if crate::paths::paths() != crate::paths::Paths::default() {
            eprintln!("skipped: kernel paths set by the environment");
            return;
        }
        // (shape, forward and input gradient batched)
        for ((c, h, o, k, s), (forward, input)) in [
            ((256, 14, 256, 3, 1), (false, false)),
            ((512, 7, 512, 3, 1), (true, true)),
            ((1024, 14, 256, 1, 1), (false, false)),
            ((512, 7, 2048, 1, 1), (false, true)),
            ((256, 28, 256, 3, 2), (false, false)),
            ((512, 28, 1024, 1, 2), (false, true)),
            ((1024, 14, 2048, 1, 2), (true, true)),
            ((64, 5, 512, 3, 1), (true, true)),
            ((512, 4, 512, 1, 1), (false, true)),
            ((256, 9, 128, 3, 2), (true, true)),
        ] {
            let g = square(c, h, o, k, s);
            // Winograd, where it runs, takes the forward pass and the input gradient
            let on = g.winograd().is_none();
            let case = format!("{c} {h} {o} {k} {s}");
            assert!(g.batched(Pass::Kernel), "kernel gradient {case}");
            assert_eq!(g.batched(Pass::Forward), on && forward, "forward {case}");
            assert_eq!(g.batched(Pass::Input), on && input, "input gradient {case}");
        }
        for (c, h, o, k, s) in [
            (64, 56, 64, 3, 1),
            (256, 56, 128, 1, 1),
            (128, 28, 128, 3, 1),
            (16, 32, 16, 3, 1),
            (64, 8, 64, 3, 1),
            (32, 16, 64, 1, 2),
        ] {
            let g = square(c, h, o, k, s);
            for pass in [Pass::Forward, Pass::Input, Pass::Kernel] {
                assert!(!g.batched(pass), "{pass:?} {c} {h} {o} {k} {s}");
            }
        }
    }

    /// With AVX-512, Winograd runs the 3x3 stride-1 layers from 16 channels with outputs of 64
    /// pixels or more (ResNet-20's, the small ResNet's, ResNet-50's first three stages), not
    /// the 7x7 outputs that the batched passes run faster, nor the stem of 3 or 1 channels; and
    /// their kernel gradient up to 128 channels (not ResNet-50's 256-channel stage, level with
    /// the batched passes there). F(4x4, 3x3) takes the forward pass and input gradient of
    /// outputs 21 px wide or more with at most 64 channels (ResNet-20's 32 px stage, the small
    /// ResNet's 28 px block, ResNet-50's 56 px stage), and the kernel gradient of those with
    /// 16 channels. In bf16 only the kernel gradient takes Winograd, where f32 does.
    #[test]
    fn winograd_runs_where_it_measured_faster() {
        if crate::paths::paths() != crate::paths::Paths::default() || !crate::paths::cpu().avx512 {
            eprintln!("skipped: kernel paths set by the environment, or no AVX-512");
            return;
        }
        // (on, kernel gradient, F(4x4) forward and input gradient, F(4x4) kernel gradient)
        for ((c, h, o, k, s), (on, kernel, f4, f4_kernel)) in [
            ((16, 32, 16, 3, 1), (true, true, true, true)),
            ((32, 28, 32, 3, 1), (true, true, true, false)),
            ((32, 14, 32, 3, 1), (true, true, false, false)),
            ((32, 16, 32, 3, 1), (true, true, false, false)),
            ((64, 8, 64, 3, 1), (true, true, false, false)),
            ((64, 56, 64, 3, 1), (true, true, true, false)),
            ((128, 28, 128, 3, 1), (true, true, false, false)),
            ((256, 14, 256, 3, 1), (true, false, false, false)),
            ((512, 7, 512, 3, 1), (false, false, false, false)),
            ((3, 32, 16, 3, 1), (false, false, false, false)),
            ((8, 32, 8, 3, 1), (false, false, false, false)),
            ((32, 16, 64, 3, 2), (false, false, false, false)),
            ((64, 56, 64, 1, 1), (false, false, false, false)),
        ] {
            let g = square(c, h, o, k, s);
            let shape = format!("{c} {h} {o} {k} {s}");
            let wg = g.winograd();
            assert_eq!(wg.is_some(), on, "{shape}");
            assert_eq!(wg.is_some_and(|wg| wg.f4()), f4, "F(4x4) of {shape}");
            let dk = g.winograd_kernel::<f32>();
            assert_eq!(dk.is_some(), kernel, "kernel gradient of {shape}");
            let dk4 = dk.is_some_and(|wg| wg.f4_kernel());
            assert_eq!(dk4, f4_kernel, "F(4x4) kernel gradient of {shape}");
            // its input gradient is the forward of the transposed geometry
            let t = g.transposed().and_then(|t| t.winograd());
            assert_eq!(t.is_some(), on, "input gradient of {shape}");
            assert_eq!(
                t.is_some_and(|t| t.f4()),
                f4,
                "F(4x4) input gradient of {shape}"
            );
            // in bf16 the products run the forward pass and input gradient, and the kernel
            // gradient takes Winograd (on rounded operands) where f32 takes it
            let b = Geometry { bf16: true, ..g };
            assert!(b.winograd().is_none(), "bf16 {shape}");
            let bk = b.winograd_kernel::<f32>();
            assert_eq!(bk.is_some(), kernel, "bf16 kernel gradient of {shape}");
        }
    }

    /// The batched passes give the same bits on 1 and 3 threads (f32, and bf16 where the CPU
    /// has it), and the same values (to rounding) when the batch is split into groups.
    #[test]
    fn batched_passes_do_not_depend_on_threads_or_groups() {
        // a strided layer, and one whose products are large enough for the `gemm` crate to
        // split them over its threads
        for (n, c, h, o, k, s, p) in [(5, 32, 5, 24, 3, 2, 1), (4, 64, 7, 512, 3, 1, 1)] {
            batched_passes_agree((n, c, h, o, k, s, p));
        }
    }

    fn batched_passes_agree(
        (n, c, h, o, k, s, p): (usize, usize, usize, usize, usize, usize, usize),
    ) {
        let x = rand_tensor(&[n, c, h, h], 1, DType::F32);
        let kt = rand_tensor(&[o, c, k, k], 2, DType::F32);
        for bf16 in [false, true] {
            if bf16 && !crate::bf16::available() {
                continue;
            }
            let params = Conv2dParams::new(s, p).with_bf16(bf16);
            let (_, g) = Geometry::new(x.shape(), kt.shape(), params).unwrap();
            let dy = rand_tensor(&[n, o, g.oh, g.ow], 3, DType::F32);
            let v = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
            let (xv, kv, dyv) = (v(&x), v(&kt), v(&dy));
            let st: Vec<(f32, f32)> = (0..c).map(|i| (0.5 + i as f32 * 0.01, -0.1)).collect();
            let passes = |group: usize| {
                let mut m = vec![(0.0, 0.0); n * o];
                let y = g.forward_batched((n, group), &xv, &kv, Some(&mut m), Some(&st));
                let dx = g.grad_input_batched((n, group), &kv, &dyv);
                let dk = g.grad_kernel_batched((n, group), &xv, &dyv, Some(&st));
                let m: Vec<f32> = m.iter().flat_map(|&(a, b)| [a as f32, b as f32]).collect();
                [y, dx, dk, m]
            };
            let on = |threads: usize, group: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| passes(group))
            };
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let one = on(1, n);
            for (what, (a, b)) in ["y", "dx", "dk", "moments"]
                .iter()
                .zip(one.iter().zip(&on(3, n)))
            {
                assert_eq!(bits(a), bits(b), "{what} bf16={bf16} on 1 and 3 threads");
            }
            for (what, (a, b)) in ["y", "dx", "dk", "moments"]
                .iter()
                .zip(one.iter().zip(&on(2, 2)))
            {
                let err = a
                    .iter()
                    .zip(b)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                let scale = a.iter().map(|a| a.abs()).fold(1.0, f32::max);
                assert!(
                    err <= 1e-5 * scale,
                    "{what} bf16={bf16} in groups of 2: {err}"
                );
            }
        }
    }

    /// The batch statistics computed with the convolution (every forward path: im2col, in place,
    /// Winograd) match the mean and biased variance of its output, in f32 and f64; the output is
    /// the plain convolution's.
    #[test]
    fn batch_statistics_match_the_output() {
        for dtype in [DType::F32, DType::F64] {
            for (n, c, h, o, k, s, p) in [
                (3, 3, 9, 4, 3, 1, 1),
                (5, 8, 10, 16, 3, 1, 1),
                (4, 16, 8, 32, 3, 1, 1),
                (2, 64, 6, 64, 3, 1, 1),
                (3, 4, 7, 5, 3, 2, 1),
                (2, 6, 5, 3, 1, 1, 0),
            ] {
                let case = format!("{dtype:?} {n} {c} {h} {o} {k} {s} {p}");
                let x = (rand_tensor(&[n, c, h, h], 6, dtype) + 0.5).unwrap();
                let kt = rand_tensor(&[o, c, k, k], 7, dtype);
                let params = Conv2dParams::new(s, p);
                let (y, stats) = conv2d_with_batch_stats(&x, &kt, params).unwrap();
                let plain = conv2d_cpu(&x, &kt, params).unwrap();
                assert!(max_rel_err(&y, &plain) == 0.0, "output {case}");
                let y64 = y.to_dtype(DType::F64).unwrap();
                let m = y64.mean_keepdim((0, 2, 3)).unwrap();
                let v = y64.broadcast_sub(&m).unwrap().sqr().unwrap();
                let v = v.mean_keepdim((0, 2, 3)).unwrap();
                let tol = if dtype == DType::F32 { 1e-5 } else { 1e-10 };
                for (got, want) in [(stats.mean, m), (stats.var, v)] {
                    let want = want.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                    for (a, b) in got.iter().zip(&want) {
                        assert!((a - b).abs() <= tol * b.abs().max(1.0), "{case}: {a} {b}");
                    }
                }
            }
        }
    }

    /// The public gradient entry point checks its operands like the forward does: an empty
    /// input or a kernel for other channels is an error, not a panic in the kernels.
    #[test]
    fn backward_of_mismatched_operands_is_an_error() {
        let p = Conv2dParams::new(2, 0);
        let empty = rand_tensor(&[1, 0, 4, 4], 1, DType::F32);
        let k0 = rand_tensor(&[2, 0, 3, 3], 2, DType::F32);
        let dy = rand_tensor(&[1, 2, 1, 1], 3, DType::F32);
        assert!(conv2d_backward(&empty, &k0, &dy, p, true, true).is_err());
        let x = rand_tensor(&[1, 3, 4, 4], 4, DType::F32);
        let k2 = rand_tensor(&[2, 2, 3, 3], 5, DType::F32);
        let err = conv2d_backward(&x, &k2, &dy, p, true, true).unwrap_err();
        assert!(err.to_string().contains("channels"), "{err}");
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
            // the products without im2col (at most 16 output channels, rows padded by <= 1/4)
            (2, 3, 6, 10, 4, 3, 1, 1),
            (1, 2, 5, 16, 3, 5, 1, 2),
            (1, 2, 6, 8, 3, 2, 1, 1),
            (1, 3, 4, 5, 2, 1, 1, 1),
            // strided, through phase planes
            (1, 2, 7, 8, 2, 3, 3, 1),
            (1, 2, 2, 1, 2, 1, 3, 0),
            (1, 2, 7, 6, 2, 2, 2, 0),
            (1, 8, 16, 16, 17, 3, 1, 1),
            (17, 2, 4, 4, 2, 3, 2, 1),
        ] {
            let case = format!("{n} {c} {h} {w} {o} {k} {s} {p}");
            let params = Conv2dParams::new(s, p);
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
