//! The algorithms that ship with `recipe`, one file each: a pure functional core, the event glue,
//! and a method card in the module documentation.
//!
//! A binary must name this crate (`use recipe_algorithms as _;`) so that the linker keeps the
//! plugin registrations.

pub mod augmix;
pub mod autolrs;
pub mod blurpool;
pub mod channels_last;
pub mod colout;
pub mod cutmix;
pub mod cutout;
pub mod ema;
pub mod ghost_batchnorm;
pub mod gradient_clipping;
pub mod label_smoothing;
pub mod layer_freezing;
pub mod mixing;
pub mod mixup;
pub mod progressive_resizing;
pub mod randaugment;
pub mod sam;
pub mod scale_schedule;
pub mod selective_backprop;
pub mod squeeze_excite;
pub mod stochastic_depth;
pub mod swa;
pub mod weight_standardization;
