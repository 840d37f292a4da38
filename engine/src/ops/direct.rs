//! Direct convolution for stride-1 "same" convolutions (3x3, 5x5 or 7x7 kernel, padding `k / 2`)
//! in f32 on CPUs with AVX-512 (F and VL): no im2col, no padded copy per kernel column, no
//! product that packs its operands again. Each image is copied once into planes with zero
//! margins above and below (a batch norm + ReLU prologue applied on the way).
//!
//! - Forward (and the input gradient, the forward of the transposed geometry): a tile of the
//!   output, 16 to 48 consecutive pixels of the flattened image by 8 output channels, is summed
//!   in 24 vector registers over every input channel and kernel tap; each tap is one masked load
//!   of the plane shifted by `(ky - p) * w + (kx - p)` and 8 broadcast weights. The margins make
//!   the rows above and below the image read zero; the mask zeroes the lanes whose column
//!   wrapped around the row's edge, and the pixels past the image's end.
//! - Kernel gradient (3x3): for 8 output channels, one input channel and one kernel row, 24
//!   vector sums (3 kernel columns by 8 channels) run over the pixels of a pass of images, the
//!   3 shifted pixel vectors held and each output-gradient vector loaded once; the lanes are
//!   added at the end of each pass. Passes and groups are fixed by the shapes, so the result
//!   does not depend on the thread count.
//!
//! Both run at about 225 GFLOP/s per core in a ResNet-20 step (the `gemm` crate's best product
//! is about 240), where im2col and the product's own repacking of it cost about a fifth of the
//! convolutions' time. `RECIPE_DIRECT=0` turns the direct convolution off (for comparisons).

use candle_core::WithDType;

/// Output channels per tile (the broadcast weights of one tap).
pub(super) const NK: usize = 8;
/// f32 lanes of one vector.
const LANES: usize = 16;

/// One image's direct convolution: `c` input channels of `h x w`, `o` output channels (a
/// multiple of `NK`), an odd `k x k` kernel with padding `k / 2`, stride 1.
#[derive(Debug, Clone, Copy)]
pub(super) struct Direct {
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    k: usize,
}

impl Direct {
    /// The direct convolution of this shape, where it applies: f32 (the caller's check), an
    /// AVX-512 CPU, stride 1, a 3x3, 5x5 or 7x7 kernel with "same" padding, and a multiple of 8
    /// output channels.
    pub(super) fn new(
        (c, h, w, o): (usize, usize, usize, usize),
        (kh, kw, s, p): (usize, usize, usize, usize),
    ) -> Option<Self> {
        let fits = s == 1 && kh == kw && matches!(kh, 3 | 5 | 7) && p == kh / 2 && o % NK == 0;
        (fits && available() && c > 0 && h * w > 0).then_some(Direct { c, h, w, o, k: kh })
    }

    fn l(&self) -> usize {
        self.h * self.w
    }
    /// Zero values before and after each plane: every tap's shift stays inside them.
    fn margin(&self) -> usize {
        let p = self.k / 2;
        p * self.w + p
    }
    /// Values between the starts of two planes of the copy.
    fn stride(&self) -> usize {
        self.l() + 2 * self.margin()
    }
    fn vectors(&self) -> usize {
        self.l().div_ceil(LANES)
    }

    /// Values of the image copy `pad` writes (one vector of slack after the last plane, where
    /// the last vector's masked-off lanes point).
    pub(super) fn buf_len(&self) -> usize {
        self.c * self.stride() + LANES
    }

    /// The kernel [O, C, K, K] laid out as the tiles read it: [O / 8][C][K * K][8].
    pub(super) fn kernel<T: Copy>(&self, k: &[T]) -> Vec<T> {
        let (c, kk) = (self.c, self.k * self.k);
        let mut out = Vec::with_capacity(k.len());
        for kb in 0..self.o / NK {
            for ci in 0..c {
                for t in 0..kk {
                    for j in 0..NK {
                        out.push(k[((kb * NK + j) * c + ci) * kk + t]);
                    }
                }
            }
        }
        out
    }

    /// The load masks, `[vector][kx]`: lane i of vector v (pixel `q = 16 v + i`) is read for
    /// kernel column `kx` when `q` is a pixel and its column `q % w + kx - p` lies in the row.
    pub(super) fn masks(&self) -> Vec<u16> {
        let (l, w, p) = (self.l(), self.w, self.k / 2);
        let mut m = vec![0u16; self.vectors() * self.k];
        for v in 0..self.vectors() {
            for kx in 0..self.k {
                for i in 0..LANES {
                    let q = v * LANES + i;
                    let x = (q % w + kx) as isize - p as isize;
                    if q < l && (0..w as isize).contains(&x) {
                        m[v * self.k + kx] |= 1 << i;
                    }
                }
            }
        }
        m
    }

    /// Writes one image [C, H, W] into `buf` (`buf_len()` values): plane `ci` at
    /// `ci * stride() + margin()`, zero margins around it, each value through `map(ci, v)`.
    pub(super) fn pad<T: WithDType>(&self, img: &[T], buf: &mut [T], map: impl Fn(usize, T) -> T) {
        let (l, m, s) = (self.l(), self.margin(), self.stride());
        let zero = T::zero();
        for (ci, plane) in buf[..self.c * s].chunks_exact_mut(s).enumerate() {
            plane[..m].fill(zero);
            plane[m + l..].fill(zero);
            for (d, &v) in plane[m..m + l].iter_mut().zip(&img[ci * l..][..l]) {
                *d = map(ci, v);
            }
        }
        buf[self.c * s..].fill(zero);
    }

    /// The convolution of one image from its copy `buf` (`pad`) with a kernel from `kernel`,
    /// into `y` [O, H*W]; `masks` from `masks`.
    pub(super) fn run(&self, kernel: &[f32], masks: &[u16], buf: &[f32], y: &mut [f32]) {
        let (kk, l) = (self.k * self.k, self.l());
        assert!(
            kernel.len() == self.o * self.c * kk
                && masks.len() == self.vectors() * self.k
                && buf.len() >= self.buf_len()
                && y.len() >= self.o * l,
            "direct convolution: operands do not match the shape {self:?}"
        );
        // tiles of 3 vectors; a remainder of 1 as two tiles of 2 (a tile of 1 is load-bound)
        let nv = self.vectors();
        let mut tiles: Vec<(usize, usize)> = Vec::with_capacity(nv / 3 + 2);
        let mut v = 0;
        while v < nv {
            let take = match nv - v {
                r if r >= 5 || r == 3 => 3,
                4 => 2,
                r => r,
            };
            tiles.push((v, take));
            v += take;
        }
        for kb in 0..self.o / NK {
            let wk = &kernel[kb * self.c * kk * NK..][..self.c * kk * NK];
            for &(v0, nvec) in &tiles {
                let tile = Tile {
                    c: self.c,
                    k: self.k,
                    w: self.w,
                    stride: self.stride(),
                    wk,
                    masks: &masks[v0 * self.k..],
                };
                let x = &buf[self.margin() + v0 * LANES..];
                let y = &mut y[kb * NK * l + v0 * LANES..];
                // SAFETY: `available()` held when `new` built this shape (AVX-512F); the
                // assertion above keeps every unmasked load inside `buf` (planes plus margins
                // plus one vector of slack) and every unmasked store inside `y`.
                unsafe {
                    match nvec {
                        3 => tile.run::<3>(x, y, l),
                        2 => tile.run::<2>(x, y, l),
                        _ => tile.run::<1>(x, y, l),
                    }
                }
            }
        }
    }

    /// Whether `kernel_grad` takes this shape (3x3 kernels: its 24 sums, 3 kernel columns by 8
    /// output channels, and the 3 loaded pixel vectors fill the registers).
    pub(super) fn has_kernel_grad(&self) -> bool {
        self.k == 3
    }

    /// The kernel gradient of `images` images, `out` [O / 8][C][K * K][8] (overwritten):
    /// `Σ_img Σ_q dy[img][o][q] x_img[c][q + (ky - p) w + kx - p]`, from their copies `xbuf`
    /// (`pad`, one `buf_len()` after the other) and their output gradients `dy` [images, O,
    /// H*W]. Each sum runs over passes of images in order (as many as keep a pass's output
    /// gradients in L1), 16 lanes of pixels at a time, its lanes added at the end of each pass:
    /// the result depends on the shapes only.
    pub(super) fn kernel_grad(
        &self,
        masks: &[u16],
        xbuf: &[f32],
        images: usize,
        dy: &[f32],
        out: &mut [f32],
    ) {
        let (c, k, l) = (self.c, self.k, self.l());
        assert!(
            self.has_kernel_grad()
                && masks.len() == self.vectors() * k
                && xbuf.len() >= images * self.buf_len()
                && dy.len() >= images * self.o * l
                && out.len() == self.o * c * k * k,
            "direct kernel gradient: operands do not match the shape {self:?}"
        );
        let p = k / 2;
        // images per pass: the 8 channels' output gradients of a pass, read again for every
        // input channel and kernel row, stay within 32 KB (the L1 cache)
        let chunk = (1024 / l).clamp(1, images.max(1));
        for first in (0..images).step_by(chunk) {
            let count = chunk.min(images - first);
            for kb in 0..self.o / NK {
                for ci in 0..c {
                    for ky in 0..k {
                        // where kernel row ky reads in image `first`'s plane ci, column 0
                        let x = first * self.buf_len()
                            + ci * self.stride()
                            + self.margin()
                            + ky * self.w
                            - p * self.w
                            - p;
                        let row = GradRow {
                            x: &xbuf[x..],
                            image: self.buf_len(),
                            dy: &dy[first * self.o * l + kb * NK * l..],
                            dy_image: self.o * l,
                            l,
                            images: count,
                            masks,
                        };
                        let at = ((kb * c + ci) * k + ky) * k * NK;
                        // SAFETY: `available()` held when `new` built this shape (AVX-512F);
                        // the assertion above keeps every unmasked load inside `xbuf` and `dy`.
                        unsafe { row.run(&mut out[at..at + k * NK], first > 0) };
                    }
                }
            }
        }
    }
}

/// One kernel row's gradient for 8 output channels, summed over a group of images.
struct GradRow<'a> {
    /// Image 0's plane at the tap (ky, 0); image i at `i * image` after it.
    x: &'a [f32],
    image: usize,
    /// Image 0's output gradient for the first of the 8 channels; image i at `i * dy_image`.
    dy: &'a [f32],
    dy_image: usize,
    l: usize,
    images: usize,
    /// `[vector][kx]`, from `Direct::masks`.
    masks: &'a [u16],
}

impl GradRow<'_> {
    /// `out[kx * 8 + j] (+)= Σ_img Σ_q dy[img][j][q] x[img][q + kx]` over the masked lanes: 24
    /// vector sums (3 columns by 8 channels) and the 3 pixel vectors of one position in
    /// registers, each output gradient vector loaded once per position.
    ///
    /// # Safety
    /// The CPU has AVX-512F and VL; the kernel is 3x3 (`masks` is `[vector][3]`); every load
    /// unmasked by `masks` is in bounds (`Direct::kernel_grad`'s assertion).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl")]
    unsafe fn run(&self, out: &mut [f32], add: bool) {
        use std::arch::x86_64::*;
        const K: usize = 3;
        let nv = self.l.div_ceil(LANES);
        // sum (kx, j) at 3 j + kx; every index a constant (the loops over channels written out
        // by hand: an index that is not a constant keeps all the sums on the stack)
        let mut acc = [_mm512_setzero_ps(); K * NK];
        let l = self.l;
        for img in 0..self.images {
            let xi = self.x.as_ptr().add(img * self.image);
            let di = self.dy.as_ptr().add(img * self.dy_image);
            for v in 0..nv {
                let m = self.masks.as_ptr().add(v * K);
                let at = v * LANES;
                let x0 = _mm512_maskz_loadu_ps(*m, xi.add(at));
                let x1 = _mm512_maskz_loadu_ps(*m.add(1), xi.add(at + 1));
                let x2 = _mm512_maskz_loadu_ps(*m.add(2), xi.add(at + 2));
                // the centre column's mask is the pixels of the vector
                let keep = *m.add(1);
                macro_rules! channel {
                    ($($j:literal)*) => {$(
                        let d = _mm512_maskz_loadu_ps(keep, di.add($j * l + at));
                        acc[3 * $j] = _mm512_fmadd_ps(x0, d, acc[3 * $j]);
                        acc[3 * $j + 1] = _mm512_fmadd_ps(x1, d, acc[3 * $j + 1]);
                        acc[3 * $j + 2] = _mm512_fmadd_ps(x2, d, acc[3 * $j + 2]);
                    )*};
                }
                channel!(0 1 2 3 4 5 6 7);
            }
        }
        // constant indices here too: one loop indexing `acc` and the sums live on the stack
        macro_rules! reduce {
            ($($i:literal)*) => {$(
                let sum = _mm512_reduce_add_ps(acc[$i]);
                let o = &mut out[($i % K) * NK + $i / K];
                *o = if add { *o + sum } else { sum };
            )*};
        }
        reduce!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23);
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn run(&self, _out: &mut [f32], _add: bool) {
        unreachable!("the direct convolution is built only for x86_64 (`available()`)")
    }
}

/// The operands of one tile (8 output channels by 1 to 3 vectors of pixels).
struct Tile<'a> {
    c: usize,
    k: usize,
    w: usize,
    stride: usize,
    /// This block's kernel, [C][K * K][8].
    wk: &'a [f32],
    /// The masks from the tile's first vector on, [vector][kx].
    masks: &'a [u16],
}

/// Whether the CPU runs the AVX-512 tiles (`RECIPE_DIRECT=0` turns them off, for comparisons).
fn available() -> bool {
    use std::sync::OnceLock;
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let off = std::env::var("RECIPE_DIRECT").as_deref() == Ok("0");
        #[cfg(target_arch = "x86_64")]
        let cpu = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl");
        #[cfg(not(target_arch = "x86_64"))]
        let cpu = false;
        cpu && !off
    })
}

impl Tile<'_> {
    /// `run_k` for this tile's kernel size.
    ///
    /// # Safety
    /// As `run_k`.
    unsafe fn run<const NV: usize>(&self, x: &[f32], y: &mut [f32], l: usize) {
        match self.k {
            3 => self.run_k::<NV, 3>(x, y, l),
            5 => self.run_k::<NV, 5>(x, y, l),
            _ => self.run_k::<NV, 7>(x, y, l),
        }
    }

    /// `y[j * l + 16 v + i] = Σ_ci Σ_(ky,kx) wk[ci][ky K + kx][j] x[ci * stride + 16 v + i +
    /// (ky - p) w + kx - p]` over the tile's NV vectors (masked lanes read as zero and are not
    /// stored); the taps unrolled for the kernel size K.
    ///
    /// # Safety
    /// The CPU has AVX-512F and VL; `self.k == K`; `masks` holds NV * K values and `wk`
    /// C * K * K * 8; for every vector v < NV and lane i unmasked by `masks`, the loads (for
    /// every ci < c and tap) and the stores `y[j * l + 16 v + i]` (j < 8) are in bounds.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl")]
    // index loops over constant ranges: unrolled, every index of `acc` is a constant and the
    // sums stay in registers
    #[allow(clippy::needless_range_loop)]
    unsafe fn run_k<const NV: usize, const K: usize>(&self, x: &[f32], y: &mut [f32], l: usize) {
        use std::arch::x86_64::*;
        let p = K / 2;
        let w = self.w as isize;
        let mut acc = [[_mm512_setzero_ps(); NK]; NV];
        let mut mask = [[0u16; K]; NV];
        for (v, m) in mask.iter_mut().enumerate() {
            m.copy_from_slice(&self.masks[v * K..][..K]);
        }
        let xp = x.as_ptr();
        let mut wp = self.wk.as_ptr();
        for ci in 0..self.c {
            let xc = xp.add(ci * self.stride);
            for ky in 0..K {
                let row = xc.offset((ky as isize - p as isize) * w - p as isize);
                for kx in 0..K {
                    let src = row.add(kx);
                    let mut xv = [_mm512_setzero_ps(); NV];
                    for (v, xv) in xv.iter_mut().enumerate() {
                        *xv = _mm512_maskz_loadu_ps(mask[v][kx], src.add(v * LANES));
                    }
                    for j in 0..NK {
                        let b = _mm512_set1_ps(*wp.add(j));
                        for v in 0..NV {
                            acc[v][j] = _mm512_fmadd_ps(xv[v], b, acc[v][j]);
                        }
                    }
                    wp = wp.add(NK);
                }
            }
        }
        let yp = y.as_mut_ptr();
        for (v, acc) in acc.iter().enumerate() {
            // the centre column's mask is the pixels of the vector
            for (j, a) in acc.iter().enumerate() {
                _mm512_mask_storeu_ps(yp.add(j * l + v * LANES), mask[v][p], *a);
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn run_k<const NV: usize, const K: usize>(&self, _x: &[f32], _y: &mut [f32], _l: usize) {
        unreachable!("the direct convolution is built only for x86_64 (`available()`)")
    }
}
