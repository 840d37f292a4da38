//! The 2x2 stride-2 max pool (the small ResNet's) in f32 with AVX-512 (F): 16 windows of an
//! output row at a time. Each window's four values `a b / c d` are the even and odd columns of
//! its two input rows (two permutes of two masked loads per row), and the first maximum is
//! chosen by the scalar path's comparisons in the same order (`b > a`, then `c`, then `d`
//! against the best so far), so results are bitwise those of `Pool::tile_argmax`, NaN and
//! signed zeros included. The scalar loops compared one window at a time and took 7% of the
//! small ResNet's step (`benches/README.md`).

use crate::lane_mask;
use std::arch::x86_64::*;

/// The four values of 16 windows from output column `ox0` of output row `oy`: (a, b, c, d) =
/// (top left, top right, bottom left, bottom right); lanes past the row read zero.
///
/// # Safety
/// AVX-512 F; `plane` is an H x W plane with 2 oy + 1 < H and 2 ow <= W.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn windows(plane: *const f32, w: usize, ow: usize, oy: usize, ox0: usize) -> [__m512; 4] {
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    // the 2 ow columns of the windows, never the odd last column of an odd width
    let cols = 2 * (ow - ox0) as isize;
    let (m0, m1) = (lane_mask(0, cols), lane_mask(0, cols - 16));
    let mut v = [_mm512_setzero_ps(); 4];
    for r in 0..2 {
        let src = plane.add((2 * oy + r) * w + 2 * ox0);
        let lo = _mm512_maskz_loadu_ps(m0, src);
        let hi = _mm512_maskz_loadu_ps(m1, src.wrapping_add(16));
        v[2 * r] = _mm512_permutex2var_ps(lo, even, hi);
        v[2 * r + 1] = _mm512_permutex2var_ps(lo, odd, hi);
    }
    v
}

/// Which of each window's four values is its first maximum: the masks of the lanes where it is
/// b, c and d (a elsewhere), and the maximum.
#[inline]
#[target_feature(enable = "avx512f")]
fn first_max([a, b, c, d]: [__m512; 4]) -> (u16, u16, u16, __m512) {
    // `>` is false with a NaN on either side, as in the scalar comparisons
    let kb = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(b, a);
    let m = _mm512_mask_blend_ps(kb, a, b);
    let kc = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(c, m);
    let m = _mm512_mask_blend_ps(kc, m, c);
    let kd = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(d, m);
    let m = _mm512_mask_blend_ps(kd, m, d);
    (kb & !kc & !kd, kc & !kd, kd, m)
}

/// The pooled plane `out` [OH, OW] of one plane [H, W] (OH = H / 2, OW = W / 2).
///
/// # Safety
/// AVX-512 F; `plane` holds H W values with H >= 2 OH and W >= 2 OW, `out` OH OW.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn forward(plane: &[f32], w: usize, oh: usize, ow: usize, out: &mut [f32]) {
    debug_assert!(out.len() == oh * ow && plane.len() >= 2 * oh * w && w >= 2 * ow);
    for oy in 0..oh {
        for ox0 in (0..ow).step_by(16) {
            let (_, _, _, m) = first_max(windows(plane.as_ptr(), w, ow, oy, ox0));
            let keep = lane_mask(0, (ow - ox0) as isize);
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(oy * ow + ox0), keep, m);
        }
    }
}

/// The input gradient `dx` [H, W] of one plane from its output gradient `go` [OH, OW]: each
/// window's gradient goes to its first maximum, every other value of `dx` is left as it is
/// (zero).
///
/// # Safety
/// AVX-512 F; as `forward`, with `go` OH OW values and `dx` H W.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn backward(
    plane: &[f32],
    go: &[f32],
    w: usize,
    (oh, ow): (usize, usize),
    dx: &mut [f32],
) {
    debug_assert!(go.len() == oh * ow && dx.len() == plane.len() && w >= 2 * ow);
    let lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for oy in 0..oh {
        for ox0 in (0..ow).step_by(16) {
            let (kb, kc, kd, _) = first_max(windows(plane.as_ptr(), w, ow, oy, ox0));
            let keep = lane_mask(0, (ow - ox0) as isize);
            let g = _mm512_maskz_loadu_ps(keep, go.as_ptr().add(oy * ow + ox0));
            let ka = !(kb | kc | kd);
            let cols = 2 * (ow - ox0) as isize;
            let (m0, m1) = (lane_mask(0, cols), lane_mask(0, cols - 16));
            // row 2 oy takes (a, b) of each window, row 2 oy + 1 (c, d), interleaved
            for (r, (left, right)) in [(ka, kb), (kc, kd)].into_iter().enumerate() {
                let (l, rt) = (_mm512_maskz_mov_ps(left, g), _mm512_maskz_mov_ps(right, g));
                let dst = dx.as_mut_ptr().add((2 * oy + r) * w + 2 * ox0);
                _mm512_mask_storeu_ps(dst, m0, _mm512_permutex2var_ps(l, lo_idx, rt));
                if m1 != 0 {
                    let hi = _mm512_permutex2var_ps(l, hi_idx, rt);
                    _mm512_mask_storeu_ps(dst.wrapping_add(16), m1, hi);
                }
            }
        }
    }
}
