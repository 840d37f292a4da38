//! `recipe`: a training-recipe engine on candle.
//!
//! The binary is [`cli::main`], so that a plugin crate's own binary is three lines:
//!
//! ```text
//! use my_plugin as _; // keep the plugin's registrations in the binary
//! fn main() -> std::process::ExitCode { recipe::cli::main() }
//! ```

pub mod alloc;
pub mod bench;
pub mod bench_data;
pub mod cli;
pub mod job;
pub mod load;
pub mod plot;
pub mod sweep;

// The built-in plugins: named here so that every binary built on this crate links them.
pub use recipe_algorithms as algorithms;
pub use recipe_callbacks as callbacks;
pub use recipe_engine as engine;
