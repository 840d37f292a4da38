//! The recipe's `precision` (Composer's names): `fp32` (the default), `amp_bf16`, `amp_fp16`.
//!
//! `amp_bf16` runs every convolution's products in bf16 with f32 sums on CPUs with AVX512-BF16
//! (`recipe_kernels::bf16`): the input and the kernel are rounded to bf16 as they are packed,
//! while the master weights, the activations between layers, batch norm and its statistics, the
//! classifier's linear layer and the loss stay f32, as under PyTorch's CPU autocast. It is a
//! conversion of the module tree at bind time (every plain `Conv2d`, recorded with the
//! rewrites, so a checkpoint remembers the precision it was trained in). Results stay bitwise
//! deterministic for a given machine and precision. `amp_fp16` is a GPU precision and CUDA
//! training in reduced precision is not built yet: both are refused there with what to use.

use crate::error::{Error, Result};
use crate::model::{downcast, downcast_box, Network};
use crate::models::layers::Conv2d;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    Fp32,
    AmpBf16,
    AmpFp16,
}

const NAMES: &str = "fp32, amp_bf16 or amp_fp16";

impl Precision {
    pub fn parse(s: &str) -> Result<Precision> {
        match s {
            "fp32" => Ok(Precision::Fp32),
            "amp_bf16" => Ok(Precision::AmpBf16),
            "amp_fp16" => Ok(Precision::AmpFp16),
            _ => Err(Error::recipe_hint(
                "precision",
                format!("unknown precision `{s}`"),
                format!("one of {NAMES} (Composer's names); fp32 is the default"),
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::AmpBf16 => "amp_bf16",
            Precision::AmpFp16 => "amp_fp16",
        }
    }

    /// An error unless this precision can train on this machine's CPU (`cuda` false) or on a
    /// CUDA device.
    pub fn check(self, cuda: bool) -> Result<()> {
        match self {
            Precision::Fp32 => Ok(()),
            _ if cuda => Err(Error::recipe_hint(
                "precision",
                format!("{} is not built for CUDA yet", self.name()),
                "use precision: fp32 on the GPU for now",
            )),
            Precision::AmpFp16 => Err(Error::recipe_hint(
                "precision",
                "amp_fp16 is a GPU precision: CPUs here have no fp16 products",
                "use precision: amp_bf16 on a CPU with AVX512-BF16, or fp32",
            )),
            Precision::AmpBf16 if !recipe_kernels::bf16::available() => Err(Error::recipe_hint(
                "precision",
                "amp_bf16 needs a CPU with AVX512-BF16 (and AVX-512 F, BW, VL), which this one lacks",
                "use precision: fp32 here (Intel Cooper Lake or Sapphire Rapids and later, AMD Zen 4 and later have AVX512-BF16)",
            )),
            Precision::AmpBf16 => Ok(()),
        }
    }

    /// Sets every plain convolution of `net` to this precision's products; the paths converted.
    /// Nothing for fp32.
    pub fn convert(self, net: &mut Network) -> Result<Vec<String>> {
        if self != Precision::AmpBf16 {
            return Ok(Vec::new());
        }
        net.replace(
            "precision amp_bf16",
            |_, m| downcast::<Conv2d>(m).is_some(),
            |_, m| {
                let mut conv = downcast_box::<Conv2d>(m)
                    .map_err(|_| Error::msg("precision selected a module that is not a Conv2d"))?;
                conv.set_bf16(true);
                Ok(conv)
            },
        )
    }
}
