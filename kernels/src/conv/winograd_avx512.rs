//! Winograd F(2x2, 3x3) in f32 on CPUs with AVX-512 (F): the arithmetic of `winograd.rs`, with
//! the three steps written for 16-lane vectors and kept in cache, a group of images at a time.
//!
//! `winograd.rs` transforms a whole group through scalar loops that the compiler vectorises
//! (each input row split into its even and odd columns for every tile row that reads it) and
//! multiplies with the `gemm` crate, which packs both operands again; with AVX-512 its
//! transforms cost as much as its products, and the direct tiles were faster. Here:
//! - Input: 16 tiles of a tile row at once. Each tap column of the 4x4 tile is one permute of
//!   two masked loads of the input row (the even or odd columns from the tile's first one;
//!   lanes outside the row read zero, which is the padding), with the batch norm + ReLU
//!   prologue applied to the loaded lanes; `B^T d B` in registers; 16 masked stores into
//!   `V[xi][c][tile]`.
//! - Products: for each of the 16 points `xi`, `M[xi] = U[xi] V[xi]` by tiles of 8 output
//!   channels x 48 tiles summed in 24 vector registers (the direct convolution's tile shape,
//!   with no masks and 2.25x fewer multiplications per output); `U` is stored as
//!   `[xi][o / 8][c][8]`, so each step broadcasts 8 consecutive weights.
//! - Output: `A^T m A` of 16 tiles in registers, the even and odd output columns interleaved by
//!   two permutes and stored with the row's mask.
//! - Where a tile row has 8 tiles or fewer, it takes 8, 4, 2 or 1 lanes (`lane_tiles`: rows of
//!   7 tiles are padded to 8) and each vector holds `16 / lanes` tile rows (`rows_per_vector`),
//!   so the transforms of small images do not run on half-empty vectors.
//! - The input and output-gradient transforms prefetch the planes ahead of the one they read
//!   (`prefetch_ahead`): without it `perf` put their time on the loads of each plane's rows.
//!
//! F(4x4, 3x3) (`winograd4_avx512.rs`) shares this file's layout, grouping and product tiles
//! (`group_of`, `lane_tiles_of`, `products` with 36 points instead of 16) and its own transforms.
//!
//! The kernel gradient (`kernel_grad_avx512`) is the forward pass transposed: the same input
//! transform, `A dy A^T` for the output gradient, and for each point the sum over tiles of
//! their products by tiles of 4 x 4 channels, then `G^T . G` once per weight.
//!
//! Images per group: the fewest padding lanes with `V` and `M` under 256 KB each (the group's
//! tiles are rounded up to a multiple of 16). The grouping is a function of the shape only, and
//! no tile's value depends on the others in its group, so results do not depend on the thread
//! count or on the group.

use super::sum_in_order;
use super::winograd::Winograd;
use crate::par_new_with;
use rayon::prelude::*;
use std::arch::x86_64::*;

/// f32 lanes of one vector.
pub(super) const LANES: usize = 16;
/// Output channels per product tile.
pub(super) const NK: usize = 8;
/// Values in each of a group's `V` and `M` buffers at most (256 KB).
const MAX_BUFFER: usize = 1 << 16;
/// Values between the 16 points' matrices in `V` and `M`, beyond their size: with sizes of
/// 4 KB multiples, the transforms' 16 loads or stores of one tile would all map to the same L1
/// set (measured 1.3-1.5x slower at 16 and 8 pixels).
pub(super) const SKEW: usize = 16;

use crate::bf16::round_bf16_lanes;
pub(super) use crate::lane_mask;

/// The points of a tile of `tile` x `tile` outputs: `(tile + 2)^2` (16 for F(2x2, 3x3), 36 for
/// F(4x4, 3x3)).
fn points_of(tile: usize) -> usize {
    assert!(
        tile == 2 || tile == 4,
        "Winograd: F(2x2) or F(4x4), not F({tile}x{tile})"
    );
    (tile + 2) * (tile + 2)
}

impl Winograd {
    /// (images per group, tile lanes per group) for output tiles of `tile` x `tile`: the fewest
    /// padding lanes per image with both buffers under `MAX_BUFFER`, at most 8 images (one
    /// image where even one exceeds it: F(4x4) at 28 px and 32 channels, 295 KB each); groups
    /// under 48 tiles count 1/8 more (their products run one vector at a time, with 8
    /// broadcasts per 8 multiplications).
    pub(super) fn group_of(&self, tile: usize) -> (usize, usize) {
        let (th, tw) = self.lane_tiles_of(tile);
        let t = th * tw;
        let rows = points_of(tile) * self.c.max(self.o);
        let cost = |g: usize| {
            let tp = (g * t).next_multiple_of(LANES);
            let narrow = if tp < 3 * LANES { 9 } else { 8 };
            (tp * narrow) as f64 / g as f64
        };
        let mut best = 1;
        for g in 2..=8 {
            if rows * (g * t).next_multiple_of(LANES) > MAX_BUFFER {
                break;
            }
            if cost(g) < cost(best) {
                best = g;
            }
        }
        (best, (best * t).next_multiple_of(LANES))
    }

    /// Checks an input of `n` images and a prologue of one (scale, shift) per channel; returns
    /// the values per input image and per output image.
    pub(super) fn checked_sizes(
        &self,
        n: usize,
        x: &[f32],
        prologue: Option<&[(f32, f32)]>,
    ) -> (usize, usize) {
        let image = self.c * self.h * self.w;
        assert_eq!(x.len(), n * image, "Winograd: input of {n} images");
        if let Some(st) = prologue {
            assert_eq!(
                st.len(),
                self.c,
                "Winograd: one (scale, shift) per input channel"
            );
        }
        (image, self.o * self.oh * self.ow)
    }

    /// A thread's buffers for groups of `tp` tile lanes of `tile` x `tile` outputs: `V`
    /// [points][C][tp], `M` (or the output gradient's `Z`) [points][O][tp], each matrix `SKEW`
    /// apart, and the input transform's scratch.
    fn group_buffers_of(&self, tile: usize, tp: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let points = points_of(tile);
        let scratch = if tile == 4 {
            self.scratch_len4()
        } else {
            self.scratch_len()
        };
        (
            vec![0f32; points * (self.c * tp + SKEW)],
            vec![0f32; points * (self.o * tp + SKEW)],
            vec![0f32; scratch],
        )
    }

    /// U = G g G^T as `[xi][o / 8][c][8]`.
    fn kernel_tiles(&self, k: &[f32]) -> Vec<f32> {
        let (o, c) = (self.o, self.c);
        let u = self.transform_kernel(k);
        let mut tiles = vec![0f32; u.len()];
        for xi in 0..16 {
            for oi in 0..o {
                for ci in 0..c {
                    tiles[((xi * (o / NK) + oi / NK) * c + ci) * NK + oi % NK] =
                        u[(xi * o + oi) * c + ci];
                }
            }
        }
        tiles
    }

    /// The convolution of `n` images [N, C, H, W] with a kernel [O, C, 3, 3], of
    /// `relu(x * s + t)` per input channel when a `prologue` [C] of (s, t) is given (bitwise the
    /// batch norm's own arithmetic, `norm::bn_relu`), through output tiles of `tile` x `tile`:
    /// F(2x2, 3x3), or F(4x4, 3x3) with 4 (`winograd4_avx512.rs`). Needs `avx512()`.
    pub(super) fn forward_avx512(
        &self,
        tile: usize,
        n: usize,
        x: &[f32],
        k: &[f32],
        prologue: Option<&[(f32, f32)]>,
    ) -> Vec<f32> {
        assert!(
            self.avx512(),
            "Winograd's AVX-512 path on a CPU or shape without it"
        );
        let (image, out) = self.checked_sizes(n, x, prologue);
        assert_eq!(k.len(), self.o * self.c * 9, "Winograd: a 3x3 kernel");
        let points = points_of(tile);
        let (group, tp) = self.group_of(tile);
        let (th, tw) = self.lane_tiles_of(tile);
        let u = if tile == 4 {
            self.kernel_tiles4(k)
        } else {
            self.kernel_tiles(k)
        };
        par_new_with(
            n * out,
            group * out,
            x.par_chunks(group * image),
            || self.group_buffers_of(tile, tp),
            |(v, m, scratch), y, xs| {
                let imgs = xs.len() / image;
                // SAFETY: `avx512()` was checked above; the buffers hold `tp` lanes per row,
                // `imgs` images fill at most `tp` of them, and `xs` and `y` are `imgs` images.
                unsafe {
                    self.input_of((tile, false), prologue, xs, imgs, tp, v, scratch);
                    let used = (imgs * th * tw).next_multiple_of(LANES);
                    self.products(points, &u, v, m, used, tp);
                    if tile == 4 {
                        self.output4(m, imgs, tp, y);
                    } else {
                        self.output(m, imgs, tp, y);
                    }
                }
            },
        )
    }

    /// The kernel gradient [O, C, 3, 3] of `n` images [N, C, H, W] with output gradients
    /// [N, O, OH, OW], of the input `relu(x * s + t)` when a `prologue` is given: the transpose
    /// of the forward pass, `G^T [ sum over tiles of (A dy A^T) ⊙ (B^T x B) ] G` (the input
    /// transform is the forward's). The images are summed in `groups` groups of `group`
    /// (`Geometry::kernel_groups`, a function of the shape) whose partial sums are added in
    /// order, each group a few images at a time (`group_of`), so the result does not depend on
    /// the thread count. Output tiles of `tile` x `tile`: 2, or 4 for F(4x4, 3x3)
    /// (`winograd4_avx512.rs`). With `round`, the input (after the prologue) and the output
    /// gradient are rounded to bf16 as they are read, so the result is the kernel gradient of a
    /// bf16 convolution, summed in f32. Needs `kernel_grad_on_avx512()`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn kernel_grad_avx512(
        &self,
        (tile, round): (usize, bool),
        n: usize,
        x: &[f32],
        dy: &[f32],
        prologue: Option<&[(f32, f32)]>,
        (group, groups): (usize, usize),
    ) -> Vec<f32> {
        assert!(
            self.kernel_grad_on_avx512(),
            "Winograd's AVX-512 kernel gradient on a CPU or shape without it"
        );
        let (c, o) = (self.c, self.o);
        let (image, out) = self.checked_sizes(n, x, prologue);
        assert_eq!(dy.len(), n * out, "Winograd: output gradient of {n} images");
        assert!(
            group * groups >= n,
            "Winograd: {groups} groups of {group} for {n} images"
        );
        let points = points_of(tile);
        let (sub, tp) = self.group_of(tile);
        let (th, tw) = self.lane_tiles_of(tile);
        let per = points * o * c;
        let mut partials = vec![0f32; groups * per];
        partials.par_chunks_mut(per).enumerate().for_each_init(
            || self.group_buffers_of(tile, tp),
            |(v, z, scratch), (gi, acc)| {
                let end = ((gi + 1) * group).min(n);
                let mut i = gi * group;
                while i < end {
                    let imgs = sub.min(end - i);
                    let xs = &x[i * image..(i + imgs) * image];
                    let gs = &dy[i * out..(i + imgs) * out];
                    let tiles = imgs * th * tw;
                    let used = tiles.next_multiple_of(LANES);
                    // SAFETY: `avx512()` was checked above; the buffers hold `tp` lanes per
                    // row, `imgs` images fill at most `tp` of them (`group_of`), and `xs` and
                    // `gs` are `imgs` images.
                    unsafe {
                        self.input_of((tile, round), prologue, xs, imgs, tp, v, scratch);
                        match (tile, round) {
                            (4, false) => self.output_grad4::<false>(gs, imgs, tp, z),
                            (4, true) => self.output_grad4::<true>(gs, imgs, tp, z),
                            (_, false) => self.output_grad::<false>(gs, imgs, tp, z),
                            (_, true) => self.output_grad::<true>(gs, imgs, tp, z),
                        }
                        // the lanes past the last tile are summed too: zero in both operands
                        for (buf, rows) in [(&mut v[..], c), (&mut z[..], o)] {
                            for xi in 0..points {
                                for r in 0..rows {
                                    let at = xi * (rows * tp + SKEW) + r * tp;
                                    buf[at + tiles..at + used].fill(0.0);
                                }
                            }
                        }
                        self.kernel_products(points, z, v, acc, used, tp);
                    }
                    i += imgs;
                }
            },
        );
        // the groups' sums, added in order; then G^T p G of every (o, c)
        let p = sum_in_order(&partials, per);
        if tile == 4 {
            return self.kernel_from_points4(&p);
        }
        let mut dk = vec![0f32; o * c * 9];
        for (oc, dk) in dk.chunks_exact_mut(9).enumerate() {
            let (oi, ci) = (oc / c, oc % c);
            let at = (oi / 4 * (c / 4) + ci / 4) * 16 + oi % 4 * 4 + ci % 4;
            let q = |xi: usize| p[xi * o * c + at];
            // G^T of four values (a column of p, then a row of G^T p)
            let gt = |p0: f32, p1: f32, p2: f32, p3: f32| {
                [p0 + (p1 + p2) * 0.5, (p1 - p2) * 0.5, (p1 + p2) * 0.5 + p3]
            };
            // cols[s][a] = (G^T p)[a][s]; then row a of (G^T p) G
            let cols: [[f32; 3]; 4] =
                std::array::from_fn(|s| gt(q(s), q(4 + s), q(8 + s), q(12 + s)));
            for (a, dk) in dk.chunks_exact_mut(3).enumerate() {
                dk.copy_from_slice(&gt(cols[0][a], cols[1][a], cols[2][a], cols[3][a]));
            }
        }
        dk
    }

    /// Z = A dy A^T of every output channel and tile of `imgs` images' output gradients into
    /// `z` ([16][O][tp], the tiles numbered as `input`'s): the transpose of `output`.
    ///
    /// # Safety
    /// AVX-512 F; `dy` holds `imgs` output images, `z` 16 * (O * tp + SKEW) values, tp >=
    /// imgs * th * tw.
    #[target_feature(enable = "avx512f")]
    unsafe fn output_grad<const RND: bool>(
        &self,
        dy: &[f32],
        imgs: usize,
        tp: usize,
        z: &mut [f32],
    ) {
        let (o, oh, ow) = (self.o, self.oh, self.ow);
        let (th, tw) = self.lane_tiles();
        debug_assert!(z.len() >= 16 * (o * tp + SKEW) && dy.len() >= imgs * o * oh * ow);
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        let zero = _mm512_setzero_ps();
        let zp = z.as_mut_ptr();
        let per = rows_per_vector(tw);
        let vectors = self.tile_vectors();
        let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        for g in 0..imgs {
            for oc in 0..o {
                let plane = dy.as_ptr().add((g * o + oc) * oh * ow);
                prefetch_ahead(plane, oh * ow);
                for &TileVector {
                    ty,
                    tx0,
                    n_rows,
                    keep,
                } in &vectors
                {
                    let tile = (g * th + ty) * tw + tx0;
                    // the 32 columns from 2 tx0 of the tile rows' row k (for several tile
                    // rows, row j's columns at 2 j tw); zero past the image
                    let row_pair = |k: usize| {
                        let (mut lo, mut hi) = (zero, zero);
                        if per == 1 {
                            let yy = 2 * ty + k;
                            if yy < oh {
                                let col = 2 * tx0 as isize;
                                let src = plane.add(yy * ow + 2 * tx0);
                                let m0 = lane_mask(0, ow as isize - col);
                                let m1 = lane_mask(0, ow as isize - col - 16);
                                lo = _mm512_maskz_loadu_ps(m0, src);
                                hi = _mm512_maskz_loadu_ps(m1, src.wrapping_add(16));
                            }
                            return (lo, hi);
                        }
                        for j in 0..n_rows {
                            let yy = 2 * (ty + j) + k;
                            if yy >= oh {
                                break;
                            }
                            let row = _mm512_maskz_loadu_ps(
                                lane_mask(0, ow as isize),
                                plane.add(yy * ow),
                            );
                            // lanes at..at + 2 tw of the 32 take the row's first 2 tw
                            let at = (2 * j * tw) as isize;
                            let to = at + 2 * tw as isize;
                            let shift = _mm512_set1_epi32(at as i32);
                            let idx = _mm512_sub_epi32(iota, shift);
                            let m0 = lane_mask(at, to);
                            if m0 != 0 {
                                lo = _mm512_mask_permutexvar_ps(lo, m0, idx, row);
                            }
                            let m1 = lane_mask(at - 16, to - 16);
                            if m1 != 0 {
                                let idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16));
                                hi = _mm512_mask_permutexvar_ps(hi, m1, idx, row);
                            }
                        }
                        (lo, hi)
                    };
                    // (even, odd) columns of the tiles' two rows
                    let mut r = [(zero, zero); 2];
                    for (k, r) in r.iter_mut().enumerate() {
                        let (mut lo, mut hi) = row_pair(k);
                        if RND {
                            (lo, hi) = (round_bf16_lanes(lo), round_bf16_lanes(hi));
                        }
                        *r = (
                            _mm512_permutex2var_ps(lo, even, hi),
                            _mm512_permutex2var_ps(lo, odd, hi),
                        );
                    }
                    // rows of A g: g0, g0 + g1, g0 - g1, -g1; then each row (a, b) times
                    // A^T: a, a + b, a - b, -b
                    let ((e0, o0), (e1, o1)) = (r[0], r[1]);
                    let rows = [
                        (e0, o0),
                        (_mm512_add_ps(e0, e1), _mm512_add_ps(o0, o1)),
                        (_mm512_sub_ps(e0, e1), _mm512_sub_ps(o0, o1)),
                        (_mm512_sub_ps(zero, e1), _mm512_sub_ps(zero, o1)),
                    ];
                    for (rr, (a, b)) in rows.into_iter().enumerate() {
                        let vals = [
                            a,
                            _mm512_add_ps(a, b),
                            _mm512_sub_ps(a, b),
                            _mm512_sub_ps(zero, b),
                        ];
                        for (s, val) in vals.into_iter().enumerate() {
                            let at = (rr * 4 + s) * (o * tp + SKEW) + oc * tp + tile;
                            _mm512_mask_storeu_ps(zp.add(at), keep, val);
                        }
                    }
                }
            }
        }
    }

    /// `acc[xi] += Z[xi] V[xi]^T` for each of the `points` points, over the first `used` tiles
    /// (a multiple of 16), by tiles of 4 output x 4 input channels: 16 vector sums along the
    /// tiles, then one vector of their 16 totals added to `acc`, laid out
    /// `[xi][o / 4][c / 4][o % 4][c % 4]`.
    ///
    /// # Safety
    /// AVX-512 F; `z` [points][O][tp], `v` [points][C][tp], `acc` points O C values; used <= tp.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop)] // constant index ranges: the sums stay in registers
    unsafe fn kernel_products(
        &self,
        points: usize,
        z: &[f32],
        v: &[f32],
        acc: &mut [f32],
        used: usize,
        tp: usize,
    ) {
        let (c, o) = (self.c, self.o);
        debug_assert!(used <= tp && used.is_multiple_of(LANES));
        debug_assert!(acc.len() == points * o * c);
        debug_assert!(v.len() >= points * (c * tp + SKEW) && z.len() >= points * (o * tp + SKEW));
        let ap = acc.as_mut_ptr();
        for xi in 0..points {
            let zx = z.as_ptr().add(xi * (o * tp + SKEW));
            let vx = v.as_ptr().add(xi * (c * tp + SKEW));
            for ob in 0..o / 4 {
                let zo = zx.add(ob * 4 * tp);
                for cb in 0..c / 4 {
                    let vc = vx.add(cb * 4 * tp);
                    // s[4 j + i]: input channel j, output channel i of the block
                    let mut s = [_mm512_setzero_ps(); 16];
                    for t in (0..used).step_by(LANES) {
                        let mut zv = [_mm512_setzero_ps(); 4];
                        let mut vv = [_mm512_setzero_ps(); 4];
                        for i in 0..4 {
                            zv[i] = _mm512_loadu_ps(zo.add(i * tp + t));
                            vv[i] = _mm512_loadu_ps(vc.add(i * tp + t));
                        }
                        for j in 0..4 {
                            for i in 0..4 {
                                s[4 * j + i] = _mm512_fmadd_ps(zv[i], vv[j], s[4 * j + i]);
                            }
                        }
                    }
                    // lane 4 i + j: output channel i, input channel j
                    let at = ap.add(((xi * (o / 4) + ob) * (c / 4) + cb) * 16);
                    _mm512_storeu_ps(at, _mm512_add_ps(_mm512_loadu_ps(at), sum_lanes(s)));
                }
            }
        }
    }

    /// Values of `input`'s per-thread scratch.
    fn scratch_len(&self) -> usize {
        let th = self.lane_tiles().0;
        ((2 * th + 2) * 4 * LANES).max(8 * self.packed_stride())
    }

    /// The length of each of the 8 packed row arrays of `input` (`rows_per_vector` > 1):
    /// `th + 1` rows of `tw` lanes, and one vector's slack for the loads past the last row.
    fn packed_stride(&self) -> usize {
        let (th, tw) = self.lane_tiles();
        (th + 1) * tw + LANES
    }

    /// The input transform of tiles of `tile` x `tile` outputs (`input`, or `input4` with 4),
    /// with the prologue when one is given, and each value rounded to bf16 as it is read when
    /// `round` (`round_bf16_lanes`: the kernel gradient of a bf16 convolution).
    ///
    /// # Safety
    /// As `input` (`input4`).
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn input_of(
        &self,
        (tile, round): (usize, bool),
        prologue: Option<&[(f32, f32)]>,
        xs: &[f32],
        imgs: usize,
        tp: usize,
        v: &mut [f32],
        scratch: &mut [f32],
    ) {
        let st = prologue.unwrap_or(&[]);
        match (tile, prologue.is_some(), round) {
            (4, true, false) => self.input4::<true, false>(xs, imgs, st, tp, v, scratch),
            (4, false, false) => self.input4::<false, false>(xs, imgs, st, tp, v, scratch),
            (4, true, true) => self.input4::<true, true>(xs, imgs, st, tp, v, scratch),
            (4, false, true) => self.input4::<false, true>(xs, imgs, st, tp, v, scratch),
            (_, true, false) => self.input::<true, false>(xs, imgs, st, tp, v, scratch),
            (_, false, false) => self.input::<false, false>(xs, imgs, st, tp, v, scratch),
            (_, true, true) => self.input::<true, true>(xs, imgs, st, tp, v, scratch),
            (_, false, true) => self.input::<false, true>(xs, imgs, st, tp, v, scratch),
        }
    }

    /// V = B^T d B of every channel and tile of `imgs` images into `v` ([16][C][tp]; tile
    /// `(g * th + ty) * tw + tx`).
    ///
    /// Each padded row is multiplied by B once (`row_times_b`), then four rows at a time by
    /// B^T, 16 tiles of a tile row per vector. Rows of 8 tiles or fewer would fill half a vector
    /// or less, so where `rows_per_vector` packs them the products with B are stored packed:
    /// row `pr` at `(pr / 2) * tw` of an array per parity of `pr`, where the rows that
    /// consecutive tile rows read follow one another; one load then holds `16 / tw` tile rows.
    ///
    /// # Safety
    /// AVX-512 F; `xs` holds `imgs` images, `v` 16 * (C * tp + SKEW) values, tp >= imgs * th *
    /// tw; `scratch` `scratch_len()` values.
    #[target_feature(enable = "avx512f")]
    unsafe fn input<const BN: bool, const RND: bool>(
        &self,
        xs: &[f32],
        imgs: usize,
        st: &[(f32, f32)],
        tp: usize,
        v: &mut [f32],
        scratch: &mut [f32],
    ) {
        let (c, h, w) = (self.c, self.h, self.w);
        let (th, tw) = self.lane_tiles();
        debug_assert!(v.len() >= 16 * (c * tp + SKEW) && tp >= imgs * th * tw);
        debug_assert!(scratch.len() >= self.scratch_len());
        let zero = _mm512_setzero_ps();
        let vp = v.as_mut_ptr();
        // padded rows that the tiles read
        let rows = 2 * th + 2;
        let ep = scratch.as_mut_ptr();
        let per = rows_per_vector(tw);
        let stride = self.packed_stride();
        // B^T of four rows (or of four columns): the values of points r = 0..4
        let bt = |d0, d1, d2, d3| {
            [
                _mm512_sub_ps(d0, d2),
                _mm512_add_ps(d1, d2),
                _mm512_sub_ps(d2, d1),
                _mm512_sub_ps(d1, d3),
            ]
        };
        for g in 0..imgs {
            for ci in 0..c {
                let plane = xs.as_ptr().add((g * c + ci) * h * w);
                prefetch_ahead(plane, h * w);
                let (sv, tv) = match st.get(ci) {
                    Some(&(s, t)) if BN => (_mm512_set1_ps(s), _mm512_set1_ps(t)),
                    _ => (zero, zero),
                };
                let v_at = |r: usize, s: usize, tile: usize| {
                    vp.add((r * 4 + s) * (c * tp + SKEW) + ci * tp + tile)
                };
                if per > 1 {
                    let row_mask = lane_mask(0, tw as isize);
                    for pr in 0..rows {
                        let e = self.row_times_b::<BN, RND>(plane, pr, 0, (sv, tv));
                        let at = (pr % 2) * 4 * stride + pr / 2 * tw;
                        for (s, e) in e.into_iter().enumerate() {
                            _mm512_mask_storeu_ps(ep.add(at + s * stride), row_mask, e);
                        }
                    }
                    for ty in (0..th).step_by(per) {
                        let keep = lane_mask(0, (per.min(th - ty) * tw) as isize);
                        let tile = (g * th + ty) * tw;
                        // padded row 2 ty + k of the tile rows from ty
                        let e = |k: usize, s: usize| {
                            _mm512_loadu_ps(ep.add(((k % 2) * 4 + s) * stride + (ty + k / 2) * tw))
                        };
                        for s in 0..4 {
                            for (r, val) in bt(e(0, s), e(1, s), e(2, s), e(3, s))
                                .into_iter()
                                .enumerate()
                            {
                                _mm512_mask_storeu_ps(v_at(r, s, tile), keep, val);
                            }
                        }
                    }
                    continue;
                }
                for tx0 in (0..tw).step_by(LANES) {
                    let keep = lane_mask(0, (tw - tx0) as isize);
                    // e[pr][s]: padded row pr times B, once per row
                    for pr in 0..rows {
                        let e = self.row_times_b::<BN, RND>(plane, pr, tx0, (sv, tv));
                        for (s, e) in e.into_iter().enumerate() {
                            _mm512_storeu_ps(ep.add((pr * 4 + s) * LANES), e);
                        }
                    }
                    for ty in 0..th {
                        let e = |k: usize, s: usize| {
                            _mm512_loadu_ps(ep.add(((2 * ty + k) * 4 + s) * LANES))
                        };
                        let tile = (g * th + ty) * tw + tx0;
                        for s in 0..4 {
                            for (r, val) in bt(e(0, s), e(1, s), e(2, s), e(3, s))
                                .into_iter()
                                .enumerate()
                            {
                                _mm512_mask_storeu_ps(v_at(r, s, tile), keep, val);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Padded row `pr` (input row `pr - p`) of one plane times B, for the 16 tiles from `tx0`:
    /// value `s`, lane `t` is column `s` of `d B` for the row's four columns from
    /// `2 (tx0 + t) - p`, with the prologue `relu(x * s + t)` applied to the loaded values when
    /// `BN`. Zero outside the image (the padding).
    ///
    /// # Safety
    /// AVX-512 F; `plane` is an H x W plane.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn row_times_b<const BN: bool, const RND: bool>(
        &self,
        plane: *const f32,
        pr: usize,
        tx0: usize,
        (sv, tv): (__m512, __m512),
    ) -> [__m512; 4] {
        let (h, w, p) = (self.h, self.w, self.p as isize);
        let zero = _mm512_setzero_ps();
        let iy = pr as isize - p;
        if iy < 0 || iy >= h as isize {
            return [zero; 4];
        }
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        // the 48 columns from `base` of the row, as three masked loads: lanes outside the row
        // read zero (the padding); masked-off lanes are not read, and `wrapping_offset` keeps
        // the address arithmetic defined outside the row
        let base = 2 * tx0 as isize - p;
        let (lo, hi) = (-base, w as isize - base);
        let src = plane.add(iy as usize * w).wrapping_offset(base);
        let mut x = [zero; 3];
        for (i, x) in x.iter_mut().enumerate() {
            let mask = lane_mask(lo - 16 * i as isize, hi - 16 * i as isize);
            if mask == 0 {
                continue;
            }
            *x = _mm512_maskz_loadu_ps(mask, src.wrapping_add(16 * i));
            if BN {
                // relu(x * s + t), zero in the padding
                let y = _mm512_add_ps(_mm512_mul_ps(*x, sv), tv);
                *x = _mm512_maskz_max_ps(mask, y, zero);
            }
            if RND {
                *x = round_bf16_lanes(*x);
            }
        }
        // d[s]: columns 2 tx + s - p; from base + 2, the vectors moved down two lanes
        let (a2, b2) = (shift2(x[1], x[0]), shift2(x[2], x[1]));
        let d0 = _mm512_permutex2var_ps(x[0], even, x[1]);
        let d1 = _mm512_permutex2var_ps(x[0], odd, x[1]);
        let d2 = _mm512_permutex2var_ps(a2, even, b2);
        let d3 = _mm512_permutex2var_ps(a2, odd, b2);
        [
            _mm512_sub_ps(d0, d2),
            _mm512_add_ps(d1, d2),
            _mm512_sub_ps(d2, d1),
            _mm512_sub_ps(d1, d3),
        ]
    }

    /// M[xi] = U[xi] V[xi] for each of the `points` points and the first `used` tiles (a
    /// multiple of 16).
    ///
    /// # Safety
    /// AVX-512 F; `u` from `kernel_tiles` (or F(4x4, 3x3)'s), `v` [points][C][tp], `m`
    /// [points][O][tp], used <= tp.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn products(
        &self,
        points: usize,
        u: &[f32],
        v: &[f32],
        m: &mut [f32],
        used: usize,
        tp: usize,
    ) {
        let (c, o) = (self.c, self.o);
        debug_assert!(used <= tp && used.is_multiple_of(LANES));
        debug_assert!(u.len() == points * o * c);
        debug_assert!(v.len() >= points * (c * tp + SKEW) && m.len() >= points * (o * tp + SKEW));
        for xi in 0..points {
            let vx = v.as_ptr().add(xi * (c * tp + SKEW));
            for ob in 0..o / NK {
                let uo = u.as_ptr().add((xi * (o / NK) + ob) * c * NK);
                let mo = m.as_mut_ptr().add(xi * (o * tp + SKEW) + ob * NK * tp);
                let mut t = 0;
                while t < used {
                    // 3 vectors per tile; a remainder of 4 as two tiles of 2
                    let nv = match (used - t) / LANES {
                        r @ (1 | 2) => r,
                        4 => 2,
                        _ => 3,
                    };
                    let (vt, mt) = (vx.add(t), mo.add(t));
                    match nv {
                        1 => product_tile::<1>(uo, vt, mt, c, tp),
                        2 => product_tile::<2>(uo, vt, mt, c, tp),
                        _ => product_tile::<3>(uo, vt, mt, c, tp),
                    }
                    t += nv * LANES;
                }
            }
        }
    }

    /// Y = A^T m A of every output channel and tile, written into `imgs` NCHW images.
    ///
    /// # Safety
    /// AVX-512 F; `m` [16][O][tp], `y` `imgs` output images.
    #[target_feature(enable = "avx512f")]
    unsafe fn output(&self, m: &[f32], imgs: usize, tp: usize, y: &mut [f32]) {
        let (o, oh, ow) = (self.o, self.oh, self.ow);
        let (th, tw) = self.lane_tiles();
        debug_assert!(m.len() >= 16 * (o * tp + SKEW) && y.len() >= imgs * o * oh * ow);
        let lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let hi_idx =
            _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        let mp = m.as_ptr();
        let per = rows_per_vector(tw);
        let vectors = self.tile_vectors();
        let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let row_mask = lane_mask(0, ow as isize);
        for g in 0..imgs {
            for oc in 0..o {
                let plane = y.as_mut_ptr().add((g * o + oc) * oh * ow);
                for &TileVector {
                    ty,
                    tx0,
                    n_rows,
                    keep,
                } in &vectors
                {
                    let tile = (g * th + ty) * tw + tx0;
                    let mut mm = [_mm512_setzero_ps(); 16];
                    for (xi, mm) in mm.iter_mut().enumerate() {
                        let at = xi * (o * tp + SKEW) + oc * tp + tile;
                        *mm = _mm512_maskz_loadu_ps(keep, mp.add(at));
                    }
                    // u[r][j]: rows of A^T m
                    let mut u = [[_mm512_setzero_ps(); 4]; 2];
                    for j in 0..4 {
                        u[0][j] = _mm512_add_ps(_mm512_add_ps(mm[j], mm[4 + j]), mm[8 + j]);
                        u[1][j] = _mm512_sub_ps(_mm512_sub_ps(mm[4 + j], mm[8 + j]), mm[12 + j]);
                    }
                    let col = 2 * tx0 as isize;
                    let (mlo, mhi) = (
                        lane_mask(0, ow as isize - col),
                        lane_mask(0, ow as isize - col - 16),
                    );
                    for (r, u) in u.iter().enumerate() {
                        if 2 * ty + r >= oh {
                            continue;
                        }
                        let ye = _mm512_add_ps(_mm512_add_ps(u[0], u[1]), u[2]);
                        let yo = _mm512_sub_ps(_mm512_sub_ps(u[1], u[2]), u[3]);
                        let lo = _mm512_permutex2var_ps(ye, lo_idx, yo);
                        let hi = _mm512_permutex2var_ps(ye, hi_idx, yo);
                        if per == 1 {
                            let dst = plane.add((2 * ty + r) * ow + 2 * tx0);
                            _mm512_mask_storeu_ps(dst, mlo, lo);
                            _mm512_mask_storeu_ps(dst.wrapping_add(16), mhi, hi);
                            continue;
                        }
                        // tile row j's outputs: the 2 tw columns from 2 j tw of the 32
                        for j in 0..n_rows {
                            let yy = 2 * (ty + j) + r;
                            if yy >= oh {
                                break;
                            }
                            let at = _mm512_set1_epi32((2 * j * tw) as i32);
                            let idx = _mm512_add_epi32(iota, at);
                            let out = _mm512_permutex2var_ps(lo, idx, hi);
                            _mm512_mask_storeu_ps(plane.add(yy * ow), row_mask, out);
                        }
                    }
                }
            }
        }
    }
}

/// One vector of tiles in the output transforms: `n_rows` tile rows from `ty` where
/// `rows_per_vector` packs several, else the 16 tiles of row `ty` from `tx0`; `keep` masks the
/// lanes that hold tiles.
#[derive(Clone, Copy)]
pub(super) struct TileVector {
    pub ty: usize,
    pub tx0: usize,
    pub n_rows: usize,
    pub keep: u16,
}

impl Winograd {
    /// (tile rows, lanes per tile row) of one image in the transforms' buffers: rows of 5 to 7
    /// tiles take 8 lanes, 3 take 4, so that `rows_per_vector` packs them as it packs rows of 8
    /// and 4 (the padding tiles read the row's edge and zeros, and their outputs are not
    /// stored; their output gradients are zero, so the kernel gradient's sums do not change).
    fn lane_tiles(&self) -> (usize, usize) {
        self.lane_tiles_of(2)
    }

    /// `lane_tiles` for output tiles of `tile` x `tile`.
    pub(super) fn lane_tiles_of(&self, tile: usize) -> (usize, usize) {
        let (th, tw) = (self.oh.div_ceil(tile), self.ow.div_ceil(tile));
        if tw <= LANES / 2 {
            (th, tw.next_power_of_two())
        } else {
            (th, tw)
        }
    }

    /// The vectors that cover one image's tiles, in tile order.
    fn tile_vectors(&self) -> Vec<TileVector> {
        self.tile_vectors_of(2)
    }

    /// `tile_vectors` for output tiles of `tile` x `tile`.
    pub(super) fn tile_vectors_of(&self, tile: usize) -> Vec<TileVector> {
        let (th, tw) = self.lane_tiles_of(tile);
        let per = rows_per_vector(tw);
        let mut vectors = Vec::new();
        for ty in (0..th).step_by(per) {
            for tx0 in (0..tw).step_by(LANES) {
                let n_rows = per.min(th - ty);
                let lanes = if per == 1 { tw - tx0 } else { n_rows * tw };
                let keep = lane_mask(0, lanes as isize);
                vectors.push(TileVector {
                    ty,
                    tx0,
                    n_rows,
                    keep,
                });
            }
        }
        vectors
    }
}

/// Tile rows per vector in the transforms: `16 / tw` where rows of `tw` lanes (`lane_tiles`)
/// fill a vector exactly (8, 4, 2 or 1: the 16, 8, 4 and 2 px layers, and the 14, 10, 6 px ones
/// padded), one row (16 tiles at a time) otherwise. Measured per layer: 8 px 1.2x faster
/// packed, 16 px 1.05x; 14 px 1.1x padded to rows of 8 (packed without padding, 14 of 16 lanes,
/// it was level).
pub(super) fn rows_per_vector(tw: usize) -> usize {
    if tw <= LANES / 2 && LANES.is_multiple_of(tw) {
        LANES / tw
    } else {
        1
    }
}

/// Asks for the cache lines of the planes ahead of `plane` (of `len` values each): as many whole
/// planes ahead as fit in 8 KB, at least two. The transforms read their planes in order, yet
/// `perf` put their time on the first use of each loaded row: the hardware alone does not fetch
/// far enough ahead of a loop that computes this much per row.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn prefetch_ahead(plane: *const f32, len: usize) {
    let from = plane.wrapping_add(len * (2048 / len.max(1)).max(2));
    for i in (0..len).step_by(LANES) {
        // a prefetch never faults: the address is only computed (`wrapping_add`), never
        // dereferenced
        _mm_prefetch::<_MM_HINT_T0>(from.wrapping_add(i) as *const i8);
    }
}

/// Lanes 2..16 of `lo` followed by lanes 0..2 of `hi`: a row's vector two columns on.
#[inline]
#[target_feature(enable = "avx512f")]
fn shift2(hi: __m512, lo: __m512) -> __m512 {
    _mm512_castsi512_ps(_mm512_alignr_epi32::<2>(
        _mm512_castps_si512(hi),
        _mm512_castps_si512(lo),
    ))
}

/// The 16 vectors' totals in one vector: lane `4 q + r` is the sum of the lanes of `a[4 r + q]`
/// (four rounds of pairwise 128-bit and 32-bit shuffles and adds).
#[inline]
#[target_feature(enable = "avx512f")]
fn sum_lanes(a: [__m512; 16]) -> __m512 {
    // each of a pair's halves, then quarters, then pairs of lanes, then lanes, summed
    let b: [__m512; 8] = std::array::from_fn(|i| {
        let (x, y) = (a[2 * i], a[2 * i + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x44>(x, y),
            _mm512_shuffle_f32x4::<0xEE>(x, y),
        )
    });
    let c: [__m512; 4] = std::array::from_fn(|i| {
        let (x, y) = (b[2 * i], b[2 * i + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(x, y),
            _mm512_shuffle_f32x4::<0xDD>(x, y),
        )
    });
    let pairs = |x: __m512, y: __m512| {
        _mm512_add_ps(
            _mm512_shuffle_ps::<0x88>(x, y),
            _mm512_shuffle_ps::<0xDD>(x, y),
        )
    };
    pairs(pairs(c[0], c[1]), pairs(c[2], c[3]))
}

/// `m[r][t..t + 16 NV] = sum over c of u[c][r] v[c][t..]` for the 8 output channels `r` of
/// one block: 8 x NV vector sums in registers, one pass over the input channels.
///
/// # Safety
/// AVX-512 F; `u` [C][8], `v` C rows of `tp` from the tile, `m` 8 rows of `tp` from the tile,
/// each holding 16 NV values from there.
#[target_feature(enable = "avx512f")]
#[allow(clippy::needless_range_loop)] // constant index ranges: the sums stay in registers
unsafe fn product_tile<const NV: usize>(
    u: *const f32,
    v: *const f32,
    m: *mut f32,
    c: usize,
    tp: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); NV]; NK];
    for ci in 0..c {
        let mut xv = [_mm512_setzero_ps(); NV];
        for j in 0..NV {
            xv[j] = _mm512_loadu_ps(v.add(ci * tp + j * LANES));
        }
        for r in 0..NK {
            let b = _mm512_set1_ps(*u.add(ci * NK + r));
            for j in 0..NV {
                acc[r][j] = _mm512_fmadd_ps(xv[j], b, acc[r][j]);
            }
        }
    }
    for r in 0..NK {
        for j in 0..NV {
            _mm512_storeu_ps(m.add(r * tp + j * LANES), acc[r][j]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::norm::bn_relu;
    use crate::testing::{max_rel_err, rand_tensor};
    use candle_core::{Device, Tensor};

    fn shape(c: usize, h: usize, w: usize, o: usize, p: usize) -> Winograd {
        let (oh, ow) = (h + 2 * p - 2, w + 2 * p - 2);
        Winograd {
            c,
            h,
            w,
            o,
            p,
            oh,
            ow,
        }
    }

    /// F(2x2, 3x3) and F(4x4, 3x3) against candle's convolution, with and without the batch
    /// norm + ReLU prologue (applied to the input first with the batch norm's own arithmetic):
    /// odd sizes (partial tiles), rows of more than 16 tiles (several vectors, the last
    /// partial), rows of 9 to 16 tiles (F(4x4)'s 16-lane gathers), rows of 8, 4, 2 and 1 tiles
    /// (packed several per vector) and of 7, 5 and 3 (padded to 8 and 4 lanes; 28 px through
    /// F(4x4)), padding 0 to 2, groups of several images and a last group that is not full.
    #[test]
    fn matches_candle_with_and_without_the_prologue() {
        if !crate::paths::cpu().avx512 {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        for (n, c, h, w, o, p) in [
            (3, 8, 7, 9, 8, 1),
            (5, 16, 14, 14, 32, 1),
            (2, 16, 32, 32, 16, 1),
            (2, 8, 37, 45, 16, 1),
            (1, 9, 5, 6, 24, 0),
            (2, 3, 3, 3, 8, 2),
            (1, 8, 1, 1, 8, 1),
            (11, 32, 8, 8, 64, 1),
            // rows of 8 and 4 tiles packed 2 and 4 per vector, an odd output height (rows of 7,
            // 5 and 3 tiles, padded to 8 and 4 lanes, are the shapes above)
            (3, 16, 16, 16, 16, 1),
            (2, 8, 7, 8, 8, 1),
            (2, 32, 28, 28, 32, 1),
            (2, 8, 70, 75, 8, 1),
            (11, 32, 4, 4, 64, 1),
        ] {
            let wg = shape(c, h, w, o, p);
            let x = rand_tensor(&[n, c, h, w], 1, candle_core::DType::F32);
            let k = rand_tensor(&[o, c, 3, 3], 2, candle_core::DType::F32);
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let ks = k.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let st: Vec<(f32, f32)> = (0..c)
                .map(|i| (0.5 + 0.1 * i as f32, 0.2 - 0.05 * i as f32))
                .collect();
            for (tile, prologue) in [2, 4]
                .into_iter()
                .flat_map(|t| [(t, None), (t, Some(&st[..]))])
            {
                let a: Vec<f32> = match prologue {
                    None => xs.clone(),
                    Some(st) => xs
                        .iter()
                        .enumerate()
                        .map(|(i, &v)| bn_relu(v, st[i / (h * w) % c]))
                        .collect(),
                };
                let a = Tensor::from_vec(a, (n, c, h, w), &Device::Cpu).unwrap();
                let want = a.conv2d(&k, p, 1, 1, 1).unwrap();
                let got = wg.forward_avx512(tile, n, &xs, &ks, prologue);
                let got = Tensor::from_vec(got, want.shape(), &Device::Cpu).unwrap();
                let err = max_rel_err(&got, &want);
                let on = prologue.is_some();
                // F(4x4)'s larger transform coefficients round a few times more
                let tol = if tile == 4 { 2e-5 } else { 1e-5 };
                let shape = format!("F({tile}x{tile}) {n} {c} {h} {w} {o} p{p} prologue {on}");
                assert!(err < tol, "{shape}: {err}");
            }
        }
    }

    /// The kernel gradient against its definition summed in f64, through F(2x2, 3x3) and
    /// F(4x4, 3x3), with and without the prologue: partial tiles (odd sizes), rows of several
    /// 16-tile chunks, rows of 7 tiles (28 px through F(4x4)), padding 0 to 2, kernel groups of
    /// one and several images, sub-groups that do not fill a group.
    #[test]
    fn kernel_gradient_matches_its_definition() {
        if !crate::paths::cpu().avx512 {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        for (n, c, h, w, o, p, group) in [
            (3, 8, 7, 9, 8, 1, 2),
            (5, 16, 14, 14, 32, 1, 5),
            (2, 16, 32, 32, 16, 1, 1),
            (2, 8, 37, 45, 16, 1, 2),
            (1, 4, 5, 6, 24, 0, 1),
            (2, 4, 3, 3, 8, 2, 1),
            (1, 8, 1, 1, 8, 1, 1),
            (11, 32, 8, 8, 64, 1, 6),
            (3, 16, 16, 16, 16, 1, 2),
            (2, 8, 7, 8, 8, 1, 1),
            (3, 16, 28, 28, 8, 1, 2),
            (2, 4, 70, 75, 8, 1, 1),
        ] {
            let wg = shape(c, h, w, o, p);
            let (oh, ow) = (wg.oh, wg.ow);
            let x = rand_tensor(&[n, c, h, w], 5, candle_core::DType::F32);
            let g = rand_tensor(&[n, o, oh, ow], 6, candle_core::DType::F32);
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let gs = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let st: Vec<(f32, f32)> = (0..c)
                .map(|i| (0.5 + 0.1 * i as f32, 0.2 - 0.05 * i as f32))
                .collect();
            for (tile, prologue) in [2, 4]
                .into_iter()
                .flat_map(|t| [(t, None), (t, Some(&st[..]))])
            {
                let a = |ni: usize, ci: usize, y: isize, x: isize| -> f64 {
                    if y < 0 || x < 0 || y >= h as isize || x >= w as isize {
                        return 0.0;
                    }
                    let v = xs[((ni * c + ci) * h + y as usize) * w + x as usize];
                    prologue.map_or(v, |st| bn_relu(v, st[ci])) as f64
                };
                let mut want = vec![0f64; o * c * 9];
                for (i, want) in want.iter_mut().enumerate() {
                    let (oi, ci, ky, kx) = (i / (c * 9), i / 9 % c, i / 3 % 3, i % 3);
                    for ni in 0..n {
                        for y in 0..oh {
                            for xx in 0..ow {
                                let d = gs[((ni * o + oi) * oh + y) * ow + xx] as f64;
                                let (iy, ix) = (
                                    (y + ky) as isize - p as isize,
                                    (xx + kx) as isize - p as isize,
                                );
                                *want += d * a(ni, ci, iy, ix);
                            }
                        }
                    }
                }
                let groups = (group, n.div_ceil(group));
                let got = wg.kernel_grad_avx512((tile, false), n, &xs, &gs, prologue, groups);
                let scale = want.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
                let err = got
                    .iter()
                    .zip(&want)
                    .map(|(&a, b)| (a as f64 - b).abs())
                    .fold(0.0, f64::max)
                    / scale;
                let on = prologue.is_some();
                // F(4x4)'s larger transform coefficients round a few times more
                let tol = if tile == 4 { 2e-5 } else { 1e-5 };
                let shape = format!("F({tile}x{tile}) {n} {c} {h} {w} {o} p{p} group {group}");
                assert!(err < tol, "{shape} prologue {on}: {err}");
            }
        }
    }

    /// The kernel gradient is the same bits on 1 and 3 threads.
    #[test]
    fn kernel_gradient_does_not_depend_on_threads() {
        if !crate::paths::cpu().avx512 {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        let (n, c, h, w, o) = (9, 16, 14, 14, 16);
        let wg = shape(c, h, w, o, 1);
        let x = rand_tensor(&[n, c, h, w], 7, candle_core::DType::F32);
        let g = rand_tensor(&[n, o, h, w], 8, candle_core::DType::F32);
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let gs = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let on = |tile: usize, threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| wg.kernel_grad_avx512((tile, false), n, &xs, &gs, None, (2, 5)))
        };
        for tile in [2, 4] {
            assert_eq!(on(tile, 1), on(tile, 3), "F({tile}x{tile}, 3x3)");
        }
    }

    /// `sum_lanes`: lane `4 q + r` of the result is the total of `a[4 r + q]`.
    #[test]
    fn sum_lanes_transposes_the_totals() {
        if !crate::paths::cpu().avx512 {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        // lane l of a[k] is 16 k + l: a[k]'s total is 256 k + 120, distinct for every k
        let mut got = [0f32; 16];
        // SAFETY: AVX-512 was checked above; `got` holds 16 values.
        unsafe {
            let a: [__m512; 16] = std::array::from_fn(|k| {
                let lanes: [f32; 16] = std::array::from_fn(|l| (k * 16 + l) as f32);
                _mm512_loadu_ps(lanes.as_ptr())
            });
            _mm512_storeu_ps(got.as_mut_ptr(), sum_lanes(a));
        }
        for (lane, &v) in got.iter().enumerate() {
            let (q, r) = (lane / 4, lane % 4);
            assert_eq!(v, (256 * (4 * r + q) + 120) as f32, "lane {lane}");
        }
    }

    /// An image's output is the same bits whatever images share its group (no tile's value
    /// depends on another's), so the result does not depend on the batch size or the split.
    #[test]
    fn an_image_does_not_depend_on_its_group() {
        if !crate::paths::cpu().avx512 {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        let (n, c, h, w, o) = (7, 16, 14, 14, 16);
        let wg = shape(c, h, w, o, 1);
        let x = rand_tensor(&[n, c, h, w], 3, candle_core::DType::F32);
        let k = rand_tensor(&[o, c, 3, 3], 4, candle_core::DType::F32);
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let ks = k.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (image, out) = (c * h * w, o * h * w);
        for tile in [2, 4] {
            let several = wg.group_of(tile).0 > 1;
            assert!(
                several,
                "F({tile}x{tile}): the test needs groups of several images"
            );
            let all = wg.forward_avx512(tile, n, &xs, &ks, None);
            for i in 0..n {
                let one = wg.forward_avx512(tile, 1, &xs[i * image..][..image], &ks, None);
                assert_eq!(one, all[i * out..][..out], "F({tile}x{tile}) image {i}");
            }
        }
    }
}
