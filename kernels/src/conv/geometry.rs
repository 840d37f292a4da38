//! The shape of one image's convolution, and the choice of path for it: direct (AVX-512),
//! Winograd, the products reading the image in place, or im2col. The choice depends on the
//! shapes, the CPU and [`crate::paths`] only.

use super::direct::{Direct, StridedGrad};
use super::winograd::Winograd;
use super::Conv2dParams;
use crate::gemm::Mat;
use crate::out_size;
use crate::paths::Switch;
use candle_core::{Result, Shape, WithDType};
use std::any::TypeId;
use std::borrow::Cow;

/// The shape of one image's convolution.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    pub(super) c: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) o: usize,
    pub(super) kh: usize,
    pub(super) kw: usize,
    pub(super) s: usize,
    pub(super) p: usize,
    pub(super) oh: usize,
    pub(super) ow: usize,
    /// The products in bf16 (`Conv2dParams::bf16`): the direct tiles' and the packed products'
    /// bf16 kernels; Winograd only for the kernel gradient, on rounded operands
    /// (`winograd_kernel`).
    pub(super) bf16: bool,
}

impl Geometry {
    pub(super) fn new(x: &Shape, k: &Shape, p: Conv2dParams) -> Result<(usize, Self)> {
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
                bf16: p.bf16,
            },
        ))
    }

    /// Rows of the unfolded image: one per kernel element.
    pub(super) fn ckk(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Columns of the unfolded image: one per output pixel.
    pub(super) fn l(&self) -> usize {
        self.oh * self.ow
    }

    pub(super) fn image(&self) -> usize {
        self.c * self.h * self.w
    }

    /// A 1x1 stride-1 convolution without padding needs no unfolding: the image is its own cols.
    pub(super) fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.s == 1 && self.p == 0
    }

    /// Size of the phase planes of a strided convolution: the image split into `s * s` planes
    /// of every `s`-th row and column, `(ceil(h / s), ceil(w / s))`; the image itself when s = 1.
    pub(super) fn phase_dims(&self) -> (usize, usize) {
        (self.h.div_ceil(self.s), self.w.div_ceil(self.s))
    }

    /// Values of scratch `im2col` and `col2im` need: the unfolded image, and for strided
    /// convolutions the phase planes after it.
    pub(super) fn cols_len(&self) -> usize {
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
    pub(super) fn scratch<T: WithDType>(&self) -> Vec<T> {
        vec![T::zero(); if self.pointwise() { 0 } else { self.cols_len() }]
    }

    /// 3x3 stride-1 convolutions run as Winograd F(2x2, 3x3) where it measured faster
    /// (`paths::winograd_min_channels`). On CPUs without AVX-512 (`winograd.rs`, the `gemm`
    /// crate's products), for 64 channels or more in and out: below that its transforms cost
    /// more than the multiplications saved. With AVX-512 (`winograd_avx512.rs`), from 16
    /// channels where its own path runs (a multiple of 8 output channels) and the output has 64
    /// pixels or more: the 7x7 outputs of ResNet-50's last stage run faster in the batched
    /// passes. Measurements: `benches/README.md`. The kernel gradient takes it where
    /// `winograd_kernel` says.
    pub(super) fn winograd(&self) -> Option<Winograd> {
        if self.bf16 {
            return None;
        }
        let min_channels = crate::paths::winograd_min_channels()?;
        let fits = self.kh == 3 && self.kw == 3 && self.s == 1;
        if !(fits && self.c >= min_channels && self.o >= min_channels) {
            return None;
        }
        let wg = Winograd {
            c: self.c,
            h: self.h,
            w: self.w,
            o: self.o,
            p: self.p,
            oh: self.oh,
            ow: self.ow,
        };
        let auto = crate::paths::paths().winograd == Switch::Auto;
        if auto && crate::paths::cpu().avx512 && !(wg.avx512() && self.l() >= 64) {
            return None;
        }
        Some(wg)
    }

    /// Winograd for the kernel gradient: where `winograd()` runs the forward pass in f32 on
    /// the AVX-512 path, with input channels in fours (`Winograd::kernel_grad_on_avx512`); by
    /// default up to 128 channels. With 256 (ResNet-50's 14 px stage) it measured level with the
    /// batched passes: each image's 49 tiles are summed from 64 KB matrices per point that no
    /// longer stay in L1.
    ///
    /// In bf16 (`amp_bf16`) too, where it would run in f32, with its operands rounded to bf16 as
    /// the transforms read them (`kernel_grad_avx512` with `round`): the same function as the
    /// bf16 products' kernel gradient (the convolution of the rounded operands, summed in f32),
    /// and it measured faster there. The forward pass and the input gradient stay bf16
    /// products, faster than Winograd in f32.
    pub(super) fn winograd_kernel<T: WithDType>(&self) -> Option<Winograd> {
        let f32_geometry = Geometry {
            bf16: false,
            ..*self
        };
        let wg = f32_geometry.winograd()?;
        let f32 = TypeId::of::<T>() == TypeId::of::<f32>();
        let on = match crate::paths::paths().winograd_kernel {
            Switch::Off => false,
            Switch::On => true,
            Switch::Auto => self.c.max(self.o) <= 128,
        };
        (on && f32 && wg.kernel_grad_on_avx512()).then_some(wg)
    }

    /// Whether the products read the unfolded image in place instead of im2col's copy
    /// (`conv_image` with a kernel from `prepare`, and `kernel_grad_image`): stride 1, at least 8 input and at most
    /// 16 output channels, padded rows at most a quarter wider than the output rows (the products
    /// compute the padded width). With so few output channels, writing im2col's nine copies costs
    /// more than half the forward product, and the im2col kernel-gradient product has only 16
    /// rows per block, half of what the AVX-512 kernels take; with 32 or 64 channels in place
    /// measured equal or slower (`benches/README.md`). `Paths::im2col_only` turns it off.
    pub(super) fn implicit(&self) -> bool {
        let shape = self.c >= 8 && self.o <= 16 && 4 * self.wp() <= 5 * self.ow;
        !crate::paths::paths().im2col_only && self.s == 1 && !self.pointwise() && shape
    }

    /// Whether the kernel gradient reads the unfolded image in place (`kernel_grad_image`):
    /// where the forward does, and also with more output channels
    /// when the padded rows are at most 1/8 wider than the output rows. Its products then read
    /// the channel-last copy without packing, 3C rows per block, where the im2col product's rows
    /// are the O output channels (half what the AVX-512 kernels take at 32). With rows 1/4 wider
    /// (8x8 images) the wasted columns cost more than the packing saved.
    pub(super) fn implicit_kernel(&self) -> bool {
        let narrow = 8 * self.wp() <= 9 * self.ow && self.c >= 8;
        self.implicit()
            || (!crate::paths::paths().im2col_only && self.s == 1 && !self.pointwise() && narrow)
    }

    /// Width of the zero-padded image.
    pub(super) fn wp(&self) -> usize {
        self.w + 2 * self.p
    }

    /// Columns of the "wide" output grid: every output row computed at the padded width, the
    /// last `wp - ow` values of each row unused.
    pub(super) fn wide(&self) -> usize {
        self.oh * self.wp()
    }

    /// Values of one padded plane: `(h + 2p) * wp`.
    pub(super) fn plane_len(&self) -> usize {
        (self.h + 2 * self.p) * self.wp()
    }

    /// The direct convolution of this geometry (`direct.rs`), where it applies: f32, AVX-512,
    /// a multiple of 8 output channels, stride 1 with a 3x3, 5x5 or 7x7 kernel and "same"
    /// padding or stride 2 with 3x3 padding 1 or 1x1 (`Direct::new`). Where Winograd runs
    /// (`winograd`) it takes the forward pass and the input gradient, and the direct path keeps
    /// the kernel gradient.
    pub(super) fn direct<T: WithDType>(&self) -> Option<Direct> {
        if TypeId::of::<T>() != TypeId::of::<f32>()
            || (self.bf16 && !crate::bf16::available())
            || crate::paths::paths().im2col_only
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
    pub(super) fn prepare<'a, T: WithDType>(&self, k: Cow<'a, [T]>) -> Prepared<'a, T> {
        if let Some(d) = self.direct::<T>() {
            let kernel = match self.bf16 {
                // T is f32 on the direct path; the pairs are bit patterns in f32 slots
                true => Cow::Owned(f32s_into::<T>(d.kernel_bf16(f32s(&k)))),
                false => Cow::Owned(d.kernel(&k)),
            };
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

    /// How the input gradient of one image is computed. Stride 1 with a square kernel: the
    /// "full" convolution of dy with the flipped, transposed kernel, which is a forward
    /// convolution (`conv_image` of the transposed geometry, as fast as the forward pass).
    /// Strided with the direct path (f32, AVX-512, a multiple of 8 input channels): direct
    /// convolutions of dy per phase of the input (`StridedGrad`). Otherwise: cols' gradient =
    /// K^T dy, folded back with col2im.
    pub(super) fn input_grad<'a, T: WithDType>(&self, k: &'a [T]) -> InputGrad<'a, T> {
        if let Some(transposed) = self.transposed() {
            let flipped = self.flipped_kernel(k);
            return InputGrad::Transposed(transposed, transposed.prepare(Cow::Owned(flipped)));
        }
        // strided on AVX-512 (f32): a direct convolution of dy per phase of the input (in
        // bf16 the folded product, whose operands are rounded)
        let strided = self.direct::<T>().filter(|_| !self.bf16);
        if let Some(sg) = strided.and_then(|d| d.input_grad(f32s(k))) {
            return InputGrad::Strided(Box::new(sg));
        }
        InputGrad::Folded(k)
    }

    /// The convolution whose forward pass is this one's input gradient (with the flipped,
    /// transposed kernel): stride 1 with a square kernel and padding below its size.
    pub(super) fn transposed(&self) -> Option<Geometry> {
        (self.s == 1 && self.kh == self.kw && self.p < self.kh).then(|| Geometry {
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
            bf16: self.bf16,
        })
    }

    /// Whether `pass` runs the batch in one product (`batched.rs`) instead of image by image
    /// (`Paths::batched`). By default for output images under 256 pixels with at least 2^18
    /// weights (ResNet-50's 14 and 7 pixel stages), where an image's product has a few dozen
    /// columns against a kernel of megabytes, which the per-image passes pack (or the direct
    /// tiles stream) once per image: always for the kernel gradient (which then also has no
    /// partial kernels to add); for the forward pass and the input gradient only where the
    /// batch's copies (side by side, and back) cost less than the per-image products lose, as
    /// measured per layer (`benches/README.md`): output images under 64 pixels (7x7), except the
    /// pointwise forward, which reads each image in place; and the input gradient of strided
    /// 1x1 layers. Never where Winograd runs the pass (`winograd`, `winograd_kernel`) or the
    /// in-place products run, nor with `Paths::im2col_only`. A function of the shapes only.
    pub(super) fn batched(&self, pass: Pass) -> bool {
        let p = crate::paths::paths();
        let winograd = match pass {
            Pass::Kernel => self.winograd_kernel::<f32>().is_some(),
            _ => self.winograd().is_some(),
        };
        if p.im2col_only || winograd || self.implicit() {
            return false;
        }
        let small = self.l() < 64;
        match p.batched {
            Switch::Off => false,
            Switch::On => true,
            Switch::Auto if self.l() >= 256 || self.o * self.ckk() < 1 << 18 => false,
            Switch::Auto => match pass {
                Pass::Kernel => true,
                Pass::Input => small || (self.kh * self.kw == 1 && self.s > 1),
                Pass::Forward => small && !self.pointwise(),
            },
        }
    }

    /// Images per product of the batched passes: all of them, unless the unfolded images (or
    /// the output gradients side by side) would pass 2^24 values.
    pub(super) fn batch_group(&self, n: usize) -> usize {
        const LIMIT: usize = 1 << 24;
        let rows = self.ckk().max(self.o * self.kh * self.kw);
        let per_image = rows * self.l().max(self.h * self.w);
        (LIMIT / per_image.max(1)).clamp(1, n.max(1))
    }

    /// The kernel gradient's image groups: at most 16, fewer when the partial kernels would
    /// pass 16M values (ResNet-50's 512x512x3x3 at batch 16); a function of the shapes only,
    /// never of the thread count. Returns (images per group, groups).
    pub(super) fn kernel_groups(&self, n: usize) -> (usize, usize) {
        const GROUPS: usize = 16;
        let groups = GROUPS.min(((16 << 20) / (self.o * self.ckk()).max(1)).max(2));
        let group = n.div_ceil(groups).max(1);
        (group, n.div_ceil(group))
    }

    /// Values of the padded channel-last image: `(h + 2p) * wp` pixels of `c` channels, plus
    /// `kw - 1` zero pixels that the unused columns of the last output row read.
    pub(super) fn padded_len(&self) -> usize {
        (self.plane_len() + self.kw - 1) * self.c
    }
}

/// The three passes of a convolution (`Geometry::batched` chooses per pass).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pass {
    Forward,
    Input,
    Kernel,
}

/// A kernel prepared for one image's forward convolution (`Geometry::prepare`).
pub(super) struct Prepared<'a, T: Clone> {
    pub(super) path: Path,
    pub(super) kernel: Cow<'a, [T]>,
}

/// How one image's forward convolution runs.
pub(super) enum Path {
    /// im2col and one product; the kernel as it is.
    Im2col,
    /// The products read the unfolded image in place (`Geometry::implicit`); the kernel
    /// rearranged as [ky][o][c][kx].
    Implicit,
    /// The direct convolution (`direct.rs`); the kernel in its tiles.
    Direct(Box<Direct>),
}

/// One image's input gradient (`Geometry::input_grad`): the forward convolution of the
/// transposed geometry with the flipped kernel, or the transposed product folded back with
/// col2im.
pub(super) enum InputGrad<'a, T: Clone> {
    Transposed(Geometry, Prepared<'a, T>),
    Folded(&'a [T]),
    /// Strided on AVX-512 (f32): direct convolutions of dy per phase of the input.
    Strided(Box<StridedGrad>),
}

/// The view `v` of f32 values (T is f32 wherever the bf16 products run: `check_bf16`).
pub(super) fn f32_mat<T: WithDType>(v: Mat<'_, T>) -> Mat<'_, f32> {
    Mat {
        data: f32s(v.data),
        rs: v.rs,
        cs: v.cs,
    }
}

pub(super) use crate::{f32s, f32s_into, f32s_mut};
