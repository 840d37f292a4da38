//! Layers with named parameters: convolution, batch norm, linear.

use crate::error::Result;
use crate::model::{ParamBuilder, ParamKind};
use candle_core::{DType, Tensor, Var};
use recipe_kernels::{self as ops, BatchNormStats, Conv2dParams};

pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    params: Conv2dParams,
}

impl Conv2d {
    /// A k x k convolution, Kaiming-normal (fan-out, ReLU gain) initialised, as torchvision does.
    pub fn new(
        b: &mut ParamBuilder,
        name: &str,
        (c_in, c_out, k): (usize, usize, usize),
        stride: usize,
        padding: usize,
        bias: bool,
    ) -> Result<Self> {
        let std = (2.0 / (c_out * k * k) as f64).sqrt();
        let weight = b.normal(
            format!("{name}.weight"),
            &[c_out, c_in, k, k],
            std,
            ParamKind::Weight,
        )?;
        let bias = if bias {
            Some(b.constant(format!("{name}.bias"), &[c_out], 0.0, ParamKind::Bias)?)
        } else {
            None
        };
        Ok(Conv2d {
            weight,
            bias,
            params: Conv2dParams { stride, padding },
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::conv2d(
            x,
            &self.weight,
            self.bias.as_ref(),
            self.params,
        )?)
    }
}

pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    momentum: f64,
    eps: f64,
}

impl BatchNorm2d {
    /// Batch norm with PyTorch's defaults (momentum 0.1, eps 1e-5); `zero_init` starts the scale
    /// at 0 (used on the last norm of residual branches).
    pub fn new(b: &mut ParamBuilder, name: &str, c: usize, zero_init: bool) -> Result<Self> {
        let weight = b.constant(
            format!("{name}.weight"),
            &[c],
            if zero_init { 0.0 } else { 1.0 },
            ParamKind::Norm,
        )?;
        let bias = b.constant(format!("{name}.bias"), &[c], 0.0, ParamKind::Norm)?;
        let running_mean = b.buffer(format!("{name}.running_mean"), &[c], 0.0)?;
        let running_var = b.buffer(format!("{name}.running_var"), &[c], 1.0)?;
        Ok(BatchNorm2d {
            weight,
            bias,
            running_mean,
            running_var,
            momentum: 0.1,
            eps: 1e-5,
        })
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_act(x, train, false)
    }

    /// Batch norm followed by a ReLU when `relu` (fused on CPU).
    pub fn forward_act(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        self.forward_with(x, train, relu, None)
    }

    /// Training forward with the batch statistics of `x` already computed (mean, biased variance).
    fn forward_given(&self, x: &Tensor, relu: bool, stats: ops::Saved) -> Result<Tensor> {
        self.forward_with(x, true, relu, Some(stats))
    }

    fn forward_with(
        &self,
        x: &Tensor,
        train: bool,
        relu: bool,
        given: Option<ops::Saved>,
    ) -> Result<Tensor> {
        Ok(ops::batch_norm_given(
            x,
            &self.weight,
            &self.bias,
            self.stats(),
            self.eps,
            train,
            relu,
            given,
        )?)
    }

    /// `relu(batch_norm(x) + residual)`, the join of a residual block (one fused pass in training
    /// on CPU), with the batch statistics of `x` when already computed.
    pub(crate) fn forward_add_relu(
        &self,
        x: &Tensor,
        residual: &Tensor,
        train: bool,
        given: Option<ops::Saved>,
    ) -> Result<Tensor> {
        Ok(ops::batch_norm_add_relu(
            x,
            &self.weight,
            &self.bias,
            residual,
            self.stats(),
            self.eps,
            train,
            given,
        )?)
    }

    fn stats(&self) -> BatchNormStats<'_> {
        BatchNormStats {
            running_mean: &self.running_mean,
            running_var: &self.running_var,
            momentum: self.momentum,
        }
    }
}

pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// PyTorch's default initialisation: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias.
    pub fn new(b: &mut ParamBuilder, name: &str, c_in: usize, c_out: usize) -> Result<Self> {
        let bound = 1.0 / (c_in as f64).sqrt();
        let weight = b.uniform(
            format!("{name}.weight"),
            &[c_out, c_in],
            bound,
            ParamKind::Weight,
        )?;
        let bias = b.uniform(format!("{name}.bias"), &[c_out], bound, ParamKind::Bias)?;
        Ok(Linear { weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)?)
    }
}

/// Conv, batch norm, optional ReLU.
pub struct ConvBn {
    pub conv: Conv2d,
    pub bn: BatchNorm2d,
}

impl ConvBn {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        b: &mut ParamBuilder,
        conv_name: &str,
        bn_name: &str,
        shape: (usize, usize, usize),
        stride: usize,
        padding: usize,
        zero_init: bool,
    ) -> Result<Self> {
        Ok(ConvBn {
            conv: Conv2d::new(b, conv_name, shape, stride, padding, false)?,
            bn: BatchNorm2d::new(b, bn_name, shape.1, zero_init)?,
        })
    }

    /// Conv, batch norm, and a ReLU when `relu`.
    pub fn forward(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        let (y, stats) = self.conv_with_stats(x, train)?;
        match stats {
            Some(stats) => self.bn.forward_given(&y, relu, stats),
            None => self.bn.forward_act(&y, train, relu),
        }
    }

    /// `conv(relu(prev(z)))` for the batch norm `prev` of the layer before, and in training on
    /// CPU the batch statistics of the output. With the batch statistics of `z` given (training
    /// on CPU), `prev` runs inside the convolution and its output is never written
    /// (`ops::bn_relu_conv2d`); otherwise it is applied first.
    pub(crate) fn conv_after(
        &self,
        prev: &BatchNorm2d,
        z: &Tensor,
        train: bool,
        z_stats: Option<ops::Saved>,
    ) -> Result<(Tensor, Option<ops::Saved>)> {
        match z_stats {
            Some(st) if train && self.conv.bias.is_none() => {
                let (y, stats) = ops::bn_relu_conv2d(
                    z,
                    &prev.weight,
                    &prev.bias,
                    prev.stats(),
                    prev.eps,
                    st,
                    &self.conv.weight,
                    self.conv.params,
                )?;
                Ok((y, Some(stats)))
            }
            st => {
                let h = prev.forward_with(z, train, true, st)?;
                self.conv_with_stats(&h, train)
            }
        }
    }

    /// The convolution, and in training on CPU the batch statistics of its output, computed
    /// while each image is in cache (the batch norm then makes one pass over the activations
    /// instead of three).
    pub(crate) fn conv_with_stats(
        &self,
        x: &Tensor,
        train: bool,
    ) -> Result<(Tensor, Option<ops::Saved>)> {
        let cpu = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
        if train && cpu && self.conv.bias.is_none() {
            let (y, stats) = ops::conv2d_with_batch_stats(x, &self.conv.weight, self.conv.params)?;
            return Ok((y, Some(stats)));
        }
        Ok((self.conv.forward(x)?, None))
    }
}
