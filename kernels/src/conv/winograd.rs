//! Winograd F(2x2, 3x3) for 3x3 stride-1 convolutions (Lavin & Gray, 2016): each 2x2 output
//! tile is `A^T [ (G g G^T) ⊙ (B^T d B) ] A` over a 4x4 input tile d, so a 3x3 convolution costs 16
//! multiplications per 4 outputs instead of 36 (2.25x fewer). Summed over input channels the
//! element-wise products become 16 matrix products [O x C] x [C x tiles], done with the same
//! `gemm` as the direct convolution, over a group of images at a time (so the products are wide
//! enough to run near the machine's peak). Results differ from the direct convolution by rounding
//! only (relative error ~1e-6 in f32; tested against it in f32 and f64).
//!
//! This portable form is used by default for 64 channels or more in and out on CPUs without
//! AVX-512 (`Geometry::winograd`, `paths::winograd_min_channels`): with the `gemm` crate's AVX2
//! kernels it wins where the channels are many and the images small; with fewer channels the
//! transforms (memory-bound, per channel and tile row) cost more than the multiplications saved.
//! With AVX-512, `winograd_avx512.rs` runs the same arithmetic with its transforms in registers
//! and its own product tiles. The measurements are in `benches/README.md`.

use crate::gemm::{matmul, Mat};
use crate::par_new_with;
use candle_core::WithDType;
use rayon::prelude::*;

/// Splits one input row, zero-padded by `p` on both sides, into its even and odd columns:
/// `ev[k]` = padded column 2k, `od[k]` = padded column 2k + 1 (zero outside the row).
fn split_row<T: WithDType>(row: &[T], p: usize, ev: &mut [T], od: &mut [T]) {
    let w = row.len();
    for (dst, phase) in [(ev, 0usize), (od, 1usize)] {
        // padded column j = 2k + phase holds row[j - p] when p <= j < w + p
        let lo = p.saturating_sub(phase).div_ceil(2).min(dst.len());
        let hi = (w + p)
            .saturating_sub(phase)
            .div_ceil(2)
            .clamp(lo, dst.len());
        dst[..lo].fill(T::zero());
        dst[hi..].fill(T::zero());
        if lo < hi {
            let first = 2 * lo + phase - p;
            for (d, &v) in dst[lo..hi].iter_mut().zip(row[first..].iter().step_by(2)) {
                *d = v;
            }
        }
    }
}

/// The shape of a 3x3 stride-1 convolution of one image.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Winograd {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub p: usize,
    pub oh: usize,
    pub ow: usize,
}

/// Output tiles per image in this many pixels or more make a group: the products' width.
const TARGET_TILES: usize = 1024;

/// Values in each per-thread transform buffer at most (4 MB of f32).
const MAX_BUFFER: usize = 1 << 20;

impl Winograd {
    /// Whether `winograd_avx512.rs` runs this shape: an x86-64 CPU with AVX-512 (F) and a
    /// multiple of 8 output channels (its products' tiles).
    pub(super) fn avx512(&self) -> bool {
        cfg!(target_arch = "x86_64")
            && crate::paths::cpu().avx512
            && self.o.is_multiple_of(8)
            && self.c > 0
    }

    /// Whether `winograd_avx512.rs` runs this shape's kernel gradient: `avx512()`, and input
    /// channels in fours (its product tiles are 4 output x 4 input channels).
    pub(super) fn kernel_grad_on_avx512(&self) -> bool {
        self.avx512() && self.c.is_multiple_of(4)
    }

    /// Whether the AVX-512 path runs F(4x4, 3x3) (`winograd4_avx512.rs`) instead of
    /// F(2x2, 3x3) for this shape's forward pass (and the input gradient, a forward pass of the
    /// transposed shape): `Paths::winograd4`. By default where it measured faster: rows of 6
    /// tiles or more (outputs 21 px wide or wider) and at most 64 channels. Narrower rows leave
    /// most of a vector's lanes empty in its transforms (an 8 px image has 2x2 tiles), and with
    /// 128 channels or more its 36 matrices per group no longer stay in L2
    /// (`benches/README.md`).
    pub(super) fn f4(&self) -> bool {
        let on = match crate::paths::paths().winograd4 {
            crate::paths::Switch::Off => false,
            crate::paths::Switch::On => true,
            crate::paths::Switch::Auto => self.ow.div_ceil(4) >= 6 && self.c.max(self.o) <= 64,
        };
        on && self.avx512()
    }

    /// Whether the kernel gradient runs F(4x4, 3x3) (`kernel_grad_avx512` with `tile = 4`):
    /// where `f4()` holds and, by default, with at most 16 channels. With 32 channels (the small
    /// ResNet's 28 px layers) it measured slower than F(2x2, 3x3), with 64 (ResNet-50's 56 px
    /// layers) level (`benches/README.md`).
    pub(super) fn f4_kernel(&self) -> bool {
        let auto = crate::paths::paths().winograd4 == crate::paths::Switch::Auto;
        self.f4() && !(auto && self.c.max(self.o) > 16)
    }

    pub(super) fn tiles(&self) -> (usize, usize) {
        (self.oh.div_ceil(2), self.ow.div_ceil(2))
    }

    /// U = G g G^T for every (o, c): 16 matrices [O x C], stored xi-major.
    pub(super) fn transform_kernel<T: WithDType>(&self, k: &[T]) -> Vec<T> {
        let (o, c) = (self.o, self.c);
        let mut u = vec![T::zero(); 16 * o * c];
        let half = T::from_f64(0.5);
        for oc in 0..o * c {
            let g = &k[oc * 9..][..9];
            // t = G g (4x3)
            let mut t = [[T::zero(); 3]; 4];
            for j in 0..3 {
                let (g0, g1, g2) = (g[j], g[3 + j], g[6 + j]);
                t[0][j] = g0;
                t[1][j] = (g0 + g1 + g2) * half;
                t[2][j] = (g0 - g1 + g2) * half;
                t[3][j] = g2;
            }
            // U = t G^T (4x4)
            for (r, row) in t.iter().enumerate() {
                let (a, b, cc) = (row[0], row[1], row[2]);
                let vals = [a, (a + b + cc) * half, (a - b + cc) * half, cc];
                for (s, v) in vals.into_iter().enumerate() {
                    u[(r * 4 + s) * o * c + oc] = v;
                }
            }
        }
        u
    }

    /// V = B^T d B for every channel and tile of `imgs` consecutive images: 16 matrices
    /// [C x tiles], stored xi-major. Tiles are numbered `(ty * imgs + g) * tw + tx`, so the tiles of
    /// one tile row of every image of the group are contiguous: each step below is one loop over
    /// `imgs * tw` values that the compiler vectorises. `scratch` holds 32 such rows.
    fn transform_input<T: WithDType>(&self, x: &[T], imgs: usize, v: &mut [T], scratch: &mut [T]) {
        let (th, tw) = self.tiles();
        let t_all = imgs * th * tw;
        let len = imgs * tw;
        let (c, h, w, p) = (self.c, self.h, self.w, self.p as isize);
        // d[k * 4 + s]: input row k of the tile, column phase s (column 2 tx + s - p); then
        // t[r * 4 + s]: row combination r of B^T.
        let (d, rest) = scratch[..32 * len + 2 * (tw + 1)].split_at_mut(16 * len);
        let (t, eo) = rest.split_at_mut(16 * len);
        for ci in 0..c {
            for ty in 0..th {
                for g in 0..imgs {
                    let plane = &x[(g * c + ci) * h * w..][..h * w];
                    for k in 0..4 {
                        let iy = (2 * ty + k) as isize - p;
                        let (ev, od) = eo.split_at_mut(tw + 1);
                        if iy >= 0 && iy < h as isize {
                            split_row(&plane[iy as usize * w..][..w], self.p, ev, od);
                        } else {
                            ev.fill(T::zero());
                            od.fill(T::zero());
                        }
                        // column 2 tx + s - p of the row is ev[tx + s / 2] (s even) or
                        // od[tx + s / 2] (s odd)
                        for s in 0..4 {
                            let src = if s % 2 == 0 { &ev[..] } else { &od[..] };
                            d[(k * 4 + s) * len + g * tw..][..tw]
                                .copy_from_slice(&src[s / 2..][..tw]);
                        }
                    }
                }
                let drow = |k: usize, s: usize| &d[(k * 4 + s) * len..][..len];
                for s in 0..4 {
                    let (d0, d1, d2, d3) = (drow(0, s), drow(1, s), drow(2, s), drow(3, s));
                    let row = |r: usize| (r * 4 + s) * len;
                    for ((o, &a), &b) in t[row(0)..][..len].iter_mut().zip(d0).zip(d2) {
                        *o = a - b;
                    }
                    for ((o, &a), &b) in t[row(1)..][..len].iter_mut().zip(d1).zip(d2) {
                        *o = a + b;
                    }
                    for ((o, &a), &b) in t[row(2)..][..len].iter_mut().zip(d2).zip(d1) {
                        *o = a - b;
                    }
                    for ((o, &a), &b) in t[row(3)..][..len].iter_mut().zip(d1).zip(d3) {
                        *o = a - b;
                    }
                }
                let base = ty * len;
                for r in 0..4 {
                    let trow = |s: usize| &t[(r * 4 + s) * len..][..len];
                    let (t0, t1, t2, t3) = (trow(0), trow(1), trow(2), trow(3));
                    let at = |s: usize| ((r * 4 + s) * c + ci) * t_all + base;
                    for ((o, &a), &b) in v[at(0)..][..len].iter_mut().zip(t0).zip(t2) {
                        *o = a - b;
                    }
                    for ((o, &a), &b) in v[at(1)..][..len].iter_mut().zip(t1).zip(t2) {
                        *o = a + b;
                    }
                    for ((o, &a), &b) in v[at(2)..][..len].iter_mut().zip(t2).zip(t1) {
                        *o = a - b;
                    }
                    for ((o, &a), &b) in v[at(3)..][..len].iter_mut().zip(t1).zip(t3) {
                        *o = a - b;
                    }
                }
            }
        }
    }

    /// Y = A^T m A for every output channel and tile, written into `imgs` NCHW images; the same
    /// tile order and long loops as `transform_input`. `scratch` holds 12 rows of `imgs * tw`.
    fn transform_output<T: WithDType>(
        &self,
        m: &[T],
        imgs: usize,
        out: &mut [T],
        scratch: &mut [T],
    ) {
        let (th, tw) = self.tiles();
        let t_all = imgs * th * tw;
        let len = imgs * tw;
        let (o, oh, ow) = (self.o, self.oh, self.ow);
        // u[r * 4 + j] (8 rows), then y[r * 2 + s] (4 rows)
        let (u, y) = scratch[..12 * len].split_at_mut(8 * len);
        for oc in 0..o {
            for ty in 0..th {
                let base = ty * len;
                let mrow = |xi: usize| &m[(xi * o + oc) * t_all + base..][..len];
                for j in 0..4 {
                    let (m0, m1, m2, m3) = (mrow(j), mrow(4 + j), mrow(8 + j), mrow(12 + j));
                    let (u0, u1) = u.split_at_mut(4 * len);
                    for (((d, &a), &b), &c) in
                        u0[j * len..][..len].iter_mut().zip(m0).zip(m1).zip(m2)
                    {
                        *d = a + b + c;
                    }
                    for (((d, &a), &b), &c) in
                        u1[j * len..][..len].iter_mut().zip(m1).zip(m2).zip(m3)
                    {
                        *d = a - b - c;
                    }
                }
                for r in 0..2 {
                    let ur = |j: usize| &u[(r * 4 + j) * len..][..len];
                    let (ye, yo) = y[r * 2 * len..][..2 * len].split_at_mut(len);
                    for (((d, &a), &b), &c) in ye.iter_mut().zip(ur(0)).zip(ur(1)).zip(ur(2)) {
                        *d = a + b + c;
                    }
                    for (((d, &a), &b), &c) in yo.iter_mut().zip(ur(1)).zip(ur(2)).zip(ur(3)) {
                        *d = a - b - c;
                    }
                }
                for g in 0..imgs {
                    let plane = &mut out[(g * o + oc) * oh * ow..][..oh * ow];
                    for r in 0..2 {
                        let yy = 2 * ty + r;
                        if yy >= oh {
                            continue;
                        }
                        let ye = &y[r * 2 * len + g * tw..][..tw];
                        let yo = &y[(r * 2 + 1) * len + g * tw..][..tw];
                        let dst = &mut plane[yy * ow..][..ow];
                        for (pair, (&e, &od)) in dst.chunks_mut(2).zip(ye.iter().zip(yo)) {
                            pair[0] = e;
                            if let Some(v) = pair.get_mut(1) {
                                *v = od;
                            }
                        }
                    }
                }
            }
        }
    }

    /// The convolution of `n` images [N, C, H, W] with a kernel [O, C, 3, 3].
    pub fn forward<T: WithDType>(&self, n: usize, x: &[T], k: &[T]) -> Vec<T> {
        let (th, tw) = self.tiles();
        let per_img = th * tw;
        let (o, c) = (self.o, self.c);
        // Enough tiles for wide products, at most MAX_BUFFER values in each of the V and M
        // buffers, and at least two groups for the two cores.
        let by_memory = MAX_BUFFER / (16 * c.max(o) * per_img).max(1);
        let group = TARGET_TILES
            .div_ceil(per_img)
            .min(by_memory)
            .clamp(1, n.div_ceil(2).max(1));
        let u = self.transform_kernel(k);
        par_new_with(
            n * o * self.oh * self.ow,
            group * o * self.oh * self.ow,
            x.par_chunks(group * c * self.h * self.w),
            || {
                let t = group * per_img;
                let scratch = 32 * group * tw + 2 * (tw + 1);
                (
                    vec![T::zero(); 16 * c * t],
                    vec![T::zero(); 16 * o * t],
                    vec![T::zero(); scratch],
                )
            },
            |(v, m, scratch), y, xs| {
                let imgs = xs.len() / (c * self.h * self.w);
                let t = imgs * per_img;
                self.transform_input(xs, imgs, v, scratch);
                for xi in 0..16 {
                    matmul(
                        o,
                        t,
                        c,
                        &mut m[xi * o * t..][..o * t],
                        false,
                        Mat::rows(&u[xi * o * c..][..o * c], c),
                        Mat::rows(&v[xi * c * t..][..c * t], t),
                    );
                }
                self.transform_output(m, imgs, y, scratch);
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_rel_err, rand_tensor};
    use candle_core::{DType, Device, Tensor};

    /// Against candle's direct convolution: f32 to 1e-5 of the output's scale, f64 to 1e-12,
    /// with odd sizes (partial edge tiles), padding 0, 1 and 2, a 1x1 image, and groups of
    /// several images.
    #[test]
    fn matches_the_direct_convolution() {
        for (n, c, h, w, o, p) in [
            (3, 8, 7, 9, 8, 1),
            (2, 16, 8, 8, 12, 1),
            (1, 9, 5, 6, 10, 0),
            (2, 3, 3, 3, 4, 2),
            (1, 8, 1, 1, 8, 1),
            (40, 4, 6, 6, 5, 1),
        ] {
            for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-12)] {
                let x = rand_tensor(&[n, c, h, w], 1, dtype);
                let k = rand_tensor(&[o, c, 3, 3], 2, dtype);
                let want = x.conv2d(&k, p, 1, 1, 1).unwrap();
                let (oh, ow) = (want.dim(2).unwrap(), want.dim(3).unwrap());
                let wg = Winograd {
                    c,
                    h,
                    w,
                    o,
                    p,
                    oh,
                    ow,
                };
                let got = match dtype {
                    DType::F32 => {
                        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                        let ks = k.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                        Tensor::from_vec(wg.forward(n, &xs, &ks), want.shape(), &Device::Cpu)
                    }
                    _ => {
                        let xs = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                        let ks = k.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                        Tensor::from_vec(wg.forward(n, &xs, &ks), want.shape(), &Device::Cpu)
                    }
                }
                .unwrap();
                let err = max_rel_err(&got, &want);
                assert!(err < tol, "{n} {c} {h} {w} {o} p{p} {dtype:?}: {err}");
            }
        }
    }
}
