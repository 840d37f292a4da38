//! MPI as the job's collective engine, through the `mpi` crate (rsmpi) over the system's MPI
//! library (Debian: `apt-get install libopenmpi-dev openmpi-bin libclang-dev`).
//!
//! MPI is started with `MPI_THREAD_SERIALIZED` and every call goes through one mutex, so the
//! trainer may call from whichever thread it runs on; the data loader's threads never call MPI.
//!
//! A collective waits for every rank; MPI itself never gives up, so a rank that hangs (stopped,
//! deadlocked, stuck on a dead file system) would hold the others for ever. A watchdog thread
//! ends the job when one collective has waited longer than [`super::collective_timeout`]: it
//! says what was waiting, since when, and how to resume, and calls MPI_Abort, which makes the
//! launcher end every rank. The last checkpoint is untouched (rank 0 writes checkpoints to a
//! temporary file and renames it into place).

use super::Collective;
use crate::error::{Error, Result};
use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The MPI world of this process.
pub struct Mpi {
    comm: Mutex<SimpleCommunicator>,
    rank: usize,
    size: usize,
    watch: Arc<Watch>,
}

/// The collective in progress, if any: what it is and when it started; the watchdog waits on
/// `changed`.
#[derive(Default)]
struct Watch {
    waiting: Mutex<Option<(&'static str, Instant)>>,
    changed: Condvar,
}

impl Watch {
    /// Marks a collective as started (`Some`) or ended (`None`). Only a start wakes the watchdog:
    /// after an end it finds nothing to time when its own sleep runs out, so a step's
    /// collectives (two per batch norm with `sync_batchnorm`) cost one wake each, not two.
    fn set(&self, now: Option<(&'static str, Instant)>) {
        *self.waiting.lock().unwrap_or_else(|p| p.into_inner()) = now;
        if now.is_some() {
            self.changed.notify_one();
        }
    }

    /// The watchdog's loop: sleeps until a collective starts, then until it ends or outlasts
    /// the timeout; in the second case it ends the job.
    fn guard(&self, rank: usize, size: usize) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            // the timeout is re-read at each wake: it is set once the command line is read
            let sleep = match (*waiting, super::collective_timeout()) {
                (Some((what, since)), Some(limit)) => {
                    let waited = since.elapsed();
                    if waited >= limit {
                        timed_out(rank, size, what, waited, limit);
                    }
                    limit - waited
                }
                _ => Duration::from_secs(1),
            };
            waiting = match self.changed.wait_timeout(waiting, sleep) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }
}

/// Ends the job after `what` waited `waited` (past `limit`) on this rank: the reason on stderr,
/// then MPI_Abort.
fn timed_out(rank: usize, size: usize, what: &str, waited: Duration, limit: Duration) -> ! {
    eprintln!(
        "error: rank {rank} of {size}: the {what} has waited {:.0} s for the other ranks \
         (--collective-timeout {}): one of them is hung or stopped. Ending the job.\n  \
         hint: the last checkpoint is intact; find why the rank stopped, then start the job again \
         with `--resume latest`",
        waited.as_secs_f64(),
        limit.as_secs()
    );
    // The main thread holds the communicator's lock inside the collective, so MPI_Abort is
    // called here without it: the one call MPI allows as a best effort from anywhere.
    // SAFETY: MPI is initialised (this thread is started by `init`) and not finalised (the
    // guard that finalises it outlives every collective).
    unsafe {
        mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, 124);
    }
    std::process::exit(124)
}

// SAFETY: the communicator is a handle into the MPI library, which was started with (at least)
// MPI_THREAD_SERIALIZED; every use of it is serialised by the mutex, which is what that level
// asks of the caller.
unsafe impl Send for Mpi {}
unsafe impl Sync for Mpi {}

/// Keeps MPI running; dropping it finalises MPI (every rank must, before it exits, or the
/// launcher reports the job as failed). Hold it for the whole of `main`.
pub struct MpiGuard {
    _universe: mpi::environment::Universe,
}

/// Starts MPI and returns the world with the guard that finalises it.
pub fn init() -> Result<(Arc<Mpi>, MpiGuard)> {
    let (universe, level) = mpi::initialize_with_threading(mpi::Threading::Serialized)
        .ok_or_else(|| Error::msg("MPI was already started in this process"))?;
    if level < mpi::Threading::Serialized {
        tracing::warn!(
            "the MPI library gives thread level {level:?}; the trainer calls MPI from one thread at a time only"
        );
    }
    let comm = universe.world();
    let rank = comm.rank() as usize;
    let size = comm.size() as usize;
    let watch = Arc::new(Watch::default());
    if size > 1 {
        let w = watch.clone();
        std::thread::Builder::new()
            .name("recipe-collective-watchdog".into())
            .spawn(move || w.guard(rank, size))
            .map_err(|e| {
                Error::msg(format!(
                    "cannot start the collective watchdog thread: {e}; the system is out of \
                     threads or memory: start fewer processes per machine"
                ))
            })?;
    }
    Ok((
        Arc::new(Mpi {
            comm: Mutex::new(comm),
            rank,
            size,
            watch,
        }),
        MpiGuard {
            _universe: universe,
        },
    ))
}

impl Mpi {
    fn comm(&self) -> std::sync::MutexGuard<'_, SimpleCommunicator> {
        // A poisoned lock only means another thread panicked holding it; the handle is intact.
        self.comm.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `f` on the communicator, watched: the watchdog ends the job if it outlasts the timeout.
    fn watched<R>(&self, what: &'static str, f: impl FnOnce(&SimpleCommunicator) -> R) -> R {
        let comm = self.comm();
        self.watch.set(Some((what, Instant::now())));
        let r = f(&comm);
        self.watch.set(None);
        r
    }

    /// MPI_Allreduce with MPI_SUM. MPI_IN_PLACE is not exposed by the crate: reduce into a
    /// second buffer.
    fn sum<T: mpi::datatype::Equivalence + Copy + Default>(&self, buf: &mut [T]) -> Result<()> {
        let mut out = vec![T::default(); buf.len()];
        self.watched("all-reduce", |c| {
            c.all_reduce_into(&buf[..], &mut out[..], SystemOperation::sum())
        });
        buf.copy_from_slice(&out);
        Ok(())
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.sum(buf)
    }
    fn sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.sum(buf)
    }
    fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<()> {
        self.watched("broadcast from rank 0", |comm| {
            let root = comm.process_at_rank(0);
            let mut len = bytes.len() as u64;
            root.broadcast_into(&mut len);
            bytes.resize(len as usize, 0);
            root.broadcast_into(&mut bytes[..]);
        });
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        self.comm().abort(code)
    }
}
