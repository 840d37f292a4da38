//! MPI as the job's collective engine, through the `mpi` crate (rsmpi) over the system's MPI
//! library (Debian: `apt-get install libopenmpi-dev openmpi-bin libclang-dev`).
//!
//! The trainer's collectives go through one mutex, so it may call them from whichever thread it
//! runs on; the data loader's threads never call MPI.
//!
//! A collective waits for every rank, and MPI itself never gives up: a rank that hangs
//! (stopped, deadlocked, stuck on a dead file system) would hold the others for ever. A watchdog
//! thread on every rank ends the job when one collective has waited longer than
//! [`super::collective_timeout`]. To say *which* rank holds the job, it calls the roll: it asks
//! every other rank's watchdog, over a communicator of their own, where its rank stands (waiting
//! in which collective, or in its own work since when). Ranks that do not answer are stopped or
//! gone; ranks in their own work are stuck there; ranks in another collective called them out of
//! order. The lowest rank still waiting names them (rank, host, process id), says how to resume,
//! and calls MPI_Abort, which makes the launcher end every rank. The last checkpoint is
//! untouched (rank 0 writes checkpoints to a temporary file and renames it into place).
//!
//! The watchdogs call MPI beside the trainer's thread, which needs `MPI_THREAD_MULTIPLE` (Open
//! MPI and MPICH provide it). A library without it still gets the timeout, but the error can
//! only say which rank waited.

use super::Collective;
use crate::error::{Error, Result};
use mpi::collective::SystemOperation;
use mpi::request::StaticScope;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Tag;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Point-to-point tags of the roll call, on the watchdogs' own communicator.
const ROLL_CALL: Tag = 1;
const ANSWER: Tag = 2;

/// How often a watchdog looks for roll calls and checks the time.
const POLL: Duration = Duration::from_millis(50);

/// How long a roll call waits for the answers (each watchdog polls every [`POLL`]).
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// The collectives, as they are named in errors and in a roll call's answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    AllReduce,
    Broadcast,
}

impl Kind {
    const ALL: [Kind; 2] = [Kind::AllReduce, Kind::Broadcast];
    fn name(self) -> &'static str {
        match self {
            Kind::AllReduce => "all-reduce",
            Kind::Broadcast => "broadcast from rank 0",
        }
    }
}

/// Where a rank stands: in its `calls`-th collective (`Some(kind)`), or in its own work after
/// it (`None`), since `since`. Every rank calls the same collectives in the same order, so the
/// same number on two ranks is the same call.
#[derive(Clone, Copy, Debug)]
struct Position {
    calls: u64,
    within: Option<Kind>,
    since: Instant,
}

impl Position {
    fn collective(&self) -> String {
        match self.within {
            Some(kind) => format!("{} #{}", kind.name(), self.calls),
            None => format!("collective #{}", self.calls),
        }
    }

    /// The answer to a roll call: [calls, kind (or 255: none), milliseconds since].
    fn encode(&self) -> [u64; 3] {
        let kind = self.within.map_or(255, |k| k as u64);
        [self.calls, kind, self.since.elapsed().as_millis() as u64]
    }

    fn decode(a: [u64; 3]) -> Position {
        Position {
            calls: a[0],
            within: Kind::ALL.get(a[1] as usize).copied(),
            since: Instant::now()
                .checked_sub(Duration::from_millis(a[2]))
                .unwrap_or_else(Instant::now),
        }
    }

    fn same_collective(&self, other: &Position) -> bool {
        self.within.is_some() && self.calls == other.calls && self.within == other.within
    }
}

/// A rank's process, to name it in an error.
#[derive(Clone, Debug)]
struct Process {
    host: String,
    pid: u32,
}

/// The world of this process.
pub struct Mpi {
    comm: Mutex<SimpleCommunicator>,
    rank: usize,
    size: usize,
    /// This rank's position, written by the trainer's thread and read by the watchdog.
    position: Arc<Mutex<Position>>,
}

// SAFETY: the communicator is a handle into the MPI library, which was started with (at least)
// MPI_THREAD_SERIALIZED; every use of it is serialised by the mutex, which is what that level
// asks of the caller.
unsafe impl Send for Mpi {}
unsafe impl Sync for Mpi {}

/// Keeps MPI running; dropping it stops the watchdog, then finalises MPI (every rank must,
/// before it exits, or the launcher reports the job as failed). Hold it for the whole of `main`.
pub struct MpiGuard {
    watchdog: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
    _universe: mpi::environment::Universe,
}

impl Drop for MpiGuard {
    fn drop(&mut self) {
        // The watchdog calls MPI: it must be gone before MPI_Finalize.
        if let Some((stop, thread)) = self.watchdog.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = thread.join();
        }
    }
}

/// The bytes of a host name in the start-up exchange.
const HOST_BYTES: usize = 64;

/// Starts MPI and returns the world with the guard that finalises it.
pub fn init() -> Result<(Arc<Mpi>, MpiGuard)> {
    let (universe, level) = mpi::initialize_with_threading(mpi::Threading::Multiple)
        .ok_or_else(|| Error::msg("MPI was already started in this process"))?;
    if level < mpi::Threading::Serialized {
        tracing::warn!(
            "the MPI library gives thread level {level:?}; the trainer calls MPI from one thread at a time only"
        );
    }
    let comm = universe.world();
    let rank = comm.rank() as usize;
    let size = comm.size() as usize;
    let position = Arc::new(Mutex::new(Position {
        calls: 0,
        within: None,
        since: Instant::now(),
    }));
    let mut watchdog = None;
    if size > 1 {
        let dog = Watchdog {
            rank,
            size,
            processes: exchange_processes(&comm, size),
            // the roll call needs a communicator beside the trainer's, used from this thread
            side: (level == mpi::Threading::Multiple).then(|| comm.duplicate()),
            position: position.clone(),
            stop: Arc::new(AtomicBool::new(false)),
        };
        if dog.side.is_none() {
            tracing::debug!(
                "MPI thread level {level:?}: a hung rank ends the job after --collective-timeout, \
                 but the error cannot name it (that needs MPI_THREAD_MULTIPLE)"
            );
        }
        let stop = dog.stop.clone();
        let thread = std::thread::Builder::new()
            .name("recipe-collective-watchdog".into())
            .spawn(move || dog.run())
            .map_err(|e| {
                Error::msg(format!(
                    "cannot start the collective watchdog thread: {e}; the system is out of \
                     threads or memory: start fewer processes per machine"
                ))
            })?;
        watchdog = Some((stop, thread));
    }
    Ok((
        Arc::new(Mpi {
            comm: Mutex::new(comm),
            rank,
            size,
            position,
        }),
        MpiGuard {
            watchdog,
            _universe: universe,
        },
    ))
}

/// Every rank's host name (cut to 64 bytes) and process id, in rank order.
fn exchange_processes(comm: &SimpleCommunicator, size: usize) -> Vec<Process> {
    let mut mine = [0u8; HOST_BYTES + 4];
    let host = mpi::environment::processor_name().unwrap_or_default();
    let n = host.len().min(HOST_BYTES);
    mine[..n].copy_from_slice(&host.as_bytes()[..n]);
    mine[HOST_BYTES..].copy_from_slice(&std::process::id().to_le_bytes());
    let mut all = vec![0u8; mine.len() * size];
    comm.all_gather_into(&mine[..], &mut all[..]);
    all.chunks(mine.len())
        .map(|c| Process {
            host: String::from_utf8_lossy(&c[..HOST_BYTES])
                .trim_end_matches('\0')
                .to_string(),
            pid: u32::from_le_bytes(c[HOST_BYTES..].try_into().expect("4 bytes")),
        })
        .collect()
}

/// A rank's watchdog thread.
struct Watchdog {
    rank: usize,
    size: usize,
    processes: Vec<Process>,
    /// The watchdogs' own communicator (a duplicate of the world); `None` when the MPI library
    /// does not allow calls from two threads at once.
    side: Option<SimpleCommunicator>,
    position: Arc<Mutex<Position>>,
    stop: Arc<AtomicBool>,
}

// SAFETY: the watchdog's communicator is used by the watchdog's thread only, and moved there
// before any use; the library allows calls from several threads (MPI_THREAD_MULTIPLE, or the
// communicator is `None`).
unsafe impl Send for Watchdog {}

impl Watchdog {
    fn position(&self) -> Position {
        *self.position.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers roll calls and times the rank's collective until MPI is about to be finalised.
    fn run(self) {
        while !self.stop.load(Ordering::Relaxed) {
            let at = self.position();
            if let Some(side) = &self.side {
                answer_roll_calls(side, &at);
            }
            // the timeout is re-read each time: it is set once the command line is read
            if let (Some(_), Some(limit)) = (at.within, super::collective_timeout()) {
                let waited = at.since.elapsed();
                if waited >= limit {
                    self.timed_out(&at, waited, limit);
                }
            }
            std::thread::sleep(POLL);
        }
    }

    /// This rank has waited `waited` (past `limit`) at `at`: finds out which ranks hold the job,
    /// names them (or leaves it to a lower rank that waits too), and ends the job.
    fn timed_out(&self, at: &Position, waited: Duration, limit: Duration) -> ! {
        let Some(side) = &self.side else {
            eprintln!(
                "error: rank {} of {}: the {} has waited {:.0} s for the other ranks \
                 (--collective-timeout {}): one of them is hung or stopped. Ending the job.\n  \
                 hint: the last checkpoint is intact; find why the rank stopped, then start the \
                 job again with `--resume latest`",
                self.rank,
                self.size,
                at.collective(),
                waited.as_secs_f64(),
                limit.as_secs()
            );
            end_job()
        };
        let answers = self.roll_call(side, at);
        let waiting: Vec<usize> = (0..self.size)
            .filter(|&r| r == self.rank || answers[r].is_some_and(|p| p.same_collective(at)))
            .collect();
        let reporter = waiting[0];
        if reporter != self.rank {
            // It reports when its own wait passes the limit: answer until then, and a margin.
            let its_wait = answers[reporter].map_or(Duration::ZERO, |p| p.since.elapsed());
            let until = Instant::now() + limit.saturating_sub(its_wait) + 2 * ANSWER_WITHIN;
            while Instant::now() < until {
                answer_roll_calls(side, at);
                std::thread::sleep(POLL);
            }
            eprintln!(
                "error: rank {} of {}: the {} has waited past --collective-timeout {}, and rank \
                 {reporter}, which was to name the ranks holding the job, has not ended it. \
                 Ending the job.\n  hint: the last checkpoint is intact; start the job again \
                 with `--resume latest`",
                self.rank,
                self.size,
                at.collective(),
                limit.as_secs()
            );
            end_job()
        }
        eprintln!("{}", self.report(at, waited, limit, &answers, &waiting));
        end_job()
    }

    /// Asks every other rank where it stands; the answers that came within [`ANSWER_WITHIN`],
    /// indexed by rank. Keeps answering the others' roll calls meanwhile.
    fn roll_call(&self, side: &SimpleCommunicator, at: &Position) -> Vec<Option<Position>> {
        for r in (0..self.size).filter(|&r| r != self.rank) {
            // Not waited for: the job ends before this rank goes on. The buffer is leaked for
            // the same reason (the send may still read it).
            let buf: &'static [u64; 1] = Box::leak(Box::new([at.calls]));
            let req = side.process_at_rank(r as i32).immediate_send_with_tag(
                StaticScope,
                &buf[..],
                ROLL_CALL,
            );
            std::mem::forget(req);
        }
        let mut answers: Vec<Option<Position>> = vec![None; self.size];
        let asked = Instant::now();
        while asked.elapsed() < ANSWER_WITHIN
            && (0..self.size).any(|r| r != self.rank && answers[r].is_none())
        {
            answer_roll_calls(side, at);
            while let Some((msg, status)) =
                side.any_process().immediate_matched_probe_with_tag(ANSWER)
            {
                let mut a = [0u64; 3];
                msg.matched_receive_into(&mut a[..]);
                answers[status.source_rank() as usize] = Some(Position::decode(a));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        answers
    }

    /// The error that names the ranks holding the job at `at`.
    fn report(
        &self,
        at: &Position,
        waited: Duration,
        limit: Duration,
        answers: &[Option<Position>],
        waiting: &[usize],
    ) -> String {
        let mut holding = Vec::new();
        for (r, answer) in answers.iter().enumerate() {
            if waiting.contains(&r) {
                continue;
            }
            let why = match answer {
                None => format!(
                    "did not answer within {} s: the process is stopped, gone, or cut off",
                    ANSWER_WITHIN.as_secs()
                ),
                Some(p) if p.within.is_none() => format!(
                    "has been in its own work for {:.0} s since its {}: stuck there (a deadlock, a \
                     dead file system) or far slower than the others",
                    p.since.elapsed().as_secs_f64(),
                    p.collective()
                ),
                Some(p) => format!(
                    "waits in another collective, the {}: the ranks called collectives in \
                     different orders (a bug in recipe or a plugin: please report it)",
                    p.collective()
                ),
            };
            let p = &self.processes[r];
            holding.push(format!(
                "  rank {r} (host {}, pid {}): has not arrived; it {why}",
                p.host, p.pid
            ));
        }
        let list: Vec<String> = waiting.iter().map(|r| r.to_string()).collect();
        format!(
            "error: the {} has waited {:.0} s (--collective-timeout {}) on rank{} {} of {}, for:\n\
             {}\n  Ending the job.\n  hint: the last checkpoint is intact; look at the rank{} \
             above (its log; `gdb -p PID` on its host shows where it is), then start the job \
             again with `--resume latest`",
            at.collective(),
            waited.as_secs_f64(),
            limit.as_secs(),
            if waiting.len() > 1 { "s" } else { "" },
            list.join(", "),
            self.size,
            holding.join("\n"),
            if holding.len() > 1 { "s" } else { "" },
        )
    }
}

/// Answers every roll call received so far with where this rank stands.
fn answer_roll_calls(side: &SimpleCommunicator, at: &Position) {
    while let Some((msg, status)) = side
        .any_process()
        .immediate_matched_probe_with_tag(ROLL_CALL)
    {
        let mut asked = [0u64; 1];
        msg.matched_receive_into(&mut asked[..]);
        // 24 bytes: sent eagerly, and the asker polls for it
        side.process_at_rank(status.source_rank())
            .send_with_tag(&at.encode()[..], ANSWER);
    }
}

/// MPI_Abort on the whole job, from the watchdog while the trainer's thread may hold the
/// communicator inside a collective: the one call MPI allows as a best effort from anywhere.
fn end_job() -> ! {
    // SAFETY: MPI is initialised (the watchdog is started by `init`) and not finalised (the
    // guard stops the watchdog before it finalises MPI).
    unsafe {
        mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, 124);
    }
    std::process::exit(124)
}

impl Mpi {
    /// `f` on the communicator, with this rank's position updated for the watchdog.
    fn watched<R>(&self, kind: Kind, f: impl FnOnce(&SimpleCommunicator) -> R) -> R {
        // A poisoned lock only means another thread panicked holding it; the handle is intact.
        let comm = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        self.set_position(Some(kind));
        let r = f(&comm);
        self.set_position(None);
        r
    }

    fn set_position(&self, within: Option<Kind>) {
        let mut p = self.position.lock().unwrap_or_else(|p| p.into_inner());
        if within.is_some() {
            p.calls += 1;
        }
        p.within = within;
        p.since = Instant::now();
    }

    /// MPI_Allreduce with MPI_SUM. MPI_IN_PLACE is not exposed by the crate: reduce into a
    /// second buffer.
    fn sum<T: mpi::datatype::Equivalence + Copy + Default>(&self, buf: &mut [T]) -> Result<()> {
        let mut out = vec![T::default(); buf.len()];
        self.watched(Kind::AllReduce, |c| {
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
        self.watched(Kind::Broadcast, |comm| {
            let root = comm.process_at_rank(0);
            let mut len = bytes.len() as u64;
            root.broadcast_into(&mut len);
            bytes.resize(len as usize, 0);
            root.broadcast_into(&mut bytes[..]);
        });
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        self.comm
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .abort(code)
    }
}
