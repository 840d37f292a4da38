//! The passes with the whole batch in one product each (`Geometry::batched`): the images'
//! unfolded columns side by side, [C*KH*KW, N*L], so that one product per pass packs the kernel
//! once, where the per-image passes (`passes.rs`) pack it, or the direct tiles stream it, once
//! per image. For ResNet-50's last stages (7x7 and 14x14 images, kernels of 1-9 MB) an image's
//! product has 49-196 columns against the whole kernel; side by side they have 16 times more.
//!
//! - forward: `Y [O, N*L] = K [O, C*KH*KW] · cols`, then each image's rows moved back to
//!   [N, O, L];
//! - input gradient: `dcols = K^T · dY [O, N*L]`, folded back image by image (`col2im`);
//! - kernel gradient: `dK [O, C*KH*KW] = dY · cols^T`, one sum over the whole batch, so there are
//!   no partial kernels to add.
//!
//! Each product runs on the rayon pool (`Geometry::product_par`), with every sum in an order
//! fixed by the shapes, so the results do not depend on the thread count. Past 2^24 values of
//! columns the batch is taken in groups (`Geometry::batch_group`), the kernel gradient summed
//! over them in order.

use super::geometry::Geometry;
use super::layout::shifted_copy;
use super::{row_moments, Moments};
use crate::gemm::Mat;
use crate::par_new;
use candle_core::WithDType;
use rayon::prelude::*;

/// `x` [G][R][L] (G images of R rows of L values) laid side by side as [R][G*L]: row r of
/// image j in columns `j * L..(j + 1) * L`.
fn side_by_side<T: WithDType>(x: &[T], g: usize, r: usize, l: usize) -> Vec<T> {
    par_new(r * g * l, g * l, (0..r).into_par_iter(), |row, ri| {
        for (j, dst) in row.chunks_exact_mut(l).enumerate() {
            dst.copy_from_slice(&x[(j * r + ri) * l..][..l]);
        }
    })
}

/// The groups' outputs in order, as one batch (without a copy when there is one group).
fn one_of<T: WithDType>(mut parts: Vec<Vec<T>>) -> Vec<T> {
    match parts.len() {
        1 => parts.pop().unwrap_or_default(),
        _ => parts.concat(),
    }
}

impl Geometry {
    /// `dst (+)= a b` on every thread of the rayon pool (`product_on`).
    fn product_par<T: WithDType>(
        &self,
        mnk: (usize, usize, usize),
        dst: &mut [T],
        accumulate: bool,
        a: Mat<T>,
        b: Mat<T>,
    ) {
        self.product_on(rayon::current_num_threads(), mnk, dst, accumulate, a, b)
    }

    /// The unfolded images of `x` ([G, C, H, W]) side by side, [C*KH*KW, G*L], with the
    /// `prologue` (a batch norm + ReLU per input channel) applied: `im2col`'s rows, written
    /// channel by channel in parallel. Strided convolutions read each image's phase planes,
    /// split first (the prologue applied there).
    fn batch_cols<T: WithDType>(&self, g: usize, x: &[T], prologue: Option<&[(T, T)]>) -> Vec<T> {
        let (l, kk, image) = (self.l(), self.kh * self.kw, self.image());
        let planes = self.cols_len() - self.ckk() * l;
        let phases: Vec<T> = match self.s {
            1 => Vec::new(),
            _ => par_new(g * planes, planes, x.par_chunks(image), |dst, img| {
                self.split_phases(img, dst, prologue)
            }),
        };
        let st = |ci: usize| prologue.filter(|_| self.s == 1).map(|p| p[ci]);
        let dims = self.phase_dims();
        par_new(
            self.ckk() * g * l,
            kk * g * l,
            (0..self.c).into_par_iter(),
            |rows, ci| {
                for j in 0..g {
                    let img = &x[j * image..][..image];
                    let ph = phases.get(j * planes..(j + 1) * planes).unwrap_or(&[]);
                    for ky in 0..self.kh {
                        for kx in 0..self.kw {
                            let row = &mut rows[((ky * self.kw + kx) * g + j) * l..][..l];
                            let (plane, off) = self.tap_plane(img, ph, ci, ky, kx);
                            shifted_copy(plane, dims, (self.oh, self.ow), off, row, st(ci));
                        }
                    }
                }
            },
        )
    }

    /// The forward pass over the batch in products of `g` images (`batch_group`); with
    /// `moments`, each output row's moments (`[N][O]`).
    pub(super) fn forward_batched<T: WithDType>(
        &self,
        (n, g): (usize, usize),
        x: &[T],
        k: &[T],
        mut moments: Option<&mut [Moments]>,
        prologue: Option<&[(T, T)]>,
    ) -> Vec<T> {
        let (o, ckk, l, image) = (self.o, self.ckk(), self.l(), self.image());
        let mut parts = Vec::new();
        for (gi, xg) in x[..n * image].chunks(g * image).enumerate() {
            let gn = xg.len() / image;
            let cols = self.batch_cols(gn, xg, prologue);
            let mut y = vec![T::zero(); o * gn * l];
            let (km, cm) = (Mat::rows(k, ckk), Mat::rows(&cols, gn * l));
            self.product_par((o, gn * l, ckk), &mut y, false, km, cm);
            // back to [G][O][L], with each row's moments while it is in cache
            let m = moments
                .as_deref_mut()
                .map(|m| &mut m[gi * g * o..][..gn * o]);
            let want = m.is_some();
            let mut own = vec![(0.0, 0.0); if want { 0 } else { gn * o }];
            let slots = m.unwrap_or(&mut own);
            let items = (0..gn).into_par_iter().zip(slots.par_chunks_mut(o));
            parts.push(par_new(gn * o * l, o * l, items, |dst, (j, m)| {
                for (oi, row) in dst.chunks_exact_mut(l).enumerate() {
                    row.copy_from_slice(&y[(oi * gn + j) * l..][..l]);
                }
                if want {
                    row_moments(dst, l, m);
                }
            }));
        }
        one_of(parts)
    }

    /// The input gradient over the batch: the folded product `K^T dY` and `col2im` per image,
    /// at every stride. (The forward of the transposed convolution, which the per-image passes
    /// take at stride 1, measured slower here for ResNet-50's 1x1 layers at 7 pixels: 12-16 ms
    /// against 9-12, and level for its 3x3 layers.)
    pub(super) fn grad_input_batched<T: WithDType>(
        &self,
        (n, g): (usize, usize),
        k: &[T],
        dy: &[T],
    ) -> Vec<T> {
        let (o, ckk, l, image) = (self.o, self.ckk(), self.l(), self.image());
        let planes = self.cols_len() - ckk * l;
        let mut parts = Vec::new();
        for dyg in dy[..n * o * l].chunks(g * o * l) {
            let gn = dyg.len() / (o * l);
            let dys = side_by_side(dyg, gn, o, l);
            let mut dcols = vec![T::zero(); ckk * gn * l];
            let (kt, dm) = (Mat::transposed(k, ckk), Mat::rows(&dys, gn * l));
            self.product_par((ckk, gn * l, o), &mut dcols, false, kt, dm);
            let items = (0..gn).into_par_iter();
            parts.push(crate::par_new_with(
                gn * image,
                image,
                items,
                || vec![T::zero(); planes],
                |scratch, dimg, j| self.col2im(&dcols[j * l..], gn * l, dimg, scratch),
            ));
        }
        one_of(parts)
    }

    /// The kernel gradient [O, C, KH, KW] over the batch: `dY · cols^T` per group of `g`
    /// images, the groups added in order.
    pub(super) fn grad_kernel_batched<T: WithDType>(
        &self,
        (n, g): (usize, usize),
        x: &[T],
        dy: &[T],
        prologue: Option<&[(T, T)]>,
    ) -> Vec<T> {
        let (o, ckk, l, image) = (self.o, self.ckk(), self.l(), self.image());
        let mut dk = vec![T::zero(); o * ckk];
        let groups = x[..n * image].chunks(g * image).zip(dy.chunks(g * o * l));
        for (gi, (xg, dyg)) in groups.enumerate() {
            let gn = xg.len() / image;
            let cols = self.batch_cols(gn, xg, prologue);
            let dys = side_by_side(dyg, gn, o, l);
            let (dm, ct) = (Mat::rows(&dys, gn * l), Mat::transposed(&cols, gn * l));
            self.product_par((o, ckk, gn * l), &mut dk, gi > 0, dm, ct);
        }
        dk
    }
}
