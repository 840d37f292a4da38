//! Residual networks. `resnet_cifar`: the CIFAR layout of He et al. (3x3 stem, three stages of
//! 16w/32w/64w channels, depth 6n+2). `resnet`: the ImageNet layout of torchvision (7x7 stride-2
//! stem, 3x3 stride-2 max pool, four stages, basic or bottleneck blocks), with torchvision's
//! parameter names so that the weights load elsewhere.

use super::layers::{ConvBn, Linear};
use crate::error::{Error, Result};
use crate::model::ModelConfig;
use crate::model::{Model, ParamBuilder, ParamStore};
use crate::plugin::{BindContext, TimeParams};
use candle_core::Tensor;
use recipe_kernels as ops;
use serde::{Deserialize, Serialize};

/// A basic (two 3x3 convs) or bottleneck (1x1, 3x3, 1x1) residual block.
struct Block {
    convs: Vec<ConvBn>,
    downsample: Option<ConvBn>,
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
        let cb = |b: &mut ParamBuilder, i: usize, shape, stride, pad, zero| {
            ConvBn::new(
                b,
                &format!("{name}.conv{i}"),
                &format!("{name}.bn{i}"),
                shape,
                stride,
                pad,
                zero,
            )
        };
        let (convs, c_out) = if bottleneck {
            let c_out = planes * 4;
            (
                vec![
                    cb(b, 1, (c_in, planes, 1), 1, 0, false)?,
                    cb(b, 2, (planes, planes, 3), stride, 1, false)?,
                    cb(b, 3, (planes, c_out, 1), 1, 0, zero_init)?,
                ],
                c_out,
            )
        } else {
            (
                vec![
                    cb(b, 1, (c_in, planes, 3), stride, 1, false)?,
                    cb(b, 2, (planes, planes, 3), 1, 1, zero_init)?,
                ],
                planes,
            )
        };
        let downsample = if stride != 1 || c_in != c_out {
            Some(ConvBn::new(
                b,
                &format!("{name}.downsample.0"),
                &format!("{name}.downsample.1"),
                (c_in, c_out, 1),
                stride,
                0,
                false,
            )?)
        } else {
            None
        };
        Ok((Block { convs, downsample }, c_out))
    }

    /// `relu(branch(x) + shortcut(x))`. In training on CPU each batch norm + ReLU inside the
    /// branch runs inside the convolution after it (`ConvBn::conv_after`), and the last batch
    /// norm, the add and the ReLU run as one op.
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let shortcut = match &self.downsample {
            Some(d) => d.forward(x, train, false)?,
            None => x.clone(),
        };
        let Some((first, rest)) = self.convs.split_first() else {
            return Ok(ops::add_relu(x, &shortcut)?);
        };
        let (mut z, mut stats) = first.conv_with_stats(x, train)?;
        let mut bn = &first.bn;
        for c in rest {
            (z, stats) = c.conv_after(bn, &z, train, stats)?;
            bn = &c.bn;
        }
        bn.forward_add_relu(&z, &shortcut, train, stats)
    }
}

/// Stem, stages of blocks, global average pool, linear head.
struct ResNet {
    stem: ConvBn,
    stem_pool: bool,
    blocks: Vec<Block>,
    fc: Linear,
    params: ParamStore,
}

impl Model for ResNet {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = self.stem.forward(x, train, true)?;
        if self.stem_pool {
            h = ops::max_pool2d(&h, 3, 2, 1)?;
        }
        for b in &self.blocks {
            h = b.forward(&h, train)?;
        }
        self.fc.forward(&ops::global_avg_pool(&h)?)
    }
    fn params(&self) -> &ParamStore {
        &self.params
    }
}

#[allow(clippy::too_many_arguments)]
fn build_stages(
    b: &mut ParamBuilder,
    mut c_in: usize,
    planes: &[usize],
    depths: &[usize],
    first_stride: usize,
    bottleneck: bool,
    zero_init: bool,
) -> Result<(Vec<Block>, usize)> {
    let mut blocks = Vec::new();
    for (s, (&p, &d)) in planes.iter().zip(depths).enumerate() {
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
            blocks.push(blk);
            c_in = c_out;
        }
    }
    Ok((blocks, c_in))
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
        let stem = ConvBn::new(
            &mut b,
            "conv1",
            "bn1",
            (ctx.input_shape[0], w16, 3),
            1,
            1,
            false,
        )?;
        let (blocks, c) = build_stages(
            &mut b,
            w16,
            &[w16, w32, w64],
            &[n, n, n],
            1,
            false,
            self.zero_init_residual,
        )?;
        let fc = Linear::new(&mut b, "fc", c, ctx.num_classes)?;
        Ok(Box::new(ResNet {
            stem,
            stem_pool: false,
            blocks,
            fc,
            params: b.finish(),
        }))
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

struct SmallResNet {
    stem: ConvBn,
    blocks: [Block; 2],
    fc: Linear,
    params: ParamStore,
}

impl Model for SmallResNet {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.stem.forward(x, train, true)?;
        let h = self.blocks[0].forward(&h, train)?;
        let h = ops::max_pool2d(&h, 2, 2, 0)?;
        let h = self.blocks[1].forward(&h, train)?;
        self.fc.forward(&ops::global_avg_pool(&h)?)
    }
    fn params(&self) -> &ParamStore {
        &self.params
    }
}

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
        let stem = ConvBn::new(
            &mut b,
            "conv1",
            "bn1",
            (ctx.input_shape[0], c, 3),
            1,
            1,
            false,
        )?;
        let (b0, _) = Block::new(&mut b, "layer1.0", c, c, 1, false, false)?;
        let (b1, _) = Block::new(&mut b, "layer2.0", c, c, 1, false, false)?;
        let fc = Linear::new(&mut b, "fc", c, ctx.num_classes)?;
        Ok(Box::new(SmallResNet {
            stem,
            blocks: [b0, b1],
            fc,
            params: b.finish(),
        }))
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
        let stem = ConvBn::new(
            &mut b,
            "conv1",
            "bn1",
            (ctx.input_shape[0], 64, 7),
            2,
            3,
            false,
        )?;
        let (blocks, c) = build_stages(
            &mut b,
            64,
            &[64, 128, 256, 512],
            &depths,
            1,
            bottleneck,
            self.zero_init_residual,
        )?;
        let fc = Linear::new(&mut b, "fc", c, ctx.num_classes)?;
        Ok(Box::new(ResNet {
            stem,
            stem_pool: true,
            blocks,
            fc,
            params: b.finish(),
        }))
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
