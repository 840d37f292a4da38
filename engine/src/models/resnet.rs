//! Residual networks. `resnet_cifar`: the CIFAR layout of He et al. (3x3 stem, three stages of
//! 16w/32w/64w channels, depth 6n+2). `resnet`: the ImageNet layout of torchvision (7x7 stride-2
//! stem, 3x3 stride-2 max pool, four stages, basic or bottleneck blocks), with torchvision's
//! parameter names so that the weights load elsewhere.

use super::layers::{conv_bn, conv_bn_sequential, BatchNorm2d, Chain, Conv2d, Linear, MaxPool2d};
use crate::error::{Error, Result};
use crate::model::ModelConfig;
use crate::model::{downcast, Module, Network, Sequential};
use crate::model::{Model, ParamBuilder};
use crate::plugin::{BindContext, TimeParams};
use candle_core::Tensor;
use recipe_kernels as ops;
use serde::{Deserialize, Serialize};

/// How a residual block's branch joins its shortcut (stochastic depth changes it).
pub enum Branch<'a> {
    /// `relu(branch(x) + shortcut(x))`.
    Full,
    /// The branch scaled by a number (evaluation under stochastic depth: its keep probability).
    Scaled(f64),
    /// The branch times a per-sample mask of shape [N, 1, 1, 1].
    Masked(&'a Tensor),
    /// The branch dropped: `relu(shortcut(x))`.
    Dropped,
}

/// A basic (two 3x3 convs) or bottleneck (1x1, 3x3, 1x1) residual block, torchvision's
/// `BasicBlock` and `Bottleneck` (v1.5: the stride on the 3x3 conv), with its children named as
/// there (`conv1`, `bn1`, ..., `downsample.0`, `downsample.1`).
pub struct Block {
    convs: Vec<Box<dyn Module>>,
    bns: Vec<Box<dyn Module>>,
    downsample: Option<Box<dyn Module>>,
    bottleneck: bool,
}

impl Block {
    fn new(
        b: &mut ParamBuilder,
        name: &str,
        c_in: usize,
        planes: usize,
        stride: usize,
        bottleneck: bool,
        zero_init: bool,
    ) -> Result<(Self, usize)> {
        let (shapes, c_out): (Vec<_>, usize) = if bottleneck {
            let c_out = planes * 4;
            (
                vec![
                    ((c_in, planes, 1), 1, 0),
                    ((planes, planes, 3), stride, 1),
                    ((planes, c_out, 1), 1, 0),
                ],
                c_out,
            )
        } else {
            (
                vec![((c_in, planes, 3), stride, 1), ((planes, planes, 3), 1, 1)],
                planes,
            )
        };
        let mut convs: Vec<Box<dyn Module>> = Vec::new();
        let mut bns: Vec<Box<dyn Module>> = Vec::new();
        let last = shapes.len() - 1;
        for (i, (shape, stride, pad)) in shapes.into_iter().enumerate() {
            let conv = Conv2d::new(
                b,
                &format!("{name}.conv{}", i + 1),
                shape,
                stride,
                pad,
                false,
            )?;
            let bn = BatchNorm2d::new(
                b,
                &format!("{name}.bn{}", i + 1),
                shape.1,
                zero_init && i == last,
            )?;
            convs.push(Box::new(conv));
            bns.push(Box::new(bn));
        }
        let downsample: Option<Box<dyn Module>> = if stride != 1 || c_in != c_out {
            Some(Box::new(conv_bn_sequential(
                b,
                &format!("{name}.downsample"),
                (c_in, c_out, 1),
                stride,
            )?))
        } else {
            None
        };
        Ok((
            Block {
                convs,
                bns,
                downsample,
                bottleneck,
            },
            c_out,
        ))
    }

    fn shortcut(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let Some(d) = &self.downsample else {
            return Ok(x.clone());
        };
        if let Some(s) = downcast::<Sequential>(d.as_ref()) {
            if let [conv, bn] = s.layers.as_slice() {
                return conv_bn(conv.as_ref(), bn.as_ref(), x, train, false);
            }
        }
        d.forward(x, train)
    }

    /// The block with its branch joined as `branch` says. With the plain layers, in training on
    /// CPU each batch norm + ReLU inside the branch runs inside the convolution after it, and the
    /// last batch norm, the add and the ReLU run as one op.
    pub fn forward_branch(&self, x: &Tensor, train: bool, branch: Branch) -> Result<Tensor> {
        let shortcut = self.shortcut(x, train)?;
        let scaled = |y: Tensor| Ok(ops::add_relu(&y, &shortcut)?);
        match branch {
            Branch::Dropped if self.downsample.is_some() => Ok(shortcut.relu()?),
            Branch::Dropped => Ok(shortcut),
            Branch::Full => self.chain(x, train)?.finish_add_relu(&shortcut, train),
            Branch::Scaled(s) => scaled((self.chain(x, train)?.finish(train)? * s)?),
            Branch::Masked(m) => scaled(self.chain(x, train)?.finish(train)?.broadcast_mul(m)?),
        }
    }

    /// The residual branch's conv + batch norm pairs, up to its last batch norm.
    fn chain(&self, x: &Tensor, train: bool) -> Result<Chain<'_>> {
        let mut chain = Chain::start(x);
        for (conv, bn) in self.convs.iter().zip(&self.bns) {
            chain.push(conv.as_ref(), bn.as_ref(), train)?;
        }
        Ok(chain)
    }
}

impl Module for Block {
    fn kind(&self) -> &'static str {
        if self.bottleneck {
            "Bottleneck"
        } else {
            "BasicBlock"
        }
    }
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_branch(x, train, Branch::Full)
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        let mut v: Vec<(String, &dyn Module)> = Vec::new();
        for (i, (c, b)) in self.convs.iter().zip(&self.bns).enumerate() {
            v.push((format!("conv{}", i + 1), c.as_ref()));
            v.push((format!("bn{}", i + 1), b.as_ref()));
        }
        if let Some(d) = &self.downsample {
            v.push(("downsample".into(), d.as_ref()));
        }
        v
    }
    fn children_mut(&mut self) -> Vec<(String, &mut Box<dyn Module>)> {
        let mut v: Vec<(String, &mut Box<dyn Module>)> = Vec::new();
        for (i, (c, b)) in self.convs.iter_mut().zip(self.bns.iter_mut()).enumerate() {
            v.push((format!("conv{}", i + 1), c));
            v.push((format!("bn{}", i + 1), b));
        }
        if let Some(d) = &mut self.downsample {
            v.push(("downsample".into(), d));
        }
        v
    }
}

/// Stem (conv, batch norm, ReLU, optional max pool), stages of blocks (`layer1`, ...), global
/// average pool, linear head (`fc`): torchvision's `ResNet`. With `pool_after_first`, the max
/// pool sits between the first two stages instead (the benchmark's small ResNet).
struct ResNet {
    conv1: Box<dyn Module>,
    bn1: Box<dyn Module>,
    maxpool: Option<Box<dyn Module>>,
    pool_after_first: bool,
    stages: Vec<Box<dyn Module>>,
    fc: Box<dyn Module>,
}

impl Module for ResNet {
    fn kind(&self) -> &'static str {
        "ResNet"
    }
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = conv_bn(self.conv1.as_ref(), self.bn1.as_ref(), x, train, true)?;
        if let (Some(p), false) = (&self.maxpool, self.pool_after_first) {
            h = p.forward(&h, train)?;
        }
        for (i, s) in self.stages.iter().enumerate() {
            h = s.forward(&h, train)?;
            if let (Some(p), true, 0) = (&self.maxpool, self.pool_after_first, i) {
                h = p.forward(&h, train)?;
            }
        }
        self.fc.forward(&ops::global_avg_pool(&h)?, train)
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        let mut v: Vec<(String, &dyn Module)> = vec![
            ("conv1".into(), self.conv1.as_ref()),
            ("bn1".into(), self.bn1.as_ref()),
        ];
        if let Some(p) = &self.maxpool {
            v.push(("maxpool".into(), p.as_ref()));
        }
        for (i, s) in self.stages.iter().enumerate() {
            v.push((format!("layer{}", i + 1), s.as_ref()));
        }
        v.push(("fc".into(), self.fc.as_ref()));
        v
    }
    fn children_mut(&mut self) -> Vec<(String, &mut Box<dyn Module>)> {
        let mut v: Vec<(String, &mut Box<dyn Module>)> = vec![
            ("conv1".into(), &mut self.conv1),
            ("bn1".into(), &mut self.bn1),
        ];
        if let Some(p) = &mut self.maxpool {
            v.push(("maxpool".into(), p));
        }
        for (i, s) in self.stages.iter_mut().enumerate() {
            v.push((format!("layer{}", i + 1), s));
        }
        v.push(("fc".into(), &mut self.fc));
        v
    }
}

/// The stem's conv and batch norm.
fn stem(
    b: &mut ParamBuilder,
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
) -> Result<(Box<dyn Module>, Box<dyn Module>)> {
    Ok((
        Box::new(Conv2d::new(
            b,
            "conv1",
            (c_in, c_out, k),
            stride,
            k / 2,
            false,
        )?),
        Box::new(BatchNorm2d::new(b, "bn1", c_out, false)?),
    ))
}

/// Stages of blocks, named `layer1`, `layer2`, ...
#[allow(clippy::too_many_arguments)]
fn build_stages(
    b: &mut ParamBuilder,
    mut c_in: usize,
    planes: &[usize],
    depths: &[usize],
    first_stride: usize,
    bottleneck: bool,
    zero_init: bool,
) -> Result<(Vec<Box<dyn Module>>, usize)> {
    let mut stages: Vec<Box<dyn Module>> = Vec::new();
    for (s, (&p, &d)) in planes.iter().zip(depths).enumerate() {
        let mut blocks: Vec<Box<dyn Module>> = Vec::new();
        for i in 0..d {
            let stride = if i == 0 && s > 0 {
                2
            } else if i == 0 {
                first_stride
            } else {
                1
            };
            let (blk, c_out) = Block::new(
                b,
                &format!("layer{}.{i}", s + 1),
                c_in,
                p,
                stride,
                bottleneck,
                zero_init,
            )?;
            blocks.push(Box::new(blk));
            c_in = c_out;
        }
        stages.push(Box::new(Sequential { layers: blocks }));
    }
    Ok((stages, c_in))
}

// ---------------------------------------------------------------------------------------------

/// CIFAR-style ResNet (He et al. 2016, section 4.2): depth 6n+2, stages of 16w, 32w, 64w channels
/// (rounded; `width: 0.5` gives 8/16/32, a small model for budget sweeps on 2 cores).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResNetCifarConfig {
    /// 6n+2: 20, 32, 44, 56, 110, ...
    #[serde(default = "default_depth")]
    pub depth: usize,
    /// Width multiplier on the 16/32/64 channels.
    #[serde(default = "one")]
    pub width: f64,
    /// Start the last batch norm of each residual branch at zero.
    #[serde(default)]
    pub zero_init_residual: bool,
}

fn default_depth() -> usize {
    20
}
fn one() -> f64 {
    1.0
}

impl TimeParams for ResNetCifarConfig {}

impl ModelConfig for ResNetCifarConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Model>> {
        if self.depth < 8 || !(self.depth - 2).is_multiple_of(6) {
            return Err(Error::recipe_hint(
                "model.depth",
                format!("depth {} is not of the form 6n+2", self.depth),
                "use 8, 14, 20, 32, 44, 56 or 110",
            ));
        }
        let c = |base: f64| (base * self.width).round() as usize;
        if !self.width.is_finite() || c(16.0) == 0 || c(64.0) > 1 << 16 {
            return Err(Error::recipe(
                "model.width",
                format!(
                    "width {} gives {} channels in the first stage; give a multiplier of 1/16 or more",
                    self.width,
                    c(16.0)
                ),
            ));
        }
        let n = (self.depth - 2) / 6;
        let (w16, w32, w64) = (c(16.0), c(32.0), c(64.0));
        let mut b = ParamBuilder::new(ctx.seed, &ctx.device);
        let (conv1, bn1) = stem(&mut b, ctx.input_shape[0], w16, 3, 1)?;
        let (stages, c) = build_stages(
            &mut b,
            w16,
            &[w16, w32, w64],
            &[n, n, n],
            1,
            false,
            self.zero_init_residual,
        )?;
        let fc = Linear::new(&mut b, "fc", c, ctx.num_classes)?;
        let root = ResNet {
            conv1,
            bn1,
            maxpool: None,
            pool_after_first: false,
            stages,
            fc: Box::new(fc),
        };
        Ok(Box::new(Network::new(Box::new(root), true)?))
    }
}

crate::register_model!(
    ResNetCifarConfig,
    "resnet_cifar",
    "CIFAR-style ResNet: 3x3 stem, 3 stages (16w/32w/64w), depth 6n+2, basic blocks.",
    "depth: 20\nwidth: 1.0\nzero_init_residual: false"
);

/// The small residual network of the CPU-throughput benchmark: a 3x3 stem to `channels`, a basic
/// block at full resolution, a 2x2 max pool, a basic block at half resolution, global average
/// pool, linear head (`benches/reference/throughput.py` has the same model in PyTorch).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmallResNetConfig {
    #[serde(default = "default_small_channels")]
    pub channels: usize,
}

fn default_small_channels() -> usize {
    32
}

impl TimeParams for SmallResNetConfig {}

impl ModelConfig for SmallResNetConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Model>> {
        let c = self.channels;
        if c == 0 || c > 1 << 14 {
            return Err(Error::recipe(
                "model.channels",
                format!("{c} channels; give between 1 and 16384"),
            ));
        }
        let mut b = ParamBuilder::new(ctx.seed, &ctx.device);
        let (conv1, bn1) = stem(&mut b, ctx.input_shape[0], c, 3, 1)?;
        let (b0, _) = Block::new(&mut b, "layer1.0", c, c, 1, false, false)?;
        let (b1, _) = Block::new(&mut b, "layer2.0", c, c, 1, false, false)?;
        let fc = Linear::new(&mut b, "fc", c, ctx.num_classes)?;
        let stage = |blk: Block| -> Box<dyn Module> {
            Box::new(Sequential {
                layers: vec![Box::new(blk)],
            })
        };
        let root = ResNet {
            conv1,
            bn1,
            maxpool: Some(Box::new(MaxPool2d {
                kernel_size: 2,
                stride: 2,
                padding: 0,
            })),
            pool_after_first: true,
            stages: vec![stage(b0), stage(b1)],
            fc: Box::new(fc),
        };
        Ok(Box::new(Network::new(Box::new(root), true)?))
    }
}

crate::register_model!(
    SmallResNetConfig,
    "small_resnet",
    "Two basic residual blocks around a 2x2 max pool (the CPU-throughput benchmark's model).",
    "channels: 32"
);

/// ResNet-18/34/50 in the ImageNet layout of torchvision (v1.5: stride on the 3x3 conv).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResNetConfig {
    /// 18, 34 or 50.
    pub depth: usize,
    #[serde(default)]
    pub zero_init_residual: bool,
}

impl TimeParams for ResNetConfig {}

impl ModelConfig for ResNetConfig {
    fn build(&self, ctx: &BindContext) -> Result<Box<dyn Model>> {
        let (depths, bottleneck) = match self.depth {
            18 => ([2, 2, 2, 2], false),
            34 => ([3, 4, 6, 3], false),
            50 => ([3, 4, 6, 3], true),
            d => {
                return Err(Error::recipe_hint(
                    "model.depth",
                    format!("no ImageNet ResNet of depth {d}"),
                    "use 18, 34 or 50 (or `resnet_cifar` for the 6n+2 family)",
                ))
            }
        };
        let mut b = ParamBuilder::new(ctx.seed, &ctx.device);
        let (conv1, bn1) = stem(&mut b, ctx.input_shape[0], 64, 7, 2)?;
        let (stages, c) = build_stages(
            &mut b,
            64,
            &[64, 128, 256, 512],
            &depths,
            1,
            bottleneck,
            self.zero_init_residual,
        )?;
        let fc = Linear::new(&mut b, "fc", c, ctx.num_classes)?;
        let root = ResNet {
            conv1,
            bn1,
            maxpool: Some(Box::new(MaxPool2d {
                kernel_size: 3,
                stride: 2,
                padding: 1,
            })),
            pool_after_first: false,
            stages,
            fc: Box::new(fc),
        };
        Ok(Box::new(Network::new(Box::new(root), true)?))
    }
}

crate::register_model!(
    ResNetConfig,
    "resnet",
    "ResNet-18/34/50, ImageNet layout (7x7/2 stem, 3x3/2 max pool), torchvision parameter names.",
    "depth: 50\nzero_init_residual: false"
);

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn ctx(shape: [usize; 3]) -> BindContext {
        BindContext::standalone(&Device::Cpu, shape, 10, 1)
    }

    #[test]
    fn resnets_have_torchvision_parameter_counts_and_names() {
        // torchvision: resnet18 11,689,512 and resnet50 25,557,032 parameters with 1000 classes.
        let mut c = ctx([3, 32, 32]);
        c.num_classes = 1000;
        let m18 = ResNetConfig {
            depth: 18,
            zero_init_residual: false,
        }
        .build(&c)
        .unwrap();
        assert_eq!(m18.params().num_trainable(), 11_689_512);
        let m50 = ResNetConfig {
            depth: 50,
            zero_init_residual: false,
        }
        .build(&c)
        .unwrap();
        assert_eq!(m50.params().num_trainable(), 25_557_032);
        let names: Vec<_> = m50.params().iter().map(|p| p.name.clone()).collect();
        for n in [
            "conv1.weight",
            "bn1.running_var",
            "layer1.0.downsample.0.weight",
            "layer4.2.bn3.bias",
            "fc.weight",
        ] {
            assert!(names.iter().any(|x| x == n), "{n}");
        }
        // ResNet-20 for CIFAR: 0.27M parameters (He et al., table 6), with projection shortcuts.
        let r20 = ResNetCifarConfig {
            depth: 20,
            width: 1.0,
            zero_init_residual: false,
        }
        .build(&ctx([3, 32, 32]))
        .unwrap();
        let n = r20.params().num_trainable();
        assert!((270_000..280_000).contains(&n), "{n}");
    }

    #[test]
    fn resnet50_forward_gives_logits_for_small_input() {
        let m = ResNetConfig {
            depth: 18,
            zero_init_residual: true,
        }
        .build(&ctx([3, 64, 64]))
        .unwrap();
        let x = Tensor::zeros((2, 3, 64, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(m.forward(&x, true).unwrap().dims(), &[2, 10]);
    }
}
