//! The callbacks that ship with `recipe`: monitors, loggers and the progress bar.
//!
//! A binary must name this crate (`use recipe_callbacks as _;`) so that the linker keeps the
//! plugin registrations.

pub mod json_logger;
pub mod lr_monitor;
pub mod progress_bar;
pub mod speed_monitor;
