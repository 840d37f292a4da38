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
//! in which collective, or in its own work since when). Ranks already past the collective (a
//! broadcast's root goes on at once) do not hold it; ranks that do not answer are stopped or
//! gone; ranks in their own work are stuck there; a rank at another collective under the same
//! number called them out of order; when every rank is inside the collective, MPI or the network
//! is stuck. The lowest waiting rank (of those that time out together) names them (rank, host,
//! process id), says how to resume, and calls MPI_Abort, which makes the launcher end every
//! rank. The last checkpoint is untouched (rank 0 writes checkpoints to a temporary file and
//! renames it into place). If the late rank arrives during the roll call, the job goes on.
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
/// it (`None`; `calls` 0: since it started), since `since`. Every rank calls the same
/// collectives in the same order, so the same number on two ranks is the same call.
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

    /// The answer to roll call `asked`: [asked, calls, kind (or 255: none), milliseconds since].
    fn encode(&self, asked: u64) -> [u64; 4] {
        let kind = self.within.map_or(255, |k| k as u64);
        [
            asked,
            self.calls,
            kind,
            self.since.elapsed().as_millis() as u64,
        ]
    }

    fn decode(a: &[u64; 4]) -> Position {
        Position {
            calls: a[1],
            within: Kind::ALL.get(a[2] as usize).copied(),
            since: Instant::now()
                .checked_sub(Duration::from_millis(a[3]))
                .unwrap_or_else(Instant::now),
        }
    }

    /// Whether this is still the collective `at` (not yet completed on this rank).
    fn is(&self, at: &Position) -> bool {
        self.within.is_some() && self.calls == at.calls && self.within == at.within
    }
}

/// Where another rank stands, seen from a rank that waits at a collective.
enum Standing {
    /// Waiting at the same collective.
    Here(Position),
    /// Already through it (a broadcast's root, a rank that got its share early): not holding.
    Passed,
    /// Not there yet: in its own work, or waiting at an earlier collective.
    Behind(Position),
    /// At a different collective under the same number: the ranks called them in different
    /// orders.
    Elsewhere(Position),
    /// No answer.
    Silent,
}

impl Standing {
    fn of(answer: Option<Position>, at: &Position) -> Standing {
        let Some(p) = answer else {
            return Standing::Silent;
        };
        if p.calls > at.calls || (p.calls == at.calls && p.within.is_none()) {
            Standing::Passed
        } else if p.calls < at.calls {
            Standing::Behind(p)
        } else if p.within == at.within {
            Standing::Here(p)
        } else {
            Standing::Elsewhere(p)
        }
    }

    /// Why a rank that is not here holds the job; `None` for one that does not.
    fn why(&self) -> Option<String> {
        let secs = |p: &Position| p.since.elapsed().as_secs_f64();
        match self {
            Standing::Here(_) | Standing::Passed => None,
            Standing::Silent => Some(format!(
                "did not answer within {} s: the process is stopped, gone, or cut off from the \
                 others",
                ANSWER_WITHIN.as_secs()
            )),
            Standing::Behind(p) if p.within.is_none() => Some(format!(
                "has been in its own work for {:.0} s, since {}: stuck there (a deadlock, a dead \
                 file system) or far slower than the others",
                secs(p),
                match p.calls {
                    0 => "it started".to_string(),
                    _ => format!("its {}", p.collective()),
                }
            )),
            Standing::Behind(p) => Some(format!(
                "waits at the earlier {}, for {:.0} s",
                p.collective(),
                secs(p)
            )),
            Standing::Elsewhere(p) => Some(format!(
                "waits at the {} instead: the ranks called collectives in different orders (a bug \
                 in recipe or in a plugin: please report it)",
                p.collective()
            )),
        }
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

// SAFETY: the communicator is a handle into the MPI library. The trainer's uses of it are
// serialised by the mutex, which is what MPI_THREAD_SERIALIZED asks of the caller; the watchdog
// calls MPI beside them only on its own communicator, which needs MPI_THREAD_MULTIPLE (it is
// given one only then), and MPI_Abort (see `end_job`).
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
        // the roll call needs a communicator beside the trainer's, used from the watchdog's
        // thread, and the names of the processes it may have to blame
        let dog = Watchdog {
            rank,
            size,
            roll: (level == mpi::Threading::Multiple).then(|| Roll {
                processes: exchange_processes(&comm, size),
                side: comm.duplicate(),
            }),
            position: position.clone(),
            stop: Arc::new(AtomicBool::new(false)),
        };
        if dog.roll.is_none() {
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
    /// What the roll call needs; `None` when the MPI library does not allow calls from two
    /// threads at once.
    roll: Option<Roll>,
    position: Arc<Mutex<Position>>,
    stop: Arc<AtomicBool>,
}

/// The roll call's means: the watchdogs' own communicator (a duplicate of the world) and every
/// rank's process, to name it.
struct Roll {
    side: SimpleCommunicator,
    processes: Vec<Process>,
}

// SAFETY: the watchdog's communicator is created before the thread starts, moved into it, and
// used by that thread only, beside the trainer's calls on the world: it exists only under
// MPI_THREAD_MULTIPLE, which allows that. Without it the watchdog calls only MPI_Abort.
unsafe impl Send for Watchdog {}

impl Watchdog {
    fn position(&self) -> Position {
        *self.position.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers roll calls and times the rank's collective until MPI is about to be finalised.
    fn run(self) {
        while !self.stop.load(Ordering::Relaxed) {
            // the timeout is re-read each time: it is set once the command line is read
            let Some(limit) = super::collective_timeout() else {
                // no rank times out, so none calls the roll: nothing to answer (the short sleep
                // only keeps MpiGuard's join at exit short)
                std::thread::sleep(POLL);
                continue;
            };
            let at = self.position();
            if let Some(roll) = &self.roll {
                answer_roll_calls(&roll.side, &at);
            }
            if at.within.is_some() && at.since.elapsed() >= limit {
                self.timed_out(&at, limit);
            }
            std::thread::sleep(POLL);
        }
    }

    /// This rank has waited past `limit` at `at`: finds out which ranks hold the job, names
    /// them (or leaves it to a lower rank that times out with it), and ends the job. Returns if
    /// the collective completes meanwhile: the late rank arrived, and the job goes on.
    fn timed_out(&self, at: &Position, limit: Duration) {
        let Some(Roll { side, processes }) = &self.roll else {
            eprintln!(
                "error: rank {} of {}: the {} has waited {:.0} s for the other ranks \
                 (--collective-timeout {}): one of them is hung or stopped. Ending the job.\n  \
                 hint: the last checkpoint is intact; find why the rank stopped, then start the \
                 job again with `--resume latest`",
                self.rank,
                self.size,
                at.collective(),
                at.since.elapsed().as_secs_f64(),
                limit.as_secs()
            );
            end_job()
        };
        let Some(answers) = self.roll_call(side, at) else {
            return self.went_on(at);
        };
        let standings: Vec<Standing> = (0..self.size)
            .map(|r| Standing::of(answers[r], at))
            .collect();
        // A lower rank that waits here, and times out within a roll call's time of this one
        // (ranks reach a collective within milliseconds of each other), reports the same: this
        // one leaves it the report, and only makes sure the job ends.
        let reporter = (0..self.rank).find(|&r| {
            matches!(standings[r], Standing::Here(p) if p.since.elapsed() + ANSWER_WITHIN >= limit)
        });
        if reporter.is_some() {
            let until = Instant::now() + 2 * ANSWER_WITHIN + Duration::from_secs(1);
            while Instant::now() < until {
                let now = self.position();
                if !now.is(at) {
                    return self.went_on(at);
                }
                answer_roll_calls(side, &now);
                std::thread::sleep(POLL);
            }
        }
        if !self.position().is(at) {
            return self.went_on(at);
        }
        eprintln!("{}", self.report(at, limit, &standings, processes));
        end_job()
    }

    /// The collective `at` completed after this rank had called the roll.
    fn went_on(&self, at: &Position) {
        tracing::warn!(
            "rank {}: the {} waited past --collective-timeout for the other ranks, then \
             completed: the job goes on",
            self.rank,
            at.collective()
        );
    }

    /// Asks every other rank where it stands; the answers that came within [`ANSWER_WITHIN`],
    /// indexed by rank, or `None` if this rank's collective completed meanwhile. Keeps
    /// answering the others' roll calls.
    fn roll_call(&self, side: &SimpleCommunicator, at: &Position) -> Option<Vec<Option<Position>>> {
        for r in (0..self.size).filter(|&r| r != self.rank) {
            send_leaked(side, r as i32, [at.calls], ROLL_CALL);
        }
        let mut answers: Vec<Option<Position>> = vec![None; self.size];
        let asked = Instant::now();
        while asked.elapsed() < ANSWER_WITHIN
            && (0..self.size).any(|r| r != self.rank && answers[r].is_none())
        {
            let now = self.position();
            if !now.is(at) {
                return None;
            }
            answer_roll_calls(side, &now);
            while let Some((msg, status)) =
                side.any_process().immediate_matched_probe_with_tag(ANSWER)
            {
                let mut a = [0u64; 4];
                msg.matched_receive_into(&mut a[..]);
                // an answer to an earlier roll call of this rank (one that ended with the
                // collective completing) says nothing of now
                if a[0] == at.calls {
                    answers[status.source_rank() as usize] = Some(Position::decode(&a));
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Some(answers)
    }

    /// The error that names the ranks holding the job at `at`.
    fn report(
        &self,
        at: &Position,
        limit: Duration,
        standings: &[Standing],
        processes: &[Process],
    ) -> String {
        let waiting: Vec<String> = (0..self.size)
            .filter(|&r| r == self.rank || matches!(standings[r], Standing::Here(_)))
            .map(|r| r.to_string())
            .collect();
        let holding: Vec<String> = (0..self.size)
            .filter(|&r| r != self.rank)
            .filter_map(|r| {
                let why = standings[r].why()?;
                let p = &processes[r];
                Some(format!(
                    "  rank {r} (host {}, pid {}): has not arrived; it {why}",
                    p.host, p.pid
                ))
            })
            .collect();
        let head = format!(
            "error: the {} has waited {:.0} s (--collective-timeout {}) on rank{} {} of {}",
            at.collective(),
            at.since.elapsed().as_secs_f64(),
            limit.as_secs(),
            if waiting.len() > 1 { "s" } else { "" },
            waiting.join(", "),
            self.size,
        );
        if holding.is_empty() {
            return format!(
                "{head}; every other rank answered from inside it or past it, so no rank holds \
                 it: the MPI library or the network between the ranks is stuck. Ending the \
                 job.\n  hint: the last checkpoint is intact; check the network and the MPI \
                 library, then start the job again with `--resume latest`"
            );
        }
        format!(
            "{head}, for:\n{}\n  Ending the job.\n  hint: the last checkpoint is intact; look at \
             the rank{} above (its log; `gdb -p PID` on its host shows where it is), then start \
             the job again with `--resume latest`",
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
        send_leaked(side, status.source_rank(), at.encode(asked[0]), ANSWER);
    }
}

/// A non-blocking send that is never waited for: a roll call's messages, whose sender may be
/// about to end the job, and whose receiver may be stopped (a blocking send may wait for the
/// receiver). The buffer is leaked, since the send may read it at any later time: a few bytes
/// per message, and messages only near a timeout.
fn send_leaked<const N: usize>(side: &SimpleCommunicator, to: i32, msg: [u64; N], tag: Tag) {
    let buf: &'static [u64; N] = Box::leak(Box::new(msg));
    let req = side
        .process_at_rank(to)
        .immediate_send_with_tag(StaticScope, &buf[..], tag);
    // an incomplete request panics when dropped; forgetting it leaves it to the library
    std::mem::forget(req);
}

/// MPI_Abort on the whole job, from the watchdog while the trainer's thread may hold the
/// communicator inside a collective. Under MPI_THREAD_MULTIPLE that is allowed; under a lower
/// level it is outside the standard, a bet that the library aborts anyway (Open MPI and MPICH
/// do): the job would otherwise hang for ever.
fn end_job() -> ! {
    // SAFETY: MPI is initialised (the watchdog is started by `init`) and not finalised (the
    // guard stops the watchdog before it finalises MPI); see above for the thread level.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn at(calls: u64, within: Option<Kind>) -> Position {
        Position {
            calls,
            within,
            since: Instant::now(),
        }
    }

    /// Where a rank waiting at all-reduce #7 puts each kind of answer: only ranks that have not
    /// come through #7 are blamed, and only a different collective under the same number is an
    /// ordering bug.
    #[test]
    fn a_roll_call_blames_only_the_ranks_that_have_not_come_through() {
        let here = at(7, Some(Kind::AllReduce));
        let of = |p: Option<Position>| Standing::of(p, &here);
        assert!(matches!(
            of(Some(at(7, Some(Kind::AllReduce)))),
            Standing::Here(_)
        ));
        // through it: done with #7 and in its own work, or already waiting at #8
        assert!(matches!(of(Some(at(7, None))), Standing::Passed));
        assert!(matches!(
            of(Some(at(8, Some(Kind::Broadcast)))),
            Standing::Passed
        ));
        // not there yet
        assert!(matches!(of(Some(at(6, None))), Standing::Behind(_)));
        assert!(matches!(
            of(Some(at(6, Some(Kind::Broadcast)))),
            Standing::Behind(_)
        ));
        assert!(matches!(
            of(Some(at(7, Some(Kind::Broadcast)))),
            Standing::Elsewhere(_)
        ));
        assert!(matches!(of(None), Standing::Silent));

        let why = |p: Option<Position>| of(p).why();
        assert_eq!(why(Some(at(7, Some(Kind::AllReduce)))), None);
        assert_eq!(why(Some(at(8, Some(Kind::AllReduce)))), None);
        let own = why(Some(at(6, None))).unwrap();
        assert!(
            own.contains("in its own work") && own.contains("since its collective #6"),
            "{own}"
        );
        let start = why(Some(at(0, None))).unwrap();
        assert!(start.contains("since it started"), "{start}");
        let earlier = why(Some(at(6, Some(Kind::Broadcast)))).unwrap();
        assert!(
            earlier.contains("the earlier broadcast from rank 0 #6"),
            "{earlier}"
        );
        let bug = why(Some(at(7, Some(Kind::Broadcast)))).unwrap();
        assert!(bug.contains("different orders"), "{bug}");
        assert!(why(None).unwrap().contains("did not answer"));
    }

    #[test]
    fn an_answer_keeps_its_position_through_the_wire() {
        let p = Position {
            calls: 42,
            within: Some(Kind::Broadcast),
            since: Instant::now() - Duration::from_millis(1500),
        };
        let a = p.encode(9);
        assert_eq!(a[0], 9, "the roll call's number comes back");
        let q = Position::decode(&a);
        assert_eq!((q.calls, q.within), (42, Some(Kind::Broadcast)));
        assert!(q.since.elapsed() >= Duration::from_millis(1500));
        let own = Position::decode(&at(3, None).encode(1));
        assert_eq!(own.within, None);
    }
}
