//! Run folders: a fresh `<name>-<n>` for each run, and the recipe as run written into it.

use crate::error::{Error, Result};
use serde_yaml::Value;
use std::path::{Path, PathBuf};

/// A fresh run folder under `parent`: `<name>-<n>` with the first free n.
pub fn new_run_dir(parent: &Path, name: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(parent).map_err(|e| {
        Error::msg(format!("cannot create the runs folder {}: {e}; set `run_dir` or pass --run-dir to a writable folder", parent.display()))
    })?;
    for n in 1.. {
        let d = parent.join(format!("{name}-{n}"));
        match std::fs::create_dir(&d) {
            Ok(()) => return Ok(d),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(Error::msg(format!(
                    "cannot create run folder {}: {e}; pass --run-dir to a writable folder",
                    d.display()
                )))
            }
        }
    }
    unreachable!("the run-folder search is unbounded")
}

/// Writes the run's recipe.yaml. When resuming into a folder whose recipe.yaml differs, the old
/// one is kept beside it as recipe.before-resume-ba<N>.yaml.
pub fn write_recipe(raw: &Value, run_dir: &Path, resume_at: Option<u64>) -> Result<()> {
    let text = serde_yaml::to_string(raw).unwrap_or_default();
    let path = run_dir.join("recipe.yaml");
    let unwritable = |e: std::io::Error| {
        Error::msg(format!(
            "the run folder {} is not writable ({e}); pass --run-dir to a writable folder",
            run_dir.display()
        ))
    };
    std::fs::create_dir_all(run_dir).map_err(unwritable)?;
    if let (Some(n), Ok(old)) = (resume_at, std::fs::read_to_string(&path)) {
        if old != text {
            let keep = run_dir.join(format!("recipe.before-resume-ba{n}.yaml"));
            std::fs::rename(&path, &keep).map_err(unwritable)?;
        }
    }
    std::fs::write(&path, text).map_err(unwritable)
}
