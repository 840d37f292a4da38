//! MPI as the job's collective engine, through the `mpi` crate (rsmpi) over the system's MPI
//! library (Debian: `apt-get install libopenmpi-dev openmpi-bin libclang-dev`).
//!
//! MPI is started with `MPI_THREAD_SERIALIZED` and every call goes through one mutex, so the
//! trainer may call from whichever thread it runs on; the data loader's threads never call MPI.

use super::Collective;
use crate::error::{Error, Result};
use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::sync::{Arc, Mutex};

/// The MPI world of this process.
pub struct Mpi {
    comm: Mutex<SimpleCommunicator>,
    rank: usize,
    size: usize,
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
    Ok((
        Arc::new(Mpi {
            comm: Mutex::new(comm),
            rank,
            size,
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

    /// MPI_Allreduce with MPI_SUM. MPI_IN_PLACE is not exposed by the crate: reduce into a
    /// second buffer.
    fn sum<T: mpi::datatype::Equivalence + Copy + Default>(&self, buf: &mut [T]) -> Result<()> {
        let mut out = vec![T::default(); buf.len()];
        self.comm()
            .all_reduce_into(&buf[..], &mut out[..], SystemOperation::sum());
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
        let comm = self.comm();
        let root = comm.process_at_rank(0);
        let mut len = bytes.len() as u64;
        root.broadcast_into(&mut len);
        bytes.resize(len as usize, 0);
        root.broadcast_into(&mut bytes[..]);
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        self.comm().abort(code)
    }
}
