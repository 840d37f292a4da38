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
//! the thread count. Gradients are computed by ops reading the tensors in place, and only those
//! the graph needs. A batch norm + ReLU before a convolution can run inside it
//! (`conv2d_after_bn_relu`): applied to each image while it is copied for the products (and
//! again in the kernel gradient), so its output is never written (except on the Winograd path,
//! which takes the normalised batch whole). Other devices use candle's convolution.

use super::direct::{Direct, StridedGrad, NK};
use super::gemm::{matmul, Mat};
use super::norm::{bn_relu, Saved};
use super::winograd::Winograd;
use super::{contiguous_slice, lane_sum, out_size, par_new, par_new_with};
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;
use std::any::TypeId;
use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

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

/// `x` made contiguous, after checking that it and the kernel make a convolution.
fn checked(x: &Tensor, w: &Tensor, p: Conv2dParams) -> Result<Tensor> {
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

    /// Size of the phase planes of a strided convolution: the image split into `s * s` planes
    /// of every `s`-th row and column, `(ceil(h / s), ceil(w / s))`; the image itself when s = 1.
    fn phase_dims(&self) -> (usize, usize) {
        (self.h.div_ceil(self.s), self.w.div_ceil(self.s))
    }

    /// Values of scratch `im2col` and `col2im` need: the unfolded image, and for strided
    /// convolutions the phase planes after it.
    fn cols_len(&self) -> usize {
        let (ph, pw) = self.phase_dims();
        let phases = if self.s > 1 {
            self.s * self.s * self.c * ph * pw
        } else {
            0
        };
        self.ckk() * self.l() + phases
    }

    /// The im2col/col2im scratch of one job (`cols_len()` values); empty for pointwise
    /// convolutions, which need none.
    fn scratch<T: WithDType>(&self) -> Vec<T> {
        vec![T::zero(); if self.pointwise() { 0 } else { self.cols_len() }]
    }

    /// Where kernel tap `k` (row or column) reads: phase `(k - p) mod s` at offset
    /// `floor((k - p) / s)` from the output position.
    fn tap(&self, k: usize) -> (usize, isize) {
        let t = k as isize - self.p as isize;
        let s = self.s as isize;
        (t.rem_euclid(s) as usize, t.div_euclid(s))
    }

    /// Whether some kernel tap reads phase row/column `a`.
    fn phase_used(&self, a: usize, k: usize) -> bool {
        (0..k).any(|i| self.tap(i).0 == a)
    }

    /// The plane of channel `ci` that tap `(ky, kx)` reads from, with its offsets: the image
    /// plane for stride 1, else a phase plane of `phases`.
    fn tap_plane<'a, T>(
        &self,
        img: &'a [T],
        phases: &'a [T],
        ci: usize,
        ky: usize,
        kx: usize,
    ) -> (&'a [T], (isize, isize)) {
        let ((a, dy), (b, dx)) = (self.tap(ky), self.tap(kx));
        let (ph, pw) = self.phase_dims();
        let plane = match self.s {
            1 => &img[ci * ph * pw..][..ph * pw],
            s => &phases[((a * s + b) * self.c + ci) * ph * pw..][..ph * pw],
        };
        (plane, (dy, dx))
    }

    /// Splits one image [C, H, W] into its phase planes `[s][s][C][ph][pw]` (zero past the
    /// image's edge); only the phases some kernel tap reads are written.
    fn split_phases<T: WithDType>(&self, img: &[T], phases: &mut [T], prologue: Option<&[(T, T)]>) {
        let (s, c, h, w) = (self.s, self.c, self.h, self.w);
        let (ph, pw) = self.phase_dims();
        for a in (0..s).filter(|&a| self.phase_used(a, self.kh)) {
            for b in (0..s).filter(|&b| self.phase_used(b, self.kw)) {
                let count = (w - b.min(w)).div_ceil(s);
                for ci in 0..c {
                    let plane = &mut phases[((a * s + b) * c + ci) * ph * pw..][..ph * pw];
                    for (i, dst) in plane.chunks_exact_mut(pw).enumerate() {
                        let y = i * s + a;
                        if y >= h {
                            dst.fill(T::zero());
                            continue;
                        }
                        let src = &img[(ci * h + y) * w + b.min(w)..(ci * h + y + 1) * w];
                        gather_every(src, s, &mut dst[..count]);
                        if let Some(st) = prologue {
                            dst[..count]
                                .iter_mut()
                                .for_each(|v| *v = bn_relu(*v, st[ci]));
                        }
                        dst[count..].fill(T::zero());
                    }
                }
            }
        }
    }

    /// Unfolds one image [C, H, W] into cols [C*KH*KW, OH*OW] (zero padding), in the first
    /// `ckk * l` values of `buf` (`cols_len()` long). Every row of cols is a shifted copy of one
    /// plane: of the image for stride 1, of a phase plane for stride s (each tap of a strided
    /// convolution reads every s-th row and column from one phase, so the image is split once
    /// into phases and every row is then contiguous copies, not strided gathers).
    fn im2col<T: WithDType>(&self, img: &[T], buf: &mut [T], prologue: Option<&[(T, T)]>) {
        let l = self.l();
        let (cols, phases) = buf.split_at_mut(self.ckk() * l);
        if self.s > 1 {
            // the prologue is applied once, while splitting
            self.split_phases(img, phases, prologue);
        }
        let st = |ci: usize| match self.s {
            1 => prologue.map(|p| p[ci]),
            _ => None,
        };
        let dims = self.phase_dims();
        for ci in 0..self.c {
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let row = &mut cols[((ci * self.kh + ky) * self.kw + kx) * l..][..l];
                    let (plane, off) = self.tap_plane(img, phases, ci, ky, kx);
                    shifted_copy(plane, dims, (self.oh, self.ow), off, row, st(ci));
                }
            }
        }
    }

    /// Folds cols [C*KH*KW, OH*OW] back into an image [C, H, W], summing overlaps (the adjoint of
    /// `im2col`); `img` is overwritten, `scratch` is `cols_len() - ckk * l` long.
    fn col2im<T: WithDType>(&self, cols: &[T], img: &mut [T], scratch: &mut [T]) {
        let (l, s, c, h, w) = (self.l(), self.s, self.c, self.h, self.w);
        let (ph, pw) = self.phase_dims();
        let used = |a: usize, b: usize| self.phase_used(a, self.kh) && self.phase_used(b, self.kw);
        let phase = |a: usize, b: usize| (a * s + b) * c * ph * pw..(a * s + b + 1) * c * ph * pw;
        let planes: &mut [T] = if s == 1 { &mut *img } else { &mut *scratch };
        for (a, b) in (0..s).flat_map(|a| (0..s).map(move |b| (a, b))) {
            if used(a, b) {
                planes[phase(a, b)].fill(T::zero());
            }
        }
        for ci in 0..c {
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let row = &cols[((ci * self.kh + ky) * self.kw + kx) * l..][..l];
                    let ((a, dy), (b, dx)) = (self.tap(ky), self.tap(kx));
                    let plane = &mut planes[((a * s + b) * c + ci) * ph * pw..][..ph * pw];
                    shifted_add(row, (self.oh, self.ow), (dy, dx), plane, (ph, pw));
                }
            }
        }
        if s == 1 {
            return;
        }
        // Interleave the phases back into the image; pixels no tap reads have no gradient.
        let used = |phase: usize| used(phase / s, phase % s);
        interleave_phases(scratch, used, (s, c, h, w), (ph, pw), img);
    }

    /// 3x3 stride-1 convolutions run as Winograd F(2x2, 3x3) where it measured faster: on CPUs
    /// without AVX-512, for 64 channels or more in and out (+25% on ResNet-20's last stage with
    /// AVX2 products; below 64 channels its transforms cost more than the multiplications
    /// saved). With AVX-512 the products run twice as fast and the transforms do not, so it is
    /// off there (ResNet-20's last stage: 2.0 ms per convolution with im2col against 2.2-2.7 with
    /// Winograd). `RECIPE_WINOGRAD=0` turns it off, `RECIPE_WINOGRAD=1` uses it from 8 channels.
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
            None if avx512() => return None,
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

    /// Whether the products read the unfolded image in place instead of im2col's copy
    /// (`conv_image` with a kernel from `prepare`, and `kernel_grad_image`): stride 1, at least 8 input and at most
    /// 16 output channels, padded rows at most a quarter wider than the output rows (the products
    /// compute the padded width). With so few output channels, writing im2col's nine copies costs
    /// more than half the forward product, and the im2col kernel-gradient product has only 16
    /// rows per block, half of what the AVX-512 kernels take. Measured (`cargo bench --bench
    /// kernels -- conv/`, GFLOP/s, im2col -> in place), 16 channels at 32x32: forward 236-263 ->
    /// 291, kernel gradient 176 -> 294; with 32 or 64 channels in place was equal or slower
    /// (forward at 16x16 336 -> 315, kernel gradient at 8x8 319 -> 256). `RECIPE_IM2COL=1` turns
    /// it off (for comparisons).
    fn implicit(&self) -> bool {
        let shape = self.c >= 8 && self.o <= 16 && 4 * self.wp() <= 5 * self.ow;
        !im2col_forced() && self.s == 1 && !self.pointwise() && shape
    }

    /// Whether the kernel gradient reads the unfolded image in place (`kernel_grad_image`):
    /// where the forward does, and also with more output channels
    /// when the padded rows are at most 1/8 wider than the output rows. Its products then read
    /// the channel-last copy without packing, 3C rows per block, where the im2col product's rows
    /// are the O output channels (half what the AVX-512 kernels take at 32). Measured (`cargo
    /// bench --bench kernels -- conv/backward_kernel`, GFLOP/s, im2col -> in place): 32 channels
    /// at 16x16 230-249 -> 245-270, at 28x28 272-276 -> 290-293; at 8x8 (rows 1/4 wider) 274-279
    /// -> 223-229, so not there.
    fn implicit_kernel(&self) -> bool {
        let narrow = 8 * self.wp() <= 9 * self.ow && self.c >= 8;
        self.implicit() || (!im2col_forced() && self.s == 1 && !self.pointwise() && narrow)
    }

    /// Width of the zero-padded image.
    fn wp(&self) -> usize {
        self.w + 2 * self.p
    }

    /// Columns of the "wide" output grid: every output row computed at the padded width, the
    /// last `wp - ow` values of each row unused.
    fn wide(&self) -> usize {
        self.oh * self.wp()
    }

    /// Values of one padded plane: `(h + 2p) * wp`.
    fn plane_len(&self) -> usize {
        (self.h + 2 * self.p) * self.wp()
    }

    /// Writes one image [C, H, W] as `kw` shifted copies of each zero-padded plane:
    /// `buf[(ci * kw + kx) * P + q] = padded[ci][q + kx]` (zero past the plane's end), with
    /// `P = plane_len()`. The unfolded image of kernel row `ky` is then the view
    /// `B[(ci, kx), q] = buf[(ci * kw + kx) * P + ky * wp + q]` over the wide output grid: rows at
    /// stride `P`, positions contiguous, so the product reads it as it is. That is `kw` copies of
    /// the image instead of im2col's `kh * kw`.
    fn pad_shifted<T: WithDType>(&self, img: &[T], buf: &mut [T], prologue: Option<&[(T, T)]>) {
        let (h, w, p, wp, kw) = (self.h, self.w, self.p, self.wp(), self.kw);
        let plane = self.plane_len();
        for (ci, planes) in buf.chunks_exact_mut(kw * plane).enumerate() {
            let (first, rest) = planes.split_at_mut(plane);
            // one fill of the plane, then the rows copied in (a fill per row for the padding
            // columns is two memset calls per row)
            first.fill(T::zero());
            for (y, row) in first[p * wp..(h + p) * wp].chunks_exact_mut(wp).enumerate() {
                let src = &img[(ci * h + y) * w..][..w];
                match prologue {
                    None => row[p..p + w].copy_from_slice(src),
                    Some(st) => bn_relu_row(src, st[ci], &mut row[p..p + w]),
                }
            }
            for (kx, shifted) in rest.chunks_exact_mut(plane).enumerate() {
                let kx = kx + 1;
                shifted[..plane - kx].copy_from_slice(&first[kx..]);
                shifted[plane - kx..].fill(T::zero());
            }
        }
    }

    /// The view of kernel row `ky`'s unfolded image in a `pad_shifted` buffer: [c * kw, wide].
    fn row_view<'a, T>(&self, buf: &'a [T], ky: usize) -> Mat<'a, T> {
        Mat {
            data: &buf[ky * self.wp()..],
            rs: self.plane_len(),
            cs: 1,
        }
    }

    /// The direct convolution of this geometry (`direct.rs`), where it applies: f32, AVX-512,
    /// a multiple of 8 output channels, stride 1 with a 3x3, 5x5 or 7x7 kernel and "same"
    /// padding or stride 2 with 3x3 padding 1 or 1x1 (`Direct::new`); not where Winograd is
    /// forced on (`RECIPE_WINOGRAD=1`), so the forward and its input gradient take one path.
    fn direct<T: WithDType>(&self) -> Option<Direct> {
        if TypeId::of::<T>() != TypeId::of::<f32>() || im2col_forced() || self.winograd().is_some()
        {
            return None;
        }
        Direct::new(
            (self.c, self.h, self.w, self.o),
            (self.kh, self.kw, self.s, self.p),
        )
    }

    /// The kernel prepared for `conv_image`: in tiles for the direct convolution, rearranged as
    /// [ky][o][c][kx] when the convolution runs in place (`implicit`), else as it is (borrowed).
    fn prepare<'a, T: WithDType>(&self, k: Cow<'a, [T]>) -> Prepared<'a, T> {
        if let Some(d) = self.direct::<T>() {
            let kernel = Cow::Owned(d.kernel(&k));
            return Prepared {
                path: Path::Direct(Box::new(d)),
                kernel,
            };
        }
        if !self.implicit() {
            return Prepared {
                path: Path::Im2col,
                kernel: k,
            };
        }
        let (o, c, kh, kw) = (self.o, self.c, self.kh, self.kw);
        let rows = self.rearranged_kernel(&k, |oi, ci, ky, kx| {
            let src = ((oi * c + ci) * kh + ky) * kw + kx;
            (((ky * o + oi) * c + ci) * kw + kx, src)
        });
        Prepared {
            path: Path::Implicit,
            kernel: Cow::Owned(rows),
        }
    }

    /// Scratch for `conv_image`: (shifted copies, wide output) in place, (cols, nothing) for
    /// im2col, (the image with margins, nothing) for the direct convolution.
    fn conv_scratch<T: WithDType>(&self, how: &Prepared<T>) -> (Vec<T>, Vec<T>) {
        match &how.path {
            Path::Implicit => (
                vec![T::zero(); self.c * self.kw * self.plane_len()],
                vec![T::zero(); self.o * self.wide()],
            ),
            Path::Im2col => (self.scratch(), Vec::new()),
            Path::Direct(d) => (vec![T::zero(); d.buf_len()], Vec::new()),
        }
    }

    /// The unfolded image [C*KH*KW, OH*OW] of `img`, with the `prologue` applied: im2col into
    /// `buf` (the prologue applied while copying, zero padding left zero), or for a pointwise
    /// convolution the image itself (the prologue then written into its scratch).
    fn cols_of<'a, T: WithDType>(
        &self,
        img: &'a [T],
        buf: &'a mut [T],
        prologue: Prologue<'a, T>,
    ) -> &'a [T] {
        if self.pointwise() {
            return match prologue {
                Some((st, tmp)) => self.with_prologue(img, Some(st), tmp),
                None => img,
            };
        }
        self.im2col(img, buf, prologue.map(|(st, _)| st));
        &buf[..self.ckk() * self.l()]
    }

    /// The convolution of one image `img` [C, H, W] into `y` [O, OH*OW].
    ///
    /// In place: `kw` shifted padded copies (`pad_shifted`) and one product per kernel row,
    /// `acc += K_ky B_ky` with `K_ky` [O, c * kw] and the view `B_ky` [c * kw, wide]; the wide
    /// rows are then narrowed into the output. Im2col: the unfolded image and one product (the
    /// image itself for a pointwise convolution).
    fn conv_image<T: WithDType>(
        &self,
        how: &Prepared<T>,
        (buf, acc): &mut (Vec<T>, Vec<T>),
        y: &mut [T],
        img: &[T],
        prologue: Prologue<T>,
    ) {
        let (o, ckk, l) = (self.o, self.ckk(), self.l());
        let k: &[T] = &how.kernel;
        match &how.path {
            Path::Direct(d) => {
                match prologue {
                    None => d.pad(img, buf, |_, v| v),
                    Some((st, _)) => d.pad(img, buf, |ci, v| bn_relu(v, st[ci])),
                }
                d.run(f32s(k), f32s(buf), f32s_mut(y));
            }
            Path::Implicit => {
                let rows = k;
                let (wide, wp, ow, kwc) = (self.wide(), self.wp(), self.ow, self.kw * self.c);
                self.pad_shifted(img, buf, prologue.map(|(st, _)| st));
                for ky in 0..self.kh {
                    let kr = Mat::rows(&rows[ky * o * kwc..][..o * kwc], kwc);
                    matmul(o, wide, kwc, acc, ky > 0, kr, self.row_view(buf, ky));
                }
                for (dst, src) in y.chunks_exact_mut(ow).zip(acc.chunks_exact(wp)) {
                    dst.copy_from_slice(&src[..ow]);
                }
            }
            Path::Im2col => {
                let cols = self.cols_of(img, buf, prologue);
                matmul(o, l, ckk, y, false, Mat::rows(k, ckk), Mat::rows(cols, l));
            }
        }
    }

    /// Runs `f(state, y, image)` for every image in parallel, `y` its part of a fresh output
    /// [N, O, OH*OW] and `state` one `init()` per rayon job; with `moments`, then the moments of
    /// each of its output rows while they are in cache.
    fn per_image<T: WithDType, S>(
        &self,
        n: usize,
        x: &[T],
        moments: Option<&mut [Moments]>,
        init: impl Fn() -> S + Sync + Send,
        f: impl Fn(&mut S, &mut [T], &[T]) + Sync + Send,
    ) -> Vec<T> {
        let (o, l) = (self.o, self.l());
        let want = moments.is_some();
        // one slot per image and channel whether or not they are wanted (one loop shape)
        let mut own = vec![(0.0, 0.0); if want { 0 } else { n * o }];
        let slots = moments.unwrap_or(&mut own);
        let items = x.par_chunks(self.image()).zip(slots.par_chunks_mut(o));
        par_new_with(n * o * l, o * l, items, init, |state, y, (img, m)| {
            f(state, y, img);
            if want {
                row_moments(y, l, m);
            }
        })
    }

    /// The convolution of `n` images; with `moments`, also each output row's moments
    /// (`[N][O]`, for the batch norm that follows).
    fn forward<T: WithDType>(
        &self,
        n: usize,
        x: &[T],
        k: &[T],
        moments: Option<&mut [Moments]>,
    ) -> Vec<T> {
        self.forward_after(n, x, k, moments, None)
    }

    /// `forward`, of `relu(x * s + t)` per input channel when a `prologue` [C] of (s, t) is
    /// given (a batch norm and ReLU before the convolution): applied to each image while it is
    /// copied for the products (padded planes, im2col, phase planes; per-image scratch for
    /// pointwise convolutions), so the normalised activations are never written out, except on
    /// the Winograd path, which takes the whole normalised batch.
    fn forward_after<T: WithDType>(
        &self,
        n: usize,
        x: &[T],
        k: &[T],
        moments: Option<&mut [Moments]>,
        prologue: Option<&[(T, T)]>,
    ) -> Vec<T> {
        let (o, l) = (self.o, self.l());
        if let Some(wg) = self.winograd() {
            let a = prologue.map(|st| self.bn_relu_batch(x, st));
            let out = wg.forward(n, a.as_deref().unwrap_or(x), k);
            if let Some(m) = moments {
                out.par_chunks(o * l)
                    .zip(m.par_chunks_mut(o))
                    .for_each(|(y, m)| row_moments(y, l, m));
            }
            return out;
        }
        let how = self.prepare(Cow::Borrowed(k));
        // scratch for the normalised image: only pointwise convolutions need it (`cols_of`)
        let tmp = if prologue.is_some() && self.pointwise() {
            self.image()
        } else {
            0
        };
        self.per_image(
            n,
            x,
            moments,
            || (self.conv_scratch(&how), vec![T::zero(); tmp]),
            |(bufs, tmp), y, img| {
                let prologue = prologue.map(|st| (st, &mut tmp[..]));
                self.conv_image(&how, bufs, y, img, prologue)
            },
        )
    }

    /// `img`, or `relu(img * s + t)` per channel written into `tmp` when a `prologue` is given:
    /// the arithmetic of the batch norm's own forward pass (`norm::affine`), so the result is
    /// bitwise what that pass would have written.
    fn with_prologue<'a, T: WithDType>(
        &self,
        img: &'a [T],
        prologue: Option<&[(T, T)]>,
        tmp: &'a mut [T],
    ) -> &'a [T] {
        let Some(st) = prologue else {
            return img;
        };
        let hw = self.h * self.w;
        for ((dst, src), &st) in tmp.chunks_exact_mut(hw).zip(img.chunks_exact(hw)).zip(st) {
            bn_relu_row(src, st, dst);
        }
        tmp
    }

    /// `relu(x * s + t)` for a whole batch (the Winograd path takes the batch at once).
    fn bn_relu_batch<T: WithDType>(&self, x: &[T], st: &[(T, T)]) -> Vec<T> {
        let image = self.image();
        par_new(x.len(), image, x.par_chunks(image), |dst, img| {
            self.with_prologue(img, Some(st), dst);
        })
    }

    /// How the input gradient of one image is computed. Stride 1 with a square kernel: the
    /// "full" convolution of dy with the flipped, transposed kernel, which is a forward
    /// convolution (`conv_image` of the transposed geometry, as fast as the forward pass).
    /// Strided with the direct path (f32, AVX-512, a multiple of 8 input channels): direct
    /// convolutions of dy per phase of the input (`StridedGrad`). Otherwise: cols' gradient =
    /// K^T dy, folded back with col2im.
    fn input_grad<'a, T: WithDType>(&self, k: &'a [T]) -> InputGrad<'a, T> {
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
            let flipped = self.flipped_kernel(k);
            return InputGrad::Transposed(transposed, transposed.prepare(Cow::Owned(flipped)));
        }
        // strided on AVX-512 (f32): a direct convolution of dy per phase of the input
        if let Some(sg) = self.direct::<T>().and_then(|d| d.input_grad(f32s(k))) {
            return InputGrad::Strided(Box::new(sg));
        }
        InputGrad::Folded(k)
    }

    /// Scratch for `input_grad_image`.
    fn input_grad_scratch<T: WithDType>(&self, how: &InputGrad<T>) -> (Vec<T>, Vec<T>) {
        match how {
            InputGrad::Transposed(t, how) => t.conv_scratch(how),
            InputGrad::Folded(_) => (self.scratch(), Vec::new()),
            InputGrad::Strided(sg) => {
                let (a, b) = sg.scratch_len();
                (vec![T::zero(); a], vec![T::zero(); b])
            }
        }
    }

    /// The input gradient `dimg` [C, H, W] of one image from its output gradient `g`.
    fn input_grad_image<T: WithDType>(
        &self,
        how: &InputGrad<T>,
        bufs: &mut (Vec<T>, Vec<T>),
        dimg: &mut [T],
        g: &[T],
    ) {
        match how {
            InputGrad::Transposed(t, how) => t.conv_image(how, bufs, dimg, g, None),
            InputGrad::Strided(sg) => {
                let (buf, planes) = (f32s_mut(&mut bufs.0), f32s_mut(&mut bufs.1));
                sg.run(buf, planes, f32s(g), f32s_mut(dimg));
            }
            // strided without the direct path, or otherwise not "full"-convolvable; never
            // pointwise (`input_grad` sends those to the transposed forward)
            InputGrad::Folded(k) => {
                let (o, ckk, l) = (self.o, self.ckk(), self.l());
                let (dcols, scratch) = bufs.0.split_at_mut(ckk * l);
                let (kt, gm) = (Mat::transposed(k, ckk), Mat::rows(g, l));
                matmul(ckk, l, o, dcols, false, kt, gm);
                self.col2im(dcols, dimg, scratch);
            }
        }
    }

    /// Gradient of the input, image by image in parallel (the transposed convolution through
    /// Winograd where the forward would use it).
    fn grad_input<T: WithDType>(&self, n: usize, k: &[T], dy: &[T]) -> Vec<T> {
        let how = self.input_grad(k);
        if let InputGrad::Transposed(t, prepared) = &how {
            if let (Some(wg), Path::Im2col) = (t.winograd(), &prepared.path) {
                return wg.forward(n, dy, &prepared.kernel);
            }
        }
        par_new_with(
            n * self.image(),
            self.image(),
            dy.par_chunks(self.o * self.l()),
            || self.input_grad_scratch(&how),
            |bufs, dimg, g| self.input_grad_image(&how, bufs, dimg, g),
        )
    }

    /// The kernel [O, C, KH, KW] as [C, O, KH, KW], each window rotated by 180 degrees.
    fn flipped_kernel<T: WithDType>(&self, k: &[T]) -> Vec<T> {
        let (o, c, kh, kw) = (self.o, self.c, self.kh, self.kw);
        self.rearranged_kernel(k, |oi, ci, ky, kx| {
            let src = ((oi * c + ci) * kh + (kh - 1 - ky)) * kw + (kw - 1 - kx);
            (((ci * o + oi) * kh + ky) * kw + kx, src)
        })
    }

    /// A copy of the kernel with element `src` moved to `dst`, where `(dst, src) = at(o, c, ky,
    /// kx)` for every kernel position.
    fn rearranged_kernel<T: WithDType>(
        &self,
        k: &[T],
        at: impl Fn(usize, usize, usize, usize) -> (usize, usize),
    ) -> Vec<T> {
        let mut out = vec![T::zero(); k.len()];
        for oi in 0..self.o {
            for ci in 0..self.c {
                for ky in 0..self.kh {
                    for kx in 0..self.kw {
                        let (dst, src) = at(oi, ci, ky, kx);
                        out[dst] = k[src];
                    }
                }
            }
        }
        out
    }

    /// The kernel gradient's image groups: at most 16, fewer when the partial kernels would
    /// pass 16M values (ResNet-50's 512x512x3x3 at batch 16); a function of the shapes only,
    /// never of the thread count. Returns (images per group, groups).
    fn kernel_groups(&self, n: usize) -> (usize, usize) {
        const GROUPS: usize = 16;
        let groups = GROUPS.min(((16 << 20) / (self.o * self.ckk()).max(1)).max(2));
        let group = n.div_ceil(groups).max(1);
        (group, n.div_ceil(group))
    }

    /// Scratch for `kernel_grad_image`: (padded channel-last image, widened dy) in place,
    /// (cols, nothing) for im2col.
    fn kernel_grad_scratch<T: WithDType>(&self) -> (Vec<T>, Vec<T>) {
        match self.implicit_kernel() {
            true => (
                vec![T::zero(); self.padded_len()],
                vec![T::zero(); self.o * self.wide()],
            ),
            false => (self.scratch(), Vec::new()),
        }
    }

    /// Adds the kernel-gradient product of one image (`img`, its output gradient `g`) into
    /// `acc` (overwriting it when `first`): cols dy^T [C*KH*KW, O] through im2col, or
    /// [KH][O][KW*C] in place (`implicit_kernel`). In place: a zero-padded channel-last copy
    /// (`pad_channels_last`) and dy widened to the padded row width (zero in the unused
    /// columns), then per kernel row `acc_ky += dy_wide B_ky^T`, where `B_ky^T` [wide, KW*C] is
    /// a strided view of the copy. In the product's own terms its long operand is then read in
    /// place (no packing), with KW*C rows per block (48 for 16 channels), where the im2col
    /// product has only O = 16 and runs at half speed with AVX-512.
    fn kernel_grad_image<T: WithDType>(
        &self,
        (buf, dyw): &mut (Vec<T>, Vec<T>),
        img: &[T],
        g: &[T],
        acc: &mut [T],
        first: bool,
        prologue: Prologue<T>,
    ) {
        let (o, c, l, ow, wp, wide) = (self.o, self.c, self.l(), self.ow, self.wp(), self.wide());
        if !self.implicit_kernel() {
            let ckk = self.ckk();
            let cols = self.cols_of(img, buf, prologue);
            let gt = Mat::transposed(g, l);
            matmul(ckk, o, l, acc, !first, Mat::rows(cols, l), gt);
            return;
        }
        let kwc = self.kw * c;
        self.pad_channels_last(img, buf, prologue.map(|(st, _)| st));
        for (dst, src) in dyw.chunks_exact_mut(wp).zip(g.chunks_exact(ow)) {
            dst[..ow].copy_from_slice(src);
            dst[ow..].fill(T::zero());
        }
        for ky in 0..self.kh {
            let a = &mut acc[ky * o * kwc..][..o * kwc];
            let b = Mat {
                data: &buf[ky * wp * c..],
                rs: c,
                cs: 1,
            };
            matmul(o, kwc, wide, a, !first, Mat::rows(dyw, wide), b);
        }
    }

    /// The kernel gradient from the partial sums of the groups (`partials`, one `ckk * o`
    /// block per group): added in group order, element by element, in parallel, so the result
    /// does not depend on the thread count; then laid out as [O, C, KH, KW].
    fn kernel_from_partials<T: WithDType>(&self, partials: &[T], direct: bool) -> Vec<T> {
        const SPAN: usize = 1 << 12;
        let (o, ckk) = (self.o, self.ckk());
        let mut dk_t = vec![T::zero(); ckk * o];
        dk_t.par_chunks_mut(SPAN).enumerate().for_each(|(i, d)| {
            for part in partials.chunks_exact(ckk * o) {
                d.iter_mut()
                    .zip(&part[i * SPAN..])
                    .for_each(|(a, &b)| *a += b);
            }
        });
        // The sums are [C*KH*KW][O] for im2col, [KH][O][KW][C] for the implicit products,
        // [O/8][C*KH*KW][8] for the direct kernel gradient.
        let (c, kh, kw) = (self.c, self.kh, self.kw);
        let implicit = self.implicit_kernel();
        let mut dk = vec![T::zero(); o * ckk];
        for (j, &v) in dk_t.iter().enumerate() {
            let at = match (direct, implicit) {
                (true, _) => {
                    let (jj, t, kb) = (j % NK, j / NK % ckk, j / (NK * ckk));
                    (kb * NK + jj) * ckk + t
                }
                (false, false) => (j % o) * ckk + j / o,
                (false, true) => {
                    let (ci, kx, oi, ky) = (j % c, j / c % kw, j / (c * kw) % o, j / (c * kw * o));
                    ((oi * c + ci) * kh + ky) * kw + kx
                }
            };
            dk[at] = v;
        }
        dk
    }

    /// Gradient of the kernel: the sum over images of dy cols^T, computed transposed (cols dy^T,
    /// [C*KH*KW, O], about twice as fast with these shapes) in a fixed number of groups whose
    /// partial sums are added in order, so the result does not depend on the thread count (and
    /// memory stays bounded at 16 partial kernels).
    fn grad_kernel<T: WithDType>(
        &self,
        n: usize,
        x: &[T],
        dy: &[T],
        prologue: Option<&[(T, T)]>,
    ) -> Vec<T> {
        let (o, ckk, l, image) = (self.o, self.ckk(), self.l(), self.image());
        let (group, groups) = self.kernel_groups(n);
        // scratch for the normalised image: only pointwise convolutions need it (`cols_of`)
        let tmp = if prologue.is_some() && self.pointwise() {
            image
        } else {
            0
        };
        let mut partials = vec![T::zero(); groups * ckk * o];
        if let Some(d) = self.direct::<T>().filter(|d| d.has_kernel_grad()) {
            // the direct kernel gradient: each group's images copied with margins (through
            // the prologue), then summed by `Direct::kernel_grad`
            let len = d.buf_len();
            partials.par_chunks_mut(ckk * o).enumerate().for_each_init(
                || vec![T::zero(); group * len],
                |xbuf, (gi, acc)| {
                    let first = gi * group;
                    let images = group.min(n - first);
                    for (j, buf) in xbuf.chunks_exact_mut(len).take(images).enumerate() {
                        let img = &x[(first + j) * image..][..image];
                        match prologue {
                            None => d.pad(img, buf, |_, v| v),
                            Some(st) => d.pad(img, buf, |ci, v| bn_relu(v, st[ci])),
                        }
                    }
                    let g = &dy[first * o * l..(first + images) * o * l];
                    d.kernel_grad(f32s(xbuf), images, f32s(g), f32s_mut(acc));
                },
            );
            return self.kernel_from_partials(&partials, true);
        }
        partials.par_chunks_mut(ckk * o).enumerate().for_each_init(
            || (self.kernel_grad_scratch(), vec![T::zero(); tmp]),
            |(bufs, tmp), (gi, acc)| {
                for i in gi * group..((gi + 1) * group).min(n) {
                    let (img, g) = (&x[i * image..][..image], &dy[i * o * l..][..o * l]);
                    let prologue = prologue.map(|st| (st, &mut tmp[..]));
                    self.kernel_grad_image(bufs, img, g, acc, i == gi * group, prologue);
                }
            },
        );
        self.kernel_from_partials(&partials, false)
    }

    /// Values of the padded channel-last image: `(h + 2p) * wp` pixels of `c` channels, plus
    /// `kw - 1` zero pixels that the unused columns of the last output row read.
    fn padded_len(&self) -> usize {
        (self.plane_len() + self.kw - 1) * self.c
    }

    /// Writes one image [C, H, W] zero-padded and channel-last: padded pixel q at `q * c`.
    fn pad_channels_last<T: WithDType>(
        &self,
        img: &[T],
        buf: &mut [T],
        prologue: Option<&[(T, T)]>,
    ) {
        let (c, h, w, p, wp) = (self.c, self.h, self.w, self.p, self.wp());
        // a run of one channel's values, through the prologue if any
        let copy = |ci: usize, src: &[T], dst: &mut [T]| match prologue {
            None => dst.copy_from_slice(src),
            Some(st) => bn_relu_row(src, st[ci], dst),
        };
        buf[..p * wp * c].fill(T::zero());
        buf[(h + p) * wp * c..].fill(T::zero());
        // A transpose of each row [c][w] -> [w][c] in 8x8 tiles: eight loads of eight values
        // and eight stores of eight (a scatter of one value at a time was 3% of a ResNet-20
        // step); the edges one value at a time.
        const B: usize = 8;
        for y in 0..h {
            let row = &mut buf[(y + p) * wp * c..][..wp * c];
            row[..p * c].fill(T::zero());
            row[(p + w) * c..].fill(T::zero());
            let px = &mut row[p * c..(p + w) * c];
            let src = |ci: usize| &img[(ci * h + y) * w..][..w];
            let (cb, xb) = (c / B * B, w / B * B);
            for c0 in (0..cb).step_by(B) {
                for x0 in (0..xb).step_by(B) {
                    let mut tile = [[T::zero(); B]; B];
                    for (i, t) in tile.iter_mut().enumerate() {
                        copy(c0 + i, &src(c0 + i)[x0..x0 + B], t);
                    }
                    for j in 0..B {
                        let dst = &mut px[(x0 + j) * c + c0..][..B];
                        for i in 0..B {
                            dst[i] = tile[i][j];
                        }
                    }
                }
            }
            for ci in 0..c {
                let xs = if ci < cb { xb..w } else { 0..w };
                let st = prologue.map_or((T::one(), T::zero()), |st| st[ci]);
                for x in xs {
                    let v = src(ci)[x];
                    px[x * c + ci] = if prologue.is_some() {
                        bn_relu(v, st)
                    } else {
                        v
                    };
                }
            }
        }
    }
}

/// A batch norm + ReLU to apply to an image before it is convolved: the per-channel (s, t) and
/// scratch for the normalised image (for the paths that cannot apply it while copying).
type Prologue<'a, T> = Option<(&'a [(T, T)], &'a mut [T])>;

/// `bn_relu` of every value of `src` into `dst`.
fn bn_relu_row<T: WithDType>(src: &[T], st: (T, T), dst: &mut [T]) {
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = bn_relu(v, st);
    }
}

/// `dst[i] = src[i * s]` for every i of `dst` (`src` holds at least `(dst.len() - 1) * s + 1`
/// values). Stride 2 goes through pairs, which the compiler turns into vector shuffles; a
/// `step_by` gather is one scalar load and store per value (it was 3% of a ResNet-20 step).
pub(super) fn gather_every<T: WithDType>(src: &[T], s: usize, dst: &mut [T]) {
    if s == 2 {
        let (pairs, _) = src.as_chunks::<2>();
        let n = pairs.len().min(dst.len());
        for (d, pair) in dst[..n].iter_mut().zip(pairs) {
            *d = pair[0];
        }
        if n < dst.len() {
            dst[n] = src[2 * n];
        }
        return;
    }
    for (d, v) in dst.iter_mut().zip(src.iter().step_by(s)) {
        *d = *v;
    }
}

/// Writes phase planes `[s * s][C][ph][pw]` back into an image [C, H, W]: value (i, j) of
/// phase `a * s + b` to pixel `(i s + a, j s + b)`; the phases not `used` are zero (the image is
/// cleared first when there are any).
pub(super) fn interleave_phases<T: WithDType>(
    planes: &[T],
    used: impl Fn(usize) -> bool,
    (s, c, h, w): (usize, usize, usize, usize),
    (ph, pw): (usize, usize),
    img: &mut [T],
) {
    if (0..s * s).any(|phase| !used(phase)) {
        img.fill(T::zero());
    }
    for phase in (0..s * s).filter(|&phase| used(phase)) {
        let (a, b) = (phase / s, phase % s);
        let count = (w - b.min(w)).div_ceil(s);
        for ci in 0..c {
            let plane = &planes[(phase * c + ci) * ph * pw..][..ph * pw];
            for (i, src) in plane.chunks_exact(pw).enumerate() {
                let y = i * s + a;
                if y >= h {
                    break;
                }
                let dst = &mut img[(ci * h + y) * w + b.min(w)..(ci * h + y + 1) * w];
                scatter_every(&src[..count], s, dst);
            }
        }
    }
}

/// `dst[i * s] = src[i]` for every i of `src` with `i * s` inside `dst` (the inverse of
/// `gather_every`; the other values of `dst` are left as they are).
fn scatter_every<T: WithDType>(src: &[T], s: usize, dst: &mut [T]) {
    if s == 2 {
        let (pairs, _) = dst.as_chunks_mut::<2>();
        let n = pairs.len().min(src.len());
        for (pair, v) in pairs.iter_mut().zip(&src[..n]) {
            pair[0] = *v;
        }
        if n < src.len() && 2 * n < dst.len() {
            dst[2 * n] = src[n];
        }
        return;
    }
    for (d, v) in dst.iter_mut().step_by(s).zip(src) {
        *d = *v;
    }
}

/// A kernel prepared for one image's forward convolution (`Geometry::prepare`).
struct Prepared<'a, T: Clone> {
    path: Path,
    kernel: Cow<'a, [T]>,
}

/// How one image's forward convolution runs.
enum Path {
    /// im2col and one product; the kernel as it is.
    Im2col,
    /// The products read the unfolded image in place (`Geometry::implicit`); the kernel
    /// rearranged as [ky][o][c][kx].
    Implicit,
    /// The direct convolution (`direct.rs`); the kernel in its tiles.
    Direct(Box<Direct>),
}

/// `v` as f32 values (the direct convolution's paths are taken only when T is f32).
fn f32s<T: WithDType>(v: &[T]) -> &[f32] {
    assert_eq!(
        TypeId::of::<T>(),
        TypeId::of::<f32>(),
        "f32 values expected"
    );
    // SAFETY: T is f32 (checked above), so the slice is one of f32.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), v.len()) }
}

/// `f32s` for a mutable slice.
fn f32s_mut<T: WithDType>(v: &mut [T]) -> &mut [f32] {
    assert_eq!(
        TypeId::of::<T>(),
        TypeId::of::<f32>(),
        "f32 values expected"
    );
    // SAFETY: T is f32 (checked above), so the slice is one of f32.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), v.len()) }
}

/// One image's input gradient (`Geometry::input_grad`): the forward convolution of the
/// transposed geometry with the flipped kernel, or the transposed product folded back with
/// col2im.
enum InputGrad<'a, T: Clone> {
    Transposed(Geometry, Prepared<'a, T>),
    Folded(&'a [T]),
    /// Strided on AVX-512 (f32): direct convolutions of dy per phase of the input.
    Strided(Box<StridedGrad>),
}

/// The output positions `0..out` whose source `o + d` lies in `0..len`.
fn valid_range(d: isize, len: usize, out: usize) -> (usize, usize) {
    let lo = (-d).clamp(0, out as isize) as usize;
    let hi = (len as isize - d).clamp(lo as isize, out as isize) as usize;
    (lo, hi)
}

/// `row[oy * ow + ox] = plane[(oy + dy) * pw + ox + dx]`, zero where that lies outside the plane
/// [ph, pw]. When the plane is as wide as the output the whole row is one copy (then the
/// columns that wrapped around are zeroed), else one copy per output row.
fn shifted_copy<T: WithDType>(
    plane: &[T],
    (ph, pw): (usize, usize),
    (oh, ow): (usize, usize),
    (dy, dx): (isize, isize),
    row: &mut [T],
    st: Option<(T, T)>,
) {
    // the copy itself, through `bn_relu` when a prologue is given
    let copy = |dst: &mut [T], src: &[T]| match st {
        None => dst.copy_from_slice(src),
        Some(st) => bn_relu_row(src, st, dst),
    };
    let (ylo, yhi) = valid_range(dy, ph, oh);
    let (lo, hi) = valid_range(dx, pw, ow);
    if pw == ow {
        let off = dy * pw as isize + dx;
        let len = plane.len() as isize;
        let a = ((ylo * ow) as isize).max(-off).min((oh * ow) as isize) as usize;
        let b = ((yhi * ow) as isize).min(len - off).max(a as isize) as usize;
        row[..a].fill(T::zero());
        row[b..].fill(T::zero());
        if a < b {
            // a >= -off and b <= len - off: the source range is inside the plane
            let src = (a as isize + off) as usize;
            copy(&mut row[a..b], &plane[src..src + (b - a)]);
        }
        // the columns that wrapped around, zeroed one column at a time (strided stores: a
        // `fill` per row is a memset call for one or two values)
        let rows = &mut row[ylo * ow..yhi * ow];
        for col in (0..lo).chain(hi..ow) {
            rows.iter_mut()
                .skip(col)
                .step_by(ow)
                .for_each(|v| *v = T::zero());
        }
        return;
    }
    for (oy, dst) in row.chunks_exact_mut(ow).enumerate() {
        if oy < ylo || oy >= yhi || lo == hi {
            dst.fill(T::zero());
            continue;
        }
        let src = ((oy as isize + dy) as usize * pw) as isize + dx;
        dst[..lo].fill(T::zero());
        dst[hi..].fill(T::zero());
        let src = (src + lo as isize) as usize;
        copy(&mut dst[lo..hi], &plane[src..src + hi - lo]);
    }
}

/// The adjoint of `shifted_copy`: `plane[(oy + dy) * pw + ox + dx] += row[oy * ow + ox]` where
/// that lies inside the plane.
fn shifted_add<T: WithDType>(
    row: &[T],
    (oh, ow): (usize, usize),
    (dy, dx): (isize, isize),
    plane: &mut [T],
    (ph, pw): (usize, usize),
) {
    let (ylo, yhi) = valid_range(dy, ph, oh);
    let (lo, hi) = valid_range(dx, pw, ow);
    if lo == hi {
        return;
    }
    for oy in ylo..yhi {
        let src = &row[oy * ow + lo..oy * ow + hi];
        let at = (((oy as isize + dy) as usize * pw) as isize + dx + lo as isize) as usize;
        for (d, &v) in plane[at..at + hi - lo].iter_mut().zip(src) {
            *d += v;
        }
    }
}

/// `RECIPE_IM2COL=1`: every convolution through im2col (for comparisons).
fn im2col_forced() -> bool {
    static OFF: OnceLock<bool> = OnceLock::new();
    *OFF.get_or_init(|| std::env::var("RECIPE_IM2COL").as_deref() == Ok("1"))
}

/// Whether this CPU has AVX-512 (the `gemm` crate then uses its 512-bit kernels).
fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Moments of one output row (one image, one channel): its sum and its sum of squares about its
/// own mean, in f64.
pub(crate) type Moments = (f64, f64);

/// The moments of each row of `l` values of one image's output (still in cache).
fn row_moments<T: WithDType>(y: &[T], l: usize, m: &mut [Moments]) {
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
pub(crate) fn conv2d_with_batch_stats(
    x: &Tensor,
    w: &Tensor,
    p: Conv2dParams,
) -> Result<(Tensor, Saved)> {
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
fn batch_stats(rows: &[Moments], (n, o, oh, ow): (usize, usize, usize, usize)) -> Saved {
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
    Saved { mean, var }
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

/// `conv2d(relu(batch_norm(z)), k)` in training on CPU (f32 or f64), with the batch statistics
/// of `z` given (`saved`, from the convolution that produced it) and the batch norm's weight
/// and bias as the rows of `wb` [2, C]; also the batch statistics of the output, for the batch
/// norm after it. The normalised activations are computed image by image inside the
/// convolution (and again inside its kernel gradient) and never written out (except on the
/// Winograd path): one pass over the activations and one activation tensor fewer than a batch
/// norm and then a convolution, with bitwise the same results. The running statistics are the caller's
/// (`norm::bn_relu_conv2d`).
pub(crate) fn conv2d_after_bn_relu(
    z: &Tensor,
    wb: &Tensor,
    saved: Saved,
    eps: f64,
    k: &Tensor,
    p: Conv2dParams,
) -> Result<(Tensor, Saved)> {
    let sink = Arc::new(OnceLock::new());
    let op = ConvAfterBn {
        params: p,
        eps,
        saved,
        moments: sink.clone(),
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
    super::norm::affine_of(saved, &wb[..c], &wb[c..], eps)
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
    /// Batch statistics of z.
    saved: Saved,
    moments: Arc<OnceLock<Vec<Moments>>>,
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
        let (dz, dw, db) = super::norm::bn_relu_gradients(z, &w, &b, &self.saved, self.eps, &da)?;
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
    use crate::ops::testing::{check_grad_fd, max_rel_err, rand_tensor};
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

    /// On a CPU with AVX-512 the direct convolution is what runs the stride-1 "same" and the
    /// stride-2 downsampling shapes of `matches_candle_forward_and_gradients` in f32, and
    /// nothing else: not f64, not pointwise, stride 3, narrower-padded or 12-channel ones.
    #[test]
    fn direct_convolution_covers_the_same_convolutions() {
        let geometry = |c, h, w, o, k, s, p| {
            let x = Shape::from((1, c, h, w));
            Geometry::new(
                &x,
                &Shape::from((o, c, k, k)),
                Conv2dParams {
                    stride: s,
                    padding: p,
                },
            )
            .unwrap()
            .1
        };
        let on = super::super::direct::available() && !im2col_forced();
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
                let params = Conv2dParams {
                    stride: s,
                    padding: p,
                };
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
        let p = Conv2dParams {
            stride: 2,
            padding: 0,
        };
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
