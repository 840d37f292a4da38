//! The copies that lay an image out for the products: im2col and its adjoint col2im, phase
//! planes of strided convolutions, padded and shifted rows, the channel-last copy of the kernel
//! gradient, and the kernel rearrangements; a batch norm + ReLU prologue applied on the way.

use super::geometry::Geometry;
use crate::gemm::Mat;
use crate::norm::bn_relu;
use candle_core::WithDType;

impl Geometry {
    /// Where kernel tap `k` (row or column) reads: phase `(k - p) mod s` at offset
    /// `floor((k - p) / s)` from the output position.
    pub(super) fn tap(&self, k: usize) -> (usize, isize) {
        let t = k as isize - self.p as isize;
        let s = self.s as isize;
        (t.rem_euclid(s) as usize, t.div_euclid(s))
    }

    /// Whether some kernel tap reads phase row/column `a`.
    pub(super) fn phase_used(&self, a: usize, k: usize) -> bool {
        (0..k).any(|i| self.tap(i).0 == a)
    }

    /// The plane of channel `ci` that tap `(ky, kx)` reads from, with its offsets: the image
    /// plane for stride 1, else a phase plane of `phases`.
    pub(super) fn tap_plane<'a, T>(
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
    pub(super) fn split_phases<T: WithDType>(
        &self,
        img: &[T],
        phases: &mut [T],
        prologue: Option<&[(T, T)]>,
    ) {
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
    pub(super) fn im2col<T: WithDType>(
        &self,
        img: &[T],
        buf: &mut [T],
        prologue: Option<&[(T, T)]>,
    ) {
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
    /// `im2col`); `img` is overwritten, `scratch` is `cols_len() - ckk * l` long. Row r of cols
    /// is `cols[r * rs..][..l]` (`rs = l` for one image's cols; the batched passes give the
    /// columns of one image among the batch's).
    pub(super) fn col2im<T: WithDType>(
        &self,
        cols: &[T],
        rs: usize,
        img: &mut [T],
        scratch: &mut [T],
    ) {
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
                    let row = &cols[((ci * self.kh + ky) * self.kw + kx) * rs..][..l];
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

    /// Writes one image [C, H, W] as `kw` shifted copies of each zero-padded plane:
    /// `buf[(ci * kw + kx) * P + q] = padded[ci][q + kx]` (zero past the plane's end), with
    /// `P = plane_len()`. The unfolded image of kernel row `ky` is then the view
    /// `B[(ci, kx), q] = buf[(ci * kw + kx) * P + ky * wp + q]` over the wide output grid: rows at
    /// stride `P`, positions contiguous, so the product reads it as it is. That is `kw` copies of
    /// the image instead of im2col's `kh * kw`.
    pub(super) fn pad_shifted<T: WithDType>(
        &self,
        img: &[T],
        buf: &mut [T],
        prologue: Option<&[(T, T)]>,
    ) {
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
    pub(super) fn row_view<'a, T>(&self, buf: &'a [T], ky: usize) -> Mat<'a, T> {
        Mat {
            data: &buf[ky * self.wp()..],
            rs: self.plane_len(),
            cs: 1,
        }
    }

    /// The kernel [O, C, KH, KW] as [C, O, KH, KW], each window rotated by 180 degrees.
    pub(super) fn flipped_kernel<T: WithDType>(&self, k: &[T]) -> Vec<T> {
        let (o, c, kh, kw) = (self.o, self.c, self.kh, self.kw);
        self.rearranged_kernel(k, |oi, ci, ky, kx| {
            let src = ((oi * c + ci) * kh + (kh - 1 - ky)) * kw + (kw - 1 - kx);
            (((ci * o + oi) * kh + ky) * kw + kx, src)
        })
    }

    /// A copy of the kernel with element `src` moved to `dst`, where `(dst, src) = at(o, c, ky,
    /// kx)` for every kernel position.
    pub(super) fn rearranged_kernel<T: WithDType>(
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

    /// Writes one image [C, H, W] zero-padded and channel-last: padded pixel q at `q * c`.
    pub(super) fn pad_channels_last<T: WithDType>(
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
pub(super) type Prologue<'a, T> = Option<(&'a [(T, T)], &'a mut [T])>;

/// `bn_relu` of every value of `src` into `dst`.
pub(super) fn bn_relu_row<T: WithDType>(src: &[T], st: (T, T), dst: &mut [T]) {
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
pub(super) fn scatter_every<T: WithDType>(src: &[T], s: usize, dst: &mut [T]) {
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

/// The output positions `0..out` whose source `o + d` lies in `0..len`.
pub(super) fn valid_range(d: isize, len: usize, out: usize) -> (usize, usize) {
    let lo = (-d).clamp(0, out as isize) as usize;
    let hi = (len as isize - d).clamp(lo as isize, out as isize) as usize;
    (lo, hi)
}

/// `row[oy * ow + ox] = plane[(oy + dy) * pw + ox + dx]`, zero where that lies outside the plane
/// [ph, pw]. When the plane is as wide as the output the whole row is one copy (then the
/// columns that wrapped around are zeroed), else one copy per output row.
pub(super) fn shifted_copy<T: WithDType>(
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
pub(super) fn shifted_add<T: WithDType>(
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
