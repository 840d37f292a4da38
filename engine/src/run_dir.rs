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

/// Writes the class names, one per line in label order, to `<run folder>/classes.txt`: what a
/// label number means, for whoever uses the trained model.
pub fn write_classes(classes: &[String], run_dir: &Path) -> Result<()> {
    let mut text = classes.join("\n");
    text.push('\n');
    crate::atomic::write_atomic(&run_dir.join("classes.txt"), text.as_bytes())
}

/// The lock file of a run folder.
pub const LOCK_FILE: &str = ".recipe.lock";

/// A run folder held by this process: an OS file lock on `<run folder>/.recipe.lock`, released
/// when this value is dropped or the process ends in any way (SIGKILL included), so a crashed
/// run never leaves its folder locked.
#[derive(Debug)]
pub struct RunLock {
    _file: std::fs::File,
}

impl RunLock {
    /// Locks `run_dir` (created if needed) for this process, or says which process holds it.
    pub fn acquire(run_dir: &Path) -> Result<RunLock> {
        use std::io::{Read, Seek, Write};
        let unwritable = |e: std::io::Error| {
            Error::msg(format!(
                "the run folder {} is not writable ({e}); pass --run-dir to a writable folder",
                run_dir.display()
            ))
        };
        std::fs::create_dir_all(run_dir).map_err(unwritable)?;
        let path = run_dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(unwritable)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim().parse::<u32>() {
                    Ok(pid) => format!("process {pid}"),
                    Err(_) => "another process".to_string(),
                };
                return Err(Error::msg(format!(
                    "the run folder {} is in use: {holder} is training in it\n  hint: wait for that run to finish (or stop it: Ctrl-C writes a checkpoint), or pass another --run-dir",
                    run_dir.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(Error::msg(format!(
                    "cannot lock the run folder {} ({e}); it must be on a filesystem that supports file locks",
                    run_dir.display()
                )))
            }
        }
        // The holder's pid, for the message another process gets.
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = write!(file, "{}", std::process::id());
        let _ = file.flush();
        Ok(RunLock { _file: file })
    }
}

/// The files of a run in its folder: what a finished or interrupted run leaves (its recipe,
/// logs, weights and checkpoints, abandoned ones included). Empty for a new or empty folder.
pub fn run_files(run_dir: &Path) -> Vec<PathBuf> {
    let is_run_file = |name: &str| {
        matches!(
            name,
            "recipe.yaml" | "metrics.jsonl" | "metrics.csv" | "model.safetensors" | "classes.txt"
        ) || name.starts_with("recipe.before-resume-")
            || name.ends_with(".ckpt.abandoned")
    };
    let mut found = crate::checkpoint::list(run_dir);
    let mut scan = |d: &Path| {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if is_run_file(&name) && e.path().is_file() {
                found.push(e.path());
            }
        }
    };
    scan(run_dir);
    for e in std::fs::read_dir(run_dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            scan(&e.path());
        }
    }
    found.sort();
    found
}

/// Refuses to start a new run in a folder that holds another run's files, unless `overwrite`
/// (then those files are removed).
pub fn claim_for_new_run(run_dir: &Path, overwrite: bool) -> Result<()> {
    let files = run_files(run_dir);
    if files.is_empty() {
        return Ok(());
    }
    if !overwrite {
        let names: Vec<String> = files
            .iter()
            .take(6)
            .map(|f| f.strip_prefix(run_dir).unwrap_or(f).display().to_string())
            .collect();
        let more = match files.len().saturating_sub(6) {
            0 => String::new(),
            n => format!(" and {n} more"),
        };
        return Err(Error::msg(format!(
            "the run folder {} already holds a run ({}{more}); nothing was changed\n  hint: continue it with --resume {}, start the new run elsewhere (without --run-dir it gets a fresh runs/<name>-<n>), or pass --overwrite to replace it",
            run_dir.display(),
            names.join(", "),
            run_dir.display()
        )));
    }
    for f in &files {
        std::fs::remove_file(f).map_err(|e| Error::io(f, e))?;
    }
    tracing::warn!(
        "--overwrite: removed {} file(s) of the previous run from {}",
        files.len(),
        run_dir.display()
    );
    Ok(())
}
