//! Matrix products in bf16 with f32 accumulation, for `precision: amp_bf16` on CPUs with
//! AVX512-BF16 (`VDPBF16PS`: 32 products of bf16 pairs summed into 16 f32 lanes per
//! instruction, twice the multiplications of an f32 FMA). The operands stay f32 in memory
//! (master weights and activations); they are rounded to bf16 (round to nearest even) while they
//! are packed for the product, as PyTorch's autocast rounds a convolution's inputs, and the sums
//! and the result are f32.
//!
//! One product is `dst (m x n, row-major) (+)= a (m x k) * b (k x n)` over the same strided views
//! as [`crate::gemm`]. The reduction dimension is split into pairs (`k` rounded up with a zero).
//! Blocks of `KC` pairs: `a` is packed in panels of `MR` rows, 16 pairs per row and block (one
//! 64-byte store), `b` in panels of `NR` columns, each pair of rows interleaved column by
//! column; a tile of `MR x NR` sums lives in 24 registers while one block of pairs runs through
//! it (each `a` pair broadcast against two vectors of `b` pairs). Operands whose packed direction
//! is contiguous are read with (masked) vector loads, others with gathers. The order of every sum
//! is fixed by the shapes: results are deterministic and do not depend on the thread count.
//!
//! Hardware without AVX512-BF16 has no such product here: [`available`] says so, and the
//! engine refuses `amp_bf16` there with a clear error before anything runs.

use crate::gemm::Mat;

/// Rows of `a` per register tile.
const MR: usize = 8;
/// Vectors of 16 columns of `b` per register tile.
const NV: usize = 2;
/// Columns of `b` per register tile.
const NR: usize = 16 * NV;
/// Pairs per packed row segment of `a` (one 512-bit store).
const KB: usize = 16;
/// Pairs per block of the reduction: a packed `b` panel (`KC * NR` pairs, 16 KB) and an `a`
/// panel (6 KB) stay in L1 while the panel's tiles run.
const KC: usize = 128;

/// Whether this CPU runs the bf16 products (AVX-512 F, BW, VL and BF16).
pub fn available() -> bool {
    crate::paths::cpu().avx512_bf16
}

/// `x` rounded to the nearest bf16 (ties to even), as an f32: what the products multiply.
/// Subnormal values become zero of their sign, as the hardware's conversion makes them.
pub fn round_bf16(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    if x.is_subnormal() {
        return 0.0f32.copysign(x);
    }
    let b = x.to_bits();
    f32::from_bits(b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000)
}

/// Each lane rounded to bf16 (kept as an f32 value), bitwise `round_bf16`: to nearest,
/// ties to even; subnormals to a zero of their sign; NaN kept. The Winograd kernel gradient of
/// a bf16 convolution reads its operands through it.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn round_bf16_lanes(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let b = _mm512_castps_si512(x);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
    let up = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    let r = _mm512_and_si512(up, _mm512_set1_epi32(0xffff_0000_u32 as i32));
    // exponent zero (zeros and subnormals): the sign alone
    let tiny = _mm512_testn_epi32_mask(b, _mm512_set1_epi32(0x7f80_0000));
    let sign = _mm512_and_si512(b, _mm512_set1_epi32(i32::MIN));
    let r = _mm512_mask_mov_epi32(r, tiny, sign);
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
    _mm512_castsi512_ps(_mm512_mask_mov_epi32(r, nan, b))
}

/// `lo` and `hi` rounded to bf16 (`round_bf16`) and packed as the low and high halves of one
/// 32-bit pair, kept in an f32 slot (the layout the bf16 direct convolution reads).
pub(crate) fn pair(lo: f32, hi: f32) -> f32 {
    let (lo, hi) = (round_bf16(lo), round_bf16(hi));
    f32::from_bits((lo.to_bits() >> 16) | (hi.to_bits() & 0xffff_0000))
}

/// `out[i]` = the bf16 bits of `round_bf16(src[i])`, 16 at a time on AVX512-BF16.
pub(crate) fn to_bf16(src: &[f32], out: &mut [u16]) {
    assert!(src.len() >= out.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU has the features; every access is below `out.len()` (asserted).
        done = unsafe { x86::to_bf16(src, out) };
    }
    for i in done..out.len() {
        out[i] = (round_bf16(src[i]).to_bits() >> 16) as u16;
    }
}

/// `out[i] = pair(lo[i], hi[i])` (`hi` zero when `None`), 16 at a time on AVX512-BF16.
pub(crate) fn pairs_into(lo: &[f32], hi: Option<&[f32]>, out: &mut [f32]) {
    assert!(lo.len() >= out.len() && hi.is_none_or(|h| h.len() >= out.len()));
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU has the features; every access is below `out.len()` (asserted).
        done = unsafe { x86::pairs_into(lo, hi, out) };
    }
    for i in done..out.len() {
        out[i] = pair(lo[i], hi.map_or(0.0, |h| h[i]));
    }
}

/// `dst` (row-major m x n, f32) = a (m x k) * b (k x n) with both operands rounded to bf16 and
/// the products summed in f32, plus the old `dst` when `accumulate`. Single-threaded (callers
/// parallelise over images). Panics when the CPU lacks AVX512-BF16 (check [`available`]) or the
/// views are too small.
pub fn matmul_bf16(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    a: Mat<f32>,
    b: Mat<f32>,
) {
    product(false, m, n, k, dst, accumulate, a, b)
}

/// `matmul_bf16` on the threads of the rayon pool, for one large product: each block of the
/// reduction is packed once for all threads (`b`), and the threads share out `a`'s panels of
/// `MR` rows. Every sum runs in the same order as in `matmul_bf16`, so the result is bitwise
/// the same, whatever the number of threads.
pub fn matmul_bf16_par(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    a: Mat<f32>,
    b: Mat<f32>,
) {
    product(true, m, n, k, dst, accumulate, a, b)
}

/// `matmul_bf16` (`parallel`: `matmul_bf16_par`) after the checks: panics on operands too small
/// for the sizes or a CPU without AVX512-BF16; nothing to multiply leaves `dst` final.
#[allow(clippy::too_many_arguments)]
fn product(
    parallel: bool,
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    a: Mat<f32>,
    b: Mat<f32>,
) {
    assert!(
        dst.len() >= m * n && a.fits(m, k) && b.fits(k, n),
        "matmul_bf16: operand too small for {m}x{k} by {k}x{n}"
    );
    // Gather offsets are 32-bit: the packing reads at most 32 values along a stride.
    assert!(
        32 * a.rs.max(a.cs).max(b.rs).max(b.cs) < i32::MAX as usize,
        "matmul_bf16: strides over 2^26"
    );
    assert!(
        available(),
        "matmul_bf16 needs AVX512-BF16 (check bf16::available first)"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU has the features (asserted above) and every view reaches only inside its
    // slice for the given sizes (asserted above); the packing reads past no edge (masked).
    unsafe {
        match parallel {
            true => x86::matmul_par(m, n, k, dst, accumulate, a, b),
            false => x86::matmul(m, n, k, dst, accumulate, a, b),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Mat, KB, KC, MR, NR, NV};
    use rayon::prelude::*;
    use std::arch::x86_64::*;

    /// The lane mask of the first `valid` of 16 lanes.
    fn mask16(valid: usize) -> __mmask16 {
        if valid >= 16 {
            u16::MAX
        } else {
            (1u16 << valid) - 1
        }
    }

    /// 16 values of `v` from `start`, `stride` apart; lanes at or past `valid` are zero (and
    /// never read).
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(v: Mat<f32>, start: usize, stride: usize, valid: usize) -> __m512 {
        let mask = mask16(valid);
        if mask == 0 {
            return _mm512_setzero_ps();
        }
        let base = v.data.as_ptr().add(start);
        if stride == 1 {
            _mm512_maskz_loadu_ps(mask, base)
        } else {
            let idx = _mm512_mullo_epi32(
                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                _mm512_set1_epi32(stride as i32),
            );
            _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, idx, base)
        }
    }

    /// `a`'s rows `i0..i0 + MR` (zero past `m`) and pairs `p0..p0 + kc` (zero past `k`) as
    /// [kc / KB][MR][KB] pairs.
    #[inline(never)]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn pack_a(
        a: Mat<f32>,
        m: usize,
        k: usize,
        i0: usize,
        p0: usize,
        kc: usize,
        out: &mut [u32],
    ) {
        let blocks = kc.div_ceil(KB);
        for blk in 0..blocks {
            let k0 = 2 * (p0 + blk * KB);
            let left = k.saturating_sub(k0);
            for r in 0..MR {
                let i = i0 + r;
                let dst = out.as_mut_ptr().add((blk * MR + r) * KB);
                if i >= m || left == 0 {
                    _mm512_storeu_si512(dst.cast(), _mm512_setzero_si512());
                    continue;
                }
                let at = i * a.rs + k0 * a.cs;
                let lo = load16(a, at, a.cs, left);
                let hi = if left > 16 {
                    load16(a, at + 16 * a.cs, a.cs, left - 16)
                } else {
                    _mm512_setzero_ps()
                };
                // bf16 of k0..k0 + 32 in order: pairs (k0, k0 + 1), (k0 + 2, k0 + 3), ...
                let v: __m512i =
                    std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(dst.cast(), v);
            }
        }
    }

    /// `b`'s columns `j0..j0 + NR` (zero past `n`) and pairs `p0..p0 + kc` (zero past `k`) as
    /// [kc rounded up to KB][NR] pairs, each the rows 2p and 2p + 1 of one column.
    #[inline(never)]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn pack_b(
        b: Mat<f32>,
        n: usize,
        k: usize,
        j0: usize,
        p0: usize,
        kc: usize,
        out: &mut [u32],
    ) {
        if b.rs == 1 && b.cs != 1 {
            return pack_b_columns(b, n, k, j0, p0, kc, out);
        }
        let interleave = interleave();
        let pairs = kc.div_ceil(KB) * KB;
        for q in 0..pairs {
            let r0 = 2 * (p0 + q);
            for h in 0..NR / 16 {
                let j = j0 + 16 * h;
                let dst = out.as_mut_ptr().add(q * NR + 16 * h);
                let valid = n.saturating_sub(j);
                if r0 >= k || valid == 0 {
                    _mm512_storeu_si512(dst.cast(), _mm512_setzero_si512());
                    continue;
                }
                let lo = load16(b, r0 * b.rs + j * b.cs, b.cs, valid);
                let hi = if r0 + 1 < k {
                    load16(b, (r0 + 1) * b.rs + j * b.cs, b.cs, valid)
                } else {
                    _mm512_setzero_ps()
                };
                let v: __m512i =
                    std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(dst.cast(), _mm512_permutexvar_epi16(interleave, v));
            }
        }
    }

    /// `to_bf16` for the whole vectors of `out`; returns how many values it wrote.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn to_bf16(src: &[f32], out: &mut [u16]) -> usize {
        let whole = out.len() / 16 * 16;
        for i in (0..whole).step_by(16) {
            let v = _mm512_cvtneps_pbh(_mm512_loadu_ps(src.as_ptr().add(i)));
            let v = std::mem::transmute::<__m256bh, __m256i>(v);
            _mm256_storeu_si256(out.as_mut_ptr().add(i).cast(), v);
        }
        whole
    }

    /// `pairs_into` for the whole vectors of `out`; returns how many values it wrote.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn pairs_into(lo: &[f32], hi: Option<&[f32]>, out: &mut [f32]) -> usize {
        let interleave = interleave();
        let whole = out.len() / 16 * 16;
        for i in (0..whole).step_by(16) {
            let a = _mm512_loadu_ps(lo.as_ptr().add(i));
            let b = hi.map_or(_mm512_setzero_ps(), |h| _mm512_loadu_ps(h.as_ptr().add(i)));
            let v: __m512i = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(b, a));
            _mm512_storeu_si512(
                out.as_mut_ptr().add(i).cast(),
                _mm512_permutexvar_epi16(interleave, v),
            );
        }
        whole
    }

    /// The word order that turns `[a x16 | b x16]` into `a[0], b[0], a[1], b[1], ...`.
    #[target_feature(enable = "avx512f")]
    fn interleave() -> __m512i {
        _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20,
            4, 19, 3, 18, 2, 17, 1, 16, 0,
        )
    }

    /// `pack_b` for a `b` whose columns are contiguous (`rs == 1`, a transposed operand such
    /// as the output gradient of a kernel gradient): per block of 16 pairs and 16 columns, each
    /// column's 32 values are one pair vector, and the 16 vectors are transposed in registers
    /// (`transpose16`) into the panel's rows, instead of gathering every value.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn pack_b_columns(
        b: Mat<f32>,
        n: usize,
        k: usize,
        j0: usize,
        p0: usize,
        kc: usize,
        out: &mut [u32],
    ) {
        let stages = butterflies();
        for q0 in (0..kc.div_ceil(KB) * KB).step_by(KB) {
            let r0 = 2 * (p0 + q0);
            let left = k.saturating_sub(r0);
            for h in 0..NV {
                let mut v = [_mm512_setzero_si512(); 16];
                for (c, v) in v.iter_mut().enumerate() {
                    let j = j0 + 16 * h + c;
                    if j >= n || left == 0 {
                        continue;
                    }
                    let at = r0 + j * b.cs;
                    let lo = load16(b, at, 1, left);
                    let hi = if left > 16 {
                        load16(b, at + 16, 1, left - 16)
                    } else {
                        _mm512_setzero_ps()
                    };
                    *v = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
                }
                transpose16(&mut v, &stages);
                for (t, v) in v.iter().enumerate() {
                    _mm512_storeu_si512(out.as_mut_ptr().add((q0 + t) * NR + 16 * h).cast(), *v);
                }
            }
        }
    }

    /// The permutes of `transpose16`: for each of its four stages (block sizes 8, 4, 2, 1), the
    /// lanes of the new low and high vector of a pair, as indices into the pair (16 and up: the
    /// second vector).
    #[target_feature(enable = "avx512f")]
    fn butterflies() -> [(usize, __m512i, __m512i); 4] {
        [8usize, 4, 2, 1].map(|bit| {
            let (mut lo, mut hi) = ([0i32; 16], [0i32; 16]);
            for l in 0..16 {
                let (base, within) = (l / (2 * bit) * 2 * bit, l % (2 * bit));
                let (l0, l1) = if within < bit {
                    (base + within, base + bit + within)
                } else {
                    (16 + base + within - bit, 16 + base + within)
                };
                (lo[l], hi[l]) = (l0 as i32, l1 as i32);
            }
            // SAFETY: 16 i32 values are one 512-bit vector.
            unsafe {
                (
                    bit,
                    _mm512_loadu_si512(lo.as_ptr().cast()),
                    _mm512_loadu_si512(hi.as_ptr().cast()),
                )
            }
        })
    }

    /// Transposes 16 vectors of 16 32-bit lanes: lane j of vector i goes to lane i of vector j.
    /// Four butterfly stages (`butterflies`), each exchanging the elements whose row and column
    /// differ in that stage's bit, with two-source permutes.
    #[target_feature(enable = "avx512f")]
    fn transpose16(r: &mut [__m512i; 16], stages: &[(usize, __m512i, __m512i); 4]) {
        for &(bit, lo, hi) in stages {
            for i in (0..16).filter(|i| i & bit == 0) {
                let (a, c) = (r[i], r[i + bit]);
                r[i] = _mm512_permutex2var_epi32(a, lo, c);
                r[i + bit] = _mm512_permutex2var_epi32(a, hi, c);
            }
        }
    }

    /// One MR x NR tile over `blocks` blocks of KB pairs: `tile` (row-major, NR wide) = the sums.
    #[inline(never)]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn tile(blocks: usize, a: *const u32, b: *const u32, tile: &mut [f32; MR * NR]) {
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        for blk in 0..blocks {
            let ab = a.add(blk * MR * KB);
            let bb = b.add(blk * KB * NR);
            for q in 0..KB {
                let mut bv: [__m512bh; NV] = std::mem::zeroed();
                for (v, bv) in bv.iter_mut().enumerate() {
                    *bv = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                        bb.add(q * NR + 16 * v).cast(),
                    ));
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av: __m512bh = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                        *ab.add(r * KB + q) as i32,
                    ));
                    for (acc, &bv) in acc.iter_mut().zip(&bv) {
                        *acc = _mm512_dpbf16_ps(*acc, av, bv);
                    }
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (v, &acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(tile.as_mut_ptr().add(r * NR + 16 * v), acc);
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn matmul(
        m: usize,
        n: usize,
        k: usize,
        dst: &mut [f32],
        accumulate: bool,
        a: Mat<f32>,
        b: Mat<f32>,
    ) {
        let panels = m.div_ceil(MR);
        // The packed operands of this thread's previous product, reused: packing writes every
        // value a tile reads, so they need no zeroing (and a fresh buffer per call cost more
        // in page faults and memset than the packing itself).
        thread_local! {
            static PACKED: std::cell::RefCell<(Vec<u32>, Vec<u32>)> = const {
                std::cell::RefCell::new((Vec::new(), Vec::new()))
            };
        }
        PACKED.with_borrow_mut(|(pa, pb)| {
            pa.resize(pa.len().max(panels * KC * MR), 0);
            pb.resize(KC * NR, 0);
            run(
                m,
                n,
                k,
                dst,
                accumulate,
                a,
                b,
                &mut pa[..panels * KC * MR],
                pb,
            )
        })
    }

    /// A tile's sums into the first (up to MR) rows of `rows` (row-major, `n` wide) at columns
    /// `j0..`: added, or written over when `!add`.
    fn store(t: &[f32; MR * NR], rows: &mut [f32], n: usize, j0: usize, add: bool) {
        let cols = NR.min(n - j0);
        for (sums, row) in t.chunks_exact(NR).zip(rows.chunks_mut(n)) {
            let row = &mut row[j0..][..cols];
            if add {
                row.iter_mut().zip(sums).for_each(|(d, s)| *d += s);
            } else {
                row.copy_from_slice(&sums[..cols]);
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn matmul_par(
        m: usize,
        n: usize,
        k: usize,
        dst: &mut [f32],
        accumulate: bool,
        a: Mat<f32>,
        b: Mat<f32>,
    ) {
        let pairs = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut pb = vec![0u32; panels * KC * NR];
        for p0 in (0..pairs).step_by(KC) {
            let kc = KC.min(pairs - p0);
            let blocks = kc.div_ceil(KB);
            let add = accumulate || p0 > 0;
            pb.par_chunks_mut(KC * NR).enumerate().for_each(|(jp, pb)| {
                // SAFETY: the caller's features; `pb` holds one panel.
                unsafe { pack_b(b, n, k, jp * NR, p0, kc, pb) }
            });
            let pb = &pb;
            dst[..m * n]
                .par_chunks_mut(MR * n)
                .enumerate()
                .for_each_init(
                    || (vec![0u32; KC * MR], [0f32; MR * NR]),
                    |(pa, t), (ip, rows)| {
                        // SAFETY: the caller's features; `pa` holds one panel, `pb` every panel.
                        unsafe { pack_a(a, m, k, ip * MR, p0, kc, pa) };
                        for jp in 0..panels {
                            unsafe { tile(blocks, pa.as_ptr(), pb[jp * KC * NR..].as_ptr(), t) };
                            store(t, rows, n, jp * NR, add);
                        }
                    },
                );
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn run(
        m: usize,
        n: usize,
        k: usize,
        dst: &mut [f32],
        accumulate: bool,
        a: Mat<f32>,
        b: Mat<f32>,
        pa: &mut [u32],
        pb: &mut [u32],
    ) {
        let pairs = k.div_ceil(2);
        let mut t = [0f32; MR * NR];
        for p0 in (0..pairs).step_by(KC) {
            let kc = KC.min(pairs - p0);
            let blocks = kc.div_ceil(KB);
            let add = accumulate || p0 > 0;
            for (ip, pa) in pa.chunks_exact_mut(KC * MR).enumerate() {
                pack_a(a, m, k, ip * MR, p0, kc, pa);
            }
            for j0 in (0..n).step_by(NR) {
                pack_b(b, n, k, j0, p0, kc, pb);
                for (ip, pa) in pa.chunks_exact(KC * MR).enumerate() {
                    tile(blocks, pa.as_ptr(), pb.as_ptr(), &mut t);
                    let rows = &mut dst[ip * MR * n..m * n];
                    store(&t, rows, n, j0, add);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The product of the bf16-rounded operands, in f64.
    fn reference(m: usize, n: usize, k: usize, a: Mat<f32>, b: Mat<f32>) -> Vec<f64> {
        let at = |v: Mat<f32>, i: usize, j: usize| round_bf16(v.data[i * v.rs + j * v.cs]) as f64;
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|l| at(a, i, l) * at(b, l, j)).sum();
            }
        }
        out
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (i as f32 * 0.37 + seed as f32).sin() * 1.7)
            .collect()
    }

    #[test]
    fn the_parallel_product_is_bitwise_the_serial_one_at_any_thread_count() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        // edges of the row panels (MR) and column panels (NR), two blocks of pairs
        for &(m, n, k, accumulate) in &[(13, 70, 300, false), (40, 33, 513, true), (1, 5, 3, false)]
        {
            let (av, bv) = (values(m * k, 3), values(k * n, 4));
            let bt: Vec<f32> = (0..k * n).map(|idx| bv[(idx % k) * n + idx / k]).collect();
            for b in [Mat::rows(&bv, n), Mat::transposed(&bt, k)] {
                let a = Mat::rows(&av, k);
                let start = values(m * n, 5);
                let mut want = start.clone();
                matmul_bf16(m, n, k, &mut want, accumulate, a, b);
                for threads in [1, 3] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let mut got = start.clone();
                    pool.install(|| matmul_bf16_par(m, n, k, &mut got, accumulate, a, b));
                    let same = got
                        .iter()
                        .zip(&want)
                        .all(|(g, w)| g.to_bits() == w.to_bits());
                    assert!(same, "{m}x{n}x{k} on {threads} threads");
                }
            }
        }
    }

    /// `round_bf16_lanes` is `round_bf16` bit for bit: ties both ways, the largest
    /// values (to infinity), subnormals, signed zeros, infinities and NaNs.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn rounding_of_lanes_is_round_bf16() {
        use std::arch::x86_64::*;
        if !crate::paths::cpu().avx512 {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        let mut values = vec![
            0.0f32,
            -0.0,
            1.0,
            f32::from_bits(0x3f80_8000), // a tie, rounded down to even
            f32::from_bits(0x3f81_8000), // a tie, rounded up to even
            f32::from_bits(0x3f80_8001),
            f32::MAX,
            -f32::MAX,
            f32::MIN_POSITIVE,
            f32::from_bits(0x0000_0001),
            f32::from_bits(0x807f_ffff),
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x7f80_0001),
            -3.3e-20,
        ];
        values.extend((0..1000u32).map(|i| f32::from_bits(i.wrapping_mul(2654435761))));
        for chunk in values.chunks(16) {
            let mut lanes = [0f32; 16];
            lanes[..chunk.len()].copy_from_slice(chunk);
            let mut got = [0f32; 16];
            // SAFETY: AVX-512 was checked above; both arrays hold 16 values.
            unsafe {
                let r = round_bf16_lanes(_mm512_loadu_ps(lanes.as_ptr()));
                _mm512_storeu_ps(got.as_mut_ptr(), r);
            }
            for (&x, &g) in lanes.iter().zip(&got) {
                let want = round_bf16(x);
                assert_eq!(g.to_bits(), want.to_bits(), "{x:e} ({:#x})", x.to_bits());
            }
        }
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(round_bf16(1.0), 1.0);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0)
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(round_bf16(-2.5), -2.5);
        assert!(round_bf16(f32::NAN).is_nan());
    }

    #[test]
    fn matches_the_rounded_product_on_every_layout_and_edge() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        // sizes off every tile edge, odd k (a zero pair member), k over one block of pairs
        for &(m, n, k) in &[
            (1, 1, 1),
            (12, 32, 32),
            (13, 33, 33),
            (5, 70, 300),
            (27, 17, 9),
            (40, 3, 513),
        ] {
            let av = values(m * k, 1);
            let bv = values(k * n, 2);
            // a row-major or transposed, b row-major or transposed (gathers)
            let at: Vec<f32> = (0..m * k).map(|idx| av[(idx % m) * k + idx / m]).collect();
            let bt: Vec<f32> = (0..k * n).map(|idx| bv[(idx % k) * n + idx / k]).collect();
            let want = reference(m, n, k, Mat::rows(&av, k), Mat::rows(&bv, n));
            let scale: f64 = want.iter().map(|v| v.abs()).fold(1.0, f64::max);
            let cases = [
                (Mat::rows(&av, k), Mat::rows(&bv, n)),
                (Mat::transposed(&at, m), Mat::rows(&bv, n)),
                (Mat::rows(&av, k), Mat::transposed(&bt, k)),
                (Mat::transposed(&at, m), Mat::transposed(&bt, k)),
            ];
            for (case, (a, b)) in cases.into_iter().enumerate() {
                let mut dst = vec![f32::NAN; m * n];
                matmul_bf16(m, n, k, &mut dst, false, a, b);
                let err = dst
                    .iter()
                    .zip(&want)
                    .map(|(d, w)| (*d as f64 - w).abs())
                    .fold(0.0, f64::max);
                // f32 sums of k exact products
                assert!(
                    err < 1e-6 * scale * k as f64,
                    "{m}x{n}x{k} case {case}: {err}"
                );
                // accumulating adds the product once more
                matmul_bf16(m, n, k, &mut dst, true, a, b);
                let err2 = dst
                    .iter()
                    .zip(&want)
                    .map(|(d, w)| (*d as f64 - 2.0 * w).abs())
                    .fold(0.0, f64::max);
                assert!(
                    err2 < 2e-6 * scale * k as f64,
                    "{m}x{n}x{k} case {case} accumulated"
                );
            }
        }
    }

    #[test]
    fn differs_from_the_f32_product_by_bf16_rounding_only() {
        if !available() {
            return;
        }
        let (m, n, k) = (16, 64, 144);
        let (av, bv) = (values(m * k, 3), values(k * n, 4));
        let mut f32_out = vec![0.0; m * n];
        crate::gemm::matmul(
            m,
            n,
            k,
            &mut f32_out,
            false,
            Mat::rows(&av, k),
            Mat::rows(&bv, n),
        );
        let product = || {
            let mut out = vec![0.0; m * n];
            matmul_bf16(
                m,
                n,
                k,
                &mut out,
                false,
                Mat::rows(&av, k),
                Mat::rows(&bv, n),
            );
            out
        };
        let bf = product();
        // each operand's rounding moves a product by at most 2^-9 of it (2^-8 for both), so an
        // element moves by at most 2^-8 of the sum of its products' magnitudes
        let mut differs = false;
        for i in 0..m {
            for j in 0..n {
                let bound: f32 = (0..k).map(|l| (av[i * k + l] * bv[l * n + j]).abs()).sum();
                let d = (bf[i * n + j] - f32_out[i * n + j]).abs();
                assert!(
                    d <= bound / 256.0 + 1e-5,
                    "({i}, {j}): {d} over {bound}/256"
                );
                differs |= d > 1e-4;
            }
        }
        assert!(differs, "bf16 rounding shows in the product");
        // and the same call gives the same bits
        let again = product();
        assert!(again
            .iter()
            .zip(&bf)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
