//! Winograd F(2x2, 3x3) for 3x3 stride-1 convolutions (Lavin & Gray, 2016): each 2x2 output
//! tile is `A^T [ (G g G^T) ⊙ (B^T d B) ] A` over a 4x4 input tile d, so a 3x3 convolution costs 16
//! multiplications per 4 outputs instead of 36 (2.25x fewer). Summed over input channels the
//! element-wise products become 16 matrix products [O x C] x [C x tiles], done with the same
//! `gemm` as the direct convolution, over a group of images at a time (so the products are wide
//! enough to run near the machine's peak). Results differ from the direct convolution by rounding
//! only (relative error ~1e-6 in f32; tested against it in f32 and f64).
//!
//! Opt-in (`RECIPE_WINOGRAD=1`): measured on a 2-core Zen 4 it is level with im2col + gemm
//! (stage-1 ResNet-20 forward 155 against 143 GFLOP/s, stage 2 195 against 196), because the
//! products take a third of the time and the tile transforms the rest: they run along short rows
//! of tiles (4 to 16) and do not vectorise well. Transforms over 8 tiles or 8 channels per SIMD
//! register are what would make it pay.

use super::gemm::{matmul, Mat};
use candle_core::WithDType;
use rayon::prelude::*;

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
const TARGET_TILES: usize = 512;

impl Winograd {
    fn tiles(&self) -> (usize, usize) {
        (self.oh.div_ceil(2), self.ow.div_ceil(2))
    }

    /// U = G g G^T for every (o, c): 16 matrices [O x C], stored xi-major.
    fn transform_kernel<T: WithDType>(&self, k: &[T]) -> Vec<T> {
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
    /// [C x tiles], stored xi-major, tiles of image g after those of image g - 1. Per row of tiles
    /// the four input rows are read once into even/odd columns, combined row-wise (B^T), then
    /// column-wise (B) into the 16 outputs, each loop running along the tiles so that it
    /// vectorises.
    fn transform_input<T: WithDType>(&self, x: &[T], imgs: usize, v: &mut [T], scratch: &mut [T]) {
        let (th, tw) = self.tiles();
        let per_img = th * tw;
        let t_all = imgs * per_img;
        let (c, h, w, p) = (self.c, self.h, self.w, self.p as isize);
        let len = tw + 1;
        // rows[k] holds input row k of the tile row as (even columns, odd columns), then
        // comb[r] the row combination r of B^T.
        let (rows, comb) = scratch[..16 * len].split_at_mut(8 * len);
        for g in 0..imgs {
            for ci in 0..c {
                let plane = &x[(g * c + ci) * h * w..][..h * w];
                for ty in 0..th {
                    for (k, buf) in rows.chunks_exact_mut(2 * len).enumerate() {
                        let (ev, od) = buf.split_at_mut(len);
                        let iy = (2 * ty + k) as isize - p;
                        if iy < 0 || iy >= h as isize {
                            ev.fill(T::zero());
                            od.fill(T::zero());
                            continue;
                        }
                        let row = &plane[iy as usize * w..][..w];
                        let at = |ix: isize| {
                            if ix >= 0 && ix < w as isize {
                                row[ix as usize]
                            } else {
                                T::zero()
                            }
                        };
                        for j in 0..len {
                            ev[j] = at(2 * j as isize - p);
                            od[j] = at(2 * j as isize + 1 - p);
                        }
                    }
                    let row = |k: usize| &rows[k * 2 * len..][..2 * len];
                    let ops: [(usize, usize, bool); 4] =
                        [(0, 2, false), (1, 2, true), (2, 1, false), (1, 3, false)];
                    for (r, &(a, b, add)) in ops.iter().enumerate() {
                        let dst = &mut comb[r * 2 * len..][..2 * len];
                        for ((d, &x), &y) in dst.iter_mut().zip(row(a)).zip(row(b)) {
                            *d = if add { x + y } else { x - y };
                        }
                    }
                    let base = g * per_img + ty * tw;
                    for r in 0..4 {
                        let (ev, od) = comb[r * 2 * len..][..2 * len].split_at(len);
                        let (e0, e1, o0, o1) = (&ev[..tw], &ev[1..=tw], &od[..tw], &od[1..=tw]);
                        let at = |s: usize| ((r * 4 + s) * c + ci) * t_all + base;
                        for ((d, &a), &b) in v[at(0)..][..tw].iter_mut().zip(e0).zip(e1) {
                            *d = a - b;
                        }
                        for ((d, &a), &b) in v[at(1)..][..tw].iter_mut().zip(o0).zip(e1) {
                            *d = a + b;
                        }
                        for ((d, &a), &b) in v[at(2)..][..tw].iter_mut().zip(e1).zip(o0) {
                            *d = a - b;
                        }
                        for ((d, &a), &b) in v[at(3)..][..tw].iter_mut().zip(o0).zip(o1) {
                            *d = a - b;
                        }
                    }
                }
            }
        }
    }

    /// Y = A^T m A for every output channel and tile, written into `imgs` NCHW images, along the
    /// tiles of a row as `transform_input`.
    fn transform_output<T: WithDType>(
        &self,
        m: &[T],
        imgs: usize,
        out: &mut [T],
        scratch: &mut [T],
    ) {
        let (th, tw) = self.tiles();
        let per_img = th * tw;
        let t_all = imgs * per_img;
        let (o, oh, ow) = (self.o, self.oh, self.ow);
        // u[r][j] (8 rows of tw), then even/odd output columns (2 x tw)
        let (u, eo) = scratch[..10 * tw].split_at_mut(8 * tw);
        for g in 0..imgs {
            for oc in 0..o {
                let plane = &mut out[(g * o + oc) * oh * ow..][..oh * ow];
                for ty in 0..th {
                    let base = g * per_img + ty * tw;
                    let mrow = |xi: usize| &m[(xi * o + oc) * t_all + base..][..tw];
                    for j in 0..4 {
                        let (m0, m1, m2, m3) = (mrow(j), mrow(4 + j), mrow(8 + j), mrow(12 + j));
                        let (u0, u1) = u.split_at_mut(4 * tw);
                        let u0 = &mut u0[j * tw..][..tw];
                        for (((d, &a), &b), &c) in u0.iter_mut().zip(m0).zip(m1).zip(m2) {
                            *d = a + b + c;
                        }
                        let u1 = &mut u1[j * tw..][..tw];
                        for (((d, &a), &b), &c) in u1.iter_mut().zip(m1).zip(m2).zip(m3) {
                            *d = a - b - c;
                        }
                    }
                    for r in 0..2 {
                        let y = 2 * ty + r;
                        if y >= oh {
                            continue;
                        }
                        let ur = |j: usize| &u[(r * 4 + j) * tw..][..tw];
                        let (ev, od) = eo.split_at_mut(tw);
                        for (((d, &a), &b), &c) in ev.iter_mut().zip(ur(0)).zip(ur(1)).zip(ur(2)) {
                            *d = a + b + c;
                        }
                        for (((d, &a), &b), &c) in od.iter_mut().zip(ur(1)).zip(ur(2)).zip(ur(3)) {
                            *d = a - b - c;
                        }
                        let dst = &mut plane[y * ow..][..ow];
                        for (pair, (&e, &o)) in dst.chunks_mut(2).zip(ev.iter().zip(od.iter())) {
                            pair[0] = e;
                            if let Some(v) = pair.get_mut(1) {
                                *v = o;
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
        let group = TARGET_TILES
            .div_ceil(per_img)
            .clamp(1, n.div_ceil(2).max(1));
        let (o, c) = (self.o, self.c);
        let u = self.transform_kernel(k);
        let mut out = vec![T::zero(); n * o * self.oh * self.ow];
        out.par_chunks_mut(group * o * self.oh * self.ow)
            .zip(x.par_chunks(group * c * self.h * self.w))
            .for_each_init(
                || {
                    let t = group * per_img;
                    let scratch = 16 * (tw + 1);
                    (
                        vec![T::zero(); 16 * c * t],
                        vec![T::zero(); 16 * o * t],
                        vec![T::zero(); scratch],
                    )
                },
                |(v, m, scratch), (y, xs)| {
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
            );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{max_rel_err, rand_tensor};
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
