//! Data-parallel jobs from the command line: joining the job an MPI launcher started this process
//! in, starting N local ranks through `mpirun` (`recipe run FILE --nproc N`), and agreeing on the
//! checkpoint to resume from.

use recipe_engine::checkpoint::{self, Checkpoint};
use recipe_engine::dist::{self, Collective};
use recipe_engine::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Set by `--nproc N` for the ranks it starts (to N), so that the resume command a stopped run
/// prints starts the same job.
pub const NPROC_ENV: &str = "RECIPE_NPROC";

/// Keeps this process's part in a job (MPI finalises when it drops).
#[derive(Default)]
pub struct JobGuard {
    #[cfg(feature = "mpi")]
    _mpi: Option<dist::mpi::MpiGuard>,
}

/// Joins the job when an MPI launcher started this process; a plain process is a job of one.
pub fn join() -> Result<JobGuard> {
    let Some(size) = dist::launched_by_mpi() else {
        return Ok(JobGuard::default());
    };
    #[cfg(feature = "mpi")]
    {
        let _ = size;
        let (mpi, guard) = dist::mpi::init()?;
        let world: std::sync::Arc<dyn Collective> = mpi;
        dist::install(world.clone())?;
        if world.size() > 1 {
            // A rank that panics must not leave the others waiting in a collective.
            let default = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                default(info);
                if std::thread::current().name() == Some("main") {
                    eprintln!(
                        "rank {} of {} panicked: ending the job",
                        world.rank(),
                        world.size()
                    );
                    world.abort(101);
                }
            }));
        }
        Ok(JobGuard { _mpi: Some(guard) })
    }
    #[cfg(not(feature = "mpi"))]
    {
        match size {
            Some(n) if n > 1 => Err(Error::msg(format!(
                "an MPI launcher started this process as one of {n} ranks, but this binary was built without MPI\n  hint: build with `cargo build --release --features mpi` (Debian: apt-get install libopenmpi-dev openmpi-bin libclang-dev)"
            ))),
            _ => Ok(JobGuard::default()),
        }
    }
}

/// `recipe run FILE --nproc N`: this command again as N ranks under `mpirun` (which replaces
/// this process, so that signals reach it directly). Each rank gets cores / N threads unless
/// RAYON_NUM_THREADS is set; RECIPE_MPIRUN names another launcher.
pub fn launch(n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::msg("--nproc: give at least 1 process"));
    }
    let exe = std::env::current_exe()
        .map_err(|e| Error::msg(format!("cannot find this program's path: {e}")))?;
    let mut args = Vec::new();
    let mut it = std::env::args_os().skip(1);
    while let Some(a) = it.next() {
        if a == "--nproc" {
            it.next();
        } else if !a.to_string_lossy().starts_with("--nproc=") {
            args.push(a);
        }
    }
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let mpirun = std::env::var("RECIPE_MPIRUN").unwrap_or_else(|_| "mpirun".into());
    let mut cmd = std::process::Command::new(&mpirun);
    cmd.arg("-n").arg(n.to_string());
    // Candle's and the loader's threads spread over the cores; MPI would pin each rank to one.
    cmd.args(["--bind-to", "none"]);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        cmd.arg("--allow-run-as-root");
    }
    if n > cores {
        cmd.arg("--oversubscribe");
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        cmd.env("RAYON_NUM_THREADS", (cores / n).max(1).to_string());
    }
    cmd.env(NPROC_ENV, n.to_string());
    cmd.arg(exe).args(args);
    use std::os::unix::process::CommandExt;
    let err = cmd.exec();
    Err(Error::msg(format!(
        "cannot start `{mpirun}`: {err}\n  hint: install Open MPI (apt-get install openmpi-bin), or start the ranks with your own launcher: mpirun -n {n} recipe run FILE"
    )))
}

/// `checkpoint::resolve` for a job: rank 0 resolves `spec` (`latest`, a folder, a file) and every
/// rank reads the checkpoint it found, in the run folder it found.
pub fn resolve_checkpoint(
    world: &dyn Collective,
    spec: &str,
    runs_dir: &Path,
    name: &str,
    run_dir: Option<&Path>,
) -> Result<(Checkpoint, Option<PathBuf>)> {
    let mine = match world.rank() {
        0 => Some(checkpoint::resolve(spec, runs_dir, name, run_dir)?),
        _ => None,
    };
    let text = match &mine {
        Some((c, d)) => format!(
            "{}\n{}",
            c.path.display(),
            d.as_ref()
                .map_or(String::new(), |d| d.display().to_string())
        ),
        None => String::new(),
    };
    let text = dist::agree(world, text)?;
    if let Some(found) = mine {
        return Ok(found);
    }
    let (path, dir) = text
        .split_once('\n')
        .ok_or_else(|| Error::msg("rank 0 sent no checkpoint to resume from"))?;
    let dir = (!dir.is_empty()).then(|| PathBuf::from(dir));
    let (c, _) = checkpoint::resolve(path, runs_dir, name, dir.as_deref())?;
    Ok((c, dir))
}
