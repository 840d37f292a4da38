//! The engine's one error type. Every message says what is wrong, where, and what to do.

use std::path::PathBuf;

/// Result alias used across the engine and by plugins.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A recipe value is wrong. `key` is the dotted path (`optimizer.lr`, `algorithms[1].delay`).
    #[error("{}", recipe_message(.key, .message, .hint, .origin))]
    Recipe {
        key: String,
        message: String,
        hint: Option<String>,
        /// Where the value came from: `file:line` or `--set ...`, filled in by the recipe loader.
        origin: Option<String>,
    },
    /// A time string that does not parse, or a time that cannot be resolved.
    #[error("bad time {input:?}: {message}")]
    Time { input: String, message: String },
    /// A data file or folder is missing or corrupt.
    #[error("{message}\n  file: {}\n  hint: {hint}", .path.display())]
    Data {
        path: PathBuf,
        message: String,
        hint: String,
    },
    /// Anything else about the run's inputs or state.
    #[error("{0}")]
    Msg(String),
    /// Training diverged: a loss, gradient or weight became NaN or infinite (the message names
    /// the step and the last good checkpoint; `State::non_finite`).
    #[error("{0}")]
    NonFinite(String),
    #[error("I/O error on {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The run was stopped by a signal after writing a checkpoint.
    #[error("interrupted by {signal} after batch {batch}; checkpoint written to {}", .checkpoint.display())]
    Interrupted {
        signal: String,
        batch: u64,
        checkpoint: PathBuf,
    },
}

fn recipe_message(
    key: &str,
    message: &str,
    hint: &Option<String>,
    origin: &Option<String>,
) -> String {
    let mut s = String::new();
    match origin {
        Some(o) => s.push_str(&format!("{o}: key `{key}`: {message}")),
        None => s.push_str(&format!("key `{key}`: {message}")),
    }
    if let Some(h) = hint {
        s.push_str(&format!("\n  hint: {h}"));
    }
    s
}

impl Error {
    pub fn msg(m: impl Into<String>) -> Self {
        Error::Msg(m.into())
    }

    pub fn recipe(key: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Recipe {
            key: key.into(),
            message: message.into(),
            hint: None,
            origin: None,
        }
    }

    pub fn recipe_hint(
        key: impl Into<String>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Error::Recipe {
            key: key.into(),
            message: message.into(),
            hint: Some(hint.into()),
            origin: None,
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Prefix the key of a recipe error with `prefix` (`lr` inside `optimizer` becomes `optimizer.lr`);
    /// any other error becomes a recipe error at `prefix`.
    pub fn at(self, prefix: &str) -> Self {
        match self {
            Error::Recipe {
                key,
                message,
                hint,
                origin,
            } => Error::Recipe {
                key: join_key(prefix, &key),
                message,
                hint,
                origin,
            },
            Error::Time { input, message } => Error::Recipe {
                key: prefix.to_string(),
                message: format!("bad time {input:?}: {message}"),
                hint: Some(
                    "a time is a number and a unit: 90ep, 1.5ep, 500ba, 2048sp, 6e6tok, 0.3dur"
                        .into(),
                ),
                origin: None,
            },
            other => other,
        }
    }
}

/// Joins two parts of a key path: `a` + `b` -> `a.b`, `a` + `[0]` -> `a[0]`.
pub fn join_key(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else if key.is_empty() {
        prefix.to_string()
    } else if key.starts_with('[') {
        format!("{prefix}{key}")
    } else {
        format!("{prefix}.{key}")
    }
}

/// Adds a key path to the errors of a `Result`.
pub trait ResultExt<T> {
    fn at(self, prefix: &str) -> Result<T>;
}

impl<T, E: Into<Error>> ResultExt<T> for std::result::Result<T, E> {
    fn at(self, prefix: &str) -> Result<T> {
        self.map_err(|e| e.into().at(prefix))
    }
}
