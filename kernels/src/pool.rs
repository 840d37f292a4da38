//! Max and average pooling of any kernel, stride and padding, with backward passes (non-overlapping
//! windows, the usual 2x2 pool, take a tiled path without per-cell bounds checks; the 2x2 max pool
//! in f32 runs 16 windows at a time with AVX-512, `pool/max2_avx512.rs`), and global average
//! pooling. Other devices, and CPU tensors that are not f32 or f64, get the same pooling
//! composed of candle ops (`pool_composed`).

use crate::{contiguous_slice, lane_sum, out_size, par_new};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod max2_avx512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Max,
    Avg,
}

/// Window geometry of a pooling op.
#[derive(Debug, Clone, Copy)]
struct Pool {
    mode: Mode,
    k: usize,
    s: usize,
    p: usize,
}

/// Max pooling over k x k windows with stride `s` and padding `p` (padding never wins the max).
pub fn max_pool2d(x: &Tensor, k: usize, s: usize, p: usize) -> Result<Tensor> {
    pool(
        x,
        Pool {
            mode: Mode::Max,
            k,
            s,
            p,
        },
    )
}

/// Average pooling over k x k windows; padded cells count in the divisor (PyTorch's default).
pub fn avg_pool2d(x: &Tensor, k: usize, s: usize, p: usize) -> Result<Tensor> {
    pool(
        x,
        Pool {
            mode: Mode::Avg,
            k,
            s,
            p,
        },
    )
}

/// Mean over the spatial dimensions: [N, C, H, W] -> [N, C]. On CPU one pass each way (forward a
/// lane-summed mean per plane, backward a fill of dy / (H W)); elsewhere candle's mean.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    if x.rank() == 4 && x.dim(2)? * x.dim(3)? == 0 {
        candle_core::bail!(
            "global_avg_pool: input {:?} has empty planes; the image is too small for the model's downsampling (use larger inputs or a model with fewer stride-2 stages)",
            x.dims()
        );
    }
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && x.rank() == 4 {
        return x.contiguous()?.apply_op1(GlobalAvgPool);
    }
    x.mean((2, 3))
}

struct GlobalAvgPool;

fn gap_forward<T: WithDType>(x: &[T], hw: usize) -> Vec<T> {
    x.par_chunks(hw)
        .map(|plane| T::from_f64(lane_sum(plane, |v| v) / hw as f64))
        .collect()
}

fn gap_backward<T: WithDType>(g: &[T], planes: usize, hw: usize) -> Vec<T> {
    let inv = T::from_f64(1.0 / hw.max(1) as f64);
    let dx = par_new(planes * hw, hw, g.par_iter(), |plane, &v| {
        plane.fill(v * inv)
    });
    dx
}

impl CustomOp1 for GlobalAvgPool {
    fn name(&self) -> &'static str {
        "global_avg_pool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l.shape().dims4()?;
        let hw = (h * w).max(1);
        let out = float_storage!(s, "global_avg_pool", |T| gap_forward::<T>(
            contiguous_slice(s, l, "global_avg_pool")?,
            hw
        ));
        Ok((out, Shape::from((n, c))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (_, _, h, w) = arg.dims4()?;
        Ok(Some(
            grad.contiguous()?
                .apply_op1_no_bwd(&GlobalAvgPoolGrad { h, w })?,
        ))
    }
}

/// dx [N, C, H, W] = dy [N, C] / (H W) on every pixel.
struct GlobalAvgPoolGrad {
    h: usize,
    w: usize,
}

impl CustomOp1 for GlobalAvgPoolGrad {
    fn name(&self) -> &'static str {
        "global_avg_pool_grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c) = l.shape().dims2()?;
        let hw = self.h * self.w;
        let out = float_storage!(s, "global_avg_pool_grad", |T| gap_backward::<T>(
            contiguous_slice(s, l, "global_avg_pool_grad")?,
            n * c,
            hw
        ));
        Ok((out, Shape::from((n, c, self.h, self.w))))
    }
}

fn pool(x: &Tensor, op: Pool) -> Result<Tensor> {
    if op.k == 0 || op.s == 0 {
        candle_core::bail!("pooling needs a kernel and a stride of at least 1");
    }
    if op.p * 2 > op.k {
        candle_core::bail!(
            "pooling padding {} is more than half the kernel {}",
            op.p,
            op.k
        );
    }
    let (_, _, h, w) = x.dims4()?;
    if h * w == 0 {
        candle_core::bail!(
            "pooling: input {:?} has empty planes; the image is too small for the model's downsampling (use larger inputs or a model with fewer stride-2 stages)",
            x.dims()
        );
    }
    let cpu_ok = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
    if cpu_ok {
        return x.contiguous()?.apply_op1(op);
    }
    // Other devices: pooling composed of candle ops. Candle's own max_pool2d/avg_pool2d have a
    // backward only for kernel == stride, and it is wrong there too (candle 0.11.1): the max
    // pool's scales the gradient by the share of maxima in the window (a quarter for a unique max
    // of a 2x2 window), and both map the gradient back by nearest upsampling, which misplaces it
    // when the size is not a multiple of the kernel. Trained with it, the quickstart reached
    // 83.6% on CUDA against 86.9% on CPU.
    pool_composed(x, op)
}

/// Pooling of any kernel, stride and padding from candle ops, for devices without our kernels:
/// the input padded (with -inf for max, so padding never wins, and zeros for the average, which
/// counts padded cells), then the max or the mean of the k*k strided views of it (`index_select`
/// of every s-th row and column from each window offset). Where several cells of a window tie
/// for the max, candle's `maximum` shares the gradient among them (the CPU kernel gives it all to
/// the first); both are gradients of the max.
fn pool_composed(x: &Tensor, op: Pool) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (oh, ow) = op.geometry(h, w)?;
    let (dev, p) = (x.device(), op.p);
    let xp = match (p, op.mode) {
        (0, _) => x.clone(),
        (_, Mode::Avg) => x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?,
        (_, Mode::Max) => {
            let (hp, wp) = (h + 2 * p, w + 2 * p);
            let fence: Vec<f32> = (0..hp * wp)
                .map(|i| {
                    let (row, col) = (i / wp, i % wp);
                    let inside = (p..p + h).contains(&row) && (p..p + w).contains(&col);
                    if inside {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
                .collect();
            let fence = Tensor::from_vec(fence, (hp, wp), dev)?.to_dtype(x.dtype())?;
            x.pad_with_zeros(2, p, p)?
                .pad_with_zeros(3, p, p)?
                .broadcast_add(&fence)?
        }
    };
    // every s-th index from `start`, `count` of them
    let picks = |start: usize, count: usize| {
        let idx: Vec<u32> = (0..count).map(|i| (start + i * op.s) as u32).collect();
        Tensor::from_vec(idx, count, dev)
    };
    let cols: Vec<Tensor> = (0..op.k).map(|dx| picks(dx, ow)).collect::<Result<_>>()?;
    let mut acc: Option<Tensor> = None;
    for dy in 0..op.k {
        let rows = xp.index_select(&picks(dy, oh)?, 2)?;
        for c in &cols {
            let v = rows.index_select(c, 3)?;
            acc = Some(match (acc, op.mode) {
                (None, _) => v,
                (Some(a), Mode::Max) => a.maximum(&v)?,
                (Some(a), Mode::Avg) => (a + v)?,
            });
        }
    }
    let Some(acc) = acc else {
        candle_core::bail!("pooling needs a kernel of at least 1");
    };
    match op.mode {
        Mode::Max => Ok(acc),
        Mode::Avg => acc / (op.k * op.k) as f64,
    }
}

impl Pool {
    fn geometry(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        Ok((
            out_size(h, self.k, self.s, self.p)?,
            out_size(w, self.k, self.s, self.p)?,
        ))
    }

    /// Calls `f(out_index, input_index)` for every in-bounds cell of every window of one plane.
    #[inline]
    fn windows(&self, h: usize, w: usize, oh: usize, ow: usize, mut f: impl FnMut(usize, usize)) {
        for oy in 0..oh {
            let y0 = (oy * self.s) as isize - self.p as isize;
            for ox in 0..ow {
                let x0 = (ox * self.s) as isize - self.p as isize;
                for ky in 0..self.k as isize {
                    let iy = y0 + ky;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    for kx in 0..self.k as isize {
                        let ix = x0 + kx;
                        if ix < 0 || ix >= w as isize {
                            continue;
                        }
                        f(oy * ow + ox, iy as usize * w + ix as usize);
                    }
                }
            }
        }
    }

    /// Non-overlapping windows without padding (kernel == stride, the usual 2x2 pool): each
    /// window is read row by row, no per-cell bounds checks.
    fn tiled(&self) -> bool {
        self.k == self.s && self.p == 0
    }

    /// Whether the 2x2 max pool's AVX-512 path (`max2_avx512`) runs: f32 on a CPU with AVX-512.
    fn max2_avx512<T: WithDType>(&self) -> bool {
        let f32 = std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>();
        cfg!(target_arch = "x86_64")
            && f32
            && self.mode == Mode::Max
            && self.tiled()
            && self.k == 2
            && crate::paths::cpu().avx512
    }

    /// The index (in the plane) of the first maximum of the window at (oy, ox) of a tiled pool.
    #[inline]
    fn tile_argmax<T: WithDType>(&self, plane: &[T], w: usize, oy: usize, ox: usize) -> usize {
        let k = self.k;
        let mut best = oy * k * w + ox * k;
        let mut value = plane[best];
        for ky in 0..k {
            let start = (oy * k + ky) * w + ox * k;
            for (i, &v) in plane[start..start + k].iter().enumerate() {
                // selects, not branches: random data mispredicts half of these comparisons
                let better = v > value;
                best = if better { start + i } else { best };
                value = if better { v } else { value };
            }
        }
        best
    }

    fn forward<T: WithDType>(&self, x: &[T], planes: usize, h: usize, w: usize) -> Result<Vec<T>> {
        let (oh, ow) = self.geometry(h, w)?;
        #[cfg(target_arch = "x86_64")]
        if self.max2_avx512::<T>() {
            let out = par_new(
                planes * oh * ow,
                oh * ow,
                x.par_chunks(h * w),
                |o, plane| {
                    // SAFETY: AVX-512 was checked (`max2_avx512`); `plane` is H x W with
                    // OH = H / 2 and OW = W / 2, `o` OH x OW.
                    unsafe {
                        max2_avx512::forward(crate::f32s(plane), w, oh, ow, crate::f32s_mut(o))
                    }
                },
            );
            return Ok(out);
        }
        if self.tiled() {
            let inv = T::from_f64(1.0 / (self.k * self.k) as f64);
            let out = par_new(
                planes * oh * ow,
                oh * ow,
                x.par_chunks(h * w),
                |o, plane| {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            o[oy * ow + ox] = match self.mode {
                                Mode::Max => {
                                    let mut m = plane[oy * self.k * w + ox * self.k];
                                    for ky in 0..self.k {
                                        let start = (oy * self.k + ky) * w + ox * self.k;
                                        for &v in &plane[start..start + self.k] {
                                            m = if v > m { v } else { m };
                                        }
                                    }
                                    m
                                }
                                Mode::Avg => {
                                    let mut acc = T::zero();
                                    for ky in 0..self.k {
                                        let start = (oy * self.k + ky) * w + ox * self.k;
                                        for &v in &plane[start..start + self.k] {
                                            acc += v;
                                        }
                                    }
                                    acc * inv
                                }
                            };
                        }
                    }
                },
            );
            return Ok(out);
        }
        let init = match self.mode {
            Mode::Max => T::from_f64(f64::NEG_INFINITY),
            Mode::Avg => T::zero(),
        };
        let inv = T::from_f64(1.0 / (self.k * self.k) as f64);
        let out = par_new(
            planes * oh * ow,
            oh * ow,
            x.par_chunks(h * w),
            |o, plane| {
                o.fill(init);
                self.windows(h, w, oh, ow, |oi, ii| match self.mode {
                    Mode::Max => {
                        if plane[ii] > o[oi] {
                            o[oi] = plane[ii]
                        }
                    }
                    Mode::Avg => o[oi] += plane[ii],
                });
                if self.mode == Mode::Avg {
                    o.iter_mut().for_each(|v| *v *= inv);
                }
            },
        );
        Ok(out)
    }

    fn backward<T: WithDType>(
        &self,
        x: &[T],
        g: &[T],
        planes: usize,
        h: usize,
        w: usize,
    ) -> Result<Vec<T>> {
        let (oh, ow) = self.geometry(h, w)?;
        let inv = T::from_f64(1.0 / (self.k * self.k) as f64);
        let items = x.par_chunks(h * w).zip(g.par_chunks(oh * ow));
        #[cfg(target_arch = "x86_64")]
        if self.max2_avx512::<T>() {
            let out = par_new(planes * h * w, h * w, items, |dx, (plane, go)| {
                let (plane, go, dx) = (crate::f32s(plane), crate::f32s(go), crate::f32s_mut(dx));
                // SAFETY: AVX-512 was checked (`max2_avx512`); `plane` and `dx` are H x W with
                // OH = H / 2 and OW = W / 2, `go` OH x OW.
                unsafe { max2_avx512::backward(plane, go, w, (oh, ow), dx) }
            });
            return Ok(out);
        }
        if self.tiled() {
            let out = par_new(planes * h * w, h * w, items, |dx, (plane, go)| {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let gv = go[oy * ow + ox];
                        match self.mode {
                            Mode::Max => dx[self.tile_argmax(plane, w, oy, ox)] = gv,
                            Mode::Avg => {
                                for ky in 0..self.k {
                                    let start = (oy * self.k + ky) * w + ox * self.k;
                                    dx[start..start + self.k].fill(gv * inv);
                                }
                            }
                        }
                    }
                }
            });
            return Ok(out);
        }
        let out = par_new(planes * h * w, h * w, items, |dx, (plane, go)| {
            match self.mode {
                Mode::Avg => self.windows(h, w, oh, ow, |oi, ii| dx[ii] += go[oi] * inv),
                Mode::Max => {
                    // The gradient goes to the first maximum of each window.
                    let mut best = vec![(T::from_f64(f64::NEG_INFINITY), usize::MAX); oh * ow];
                    self.windows(h, w, oh, ow, |oi, ii| {
                        if plane[ii] > best[oi].0 {
                            best[oi] = (plane[ii], ii)
                        }
                    });
                    for (oi, (_, ii)) in best.into_iter().enumerate() {
                        if ii != usize::MAX {
                            dx[ii] += go[oi];
                        }
                    }
                }
            }
        });
        Ok(out)
    }
}

impl CustomOp1 for Pool {
    fn name(&self) -> &'static str {
        match self.mode {
            Mode::Max => "max_pool2d",
            Mode::Avg => "avg_pool2d",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l.shape().dims4()?;
        let (oh, ow) = self.geometry(h, w)?;
        let shape = Shape::from((n, c, oh, ow));
        match s {
            CpuStorage::F32(_) => Ok((
                f32::to_cpu_storage_owned(self.forward(
                    contiguous_slice::<f32>(s, l, "pool")?,
                    n * c,
                    h,
                    w,
                )?),
                shape,
            )),
            CpuStorage::F64(_) => Ok((
                f64::to_cpu_storage_owned(self.forward(
                    contiguous_slice::<f64>(s, l, "pool")?,
                    n * c,
                    h,
                    w,
                )?),
                shape,
            )),
            _ => candle_core::bail!("pool: only f32 and f64 are supported"),
        }
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            arg.apply_op2_no_bwd(&grad.contiguous()?, &PoolGrad(*self))?,
        ))
    }
}

/// Input gradient of a pooling op, from (input, output gradient).
struct PoolGrad(Pool);

impl CustomOp2 for PoolGrad {
    fn name(&self) -> &'static str {
        "pool2d_grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l1.shape().dims4()?;
        let shape = l1.shape().clone();
        match s1 {
            CpuStorage::F32(_) => Ok((
                f32::to_cpu_storage_owned(self.0.backward(
                    contiguous_slice::<f32>(s1, l1, "pool_grad")?,
                    contiguous_slice::<f32>(s2, l2, "pool_grad")?,
                    n * c,
                    h,
                    w,
                )?),
                shape,
            )),
            CpuStorage::F64(_) => Ok((
                f64::to_cpu_storage_owned(self.0.backward(
                    contiguous_slice::<f64>(s1, l1, "pool_grad")?,
                    contiguous_slice::<f64>(s2, l2, "pool_grad")?,
                    n * c,
                    h,
                    w,
                )?),
                shape,
            )),
            _ => candle_core::bail!("pool_grad: only f32 and f64 are supported"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_grad_fd, max_rel_err, rand_tensor};

    #[test]
    fn empty_planes_are_an_error_not_a_panic() {
        let x = Tensor::zeros((1, 2, 0, 0), DType::F32, &candle_core::Device::Cpu).unwrap();
        let err = max_pool2d(&x, 2, 2, 1).unwrap_err().to_string();
        assert!(err.contains("empty planes"), "{err}");
    }

    /// The 2x2 max pool's AVX-512 path against the scalar window scan (`tile_argmax`), bit for
    /// bit: values drawn from a few, so that windows tie; signed zeros (the first of equal
    /// values wins, `-0.0` before `0.0`); NaNs (never greater, never passed over by a greater
    /// value after them); odd sizes; rows of more than 16 windows. (Without AVX-512 it checks the
    /// scalar tiled path the same way.)
    #[test]
    fn max2_avx512_is_bitwise_the_window_scan() {
        let op = Pool {
            mode: Mode::Max,
            k: 2,
            s: 2,
            p: 0,
        };
        let palette = [1.5f32, -2.0, 0.0, -0.0, f32::NAN, 1.5, 3.0, -0.0];
        for (planes, h, w) in [(3, 28, 28), (2, 5, 37), (1, 9, 70), (2, 2, 2), (1, 3, 3)] {
            let len = planes * h * w;
            // a multiplicative hash picks from the palette: every ordering of ties and NaNs occurs
            let x: Vec<f32> = (0..len)
                .map(|i| palette[(i as u32).wrapping_mul(2654435761) as usize >> 13 & 7])
                .collect();
            let (oh, ow) = op.geometry(h, w).unwrap();
            let g: Vec<f32> = (0..planes * oh * ow).map(|i| i as f32 + 0.25).collect();
            let mut want_y = Vec::new();
            let mut want_dx = vec![0f32; len];
            for p in 0..planes {
                let plane = &x[p * h * w..][..h * w];
                for oy in 0..oh {
                    for ox in 0..ow {
                        let at = op.tile_argmax(plane, w, oy, ox);
                        want_y.push(plane[at]);
                        want_dx[p * h * w + at] = g[(p * oh + oy) * ow + ox];
                    }
                }
            }
            let y = op.forward(&x, planes, h, w).unwrap();
            let dx = op.backward(&x, &g, planes, h, w).unwrap();
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&y), bits(&want_y), "forward {planes} {h} {w}");
            assert_eq!(bits(&dx), bits(&want_dx), "backward {planes} {h} {w}");
        }
    }

    /// Non-overlapping windows (the tiled fast path), odd sizes included (the last row and
    /// column are then dropped, as in PyTorch): forward against candle, gradients against the
    /// general path and finite differences.
    #[test]
    fn tiled_pools_equal_candle_and_the_general_path() {
        use candle_core::Var;
        for (shape, k) in [([2, 3, 8, 6], 2), ([1, 2, 7, 9], 2), ([2, 1, 9, 9], 3)] {
            let x = Var::from_tensor(&rand_tensor(&shape, 5, DType::F32)).unwrap();
            assert_eq!(
                max_rel_err(&max_pool2d(&x, k, k, 0).unwrap(), &x.max_pool2d(k).unwrap()),
                0.0
            );
            assert!(
                max_rel_err(&avg_pool2d(&x, k, k, 0).unwrap(), &x.avg_pool2d(k).unwrap()) < 1e-6
            );
            for mode in [Mode::Max, Mode::Avg] {
                let op = Pool {
                    mode,
                    k,
                    s: k,
                    p: 0,
                };
                let (n, c, h, w) = x.dims4().unwrap();
                let y = pool(&x, op).unwrap();
                let up = rand_tensor(y.dims(), 6, DType::F32);
                let grad = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
                let ours = grad.get(x.as_tensor()).unwrap().flatten_all().unwrap();
                let (oh, ow) = op.geometry(h, w).unwrap();
                let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let gs = up.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                // the general (overlap-capable) path of the same pool
                let mut general = vec![0f32; xs.len()];
                for (p, (dx, (plane, go))) in general
                    .chunks_mut(h * w)
                    .zip(xs.chunks(h * w).zip(gs.chunks(oh * ow)))
                    .enumerate()
                {
                    assert!(p < n * c);
                    let mut best = vec![(f32::NEG_INFINITY, usize::MAX); oh * ow];
                    op.windows(h, w, oh, ow, |oi, ii| match mode {
                        Mode::Avg => dx[ii] += go[oi] / (k * k) as f32,
                        Mode::Max => {
                            if plane[ii] > best[oi].0 {
                                best[oi] = (plane[ii], ii)
                            }
                        }
                    });
                    for (oi, (_, ii)) in best.into_iter().enumerate() {
                        if ii != usize::MAX {
                            dx[ii] += go[oi];
                        }
                    }
                }
                let general = Tensor::new(general.as_slice(), &candle_core::Device::Cpu).unwrap();
                assert!(max_rel_err(&ours, &general) < 1e-6, "{mode:?} {shape:?}");
                let x64 = rand_tensor(&shape, 7, DType::F64);
                check_grad_fd(
                    |t| pool(t, op).unwrap(),
                    &x64,
                    1,
                    1e-6,
                    &format!("{mode:?}"),
                );
            }
        }
    }

    #[test]
    fn global_average_pool_matches_candle_and_finite_differences() {
        use candle_core::Var;
        for shape in [[2, 3, 5, 7], [1, 1, 1, 1], [3, 2, 9, 9]] {
            let x = Var::from_tensor(&rand_tensor(&shape, 8, DType::F32)).unwrap();
            let ours = global_avg_pool(&x).unwrap();
            let want = x.mean((2, 3)).unwrap();
            assert!(max_rel_err(&ours, &want) < 1e-6, "{shape:?}");
            let up = rand_tensor(&shape[..2], 9, DType::F32);
            let g1 = (ours * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (want * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let (a, b) = (
                g1.get(x.as_tensor()).unwrap(),
                g2.get(x.as_tensor()).unwrap(),
            );
            assert!(max_rel_err(a, b) < 1e-6, "{shape:?}");
            let x64 = rand_tensor(&shape, 10, DType::F64);
            check_grad_fd(|t| global_avg_pool(t).unwrap(), &x64, 1, 1e-6, "gap");
        }
    }

    #[test]
    fn gradients_match_finite_differences_for_overlapping_windows() {
        for (k, s, p) in [(3, 2, 1), (3, 1, 1), (2, 1, 0), (3, 2, 0)] {
            for mode in [Mode::Max, Mode::Avg] {
                let x = rand_tensor(&[1, 2, 7, 6], 6, DType::F64);
                check_grad_fd(
                    |t| pool(t, Pool { mode, k, s, p }).unwrap(),
                    &x,
                    1,
                    1e-6,
                    &format!("{mode:?} k{k} s{s} p{p}"),
                );
            }
        }
    }

    /// The pooling other devices get (candle ops) equals the CPU kernel, forward and gradient,
    /// for overlapping, padded and strided windows (random inputs have no ties), and in f64
    /// matches finite differences.
    #[test]
    fn composed_pooling_for_other_devices_matches_the_kernel() {
        use candle_core::Var;
        for (shape, k, s, p) in [
            ([2, 3, 9, 8], 3, 2, 1),
            ([1, 2, 7, 7], 3, 1, 1),
            ([2, 1, 6, 9], 2, 1, 0),
            ([1, 2, 8, 8], 3, 2, 0),
            ([1, 1, 5, 5], 1, 2, 0),
            ([2, 3, 8, 6], 2, 2, 0),
            ([1, 2, 7, 9], 2, 2, 0),
        ] {
            for mode in [Mode::Max, Mode::Avg] {
                let op = Pool { mode, k, s, p };
                let x = Var::from_tensor(&rand_tensor(&shape, 11, DType::F32)).unwrap();
                let (kernel, composed) = (pool(&x, op).unwrap(), pool_composed(&x, op).unwrap());
                let what = format!("{mode:?} k{k} s{s} p{p}");
                assert!(max_rel_err(&composed, &kernel) < 1e-6, "{what}");
                let up = rand_tensor(kernel.dims(), 12, DType::F32);
                let grad = |y: Tensor| {
                    let g = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
                    g.get(x.as_tensor()).unwrap().clone()
                };
                assert!(max_rel_err(&grad(composed), &grad(kernel)) < 1e-6, "{what}");
                let x64 = rand_tensor(&shape, 13, DType::F64);
                check_grad_fd(|t| pool_composed(t, op).unwrap(), &x64, 1, 1e-6, &what);
            }
        }
    }
}
