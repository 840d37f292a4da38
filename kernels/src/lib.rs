//! `recipe-kernels`: the differentiable operations the models are built from, as candle custom ops
//! with their own backward, so that faster kernels replace them without touching a model. It
//! depends on candle alone, not on the engine.
//!
//! - [`conv`]: 2-D convolution: path choice and geometry, im2col/col2im and the layout copies, the
//!   direct AVX-512 convolution, Winograd F(2x2, 3x3), the passes over a batch, and a batch norm +
//!   ReLU fused into the convolution that follows it.
//! - [`norm`]: batch norm, with an optional fused ReLU or residual join `relu(bn(x) + r)`.
//! - [`pool`]: max and average pooling of any kernel, stride and padding; global average pooling.
//! - [`act`]: the residual join `relu(a + b)`.
//! - [`loss`]: softmax cross entropy with hard or soft targets; top-1 accuracy.
//! - [`gemm`]: the matrix product (the `gemm` crate) the convolutions run on.
//! - [`bf16`]: the matrix product in bf16 with f32 sums (AVX512-BF16), for `amp_bf16`, and
//!   the rounding the bf16 convolutions share.
//! - [`paths`]: which path each kernel takes, set in one place (from code, or the environment).
//!
//! On CPU (f32 and f64) every op is parallel over the cores with rayon. Backward passes read
//! their inputs in place and compute only the gradients the graph needs; outputs are written
//! chunk by chunk in parallel (`par_new`) without zeroing the whole buffer first; sums run in an
//! order fixed by the shapes, so results do not depend on the thread count. On other devices the
//! ops fall back to candle's own. `benches/kernels.rs` (criterion, in this crate) measures each;
//! `examples/conv_layers.rs` times every convolution of ResNet-50 or ResNet-20 pass by pass
//! (`benches/reference/conv_layers.py` is its PyTorch twin).

/// Runs `$body` with the type name `$t` bound to the storage's float type (f32 or f64) and wraps
/// the `Vec<$t>` it returns into a CPU storage; other dtypes are an error naming `$op`.
macro_rules! float_storage {
    ($storage:expr, $op:expr, |$t:ident| $body:expr) => {
        match $storage {
            candle_core::CpuStorage::F32(_) => {
                type $t = f32;
                <f32 as candle_core::WithDType>::to_cpu_storage_owned($body)
            }
            candle_core::CpuStorage::F64(_) => {
                type $t = f64;
                <f64 as candle_core::WithDType>::to_cpu_storage_owned($body)
            }
            _ => candle_core::bail!("{}: only f32 and f64 are supported", $op),
        }
    };
}

pub mod act;
pub mod bf16;
pub mod conv;
pub mod gemm;
pub mod loss;
pub mod norm;
pub mod paths;
pub mod pool;
#[cfg(test)]
pub(crate) mod testing;

pub use act::add_relu;
pub use conv::{bn_relu_conv2d, conv2d, conv2d_backward, conv2d_with_batch_stats, Conv2dParams};
pub use loss::{cross_entropy, top1_correct, topk_correct, Targets};
pub use norm::{batch_norm, batch_norm_add_relu, batch_norm_given, BatchNormStats, Saved, StatSum};
pub use paths::{paths, set_paths, Paths, Switch};
pub use pool::{avg_pool2d, global_avg_pool, max_pool2d};

// Re-exported so that callers use the same candle as the kernels.
pub use candle_core;

use candle_core::{CpuStorage, Layout, Result, WithDType};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// A new vector of `len` values written in parallel: chunk `i` (`chunk` values, the last one
/// shorter) is zeroed and handed to `f` with the `i`-th item of `items` and the rayon job's
/// `state` from `init`. Each chunk is zeroed just before it is written, while it is in cache:
/// `vec![0; len]` first would write the whole buffer out to memory once more than the kernel
/// does (ResNet-20 spent 5% of its training step in that memset). `items` must have one item per
/// chunk.
pub(crate) fn par_new_with<T, I, S>(
    len: usize,
    chunk: usize,
    items: I,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, &mut [T], I::Item) + Sync + Send,
) -> Vec<T>
where
    T: WithDType,
    I: IndexedParallelIterator,
{
    let chunk = chunk.max(1);
    assert_eq!(
        items.len(),
        len.div_ceil(chunk),
        "par_new: one item per chunk"
    );
    let mut v = Vec::with_capacity(len);
    let written: usize = v.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk)
        .zip(items)
        .map_init(init, |state, (c, item)| {
            c.fill(MaybeUninit::new(T::zero()));
            // SAFETY: every element of `c` was initialised just above.
            let c = unsafe { &mut *(c as *mut [MaybeUninit<T>] as *mut [T]) };
            f(state, c, item);
            c.len()
        })
        .sum();
    // Counted, not trusted to the iterator's reported length.
    assert_eq!(written, len, "par_new: every chunk written");
    // SAFETY: `written == len` values were initialised: every chunk, each in full.
    unsafe { v.set_len(len) };
    v
}

/// `par_new_with` without per-job state.
pub(crate) fn par_new<T, I>(
    len: usize,
    chunk: usize,
    items: I,
    f: impl Fn(&mut [T], I::Item) + Sync + Send,
) -> Vec<T>
where
    T: WithDType,
    I: IndexedParallelIterator,
{
    par_new_with(len, chunk, items, || (), |_, c, item| f(c, item))
}

/// The contiguous slice of a CPU tensor's storage, or an error for strided input.
pub(crate) fn contiguous_slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> Result<&'a [T]> {
    let data = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// Output size of a sliding window.
pub(crate) fn out_size(input: usize, kernel: usize, stride: usize, pad: usize) -> Result<usize> {
    if input + 2 * pad < kernel {
        candle_core::bail!(
            "window of size {kernel} does not fit an input of size {input} with padding {pad}"
        );
    }
    Ok((input + 2 * pad - kernel) / stride + 1)
}

/// `v` as f32 values, for the f32-only kernels (the direct convolution, Winograd, the 2x2 max
/// pool), taken only when T is f32.
pub(crate) fn f32s<T: WithDType>(v: &[T]) -> &[f32] {
    assert_eq!(
        std::any::TypeId::of::<T>(),
        std::any::TypeId::of::<f32>(),
        "f32 values expected"
    );
    // SAFETY: T is f32 (checked above), so the slice is one of f32.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), v.len()) }
}

/// A vector of f32 values as one of T (T is f32: the f32-only kernels' outputs).
/// The values are moved, not converted: the bf16 pairs are bit patterns, NaNs among them.
pub(crate) fn f32s_into<T: WithDType>(v: Vec<f32>) -> Vec<T> {
    assert_eq!(
        std::any::TypeId::of::<T>(),
        std::any::TypeId::of::<f32>(),
        "f32 values expected"
    );
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: T is f32 (checked above): the same allocation, length and capacity.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast(), v.len(), v.capacity()) }
}

/// `f32s` for a mutable slice.
pub(crate) fn f32s_mut<T: WithDType>(v: &mut [T]) -> &mut [f32] {
    assert_eq!(
        std::any::TypeId::of::<T>(),
        std::any::TypeId::of::<f32>(),
        "f32 values expected"
    );
    // SAFETY: T is f32 (checked above), so the slice is one of f32.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), v.len()) }
}

/// A 16-bit lane mask of the lanes `lo..hi` (clamped to 0..16): the masked loads and stores
/// of the AVX-512 kernels at the edges of rows.
pub(crate) fn lane_mask(lo: isize, hi: isize) -> u16 {
    let (lo, hi) = (lo.clamp(0, 16), hi.clamp(0, 16));
    if hi <= lo {
        return 0;
    }
    let bits = (1u32 << hi) - (1u32 << lo);
    bits as u16
}

/// Lanes of the summing loops: four vectors of 8 f32, independent chains of adds (one chain
/// waits on the add's latency: 2 values per cycle, measured as 2.5% of a ResNet-20 step in the
/// convolution's batch statistics alone).
pub(crate) const LANES: usize = 32;

/// `Σ f(v)` over a slice, in `LANES` lanes of `T` (which the compiler vectorises) added up in
/// f64.
#[inline]
pub(crate) fn lane_sum<T: WithDType>(v: &[T], f: impl Fn(T) -> T) -> f64 {
    let mut acc = [T::zero(); LANES];
    let (chunks, rest) = v.as_chunks::<LANES>();
    for ch in chunks {
        for j in 0..LANES {
            acc[j] += f(ch[j]);
        }
    }
    let rest: f64 = rest.iter().map(|&r| f(r).to_f64()).sum();
    acc.iter().map(|a| a.to_f64()).sum::<f64>() + rest
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every value is written once, the short last chunk included, and chunks meet their items.
    #[test]
    fn par_new_writes_every_chunk_with_its_item() {
        for (len, chunk) in [(10, 3), (9, 3), (1, 5), (0, 4), (100_000, 1 << 12)] {
            let starts: Vec<usize> = (0..len).step_by(chunk).collect();
            let v: Vec<f32> = par_new(len, chunk, starts.par_iter(), |c, &start| {
                for (i, x) in c.iter_mut().enumerate() {
                    *x += (start + i) as f32;
                }
            });
            assert_eq!(
                v,
                (0..len).map(|i| i as f32).collect::<Vec<_>>(),
                "{len} {chunk}"
            );
        }
    }
}
