//! Differentiable operations the models are built from, in one place so that faster kernels can
//! replace them without touching a model: convolution, pooling, batch norm, losses.
//!
//! On CPU (f32 and f64) every op here is a candle custom op with its own backward, parallel over
//! both cores with rayon: convolution (per image im2col + one matrix product from the `gemm`
//! crate; the input gradient of stride-1 convolutions is itself a forward convolution; the kernel
//! gradient is summed in a fixed order so results do not depend on the thread count), batch norm
//! with an optional fused ReLU, the residual `relu(a + b)`, max/average pooling of any kernel,
//! stride and padding, global average pooling, and softmax cross entropy with hard or soft
//! targets. Backward passes read their inputs in place and compute only the gradients the graph
//! needs. On other devices the models use candle's own ops. `benches/kernels.rs` measures each.
//! 3x3 stride-1 convolutions with 64 channels or more (and so their input gradients) run as
//! Winograd F(2x2, 3x3) (`winograd.rs`; `RECIPE_WINOGRAD=0` turns it off).

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

mod act;
mod conv;
pub mod gemm;
mod loss;
mod norm;
mod pool;
#[cfg(test)]
pub(crate) mod testing;
mod winograd;

pub use act::add_relu;
pub(crate) use conv::conv2d_with_batch_stats;
pub use conv::{conv2d, conv2d_backward, Conv2dParams};
pub use loss::{cross_entropy, top1_correct, Targets};
pub use norm::{batch_norm, BatchNormStats};
pub(crate) use norm::{batch_norm_given, Saved};
pub use pool::{avg_pool2d, global_avg_pool, max_pool2d};

use candle_core::{CpuStorage, Layout, Result, WithDType};

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

/// `Σ f(v)` over a slice, in 8 lanes of `T` (which the compiler vectorises) added up in f64.
#[inline]
pub(crate) fn lane_sum<T: WithDType>(v: &[T], f: impl Fn(T) -> T) -> f64 {
    let mut acc = [T::zero(); 8];
    let chunks = v.chunks_exact(8);
    let rest: f64 = chunks.remainder().iter().map(|&r| f(r).to_f64()).sum();
    for ch in chunks {
        for j in 0..8 {
            acc[j] += f(ch[j]);
        }
    }
    acc.iter().map(|a| a.to_f64()).sum::<f64>() + rest
}
