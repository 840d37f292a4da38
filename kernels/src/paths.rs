//! Which path the kernels take: the one place where that is decided. Every kernel asks
//! [`paths()`]; nothing else reads the environment or probes the CPU.
//!
//! The defaults pick the fastest path for the CPU (see `benches/README.md`). A program (a
//! benchmark comparing two paths, a test) sets them with [`set_paths`]; the environment variables
//! `RECIPE_DIRECT`, `RECIPE_WINOGRAD`, `RECIPE_WINOGRAD_KERNEL`, `RECIPE_WINOGRAD4`,
//! `RECIPE_BATCHED` and `RECIPE_IM2COL` override the defaults when the first kernel runs, so a
//! binary can be compared with itself without rebuilding. Every path computes the same
//! function; they differ in rounding only (Winograd, and the order of the batched passes' sums)
//! or not at all (direct, im2col).

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::OnceLock;

/// A path's setting: chosen by the shapes and the CPU, forced on, or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Switch {
    #[default]
    Auto,
    On,
    Off,
}

/// The kernels' path choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Paths {
    /// The direct AVX-512 convolution (`conv/direct.rs`) for the shapes it covers. It needs
    /// AVX-512 F and VL: `Auto` and `On` both take it where the CPU has them, `Off` never.
    /// Environment: `RECIPE_DIRECT=0` is `Off`.
    pub direct: Switch,
    /// Winograd F(2x2, 3x3) for the forward pass and input gradient of 3x3 stride-1
    /// convolutions (`conv/winograd.rs`, `conv/winograd_avx512.rs`). `Auto`: from 64 channels
    /// in and out on CPUs without AVX-512; with it, from 16 channels, a multiple of 8 output
    /// channels and outputs of 64 pixels or more (`Geometry::winograd`); `On`: from 8 channels
    /// on any CPU; `Off`: never. Environment: `RECIPE_WINOGRAD=0` / `=1`.
    pub winograd: Switch,
    /// Winograd (its transpose, `conv/winograd_avx512.rs`) for the kernel gradient of the
    /// convolutions whose forward pass takes Winograd on AVX-512 (`Geometry::winograd_kernel`).
    /// `Auto`: there, with input channels in fours, up to 128 channels; `On`: also with more;
    /// `Off`: the kernel gradient stays on the direct tiles or the batched passes. Environment:
    /// `RECIPE_WINOGRAD_KERNEL=0` / `=1`.
    pub winograd_kernel: Switch,
    /// Winograd F(4x4, 3x3) (`conv/winograd4_avx512.rs`) instead of F(2x2, 3x3), where a pass
    /// takes Winograd on AVX-512. `Auto`: where it measured faster (`Winograd::f4` for the
    /// forward pass and input gradient, `Winograd::f4_kernel` for the kernel gradient); `On`:
    /// wherever the AVX-512 path runs, all three passes; `Off`: never.
    /// Environment: `RECIPE_WINOGRAD4=0` / `=1`.
    pub winograd4: Switch,
    /// The whole batch in one product per pass (`Geometry::batched`): the images' unfolded
    /// columns side by side, so the kernel is packed once per pass instead of once per image.
    /// `Auto`: for small output images (under 256 pixels) with large kernels (from 2^18 weights:
    /// ResNet-50's last two stages), where per-image products re-read a kernel too large for
    /// the cache for a few dozen columns each; `On`: every convolution the im2col family
    /// computes (not Winograd, not the in-place products); `Off`: never.
    /// Environment: `RECIPE_BATCHED=0` / `=1`.
    pub batched: Switch,
    /// Every convolution through im2col and one product (for comparisons).
    /// Environment: `RECIPE_IM2COL=1`.
    pub im2col_only: bool,
}

impl Paths {
    /// The defaults with the environment's overrides applied.
    pub fn from_env() -> Paths {
        Paths::from_vars(|k| std::env::var(k).ok())
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Paths {
        let switch = |k: &str| match var(k).as_deref() {
            Some("0") => Switch::Off,
            Some("1") => Switch::On,
            _ => Switch::Auto,
        };
        Paths {
            direct: match switch("RECIPE_DIRECT") {
                Switch::Off => Switch::Off,
                _ => Switch::Auto,
            },
            winograd: switch("RECIPE_WINOGRAD"),
            winograd_kernel: switch("RECIPE_WINOGRAD_KERNEL"),
            winograd4: switch("RECIPE_WINOGRAD4"),
            batched: switch("RECIPE_BATCHED"),
            im2col_only: var("RECIPE_IM2COL").as_deref() == Some("1"),
        }
    }

    fn encode(self) -> u16 {
        let s = |s: Switch| match s {
            Switch::Auto => 0,
            Switch::On => 1,
            Switch::Off => 2,
        };
        s(self.direct)
            | (s(self.winograd) << 2)
            | ((self.im2col_only as u16) << 4)
            | (s(self.batched) << 5)
            | (s(self.winograd_kernel) << 7)
            | (s(self.winograd4) << 9)
    }

    fn decode(b: u16) -> Paths {
        let s = |v: u16| match v & 3 {
            1 => Switch::On,
            2 => Switch::Off,
            _ => Switch::Auto,
        };
        Paths {
            direct: s(b),
            winograd: s(b >> 2),
            winograd_kernel: s(b >> 7),
            winograd4: s(b >> 9),
            batched: s(b >> 5),
            im2col_only: b & 16 != 0,
        }
    }
}

/// Not set yet: the first reader takes `Paths::from_env()`.
const UNSET: u16 = u16::MAX;
static CURRENT: AtomicU16 = AtomicU16::new(UNSET);

/// The paths in force (one atomic load once they are set).
pub fn paths() -> Paths {
    let b = CURRENT.load(Ordering::Relaxed);
    if b != UNSET {
        return Paths::decode(b);
    }
    // Only the first value is stored, so a `set_paths` racing the first reader wins.
    let _ = CURRENT.compare_exchange(
        UNSET,
        Paths::from_env().encode(),
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    Paths::decode(CURRENT.load(Ordering::Relaxed))
}

/// Sets the paths for every kernel called from now on, in every thread. Returns the previous
/// setting, so that a caller can restore it.
pub fn set_paths(p: Paths) -> Paths {
    let before = paths();
    CURRENT.store(p.encode(), Ordering::Relaxed);
    before
}

/// What the CPU offers the kernels, probed once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cpu {
    /// AVX-512 F: the `gemm` crate runs its 512-bit kernels.
    pub avx512: bool,
    /// AVX-512 F and VL: what the direct convolution's tiles need.
    pub avx512_vl: bool,
    /// AVX-512 F, BW, VL and BF16: the bf16 products (`crate::bf16`).
    pub avx512_bf16: bool,
}

/// The CPU's features that the kernels use.
pub fn cpu() -> Cpu {
    static CPU: OnceLock<Cpu> = OnceLock::new();
    *CPU.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let f = std::arch::is_x86_feature_detected!("avx512f");
            let vl = f && std::arch::is_x86_feature_detected!("avx512vl");
            Cpu {
                avx512: f,
                avx512_vl: vl,
                avx512_bf16: vl
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512bf16"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Cpu {
                avx512: false,
                avx512_vl: false,
                avx512_bf16: false,
            }
        }
    })
}

/// Whether the direct convolution runs: the CPU has it and it is not switched off.
pub fn direct_enabled() -> bool {
    cpu().avx512_vl && paths().direct != Switch::Off
}

/// The least number of channels (in and out) from which Winograd is taken, or `None` when it is
/// not taken at all.
pub fn winograd_min_channels() -> Option<usize> {
    match paths().winograd {
        Switch::Off => None,
        Switch::On => Some(8),
        Switch::Auto if cpu().avx512 => Some(16),
        Switch::Auto => Some(64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_survives_its_encoding() {
        for direct in [Switch::Auto, Switch::On, Switch::Off] {
            for winograd in [Switch::Auto, Switch::On, Switch::Off] {
                for batched in [Switch::Auto, Switch::On, Switch::Off] {
                    for winograd_kernel in [Switch::Auto, Switch::On, Switch::Off] {
                        for winograd4 in [Switch::Auto, Switch::On, Switch::Off] {
                            for im2col_only in [false, true] {
                                let p = Paths {
                                    direct,
                                    winograd,
                                    winograd_kernel,
                                    winograd4,
                                    batched,
                                    im2col_only,
                                };
                                assert_eq!(Paths::decode(p.encode()), p);
                                assert_ne!(p.encode(), UNSET);
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn environment_overrides_read_as_documented() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            Paths::from_vars(move |k| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            })
        };
        assert_eq!(env(&[]), Paths::default());
        let p = env(&[
            ("RECIPE_DIRECT", "0"),
            ("RECIPE_WINOGRAD", "1"),
            ("RECIPE_IM2COL", "1"),
            ("RECIPE_BATCHED", "0"),
            ("RECIPE_WINOGRAD_KERNEL", "0"),
            ("RECIPE_WINOGRAD4", "0"),
        ]);
        assert_eq!(p.winograd4, Switch::Off);
        assert_eq!(p.winograd_kernel, Switch::Off);
        assert_eq!(p.direct, Switch::Off);
        assert_eq!(p.batched, Switch::Off);
        assert_eq!(p.winograd, Switch::On);
        assert!(p.im2col_only);
        assert_eq!(env(&[("RECIPE_WINOGRAD", "0")]).winograd, Switch::Off);
        // Anything else leaves the default.
        assert_eq!(env(&[("RECIPE_DIRECT", "yes")]).direct, Switch::Auto);
    }
}
