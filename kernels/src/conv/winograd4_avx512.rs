//! Winograd F(4x4, 3x3) in f32 on CPUs with AVX-512 (F), for the forward pass and the input
//! gradient (Lavin & Gray, 2016, with the points 0, ±1, ±2 and ∞): each 4x4 output tile is
//! `A^T [ (G g G^T) ⊙ (B^T d B) ] A` over a 6x6 input tile, 36 multiplications per 16 outputs
//! where F(2x2, 3x3) (`winograd_avx512.rs`) takes 64, and 36 transformed values per 16 outputs
//! to write and read again instead of 64. Its transforms cost more arithmetic per value (their
//! coefficients are 1, 2, 4, 5 and 8, so each value is a few adds and one or two FMAs), and its
//! rounding error is a few times F(2x2)'s (relative to the output's scale, up to 5e-6 in the
//! tests against 1e-6). Both tile sizes run through `Winograd::forward_avx512` and
//! `kernel_grad_avx512` (`tile` 2 or 4), whose tests in `winograd_avx512.rs` cover both.
//!
//! The layout is F(2x2, 3x3)'s: `V` and `M` are `[36][C or O][tile lanes]`, tiles numbered
//! `(g * th + ty) * tw + tx`, rows of 8 tiles or fewer padded to a power of two and packed
//! several per vector (`rows_per_vector`), and the same product tiles (`Winograd::products`).
//! What differs is the gather of the input: tile `tx` reads the six columns from `4 tx - p`, so
//! each of a row's six tap columns is a permute of the row's loaded vectors with stride 4.
//!
//! The kernel gradient (`kernel_grad_avx512` with `tile = 4`) is the forward pass transposed, as
//! for F(2x2, 3x3): `input4`, `A dy A^T` of each output-gradient tile (`output_grad4`), the
//! products summed over tiles, then `G^T . G` once per weight (`kernel_from_points4`).

use super::winograd::Winograd;
use super::winograd_avx512::{
    lane_mask, prefetch_ahead, rows_per_vector, TileVector, LANES, NK, SKEW,
};
use crate::bf16::round_bf16_lanes;
use std::arch::x86_64::*;

/// Points of the transformed tile (6 x 6).
const POINTS: usize = 36;

/// B^T of six values: the values of the six points (the rows of B^T d, or the columns of d B).
#[inline]
#[target_feature(enable = "avx512f")]
fn bt6(d: [__m512; 6]) -> [__m512; 6] {
    let (four, two) = (_mm512_set1_ps(4.0), _mm512_set1_ps(2.0));
    let [d0, d1, d2, d3, d4, d5] = d;
    let d42 = _mm512_sub_ps(d4, d2);
    let d13 = _mm512_sub_ps(d1, d3);
    [
        // 4 d0 - 5 d2 + d4
        _mm512_fmadd_ps(four, _mm512_sub_ps(d0, d2), d42),
        // -4 d1 - 4 d2 + d3 + d4
        _mm512_fnmadd_ps(four, _mm512_add_ps(d1, d2), _mm512_add_ps(d3, d4)),
        // 4 d1 - 4 d2 - d3 + d4
        _mm512_fmadd_ps(four, _mm512_sub_ps(d1, d2), _mm512_sub_ps(d4, d3)),
        // -2 d1 - d2 + 2 d3 + d4
        _mm512_fnmadd_ps(two, d13, d42),
        // 2 d1 - d2 - 2 d3 + d4
        _mm512_fmadd_ps(two, d13, d42),
        // 4 d1 - 5 d3 + d5
        _mm512_fmadd_ps(four, d13, _mm512_sub_ps(d5, d3)),
    ]
}

/// A^T of six values: the four output rows (or columns) of `A^T m`.
#[inline]
#[target_feature(enable = "avx512f")]
fn at4(m: [__m512; 6]) -> [__m512; 4] {
    let (two, four, eight) = (
        _mm512_set1_ps(2.0),
        _mm512_set1_ps(4.0),
        _mm512_set1_ps(8.0),
    );
    let [m0, m1, m2, m3, m4, m5] = m;
    let (a, b) = (_mm512_add_ps(m1, m2), _mm512_sub_ps(m1, m2));
    let (c, d) = (_mm512_add_ps(m3, m4), _mm512_sub_ps(m3, m4));
    [
        _mm512_add_ps(_mm512_add_ps(m0, a), c),
        _mm512_fmadd_ps(two, d, b),
        _mm512_fmadd_ps(four, c, a),
        _mm512_fmadd_ps(eight, d, _mm512_add_ps(b, m5)),
    ]
}

/// A of four values (the rows of A dy, or the columns of dy A^T): the six points.
#[inline]
#[target_feature(enable = "avx512f")]
fn a6(g: [__m512; 4]) -> [__m512; 6] {
    let (two, four) = (_mm512_set1_ps(2.0), _mm512_set1_ps(4.0));
    let [g0, g1, g2, g3] = g;
    let (e, f) = (_mm512_add_ps(g0, g2), _mm512_add_ps(g1, g3));
    // g0 + 4 g2 and 2 g1 + 8 g3
    let e4 = _mm512_fmadd_ps(four, g2, g0);
    let f4 = _mm512_mul_ps(two, _mm512_fmadd_ps(four, g3, g1));
    [
        g0,
        _mm512_add_ps(e, f),
        _mm512_sub_ps(e, f),
        _mm512_add_ps(e4, f4),
        _mm512_sub_ps(e4, f4),
        g3,
    ]
}

/// G: the rows of the six points.
const G6: [[f64; 3]; 6] = [
    [0.25, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// `G g G^T` of one 3x3 kernel, computed in f64 (the sixths and twenty-fourths are not exact in
/// binary; one rounding to f32 at the end).
fn transform_kernel6(g: &[f32]) -> [[f32; 6]; 6] {
    // t = G g (6 x 3), then U = t G^T
    let t: [[f64; 3]; 6] = std::array::from_fn(|r| {
        std::array::from_fn(|j| (0..3).map(|k| G6[r][k] * g[k * 3 + j] as f64).sum())
    });
    std::array::from_fn(|r| {
        std::array::from_fn(|s| (0..3).map(|j| t[r][j] * G6[s][j]).sum::<f64>() as f32)
    })
}

impl Winograd {
    /// Values of `input4`'s per-thread scratch.
    pub(super) fn scratch_len4(&self) -> usize {
        let th = self.lane_tiles_of(4).0;
        ((4 * th + 2) * 6 * LANES).max(24 * self.packed_stride4())
    }

    /// The length of each of the 24 packed row arrays of `input4` (`rows_per_vector` > 1):
    /// `th + 1` rows of `tw` lanes, and one vector's slack for the loads past the last row.
    fn packed_stride4(&self) -> usize {
        let (th, tw) = self.lane_tiles_of(4);
        (th + 1) * tw + LANES
    }

    /// U = G g G^T as `[xi][o / 8][c][8]`, `xi = 6 r + s`.
    pub(super) fn kernel_tiles4(&self, k: &[f32]) -> Vec<f32> {
        let (o, c) = (self.o, self.c);
        let mut tiles = vec![0f32; POINTS * o * c];
        for oi in 0..o {
            for ci in 0..c {
                let u = transform_kernel6(&k[(oi * c + ci) * 9..][..9]);
                for (xi, &v) in u.iter().flatten().enumerate() {
                    tiles[((xi * (o / NK) + oi / NK) * c + ci) * NK + oi % NK] = v;
                }
            }
        }
        tiles
    }

    /// The kernel gradient [O, C, 3, 3] from the points' sums `p` (`[xi][o / 4][c / 4][o % 4]
    /// [c % 4]`, `kernel_grad_avx512`): `G^T p G` of every (o, c), in f64.
    pub(super) fn kernel_from_points4(&self, p: &[f32]) -> Vec<f32> {
        let (o, c) = (self.o, self.c);
        let mut dk = vec![0f32; o * c * 9];
        for (oc, dk) in dk.chunks_exact_mut(9).enumerate() {
            let (oi, ci) = (oc / c, oc % c);
            let at = (oi / 4 * (c / 4) + ci / 4) * 16 + oi % 4 * 4 + ci % 4;
            let q = |r: usize, s: usize| p[(r * 6 + s) * o * c + at] as f64;
            // dk[a][b] = sum over (r, s) of G[r][a] p[r][s] G[s][b]
            for (i, dk) in dk.iter_mut().enumerate() {
                let (a, b) = (i / 3, i % 3);
                let mut sum = 0f64;
                for (r, gr) in G6.iter().enumerate() {
                    for (s, gs) in G6.iter().enumerate() {
                        sum += gr[a] * q(r, s) * gs[b];
                    }
                }
                *dk = sum as f32;
            }
        }
        dk
    }

    /// Z = A dy A^T of every output channel and tile of `imgs` images' output gradients into
    /// `z` ([36][O][tp], the tiles numbered as `input4`'s): the transpose of `output4`. Each
    /// 4x4 tile's rows are gathered from the output rows with stride 4 (rows of 8 tiles or fewer
    /// several per vector, as `input4` packs them); lanes past the image read zero, so the
    /// padding tiles' gradients are zero.
    ///
    /// # Safety
    /// AVX-512 F; `dy` holds `imgs` output images, `z` 36 * (O * tp + SKEW) values, tp >=
    /// imgs * th * tw.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop)] // constant index ranges: the values stay in registers
    pub(super) unsafe fn output_grad4<const RND: bool>(
        &self,
        dy: &[f32],
        imgs: usize,
        tp: usize,
        z: &mut [f32],
    ) {
        let (o, oh, ow) = (self.o, self.oh, self.ow);
        let (th, tw) = self.lane_tiles_of(4);
        debug_assert!(z.len() >= POINTS * (o * tp + SKEW) && dy.len() >= imgs * o * oh * ow);
        let zero = _mm512_setzero_ps();
        let zp = z.as_mut_ptr();
        let per = rows_per_vector(tw);
        let vectors = self.tile_vectors_of(4);
        let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        // gather[j][s]: lane j tw + t takes column 4 t + s (of 32: indices are modulo 32)
        let gather: Vec<[__m512i; 4]> = (0..per)
            .map(|j| {
                let from = _mm512_sub_epi32(iota, _mm512_set1_epi32((j * tw) as i32));
                let four_t = _mm512_slli_epi32::<2>(from);
                std::array::from_fn(|s| _mm512_add_epi32(four_t, _mm512_set1_epi32(s as i32)))
            })
            .collect();
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
                    // rows[k][s]: column s of row k of each tile
                    let mut rows = [[zero; 4]; 4];
                    for (k, row) in rows.iter_mut().enumerate() {
                        if per == 1 {
                            let yy = 4 * ty + k;
                            if yy >= oh {
                                break;
                            }
                            // the 64 columns from 4 tx0; lanes from 8 from the third and fourth
                            let col = 4 * tx0 as isize;
                            let src = plane.add(yy * ow + 4 * tx0);
                            let x: [__m512; 4] = std::array::from_fn(|i| {
                                let mask = lane_mask(0, ow as isize - col - 16 * i as isize);
                                _mm512_maskz_loadu_ps(mask, src.wrapping_add(16 * i))
                            });
                            for (s, v) in row.iter_mut().enumerate() {
                                let idx = gather[0][s];
                                let low = _mm512_permutex2var_ps(x[0], idx, x[1]);
                                let high = _mm512_permutex2var_ps(x[2], idx, x[3]);
                                *v = _mm512_mask_blend_ps(0xFF00, low, high);
                            }
                            continue;
                        }
                        for j in 0..n_rows {
                            let yy = 4 * (ty + j) + k;
                            if yy >= oh {
                                break;
                            }
                            // lanes j tw .. (j + 1) tw take columns 4 t + s of the row's 32
                            let src = plane.add(yy * ow);
                            let lo = _mm512_maskz_loadu_ps(lane_mask(0, ow as isize), src);
                            let hi_mask = lane_mask(0, ow as isize - 16);
                            let hi = _mm512_maskz_loadu_ps(hi_mask, src.wrapping_add(16));
                            let lanes = lane_mask((j * tw) as isize, ((j + 1) * tw) as isize);
                            for (s, v) in row.iter_mut().enumerate() {
                                let cols = _mm512_permutex2var_ps(lo, gather[j][s], hi);
                                *v = _mm512_mask_mov_ps(*v, lanes, cols);
                            }
                        }
                    }
                    if RND {
                        for v in rows.iter_mut().flatten() {
                            *v = round_bf16_lanes(*v);
                        }
                    }
                    // A along the columns of each row, then along the rows: 36 points
                    let cols: [[__m512; 6]; 4] = std::array::from_fn(|k| a6(rows[k]));
                    for s in 0..6 {
                        let col = a6(std::array::from_fn(|k| cols[k][s]));
                        for (r, val) in col.into_iter().enumerate() {
                            let at = (r * 6 + s) * (o * tp + SKEW) + oc * tp + tile;
                            _mm512_mask_storeu_ps(zp.add(at), keep, val);
                        }
                    }
                }
            }
        }
    }

    /// V = B^T d B of every channel and tile of `imgs` images into `v` ([36][C][tp]), as
    /// `input` does for F(2x2, 3x3): each padded row times B once (`row_times_b4`), then six
    /// rows at a time times B^T. Packed, the row products are stored by row modulo 4 (tile row
    /// `ty` reads padded rows `4 ty .. 4 ty + 6`), so one load holds `16 / tw` tile rows.
    ///
    /// # Safety
    /// AVX-512 F; `xs` holds `imgs` images, `v` 36 * (C * tp + SKEW) values, tp >= imgs * th *
    /// tw; `scratch` `scratch_len4()` values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn input4<const BN: bool, const RND: bool>(
        &self,
        xs: &[f32],
        imgs: usize,
        st: &[(f32, f32)],
        tp: usize,
        v: &mut [f32],
        scratch: &mut [f32],
    ) {
        let (c, h, w) = (self.c, self.h, self.w);
        let (th, tw) = self.lane_tiles_of(4);
        debug_assert!(v.len() >= POINTS * (c * tp + SKEW) && tp >= imgs * th * tw);
        debug_assert!(scratch.len() >= self.scratch_len4());
        let zero = _mm512_setzero_ps();
        let vp = v.as_mut_ptr();
        let rows = 4 * th + 2;
        let ep = scratch.as_mut_ptr();
        let per = rows_per_vector(tw);
        let stride = self.packed_stride4();
        for g in 0..imgs {
            for ci in 0..c {
                let plane = xs.as_ptr().add((g * c + ci) * h * w);
                prefetch_ahead(plane, h * w);
                let bn = match st.get(ci) {
                    Some(&(s, t)) if BN => (_mm512_set1_ps(s), _mm512_set1_ps(t)),
                    _ => (zero, zero),
                };
                let point = c * tp + SKEW;
                let dst = |tile: usize| vp.add(ci * tp + tile);
                if per > 1 {
                    let row_mask = lane_mask(0, tw as isize);
                    for pr in 0..rows {
                        let e = self.row_times_b4::<BN, RND>(plane, pr, 0, false, bn);
                        let at = (pr % 4) * 6 * stride + pr / 4 * tw;
                        for (s, e) in e.into_iter().enumerate() {
                            _mm512_mask_storeu_ps(ep.add(at + s * stride), row_mask, e);
                        }
                    }
                    for ty in (0..th).step_by(per) {
                        let keep = lane_mask(0, (per.min(th - ty) * tw) as isize);
                        // padded row 4 ty + k of the tile rows from ty
                        let e = |k: usize, s: usize| {
                            _mm512_loadu_ps(ep.add(((k % 4) * 6 + s) * stride + (ty + k / 4) * tw))
                        };
                        store_points(dst((g * th + ty) * tw), point, keep, e);
                    }
                    continue;
                }
                for tx0 in (0..tw).step_by(LANES) {
                    let keep = lane_mask(0, (tw - tx0) as isize);
                    let wide = tw - tx0 > LANES / 2;
                    for pr in 0..rows {
                        let e = self.row_times_b4::<BN, RND>(plane, pr, tx0, wide, bn);
                        for (s, e) in e.into_iter().enumerate() {
                            _mm512_storeu_ps(ep.add((pr * 6 + s) * LANES), e);
                        }
                    }
                    for ty in 0..th {
                        let e = |k: usize, s: usize| {
                            _mm512_loadu_ps(ep.add(((4 * ty + k) * 6 + s) * LANES))
                        };
                        store_points(dst((g * th + ty) * tw + tx0), point, keep, e);
                    }
                }
            }
        }
    }

    /// Padded row `pr` (input row `pr - p`) of one plane times B, for the tiles from `tx0` (16
    /// of them when `wide`, else the first 8 lanes): value `s`, lane `t` is column `s` of `d B`
    /// for the row's six columns from `4 (tx0 + t) - p`, with the prologue applied to the loaded
    /// values when `BN`. Zero outside the image (the padding).
    ///
    /// # Safety
    /// AVX-512 F; `plane` is an H x W plane.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn row_times_b4<const BN: bool, const RND: bool>(
        &self,
        plane: *const f32,
        pr: usize,
        tx0: usize,
        wide: bool,
        (sv, tv): (__m512, __m512),
    ) -> [__m512; 6] {
        let (h, w, p) = (self.h, self.w, self.p as isize);
        let zero = _mm512_setzero_ps();
        let iy = pr as isize - p;
        if iy < 0 || iy >= h as isize {
            return [zero; 6];
        }
        // the 80 columns from `base` (48 when not `wide`), as masked loads: lanes outside the
        // row read zero (the padding); masked-off lanes are not read, and `wrapping_offset`
        // keeps the address arithmetic defined outside the row
        let base = 4 * tx0 as isize - p;
        let (lo, hi) = (-base, w as isize - base);
        let src = plane.add(iy as usize * w).wrapping_offset(base);
        let mut x = [zero; 5];
        let loads = if wide { 5 } else { 3 };
        for (i, x) in x.iter_mut().enumerate().take(loads) {
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
        // the columns from base + 4: each vector moved down four lanes
        let x4: [__m512; 4] = std::array::from_fn(|i| shift4(x[i + 1], x[i]));
        // column 4 t + s of (a0, a1) for lanes t < 8, of (a2, a3) for the lanes from 8: the
        // permute's indices are taken modulo 32
        let gather = |a: &[__m512], s: i32| {
            let idx = _mm512_setr_epi32(
                s,
                4 + s,
                8 + s,
                12 + s,
                16 + s,
                20 + s,
                24 + s,
                28 + s,
                s,
                4 + s,
                8 + s,
                12 + s,
                16 + s,
                20 + s,
                24 + s,
                28 + s,
            );
            let low = _mm512_permutex2var_ps(a[0], idx, a[1]);
            if !wide {
                return low;
            }
            let high = _mm512_permutex2var_ps(a[2], idx, a[3]);
            _mm512_mask_blend_ps(0xFF00, low, high)
        };
        bt6([
            gather(&x, 0),
            gather(&x, 1),
            gather(&x, 2),
            gather(&x, 3),
            gather(&x4, 0),
            gather(&x4, 1),
        ])
    }

    /// Y = A^T m A of every output channel and tile, written into `imgs` NCHW images.
    ///
    /// # Safety
    /// AVX-512 F; `m` [36][O][tp], `y` `imgs` output images.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop)] // constant index ranges: the values stay in registers
    pub(super) unsafe fn output4(&self, m: &[f32], imgs: usize, tp: usize, y: &mut [f32]) {
        let (o, oh, ow) = (self.o, self.oh, self.ow);
        let (th, tw) = self.lane_tiles_of(4);
        debug_assert!(m.len() >= POINTS * (o * tp + SKEW) && y.len() >= imgs * o * oh * ow);
        // the four columns' vectors interleaved: (y0, y1) and (y2, y3) lane by lane, then the
        // pairs, so that output vector q holds tiles 4 q .. 4 q + 4, four columns each
        let pair_lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let pair_hi =
            _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        let quad_lo = _mm512_setr_epi32(0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23);
        let quad_hi =
            _mm512_setr_epi32(8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31);
        let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let mp = m.as_ptr();
        let per = rows_per_vector(tw);
        let vectors = self.tile_vectors_of(4);
        let (row_lo, row_hi) = (lane_mask(0, ow as isize), lane_mask(0, ow as isize - 16));
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
                    let at = |xi: usize| mp.add(xi * (o * tp + SKEW) + oc * tp + tile);
                    // u[r][j]: row r of A^T m, column j
                    let mut u = [[_mm512_setzero_ps(); 6]; 4];
                    for j in 0..6 {
                        let col = at4(std::array::from_fn(|i| {
                            _mm512_maskz_loadu_ps(keep, at(i * 6 + j))
                        }));
                        for (r, v) in col.into_iter().enumerate() {
                            u[r][j] = v;
                        }
                    }
                    for (r, &u) in u.iter().enumerate() {
                        if 4 * ty + r >= oh {
                            break;
                        }
                        let [y0, y1, y2, y3] = at4(u);
                        let (p01, p23) = (
                            [
                                _mm512_permutex2var_ps(y0, pair_lo, y1),
                                _mm512_permutex2var_ps(y0, pair_hi, y1),
                            ],
                            [
                                _mm512_permutex2var_ps(y2, pair_lo, y3),
                                _mm512_permutex2var_ps(y2, pair_hi, y3),
                            ],
                        );
                        let out = [
                            _mm512_permutex2var_ps(p01[0], quad_lo, p23[0]),
                            _mm512_permutex2var_ps(p01[0], quad_hi, p23[0]),
                            _mm512_permutex2var_ps(p01[1], quad_lo, p23[1]),
                            _mm512_permutex2var_ps(p01[1], quad_hi, p23[1]),
                        ];
                        if per == 1 {
                            // the 64 columns from 4 tx0 of output row 4 ty + r
                            let col = 4 * tx0 as isize;
                            let dst = plane.add((4 * ty + r) * ow + 4 * tx0);
                            for (q, &out) in out.iter().enumerate() {
                                let mask = lane_mask(0, ow as isize - col - 16 * q as isize);
                                if mask != 0 {
                                    _mm512_mask_storeu_ps(dst.wrapping_add(16 * q), mask, out);
                                }
                            }
                            continue;
                        }
                        // tile row j's outputs: the 4 tw values from 4 j tw of the 64
                        for j in 0..n_rows {
                            let yy = 4 * (ty + j) + r;
                            if yy >= oh {
                                break;
                            }
                            let dst = plane.add(yy * ow);
                            let from = 4 * j * tw;
                            if tw == LANES / 2 {
                                let q = from / LANES;
                                _mm512_mask_storeu_ps(dst, row_lo, out[q]);
                                if row_hi != 0 {
                                    _mm512_mask_storeu_ps(dst.wrapping_add(16), row_hi, out[q + 1]);
                                }
                            } else {
                                let shift = _mm512_set1_epi32((from % LANES) as i32);
                                let idx = _mm512_add_epi32(iota, shift);
                                let v = _mm512_permutexvar_ps(idx, out[from / LANES]);
                                _mm512_mask_storeu_ps(dst, row_lo, v);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The six padded rows' products with B (`e(k, s)`: row `k`, value `s`) times B^T: the 36
/// points of a vector of tiles, stored from `dst` with the lanes of `keep`, `stride` apart.
///
/// # Safety
/// AVX-512 F; `dst` holds 35 `stride` plus 16 values.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store_points(
    dst: *mut f32,
    stride: usize,
    keep: u16,
    e: impl Fn(usize, usize) -> __m512,
) {
    for s in 0..6 {
        let col = bt6(std::array::from_fn(|k| e(k, s)));
        for (r, val) in col.into_iter().enumerate() {
            _mm512_mask_storeu_ps(dst.add((r * 6 + s) * stride), keep, val);
        }
    }
}

/// Lanes 4..16 of `lo` followed by lanes 0..4 of `hi`: a row's vector four columns on.
#[inline]
#[target_feature(enable = "avx512f")]
fn shift4(hi: __m512, lo: __m512) -> __m512 {
    _mm512_castsi512_ps(_mm512_alignr_epi32::<4>(
        _mm512_castps_si512(hi),
        _mm512_castps_si512(lo),
    ))
}
