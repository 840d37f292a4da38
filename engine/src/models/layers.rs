//! Layers with named parameters (convolution, batch norm, linear, max pool, ReLU) as modules, and
//! the fused CPU paths that apply while a convolution and the batch norm after it are still these
//! plain layers (`conv_bn`, `Chain`).

use crate::error::Result;
use crate::model::{downcast, Module, Sequential};
use crate::model::{Param, ParamBuilder, ParamKind};
use candle_core::{DType, Tensor};
use recipe_kernels::{self as ops, BatchNormStats, Conv2dParams};

pub struct Conv2d {
    weight: Param,
    bias: Option<Param>,
    c_in: usize,
    c_out: usize,
    k: usize,
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
            c_in,
            c_out,
            k,
            params: Conv2dParams::new(stride, padding),
        })
    }

    pub fn weight(&self) -> &Param {
        &self.weight
    }
    pub fn bias(&self) -> Option<&Param> {
        self.bias.as_ref()
    }
    pub fn in_channels(&self) -> usize {
        self.c_in
    }
    pub fn out_channels(&self) -> usize {
        self.c_out
    }
    pub fn kernel_size(&self) -> usize {
        self.k
    }
    pub fn conv_params(&self) -> Conv2dParams {
        self.params
    }

    /// Runs the products in bf16 with f32 sums (`precision: amp_bf16`) or in f32.
    pub fn set_bf16(&mut self, on: bool) {
        self.params = self.params.with_bf16(on);
    }

    /// This convolution with another kernel of the same shape (weight standardization) and the
    /// stride set to `stride` (blur pooling moves the stride into the blur).
    pub fn forward_with(&self, x: &Tensor, weight: &Tensor, stride: usize) -> Result<Tensor> {
        let p = Conv2dParams {
            stride,
            ..self.params
        };
        let bias = self.bias.as_ref().map(Param::tensor);
        Ok(ops::conv2d(x, weight, bias.as_ref(), p)?)
    }

    /// The convolution, and in training on CPU the batch statistics of its output, computed
    /// while each image is in cache (the batch norm then makes one pass over the activations
    /// instead of three).
    fn forward_stats(&self, x: &Tensor, train: bool) -> Result<(Tensor, Option<ops::Saved>)> {
        let cpu = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
        if train && cpu && self.bias.is_none() {
            let (y, stats) = ops::conv2d_with_batch_stats(x, &self.weight.tensor(), self.params)?;
            return Ok((y, Some(stats)));
        }
        Ok((self.forward(x, train)?, None))
    }

    /// `self(relu(prev(z)))` with the batch statistics of `z` given (training on CPU): `prev`
    /// runs inside the convolution and its output is never written (`ops::bn_relu_conv2d`).
    fn forward_after(
        &self,
        prev: &BatchNorm2d,
        z: &Tensor,
        z_stats: ops::Saved,
    ) -> Result<(Tensor, Option<ops::Saved>)> {
        let (y, stats) = ops::bn_relu_conv2d(
            z,
            &prev.weight.tensor(),
            &prev.bias.tensor(),
            prev.stats(),
            prev.eps,
            z_stats,
            &self.weight.tensor(),
            self.params,
        )?;
        Ok((y, Some(stats)))
    }
}

impl Module for Conv2d {
    fn kind(&self) -> &'static str {
        "Conv2d"
    }
    fn forward(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        self.forward_with(x, &self.weight.tensor(), self.params.stride)
    }
    fn describe(&self) -> String {
        format!(
            "Conv2d({}, {}, kernel_size={}, stride={}, padding={}, bias={}{})",
            self.c_in,
            self.c_out,
            self.k,
            self.params.stride,
            self.params.padding,
            self.bias.is_some(),
            if self.params.bf16 { ", bf16" } else { "" }
        )
    }
    fn own_params(&self) -> Vec<Param> {
        let mut v = vec![self.weight.clone()];
        v.extend(self.bias.clone());
        v
    }
}

pub struct BatchNorm2d {
    weight: Param,
    bias: Param,
    running_mean: Param,
    running_var: Param,
    c: usize,
    momentum: f64,
    eps: f64,
    /// Synchronised across data-parallel processes (`sync_batchnorm: true`).
    synced: bool,
    /// The sum across processes when synchronised in a job of several (on one process the
    /// global batch is this one's, and the plain kernels run bit for bit).
    sum: Option<ops::StatSum>,
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
        let running_mean =
            b.constant(format!("{name}.running_mean"), &[c], 0.0, ParamKind::Buffer)?;
        let running_var =
            b.constant(format!("{name}.running_var"), &[c], 1.0, ParamKind::Buffer)?;
        Ok(BatchNorm2d {
            weight,
            bias,
            running_mean,
            running_var,
            c,
            momentum: 0.1,
            eps: 1e-5,
            synced: false,
            sum: None,
        })
    }

    /// Normalises with the statistics of the global batch from now on, summed across
    /// processes by `sum` (`None` in a job of one).
    pub fn synchronise(&mut self, sum: Option<ops::StatSum>) {
        self.synced = true;
        self.sum = sum;
    }

    pub fn num_features(&self) -> usize {
        self.c
    }

    /// Training-mode batch norm with another momentum for the running statistics (ghost batch
    /// norm normalises sub-batches one after the other and divides the momentum among them).
    pub fn forward_momentum(&self, x: &Tensor, momentum: f64) -> Result<Tensor> {
        let stats = BatchNormStats {
            momentum,
            ..self.stats()
        };
        Ok(ops::batch_norm_given(
            x,
            &self.weight.tensor(),
            &self.bias.tensor(),
            stats,
            self.eps,
            true,
            false,
            None,
        )?)
    }

    pub fn momentum(&self) -> f64 {
        self.momentum
    }

    /// Batch norm followed by a ReLU when `relu` (fused on CPU).
    pub fn forward_act(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        self.forward_given(x, train, relu, None)
    }

    /// With the batch statistics of `x` given when already computed (training on CPU).
    fn forward_given(
        &self,
        x: &Tensor,
        train: bool,
        relu: bool,
        given: Option<ops::Saved>,
    ) -> Result<Tensor> {
        Ok(ops::batch_norm_given(
            x,
            &self.weight.tensor(),
            &self.bias.tensor(),
            self.stats(),
            self.eps,
            train,
            relu,
            given,
        )?)
    }

    /// `relu(batch_norm(x) + residual)`, the join of a residual block (one fused pass in training
    /// on CPU), with the batch statistics of `x` when already computed.
    fn forward_add_relu(
        &self,
        x: &Tensor,
        residual: &Tensor,
        train: bool,
        given: Option<ops::Saved>,
    ) -> Result<Tensor> {
        Ok(ops::batch_norm_add_relu(
            x,
            &self.weight.tensor(),
            &self.bias.tensor(),
            residual,
            self.stats(),
            self.eps,
            train,
            given,
        )?)
    }

    fn stats(&self) -> BatchNormStats<'_> {
        BatchNormStats {
            running_mean: &self.running_mean.var,
            running_var: &self.running_var.var,
            momentum: self.momentum,
            sync: self.sum.clone(),
        }
    }
}

impl Module for BatchNorm2d {
    fn kind(&self) -> &'static str {
        if self.synced {
            "SyncBatchNorm2d"
        } else {
            "BatchNorm2d"
        }
    }
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_act(x, train, false)
    }
    fn describe(&self) -> String {
        format!(
            "{}({}, eps={}, momentum={})",
            self.kind(),
            self.c,
            self.eps,
            self.momentum
        )
    }
    fn own_params(&self) -> Vec<Param> {
        vec![
            self.weight.clone(),
            self.bias.clone(),
            self.running_mean.clone(),
            self.running_var.clone(),
        ]
    }
}

pub struct Linear {
    weight: Param,
    bias: Option<Param>,
    c_in: usize,
    c_out: usize,
}

impl Linear {
    /// PyTorch's default initialisation: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias.
    pub fn new(b: &mut ParamBuilder, name: &str, c_in: usize, c_out: usize) -> Result<Self> {
        Self::with_bias(b, name, c_in, c_out, true)
    }

    /// With or without the bias.
    pub fn with_bias(
        b: &mut ParamBuilder,
        name: &str,
        c_in: usize,
        c_out: usize,
        bias: bool,
    ) -> Result<Self> {
        let bound = 1.0 / (c_in as f64).sqrt();
        let weight = b.uniform(
            format!("{name}.weight"),
            &[c_out, c_in],
            bound,
            ParamKind::Weight,
        )?;
        let bias = if bias {
            Some(b.uniform(format!("{name}.bias"), &[c_out], bound, ParamKind::Bias)?)
        } else {
            None
        };
        Ok(Linear {
            weight,
            bias,
            c_in,
            c_out,
        })
    }
}

impl Module for Linear {
    fn kind(&self) -> &'static str {
        "Linear"
    }
    fn forward(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        let y = x.matmul(&self.weight.tensor().t()?)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.tensor())?,
            None => y,
        })
    }
    fn describe(&self) -> String {
        format!(
            "Linear(in_features={}, out_features={}, bias={})",
            self.c_in,
            self.c_out,
            self.bias.is_some()
        )
    }
    fn own_params(&self) -> Vec<Param> {
        let mut v = vec![self.weight.clone()];
        v.extend(self.bias.clone());
        v
    }
}

pub struct MaxPool2d {
    pub kernel_size: usize,
    pub stride: usize,
    pub padding: usize,
}

impl Module for MaxPool2d {
    fn kind(&self) -> &'static str {
        "MaxPool2d"
    }
    fn forward(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        Ok(ops::max_pool2d(
            x,
            self.kernel_size,
            self.stride,
            self.padding,
        )?)
    }
    fn describe(&self) -> String {
        format!(
            "MaxPool2d(kernel_size={}, stride={}, padding={})",
            self.kernel_size, self.stride, self.padding
        )
    }
}

/// `relu(bn(conv(x)))`, or without the ReLU: fused (statistics computed by the convolution, one
/// pass for the norm) while both are the plain layers, through the modules' own forward passes
/// otherwise.
pub fn conv_bn(
    conv: &dyn Module,
    bn: &dyn Module,
    x: &Tensor,
    train: bool,
    relu: bool,
) -> Result<Tensor> {
    let mut chain = Chain::start(x);
    chain.push(conv, bn, train)?;
    if relu {
        chain.activated(train)
    } else {
        chain.finish(train)
    }
}

/// A convolution + batch norm pair in a named module (`features.0.conv`, `features.0.bn`),
/// followed by a ReLU.
pub struct ConvBnReLU {
    pub conv: Box<dyn Module>,
    pub bn: Box<dyn Module>,
}

impl ConvBnReLU {
    pub fn new(b: &mut ParamBuilder, name: &str, shape: (usize, usize, usize)) -> Result<Self> {
        Ok(ConvBnReLU {
            conv: Box::new(Conv2d::new(b, &format!("{name}.conv"), shape, 1, 1, false)?),
            bn: Box::new(BatchNorm2d::new(b, &format!("{name}.bn"), shape.1, false)?),
        })
    }
}

impl Module for ConvBnReLU {
    fn kind(&self) -> &'static str {
        "ConvBnReLU"
    }
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        conv_bn(self.conv.as_ref(), self.bn.as_ref(), x, train, true)
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        vec![
            ("conv".into(), self.conv.as_ref()),
            ("bn".into(), self.bn.as_ref()),
        ]
    }
    fn children_mut(&mut self) -> Vec<(String, &mut Box<dyn Module>)> {
        vec![("conv".into(), &mut self.conv), ("bn".into(), &mut self.bn)]
    }
}

/// A conv + batch norm pair as PyTorch's `Sequential(conv, bn)` (torchvision's downsample).
pub fn conv_bn_sequential(
    b: &mut ParamBuilder,
    name: &str,
    shape: (usize, usize, usize),
    stride: usize,
) -> Result<Sequential> {
    Ok(Sequential {
        layers: vec![
            Box::new(Conv2d::new(
                b,
                &format!("{name}.0"),
                shape,
                stride,
                0,
                false,
            )?),
            Box::new(BatchNorm2d::new(b, &format!("{name}.1"), shape.1, false)?),
        ],
    })
}

/// What a chain of conv + batch norm pairs holds between pairs.
enum Between<'a> {
    /// An activation, ready for the next convolution.
    Act(Tensor),
    /// The output of a convolution whose plain batch norm (with the statistics the convolution
    /// computed, on CPU) has not run yet: the next plain convolution runs it inside itself.
    PreNorm {
        z: Tensor,
        bn: &'a BatchNorm2d,
        stats: Option<ops::Saved>,
    },
    /// A rewritten batch norm's output, before the ReLU.
    Normed(Tensor),
}

/// Conv + batch norm pairs with a ReLU between them (a residual branch, a stem), fusing each
/// step whose layers are still the plain ones: a convolution computes its output's statistics,
/// a batch norm + ReLU runs inside the convolution after it, and the last batch norm joins the
/// residual in one pass (`finish_add_relu`).
fn used_after_failure() -> crate::error::Error {
    crate::error::Error::msg("a layer chain was used after it failed")
}

/// What a chain holds, with a ReLU applied.
fn activate(at: Between, train: bool) -> Result<Tensor> {
    match at {
        Between::Act(h) => Ok(h),
        Between::PreNorm { z, bn, stats } => bn.forward_given(&z, train, true, stats),
        Between::Normed(y) => Ok(y.relu()?),
    }
}

pub struct Chain<'a> {
    at: Option<Between<'a>>,
}

impl<'a> Chain<'a> {
    pub fn start(x: &Tensor) -> Chain<'a> {
        Chain {
            at: Some(Between::Act(x.clone())),
        }
    }

    /// What the chain holds, with a ReLU applied.
    fn take_activated(&mut self, train: bool) -> Result<Tensor> {
        let at = self.at.take().ok_or_else(used_after_failure)?;
        activate(at, train)
    }

    /// Adds `relu(.)` of the chain so far (nothing at the start), then `conv` and `bn`.
    pub fn push(&mut self, conv: &'a dyn Module, bn: &'a dyn Module, train: bool) -> Result<()> {
        let plain_conv = downcast::<Conv2d>(conv).filter(|c| c.bias.is_none());
        let at = self.at.take().ok_or_else(used_after_failure)?;
        let (z, stats) = match (at, plain_conv) {
            (
                Between::PreNorm {
                    z,
                    bn: prev,
                    stats: Some(st),
                },
                Some(c),
            ) if train => c.forward_after(prev, &z, st)?,
            (at, Some(c)) => c.forward_stats(&activate(at, train)?, train)?,
            (at, None) => (conv.forward(&activate(at, train)?, train)?, None),
        };
        self.at = Some(match downcast::<BatchNorm2d>(bn) {
            Some(b) => Between::PreNorm { z, bn: b, stats },
            None => Between::Normed(bn.forward(&z, train)?),
        });
        Ok(())
    }

    /// The chain's output with a final ReLU.
    pub fn activated(mut self, train: bool) -> Result<Tensor> {
        self.take_activated(train)
    }

    /// The chain's output without the final ReLU.
    pub fn finish(self, train: bool) -> Result<Tensor> {
        match self.at {
            Some(Between::Act(h)) | Some(Between::Normed(h)) => Ok(h),
            Some(Between::PreNorm { z, bn, stats }) => bn.forward_given(&z, train, false, stats),
            None => Err(crate::error::Error::msg(
                "a layer chain was used after it failed",
            )),
        }
    }

    /// `relu(output + residual)`: one fused pass with a plain last batch norm.
    pub fn finish_add_relu(self, residual: &Tensor, train: bool) -> Result<Tensor> {
        match self.at {
            Some(Between::PreNorm { z, bn, stats }) => {
                bn.forward_add_relu(&z, residual, train, stats)
            }
            Some(Between::Act(h)) | Some(Between::Normed(h)) => Ok(ops::add_relu(&h, residual)?),
            None => Err(crate::error::Error::msg(
                "a layer chain was used after it failed",
            )),
        }
    }
}
