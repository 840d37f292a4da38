//! Checkpoint files in a run folder: their names, listing them newest first, the newest good one,
//! setting aside those from after a resume point, and what `--resume` names.

use super::format::{Checkpoint, EXTENSION};
use crate::error::{Error, Result};
use crate::time::Timestamp;
use candle_core::Device;
use std::path::{Path, PathBuf};

/// The file name of a checkpoint taken at `ts`: `ep3-ba1407.ckpt`.
pub fn file_name(ts: &Timestamp) -> String {
    format!("ep{}-ba{}.{}", ts.epoch, ts.batch, EXTENSION)
}

/// The batch count in a checkpoint's file name (`ep3-ba1407.ckpt` -> 1407).
fn batch_of(path: &Path) -> Option<u64> {
    let stem = path.file_stem()?.to_str()?;
    stem.rsplit_once("ba")?.1.parse().ok()
}

/// Checkpoint files in a run folder (the folder itself and its direct subfolders), newest first
/// by the batch count in their names.
pub fn list(run_dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut scan = |d: &Path| {
        if let Ok(rd) = std::fs::read_dir(d) {
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == EXTENSION) && p.is_file() {
                    if let Some(b) = batch_of(&p) {
                        found.push((b, p));
                    }
                }
            }
        }
    };
    scan(run_dir);
    if let Ok(rd) = std::fs::read_dir(run_dir) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                scan(&e.path());
            }
        }
    }
    found.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.cmp(&a.1)));
    found.into_iter().map(|(_, p)| p).collect()
}

/// The newest checkpoint of a run folder that reads and verifies; damaged ones are skipped with a
/// warning naming each.
pub fn latest(run_dir: &Path, device: &Device) -> Result<Checkpoint> {
    let candidates = list(run_dir);
    if candidates.is_empty() {
        return Err(Error::Data {
            path: run_dir.to_path_buf(),
            message: "no checkpoint (.ckpt) in this run folder".into(),
            hint: "add the `checkpoint` callback to the recipe, or give a checkpoint's path to --resume".into(),
        });
    }
    let mut errors = Vec::new();
    for p in candidates {
        match Checkpoint::read(&p, device) {
            Ok(c) => {
                for e in &errors {
                    tracing::warn!("skipped a damaged checkpoint: {e}");
                }
                return Ok(c);
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    Err(Error::Data {
        path: run_dir.to_path_buf(),
        message: format!(
            "every checkpoint in this run folder is damaged:\n{}",
            errors.join("\n")
        ),
        hint: "the run has to start again".into(),
    })
}

/// Checkpoints of the run folder from after the resume point belong to the abandoned future of
/// the run: renamed to `*.ckpt.abandoned` (kept, but no longer taken by `--resume latest`).
pub fn set_aside_after(run_dir: &Path, batch: u64) {
    for p in list(run_dir) {
        if batch_of(&p).is_some_and(|b| b > batch) {
            let to = p.with_extension("ckpt.abandoned");
            match std::fs::rename(&p, &to) {
                Ok(()) => tracing::warn!(
                    "{} is from after the resume point; kept as {}",
                    p.display(),
                    to.display()
                ),
                Err(e) => tracing::warn!("cannot set aside {}: {e}", p.display()),
            }
        }
    }
}

/// The newest run folder of a recipe that holds a checkpoint: `<runs_dir>/<name>-<n>`, highest n.
fn newest_run_with_checkpoint(runs_dir: &Path, name: &str) -> Option<PathBuf> {
    let mut runs: Vec<(u64, PathBuf)> = std::fs::read_dir(runs_dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let file_name = e.file_name();
            let n = file_name.to_str()?.strip_prefix(name)?.strip_prefix('-')?;
            Some((n.parse().ok()?, e.path()))
        })
        .collect();
    runs.sort_by_key(|r| std::cmp::Reverse(r.0));
    runs.into_iter()
        .map(|(_, p)| p)
        .find(|p| !list(p).is_empty())
}

/// The run folder a checkpoint belongs to: the nearest ancestor (up to two levels) holding a
/// recipe.yaml.
fn run_folder_of(ckpt: &Path) -> Option<PathBuf> {
    let ckpt = std::fs::canonicalize(ckpt).ok()?;
    ckpt.ancestors()
        .skip(1)
        .take(2)
        .find(|d| d.join("recipe.yaml").is_file())
        .map(|d| d.to_path_buf())
}

/// Finds the checkpoint that `--resume SPEC` names: `latest` (the newest good checkpoint of
/// `run_dir`, or of the newest run folder `<runs_dir>/<name>-<n>` that holds one), a run folder,
/// or a file. Returns it with the run folder to continue in: `run_dir` when given, else the
/// folder the checkpoint belongs to, if it has one (`None`: the caller makes a new one).
pub fn resolve(
    spec: &str,
    runs_dir: &Path,
    name: &str,
    run_dir: Option<&Path>,
) -> Result<(Checkpoint, Option<PathBuf>)> {
    let cpu = Device::Cpu;
    let ckpt = if spec == "latest" {
        let folder = match run_dir {
            Some(d) => d.to_path_buf(),
            None => newest_run_with_checkpoint(runs_dir, name).ok_or_else(|| {
                Error::msg(format!(
                    "--resume latest: no run folder {}/{}-<n> holds a checkpoint; give the checkpoint's path, or --run-dir",
                    runs_dir.display(),
                    name
                ))
            })?,
        };
        latest(&folder, &cpu)?
    } else {
        let p = PathBuf::from(spec);
        if p.is_dir() {
            latest(&p, &cpu)?
        } else {
            Checkpoint::read(&p, &cpu)?
        }
    };
    let dir = match run_dir {
        Some(d) => Some(d.to_path_buf()),
        None => run_folder_of(&ckpt.path),
    };
    Ok((ckpt, dir))
}
