//! Direct convolution in f32 on CPUs with AVX-512 (F and VL) for stride-1 "same" convolutions
//! (3x3, 5x5 or 7x7 kernel, padding `k / 2`) and stride-2 downsampling (3x3 with padding 1, 1x1
//! without): no im2col, no padded copy per kernel column, no product that packs its operands
//! again. Each image is copied once into planes with zero margins above and below (a batch norm +
//! ReLU prologue applied on the way); a strided image is split once into its phase planes (every
//! other row and column), whose rows are as wide as the output's, so every tap is again one
//! shifted read of one plane.
//!
//! - Forward (and the stride-1 input gradient, the forward of the transposed geometry): a tile of
//!   the output, 16 to 48 consecutive pixels of the flattened image by 8 output channels, is
//!   summed in 24 vector registers over every input channel and kernel tap; each tap is one
//!   masked load of a plane shifted by `dy * w + dx` and 8 broadcast weights. The margins make
//!   the rows above and below the image read zero; the mask zeroes the lanes whose column
//!   wrapped around the row's edge, and the pixels past the image's end.
//! - Strided input gradient (`StridedGrad`): for each phase of the input, the taps that land
//!   there make a stride-1 convolution of dy, written into that phase's plane with the same
//!   tiles; the planes are then interleaved into the image.
//! - Kernel gradient (3x3): for 8 output channels, one input channel and one kernel row, 24
//!   vector sums (3 kernel columns by 8 channels) run over the pixels of a pass of images, the
//!   3 shifted pixel vectors held and each output-gradient vector loaded once; the lanes are
//!   added at the end of each pass. Passes and groups are fixed by the shapes, so the result
//!   does not depend on the thread count.
//!
//! Against the machine's best matrix product, the stride-1 layers run at about the product's
//! rate (`cargo bench -p recipe-kernels --bench kernels -- conv/`; figures in `benches/README.md`),
//! because im2col and the product's own repacking of it, which this path drops, cost about a
//! fifth of the convolutions' time.
//! `Paths::direct` (`RECIPE_DIRECT=0`) turns the direct convolution off, for comparisons.
//!
//! bf16 (`precision: amp_bf16`, AVX512-BF16): the same tiles on bf16 pairs. Forward: the copy
//! is rounded into planes of channel pairs (one 32-bit value per pixel, `Direct::pairs`) and the
//! kernel into pairs of weights (`Direct::kernel_bf16`); each VDPBF16PS adds two channels'
//! products into the f32 sums, so half the instructions. Kernel gradient: bf16 copies of the
//! padded images and of the output gradient, 32-pixel vectors whose neighbouring pixels are the
//! pairs (`GradRow::run_bf16`). The masks are the f32 tiles' (two of them make a 32-pixel mask).

use super::layout::{gather_every, interleave_phases};
use candle_core::WithDType;

/// Output channels per tile (the broadcast weights of one tap).
pub(super) const NK: usize = 8;
/// f32 lanes of one vector.
const LANES: usize = 16;

/// One image's direct convolution: `c` input channels of `h x w`, `o` output channels (a
/// multiple of `NK`), a `k x k` kernel, stride `s`, padding `p`. For stride 2 the image is split
/// into its phase planes (every other row and column, `ph x pw`), whose rows are as wide as the
/// output's, so every tap is again one shifted read of one plane.
#[derive(Debug, Clone)]
pub(super) struct Direct {
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    k: usize,
    s: usize,
    p: usize,
    ph: usize,
    pw: usize,
    oh: usize,
    /// `margin()`, and the smallest column shift and the number of distinct ones
    /// (`dx_range()`), kept from `new`.
    margin: usize,
    dx: (isize, usize),
    /// The load masks (`lane_masks`), built by `new` with the shape: the tiles' reads are in
    /// bounds because of them, so they are never taken from outside.
    masks: Vec<u16>,
    /// The taps in kernel order; for stride 2 also each tap's offset from its channel's first
    /// plane of the copy (margin included) and its mask column; the output tiles (`tiles`).
    /// Built once by `new`, not per image.
    taps: Vec<Tap>,
    strided: Vec<(usize, usize)>,
    /// `strided` for the bf16 pairs' copy (`pairs`): planes of channel pairs.
    strided_pairs: Vec<(usize, usize)>,
    plan: Vec<(usize, usize)>,
}

/// The load masks of `l` output pixels in rows of `pw`, `[vector][column shift]` for the
/// shifts `lo..lo + cols` (`dx`): lane i of vector v (pixel `q = 16 v + i`) is read at shift
/// `dx` when `q` is a pixel and its column `q % pw + dx` lies in the row.
fn lane_masks(l: usize, pw: usize, (lo, cols): (isize, usize)) -> Vec<u16> {
    let mut m = vec![0u16; l.div_ceil(LANES) * cols];
    for (v, vm) in m.chunks_exact_mut(cols).enumerate() {
        for (col, mask) in vm.iter_mut().enumerate() {
            for i in 0..LANES {
                let q = v * LANES + i;
                let x = (q % pw) as isize + lo + col as isize;
                if q < l && (0..pw as isize).contains(&x) {
                    *mask |= 1 << i;
                }
            }
        }
    }
    m
}

/// Output tiles of up to 3 vectors over `nv` vectors, as (first vector, vectors); a remainder
/// of 1 as two tiles of 2 (a tile of 1 is load-bound).
fn tiles(nv: usize) -> Vec<(usize, usize)> {
    let mut tiles = Vec::with_capacity(nv / 3 + 2);
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
    tiles
}

/// Where one kernel tap reads: phase plane `a * s + b`, shifted by `(dy, dx)` in it.
#[derive(Debug, Clone, Copy)]
struct Tap {
    phase: usize,
    dy: isize,
    dx: isize,
}

impl Tap {
    /// Where the tap reads output pixel 0 in a plane with `margin` zeros before it and rows of
    /// `pw` (never before the plane's margin).
    fn at(&self, margin: usize, pw: usize) -> usize {
        (margin as isize + self.dy * pw as isize + self.dx) as usize
    }
}

impl Direct {
    /// The direct convolution of this shape, where it applies: f32 (the caller's check), an
    /// AVX-512 CPU, a multiple of 8 output channels, and either stride 1 with a 3x3, 5x5 or 7x7
    /// kernel and "same" padding, or stride 2 with a 3x3 kernel and padding 1 or a 1x1 kernel
    /// and none (ResNet downsampling), where the output is as wide as the phase planes.
    pub(super) fn new(
        (c, h, w, o): (usize, usize, usize, usize),
        (kh, kw, s, p): (usize, usize, usize, usize),
    ) -> Option<Self> {
        let kernel = kh == kw
            && match s {
                1 => matches!(kh, 3 | 5 | 7) && p == kh / 2,
                2 => (kh == 3 && p == 1) || (kh == 1 && p == 0),
                _ => false,
            };
        if !kernel
            || !o.is_multiple_of(NK)
            || c == 0
            || h * w == 0
            || h + 2 * p < kh
            || w + 2 * p < kw
        {
            return None;
        }
        let (oh, ow) = ((h + 2 * p - kh) / s + 1, (w + 2 * p - kw) / s + 1);
        let (ph, pw) = (h.div_ceil(s), w.div_ceil(s));
        let mut d = Direct {
            c,
            h,
            w,
            o,
            k: kh,
            s,
            p,
            ph,
            pw,
            oh,
            margin: 0,
            dx: (0, 0),
            masks: Vec::new(),
            taps: Vec::new(),
            strided: Vec::new(),
            strided_pairs: Vec::new(),
            plan: Vec::new(),
        };
        d.taps = (0..kh * kw)
            .map(|t| {
                let ((a, dy), (b, dx)) = (d.tap1(t / kw), d.tap1(t % kw));
                Tap {
                    phase: a * s + b,
                    dy,
                    dx,
                }
            })
            .collect();
        let max = |f: fn(&Tap) -> isize| d.taps.iter().map(|t| f(t).unsigned_abs()).max();
        d.margin = max(|t| t.dy).unwrap_or(0) * pw + max(|t| t.dx).unwrap_or(0);
        let dx: Vec<isize> = (0..kw).map(|kx| d.tap1(kx).1).collect();
        let (lo, hi) = (dx.iter().min().copied(), dx.iter().max().copied());
        d.dx = (
            lo.unwrap_or(0),
            (hi.unwrap_or(0) - lo.unwrap_or(0) + 1) as usize,
        );
        d.masks = lane_masks(d.l(), pw, d.dx);
        d.plan = tiles(d.vectors());
        if s > 1 {
            let (stride, lo) = (d.stride(), d.dx.0);
            let offsets = |channels: usize| {
                (d.taps.iter())
                    .map(|t| {
                        let plane = t.phase * channels * stride;
                        (plane + t.at(d.margin, pw), (t.dx - lo) as usize)
                    })
                    .collect()
            };
            d.strided = offsets(c);
            d.strided_pairs = offsets(c.div_ceil(2));
        }
        // always so for the kernels above; flat indexing of the output rows rests on it
        (ow == pw && oh <= ph && available()).then_some(d)
    }

    /// Output pixels.
    fn l(&self) -> usize {
        self.oh * self.pw
    }
    /// Phase plane (row or column) and offset from the output position that kernel row or
    /// column `k` reads.
    fn tap1(&self, k: usize) -> (usize, isize) {
        let (t, s) = (k as isize - self.p as isize, self.s as isize);
        (t.rem_euclid(s) as usize, t.div_euclid(s))
    }
    /// The taps in kernel order (`ky * k + kx`).
    fn taps(&self) -> &[Tap] {
        &self.taps
    }
    /// The smallest column shift and the number of distinct ones (the columns of the masks).
    fn dx_range(&self) -> (isize, usize) {
        self.dx
    }
    /// The mask column of shift 0 (the output's own pixels).
    fn keep(&self) -> usize {
        (-self.dx.0) as usize
    }
    /// Zero values before and after each plane: every tap's shift stays inside them.
    fn margin(&self) -> usize {
        self.margin
    }
    /// Values between the starts of two planes of the copy.
    fn stride(&self) -> usize {
        self.ph * self.pw + 2 * self.margin()
    }
    fn vectors(&self) -> usize {
        self.l().div_ceil(LANES)
    }

    /// Values of the image copy `pad` writes (one vector of slack after the last plane, where
    /// the last vector's masked-off lanes point).
    pub(super) fn buf_len(&self) -> usize {
        self.s * self.s * self.c * self.stride() + LANES
    }

    /// Values of the bf16 pairs' copy `pairs` writes.
    pub(super) fn pairs_len(&self) -> usize {
        self.s * self.s * self.c.div_ceil(2) * self.stride() + LANES
    }

    /// The copy `buf` (`pad`) as bf16 pairs of channels for the bf16 tiles: channels 2i and
    /// 2i + 1 (zero past the last) of each phase rounded to bf16 and packed into one 32-bit
    /// value per pixel (`crate::bf16::pairs_into`), plane `phase * ceil(C / 2) + i` at
    /// `(phase * ceil(C / 2) + i) * stride()`; the margins stay zero.
    pub(super) fn pairs(&self, buf: &[f32], out: &mut [f32]) {
        let (c, stride, cp) = (self.c, self.stride(), self.c.div_ceil(2));
        let taps = self.taps();
        for phase in 0..self.s * self.s {
            if !taps.iter().any(|t| t.phase == phase) {
                continue;
            }
            for i in 0..cp {
                let plane = |ci: usize| &buf[(phase * c + ci) * stride..][..stride];
                let hi = (2 * i + 1 < c).then(|| plane(2 * i + 1));
                let dst = &mut out[(phase * cp + i) * stride..][..stride];
                crate::bf16::pairs_into(plane(2 * i), hi, dst);
            }
        }
        out[self.s * self.s * cp * stride..].fill(0.0);
    }

    /// The kernel [O, C, K, K] for the bf16 tiles: [O / 8][ceil(C / 2)][K * K][8] bf16 pairs of
    /// input channels (`pairs`' layout; zero past the last channel).
    pub(super) fn kernel_bf16(&self, k: &[f32]) -> Vec<f32> {
        let (c, kk) = (self.c, self.k * self.k);
        let at = |o: usize, ci: usize, t: usize| {
            if ci < c {
                k[(o * c + ci) * kk + t]
            } else {
                0.0
            }
        };
        let mut out = Vec::with_capacity(self.o * c.div_ceil(2) * kk);
        for kb in 0..self.o / NK {
            for i in 0..c.div_ceil(2) {
                for t in 0..kk {
                    for j in 0..NK {
                        let o = kb * NK + j;
                        out.push(crate::bf16::pair(at(o, 2 * i, t), at(o, 2 * i + 1, t)));
                    }
                }
            }
        }
        out
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

    /// Writes one image [C, H, W] into `buf` (`buf_len()` values): the plane of phase
    /// `a * s + b` and channel `ci` at `((a * s + b) * C + ci) * stride() + margin()` (for
    /// stride 1 the image's own planes), zero margins and zero past the image, each value
    /// through `map(ci, v)`; phases no tap reads are left as they are.
    pub(super) fn pad<T: WithDType>(&self, img: &[T], buf: &mut [T], map: impl Fn(usize, T) -> T) {
        let (c, h, w, s) = (self.c, self.h, self.w, self.s);
        let (m, stride, plane) = (self.margin(), self.stride(), self.ph * self.pw);
        let zero = T::zero();
        let taps = self.taps();
        for phase in 0..s * s {
            if !taps.iter().any(|t| t.phase == phase) {
                continue;
            }
            let (a, b) = (phase / s, phase % s);
            let count = (w - b.min(w)).div_ceil(s);
            for ci in 0..c {
                let dst = &mut buf[(phase * c + ci) * stride..][..stride];
                dst[..m].fill(zero);
                dst[m + plane..].fill(zero);
                let src = &img[ci * h * w..][..h * w];
                if s == 1 {
                    for (d, &v) in dst[m..m + plane].iter_mut().zip(src) {
                        *d = map(ci, v);
                    }
                    continue;
                }
                for (i, row) in dst[m..m + plane].chunks_exact_mut(self.pw).enumerate() {
                    let y = i * s + a;
                    if y >= h {
                        row.fill(zero);
                        continue;
                    }
                    // every s-th value through pairs (vector shuffles, not scalar gathers)
                    gather_every(&src[y * w + b.min(w)..(y + 1) * w], s, &mut row[..count]);
                    row[..count].iter_mut().for_each(|v| *v = map(ci, *v));
                    row[count..].fill(zero);
                }
            }
        }
        buf[s * s * c * stride..].fill(zero);
    }

    /// The convolution of one image from its copy `buf` (`pad`) with a kernel from `kernel`,
    /// into `y` [O, OH*OW].
    pub(super) fn run(&self, kernel: &[f32], buf: &[f32], y: &mut [f32]) {
        self.run_on(kernel, buf, y, false)
    }

    /// `run` in bf16: the copy from `pairs`, the kernel from `kernel_bf16`; the sums f32.
    pub(super) fn run_bf16(&self, kernel: &[f32], pairs: &[f32], y: &mut [f32]) {
        assert!(
            crate::bf16::available(),
            "bf16 direct convolution without AVX512-BF16"
        );
        self.run_on(kernel, pairs, y, true)
    }

    fn run_on(&self, kernel: &[f32], buf: &[f32], y: &mut [f32], bf16: bool) {
        let (kk, l, cols) = (self.k * self.k, self.l(), self.dx_range().1);
        let (c, len, taps) = match bf16 {
            true => (self.c.div_ceil(2), self.pairs_len(), &self.strided_pairs),
            false => (self.c, self.buf_len(), &self.strided),
        };
        assert!(
            kernel.len() == self.o * c * kk && buf.len() >= len && y.len() >= self.o * l,
            "direct convolution: operands do not match the shape {self:?}"
        );
        let (masks, stride) = (&self.masks, self.stride());
        for kb in 0..self.o / NK {
            let wk = &kernel[kb * c * kk * NK..][..c * kk * NK];
            for &(v0, nvec) in &self.plan {
                let tile = Tile {
                    c,
                    bf16,
                    k: self.k,
                    w: self.pw,
                    stride,
                    wk,
                    masks: &masks[v0 * cols..],
                    cols,
                    keep: self.keep(),
                    taps,
                };
                let y = &mut y[kb * NK * l + v0 * LANES..];
                // SAFETY: `available()` held when `new` built this shape (AVX-512 F and VL);
                // with the shape's own masks, the assertion above keeps every unmasked load
                // inside `buf` (planes plus margins plus one vector of slack) and every
                // unmasked store inside `y`.
                unsafe {
                    if self.s == 1 {
                        // the whole copy, the tile's first pixel at `origin` (the taps read
                        // up to a margin before it)
                        let origin = self.margin() + v0 * LANES;
                        match nvec {
                            3 => tile.run::<3>(buf, origin, y, l),
                            2 => tile.run::<2>(buf, origin, y, l),
                            _ => tile.run::<1>(buf, origin, y, l),
                        }
                    } else {
                        let x = &buf[v0 * LANES..];
                        match nvec {
                            3 => tile.run_taps::<3>(x, y, l),
                            2 => tile.run_taps::<2>(x, y, l),
                            _ => tile.run_taps::<1>(x, y, l),
                        }
                    }
                }
            }
        }
    }

    /// The input gradient of this strided convolution as direct convolutions per phase
    /// (`StridedGrad`), for a kernel [O, C, K, K]; stride 1 (the transposed forward) and input
    /// channels not a multiple of 8 have none.
    pub(super) fn input_grad(&self, kernel: &[f32]) -> Option<StridedGrad> {
        if self.s == 1 || !self.c.is_multiple_of(NK) {
            return None;
        }
        let (s, p, k, o, c) = (self.s as isize, self.p as isize, self.k, self.o, self.c);
        // input row a * s + Y receives kernel row ky from output row Y + (a + p - ky) / s
        let shift = |a: usize, kt: usize| {
            let t = a as isize + p - kt as isize;
            (t.rem_euclid(s) == 0).then_some(t.div_euclid(s))
        };
        let mut taps = vec![Vec::new(); self.s * self.s];
        for (phase, list) in taps.iter_mut().enumerate() {
            let (a, b) = (phase / self.s, phase % self.s);
            for ky in 0..k {
                for kx in 0..k {
                    if let (Some(dy), Some(dx)) = (shift(a, ky), shift(b, kx)) {
                        list.push((ky * k + kx, dy, dx));
                    }
                }
            }
        }
        let all = taps.iter().flatten();
        let max_dy = all.clone().map(|t| t.1.unsigned_abs()).max().unwrap_or(0);
        let max_dx = all.clone().map(|t| t.2.unsigned_abs()).max().unwrap_or(0);
        let lo = all.clone().map(|t| t.2).min().unwrap_or(0).min(0);
        let hi = all.map(|t| t.2).max().unwrap_or(0).max(0);
        let cols = (hi - lo + 1) as usize;
        // (ph - oh is 0 for the kernels `new` takes; kept so a taller phase plane reads zeros)
        let margin = (max_dy + self.ph - self.oh) * self.pw + max_dx;
        let (lp, pw) = (self.ph * self.pw, self.pw as isize);
        let masks = lane_masks(lp, self.pw, (lo, cols));
        let phases = taps
            .iter()
            .map(|list| {
                let at = list
                    .iter()
                    .map(|&(_, dy, dx)| {
                        (
                            (margin as isize + dy * pw + dx) as usize,
                            (dx - lo) as usize,
                        )
                    })
                    .collect();
                let mut wk = Vec::with_capacity(c * o * list.len());
                for cb in 0..c / NK {
                    for ki in 0..o {
                        for &(t, _, _) in list {
                            for j in 0..NK {
                                wk.push(kernel[(ki * c + cb * NK + j) * k * k + t]);
                            }
                        }
                    }
                }
                (at, wk)
            })
            .collect();
        Some(StridedGrad {
            d: self.clone(),
            phases,
            margin,
            lo,
            masks,
            cols,
            plan: tiles(lp.div_ceil(LANES)),
        })
    }

    /// Whether `kernel_grad` takes this shape (3x3 kernels: its 24 sums, 3 kernel columns by 8
    /// output channels, and the 3 loaded pixel vectors fill the registers).
    pub(super) fn has_kernel_grad(&self) -> bool {
        self.k == 3
    }

    /// The kernel gradient of `images` images, `out` [O / 8][C][K * K][8] (overwritten):
    /// `Σ_img Σ_q dy[img][o][q] x_img[c][tap (ky, kx) of q]`, from their copies `xbuf` (`pad`,
    /// one `buf_len()` after the other) and their output gradients `dy` [images, O, OH*OW].
    /// Each sum runs over passes of images in order (as many as keep a pass's output gradients
    /// in L1), 16 lanes of pixels at a time, its lanes added at the end of each pass: the result
    /// depends on the shapes only.
    pub(super) fn kernel_grad(&self, xbuf: &[f32], images: usize, dy: &[f32], out: &mut [f32]) {
        // SAFETY (of the rows' run): `available()` held when `new` built this shape (AVX-512 F
        // and VL); `kernel_grad_rows` checks the operands against the shape.
        self.kernel_grad_rows(xbuf, images, dy, out, |row, out, add| unsafe {
            row.run(out, add)
        })
    }

    /// `kernel_grad` on bf16 copies (`crate::bf16::to_bf16`) of the padded images `xbuf` and of
    /// the output gradient `dy`: the products in bf16, the sums in f32.
    pub(super) fn kernel_grad_bf16(
        &self,
        xbuf: &[u16],
        images: usize,
        dy: &[u16],
        out: &mut [f32],
    ) {
        assert!(
            crate::bf16::available(),
            "bf16 kernel gradient without AVX512-BF16"
        );
        // SAFETY: as `kernel_grad`, and the CPU has AVX512-BF16 and BW (asserted).
        self.kernel_grad_rows(xbuf, images, dy, out, |row, out, add| unsafe {
            row.run_bf16(out, add)
        })
    }

    fn kernel_grad_rows<T>(
        &self,
        xbuf: &[T],
        images: usize,
        dy: &[T],
        out: &mut [f32],
        run: impl Fn(&GradRow<T>, &mut [f32], bool),
    ) {
        let (c, k, l) = (self.c, self.k, self.l());
        let (lo, cols) = self.dx_range();
        let masks = &self.masks;
        assert!(
            self.has_kernel_grad()
                && xbuf.len() >= images * self.buf_len()
                && dy.len() >= images * self.o * l
                && out.len() == self.o * c * k * k,
            "direct kernel gradient: operands do not match the shape {self:?}"
        );
        let (taps, stride) = (self.taps(), self.stride());
        // images per pass: the 8 channels' output gradients of a pass, read again for every
        // input channel and kernel row, stay within 32 KB (the L1 cache)
        let chunk = (1024 / l).clamp(1, images.max(1));
        for first in (0..images).step_by(chunk) {
            let count = chunk.min(images - first);
            for kb in 0..self.o / NK {
                for ci in 0..c {
                    for ky in 0..k {
                        // where the row's taps read in image `first`'s copy, and their masks
                        let tap = |kx: usize| {
                            let t = taps[ky * k + kx];
                            let plane = (t.phase * c + ci) * stride;
                            (plane + t.at(self.margin(), self.pw), (t.dx - lo) as usize)
                        };
                        let row = GradRow {
                            x: &xbuf[first * self.buf_len()..],
                            at: [tap(0).0, tap(1).0, tap(2).0],
                            mask: [tap(0).1, tap(1).1, tap(2).1],
                            cols,
                            keep: self.keep(),
                            image: self.buf_len(),
                            dy: &dy[first * self.o * l + kb * NK * l..],
                            dy_image: self.o * l,
                            l,
                            images: count,
                            masks,
                        };
                        let at = ((kb * c + ci) * k + ky) * k * NK;
                        // With the shape's own masks, the assertion above keeps every unmasked
                        // load of `run` inside `xbuf` and `dy` (masked-off lanes, which may
                        // point past `dy`, are not read: masked loads do not touch them).
                        run(&row, &mut out[at..at + k * NK], first > 0);
                    }
                }
            }
        }
    }
}

/// One input phase's taps (offset in a dy plane of the copy, mask column) and kernel.
type PhaseTaps = (Vec<(usize, usize)>, Vec<f32>);

/// The input gradient of a strided direct convolution (`Direct::input_grad`): for each phase
/// (a, b) of the input, the taps that land there make a stride-1 convolution of dy, written
/// into that phase's plane; the planes are then interleaved into the image.
pub(super) struct StridedGrad {
    d: Direct,
    /// Per phase: each tap's offset in a dy plane of the copy (margin included) and its mask
    /// column, and the kernel [C / 8][O][taps][8]; no taps, no gradient there.
    phases: Vec<PhaseTaps>,
    /// Zero values around each dy plane, and the smallest column shift.
    margin: usize,
    lo: isize,
    /// `[vector of a phase plane][column shift]`.
    masks: Vec<u16>,
    cols: usize,
    /// The output tiles of a phase plane (`tiles`).
    plan: Vec<(usize, usize)>,
}

impl StridedGrad {
    /// dy planes (`oh * ow` plus margins) between two starts.
    fn stride(&self) -> usize {
        self.d.oh * self.d.pw + 2 * self.margin
    }
    fn plane(&self) -> usize {
        self.d.ph * self.d.pw
    }
    /// Values of the scratch `run` takes: the dy copy, the phase planes of the gradient.
    pub(super) fn scratch_len(&self) -> (usize, usize) {
        let d = &self.d;
        (d.o * self.stride() + LANES, d.s * d.s * d.c * self.plane())
    }

    /// The input gradient `dimg` [C, H, W] of one image from its output gradient `g`
    /// [O, OH*OW], with scratch of `scratch_len()` values.
    pub(super) fn run(&self, buf: &mut [f32], planes: &mut [f32], g: &[f32], dimg: &mut [f32]) {
        let d = &self.d;
        let (l, lp, stride, m) = (d.l(), self.plane(), self.stride(), self.margin);
        assert!(
            g.len() >= d.o * l
                && dimg.len() >= d.c * d.h * d.w
                && buf.len() >= d.o * stride + LANES
                && planes.len() >= d.s * d.s * d.c * lp,
            "strided input gradient: operands do not match the shape {d:?}"
        );
        for (ki, dst) in buf[..d.o * stride].chunks_exact_mut(stride).enumerate() {
            dst[..m].fill(0.0);
            dst[m..m + l].copy_from_slice(&g[ki * l..][..l]);
            dst[m + l..].fill(0.0);
        }
        for (phase, (taps, wk)) in self.phases.iter().enumerate() {
            if taps.is_empty() {
                continue;
            }
            let out = &mut planes[phase * d.c * lp..][..d.c * lp];
            for kb in 0..d.c / NK {
                let wk = &wk[kb * d.o * taps.len() * NK..][..d.o * taps.len() * NK];
                for &(v0, nvec) in &self.plan {
                    let tile = Tile {
                        c: d.o,
                        bf16: false,
                        k: 0,
                        w: d.pw,
                        stride,
                        wk,
                        masks: &self.masks[v0 * self.cols..],
                        cols: self.cols,
                        keep: (-self.lo) as usize,
                        taps,
                    };
                    let x = &buf[v0 * LANES..];
                    let y = &mut out[kb * NK * lp + v0 * LANES..];
                    // SAFETY: `available()` held when the shape was built (AVX-512 F and VL);
                    // the assertion above and the margins keep every unmasked load inside
                    // `buf` and every unmasked store inside `out`.
                    unsafe {
                        match nvec {
                            3 => tile.run_taps::<3>(x, y, lp),
                            2 => tile.run_taps::<2>(x, y, lp),
                            _ => tile.run_taps::<1>(x, y, lp),
                        }
                    }
                }
            }
        }
        // interleave the phases into the image; pixels no tap reaches have no gradient
        let used = |phase: usize| !self.phases[phase].0.is_empty();
        interleave_phases(planes, used, (d.s, d.c, d.h, d.w), (d.ph, d.pw), dimg);
    }
}

/// One kernel row's gradient for 8 output channels, summed over a pass of images.
struct GradRow<'a, T> {
    /// The pass's first image's copy (f32, or bf16 bits for `run_bf16`); image i at
    /// `i * image` after it.
    x: &'a [T],
    /// Where each of the row's 3 taps reads output pixel 0, from the start of an image's copy,
    /// and its mask column.
    at: [usize; 3],
    mask: [usize; 3],
    /// Mask columns per vector, and the column of the output's own pixels.
    cols: usize,
    keep: usize,
    image: usize,
    /// The first image's output gradient for the first of the 8 channels; image i at
    /// `i * dy_image`.
    dy: &'a [T],
    dy_image: usize,
    l: usize,
    images: usize,
    /// `[vector][column shift]`, the shape's own (`lane_masks`).
    masks: &'a [u16],
}

/// `out[(i % 3) * 8 + i / 3] (+)= the lane sum of acc[i]` for the 24 sums of a kernel-gradient
/// row; constant indices (one loop indexing `acc` and the sums live on the stack).
macro_rules! store_row_sums {
    ($acc:ident, $out:ident, $add:ident) => {
        store_row_sums!(@ $acc, $out, $add; 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23)
    };
    (@ $acc:ident, $out:ident, $add:ident; $($i:literal)*) => {$(
        let sum = _mm512_reduce_add_ps($acc[$i]);
        let o = &mut $out[($i % 3) * NK + $i / 3];
        *o = if $add { *o + sum } else { sum };
    )*};
}

impl GradRow<'_, u16> {
    /// `GradRow::run` on bf16 copies of the image and of the output gradient: vectors of 32
    /// pixels, each VDPBF16PS adding the products of two neighbouring pixels into one f32 lane,
    /// so half the instructions; the masks of two 16-pixel vectors make one 32-pixel mask.
    ///
    /// # Safety
    /// As `run`, and the CPU has AVX512-BF16 and BW.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512bf16")]
    unsafe fn run_bf16(&self, out: &mut [f32], add: bool) {
        use std::arch::x86_64::*;
        let nv = self.l.div_ceil(LANES);
        let mut acc = [_mm512_setzero_ps(); 3 * NK];
        let l = self.l;
        let bh = |v: __m512i| std::mem::transmute::<__m512i, __m512bh>(v);
        for img in 0..self.images {
            let xi = self.x.as_ptr().add(img * self.image).cast::<i16>();
            let di = self.dy.as_ptr().add(img * self.dy_image).cast::<i16>();
            let (x0, x1, x2) = (xi.add(self.at[0]), xi.add(self.at[1]), xi.add(self.at[2]));
            for v in (0..nv).step_by(2) {
                let (m, next) = (self.masks.as_ptr().add(v * self.cols), v + 1 < nv);
                let mask = |col: usize| {
                    let hi = if next {
                        *m.add(self.cols + col) as u32
                    } else {
                        0
                    };
                    (*m.add(col) as u32) | (hi << 16)
                };
                let at = v * LANES;
                let x0 = bh(_mm512_maskz_loadu_epi16(mask(self.mask[0]), x0.add(at)));
                let x1 = bh(_mm512_maskz_loadu_epi16(mask(self.mask[1]), x1.add(at)));
                let x2 = bh(_mm512_maskz_loadu_epi16(mask(self.mask[2]), x2.add(at)));
                let keep = mask(self.keep);
                macro_rules! channel {
                    ($($j:literal)*) => {$(
                        let d = bh(_mm512_maskz_loadu_epi16(keep, di.add($j * l + at)));
                        acc[3 * $j] = _mm512_dpbf16_ps(acc[3 * $j], x0, d);
                        acc[3 * $j + 1] = _mm512_dpbf16_ps(acc[3 * $j + 1], x1, d);
                        acc[3 * $j + 2] = _mm512_dpbf16_ps(acc[3 * $j + 2], x2, d);
                    )*};
                }
                channel!(0 1 2 3 4 5 6 7);
            }
        }
        store_row_sums!(acc, out, add);
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn run_bf16(&self, _out: &mut [f32], _add: bool) {
        unreachable!("the direct convolution is built only for x86_64 (`available()`)")
    }
}

impl GradRow<'_, f32> {
    /// `out[kx * 8 + j] (+)= Σ_img Σ_q dy[img][j][q] x[img][q + kx]` over the masked lanes: 24
    /// vector sums (3 columns by 8 channels) and the 3 pixel vectors of one position in
    /// registers, each output gradient vector loaded once per position.
    ///
    /// # Safety
    /// The CPU has AVX-512F and VL; the kernel is 3x3 (3 taps per row; `masks` is
    /// `[vector][cols]`, `mask` and `keep` columns of it); every load unmasked by `masks` is in
    /// bounds (`Direct::kernel_grad`'s assertion and the shape's own masks).
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
            let (x0, x1, x2) = (xi.add(self.at[0]), xi.add(self.at[1]), xi.add(self.at[2]));
            for v in 0..nv {
                let m = self.masks.as_ptr().add(v * self.cols);
                let at = v * LANES;
                let x0 = _mm512_maskz_loadu_ps(*m.add(self.mask[0]), x0.add(at));
                let x1 = _mm512_maskz_loadu_ps(*m.add(self.mask[1]), x1.add(at));
                let x2 = _mm512_maskz_loadu_ps(*m.add(self.mask[2]), x2.add(at));
                let keep = *m.add(self.keep);
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
        store_row_sums!(acc, out, add);
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn run(&self, _out: &mut [f32], _add: bool) {
        unreachable!("the direct convolution is built only for x86_64 (`available()`)")
    }
}

/// The operands of one tile (8 output channels by 1 to 3 vectors of pixels).
struct Tile<'a> {
    /// Input channels, or channel pairs when `bf16`.
    c: usize,
    /// `x` and `wk` hold bf16 pairs of input channels (`Direct::pairs`, `Direct::kernel_bf16`)
    /// and the sums run on VDPBF16PS.
    bf16: bool,
    k: usize,
    /// Row width of the planes (and of the output).
    w: usize,
    stride: usize,
    /// This block's kernel, [C][K * K][8].
    wk: &'a [f32],
    /// The masks from the tile's first vector on, [vector][column shift]; `cols` per vector,
    /// `keep` the column of the output's own pixels.
    masks: &'a [u16],
    cols: usize,
    keep: usize,
    /// Strided convolutions: each tap's offset from its channel's first plane (margin
    /// included) and its mask column, in kernel order.
    taps: &'a [(usize, usize)],
}

/// Whether the CPU runs the AVX-512 tiles (AVX-512 F and VL) and the direct path is not
/// switched off ([`crate::paths`]).
pub(super) fn available() -> bool {
    crate::paths::direct_enabled()
}

/// `acc + x * w`, lane by lane (the f32 tiles' step).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
fn madd_f32(
    acc: std::arch::x86_64::__m512,
    x: std::arch::x86_64::__m512,
    w: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512 {
    std::arch::x86_64::_mm512_fmadd_ps(x, w, acc)
}

/// `acc + x.lo * w.lo + x.hi * w.hi`, lane by lane, with `x` and `w` holding bf16 pairs in
/// their 32-bit lanes (VDPBF16PS; the bf16 tiles' step).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
fn madd_bf16(
    acc: std::arch::x86_64::__m512,
    x: std::arch::x86_64::__m512,
    w: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::{__m512, __m512bh, _mm512_dpbf16_ps};
    // SAFETY: same-sized vector types; the lanes are reinterpreted, not converted.
    let (x, w): (__m512bh, __m512bh) = unsafe {
        (
            std::mem::transmute::<__m512, __m512bh>(x),
            std::mem::transmute::<__m512, __m512bh>(w),
        )
    };
    _mm512_dpbf16_ps(acc, x, w)
}

/// The body of `run_k` and `run_k_bf16`: one tile's sums, `$madd` adding the
/// products of a vector of inputs and a broadcast weight (an f32 FMA, or a bf16 pair's
/// VDPBF16PS). Index loops over constant ranges: unrolled, every index of `acc` is a constant
/// and the sums stay in registers.
macro_rules! tile_k {
    ($(#[$doc:meta])* $name:ident, $features:literal, $madd:ident) => {
            $(#[$doc])*
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = $features)]
            #[allow(clippy::needless_range_loop)]
            unsafe fn $name<const NV: usize, const K: usize>(
                &self,
                x: &[f32],
                origin: usize,
                y: &mut [f32],
                l: usize,
            ) {
                use std::arch::x86_64::*;
                let p = K / 2;
                let w = self.w as isize;
                let mut acc = [[_mm512_setzero_ps(); NK]; NV];
                let mut mask = [[0u16; K]; NV];
                for (v, m) in mask.iter_mut().enumerate() {
                    m.copy_from_slice(&self.masks[v * K..][..K]);
                }
                let xp = x.as_ptr().add(origin);
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
                                    acc[v][j] = $madd(acc[v][j], xv[v], b);
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
    };
}

/// The body of `run_taps_f32` and `run_taps_bf16`: one tile's sums, `$madd` adding the
/// products of a vector of inputs and a broadcast weight (an f32 FMA, or a bf16 pair's
/// VDPBF16PS). Index loops over constant ranges: unrolled, every index of `acc` is a constant
/// and the sums stay in registers.
macro_rules! tile_taps {
    ($(#[$doc:meta])* $name:ident, $features:literal, $madd:ident) => {
            $(#[$doc])*
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = $features)]
            #[allow(clippy::needless_range_loop)] // constant index ranges: the sums stay in registers
            unsafe fn $name<const NV: usize>(&self, x: &[f32], y: &mut [f32], l: usize) {
                use std::arch::x86_64::*;
                let mut acc = [[_mm512_setzero_ps(); NK]; NV];
                let (xp, m) = (x.as_ptr(), self.masks.as_ptr());
                let mut wp = self.wk.as_ptr();
                for ci in 0..self.c {
                    let xc = xp.add(ci * self.stride);
                    for &(at, col) in self.taps {
                        let src = xc.add(at);
                        let mut xv = [_mm512_setzero_ps(); NV];
                        for v in 0..NV {
                            xv[v] = _mm512_maskz_loadu_ps(*m.add(v * self.cols + col), src.add(v * LANES));
                        }
                        for j in 0..NK {
                            let b = _mm512_set1_ps(*wp.add(j));
                            for v in 0..NV {
                                acc[v][j] = $madd(acc[v][j], xv[v], b);
                            }
                        }
                        wp = wp.add(NK);
                    }
                }
                let yp = y.as_mut_ptr();
                for (v, acc) in acc.iter().enumerate() {
                    let keep = *m.add(v * self.cols + self.keep);
                    for (j, a) in acc.iter().enumerate() {
                        _mm512_mask_storeu_ps(yp.add(j * l + v * LANES), keep, *a);
                    }
                }
            }
    };
}

impl Tile<'_> {
    /// `run_k` for this tile's kernel size.
    ///
    /// # Safety
    /// As `run_k`.
    unsafe fn run<const NV: usize>(&self, x: &[f32], origin: usize, y: &mut [f32], l: usize) {
        match (self.bf16, self.k) {
            (false, 3) => self.run_k::<NV, 3>(x, origin, y, l),
            (false, 5) => self.run_k::<NV, 5>(x, origin, y, l),
            (false, 7) => self.run_k::<NV, 7>(x, origin, y, l),
            (true, 3) => self.run_k_bf16::<NV, 3>(x, origin, y, l),
            (true, 5) => self.run_k_bf16::<NV, 5>(x, origin, y, l),
            (true, 7) => self.run_k_bf16::<NV, 7>(x, origin, y, l),
            (_, k) => unreachable!("direct convolution: no tiles for {k}x{k} (`Direct::new`)"),
        }
    }

    /// `run_taps_f32` or, for bf16 pairs, `run_taps_bf16`.
    ///
    /// # Safety
    /// As `run_taps_f32`, and for bf16 the CPU has AVX512-BF16 and BW.
    unsafe fn run_taps<const NV: usize>(&self, x: &[f32], y: &mut [f32], l: usize) {
        if self.bf16 {
            self.run_taps_bf16::<NV>(x, y, l)
        } else {
            self.run_taps_f32::<NV>(x, y, l)
        }
    }

    tile_k! {
        #[doc = " `y[j * l + 16 v + i] = Σ_ci Σ_(ky,kx) wk[ci][ky K + kx][j] x[ci * stride + 16 v + i +"]
        #[doc = " (ky - p) w + kx - p]` over the tile's NV vectors (masked lanes read as zero and are not"]
        #[doc = " stored); the taps unrolled for the kernel size K."]
        #[doc = ""]
        #[doc = " # Safety"]
        #[doc = " The CPU has AVX-512F and VL; `self.k == K`; `masks` holds NV * K values and `wk`"]
        #[doc = " C * K * K * 8; for every vector v < NV and lane i unmasked by `masks`, the loads"]
        #[doc = " `x[origin + ci * stride + 16 v + i + (ky - p) w + kx - p]` (for every ci < c and tap)"]
        #[doc = " and the stores `y[j * l + 16 v + i]` (j < 8) are in bounds."]
        run_k, "avx512f,avx512vl", madd_f32
    }
    tile_k! {
        /// `run_k` on bf16 pairs of input channels (`Direct::pairs`) and of weights: each
        /// VDPBF16PS adds two channels' products, so half the instructions of `run_k`.
        ///
        /// # Safety
        /// As `run_k` with the pairs as channels, and the CPU has AVX512-BF16 and BW.
        run_k_bf16, "avx512f,avx512vl,avx512bw,avx512bf16", madd_bf16
    }

    tile_taps! {
        #[doc = " The tile of a strided convolution: `y[j * l + 16 v + i] = Σ_ci Σ_t wk[ci][t][j]"]
        #[doc = " x[ci * stride + taps[t].0 + 16 v + i]` (masked lanes read as zero and are not stored),"]
        #[doc = " `x` starting at the tile's first pixel of the copy."]
        #[doc = ""]
        #[doc = " # Safety"]
        #[doc = " The CPU has AVX-512F and VL; `wk` holds C * taps * 8 values and `masks` NV * cols; for"]
        #[doc = " every vector v < NV and lane i unmasked by `masks`, the loads and the stores are in"]
        #[doc = " bounds."]
        run_taps_f32, "avx512f,avx512vl", madd_f32
    }
    tile_taps! {
        /// `run_taps_f32` on bf16 pairs of input channels and of weights.
        ///
        /// # Safety
        /// As `run_taps_f32` with the pairs as channels, and the CPU has AVX512-BF16 and BW.
        run_taps_bf16, "avx512f,avx512vl,avx512bw,avx512bf16", madd_bf16
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn run_taps_f32<const NV: usize>(&self, _x: &[f32], _y: &mut [f32], _l: usize) {
        unreachable!("the direct convolution is built only for x86_64 (`available()`)")
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn run_taps_bf16<const NV: usize>(&self, _x: &[f32], _y: &mut [f32], _l: usize) {
        unreachable!("the direct convolution is built only for x86_64 (`available()`)")
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn run_k_bf16<const NV: usize, const K: usize>(
        &self,
        _x: &[f32],
        _origin: usize,
        _y: &mut [f32],
        _l: usize,
    ) {
        unreachable!("the direct convolution is built only for x86_64 (`available()`)")
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn run_k<const NV: usize, const K: usize>(
        &self,
        _x: &[f32],
        _origin: usize,
        _y: &mut [f32],
        _l: usize,
    ) {
        unreachable!("the direct convolution is built only for x86_64 (`available()`)")
    }
}
