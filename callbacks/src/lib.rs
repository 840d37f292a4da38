//! The callbacks that ship with `recipe`: checkpoints, stoppers, monitors, loggers and the
//! progress bar.
//!
//! A binary must name this crate (`use recipe_callbacks as _;`) so that the linker keeps the
//! plugin registrations.

pub mod budgeted_convergence;
pub mod checkpoint;
pub mod csv_logger;
pub mod early_stopper;
pub mod json_logger;
pub mod lr_monitor;
pub mod memory_monitor;
pub mod nan_monitor;
pub mod optimizer_monitor;
pub mod progress_bar;
pub mod resume_log;
pub mod runtime_estimator;
pub mod speed_monitor;
pub mod threshold_stopper;
