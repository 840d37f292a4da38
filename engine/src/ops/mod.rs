//! Differentiable operations the models are built from, in one place so that faster kernels can
//! replace them without touching a model: convolution, pooling, batch norm, losses.
//!
//! On CPU, convolution goes through im2col + one large matrix product (forward and both gradients),
//! and pooling supports any kernel and stride with a backward pass (candle's has none when kernel !=
//! stride). On other devices the models use candle's own ops.

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

pub use act::add_relu;
pub use conv::{conv2d, Conv2dParams};
pub use loss::{cross_entropy, top1_correct, Targets};
pub use norm::{batch_norm, BatchNormStats};
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
