//! The convolution's passes over a batch, image by image: forward, input gradient and kernel
//! gradient, each taking the path its geometry chose (`geometry.rs`) and the layout copies it
//! needs (`layout.rs`). Work is split over images with rayon; the kernel gradient's groups are
//! fixed by the shapes, so results do not depend on the thread count.

use super::direct::NK;
use super::geometry::{
    f32_mat, f32s, f32s_into, f32s_mut, Geometry, InputGrad, Pass, Path, Prepared,
};
use super::layout::{bn_relu_row, Prologue};
use super::winograd::Winograd;
use super::Moments;
use super::{row_moments, sum_in_order};
use crate::bf16::{matmul_bf16, matmul_bf16_par};
use crate::gemm::{matmul_threads, Mat};
use crate::norm::bn_relu;
use crate::{par_new, par_new_with};
use candle_core::WithDType;
use rayon::prelude::*;
use std::borrow::Cow;

impl Geometry {
    /// `dst (+)= a b`, the passes' one product: in bf16 with f32 sums for a bf16 convolution
    /// (T is then f32: `check_bf16`), else in T.
    #[allow(clippy::too_many_arguments)]
    fn product<T: WithDType>(
        &self,
        m: usize,
        n: usize,
        k: usize,
        dst: &mut [T],
        accumulate: bool,
        a: Mat<T>,
        b: Mat<T>,
    ) {
        self.product_on(1, (m, n, k), dst, accumulate, a, b)
    }

    /// `product` on `threads` threads of the rayon pool (the batched passes' one large product;
    /// bitwise the same result at any thread count).
    pub(super) fn product_on<T: WithDType>(
        &self,
        threads: usize,
        (m, n, k): (usize, usize, usize),
        dst: &mut [T],
        accumulate: bool,
        a: Mat<T>,
        b: Mat<T>,
    ) {
        if !self.bf16 {
            return matmul_threads(m, n, k, dst, accumulate, a, b, threads);
        }
        let (dst, a, b) = (f32s_mut(dst), f32_mat(a), f32_mat(b));
        match threads {
            1 => matmul_bf16(m, n, k, dst, accumulate, a, b),
            _ => matmul_bf16_par(m, n, k, dst, accumulate, a, b),
        }
    }

    /// Scratch for `conv_image`: (shifted copies, wide output) in place, (cols, nothing) for
    /// im2col, (the image with margins, nothing) for the direct convolution.
    pub(super) fn conv_scratch<T: WithDType>(&self, how: &Prepared<T>) -> (Vec<T>, Vec<T>) {
        match &how.path {
            Path::Implicit => (
                vec![T::zero(); self.c * self.kw * self.plane_len()],
                vec![T::zero(); self.o * self.wide()],
            ),
            Path::Im2col => (self.scratch(), Vec::new()),
            Path::Direct(d) => (
                vec![T::zero(); d.buf_len()],
                vec![T::zero(); if self.bf16 { d.pairs_len() } else { 0 }],
            ),
        }
    }

    /// The unfolded image [C*KH*KW, OH*OW] of `img`, with the `prologue` applied: im2col into
    /// `buf` (the prologue applied while copying, zero padding left zero), or for a pointwise
    /// convolution the image itself (the prologue then written into its scratch).
    pub(super) fn cols_of<'a, T: WithDType>(
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
    pub(super) fn conv_image<T: WithDType>(
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
                if self.bf16 {
                    d.pairs(f32s(buf), f32s_mut(acc));
                    d.run_bf16(f32s(k), f32s(acc), f32s_mut(y));
                } else {
                    d.run(f32s(k), f32s(buf), f32s_mut(y));
                }
            }
            Path::Implicit => {
                let rows = k;
                let (wide, wp, ow, kwc) = (self.wide(), self.wp(), self.ow, self.kw * self.c);
                self.pad_shifted(img, buf, prologue.map(|(st, _)| st));
                for ky in 0..self.kh {
                    let kr = Mat::rows(&rows[ky * o * kwc..][..o * kwc], kwc);
                    self.product(o, wide, kwc, acc, ky > 0, kr, self.row_view(buf, ky));
                }
                for (dst, src) in y.chunks_exact_mut(ow).zip(acc.chunks_exact(wp)) {
                    dst.copy_from_slice(&src[..ow]);
                }
            }
            Path::Im2col => {
                let cols = self.cols_of(img, buf, prologue);
                self.product(o, l, ckk, y, false, Mat::rows(k, ckk), Mat::rows(cols, l));
            }
        }
    }

    /// Runs `f(state, y, image)` for every image in parallel, `y` its part of a fresh output
    /// [N, O, OH*OW] and `state` one `init()` per rayon job; with `moments`, then the moments of
    /// each of its output rows while they are in cache.
    pub(super) fn per_image<T: WithDType, S>(
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
    pub(super) fn forward<T: WithDType>(
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
    pub(super) fn forward_after<T: WithDType>(
        &self,
        n: usize,
        x: &[T],
        k: &[T],
        moments: Option<&mut [Moments]>,
        prologue: Option<&[(T, T)]>,
    ) -> Vec<T> {
        let (o, l) = (self.o, self.l());
        if let Some(wg) = self.winograd() {
            let out = self.winograd_forward(&wg, n, x, k, prologue);
            if let Some(m) = moments {
                out.par_chunks(o * l)
                    .zip(m.par_chunks_mut(o))
                    .for_each(|(y, m)| row_moments(y, l, m));
            }
            return out;
        }
        if self.batched(Pass::Forward) {
            return self.forward_batched((n, self.batch_group(n)), x, k, moments, prologue);
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

    /// The convolution of `n` images through Winograd (`winograd()`), of `relu(x * s + t)` per
    /// input channel when a `prologue` is given: the AVX-512 path (`winograd_avx512.rs`) applies
    /// it while transforming the input; the portable one takes the normalised batch.
    fn winograd_forward<T: WithDType>(
        &self,
        wg: &Winograd,
        n: usize,
        x: &[T],
        k: &[T],
        prologue: Option<&[(T, T)]>,
    ) -> Vec<T> {
        #[cfg(target_arch = "x86_64")]
        if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() && wg.avx512() {
            let st = prologue_f32(prologue);
            let tile = if wg.f4() { 4 } else { 2 };
            let y = wg.forward_avx512(tile, n, f32s(x), f32s(k), st.as_deref());
            return f32s_into(y);
        }
        let a = prologue.map(|st| self.bn_relu_batch(x, st));
        wg.forward(n, a.as_deref().unwrap_or(x), k)
    }

    /// `img`, or `relu(img * s + t)` per channel written into `tmp` when a `prologue` is given:
    /// the arithmetic of the batch norm's own forward pass (`norm::affine`), so the result is
    /// bitwise what that pass would have written.
    pub(super) fn with_prologue<'a, T: WithDType>(
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
    pub(super) fn bn_relu_batch<T: WithDType>(&self, x: &[T], st: &[(T, T)]) -> Vec<T> {
        let image = self.image();
        par_new(x.len(), image, x.par_chunks(image), |dst, img| {
            self.with_prologue(img, Some(st), dst);
        })
    }

    /// Scratch for `input_grad_image`.
    pub(super) fn input_grad_scratch<T: WithDType>(&self, how: &InputGrad<T>) -> (Vec<T>, Vec<T>) {
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
    pub(super) fn input_grad_image<T: WithDType>(
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
                self.product(ckk, l, o, dcols, false, kt, gm);
                self.col2im(dcols, l, dimg, scratch);
            }
        }
    }

    /// Gradient of the input, image by image in parallel (the transposed convolution through
    /// Winograd where the forward would use it).
    pub(super) fn grad_input<T: WithDType>(&self, n: usize, k: &[T], dy: &[T]) -> Vec<T> {
        if self.batched(Pass::Input) {
            return self.grad_input_batched((n, self.batch_group(n)), k, dy);
        }
        if let Some((t, wg)) = self.transposed().and_then(|t| Some((t, t.winograd()?))) {
            return t.winograd_forward(&wg, n, dy, &self.flipped_kernel(k), None);
        }
        let how = self.input_grad(k);
        par_new_with(
            n * self.image(),
            self.image(),
            dy.par_chunks(self.o * self.l()),
            || self.input_grad_scratch(&how),
            |bufs, dimg, g| self.input_grad_image(&how, bufs, dimg, g),
        )
    }

    /// Scratch for `kernel_grad_image`: (padded channel-last image, widened dy) in place,
    /// (cols, nothing) for im2col.
    pub(super) fn kernel_grad_scratch<T: WithDType>(&self) -> (Vec<T>, Vec<T>) {
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
    pub(super) fn kernel_grad_image<T: WithDType>(
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
            self.product(ckk, o, l, acc, !first, Mat::rows(cols, l), gt);
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
            self.product(o, kwc, wide, a, !first, Mat::rows(dyw, wide), b);
        }
    }

    /// The kernel gradient from the partial sums of the groups (`partials`, one `ckk * o`
    /// block per group): added in group order, element by element, in parallel, so the result
    /// does not depend on the thread count; then laid out as [O, C, KH, KW].
    pub(super) fn kernel_from_partials<T: WithDType>(
        &self,
        partials: &[T],
        direct: bool,
    ) -> Vec<T> {
        let (o, ckk) = (self.o, self.ckk());
        let dk_t = sum_in_order(partials, ckk * o);
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
    pub(super) fn grad_kernel<T: WithDType>(
        &self,
        n: usize,
        x: &[T],
        dy: &[T],
        prologue: Option<&[(T, T)]>,
    ) -> Vec<T> {
        #[cfg(target_arch = "x86_64")]
        if let Some(wg) = self.winograd_kernel::<T>() {
            let st = prologue_f32(prologue);
            let groups = self.kernel_groups(n);
            let tile = if wg.f4_kernel() { 4 } else { 2 };
            // bf16: the operands rounded as they are read, the sums f32 (`winograd_kernel`)
            let how = (tile, self.bf16);
            let dk = wg.kernel_grad_avx512(how, n, f32s(x), f32s(dy), st.as_deref(), groups);
            return f32s_into(dk);
        }
        if self.batched(Pass::Kernel) {
            return self.grad_kernel_batched((n, self.batch_group(n)), x, dy, prologue);
        }
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
            // bf16: the padded images and the output gradient rounded into copies of bf16 bits
            let bf16_len = |values: usize| if self.bf16 { values } else { 0 };
            partials.par_chunks_mut(ckk * o).enumerate().for_each_init(
                || {
                    let x16 = vec![0u16; bf16_len(group * len)];
                    (
                        vec![T::zero(); group * len],
                        x16,
                        vec![0u16; bf16_len(group * o * l)],
                    )
                },
                |(xbuf, x16, dy16), (gi, acc)| {
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
                    if self.bf16 {
                        let (x16, dy16) = (&mut x16[..images * len], &mut dy16[..g.len()]);
                        crate::bf16::to_bf16(&f32s(xbuf)[..images * len], x16);
                        crate::bf16::to_bf16(f32s(g), dy16);
                        d.kernel_grad_bf16(x16, images, dy16, f32s_mut(acc));
                    } else {
                        d.kernel_grad(f32s(xbuf), images, f32s(g), f32s_mut(acc));
                    }
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
}

/// A prologue's (scale, shift) pairs as f32, for the f32-only AVX-512 Winograd path (called
/// where `T` is f32, so the values are unchanged).
#[cfg(target_arch = "x86_64")]
fn prologue_f32<T: WithDType>(prologue: Option<&[(T, T)]>) -> Option<Vec<(f32, f32)>> {
    prologue.map(|st| {
        st.iter()
            .map(|&(s, t)| (s.to_f64() as f32, t.to_f64() as f32))
            .collect()
    })
}
